"""Converter machinery shared by every source: records -> schema-v1 samples -> shards.

A converter yields ``Record(key, image_path, labels)`` with labels in the conventions of
docs/CONVENTIONS.md (full-image pixels, camera-frame metres, SMPL axis-angle):

    labels = {
        "box": (cx, cy, b) | None,         # None: from the visible 2D keypoints x box_scale
        "keypoints_2d": (24, 3) | None,    # J24 pixels + confidence
        "joints_3d": (24, 4) | None,       # J24 camera frame metres + confidence
        "pose": (72,) | None, "betas": (10,) | None,
        "has_smpl": bool,                  # default: pose and betas given
        "gender": "m"/"f"/"male"/"female"/"neutral"/None,
        "focal": float | None,             # None: default_focal(image size)
        "cam_full": (3,) | None,           # SMPL translation in the camera frame
        "mask_outside": bool,              # keypoints outside the image get confidence 0
        "meta": {...},                     # extra json fields (principal point, ...)
    }

``convert_record`` (run in worker processes) reads the image, checks the labels, cuts the
stored region (``storage.extract_context``, the context rule of docs/design.md §3.2, or the full frame)
and returns the encoded sample or a skip reason. ``run_conversion`` drives it with a
``tqdm`` bar, ``limit``, ``workers`` and prints the written / skipped / total summary.
Output order is the records' order whatever the number of workers (``Pool.imap``), so
the same input gives byte-identical shards.
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import signal
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import cv2
import numpy as np

from ..io import storage_error_hint
from ..schema import ARRAY_SHAPES, BadSample, box_overlaps_image, decode_sample, encode_sample
from ..shards import clear_shard_folder, write_shards
from ..storage import extract_context

#: Why a record was not written (counted in ``ConversionSummary.skipped``).
SKIP_REASONS = (
    "missing_image",  # the image file does not exist
    "bad_image",  # the image file cannot be decoded
    "bad_label",  # a label array of the wrong shape or an unknown gender
    "nonfinite_label",  # NaN or inf in a label, the box, focal or camera
    "no_box",  # no box given and no visible keypoint to derive one
    "box_outside_image",  # empty box or a box not overlapping the image
    "behind_camera",  # (3DPW) the person is not in front of the camera
    "rejected_by_reader",  # the encoded sample breaks a reader rule (schema.py limits, ranges)
    "conversion_error",  # anything unexpected (the detail names it)
)

GENDER_NAMES = {"m": "male", "male": "male", "f": "female", "female": "female",
                "n": "neutral", "neutral": "neutral", "": "neutral"}


@dataclass
class StorageConfig:
    """How the image of a sample is stored (docs/design.md §3.2: context region or full frame)."""

    storage: str = "context"  # "context" or "full"
    crop_size: int = 224  # S: the smallest RoI still covers S stored pixels
    min_roi_scale: float = 0.65  # smallest RoI of the widest schedule, in units of b
    context: float = 2.0  # stored region side in units of b
    jpeg_quality: int = 90
    box_scale: float = 1.2  # box side = box_scale x the keypoints' extent (no box given)

    def __post_init__(self):
        if self.storage not in ("context", "full"):
            raise ValueError(f"storage must be 'context' or 'full', got {self.storage!r}")


@dataclass
class Record:
    """One person instance to convert. ``skip`` set: counted under that reason, not read."""

    key: str
    image_path: str
    labels: dict = field(default_factory=dict)
    skip: str | None = None
    detail: str = ""


@dataclass
class RecordSet:
    """What one conversion converts: the records (a picklable factory that yields them
    afresh each call, so a Ray task can take its slice), their number and provenance."""

    source: str
    licence: str
    total: int  # records make_records() yields (written + skipped)
    make_records: Callable[[], Iterator[Record]]
    ignored_keys: list[str] = field(default_factory=list)  # input keys nothing reads


@dataclass
class Outcome:
    key: str
    sample: dict | None = None
    reason: str | None = None
    detail: str = ""


@dataclass
class ConversionSummary:
    """Counts of one conversion run; ``examples`` holds the first detail per reason."""

    source: str
    out: str
    written: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)
    manifest: dict | None = None
    ignored_keys: list[str] = field(default_factory=list)  # input keys the converter ignored

    @property
    def total(self) -> int:
        return self.written + sum(self.skipped.values())

    def skip(self, reason: str, detail: str) -> None:
        self.skipped[reason] += 1
        self.examples.setdefault(reason, detail)

    def format(self) -> str:
        lines = [f"{self.source} -> {self.out}: written {self.written}, "
                 f"skipped {sum(self.skipped.values())}, total {self.total}"]
        for reason, count in sorted(self.skipped.items()):
            lines.append(f"  skipped {reason}: {count} (e.g. {self.examples.get(reason, '')})")
        if self.ignored_keys:
            lines.append(f"  ignored input keys (not converted): {', '.join(self.ignored_keys)}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- keys


_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def key_part(text) -> str:
    """A key component: anything but letters, digits, '_' and '-' becomes '_'."""
    part = _UNSAFE.sub("_", str(text)).strip("_")
    return part or "_"


def label_text(value, encoding: str = "utf-8") -> str:
    """A text label of a loaded file: bytes decoded with `encoding` (UTF-8 in npz files; 3DPW's
    Python 2 pickles hold latin-1 bytes), anything else through str()."""
    return value.decode(encoding) if isinstance(value, bytes) else str(value)


def make_key(source: str, sequence, frame, person) -> str:
    """``<source>/<sequence>/<frame>/<person>`` with every part made safe (no dots)."""
    return "/".join(key_part(p) for p in (source, sequence, frame, person))


# ----------------------------------------------------------------------------- one record


class ConversionError(ValueError):
    """An input or output a conversion cannot use; the message is one line naming it."""


class _Skip(Exception):
    def __init__(self, reason: str, detail: str = ""):
        self.reason, self.detail = reason, detail
        super().__init__(f"{reason}: {detail}")


def convert_record_set(record_set: RecordSet, out: str, **options) -> ConversionSummary:
    """``run_conversion`` over a ``RecordSet`` (options: those of ``run_conversion``)."""
    return run_conversion(record_set.make_records(), out, record_set.source, record_set.licence,
                          total=record_set.total, ignored_keys=record_set.ignored_keys, **options)


def convert_record(record: Record, source: str, storage: StorageConfig | None = None) -> Outcome:
    """Read, check and encode one record; never raises (failures become skip reasons)."""
    storage = storage or StorageConfig()
    if record.skip:
        return Outcome(record.key, reason=record.skip, detail=record.detail or record.key)
    try:
        image = _read_image(record.image_path)
        meta, arrays, box = _check_labels(record, image.shape[1], image.shape[0], source, storage)
        sample = _encode(record.key, image, box, meta, arrays, storage)
        try:  # what the reader would refuse is not written
            decode_sample(sample, decode_image=False)
        except BadSample as error:
            raise _Skip("rejected_by_reader", str(error)) from None
        return Outcome(record.key, sample=sample)
    except _Skip as skip:
        return Outcome(record.key, reason=skip.reason, detail=f"{record.key}: {skip.detail}")
    except Exception as error:  # noqa: BLE001 - counted and reported, never a crash
        return Outcome(record.key, reason="conversion_error",
                       detail=f"{record.key}: {type(error).__name__}: {error}")


def _read_image(path: str) -> np.ndarray:
    if not os.path.isfile(path):
        raise _Skip("missing_image", path)
    image = cv2.imread(path, cv2.IMREAD_COLOR)  # BGR, what cv2.imencode expects
    if image is None or image.size == 0:
        raise _Skip("bad_image", path)
    return image


def _array(labels: dict, name: str) -> np.ndarray | None:
    value = labels.get(name)
    if value is None:
        return None
    array = np.asarray(value, dtype=np.float64)
    if array.shape != ARRAY_SHAPES[name]:
        raise _Skip("bad_label", f"{name} has shape {array.shape}, expected {ARRAY_SHAPES[name]}")
    return array


def _check_labels(record: Record, width: int, height: int, source: str, storage: StorageConfig):
    labels = record.labels
    arrays = {name: _array(labels, name) for name in ARRAY_SHAPES}
    box = labels.get("box")
    box = None if box is None else np.asarray(box, dtype=np.float64).reshape(-1)
    if box is not None and box.shape != (3,):
        raise _Skip("bad_label", f"box has shape {box.shape}, expected (3,)")
    cam_full = labels.get("cam_full")
    cam_full = None if cam_full is None else np.asarray(cam_full, dtype=np.float64).reshape(-1)
    if cam_full is not None and cam_full.shape != (3,):
        raise _Skip("bad_label", f"cam_full has shape {cam_full.shape}, expected (3,)")
    focal = labels.get("focal")
    focal = float(np.hypot(width, height)) if focal is None else float(focal)  # default_focal
    checked = {**{k: v for k, v in arrays.items() if v is not None}, "focal": np.float64(focal)}
    if box is not None:
        checked["box"] = box
    if cam_full is not None:
        checked["cam_full"] = cam_full
    bad = [name for name, value in checked.items() if not np.all(np.isfinite(value))]
    if bad:
        raise _Skip("nonfinite_label", f"non-finite {bad}")
    if focal <= 0:
        raise _Skip("bad_label", f"focal {focal} <= 0")
    gender = labels.get("gender")
    gender_name = GENDER_NAMES.get(str(gender).strip().lower() if gender is not None else "")
    if gender_name is None:
        raise _Skip("bad_label", f"unknown gender {gender!r}")

    keypoints = arrays["keypoints_2d"]
    if keypoints is not None and labels.get("mask_outside"):
        keypoints = keypoints.copy()
        x, y = keypoints[:, 0], keypoints[:, 1]
        keypoints[(x < 0) | (x >= width) | (y < 0) | (y >= height), 2] = 0.0
        arrays["keypoints_2d"] = keypoints
    if box is None:
        box = _box_from_keypoints(keypoints, storage.box_scale)
    if not (box[2] > 0 and box_overlaps_image(box, (width, height))):
        raise _Skip("box_outside_image", f"box {[round(float(v), 1) for v in box]} vs image "
                                         f"{width}x{height}")

    has_2d = keypoints is not None and bool(np.any(keypoints[:, 2] > 0))
    joints = arrays["joints_3d"]
    has_3d = joints is not None and bool(np.any(joints[:, 3] > 0))
    has_smpl = (arrays["pose"] is not None and arrays["betas"] is not None
                and bool(labels.get("has_smpl", True)))
    meta = {
        **labels.get("meta", {}),
        "image_size": [int(width), int(height)],
        "focal": focal,
        "box": [float(v) for v in box],
        "source": source,
        "gender": gender_name,
        "has_smpl": has_smpl,
        "has_3d": has_3d,
        "has_2d": has_2d,
        "cam_full": None if cam_full is None else [float(v) for v in cam_full],
    }
    out_arrays = {name: value.astype(np.float32) for name, value in arrays.items()
                  if value is not None}
    return meta, out_arrays, box


def _box_from_keypoints(keypoints: np.ndarray | None, scale: float) -> np.ndarray:
    """Square box around the visible keypoints, side = scale x their larger extent."""
    if keypoints is None or not np.any(keypoints[:, 2] > 0):
        raise _Skip("no_box", "no box and no visible keypoint")
    visible = keypoints[keypoints[:, 2] > 0, :2]
    low, high = visible.min(axis=0), visible.max(axis=0)
    centre = (low + high) / 2
    return np.array([centre[0], centre[1], scale * max(float((high - low).max()), 1.0)])


def _encode(key: str, image: np.ndarray, box: np.ndarray, meta: dict, arrays: dict,
            storage: StorageConfig) -> dict:
    height, width = image.shape[:2]
    if storage.storage == "full":
        stored, affine, size = image, np.array([[1.0, 0, 0], [0, 1.0, 0]]), (width, height)
    else:
        stored, affine, size = extract_context(image, box, storage.crop_size,
                                               storage.min_roi_scale, storage.context)
    ok, jpg = cv2.imencode(".jpg", stored, [cv2.IMWRITE_JPEG_QUALITY, int(storage.jpeg_quality)])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    meta = {**meta, "affine": np.asarray(affine, dtype=np.float64).tolist(),
            "stored_size": [int(size[0]), int(size[1])]}
    return encode_sample(key, jpg.tobytes(), meta, arrays)


# ----------------------------------------------------------------------------- driver


def _init_worker() -> None:
    cv2.setNumThreads(1)


def spawn_pool(workers: int, initializer=None, initargs: tuple = ()) -> multiprocessing.pool.Pool:
    """A pool of ``workers`` spawned processes that leave Ctrl-C to the parent (which says
    in one line what the interrupt left). Spawn, not fork: a forked child inherits the
    parent's OpenCV / OpenMP thread-pool state and can deadlock in its first cv2 call.
    SIGINT is ignored while they start, and a process started with it ignored keeps it
    ignored: none is interrupted in its interpreter's start-up (a traceback on the console)."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return multiprocessing.get_context("spawn").Pool(workers, initializer, initargs)
    finally:
        signal.signal(signal.SIGINT, previous)


def prepare_output(out: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """``out`` empty or missing, or emptied with ``overwrite``; ConversionError otherwise
    (a shard set already there, a missing storage backend or credentials)."""
    try:
        clear_shard_folder(out, overwrite, storage_options)
    except FileExistsError as error:
        raise ConversionError(str(error)) from None
    except Exception as error:  # noqa: BLE001 - a missing backend or credentials: say which
        hint = storage_error_hint(out, error)
        if hint is None:
            raise
        raise ConversionError(f"--out {out}: {hint}") from None


def run_conversion(records: Iterable[Record], out: str, source: str, licence: str, *,
                   limit: int | None = None, workers: int = 1, maxcount: int = 1000,
                   total: int | None = None, storage: StorageConfig | None = None,
                   progress: bool = True, storage_options: dict | None = None,
                   printer: Callable[[str], None] | None = print,
                   ignored_keys: Sequence[str] = (), prefix: str = "shard",
                   write_manifest: bool = True, overwrite: bool = False) -> ConversionSummary:
    """Convert ``records`` into shards under ``out``; returns (and prints) the summary.

    limit: convert at most this many records (written or skipped); workers: processes
    that read, crop and encode images (1: in this process); total: the number of
    records, for the progress bar; ignored_keys: input keys no record carries, named in
    the summary; prefix, write_manifest: as ``write_shards``. A whole conversion
    (``write_manifest``) owns ``out``: it must be empty or missing, or with ``overwrite`` a
    shard set already there is removed first (its manifest before its shards), and a run
    that writes nothing removes what it made and raises ``ConversionError`` with the skip
    summary. A part of a conversion (``--ray`` chunks) shares ``out`` with the others.
    """
    storage = storage or StorageConfig()
    if write_manifest:
        prepare_output(out, overwrite, storage_options)
    if limit is not None:
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        records = itertools.islice(records, limit)
        total = limit if total is None else min(total, limit)
    summary = ConversionSummary(source=source, out=out, ignored_keys=sorted(ignored_keys))
    job = partial(convert_record, source=source, storage=storage)

    def outcomes() -> Iterator[Outcome]:
        if workers <= 1:
            yield from map(job, records)
            return
        with spawn_pool(workers, _init_worker) as pool:
            yield from pool.imap(job, records, chunksize=4)

    def samples() -> Iterator[dict]:
        from tqdm import tqdm

        with tqdm(total=total, desc=f"shard {source}", unit="sample", disable=not progress,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            for outcome in outcomes():
                bar.update(1)
                if outcome.sample is None:
                    summary.skip(outcome.reason, outcome.detail)
                else:
                    summary.written += 1
                    yield outcome.sample

    summary.manifest = write_shards(samples(), out, source=source, licence=licence,
                                    maxcount=maxcount, storage_options=storage_options,
                                    prefix=prefix, write_manifest=write_manifest)
    if printer is not None:
        printer(summary.format())
    if summary.written == 0 and write_manifest:
        clear_shard_folder(out, True, storage_options)
        reasons = "; ".join(f"{reason}: {n} (e.g. {summary.examples.get(reason, '')})"
                            for reason, n in sorted(summary.skipped.items())) or "no records"
        raise ConversionError(f"nothing written to {out}: {reasons}")
    return summary


# ----------------------------------------------------------------------------- CLI helpers


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """The options every ``datasets/shard_<source>.py`` script shares."""
    parser.add_argument("--out", required=True, help="output directory or s3:// / gs:// URL")
    parser.add_argument("--limit", type=int, default=None,
                        help="convert at most N records (written + skipped)")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                        help="image reading / encoding processes (default: all cores)")
    parser.add_argument("--maxcount", type=int, default=1000, help="samples per shard")
    parser.add_argument("--storage", choices=("context", "full"), default="context",
                        help="store the context region around each person (default) "
                             "or the full frame")
    parser.add_argument("--crop-size", type=int, default=224,
                        help="crop size S the context resolution is chosen for")
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a shard set already in --out (default: refuse a non-empty --out)")


def storage_from_args(args: argparse.Namespace) -> StorageConfig:
    return StorageConfig(storage=args.storage, crop_size=args.crop_size,
                         jpeg_quality=args.jpeg_quality)
