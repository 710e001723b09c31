"""``raytrain bench data``: data-pipeline throughput per CPU core, and bytes per sample.

On synthetic 1920x1080 scenes stored both as context regions (default storage) and as
full frames, with the cropper and augmentation that ``pipeline.Loader`` uses for
training under the default config (paper schedule, M = 5, S = 224):

* ``decode_per_core``: JPEG decode of the stored context images (the bound);
* ``crop_per_core``: decode + M = 5 RoI crops + augmentation + labels;
* ``stream_per_core``: the full streaming path as a training worker receives it: shards
  on disk -> ``pipeline.Loader`` (tar parsing, shuffle buffer, validation, cropper, collate
  in ``data.loader_workers`` persistent DataLoader worker processes, batches handed over
  through shared memory, each buffer released back to its worker as the training loop
  does) -> batches in the training process; samples per CPU-second of
  the training process and all its loader workers together, over the epochs after the
  first (what each epoch of a training run costs);
* ``full_frame_crop_per_core``: the straightforward path, decode the full frame and crop
  the same RoIs from it (same cropper, no reduced decode);
* ``bytes_per_sample_context`` / ``bytes_per_sample_full``: mean JPEG bytes per sample.

Extras: ``crop_spin_aug_per_core`` ((b) with every augmentation on: occluders with
probability 0.3, as in SPIN, and the paper configs' per-RoI colour jitter 0.3),
``crop_half_decode_per_core`` ((b) with ``decode_coverage=0.5``),
``stream_first_epoch_per_core`` ((c) over the first epoch alone: forking the workers,
first touch of their buffers), ``stream_wall_per_core``
((c) as batches/s of wall time divided by the loader workers), ``stream_workers``.

"Per core" is samples per CPU-second (``time.process_time`` of this single-threaded
process; ``/proc/<pid>/stat`` of the live loader workers, ``getrusage`` of reaped ones), so that
other load on the machine slows
every measurement alike; (a), (b), (d) run one thread (cv2, torch) in interleaved rounds
and the median round is reported.
"""

from __future__ import annotations

import dataclasses
import gc
import os
import resource
import tempfile
import time

import cv2
import numpy as np
import torch

from raytrain.data.crop import MultiRoICropper
from raytrain.data.schema import decode_sample
from raytrain.geometry import schedule_from_config
from raytrain.synthetic.people import SyntheticConfig, SyntheticGenerator, with_storage

HD = SyntheticConfig(image_sizes=((1920, 1080),))


def _cpu_seconds() -> float:
    """CPU seconds of this process plus its reaped children (the loader workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rate(fn, items, seconds: float) -> float:
    """Items per CPU-second of ``fn`` over ``items`` (cycled) for about ``seconds``."""
    done, start = 0, time.process_time()
    while True:
        for item in items:
            fn(item)
        done += len(items)
        elapsed = time.process_time() - start
        if elapsed >= seconds:
            return done / elapsed


def _decode(sample):
    return cv2.imdecode(np.frombuffer(sample.jpeg, np.uint8), cv2.IMREAD_COLOR)


def bench_config(shards: str = "", workers: int | None = None):
    """The default experiment config (what training uses), pointed at ``shards``, with the
    synthetic body model."""
    from raytrain.config import ExperimentConfig
    from raytrain.synthetic.body_model import with_default_body_model

    cfg = with_default_body_model(ExperimentConfig())
    cfg.data.train_shards = shards
    if workers is not None:
        cfg.data.loader_workers = workers
    return cfg


def training_cropper(cfg, **overrides) -> MultiRoICropper:
    """The cropper ``pipeline.Loader`` builds for the training split of ``cfg``."""
    from raytrain.data.pipeline import _root_joint

    kwargs = {"crop_size": cfg.data.crop_size, "augment": cfg.data,
              "root_joint": _root_joint(cfg.model.smpl_dir)}
    kwargs.update(overrides)
    return MultiRoICropper(schedule_from_config(cfg.rois), **kwargs)


def write_bench_shards(encoded: list[dict], root: str, copies: int, per_shard: int = 64) -> int:
    """``copies`` renamed copies of the encoded samples as shards under ``root``."""
    from raytrain.data.shards import write_shards

    samples = ({**e, "__key__": f"{e['__key__']}_c{c}"} for c in range(copies) for e in encoded)
    write_shards(samples, root, "synthetic", "bench", maxcount=per_shard)
    return copies * len(encoded)


def _live_children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process's live children (the loader workers),
    from /proc (Linux)."""
    me, tick, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0.0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()  # state, ppid, ..., utime, stime
        except OSError:  # ended meanwhile
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick
    return total


def _loader_cpu_seconds() -> float:
    """CPU seconds of this process and its children, live (the loader workers) or reaped."""
    return _cpu_seconds() + _live_children_cpu_seconds()


def stream_rate(shards: str, workers: int, batch_size: int = 16, epochs: int = 2) -> dict:
    """Samples per CPU-second (and per wall-second per worker) out of ``pipeline.Loader``.

    ``per_cpu_second`` counts the epochs after the first: with persistent workers
    (the default) that is what every epoch of a training run costs; ``first_epoch``
    includes forking the workers and faulting in their buffers.
    """
    from raytrain.data.pipeline import Loader

    cfg = bench_config(shards, workers)
    cfg.data.shuffle_buffer = 256
    gc.collect()  # outside the timed region
    samples, cpu, wall = [], [], []
    with Loader(cfg, "train", batch_size=batch_size, seed=0) as loader:
        for epoch in range(epochs):
            done, cpu0, wall0 = 0, _loader_cpu_seconds(), time.perf_counter()
            for batch in loader.epoch(epoch):
                done += batch["images"].shape[0]
                loader.release(batch)  # as the training loop does after each step
            wall.append(time.perf_counter() - wall0)
            cpu.append(_loader_cpu_seconds() - cpu0)  # before the workers stop
            samples.append(done)
    later = slice(1, None) if epochs > 1 else slice(0, None)
    return {"per_cpu_second": sum(samples[later]) / sum(cpu[later]),
            "first_epoch": samples[0] / cpu[0],
            "wall_per_worker": sum(samples[later]) / sum(wall[later]) / max(workers, 1),
            "samples": sum(samples)}


def run_data_bench(quick: bool = False, num_samples: int | None = None, seed: int = 0,
                   body_model=None, workers: int | None = None) -> dict:
    """Measure the data pipeline; returns the dict of ``raytrain bench data --json``."""
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    n = num_samples or (12 if quick else 48)
    rounds, slot = (3, 0.5) if quick else (7, 1.5)
    context_gen = SyntheticGenerator(HD, body_model)
    full_gen = SyntheticGenerator(with_storage(HD, "full"), context_gen.model)
    context = context_gen.encoded(seed, range(n))
    full = full_gen.encoded(seed, range(n))
    ctx_samples = [decode_sample(e, decode_image=False) for e in context]
    full_samples = [decode_sample(e, decode_image=False) for e in full]

    cfg = bench_config(workers=workers)
    cropper = training_cropper(cfg)
    naive = training_cropper(cfg, reduced_decode=False, fast_resize=False)
    spin = training_cropper(cfg, augment=dataclasses.replace(cfg.data, occlusion_prob=0.3, roi_color_jitter=0.3))
    half = training_cropper(cfg, decode_coverage=0.5)
    rng = np.random.default_rng(seed)
    tests = {
        "decode_per_core": (_decode, ctx_samples),
        "crop_per_core": (lambda s: cropper(s, rng), ctx_samples),
        "full_frame_crop_per_core": (lambda s: naive(s, rng), full_samples),
        "crop_spin_aug_per_core": (lambda s: spin(s, rng), ctx_samples),
        "crop_half_decode_per_core": (lambda s: half(s, rng), ctx_samples),
    }
    rates = {name: [] for name in tests}
    for _ in range(rounds):
        for name, (fn, items) in tests.items():
            rates[name].append(_rate(fn, items, slot))
    result = {name: float(np.median(values)) for name, values in rates.items()}

    workers = cfg.data.loader_workers
    with tempfile.TemporaryDirectory() as root:
        write_bench_shards(context, root, copies=(16 if quick else 24) * 48 // n)
        stream = stream_rate(root, workers, epochs=2 if quick else 4)
    result["stream_per_core"] = stream["per_cpu_second"]
    result["stream_first_epoch_per_core"] = stream["first_epoch"]
    result["stream_wall_per_core"] = stream["wall_per_worker"]
    result["stream_workers"] = workers
    result["bytes_per_sample_context"] = float(np.mean([len(e["jpg"]) for e in context]))
    result["bytes_per_sample_full"] = float(np.mean([len(e["jpg"]) for e in full]))
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
