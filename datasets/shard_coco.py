#!/usr/bin/env python
"""Shard COCO from a SPIN/CLIFF-style .npz plus its images (see datasets/README.md);
needs raytrain installed (`pip install -e .`).

    python datasets/shard_coco.py --npz coco_2014_train.npz --img-root /data/coco --out shards/coco
"""
import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", "coco", *sys.argv[1:]]))  # = raytrain shard coco ...
