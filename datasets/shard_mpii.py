#!/usr/bin/env python
"""Shard MPII from a SPIN/CLIFF-style .npz plus its images (see datasets/README.md);
needs raytrain installed (`pip install -e .`).

    python datasets/shard_mpii.py --npz mpii_train.npz --img-root /data/mpii --out shards/mpii
"""
import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", "mpii", *sys.argv[1:]]))  # = raytrain shard mpii ...
