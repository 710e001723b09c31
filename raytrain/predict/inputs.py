"""What `raytrain predict` reads: image and video files, and person detections.

    sources, refused = list_sources(["photos/", "clip.mp4", "s3://bucket/frames/*.jpg"])
    for unit in units(source, opts, skips, tally): ...   # images and (every K-th) video frames
    table = load_detections("dets.json")                  # COCO results, by file_name or image_id

Inputs are files, folders (searched recursively for known suffixes), glob patterns and
``s3://`` / ``gs://`` prefixes (through fsspec, ``raytrain.data.io``). What is admitted is
the rule of ``raytrain.data.admission``, the shard reader's: regular files only (a folder
listing skips and counts a pipe, device or socket; one named directly is refused), an
image's size from its header after its EXIF turn and bounded before anything is decoded,
its pixels decoded as displayed (EXIF orientation applied), a JPEG ending its last scan
with its EOI marker and a PNG with its IEND chunk.

Names: a folder's or prefix's file is named by its path relative to that input, a file or
glob match by its base name; a name that is absolute or holds ``..`` or empty parts is
refused (``bad_name``), and two inputs that would share a name are told apart by their
folder's name (``a/x.jpg``, ``b/x.jpg``).

Detections: the COCO *results* format, a JSON list of ``{"file_name" | "image_id",
"bbox": [x, y, w, h], "score", "category_id"}``. ``file_name`` is the path relative to
the input (as above); ``image_id`` is the file's name or stem (a number matches a numeric
stem), or with a COCO *dataset* file (``{"images": [{"id", "file_name"}], "annotations":
[...]}``) the id of one of its images. An entry may carry ``"frame"`` (0-based frame index
of a video). Numbers must be JSON numbers (no booleans, no strings) and the score finite;
entries of another category than person (``category_id`` 1) are ignored.

Whatever is refused raises ``SkipItem`` with one of ``SKIP_REASONS`` or is added to a
``SkipLog``: counted by reason, and logged once per reason with a few examples.
"""
from __future__ import annotations

import json
import logging
import math
import os
import posixpath
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import cv2
import numpy as np

from ..data.admission import (
    decode_rgb,
    exif_orientation,
    file_problem,
    image_size,
    json_number,
    local_path,
    read_regular,
)
from ..data.errors import ReasonError
from ..data.io import get_fs, is_remote, open_url
from ..files import read_bounded
from ..outputs import clean_relative

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")
PERSON_CATEGORY = 1
MAX_BYTES = 64 << 20           # one image file
MAX_VIDEO_BYTES = 4 << 30      # one remote video copied to a local temp file
MAX_PIXELS = 80_000_000        # one image, from its header
MAX_DETECTIONS_BYTES = 512 << 20
_PNG_END = b"IEND\xaeB`\x82"   # the IEND chunk with its CRC
EXAMPLES = 3                   # examples named per skip reason

#: Why a file, image, frame, detection or person was skipped; every run counts them by these names.
SKIP_REASONS = (
    "not_regular_file",    # a pipe, device or socket in a folder listing
    "bad_name",            # a file name that is absolute or holds '..' or empty parts
    "unreadable_image",    # not an image, header unreadable, or decoding failed
    "truncated_image",     # no JPEG EOI after the last scan / no PNG IEND: the file was cut short
    "image_too_large",     # more than max_bytes or max_pixels
    "unreadable_video",    # the video cannot be opened or yields no frame
    "missing_image",       # a detection names an image that is not among the inputs
    "missing_frame",       # a detection names a frame its video (or image) does not have
    "unread_detection",    # a detection of an image or video that was skipped
    "bad_detection",       # an entry that is not a COCO result (no box of 4 JSON numbers, ...)
    "bad_score",           # a score that is not a finite number
    "low_score",           # a box of the detections file below --score-threshold
    "no_detection",        # an image or frame without any person box
    "degenerate_box",      # NaN/inf, zero or negative width/height, side under 1 px
    "box_too_large",       # side over 4 x the longer image side
    "box_outside_image",   # the box does not overlap the image
    "nonfinite_output",    # the network's output for a person is not finite (nothing written)
)


class SkipItem(ReasonError):
    """An input (image, frame, detection) to skip and count; ``reason`` in SKIP_REASONS."""

    REASONS, KIND = SKIP_REASONS, "skip reason"


class InputError(ValueError):
    """The command's inputs are unusable as a whole (nothing matched, bad detections file)."""


class SkipLog:
    """Skips by reason, with the first few examples of each; ``report`` logs one line per
    reason (a million absent images are one line, not a million)."""

    def __init__(self):
        self.counts: Counter = Counter()
        self.examples: dict[str, list[str]] = {}

    def add(self, reason: str, where: str, detail: str = "", count: int = 1) -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        self.counts[reason] += count
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(f"{where} ({detail})" if detail else where)

    def skip(self, where: str, skip: SkipItem) -> None:
        self.add(skip.reason, where, skip.detail)

    def merge(self, counts: dict, examples: dict) -> None:
        self.counts.update(counts)
        for reason, shown in examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(shown[:EXAMPLES - len(mine)])

    def state(self) -> tuple[dict, dict]:
        return dict(self.counts), {k: list(v) for k, v in self.examples.items()}

    def report(self) -> None:
        for reason in SKIP_REASONS:
            if self.counts[reason]:
                log.warning("[predict] skip %d x %s, e.g. %s", self.counts[reason], reason,
                            "; ".join(self.examples.get(reason, [])))


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """One input file: ``url`` to read, ``name`` it is reported by (unique in the run),
    ``relative`` its path relative to its input (what ``file_name`` detections name)."""
    url: str
    name: str
    kind: str  # "image" or "video"
    relative: str = ""


def kind_of(url: str) -> str:
    return "video" if url.lower().endswith(VIDEO_SUFFIXES) else "image"


def list_sources(inputs: list[str], storage_options: dict | None = None) -> tuple[list[Source], SkipLog]:
    """The files named by ``inputs`` (files, folders, globs, URL prefixes), in order, and
    what the listings refused (``not_regular_file``, ``bad_name``). Raises ``InputError``
    for an input that names nothing or a file named directly that is not a regular file."""
    listed, seen, refused = [], set(), SkipLog()
    for index, text in enumerate(inputs):
        problem = file_problem(text)
        if problem and problem != "no such file" and not _is_folder(text):
            raise InputError(f"input {text!r}: {problem}")
        found = _expand(text, storage_options, refused)
        if not found:
            raise InputError(f"input {text!r}: no such file, or no image/video in it")
        for url, relative, qualifier in found:
            if url not in seen:
                seen.add(url)
                listed.append((index, url, relative, qualifier))
    shared = Counter(relative for _, _, relative, _ in listed)
    sources, taken = [], set()
    for index, url, relative, qualifier in listed:
        name = relative
        if shared[relative] > 1:   # two inputs, one name: each told apart by its folder
            name = clean_relative(f"{qualifier}/{relative}") or relative
            if name in taken:
                name = f"input{index}/{relative}"
        taken.add(name)
        sources.append(Source(url=url, name=name, kind=kind_of(url), relative=relative))
    return sources, refused


def _is_folder(text: str) -> bool:
    path = local_path(text)
    return path is not None and os.path.isdir(path)


def _expand(text: str, storage_options: dict | None, refused: SkipLog) -> list[tuple[str, str, str]]:
    """(url, name relative to the input, the folder that qualifies a shared name)."""
    fs, path = get_fs(text, storage_options)
    protocol = text.split("://", 1)[0] + "://" if is_remote(text) else ""
    known = IMAGE_SUFFIXES + VIDEO_SUFFIXES
    if any(ch in path for ch in "*?["):
        found = [(protocol + p, posixpath.basename(p), posixpath.basename(posixpath.dirname(p)))
                 for p in sorted(fs.glob(path)) if p.lower().endswith(known) and fs.isfile(p)]
    elif fs.isdir(path):
        root = path.rstrip("/")
        qualifier = posixpath.basename(root) or "input"
        found = [(protocol + p, p[len(root) + 1:] if p.startswith(root + "/") else "", qualifier)
                 for p in sorted(fs.find(root)) if p.lower().endswith(known)]
    elif fs.isfile(path):
        found = [(text, posixpath.basename(path), posixpath.basename(posixpath.dirname(path)))]
    else:
        return []
    return [(url, clean, qualifier) for url, name, qualifier in found
            if (clean := _admitted(url, name, refused)) is not None]


def _admitted(url: str, name: str, refused: SkipLog) -> str | None:
    """The clean name of a listed file, or None (counted) for a bad name or a non-regular file."""
    clean = clean_relative(name)
    if clean is None:
        refused.add("bad_name", repr(name), "absolute, '..' or an empty part")
        return None
    problem = file_problem(url)
    if problem:
        refused.add("not_regular_file", clean, problem)
        return None
    return clean


# ----------------------------------------------------------------------------- images


@dataclass
class ImageData:
    """An image file, checked but not decoded: encoded bytes and its (W, H) as displayed."""
    name: str
    data: bytes
    size: tuple[int, int]


def read_image(source: Source, max_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS,
               storage_options: dict | None = None) -> ImageData:
    """Read and check one image file (``SkipItem`` if it must be skipped)."""
    try:
        path = local_path(source.url)
        if path is not None:
            data = read_regular(path, max_bytes)
        else:
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
    size = image_size(data)
    if size is None:
        raise SkipItem("unreadable_image", "not a readable image")
    if size[0] * size[1] > max_pixels:
        raise SkipItem("image_too_large", f"{size[0]}x{size[1]} pixels (limit {max_pixels})")
    return ImageData(name=name, data=data, size=size)


def decode_image(image: ImageData) -> np.ndarray:
    """The whole image as displayed, (H, W, 3) uint8 RGB (``SkipItem`` if impossible)."""
    pixels = decode_rgb(image.data)
    if pixels is None or (pixels.shape[1], pixels.shape[0]) != image.size:
        raise SkipItem("unreadable_image", "decoding failed")
    return pixels


# ----------------------------------------------------------------------------- units


@dataclass
class Unit:
    """One picture to predict on. ``data``: an image file's encoded bytes, cropped at
    reduced scale; ``pixels``: decoded RGB to crop instead (a video frame, a turned
    photo); ``view``: the decoded picture for a detector or a render (else None)."""
    name: str
    frame: int | None
    size: tuple[int, int]                 # (W, H) as displayed
    data: bytes | None = None
    pixels: np.ndarray | None = None      # (H, W, 3) uint8 RGB
    view: np.ndarray | None = None        # (H, W, 3) uint8 RGB
    fps: float | None = None              # a video's frame rate


@dataclass
class SourceEnd:
    """What reading a source found: frames it has (None: not read to its end)."""
    read: bool = False
    frames: int | None = None


def units(source: Source, opts, skips: SkipLog, tally: Counter, view: bool = False,
          end: SourceEnd | None = None) -> Iterator[Unit]:
    """The pictures of a source: one image, or every ``opts.every``-th frame of a video (at
    most ``opts.max_frames``, 0: all). ``view``: decode each picture for a detector or a
    render. Skips go to ``skips``, images / videos / frames to ``tally``; ``end`` says
    what was read. The single-process and the Ray paths both read through here."""
    end = end if end is not None else SourceEnd()
    view = view or bool(getattr(opts, "render", False))
    try:
        if source.kind == "image":
            yield _image_unit(source, opts, view)
            tally["images"] += 1
            end.read, end.frames = True, 1
            return
        info: list[VideoInfo] = []
        for index, rgb in read_video(source, opts.max_frames, opts.every, opts.storage_options, info):
            tally["videos"] += not end.read
            end.read = True
            tally["frames"] += 1
            yield Unit(name=source.name, frame=index, size=(rgb.shape[1], rgb.shape[0]), pixels=rgb, view=rgb,
                       fps=info[0].fps / opts.every)
        end.frames = info[0].read if info and info[0].ended else None
    except SkipItem as skip:
        skips.skip(source.name, skip)


def _image_unit(source: Source, opts, view: bool) -> Unit:
    image = read_image(source, storage_options=opts.storage_options)
    if exif_orientation(image.data) != 1:   # crop the turned pixels, as displayed
        pixels = decode_image(image)
        return Unit(name=source.name, frame=None, size=image.size, pixels=pixels, view=pixels)
    return Unit(name=source.name, frame=None, size=image.size, data=image.data,
                view=decode_image(image) if view else None)


# ----------------------------------------------------------------------------- videos


@dataclass
class VideoInfo:
    fps: float
    size: tuple[int, int]     # (W, H)
    frames: int               # as the container says (may be 0 or wrong)
    read: int = 0             # frames read so far
    ended: bool = False       # read to its end


def read_video(source: Source, max_frames: int = 0, every: int = 1, storage_options: dict | None = None,
               info: list | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, decoded RGB frame (H, W, 3)) of every ``every``-th frame, at most
    ``max_frames`` of them (0: all); the others are skipped without decoding.

    Raises ``SkipItem("unreadable_video")`` before the first frame when the video cannot
    be opened. ``info``: a list the ``VideoInfo`` is appended to once the video is open."""
    state = None
    with _local_copy(source, storage_options) as path:
        capture = cv2.VideoCapture(path)
        try:
            if not capture.isOpened():
                raise SkipItem("unreadable_video", "cannot be opened")
            width = int(capture.get(cv2.CAP_PROP_FRAME_WIDTH))
            height = int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))
            if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
                raise SkipItem("unreadable_video", f"frame size {width}x{height}")
            ok, frame = capture.read()
            if not ok:
                raise SkipItem("unreadable_video", "no frame could be decoded")
            fps = capture.get(cv2.CAP_PROP_FPS)
            state = VideoInfo(fps=fps if math.isfinite(fps) and fps > 0 else 25.0, size=(width, height),
                              frames=int(capture.get(cv2.CAP_PROP_FRAME_COUNT)))
            if info is not None:
                info.append(state)
            index, given = 0, 0
            while True:
                state.read = index + 1
                yield index, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                given += 1
                if max_frames and given >= max_frames:
                    return
                for _ in range(every - 1):     # frames between: grabbed, not decoded
                    if not capture.grab():
                        state.ended = True
                        return
                    index += 1
                    state.read = index + 1
                ok, frame = capture.read()
                if not ok:
                    state.ended = True
                    return
                index += 1
        finally:
            capture.release()


class _local_copy:
    """A local path of the video: the file itself (a regular file), or a bounded temp copy
    of a URL."""

    def __init__(self, source: Source, storage_options: dict | None):
        self.source, self.storage_options, self.tmp = source, storage_options, None

    def __enter__(self) -> str:
        if not is_remote(self.source.url):
            problem = file_problem(self.source.url)
            if problem:
                raise SkipItem("unreadable_video", problem)
            return local_path(self.source.url)
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
    order: int = 0                            # its place in the detections file


@dataclass
class DetectionTable:
    """Detections by ``file_name`` and by ``image_id``, and the entries refused on reading."""
    by_file: dict[str, list[Detection]] = field(default_factory=dict)
    by_id: dict[str | int, list[Detection]] = field(default_factory=dict)
    refused: SkipLog = field(default_factory=SkipLog)

    def for_source(self, source: Source) -> list[Detection]:
        """The detections of a source, in file order: ``file_name`` = its path relative to
        its input (or its run name), ``image_id`` = its name, base name or stem."""
        found: dict[int, Detection] = {}
        for key in _file_keys(source):
            found.update((id(d), d) for d in self.by_file.get(key, ()))
        for key in _id_keys(source):
            found.update((id(d), d) for d in self.by_id.get(key, ()))
        return sorted(found.values(), key=lambda d: d.order)

    def unmatched(self, sources: list[Source]) -> dict[str, int]:
        """Named images that no source answers to, with their detection counts."""
        files = {k for s in sources for k in _file_keys(s)}
        ids = {k for s in sources for k in _id_keys(s)}
        missing = {str(k): len(v) for k, v in self.by_file.items() if k not in files}
        missing.update({str(k): len(v) for k, v in self.by_id.items() if k not in ids})
        return missing


def _file_keys(source: Source) -> set[str]:
    return {source.relative or source.name, source.name}


def _id_keys(source: Source) -> set[str | int]:
    base = posixpath.basename(source.name)
    stem = posixpath.splitext(base)[0]
    keys: set[str | int] = {source.name, source.relative or source.name, base, stem}
    if stem.isdigit():
        keys.add(int(stem))
    return keys


def load_detections(url: str, storage_options: dict | None = None) -> DetectionTable:
    """Read a COCO results (or COCO dataset) JSON file; see the module docstring."""
    problem = file_problem(url)
    if problem:
        raise InputError(f"detections {url}: {problem}")
    try:
        text = read_bounded(url, MAX_DETECTIONS_BYTES, f"detections {url}", InputError, storage_options)
    except OSError as error:
        raise InputError(f"detections {url}: {error}") from None
    try:
        payload = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise InputError(f"detections {url}: not JSON ({error})") from None
    id_to_name: dict = {}
    if isinstance(payload, dict) and isinstance(payload.get("annotations"), list):
        for image in payload.get("images") or []:
            if isinstance(image, dict) and _is_id(image.get("id")) and isinstance(image.get("file_name"), str):
                id_to_name[image["id"]] = image["file_name"]
        payload = payload["annotations"]
    if not isinstance(payload, list):
        raise InputError(f"detections {url}: expected a list of COCO results or a COCO dataset "
                         "with 'annotations'")
    table = DetectionTable()
    for order, entry in enumerate(payload):
        try:
            _add(table, entry, order, id_to_name)
        except SkipItem as skip:
            table.refused.add(skip.reason, f"entry {order}", skip.detail)
    return table


def _is_id(value) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _add(table: DetectionTable, entry, order: int, id_to_name: dict) -> None:
    """One entry into the table (``SkipItem`` when refused)."""
    if not isinstance(entry, dict):
        raise SkipItem("bad_detection", f"a {type(entry).__name__}, not an object")
    if entry.get("category_id", PERSON_CATEGORY) != PERSON_CATEGORY or isinstance(entry.get("category_id"), bool):
        return
    bbox = entry.get("bbox")
    try:
        if not isinstance(bbox, list) or len(bbox) != 4:
            raise ValueError(f"bbox {bbox!r} is not [x, y, w, h]")
        values = tuple(json_number(v, "bbox value") for v in bbox)   # NaN stays: a degenerate_box later
        frame = entry.get("frame")
        if frame is not None and (not isinstance(frame, int) or isinstance(frame, bool) or frame < 0):
            raise ValueError(f"frame {frame!r} is not a non-negative integer")
        score = json_number(entry.get("score", 1.0), "score")
    except ValueError as error:
        raise SkipItem("bad_detection", str(error)[:200]) from None
    if not math.isfinite(score):
        raise SkipItem("bad_score", f"score {score}")
    detection = Detection(values, score, frame, order)
    if "file_name" in entry:
        name = entry["file_name"]
        clean = clean_relative(name) if isinstance(name, str) else None
        if clean is None:
            raise SkipItem("bad_detection", f"file_name {name!r} is not a relative path")
        table.by_file.setdefault(clean, []).append(detection)
        return
    image_id = entry.get("image_id")
    if not _is_id(image_id):
        raise SkipItem("bad_detection", f"image_id {image_id!r} is neither a file name nor a number")
    if image_id in id_to_name:
        clean = clean_relative(id_to_name[image_id])
        if clean is None:
            raise SkipItem("bad_detection", f"file_name {id_to_name[image_id]!r} is not a relative path")
        table.by_file.setdefault(clean, []).append(detection)
    elif id_to_name:
        raise SkipItem("bad_detection", f"image_id {image_id!r} is not among the dataset's images")
    else:
        table.by_id.setdefault(image_id, []).append(detection)


def for_frame(detections: list[Detection], frame: int | None) -> list[Detection]:
    """The detections of one frame of a video (``frame`` None: an image, i.e. frame 0;
    an entry without ``frame`` belongs to frame 0)."""
    wanted = frame or 0
    return [d for d in detections if (d.frame or 0) == wanted]


def count_unused(detections: list[Detection], end: SourceEnd, where: str, skips: SkipLog) -> None:
    """Detections of a source that no picture used: all of them when it was not read
    (``unread_detection``), those of frames beyond its end (``missing_frame``)."""
    if not detections:
        return
    if not end.read:
        skips.add("unread_detection", where, f"{len(detections)} detection(s)", len(detections))
        return
    if end.frames is None:
        return
    beyond = [d for d in detections if (d.frame or 0) >= end.frames]
    if beyond:
        skips.add("missing_frame", where, f"frame {beyond[0].frame} of {end.frames}", len(beyond))
