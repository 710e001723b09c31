"""`raytrain predict`: a trained checkpoint on images and videos, in one process.

    raytrain predict --checkpoint CKPT --detections dets.json photos/ clip.mp4 --out runs/predict
    raytrain predict --checkpoint CKPT --detector frcnn.pt --render photos/

For every person box (from a COCO-results file or a local torchvision detector) the RoI
crops are cut by the training cropper with the checkpoint's schedule (``crop.py``), batched
through the network (``model.py``, the validation forward pass) and written one JSON line
per person to ``predictions.jsonl``:

    {"image", "frame" (video frame index or null), "person" (index of the box in its
     image/frame), "bbox" [x, y, w, h] (the detection), "score", "box" [cx, cy, b] (RoI 0),
     "focal" (px), "pose" (72 SMPL axis-angle), "betas" (10), "cam_full" [tx, ty, tz]
     (m, camera of RoI 0), "joints_2d" (24 x [x, y] full-image px)}

``--save-vertices``: ``vertices/vertices-NNNNNN.npz`` (``vertices`` (n, 6890, 3) float32 in
the camera frame, ``record`` (n,) line numbers in predictions.jsonl, ``faces``).
``--render``: ``render/<image>.jpg`` per image and ``render/<video>.mp4`` per video.
Focal length: ``--focal`` px, else the image diagonal (CLIFF). Bad inputs are skipped,
logged in one line each and counted by reason (``inputs.SKIP_REASONS``); the summary line
and ``summary.json`` give every count.
"""
from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..config import ConfigError
from .crop import BOX_SCALE, PersonCropper, Unit
from .inputs import (
    SKIP_REASONS,
    DetectionTable,
    InputError,
    SkipItem,
    for_frame,
    list_sources,
    load_detections,
    read_image,
    read_video,
)

log = logging.getLogger(__name__)
VERTICES_PER_FILE = 1024
PROGRESS_EVERY_S = 10.0


@dataclass
class PredictOptions:
    """Everything `raytrain predict` is told (CLI flags of the same names)."""
    inputs: list[str]
    checkpoint: str
    out: str = "runs/predict"
    detections: str | None = None
    detector: str | None = None
    detector_arch: str = "fasterrcnn_resnet50_fpn_v2"
    score_threshold: float = 0.5
    focal: float | None = None
    box_scale: float = BOX_SCALE
    batch_size: int = 16
    render: bool = False
    save_vertices: bool = False
    max_frames: int = 0
    device: str | None = None
    config: str | None = None
    smpl_dir: str | None = None
    storage_options: dict | None = None
    # Ray Data (``ray.py``)
    ray: bool = False
    ray_format: str = "jsonl"
    actors: int = 2
    actor_cpus: float = 1.0
    crop_cpus: float = 0.5
    quiet: bool = False

    def check(self) -> None:
        """ConfigError naming the flag, before anything is loaded."""
        if not self.inputs:
            raise ConfigError("predict: give at least one image, video, folder, glob or URL prefix")
        if bool(self.detections) == bool(self.detector):
            raise ConfigError("predict: give exactly one of --detections FILE (COCO results) or "
                              "--detector STATE_DICT (a local torchvision detector)")
        if self.batch_size < 1:
            raise ConfigError(f"predict: --batch-size must be at least 1, got {self.batch_size}")
        if self.focal is not None and not (math.isfinite(self.focal) and self.focal > 0):
            raise ConfigError(f"predict: --focal must be a positive number of pixels, got {self.focal}")
        if not (math.isfinite(self.box_scale) and self.box_scale > 0):
            raise ConfigError(f"predict: --box-scale must be positive, got {self.box_scale}")
        if not 0 <= self.score_threshold <= 1:
            raise ConfigError(f"predict: --score-threshold must be in [0, 1], got {self.score_threshold}")
        if self.ray_format not in ("jsonl", "parquet"):
            raise ConfigError(f"predict: --ray-format must be jsonl or parquet, got {self.ray_format!r}")
        if self.ray and (self.render or self.save_vertices):
            raise ConfigError("predict: --render and --save-vertices run without --ray")
        if self.actors < 1 or self.actor_cpus < 0 or self.crop_cpus <= 0:
            raise ConfigError("predict: --actors must be >= 1, --actor-cpus >= 0, --crop-cpus > 0")


def read_inputs(opts: PredictOptions):
    """(sources, detection table or None) of checked options; ConfigError on bad input."""
    opts.check()
    try:
        sources = list_sources(opts.inputs, opts.storage_options)
        table = load_detections(opts.detections, opts.storage_options) if opts.detections else None
    except InputError as error:
        raise ConfigError(f"predict: {error}") from None
    return sources, table


def run_predict(opts: PredictOptions) -> dict:
    """Predict on every input in this process; returns the summary (also written to
    summary.json). ``opts.ray`` runs ``ray.run_predict_ray`` instead (the CLI chooses)."""
    sources, table = read_inputs(opts)
    from .model import load_inference_model
    model = load_inference_model(opts.checkpoint, opts.smpl_dir, opts.config, opts.device)
    detector = None
    if opts.detector:
        from .detect import load_detector
        detector = load_detector(opts.detector, opts.detector_arch, opts.score_threshold, opts.device)
    out = Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = Predictor(model, opts, out)
    counts = missing_image_counts(table, sources)
    started = time.perf_counter()
    try:
        for source in sources:
            units = (_image_units if source.kind == "image" else _video_units)(source, opts, predictor)
            for unit, rgb in units:
                try:
                    detections = detections_for(unit, source.name, detector, table, rgb)
                except SkipItem as skip:
                    predictor.skip(unit.name, skip)
                    continue
                items, skipped = predictor.cropper(unit, detections)
                counts.update(skipped)
                predictor.add(unit, rgb, items)
            counts.update(predictor.take_skips())
        predictor.flush()
    finally:
        predictor.close()
    return finish(opts, out, predictor.stats, counts, time.perf_counter() - started, predictor.path)


def detections_for(unit: Unit, name: str, detector, table: DetectionTable | None, rgb=None) -> list:
    """The persons of one image or frame: the detector's (run on ``rgb`` when already
    decoded), else the detections file's entries for ``name`` at this frame."""
    if detector is not None:
        return detector(rgb if rgb is not None else unit.rgb(), unit.frame)
    return for_frame(table.lookup(name) or [], unit.frame)


def missing_image_counts(table: DetectionTable | None, sources) -> Counter:
    """Bad detection entries and detections of images that are not among the inputs."""
    counts = Counter()
    if table is None:
        return counts
    counts.update(table.bad)
    for name, number in sorted(table.unmatched(sources).items()):
        counts["missing_image"] += number
        log.warning("[predict] skip %d detection(s) of %s: missing_image (not among the inputs)", number, name)
    return counts


def _image_units(source, opts: PredictOptions, predictor):
    try:
        image = read_image(source, storage_options=opts.storage_options)
    except SkipItem as skip:
        predictor.skip(source.name, skip)
        return
    predictor.stats["images"] += 1
    unit = Unit(name=source.name, frame=None, size=image.size, data=image.data)
    rgb = None
    if opts.render:
        try:
            rgb = unit.rgb()
        except SkipItem as skip:
            predictor.skip(source.name, skip)
            return
    yield unit, rgb


def _video_units(source, opts: PredictOptions, predictor):
    info = []
    try:
        for index, rgb in enumerate(read_video(source, opts.max_frames, storage_options=opts.storage_options,
                                               info=info)):
            if index == 0:
                predictor.stats["videos"] += 1
                predictor.open_video(source.name, info[0].fps)
            predictor.stats["frames"] += 1
            yield Unit(name=source.name, frame=index, size=(rgb.shape[1], rgb.shape[0]), pixels=rgb), rgb
    except SkipItem as skip:
        predictor.skip(source.name, skip)
    finally:
        predictor.flush()
        predictor.close_video()


# ----------------------------------------------------------------------------- predictor


class Predictor:
    """Batches person crops through the model and writes what the options ask for."""

    def __init__(self, model, opts: PredictOptions, out: Path):
        self.model, self.opts, self.out = model, opts, out
        self.cropper = PersonCropper(model.cfg.rois, model.crop_size, focal=opts.focal,
                                     box_scale=opts.box_scale, seed=model.cfg.seed)
        self.path = out / "predictions.jsonl"
        self.records = RecordWriter(self.path)
        self.vertices = VertexWriter(out / "vertices", model.faces) if opts.save_vertices else None
        self.pending: list[tuple[Unit, np.ndarray | None, list[dict]]] = []
        self.pending_persons = 0
        self.stats = Counter(images=0, videos=0, frames=0, persons=0)
        self.skips = Counter()
        self.video = None
        self.started = self.last_progress = time.perf_counter()

    def skip(self, where: str, skip: SkipItem) -> None:
        log.warning("[predict] skip %s: %s", where, skip)
        self.skips[skip.reason] += 1

    def take_skips(self) -> Counter:
        taken, self.skips = self.skips, Counter()
        return taken

    def add(self, unit: Unit, rgb: np.ndarray | None, items: list[dict]) -> None:
        """Queue a unit's persons; run the network when a batch is full (or, when
        rendering, once the unit is complete)."""
        self.pending.append((unit, rgb, items))
        self.pending_persons += len(items)
        if self.opts.render or self.pending_persons >= self.opts.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending, self.pending_persons = self.pending, [], 0
        items = [item for _, _, unit_items in pending for item in unit_items]
        outputs = self.infer(items)
        first = 0
        for unit, rgb, unit_items in pending:
            persons = [self._write(item, outputs, first + i) for i, item in enumerate(unit_items)]
            first += len(unit_items)
            if self.opts.render and rgb is not None:
                self._render(unit, rgb, persons)
        self._progress()

    def infer(self, items: list[dict]) -> dict[str, np.ndarray]:
        """Outputs of all items, in batches of at most batch_size persons."""
        want_vertices = self.opts.render or self.opts.save_vertices
        parts = [self.model(items[i:i + self.opts.batch_size], vertices=want_vertices)
                 for i in range(0, len(items), self.opts.batch_size)]
        if not parts:
            return {}
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _write(self, item: dict, outputs: dict, i: int) -> dict:
        record = prediction_record(item, {k: v[i] for k, v in outputs.items() if k != "vertices"})
        line = self.records.write(record)
        self.stats["persons"] += 1
        person = {"bbox": item["bbox"], "person": item["person"], "cam_full": outputs["cam_full"][i],
                  "focal": float(item["focal"])}
        if "vertices" in outputs:
            person["vertices"] = outputs["vertices"][i]
            if self.vertices is not None:
                self.vertices.add(outputs["vertices"][i] + outputs["cam_full"][i], line)
        return person

    def _render(self, unit: Unit, rgb: np.ndarray, persons: list[dict]) -> None:
        from .overlay import render_frame, write_image
        bgr = render_frame(rgb, persons, self.model.faces)
        if unit.frame is None:
            write_image(self.out / "render" / f"{Path(unit.name).with_suffix('')}.jpg", bgr)
        elif self.video is not None:
            self.video.write(bgr)

    def open_video(self, name: str, fps: float) -> None:
        if self.opts.render:
            from .overlay import VideoOut
            self.video = VideoOut(self.out / "render" / f"{Path(name).with_suffix('')}.mp4", fps)

    def close_video(self) -> None:
        if self.video is not None:
            self.video.close()
            self.video = None

    def _progress(self) -> None:
        now = time.perf_counter()
        if self.opts.quiet or now - self.last_progress < PROGRESS_EVERY_S:
            return
        self.last_progress = now
        rate = self.stats["persons"] / max(now - self.started, 1e-9)
        print(f"[predict] {self.stats['persons']} persons, {self.stats['images']} images, "
              f"{self.stats['frames']} video frames, {rate:.1f} persons/s", flush=True)

    def close(self) -> None:
        self.close_video()
        self.records.close()
        if self.vertices is not None:
            self.vertices.close()


# ----------------------------------------------------------------------------- output


def prediction_record(item: dict, output: dict) -> dict:
    """One JSON line: the person's identity and box, and its predicted body and camera."""
    return {
        "image": item["image"], "frame": item["frame"], "person": int(item["person"]),
        "bbox": [float(v) for v in item["bbox"]], "score": float(item["score"]),
        "box": _floats(np.asarray(item["boxes"])[0]), "focal": _floats(item["focal"])[0],
        "pose": _floats(output["pose"]), "betas": _floats(output["betas"]),
        "cam_full": _floats(output["cam_full"]),
        "joints_2d": [_floats(p) for p in np.asarray(output["joints_2d"]).reshape(-1, 2)],
    }


def _floats(values) -> list[float]:
    """float32 values as the shortest decimals that read back to them (285.2, not 285.20001220703125)."""
    return [float(str(v)) for v in np.asarray(values, np.float32).reshape(-1)]


class RecordWriter:
    """predictions.jsonl, one line per person, in the order written."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = open(self.path, "w")
        self.lines = 0

    def write(self, record: dict) -> int:
        """Write a record; returns its line number (0-based)."""
        self.handle.write(json.dumps(record) + "\n")
        self.lines += 1
        return self.lines - 1

    def close(self) -> None:
        self.handle.close()


class VertexWriter:
    """vertices/vertices-NNNNNN.npz files of at most VERTICES_PER_FILE persons each."""

    def __init__(self, folder: Path, faces: np.ndarray):
        self.folder, self.faces = Path(folder), np.asarray(faces, np.int32)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.vertices, self.lines, self.files = [], [], 0

    def add(self, vertices: np.ndarray, line: int) -> None:
        self.vertices.append(np.asarray(vertices, np.float32))
        self.lines.append(line)
        if len(self.vertices) >= VERTICES_PER_FILE:
            self._write()

    def _write(self) -> None:
        if not self.vertices:
            return
        np.savez(self.folder / f"vertices-{self.files:06d}.npz", vertices=np.stack(self.vertices),
                 record=np.asarray(self.lines, np.int64), faces=self.faces)
        self.files += 1
        self.vertices, self.lines = [], []

    def close(self) -> None:
        self._write()


def finish(opts: PredictOptions, out: Path, stats: Counter, counts: Counter, seconds: float,
           predictions: Path) -> dict:
    """summary.json and the summary line: persons, inputs, and every skip count."""
    skipped = {reason: int(counts.get(reason, 0)) for reason in SKIP_REASONS}
    summary = {"persons": int(stats["persons"]), "images": int(stats["images"]),
               "videos": int(stats["videos"]), "frames": int(stats["frames"]), "skipped": skipped,
               "seconds": round(seconds, 3),
               "persons_per_s": round(stats["persons"] / seconds, 2) if seconds > 0 else None,
               "predictions": str(predictions), "out": str(out),
               "options": {k: v for k, v in asdict(opts).items() if k != "storage_options"}}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if not opts.quiet:
        print(summary_line(summary), flush=True)
    return summary


def summary_line(summary: dict) -> str:
    nonzero = [f"{reason} {n}" for reason, n in summary["skipped"].items() if n]
    return (f"[predict] {_count(summary['persons'], 'person')} from {_count(summary['images'], 'image')} and "
            f"{_count(summary['frames'], 'frame')} of {_count(summary['videos'], 'video')} in "
            f"{summary['seconds']:.1f} s -> {summary['predictions']}; "
            f"skipped: {', '.join(nonzero) if nonzero else 'nothing'}")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
