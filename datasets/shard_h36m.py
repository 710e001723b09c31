#!/usr/bin/env python
"""Shard Human3.6M from a SPIN/CLIFF-style .npz plus its images (see datasets/README.md);
needs raytrain installed (`pip install -e .`).

    python datasets/shard_h36m.py --npz h36m_train.npz --img-root /data/h36m --out shards/h36m
"""
import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", "h36m", *sys.argv[1:]]))  # = raytrain shard h36m ...
