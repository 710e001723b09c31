"""`raytrain predict --ray`: batch inference on Ray Data, on the running Ray cluster.

    sources (listed on the driver) -> ray.data.from_items
      -> flat_map(read + [detect] + crop)         CPU tasks of --crop-cpus each
                                                  (an actor pool when --detector: loaded once)
      -> map_batches(ModelActor)                  --actors actors: one GPU each on a cluster
                                                  with GPUs, else --actor-cpus CPUs each
      -> predictions.jsonl (streamed to the driver, the writer of the single-process path)
         or predictions.parquet/ (written by the cluster, --ray-format parquet: the
         record's fields, ``frame`` -1 for a still image, arrays as Ray tensor columns)

The crop stage runs the single-process path's code (``inputs``, ``crop.PersonCropper``)
and the actors the same forward pass (``model.InferenceModel``), so the records equal
those of `raytrain predict` without ``--ray`` (in completion order; ``image``, ``frame``
and ``person`` identify each). Skips are counted by reason in a small counter actor.
Every node must see the checkpoint (shared storage, or ``s3://`` / ``gs://``: each node
copies it once into its cache, ``eval/fetch.py``) and the inputs (shared storage or
``s3://`` / ``gs://``).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray

from ..connect import connect_ray
from .crop import PersonCropper, Unit
from .inputs import SkipItem, read_image, read_video
from .run import (
    PROGRESS_EVERY_S,
    PredictOptions,
    RecordWriter,
    detections_for,
    finish,
    missing_image_counts,
    prediction_record,
    read_inputs,
)

log = logging.getLogger(__name__)
NO_FRAME = -1   # the ``frame`` column of a still image (Arrow columns hold no None)


def run_predict_ray(opts: PredictOptions) -> dict:
    """Predict on Ray Data; returns the summary of ``run.finish``."""
    import ray.data
    sources, table = read_inputs(opts)
    from .model import load_inference_model
    # on the driver first: a checkpoint that does not fit its config fails here, in one line
    model = load_inference_model(opts.checkpoint, opts.smpl_dir, opts.config, device="cpu")
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    counts = missing_image_counts(table, sources)
    connect_ray()
    ray.data.DataContext.get_current().enable_progress_bars = False
    counter = SkipCounter.options(num_cpus=0).remote()
    started = time.perf_counter()
    crop_args = {"rois": model.cfg.rois, "crop_size": model.crop_size, "seed": model.cfg.seed, "opts": opts,
                 "table": table, "counter": counter}
    ds = ray.data.from_items([{"url": s.url, "name": s.name, "kind": s.kind} for s in sources],
                             override_num_blocks=max(1, len(sources)))
    if opts.detector:
        ds = ds.flat_map(CropStage, fn_constructor_kwargs=crop_args, num_cpus=opts.crop_cpus,
                         compute=ray.data.ActorPoolStrategy(size=opts.actors))
    else:
        ds = ds.flat_map(crop_source, fn_kwargs=crop_args, num_cpus=opts.crop_cpus)
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    ds = ds.map_batches(ModelActor, batch_size=opts.batch_size, batch_format="numpy",
                        fn_constructor_kwargs={"opts": opts, "gpu": gpus, "counter": counter},
                        compute=ray.data.ActorPoolStrategy(size=opts.actors),
                        num_gpus=1 if gpus else 0, num_cpus=opts.actor_cpus)
    if opts.ray_format == "parquet":
        path = out / "predictions.parquet"
        ds.write_parquet(str(path))
    else:
        path = out / "predictions.jsonl"
        _write_jsonl(ds, path, opts, started)
    tally = Counter(ray.get(counter.counts.remote()))
    stats = Counter({k: tally.pop(k, 0) for k in ("images", "videos", "frames", "persons")})
    counts.update(tally)
    return finish(opts, out, stats, counts, time.perf_counter() - started, path)


def _write_jsonl(ds, path: Path, opts: PredictOptions, started: float) -> None:
    writer, last = RecordWriter(path), time.perf_counter()
    try:
        for row in ds.iter_rows():
            writer.write(record_of_row(row))
            now = time.perf_counter()
            if not opts.quiet and now - last >= PROGRESS_EVERY_S:
                last = now
                print(f"[predict] {writer.lines} persons, {writer.lines / (now - started):.1f} persons/s",
                      flush=True)
    finally:
        writer.close()


def record_of_row(row: dict) -> dict:
    """An output row of the model stage -> the JSON record of ``run.prediction_record``."""
    frame = int(row["frame"])
    item = {"image": str(row["image"]), "frame": None if frame == NO_FRAME else frame,
            "person": int(row["person"]), "bbox": row["bbox"], "score": row["score"],
            "boxes": np.asarray(row["box"])[None], "focal": row["focal"]}
    return prediction_record(item, row)


# ----------------------------------------------------------------------------- stages


@ray.remote
class SkipCounter:
    """Skips and input counts of the whole run, by name."""

    def __init__(self):
        self.tally = Counter()

    def add(self, counts: dict) -> None:
        self.tally.update(counts)

    def counts(self) -> dict:
        return dict(self.tally)


def crop_source(row: dict, rois, crop_size: int, seed: int, opts: PredictOptions, table, counter,
                detector=None):
    """One source (image or video) -> rows of person crops; skips go to ``counter``."""
    cropper = PersonCropper(rois, crop_size, focal=opts.focal, box_scale=opts.box_scale, seed=seed)
    tally = Counter()
    try:
        for unit in _units(row, opts, tally):
            items, skipped = cropper(unit, detections_for(unit, row["name"], detector, table))
            tally.update(skipped)
            for item in items:
                yield _crop_row(item)
    except SkipItem as skip:
        log.warning("[predict] skip %s: %s", row["name"], skip)
        tally[skip.reason] += 1
    finally:
        ray.get(counter.add.remote(dict(tally)))


def _units(row: dict, opts: PredictOptions, tally: Counter):
    from .inputs import Source
    source = Source(url=row["url"], name=row["name"], kind=row["kind"])
    if source.kind == "image":
        image = read_image(source, storage_options=opts.storage_options)
        tally["images"] += 1
        yield Unit(name=source.name, frame=None, size=image.size, data=image.data)
        return
    for index, rgb in enumerate(read_video(source, opts.max_frames, storage_options=opts.storage_options)):
        tally["videos"] += index == 0
        tally["frames"] += 1
        yield Unit(name=source.name, frame=index, size=(rgb.shape[1], rgb.shape[0]), pixels=rgb)


def _crop_row(item: dict) -> dict:
    return {"image": item["image"], "frame": NO_FRAME if item["frame"] is None else int(item["frame"]),
            "person": int(item["person"]), "bbox": np.asarray(item["bbox"], np.float64),
            "score": float(item["score"]), "images": item["images"], "boxes": item["boxes"],
            "image_size": item["image_size"], "focal": np.float32(item["focal"])}


class CropStage:
    """The crop stage with a detector, loaded once per actor."""

    def __init__(self, rois, crop_size: int, seed: int, opts: PredictOptions, table, counter):
        from .detect import load_detector
        self.args = {"rois": rois, "crop_size": crop_size, "seed": seed, "opts": opts, "table": table,
                     "counter": counter}
        self.detector = load_detector(opts.detector, opts.detector_arch, opts.score_threshold, device="cpu")

    def __call__(self, row: dict):
        yield from crop_source(row, detector=self.detector, **self.args)


class ModelActor:
    """The network on one GPU (or ``actor_cpus`` CPUs): crop batches -> predictions."""

    def __init__(self, opts: PredictOptions, gpu: bool, counter):
        import torch

        from .model import load_inference_model
        if not gpu:
            torch.set_num_threads(max(1, int(round(opts.actor_cpus))))
        device = opts.device or ("cuda" if gpu else "cpu")
        self.model = load_inference_model(opts.checkpoint, opts.smpl_dir, opts.config, device)
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.model.forward_arrays({k: batch[k] for k in ("images", "boxes", "image_size", "focal")})
        ray.get(self.counter.add.remote({"persons": len(batch["person"])}))
        result = {k: batch[k] for k in ("image", "frame", "person", "bbox", "score")}
        result["box"] = np.asarray(batch["boxes"])[:, 0]
        result.update({k: outputs[k] for k in ("focal", "pose", "betas", "cam_full", "joints_2d")})
        return result
