#!/usr/bin/env python
"""Shard MPII from a SPIN/CLIFF-style .npz plus its images (see datasets/README.md).

    python datasets/shard_mpii.py --npz mpii_train.npz --img-root /data/mpii --out shards/mpii
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raytrain.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["shard", "mpii", *sys.argv[1:]]))  # = raytrain shard mpii ...
