"""The hard synthetic benchmark: a second distribution beside the demo's, for the study.

Same renderer and shard format as the demo (``people.py``), harder in every direction
the demo eases: body joints uniform inside ``HARD_POSE_SCALE`` of every joint's limits
(no prototypes), any heading, focal lengths from 0.5 to 2 image diagonals, people from
far away to larger than the image (cut by its border), placed anywhere in the frame,
0-2 unlabelled people beside the labelled one (in front of or behind it), 0-2 textured
occluders over it, and backgrounds drawn from a pool of 8 textures shared by all
samples, so that the background does not identify a person.

The splits are fixed by their seeds (``HARD_SPLIT_SEEDS``): every run that asks for
``n`` samples of a split gets the same ``n`` samples.
"""
from __future__ import annotations

import math
from pathlib import Path

from .people import SyntheticConfig, ensure_synthetic_shards

#: Body-joint angles uniform in [s * low, s * high] of the limits: broad, but a small
#: network trained for minutes can still learn more than the mean pose from it.
HARD_POSE_SCALE = 0.6
HARD_SPLIT_SEEDS = {"train": 101, "val": 102, "test": 103}


def hard_synthetic_config(crop_size: int = 64, heading_deg: float = 180.0,
                          pose_scale: float = HARD_POSE_SCALE) -> SyntheticConfig:
    """The SyntheticConfig of the hard benchmark, stored at ``crop_size``'s resolution;
    ``heading_deg`` and ``pose_scale`` narrow it (docs/study.md, "Why no network learns
    pose here")."""
    return SyntheticConfig(
        image_sizes=((640, 480), (480, 640), (800, 600), (960, 540), (720, 720), (1280, 720),
                     (1920, 1080), (1080, 1920), (320, 240)),
        focal_range=(0.5, 2.0), box_fraction=(0.2, 1.15), centre_range=(0.1, 0.9),
        heading_range=math.radians(heading_deg), tilt_scale=1.0, pose_scale=pose_scale,
        others=(0, 2), occluders=(0, 2), occluder_size=(0.15, 0.45), background_pool=8,
        crop_size=crop_size)


def ensure_hard_splits(root, sizes: dict[str, int], crop_size: int = 64, workers: int = 1,
                       heading_deg: float = 180.0, pose_scale: float = HARD_POSE_SCALE) -> dict[str, str]:
    """Render (or reuse) the splits ``sizes`` ({split: n}) under ``root``/<split>; returns
    {split: shard directory}."""
    cfg = hard_synthetic_config(crop_size, heading_deg, pose_scale)
    out = {}
    for split, n in sizes.items():
        if split not in HARD_SPLIT_SEEDS:
            raise ValueError(f"unknown split {split!r}: expected one of {sorted(HARD_SPLIT_SEEDS)}")
        out[split] = ensure_synthetic_shards(Path(root) / split, n, HARD_SPLIT_SEEDS[split], cfg,
                                             workers=workers, maxcount=500)
    return out


def sample_figure(path: str, count: int = 8, seed: int = HARD_SPLIT_SEEDS["train"]) -> str:
    """A 2 x 4 grid of full-frame hard samples with the labelled person's box in red."""
    import cv2
    import numpy as np

    from .people import SyntheticGenerator, with_storage
    generator = SyntheticGenerator(with_storage(hard_synthetic_config(96), "full"))
    tiles = []
    for raw in generator.samples(seed, range(count)):
        image, (cx, cy, b) = raw["image"].copy(), raw["meta"]["box"]
        cv2.rectangle(image, (int(cx - b / 2), int(cy - b / 2)), (int(cx + b / 2), int(cy + b / 2)), (255, 0, 0), 3)
        tiles.append(cv2.resize(image, (320, 240)))
    rows = [np.concatenate(tiles[k:k + 4], axis=1) for k in range(0, count, 4)]
    cv2.imwrite(path, cv2.cvtColor(np.concatenate(rows, axis=0), cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
    return path


if __name__ == "__main__":  # python -m raytrain.synthetic.hard docs/study/hard_samples.jpg
    import sys
    print(sample_figure(sys.argv[1] if len(sys.argv) > 1 else "docs/study/hard_samples.jpg"))
