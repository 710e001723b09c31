"""Tiny synthetic shard samples for the data tests (no real data, no renderer)."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from raytrain.data.schema import ARRAY_SHAPES, encode_sample


def fake_jpeg(rng: np.random.Generator, width: int = 48, height: int = 40) -> bytes:
    """A small random-looking JPEG (smooth gradient plus noise)."""
    ramp = np.linspace(0, 200, width, dtype=np.float32)[None, :, None]
    noise = rng.integers(0, 55, size=(height, width, 3)).astype(np.float32)
    image = np.clip(ramp + noise, 0, 255).astype(np.uint8)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return encoded.tobytes()


def fake_meta(rng: np.random.Generator, source: str = "fake", width: int = 48, height: int = 40) -> dict:
    """Metadata of a person whose box lies inside a 320x240 full image."""
    full_w, full_h = 320, 240
    side = float(rng.uniform(40, 100))
    cx, cy = float(rng.uniform(60, 260)), float(rng.uniform(60, 180))
    scale = width / (2 * side)
    return {
        "image_size": [full_w, full_h],
        "focal": float(np.hypot(full_w, full_h)),
        "box": [cx, cy, side],
        "affine": [[scale, 0.0, width / 2 - scale * cx], [0.0, scale, height / 2 - scale * cy]],
        "stored_size": [width, height],
        "source": source,
        "gender": "neutral",
        "has_smpl": True,
        "has_3d": True,
        "has_2d": True,
        "cam_full": [0.1, -0.2, 8.0],
    }


def fake_arrays(rng: np.random.Generator) -> dict:
    return {name: rng.normal(size=shape).astype(np.float32) for name, shape in ARRAY_SHAPES.items()}


def make_fake_samples(n: int, seed: int = 0, source: str = "fake") -> list[dict]:
    """``n`` encoded samples (webdataset dicts) with keys ``fake/seq<k>/<frame>/0``."""
    rng = np.random.default_rng(seed)
    samples = []
    for index in range(n):
        key = f"{source}/seq{index // 100:03d}/{index:06d}/0"
        samples.append(encode_sample(key, fake_jpeg(rng), fake_meta(rng, source), fake_arrays(rng)))
    return samples


def rewrite_npz(raw: dict, name: str, value) -> dict:
    """Replace one array of a raw sample's npz member (for corrupting labels in tests)."""
    import io
    with np.load(io.BytesIO(raw["npz"])) as npz:
        arrays = dict(npz)
    arrays[name] = value
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    raw["npz"] = buffer.getvalue()
    return raw


def _write_image(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


def make_cliff_npz(tmp_path: Path, n: int = 5) -> tuple[Path, Path, dict]:
    """A pseudo-GT file in CLIFF's released layout (coco2014part_cliffGT.npz): SPIN's keys
    plus per-row focal_l and global_t, and keys the converter has no use for."""
    rng = np.random.default_rng(7)
    img_root = tmp_path / "coco"
    names = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        _write_image(img_root / name, 240, 180, i)
    part = np.concatenate([rng.uniform(70, 170, size=(n, 24, 2)), np.ones((n, 24, 1))], axis=2)
    data = {
        "imgname": np.array(names), "center": rng.uniform(100, 140, size=(n, 2)),
        "scale": rng.uniform(0.5, 0.8, size=n), "part": part,
        "pose": rng.normal(scale=0.2, size=(n, 72)), "shape": rng.normal(size=(n, 10)),
        "focal_l": rng.uniform(250.0, 900.0, size=n),
        "global_t": np.stack([rng.normal(scale=0.3, size=n), rng.normal(scale=0.3, size=n),
                              rng.uniform(3.0, 12.0, size=n)], axis=1),
        "openpose": np.zeros((n, 25, 3)), "annot_id": np.arange(n),
    }
    path = tmp_path / "coco2014part_cliffGT.npz"
    np.savez(path, **data)
    return path, img_root, data
