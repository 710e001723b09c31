"""`raytrain predict --ray`: batch inference on Ray Data, on the running Ray cluster.

    sources (listed on the driver) -> ray.data.from_items
      -> flat_map(read + [detect] + crop)         CPU tasks of --crop-cpus each
                                                  (an actor pool when --detector: loaded once)
      -> map_batches(ModelActor)                  --actors actors: one GPU each on a cluster
                                                  with GPUs, else --actor-cpus CPUs each
      -> predictions.jsonl (streamed to the driver, the writer of the single-process path)
         or predictions.parquet/ (written by the cluster, --ray-format parquet: the
         record's fields, ``frame`` -1 for a still image, arrays as Ray tensor columns)

The crop stage reads through the single-process path's ``inputs.units`` and
``run.detections_for`` and crops with ``crop.PersonCropper``; the actors run the same
forward pass (``model.InferenceModel``), so the records equal those of `raytrain predict`
without ``--ray`` (in completion order; ``image``, ``frame`` and ``person`` identify each).
``--save-vertices`` writes the same ``vertices/`` files from the driver; ``--render`` draws
the same pictures on the driver after the stream, from the persons' vertices (spooled to a
temporary folder) and the sources read again through ``inputs.units``. Skips are counted
by reason in a small counter actor, with a few examples each. Every node must see the
checkpoint (shared storage, or ``s3://`` / ``gs://``: each node copies it once into its
cache, ``eval/fetch.py``) and the inputs (shared storage or ``s3://`` / ``gs://``).
"""
from __future__ import annotations

import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import ray

from ..connect import connect_ray
from ..outputs import Output
from .crop import PersonCropper
from .inputs import SkipLog, Source, SourceEnd, count_unused, units
from .overlay import canvas_of, draw_persons
from .run import (
    PROGRESS_EVERY_S,
    PredictOptions,
    RecordWriter,
    RenderWriter,
    VertexWriter,
    detections_for,
    finish,
    finite_output,
    prediction_record,
    prepare,
)

log = logging.getLogger(__name__)
NO_FRAME = -1   # the ``frame`` column of a still image (Arrow columns hold no None)
SPOOL_PER_FILE = 64   # persons per spooled vertex file of --render (read back at random)


def run_predict_ray(opts: PredictOptions) -> dict:
    """Predict on Ray Data; returns the summary of ``run.finish``."""
    import ray.data
    run, spool = prepare(opts), None
    try:
        from .model import load_inference_model
        # on the driver first: a checkpoint that does not fit its config fails here, in one line
        model = load_inference_model(run.checkpoint, opts.smpl_dir, opts.config, device="cpu")
        connect_ray()
        ray.data.DataContext.get_current().enable_progress_bars = False
        counter = SkipCounter.options(num_cpus=0).remote()
        started = time.perf_counter()
        crop_args = {"rois": model.cfg.rois, "crop_size": model.crop_size, "seed": model.cfg.seed, "opts": opts,
                     "table": run.table, "counter": counter}
        ds = ray.data.from_items([{"url": s.url, "name": s.name, "kind": s.kind, "relative": s.relative}
                                  for s in run.sources], override_num_blocks=max(1, len(run.sources)))
        if opts.detector:
            ds = ds.flat_map(CropStage, fn_constructor_kwargs=crop_args, num_cpus=opts.crop_cpus,
                             compute=ray.data.ActorPoolStrategy(size=opts.actors))
        else:
            ds = ds.flat_map(crop_source, fn_kwargs=crop_args, num_cpus=opts.crop_cpus)
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        ds = ds.map_batches(ModelActor, batch_size=opts.batch_size, batch_format="numpy",
                            fn_constructor_kwargs={"opts": opts, "gpu": gpus, "counter": counter,
                                                   "checkpoint": run.checkpoint_origin},
                            compute=ray.data.ActorPoolStrategy(size=opts.actors),
                            num_gpus=1 if gpus else 0, num_cpus=opts.actor_cpus)
        spool = _Spool(model.faces) if opts.render else None
        if opts.ray_format == "parquet":
            path, persons = run.out.path("predictions.parquet"), None
            ds.write_parquet(str(path))
        else:
            path, persons = _write_jsonl(ds, run.out, opts, started, model.faces, run.skips, spool)
        tally = Counter(ray.get(counter.counts.remote()))
        run.skips.merge(*ray.get(counter.skips.remote()))
        stats = Counter({k: tally.get(k, 0) for k in ("images", "videos", "frames", "persons")})
        if persons is not None:
            stats["persons"] = persons
        if spool is not None:
            _render(run.sources, opts, run.out, model.faces, spool)
        return finish(opts, run.out, stats, run.skips, time.perf_counter() - started, path)
    finally:
        if spool is not None:
            spool.folder.cleanup()
        run.out.release()


def _write_jsonl(ds, out: Output, opts: PredictOptions, started: float, faces, skips: SkipLog, spool):
    """predictions.jsonl (and vertices/, the render spool) from the model stage's rows."""
    writer, last = RecordWriter(out), time.perf_counter()
    vertices = VertexWriter(out, faces) if opts.save_vertices else None
    ok = False
    try:
        for row in ds.iter_rows():
            record = record_of_row(row)
            if not finite_output({k: row[k] for k in (*OUTPUTS, "vertices") if k in row}, record, skips):
                continue
            line = writer.write(record)
            if vertices is not None:
                vertices.add(np.asarray(row["vertices"]) + np.asarray(row["cam_full"]), line)
            if spool is not None:
                spool.add(record, np.asarray(row["vertices"]), line)
            now = time.perf_counter()
            if not opts.quiet and now - last >= PROGRESS_EVERY_S:
                last = now
                print(f"[predict] {writer.lines} persons, {writer.lines / (now - started):.1f} persons/s",
                      flush=True)
        ok = True
    finally:
        writer.close(ok)
        if vertices is not None:
            vertices.close(ok)
        if spool is not None:
            spool.writer.close(ok)
    return writer.path, writer.lines


OUTPUTS = ("focal", "pose", "betas", "cam_full", "joints_2d")


def record_of_row(row: dict) -> dict:
    """An output row of the model stage -> the JSON record of ``run.prediction_record``."""
    frame = int(row["frame"])
    item = {"image": str(row["image"]), "frame": None if frame == NO_FRAME else frame,
            "person": int(row["person"]), "bbox": row["bbox"], "score": row["score"],
            "boxes": np.asarray(row["box"])[None], "focal": row["focal"]}
    return prediction_record(item, row)


# ----------------------------------------------------------------------------- render


class _Spool:
    """The persons of a --render run: their vertices in small temporary npz files, and
    what drawing needs by (image, frame)."""

    def __init__(self, faces):
        self.folder = tempfile.TemporaryDirectory(prefix="raytrain-render-")
        self.writer = VertexWriter(Output(Path(self.folder.name), None), faces, folder="spool",
                                   per_file=SPOOL_PER_FILE)
        self.persons: dict[tuple[str, int | None], list[dict]] = {}
        self.cached: tuple[int, np.ndarray] | None = None

    def add(self, record: dict, vertices: np.ndarray, line: int) -> None:
        self.writer.add(vertices, line)
        self.persons.setdefault((record["image"], record["frame"]), []).append(
            {"bbox": record["bbox"], "person": record["person"], "cam_full": np.asarray(record["cam_full"]),
             "focal": record["focal"], "line": line})

    def of(self, unit) -> list[dict]:
        found = sorted(self.persons.get((unit.name, unit.frame), []), key=lambda p: p["person"])
        return [dict(p, vertices=self._vertices(p["line"])) for p in found]

    def _vertices(self, line: int) -> np.ndarray:
        index, row = self.writer.where[line]
        if self.cached is None or self.cached[0] != index:
            with np.load(Path(self.folder.name) / self.writer.name(index)) as stored:
                self.cached = (index, stored["vertices"])
        return self.cached[1][row]


def _render(sources: list[Source], opts: PredictOptions, out: Output, faces, spool: _Spool) -> None:
    """render/ of a --ray run: each source read again through ``units``, its persons drawn
    in batches of batch_size as the single-process path draws them."""
    taken: set[str] = set()
    for source in sources:
        render, ok = RenderWriter(out, source, taken), False
        try:
            for unit in units(source, opts, SkipLog(), Counter(), view=True):
                canvas, persons = canvas_of(unit.view), spool.of(unit)
                for first in range(0, len(persons), opts.batch_size):
                    canvas = draw_persons(canvas, persons[first:first + opts.batch_size], faces)
                render.show(unit, canvas)
            ok = True
        finally:
            render.close(ok)


# ----------------------------------------------------------------------------- stages


@ray.remote
class SkipCounter:
    """Input counts and skips (with a few examples each) of the whole run."""

    def __init__(self):
        self.tally = Counter()
        self.log = SkipLog()

    def add(self, counts: dict, skips: tuple[dict, dict] = ({}, {})) -> None:
        self.tally.update(counts)
        self.log.merge(*skips)

    def counts(self) -> dict:
        return dict(self.tally)

    def skips(self) -> tuple[dict, dict]:
        return self.log.state()


def crop_source(row: dict, rois, crop_size: int, seed: int, opts: PredictOptions, table, counter,
                detector=None):
    """One source (image or video) -> rows of person crops; counts and skips go to ``counter``."""
    cropper = PersonCropper(rois, crop_size, focal=opts.focal, box_scale=opts.box_scale, seed=seed)
    source = Source(**row)
    tally, skips, end = Counter(), SkipLog(), SourceEnd()
    detections = table.for_source(source) if table is not None else []
    try:
        for unit in units(source, opts, skips, tally, view=detector is not None, end=end):
            kept = detections_for(unit, detector, detections, opts.score_threshold, skips)
            for item in cropper.crops(unit, kept, skips):
                yield _crop_row(item)
        if table is not None:
            count_unused(detections, end, source.name, skips)
    finally:
        ray.get(counter.add.remote(dict(tally), skips.state()))


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
    """The network on one GPU (or ``actor_cpus`` CPUs): crop batches -> predictions (and
    the body-frame vertices with --render or --save-vertices)."""

    def __init__(self, opts: PredictOptions, gpu: bool, checkpoint: str, counter):
        import torch

        from .model import load_inference_model
        if not gpu:
            torch.set_num_threads(max(1, int(round(opts.actor_cpus))))
        device = opts.device or ("cuda" if gpu else "cpu")
        self.model = load_inference_model(checkpoint, opts.smpl_dir, opts.config, device)
        self.vertices = opts.render or opts.save_vertices
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.model.forward_arrays({k: batch[k] for k in ("images", "boxes", "image_size", "focal")},
                                            vertices=self.vertices)
        ray.get(self.counter.add.remote({"persons": len(batch["person"])}))
        result = {k: batch[k] for k in ("image", "frame", "person", "bbox", "score")}
        result["box"] = np.asarray(batch["boxes"])[:, 0]
        result.update({k: outputs[k] for k in (*OUTPUTS, *(("vertices",) if self.vertices else ()))})
        return result
