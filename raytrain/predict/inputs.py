"""What `raytrain predict` reads: image and video files, and person detections.

    sources = list_sources(["photos/", "clip.mp4", "s3://bucket/frames/*.jpg"])
    image = read_image(source)                  # bytes + (W, H), checked before decoding
    for frame in read_video(source): ...        # decoded RGB frames
    table = load_detections("dets.json")        # COCO results -> {image name: [Detection]}

Inputs are files, folders (searched recursively for known suffixes), glob patterns and
``s3://`` / ``gs://`` prefixes (through fsspec, ``raytrain.data.io``). Every byte is
untrusted: a file is read up to ``max_bytes``, an image's size comes from its header and is
bounded by ``max_pixels`` before anything is decoded, a JPEG must end its last scan with
its EOI marker and a PNG with its IEND chunk, and a detection must be a finite box.
Whatever fails raises ``SkipItem`` with one of ``SKIP_REASONS``; the caller counts it and
goes on.

Detections: the COCO *results* format, a JSON list of ``{"image_id", "bbox": [x, y, w, h],
"score", "category_id"}``; ``image_id`` is the image's file name (its path relative to
the input folder, or its base name) or, with a COCO *dataset* file (``{"images": [{"id",
"file_name"}], "annotations": [...]}``) the numeric id of one of its images. An entry may
carry ``"frame"`` (0-based frame index of a video). Entries of another category than
person (``category_id`` 1) are ignored.
"""
from __future__ import annotations

import io
import json
import logging
import math
import posixpath
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..data.errors import ReasonError
from ..data.io import get_fs, is_remote, open_url
from ..files import read_bounded

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
PERSON_CATEGORY = 1
MAX_BYTES = 64 << 20           # one image file
MAX_VIDEO_BYTES = 4 << 30      # one remote video copied to a local temp file
MAX_PIXELS = 80_000_000        # one image, from its header
MAX_DETECTIONS_BYTES = 512 << 20
_PNG_END = b"IEND\xaeB`\x82"   # the IEND chunk with its CRC

#: Why an image, frame or person was skipped; every run counts them by these names.
SKIP_REASONS = (
    "unreadable_image",    # not an image, header unreadable, or decoding failed
    "truncated_image",     # no JPEG EOI after the last scan / no PNG IEND: the file was cut short
    "image_too_large",     # more than max_bytes or max_pixels
    "unreadable_video",    # the video cannot be opened or yields no frame
    "missing_image",       # a detection names an image that is not among the inputs
    "bad_detection",       # a detection entry that is not a COCO result
    "no_detection",        # an image or frame without any person box
    "degenerate_box",      # NaN/inf, zero or negative width/height
    "box_outside_image",   # the box does not overlap the image
)


class SkipItem(ReasonError):
    """An input (image, frame, detection) to skip and count; ``reason`` in SKIP_REASONS."""

    REASONS, KIND = SKIP_REASONS, "skip reason"


class InputError(ValueError):
    """The command's inputs are unusable as a whole (nothing matched, bad detections file)."""


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One input file: ``url`` to read, ``name`` it is reported (and matched) by."""
    url: str
    name: str
    kind: str  # "image" or "video"


def kind_of(url: str) -> str:
    return "video" if url.lower().endswith(VIDEO_SUFFIXES) else "image"


def list_sources(inputs: list[str], storage_options: dict | None = None) -> list[Source]:
    """The files named by ``inputs`` (files, folders, globs, URL prefixes), in order.

    A folder or prefix contributes its image and video files (recursively, sorted), each
    named by its path relative to the folder; a file or a glob match is named by its base
    name. Raises ``InputError`` for an input that names nothing."""
    sources, seen = [], set()
    for text in inputs:
        found = _expand(text, storage_options)
        if not found:
            raise InputError(f"input {text!r}: no such file, or no image/video in it")
        for url, name in found:
            if url not in seen:
                seen.add(url)
                sources.append(Source(url=url, name=name, kind=kind_of(url)))
    return sources


def _expand(text: str, storage_options: dict | None) -> list[tuple[str, str]]:
    fs, path = get_fs(text, storage_options)
    protocol = text.split("://", 1)[0] + "://" if is_remote(text) else ""
    known = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    if any(ch in path for ch in "*?["):
        return [(protocol + p, posixpath.basename(p)) for p in sorted(fs.glob(path))
                if p.lower().endswith(known) and fs.isfile(p)]
    if fs.isdir(path):
        root = path.rstrip("/")
        return [(protocol + p, posixpath.relpath(p, root)) for p in sorted(fs.find(root))
                if p.lower().endswith(known)]
    if fs.isfile(path):
        return [(text, posixpath.basename(path))]
    return []


# ----------------------------------------------------------------------------- images


@dataclass
class ImageData:
    """An image file, checked but not decoded: encoded bytes and its (W, H)."""
    name: str
    data: bytes
    size: tuple[int, int]


def read_image(source: Source, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               storage_options: dict | None = None) -> ImageData:
    """Read and check one image file (``SkipItem`` if it must be skipped)."""
    try:
        with open_url(source.url, "rb", storage_options) as handle:
            data = handle.read(max_bytes + 1)
    except OSError as error:
        raise SkipItem("unreadable_image", str(error)) from None
    if len(data) > max_bytes:
        raise SkipItem("image_too_large", f"more than {max_bytes} bytes")
    return check_image(source.name, data, max_pixels)


def check_image(name: str, data: bytes, max_pixels: int = MAX_PIXELS) -> ImageData:
    """Encoded bytes -> ImageData after the header and end-marker checks."""
    if data[:2] == b"\xff\xd8" and data.rfind(b"\xff\xd9") < max(data.rfind(b"\xff\xda"), 2):
        # the end marker must follow the last scan (an EXIF thumbnail ends before it;
        # bytes a camera appends after the end marker are allowed)
        raise SkipItem("truncated_image", "JPEG without its end marker")
    if data[:8] == b"\x89PNG\r\n\x1a\n" and _PNG_END not in data[-4096:]:
        raise SkipItem("truncated_image", "PNG without its IEND chunk")
    size = image_header_size(data)
    if size is None:
        raise SkipItem("unreadable_image", "not a readable image")
    if size[0] * size[1] > max_pixels:
        raise SkipItem("image_too_large", f"{size[0]}x{size[1]} pixels (limit {max_pixels})")
    return ImageData(name=name, data=data, size=size)


def image_header_size(data: bytes) -> tuple[int, int] | None:
    """(W, H) from the image header alone (Pillow's lazy open), None if unreadable."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except Exception:  # Pillow raises many types for garbage; all mean unreadable
        return None
    return (int(width), int(height)) if width > 0 and height > 0 else None


def decode_rgb(image: ImageData) -> np.ndarray:
    """The whole image decoded to (H, W, 3) uint8 RGB (``SkipItem`` if impossible)."""
    pixels = cv2.imdecode(np.frombuffer(image.data, np.uint8), cv2.IMREAD_COLOR_RGB)
    if pixels is None or (pixels.shape[1], pixels.shape[0]) != image.size:
        raise SkipItem("unreadable_image", "decoding failed")
    return pixels


# ----------------------------------------------------------------------------- videos


@dataclass
class VideoInfo:
    fps: float
    size: tuple[int, int]     # (W, H)
    frames: int               # as the container says (may be 0 or wrong)


def read_video(source: Source, max_frames: int = 0, max_pixels: int = MAX_PIXELS,
               storage_options: dict | None = None, info: list | None = None) -> Iterator[np.ndarray]:
    """Decoded RGB frames (H, W, 3) of a video, at most ``max_frames`` (0: all).

    Raises ``SkipItem("unreadable_video")`` before the first frame when the video cannot
    be opened. ``info``: a list the ``VideoInfo`` is appended to once the video is open."""
    with _local_copy(source, storage_options) as path:
        capture = cv2.VideoCapture(path)
        try:
            if not capture.isOpened():
                raise SkipItem("unreadable_video", "cannot be opened")
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if width <= 0 or height <= 0 or width * height > max_pixels:
                raise SkipItem("unreadable_video", f"frame size {width}x{height}")
            ok, frame = capture.read()
            if not ok:
                raise SkipItem("unreadable_video", "no frame could be decoded")
            fps = capture.get(cv2.CAP_PROP_FPS)
            if info is not None:
                info.append(VideoInfo(fps=fps if math.isfinite(fps) and fps > 0 else 25.0,
                                      size=(width, height),
                                      frames=int(capture.get(cv2.CAP_PROP_FRAME_COUNT))))
            count = 0
            while ok and (not max_frames or count < max_frames):
                yield cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                count += 1
                ok, frame = capture.read()
        finally:
            capture.release()


class _local_copy:
    """A local path of the video: the file itself, or a bounded temp copy of a URL."""

    def __init__(self, source: Source, storage_options: dict | None):
        self.source, self.storage_options, self.tmp = source, storage_options, None

    def __enter__(self) -> str:
        if not is_remote(self.source.url):
            return self.source.url
        suffix = posixpath.splitext(self.source.url)[1]
        self.tmp = tempfile.NamedTemporaryFile(suffix=suffix)
        copied = 0
        try:
            with open_url(self.source.url, "rb", self.storage_options) as handle:
                while block := handle.read(1 << 22):
                    copied += len(block)
                    if copied > MAX_VIDEO_BYTES:
                        raise SkipItem("unreadable_video", f"larger than {MAX_VIDEO_BYTES} bytes")
                    self.tmp.write(block)
        except OSError as error:
            raise SkipItem("unreadable_video", str(error)) from None
        self.tmp.flush()
        return self.tmp.name

    def __exit__(self, *exc):
        if self.tmp is not None:
            self.tmp.close()


# ----------------------------------------------------------------------------- detections


@dataclass
class Detection:
    """One person box of an image (or of one frame of a video)."""
    bbox: tuple[float, float, float, float]   # x, y, w, h in full-image pixels
    score: float = 1.0
    frame: int | None = None


@dataclass
class DetectionTable:
    """Detections by image name, and the entries that could not be read."""
    by_name: dict[str, list[Detection]] = field(default_factory=dict)
    bad: Counter = field(default_factory=Counter)

    def lookup(self, name: str) -> list[Detection] | None:
        """Detections of the source named ``name``, else of its base name."""
        found = self.by_name.get(name)
        if found is None:
            found = self.by_name.get(posixpath.basename(name))
        return found

    def unmatched(self, sources: list[Source]) -> dict[str, int]:
        """Detected image names that no source answers to, with their detection counts."""
        names = {s.name for s in sources} | {posixpath.basename(s.name) for s in sources}
        return {name: len(dets) for name, dets in self.by_name.items() if name not in names}


def load_detections(url: str, storage_options: dict | None = None) -> DetectionTable:
    """Read a COCO results (or COCO dataset) JSON file; see the module docstring."""
    try:
        text = read_bounded(url, MAX_DETECTIONS_BYTES, f"detections {url}", InputError, storage_options)
    except OSError as error:
        raise InputError(f"detections {url}: {error}") from None
    try:
        payload = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"detections {url}: not JSON ({error})") from None
    id_to_name: dict = {}
    if isinstance(payload, dict) and isinstance(payload.get("annotations"), list):
        for image in payload.get("images") or []:
            if isinstance(image, dict) and "id" in image and isinstance(image.get("file_name"), str):
                id_to_name[image["id"]] = image["file_name"]
        payload = payload["annotations"]
    if not isinstance(payload, list):
        raise InputError(f"detections {url}: expected a list of COCO results or a COCO dataset "
                         "with 'annotations'")
    table = DetectionTable()
    for entry in payload:
        try:
            name, detection = _detection(entry, id_to_name)
        except (TypeError, ValueError, KeyError) as error:
            table.bad["bad_detection"] += 1
            log.warning("[predict] skip a detection entry: bad_detection (%s)", error)
            continue
        if name is not None:
            table.by_name.setdefault(name, []).append(detection)
    return table


def _detection(entry, id_to_name: dict) -> tuple[str | None, Detection]:
    if not isinstance(entry, dict):
        raise TypeError(f"entry is a {type(entry).__name__}, not an object")
    category = entry.get("category_id", PERSON_CATEGORY)
    image_id = entry["image_id"]
    name = id_to_name.get(image_id, image_id) if not isinstance(image_id, list) else None
    if not isinstance(name, str):
        raise ValueError(f"image_id {image_id!r} names no image file")
    bbox = entry["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4:
        raise ValueError(f"{name}: bbox {bbox!r} is not [x, y, w, h]")
    values = tuple(float(v) for v in bbox)   # NaN stays: counted later as degenerate_box
    score = float(entry.get("score", 1.0))
    frame = entry.get("frame")
    if frame is not None and (not isinstance(frame, int) or frame < 0):
        raise ValueError(f"{name}: frame {frame!r} is not a non-negative integer")
    if category != PERSON_CATEGORY:
        return None, Detection(values, score, frame)
    return name, Detection(values, score, frame)


def for_frame(detections: list[Detection], frame: int | None) -> list[Detection]:
    """The detections of one frame of a video (``frame`` None: an image, i.e. frame 0;
    an entry without ``frame`` belongs to frame 0)."""
    wanted = frame or 0
    return [d for d in detections if (d.frame or 0) == wanted]
