#!/usr/bin/env python
"""Shard COCO from a SPIN/CLIFF-style .npz plus its images (see datasets/README.md).

    python datasets/shard_coco.py --npz coco_2014_train.npz --img-root /data/coco --out shards/coco
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["shard", "coco", *sys.argv[1:]]))  # = raytrain shard coco ...
