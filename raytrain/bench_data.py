"""``raytrain bench data``: data-pipeline throughput per CPU core, and bytes per sample.

One process, one thread (cv2 and torch), on synthetic 1920x1080 scenes stored both as
context regions (default storage) and as full frames:

* ``decode_per_core``: JPEG decode of the stored context images (the bound);
* ``crop_per_core``: decode + M = 5 RoI crops (S = 224, paper schedule) + augmentation;
* ``stream_per_core``: the full path a training worker sees: shards on disk -> reader
  (tar parsing, shuffle buffer, validation) -> cropper -> collated batches;
* ``full_frame_crop_per_core``: the straightforward path, decode the full frame and crop
  the same RoIs from it;
* ``crop_half_decode_per_core`` (extra): (b) with ``decode_coverage=0.5``, i.e. the
  JPEG decoded at 1/2 resolution (libjpeg DCT scaling), the smallest RoIs upsampled;
* ``bytes_per_sample_context`` / ``bytes_per_sample_full``: mean JPEG bytes per sample.

The throughputs (a), (b), (d) are measured in interleaved rounds and the median of the
rounds is reported, so a busy machine disturbs them alike.
"""

from __future__ import annotations

import tempfile
import time

import cv2
import numpy as np
import torch

from raytrain.data.augment import AugmentConfig
from raytrain.data.collate import collate_crops
from raytrain.data.crop import MultiRoICropper
from raytrain.data.schema import decode_sample
from raytrain.data.synthetic import SyntheticConfig, SyntheticGenerator, with_storage

HD = SyntheticConfig(image_sizes=((1920, 1080),))


def _rate(fn, items, seconds: float) -> float:
    """Items per second of ``fn`` over ``items`` (cycled) for about ``seconds``."""
    done, start = 0, time.perf_counter()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed


def _decode(sample):
    return cv2.imdecode(np.frombuffer(sample.jpeg, np.uint8), cv2.IMREAD_COLOR)


def _stream_rate(encoded: list[dict], cropper, seconds: float, batch_size: int = 16) -> float:
    """Samples/s of shards -> ShardReader -> cropper -> collate, in this process."""
    from raytrain.data.reader import ShardReader
    from raytrain.data.shards import write_shards

    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as root:
        write_shards(iter(encoded), root, "synthetic", "bench", maxcount=max(len(encoded) // 2, 1))
        reader = ShardReader(root, seed=0, shuffle=True, shuffle_buffer=64, rank=0, world_size=1,
                             decode_images=False, transform=lambda s: cropper(s, rng))
        done, start, epoch = 0, time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            reader.set_epoch(epoch)
            batch = []
            for item in reader:
                batch.append(item)
                if len(batch) == batch_size:
                    collate_crops(batch)
                    done, batch = done + batch_size, []
            if batch:
                collate_crops(batch)
                done += len(batch)
            epoch += 1
        return done / (time.perf_counter() - start)


def run_data_bench(quick: bool = False, num_samples: int | None = None, seed: int = 0,
                   body_model=None) -> dict:
    """Measure the data pipeline; returns the dict of ``raytrain bench data --json``."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    n = num_samples or (12 if quick else 48)
    rounds, slot = (3, 0.6) if quick else (5, 2.0)
    context_gen = SyntheticGenerator(HD, body_model)
    full_gen = SyntheticGenerator(with_storage(HD, "full"), context_gen.model)
    context = context_gen.encoded(seed, range(n))
    full = full_gen.encoded(seed, range(n))
    ctx_samples = [decode_sample(e, decode_image=False) for e in context]
    full_samples = [decode_sample(e, decode_image=False) for e in full]

    augment = AugmentConfig()
    cropper = MultiRoICropper("paper", 5, crop_size=224, augment=augment)
    naive = MultiRoICropper("paper", 5, crop_size=224, augment=augment, reduced_decode=False)
    rng = np.random.default_rng(seed)
    tests = {
        "decode_per_core": (_decode, ctx_samples),
        "crop_per_core": (lambda s: cropper(s, rng), ctx_samples),
        "full_frame_crop_per_core": (lambda s: naive(s, rng), full_samples),
    }
    rates = {name: [] for name in tests}
    for _ in range(rounds):
        for name, (fn, items) in tests.items():
            rates[name].append(_rate(fn, items, slot))
    result = {name: float(np.median(values)) for name, values in rates.items()}
    result["stream_per_core"] = _stream_rate(context, cropper, slot * rounds / 2)
    result["bytes_per_sample_context"] = float(np.mean([len(e["jpg"]) for e in context]))
    result["bytes_per_sample_full"] = float(np.mean([len(e["jpg"]) for e in full]))
    fast = MultiRoICropper("paper", 5, crop_size=224, augment=augment, decode_coverage=0.5)
    result["crop_half_decode_per_core"] = float(np.median(
        [_rate(lambda s: fast(s, rng), ctx_samples, slot) for _ in range(max(rounds // 2, 1))]))
    result["crop_over_decode"] = result["crop_per_core"] / result["decode_per_core"]
    result["stream_over_decode"] = result["stream_per_core"] / result["decode_per_core"]
    result["crop_over_full_frame"] = result["crop_per_core"] / result["full_frame_crop_per_core"]
    result["num_samples"] = n
    return result


def format_bench(result: dict) -> str:
    """Human-readable lines for the CLI."""
    lines = [f"{name:28s} {value:10.1f}" for name, value in result.items()
             if name.endswith("per_core") or name.startswith("bytes")]
    lines += [f"{name:28s} {result[name]:10.2f}" for name in
              ("crop_over_decode", "stream_over_decode", "crop_over_full_frame")]
    return "\n".join(lines)


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(run_data_bench(quick="--quick" in sys.argv), indent=1))
