"""`raytrain predict`: a trained checkpoint on images and videos, in one process.

    raytrain predict --checkpoint CKPT --detections dets.json photos/ clip.mp4 --out runs/predict
    raytrain predict --experiment runs/tune/x --best --detector frcnn.pt --render --every 5 clip.mp4

For every person box (from a COCO-results file or a local torchvision detector) the RoI
crops are cut by the training cropper with the checkpoint's schedule (``crop.py``), batched
through the network (``model.py``, the validation forward pass) and written one JSON line
per person to ``predictions.jsonl``:

    {"image", "frame" (video frame index or null), "person" (index of the box in its
     image/frame), "bbox" [x, y, w, h] (the detection), "score", "box" [cx, cy, b] (RoI 0),
     "focal" (px), "pose" (72 SMPL axis-angle), "betas" (10), "cam_full" [tx, ty, tz]
     (m, camera of RoI 0), "joints_2d" (24 x [x, y] full-image px)}

Every line is strict JSON (no NaN or Infinity: a person whose output is not finite is
counted, not written). ``--save-vertices``: ``vertices/vertices-NNNNNN.npz`` (``vertices``
(n, 6890, 3) float32 in the camera frame, ``record`` (n,) line numbers in
predictions.jsonl, ``faces``). ``--render``: ``render/<name>.jpg`` per image and
``render/<name>.mp4`` per video (``<name>``: the source's name without its suffix).
Focal length: ``--focal`` px, else the image diagonal (CLIFF). ``--out`` follows the
output rule (``raytrain.outputs``): checked, locked and emptied (``--overwrite``) before the
model loads, every file renamed into place. Persons are cropped and inferred in batches of
``--batch-size``: memory does not grow with the boxes of a picture. Bad inputs are skipped
and counted by reason (``inputs.SKIP_REASONS``), logged once per reason with a few
examples; the summary line and ``summary.json`` give every count.
"""
from __future__ import annotations

import json
import logging
import posixpath
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..config import ConfigError
from ..outputs import Output, claim_output
from .crop import PersonCropper
from .inputs import (
    SKIP_REASONS,
    Detection,
    DetectionTable,
    InputError,
    SkipLog,
    Source,
    SourceEnd,
    Unit,
    count_unused,
    for_frame,
    list_sources,
    load_detections,
    units,
)
from .options import PredictOptions
from .overlay import VideoOut, canvas_of, draw_persons, write_image

log = logging.getLogger(__name__)
VERTICES_PER_FILE = 1024
PROGRESS_EVERY_S = 10.0
#: What a run writes into --out (--overwrite clears a folder holding only these).
WRITTEN = ("predictions.jsonl", "predictions.parquet", "summary.json", "render", "vertices")


@dataclass
class Prepared:
    """A run's checked inputs and claimed output folder, before any model loads."""
    sources: list[Source]
    table: DetectionTable | None
    skips: SkipLog
    out: Output
    checkpoint: Any  # --checkpoint's path or URL, or the Target --experiment chose

    @property
    def checkpoint_origin(self) -> str:
        """The checkpoint's path or URL (what a Ray actor opens on its node)."""
        return getattr(self.checkpoint, "origin", self.checkpoint)


def prepare(opts: PredictOptions) -> Prepared:
    """Check the options, list the inputs, read the detections, choose the checkpoint and
    claim ``--out``: every ``ConfigError`` comes before a model is loaded."""
    opts.check()
    try:
        sources, skips = list_sources(opts.inputs, opts.storage_options)
        table = load_detections(opts.detections, opts.storage_options) if opts.detections else None
    except InputError as error:
        raise ConfigError(f"predict: {error}") from None
    if table is not None:
        skips.merge(*table.refused.state())
        for name, number in sorted(table.unmatched(sources).items()):
            skips.add("missing_image", name, "not among the inputs", number)
    checkpoint = chosen_checkpoint(opts)
    return Prepared(sources, table, skips, claim_output(opts.out, opts.overwrite, ours=WRITTEN), checkpoint)


def chosen_checkpoint(opts: PredictOptions):
    """--checkpoint (its path or URL), or the checkpoint of --experiment that `raytrain eval`
    would choose (a ``checkpoints.Target``, verified once: loading it hashes nothing again)."""
    if opts.checkpoint:
        return opts.checkpoint
    from ..checkpoints import select_checkpoints
    return select_checkpoints(opts.experiment, best=opts.best, top=1, config=opts.config)[0]


def run_predict(opts: PredictOptions) -> dict:
    """Predict on every input in this process; returns the summary (also written to
    summary.json). ``opts.ray`` runs ``ray.run_predict_ray`` instead (the CLI chooses)."""
    run = prepare(opts)
    try:
        from .model import load_inference_model
        model = load_inference_model(run.checkpoint, opts.smpl_dir, opts.config, opts.device)
        detector = None
        if opts.detector:
            from .detect import load_detector
            detector = load_detector(opts.detector, opts.detector_arch, opts.score_threshold, opts.device)
        started = time.perf_counter()
        predictor = Predictor(model, opts, run.out, run.skips)
        try:
            for source in run.sources:
                predictor.predict_source(source, detector, run.table)
            predictor.flush()
        except BaseException:
            predictor.close(ok=False)
            raise
        predictor.close()
        return finish(opts, run.out, predictor.stats, run.skips, time.perf_counter() - started,
                      predictor.records.path)
    finally:
        run.out.release()


def detections_for(unit: Unit, detector, detections: list[Detection], score_threshold: float,
                   skips: SkipLog) -> list[Detection]:
    """The persons of one image or frame: the detector's (on the decoded picture), else the
    detections file's entries of this frame at or above the score threshold."""
    if detector is not None:
        return detector(unit.view, unit.frame)
    kept = []
    for detection in for_frame(detections, unit.frame):
        if detection.score >= score_threshold:
            kept.append(detection)
        else:
            skips.add("low_score", unit.name, f"score {detection.score:g}")
    return kept


def render_name(source: Source, taken: set[str]) -> str:
    """render/<name without its suffix>.jpg|.mp4, or with it (x.png.jpg) when another
    source of the run took that name."""
    suffix = ".mp4" if source.kind == "video" else ".jpg"
    name = f"render/{posixpath.splitext(source.name)[0]}{suffix}"
    if name in taken:
        name = f"render/{source.name}{suffix}"
    taken.add(name)
    return name


class RenderWriter:
    """The render of one source: render/<name>.jpg of an image, the frames of
    render/<name>.mp4 of a video; each renamed into place when complete."""

    def __init__(self, out: Output, source: Source, taken: set[str]):
        self.out, self.target = out, render_name(source, taken)
        self.video: VideoOut | None = None
        self.staged = None

    def show(self, unit: Unit, canvas: np.ndarray) -> None:
        """canvas: (H, W, 3) uint8 BGR of the unit with its persons drawn."""
        if unit.frame is None:
            with self.out.atomic(self.target) as tmp:
                write_image(tmp, canvas)
            return
        if self.video is None:
            self.staged = self.out.staged(self.target)
            self.video = VideoOut(self.staged.tmp, unit.fps or 25.0)
        self.video.write(canvas)

    def close(self, ok: bool = True) -> None:
        if self.video is not None:
            self.video.close()
            self.video = None
            self.staged.commit() if ok else self.staged.discard()


# ----------------------------------------------------------------------------- predictor


@dataclass
class Drawing:
    """A picture being rendered: its canvas, drawn on batch by batch."""
    unit: Unit
    canvas: np.ndarray
    persons: list[dict] = field(default_factory=list)


class Predictor:
    """Crops persons, runs them through the model in batches of ``batch_size`` and writes
    what the options ask for."""

    def __init__(self, model, opts: PredictOptions, out: Output, skips: SkipLog):
        self.model, self.opts, self.out, self.skips = model, opts, out, skips
        self.cropper = PersonCropper(model.cfg.rois, model.crop_size, focal=opts.focal,
                                     box_scale=opts.box_scale, seed=model.cfg.seed)
        self.records = RecordWriter(out)
        self.vertices = VertexWriter(out, model.faces) if opts.save_vertices else None
        self.pending: list[tuple[dict, Drawing | None]] = []
        self.stats = Counter(images=0, videos=0, frames=0, persons=0)
        self.rendered: set[str] = set()
        self.started = self.last_progress = time.perf_counter()

    def predict_source(self, source: Source, detector, table: DetectionTable | None) -> None:
        detections = table.for_source(source) if table is not None else []
        end, ok = SourceEnd(), False
        render = RenderWriter(self.out, source, self.rendered) if self.opts.render else None
        try:
            for unit in units(source, self.opts, self.skips, self.stats, view=detector is not None, end=end):
                kept = detections_for(unit, detector, detections, self.opts.score_threshold, self.skips)
                drawing = Drawing(unit, canvas_of(unit.view)) if render is not None else None
                for item in self.cropper.crops(unit, kept, self.skips):
                    self.pending.append((item, drawing))
                    if len(self.pending) >= self.opts.batch_size:
                        self.flush()
                if drawing is not None:
                    self.flush()
                    render.show(unit, drawing.canvas)
            ok = True
        finally:
            if render is not None:
                render.close(ok)
        if table is not None:
            count_unused(detections, end, source.name, self.skips)

    def flush(self) -> None:
        """Run the pending persons (at most batch_size) through the network and write them."""
        if not self.pending:
            return
        pending, self.pending = self.pending, []
        want_vertices = self.opts.render or self.opts.save_vertices
        outputs = self.model([item for item, _ in pending], vertices=want_vertices)
        drawings = {}
        for i, (item, drawing) in enumerate(pending):
            output = {k: v[i] for k, v in outputs.items()}
            person = self.write(item, output)
            if person is not None and drawing is not None:
                drawing.persons.append(person)
                drawings[id(drawing)] = drawing
        for drawing in drawings.values():
            drawing.canvas = draw_persons(drawing.canvas, drawing.persons, self.model.faces)
            drawing.persons = []
        self._progress()

    def write(self, item: dict, output: dict) -> dict | None:
        """One person's record (and vertices); None when its output is not finite (counted)."""
        if not finite_output(output, item, self.skips):
            return None
        line = self.records.write(prediction_record(item, output))
        self.stats["persons"] += 1
        if self.vertices is not None:
            self.vertices.add(output["vertices"] + output["cam_full"], line)
        return {"bbox": item["bbox"], "person": item["person"], "cam_full": output["cam_full"],
                "focal": float(item["focal"]), "vertices": output.get("vertices")}

    def _progress(self) -> None:
        now = time.perf_counter()
        if self.opts.quiet or now - self.last_progress < PROGRESS_EVERY_S:
            return
        self.last_progress = now
        rate = self.stats["persons"] / max(now - self.started, 1e-9)
        print(f"[predict] {self.stats['persons']} persons, {self.stats['images']} images, "
              f"{self.stats['frames']} video frames, {rate:.1f} persons/s", flush=True)

    def close(self, ok: bool = True) -> None:
        self.records.close(ok)
        if self.vertices is not None:
            self.vertices.close(ok)


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


def finite_output(output: dict, item: dict, skips: SkipLog) -> bool:
    """Whether every output array of a person is finite (else counted: nothing is written)."""
    if all(np.isfinite(np.asarray(v, np.float64)).all() for v in output.values()):
        return True
    where = item["image"] if item["frame"] is None else f"{item['image']} frame {item['frame']}"
    skips.add("nonfinite_output", f"{where} person {item['person']}")
    return False


def _floats(values) -> list[float]:
    """float32 values as the shortest decimals that read back to them (285.2, not 285.20001220703125)."""
    return [float(str(v)) for v in np.asarray(values, np.float32).reshape(-1)]


class RecordWriter:
    """predictions.jsonl, one strict JSON line per person, in the order written; renamed
    into place when closed."""

    def __init__(self, out: Output, name: str = "predictions.jsonl"):
        self.staged = out.staged(name)
        self.path = self.staged.target
        self.handle = open(self.staged.tmp, "x")
        self.lines = 0

    def write(self, record: dict) -> int:
        """Write a record; returns its line number (0-based)."""
        self.handle.write(json.dumps(record, allow_nan=False) + "\n")
        self.lines += 1
        return self.lines - 1

    def close(self, ok: bool = True) -> None:
        if self.handle.closed:
            return
        self.handle.close()
        if ok:
            self.staged.commit()
        else:
            self.staged.discard()


class VertexWriter:
    """vertices/vertices-NNNNNN.npz files of at most ``per_file`` persons each."""

    def __init__(self, out: Output, faces: np.ndarray, folder: str = "vertices",
                 per_file: int = VERTICES_PER_FILE):
        self.out, self.folder, self.per_file = out, folder, per_file
        self.faces = np.asarray(faces, np.int32)
        self.vertices, self.lines, self.files = [], [], 0
        self.where: dict[int, tuple[int, int]] = {}     # record line -> (file, row)

    def add(self, vertices: np.ndarray, line: int) -> None:
        self.where[line] = (self.files, len(self.vertices))
        self.vertices.append(np.asarray(vertices, np.float32))
        self.lines.append(line)
        if len(self.vertices) >= self.per_file:
            self._write()

    def name(self, index: int) -> str:
        return f"{self.folder}/vertices-{index:06d}.npz"

    def _write(self) -> None:
        if not self.vertices:
            return
        with self.out.atomic(self.name(self.files)) as tmp:
            np.savez(tmp, vertices=np.stack(self.vertices), record=np.asarray(self.lines, np.int64),
                     faces=self.faces)
        self.files += 1
        self.vertices, self.lines = [], []

    def close(self, ok: bool = True) -> None:
        if ok:
            self._write()


def finish(opts: PredictOptions, out: Output, stats: Counter, skips: SkipLog, seconds: float,
           predictions) -> dict:
    """summary.json and the summary line: persons, inputs, and every skip count."""
    skips.report()
    skipped = {reason: int(skips.counts.get(reason, 0)) for reason in SKIP_REASONS}
    summary = {"persons": int(stats["persons"]), "images": int(stats["images"]),
               "videos": int(stats["videos"]), "frames": int(stats["frames"]), "skipped": skipped,
               "seconds": round(seconds, 3),
               "persons_per_s": round(stats["persons"] / seconds, 2) if seconds > 0 else None,
               "predictions": str(predictions), "out": str(out.root),
               "options": {k: v for k, v in asdict(opts).items() if k != "storage_options"}}
    out.write_text("summary.json", json.dumps(summary, indent=2))
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
