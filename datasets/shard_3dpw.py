#!/usr/bin/env python
"""Shard 3DPW: the raw release or a SPIN-style .npz (see datasets/README.md);
needs raytrain installed (`pip install -e .`).

    python datasets/shard_3dpw.py --root /data/3DPW --split test --out shards/3dpw-test
    python datasets/shard_3dpw.py --npz 3dpw_test.npz --img-root /data/3DPW --out shards/3dpw-test
"""
import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", "3dpw", *sys.argv[1:]]))  # = raytrain shard 3dpw ...
