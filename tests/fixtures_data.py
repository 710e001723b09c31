"""Tiny synthetic shard samples for the data tests (no real data, no renderer)."""

from __future__ import annotations

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
