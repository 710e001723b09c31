"""Ray Data over the same tar shards, for the mechanism comparison in BENCHMARKS.md.

``pipeline.Loader`` (webdataset-style reader inside torch DataLoader workers of each
training worker) is the mechanism training uses; this module builds the alternative,

    read_binary_files(shards) -> flat_map(parse tar + decode + crop, num_cpus=1)
                              -> iter_batches(batch_size)  (collated like pipeline.Loader)

with the same cropper, so that ``compare`` can measure both in one run:

    python -m raytrain.bench.ray_data [--samples 768] [--cpus 2]

prints one JSON object (samples/s per core of each, and their ratio).
"""

from __future__ import annotations

import io
import json
import time

import numpy as np

from ..connect import connect_ray


class _CropShard:
    """flat_map function: one tar shard's bytes -> its cropped samples (dict rows)."""

    def __init__(self, cropper, seed: int = 0):
        self.cropper, self.seed = cropper, seed

    def __call__(self, row: dict):
        import zlib

        import cv2

        from ..data.formats.tar import tar_samples
        from ..data.schema import BadSample, decode_sample

        cv2.setNumThreads(1)
        for raw in tar_samples(io.BytesIO(row["bytes"])):
            try:
                sample = decode_sample(raw, decode_image=False)
                rng = np.random.default_rng([self.seed, 0, zlib.crc32(sample.key.encode())])
                out = self.cropper(sample, rng)
            except BadSample:
                continue
            out.pop("key")
            yield {name: np.asarray(value) for name, value in out.items()}


def ray_data_batches(shard_urls: list[str], cropper, batch_size: int = 16, num_cpus_per_task: float = 1.0):
    """Iterator of numpy batches (``images`` (N, M, S, S, 3) ...) from a Ray Data pipeline."""
    import ray.data

    ds = ray.data.read_binary_files(shard_urls, ray_remote_args={"num_cpus": 0.1})
    ds = ds.flat_map(_CropShard(cropper), num_cpus=num_cpus_per_task)
    return ds.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=2)


def compare(samples: int = 768, cpus: int = 2, batch_size: int = 16, seed: int = 0) -> dict:
    """Samples/s per core of Ray Data and of ``pipeline.Loader`` (``cpus`` workers), one run."""
    import tempfile

    import ray

    from raytrain.bench.data import (
        HD,
        bench_config,
        stream_rate,
        training_cropper,
        write_bench_shards,
    )
    from raytrain.data.shards import resolve_shards
    from raytrain.synthetic.people import SyntheticGenerator

    encoded = SyntheticGenerator(HD).encoded(seed, range(48))
    result = {"cpus": cpus}
    with tempfile.TemporaryDirectory() as root:
        write_bench_shards(encoded, root, copies=max(samples // 48, 1))
        urls = [ref.url for ref in resolve_shards(root)]
        cropper = training_cropper(bench_config(root))
        # one epoch each: worker start-up included, as for Ray Data below
        loader = [stream_rate(root, cpus, batch_size, epochs=1) for _ in range(2)]
        result["loader_per_core"] = float(np.median([r["wall_per_worker"] for r in loader]))
        result["loader_per_cpu_second"] = float(np.median([r["per_cpu_second"] for r in loader]))
        connect_ray(num_cpus=cpus, log_to_driver=False)
        try:
            rates = []
            for _ in range(2):
                done, start = 0, time.perf_counter()
                for batch in ray_data_batches(urls, cropper, batch_size):
                    done += len(batch["images"])
                rates.append(done / (time.perf_counter() - start) / cpus)
            result["ray_data_per_core"] = float(np.median(rates))
            result["ray_data_samples"] = done
        finally:
            ray.shutdown()
    result["ray_over_loader"] = result["ray_data_per_core"] / result["loader_per_core"]
    return result


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=768)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(compare(args.samples, args.cpus)))
