"""Shard sample schema, version 1: encode for writing, decode and validate for reading.

One sample is one person instance, stored as three tar members sharing a key
(see docs/CONVENTIONS.md): ``<key>.jpg`` (image region), ``<key>.json`` (metadata)
and ``<key>.npz`` (label arrays, loaded with ``allow_pickle=False``: shards are data
from outside and must never execute code).

``decode_sample`` raises ``BadSample(reason)`` for a sample that must be skipped and
``SchemaError`` for a schema version this code does not know (a systemic problem that
must stop the run, not be skipped).
"""

from __future__ import annotations

import io
import json
import math
import zipfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .admission import box_overlaps_image, box_side_problem, decode_rgb
from .errors import DataError, ReasonError
from .formats.npz import parse_npz
from .formats.tar import DUPLICATE_FLAG, OVERSIZED_FLAG

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)

#: Tar member extensions every sample must carry.
REQUIRED_MEMBERS = ("jpg", "json", "npz")

#: Label arrays of the npz member and their shapes.
ARRAY_SHAPES = {
    "keypoints_2d": (24, 3),
    "joints_3d": (24, 4),
    "pose": (72,),
    "betas": (10,),
}

#: Metadata fields a writer must provide (the others have defaults).
REQUIRED_META = ("image_size", "focal", "box", "affine", "stored_size", "source")
META_DEFAULTS = {
    "gender": "neutral",
    "has_smpl": False,
    "has_3d": False,
    "has_2d": False,
    "cam_full": None,
}
GENDERS = ("neutral", "male", "female")

#: Reasons a sample is skipped; the reader counts bad samples by these names.
BAD_REASONS = (
    "corrupt_member",  # tar-level damage: garbage header, truncated member, lost samples
    "missing_key",  # a required member (jpg/json/npz) is absent
    "bad_json",  # json unparsable, not an object, or a field missing / mistyped
    "bad_array",  # npz unloadable, an array missing or of the wrong shape
    "bad_jpeg",  # JPEG undecodable or not of the stored size
    "nonfinite_label",  # NaN or inf in a label or camera value
    "box_outside_image",  # box empty or not overlapping the full image
    "label_out_of_range",  # finite but physically absurd: sizes, focal, box, pose, depth
    "too_large",  # a member or a declared size beyond the limits (decompression bombs)
    "duplicate_key",  # a key that came before in the same tar (a second sample under one key)
    "duplicate_member",  # a member present twice in one sample
)

# ----------------------------------------------------------------------------- limits
# Every sample is bounded before anything is decoded or inflated (docs/design.md §3.7):
# the tar parser skips members over ``MEMBER_LIMITS`` without holding them, the JPEG's
# frame header and each npy header are read first, and label values must lie in
# physical ranges. A limit exceeded is ``too_large``; an absurd label
# ``label_out_of_range``.

#: Largest tar member kept, by extension (bytes); others are skipped and counted.
MEMBER_LIMITS = {"jpg": 32 << 20, "json": 64 << 10, "npz": 64 << 10}
MEMBER_LIMIT_OTHER = 1 << 20
#: Largest stored image: side and pixel count (decoded RGB 3 bytes a pixel: 108 MB).
MAX_STORED_SIDE = 8192
MAX_STORED_PIXELS = 36_000_000
#: Fewest JPEG bytes per declared pixel: a flat picture encodes at about 1/64 of a byte a
#: pixel; a file far under that (80 KB declaring 36 MP) declares pixels it does not hold.
MIN_JPEG_BYTES_PER_PIXEL = 1 / 256
#: Largest full-image side the labels may refer to (pixels).
MAX_IMAGE_SIDE = 32768
#: Largest inflated npy payload of one label array (the largest is 24 x 4 float64).
MAX_NPY_BYTES = 16 << 10
#: Focal length in units of the full image's longer side.
FOCAL_RANGE = (0.05, 50.0)
#: full -> stored image scale (sqrt of the affine's determinant).
AFFINE_SCALE_RANGE = (1e-3, 1e3)
#: 2D keypoints: coordinates within this multiple of the longer side around the image.
MAX_KEYPOINT_FACTOR = 10.0
#: 3D joints and camera translation: metres from the camera.
MAX_DISTANCE_M = 1000.0
#: Axis-angle norm of one joint (radians) and absolute SMPL shape coefficient.
MAX_JOINT_ANGLE = 4 * math.pi
MAX_ABS_BETA = 20.0


def member_limit(name: str) -> int:
    """Largest size (bytes) kept for tar member ``name`` (``key.ext``)."""
    ext = name.rsplit("/", 1)[-1].partition(".")[2]
    return MEMBER_LIMITS.get(ext, MEMBER_LIMIT_OTHER)


class SchemaError(DataError, ValueError):
    """A shard or manifest uses a schema version this code cannot read."""


class BadSample(ReasonError):
    """A sample that must be skipped; ``reason`` is one of ``BAD_REASONS``."""

    REASONS, KIND = BAD_REASONS, "bad-sample reason"


@dataclass
class Sample:
    """One decoded, validated person instance.

    ``image`` is the stored region decoded to (h, w, 3) uint8 **RGB**, or ``None`` when
    the reader was asked not to decode (call ``decode_image()``); ``jpeg`` always holds
    the encoded bytes. Geometry is in full-image pixels (CONVENTIONS.md).
    """

    key: str
    jpeg: bytes
    image_size: tuple[int, int]  # (W, H) of the full image
    focal: float
    box: np.ndarray  # (3,) float32 (cx, cy, b)
    affine: np.ndarray  # (2, 3) float32 full-image px -> stored-image px
    stored_size: tuple[int, int]  # (w, h) of the stored image
    source: str
    gender: str
    has_smpl: bool
    has_3d: bool
    has_2d: bool
    cam_full: np.ndarray | None  # (3,) float32 or None
    keypoints_2d: np.ndarray  # (24, 3) float32
    joints_3d: np.ndarray  # (24, 4) float32
    pose: np.ndarray  # (72,) float32
    betas: np.ndarray  # (10,) float32
    image: np.ndarray | None = None
    meta: dict = field(default_factory=dict, repr=False)

    def decode_image(self) -> np.ndarray:
        """Decode (once) and return the stored image as (h, w, 3) uint8 RGB."""
        if self.image is None:
            self.image = decode_jpeg(self.jpeg, self.stored_size, self.key)
        return self.image


# ----------------------------------------------------------------------------- encode


def encode_sample(key: str, jpg_bytes: bytes, meta: dict, arrays: dict) -> dict:
    """Build the webdataset dict ``{"__key__", "jpg", "json", "npz"}`` of one sample.

    Missing arrays are written as zeros (set the matching ``has_*`` flag false);
    ``schema_version`` is filled in. Raises ``ValueError`` for a key with a dot, a
    missing required metadata field, or an array of the wrong shape, so bad data is
    caught at writing time rather than by every reader.
    """
    if "." in key or not key:
        raise ValueError(f"sample key must be non-empty without dots, got {key!r}")
    if not jpg_bytes[:2] == b"\xff\xd8":
        raise ValueError(f"{key}: jpg_bytes is not a JPEG (no SOI marker)")
    missing = [name for name in REQUIRED_META if name not in meta]
    if missing:
        raise ValueError(f"{key}: metadata lacks {missing}")
    full_meta = {**META_DEFAULTS, **meta, "schema_version": SCHEMA_VERSION}
    return {
        "__key__": key,
        "jpg": bytes(jpg_bytes),
        "json": json.dumps(_jsonable(full_meta), sort_keys=True).encode("utf-8"),
        "npz": _encode_arrays(key, arrays),
    }


def _encode_arrays(key: str, arrays: dict) -> bytes:
    """Serialise the label arrays with ``np.savez`` (no pickles, float32)."""
    out = {}
    for name, shape in ARRAY_SHAPES.items():
        value = np.asarray(arrays.get(name, np.zeros(shape)), dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{key}: array {name} has shape {value.shape}, expected {shape}")
        out[name] = value
    buffer = io.BytesIO()
    np.savez(buffer, **out)
    return buffer.getvalue()


def _jsonable(value: Any) -> Any:
    """Convert numpy scalars/arrays (and tuples) inside metadata to JSON types."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# ----------------------------------------------------------------------------- decode


def decode_sample(raw: dict, decode_image: bool = True) -> Sample:
    """Validate one raw webdataset sample (members as bytes) and return a ``Sample``.

    ``raw`` maps ``"__key__"`` to the key and member extensions (``"jpg"`` ...) to bytes.
    Raises ``BadSample`` (skip it) or ``SchemaError`` (stop). With ``decode_image=False``
    the JPEG is only checked for its markers; the image is decoded on demand.
    """
    key = str(raw.get("__key__", "?"))
    duplicate = raw.get(DUPLICATE_FLAG)
    if duplicate:
        raise BadSample(f"duplicate_{duplicate}", f"{key}: " + (
            "a sample of this key came before in the tar" if duplicate == "key" else "a member is in the tar twice"))
    oversized = raw.get(OVERSIZED_FLAG)
    if oversized:
        raise BadSample("too_large", f"{key}: member(s) {oversized} over the size limit")
    missing = [ext for ext in REQUIRED_MEMBERS if raw.get(ext) is None]
    if missing:
        raise BadSample("missing_key", f"{key}: no {'/'.join(missing)} member")
    meta = _parse_meta(key, raw["json"])
    arrays = _load_arrays(key, raw["npz"])
    sample = _build_sample(key, bytes(raw["jpg"]), meta, arrays)
    _check_finite(sample)
    _check_box(sample)
    _check_ranges(sample)
    if decode_image:
        sample.decode_image()  # the header is checked first (decode_jpeg)
    else:
        check_jpeg_header(sample.jpeg, sample.stored_size, key)
        if not _looks_like_jpeg(sample.jpeg):
            raise BadSample("bad_jpeg", f"{key}: missing JPEG SOI/EOI markers")
    return sample


#: JPEG start-of-frame markers (baseline, extended, progressive, lossless, arithmetic).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the JPEG's frame header without decoding, or None."""
    if data[:2] != b"\xff\xd8":
        return None
    position, size = 2, len(data)
    while position + 4 <= size:
        if data[position] != 0xFF:
            return None
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            position += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[position + 2:position + 4], "big")
        if length < 2:
            return None
        if marker in _SOF_MARKERS:
            if position + 9 > size:
                return None
            height = int.from_bytes(data[position + 5:position + 7], "big")
            width = int.from_bytes(data[position + 7:position + 9], "big")
            return width, height
        position += 2 + length
    return None


def affine_scale(affine: np.ndarray) -> float:
    """The scale of a 2x3 similarity (sqrt |det| of its linear part), in float64."""
    det = float(affine[0, 0]) * float(affine[1, 1]) - float(affine[0, 1]) * float(affine[1, 0])
    return abs(det) ** 0.5


def check_jpeg_header(data: bytes, stored_size: tuple[int, int], key: str = "?") -> None:
    """Refuse a JPEG before decoding it: no frame header (``bad_jpeg``), dimensions over
    the limits (``too_large``) or other than the json's ``stored_size`` (``bad_jpeg``)."""
    frame = jpeg_frame_size(data)
    if frame is None:
        raise BadSample("bad_jpeg", f"{key}: no JPEG frame header")
    width, height = frame
    if width > MAX_STORED_SIDE or height > MAX_STORED_SIDE or width * height > MAX_STORED_PIXELS:
        raise BadSample("too_large", f"{key}: JPEG declares {width}x{height} pixels")
    if len(data) < width * height * MIN_JPEG_BYTES_PER_PIXEL:
        raise BadSample("too_large", f"{key}: a JPEG of {len(data)} bytes declares {width}x{height} pixels "
                                     f"(fewer than 1 byte per {round(1 / MIN_JPEG_BYTES_PER_PIXEL)} pixels)")
    if (width, height) != tuple(stored_size):
        raise BadSample("bad_jpeg", f"{key}: JPEG is {width}x{height}, stored_size is "
                                    f"{tuple(stored_size)}")


def decode_jpeg(data: bytes, stored_size: tuple[int, int] | None = None, key: str = "?") -> np.ndarray:
    """Decode JPEG bytes to (h, w, 3) uint8 RGB; ``BadSample("bad_jpeg")`` if impossible.
    With ``stored_size`` the header is checked first (``check_jpeg_header``)."""
    if stored_size is not None:
        check_jpeg_header(data, stored_size, key)
    image = decode_rgb(data, exif=False)  # the stored pixels as they are (admission.py)
    if image is None:
        raise BadSample("bad_jpeg", "cv2.imdecode failed")
    if stored_size is not None and (image.shape[1], image.shape[0]) != tuple(stored_size):
        raise BadSample(
            "bad_jpeg",
            f"decoded size {image.shape[1]}x{image.shape[0]} != stored_size {tuple(stored_size)}",
        )
    return image


def _looks_like_jpeg(data: bytes) -> bool:
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" in data[-16:]


def _parse_meta(key: str, payload: bytes) -> dict:
    """Parse the json member and check the schema version."""
    try:
        meta = json.loads(bytes(payload).decode("utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: also a number of over 4300 digits
        raise BadSample("bad_json", f"{key}: {str(error)[:200]}") from None
    if not isinstance(meta, dict):
        raise BadSample("bad_json", f"{key}: json is not an object")
    version = meta.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise SchemaError(
            f"sample {key} has schema_version {version!r}; this raytrain reads "
            f"{list(KNOWN_SCHEMA_VERSIONS)} (re-shard the data or upgrade raytrain)"
        )
    missing = [name for name in REQUIRED_META if name not in meta]
    if missing:
        raise BadSample("bad_json", f"{key}: json lacks {missing}")
    return meta


def _load_arrays(key: str, payload: bytes) -> dict[str, np.ndarray]:
    """Load the npz member without pickles and check every array's shape."""
    arrays = parse_npz(payload)
    if arrays is not None:
        arrays = {name: arrays[name] for name in arrays if name in ARRAY_SHAPES}
    else:  # not the plain layout np.savez writes: the bounded zip reader
        arrays = _load_zipped_arrays(key, payload)
    for name, shape in ARRAY_SHAPES.items():
        if name not in arrays:
            raise BadSample("bad_array", f"{key}: npz lacks {name}")
        if arrays[name].shape != shape or arrays[name].dtype.kind not in "fiu":
            raise BadSample(
                "bad_array",
                f"{key}: {name} is {arrays[name].dtype}{arrays[name].shape}, expected float{shape}",
            )
        arrays[name] = arrays[name].astype(np.float32, copy=False)
    return arrays


def _load_zipped_arrays(key: str, payload: bytes) -> dict[str, np.ndarray]:
    """The label arrays of any npz (compressed too), each inflated to at most
    ``MAX_NPY_BYTES`` and its npy header checked before its data is read; never a pickle."""
    arrays = {}
    try:
        with zipfile.ZipFile(io.BytesIO(bytes(payload))) as archive:
            for info in archive.infolist():
                name = info.filename[:-4] if info.filename.endswith(".npy") else None
                if name not in ARRAY_SHAPES:
                    continue  # never inflated
                if info.file_size > MAX_NPY_BYTES:
                    raise BadSample("too_large", f"{key}: {info.filename} declares {info.file_size} bytes")
                with archive.open(info) as member:
                    data = member.read(MAX_NPY_BYTES + 1)
                if len(data) > MAX_NPY_BYTES:
                    raise BadSample("too_large", f"{key}: {info.filename} inflates past {MAX_NPY_BYTES} bytes")
                arrays[name] = _read_npy(key, name, data)
    except BadSample:
        raise
    except Exception as error:  # zipfile/ValueError/OSError: all mean an unreadable npz
        raise BadSample("bad_array", f"{key}: npz unreadable ({type(error).__name__}: {error})") from None
    return arrays


def _read_npy(key: str, name: str, data: bytes) -> np.ndarray:
    """One npy payload whose header declares the expected shape and a plain dtype."""
    handle = io.BytesIO(data)
    version = np.lib.format.read_magic(handle)
    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                   else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read_header(handle, max_header_size=1024)
    if dtype.hasobject or dtype.kind not in "biuf":
        raise BadSample("bad_array", f"{key}: {name} has dtype {dtype}, expected a plain number type")
    if tuple(shape) != ARRAY_SHAPES[name]:
        raise BadSample("bad_array", f"{key}: {name} declares shape {shape}, expected {ARRAY_SHAPES[name]}")
    handle.seek(0)
    return np.lib.format.read_array(handle, allow_pickle=False)


def _build_sample(key: str, jpeg: bytes, meta: dict, arrays: dict) -> Sample:
    """Turn parsed metadata into typed fields; mistyped fields are ``bad_json``."""
    try:
        cam_full = meta.get("cam_full")
        sample = Sample(
            key=key,
            jpeg=jpeg,
            image_size=_int_pair(meta["image_size"]),
            focal=float(meta["focal"]),
            box=_float_array(meta["box"], (3,)),
            affine=_float_array(meta["affine"], (2, 3)),
            stored_size=_int_pair(meta["stored_size"]),
            source=str(meta["source"]),
            gender=str(meta.get("gender", "neutral")),
            has_smpl=_flag(meta, "has_smpl"),
            has_3d=_flag(meta, "has_3d"),
            has_2d=_flag(meta, "has_2d"),
            cam_full=None if cam_full is None else _float_array(cam_full, (3,)),
            meta=meta,
            **arrays,
        )
    except (TypeError, ValueError, KeyError) as error:
        raise BadSample("bad_json", f"{key}: {error}") from None
    if sample.gender not in GENDERS:
        raise BadSample("bad_json", f"{key}: gender {sample.gender!r} not in {GENDERS}")
    return sample


def _flag(meta: dict, name: str) -> bool:
    """A flag must be JSON true/false (or 0/1): the string "false" is not false."""
    value = meta.get(name, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {value!r}")


def _int_pair(value: Any) -> tuple[int, int]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"expected a pair [W, H], got {value!r}")
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in value):
        raise ValueError(f"expected two numbers, got {value!r}")
    first, second = (float(v) for v in value)
    if not (math.isfinite(first) and math.isfinite(second)) or first <= 0 or second <= 0:
        raise ValueError(f"expected a positive size, got {value!r}")
    return int(first), int(second)


def _float_array(value: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(value, dtype=np.float32)
    if array.shape != shape:
        raise ValueError(f"expected shape {shape}, got {array.shape}")
    return array


def _check_finite(sample: Sample) -> None:
    """NaN or inf anywhere in labels, camera or geometry makes the sample bad."""
    values = {
        "focal": np.float32(sample.focal),
        "box": sample.box,
        "affine": sample.affine,
        "keypoints_2d": sample.keypoints_2d,
        "joints_3d": sample.joints_3d,
        "pose": sample.pose,
        "betas": sample.betas,
    }
    if sample.cam_full is not None:
        values["cam_full"] = sample.cam_full
    flat = np.concatenate([np.ravel(value) for value in values.values()])
    if not np.isfinite(flat).all():  # one pass; name the culprits only for a bad sample
        bad = [name for name, value in values.items() if not np.all(np.isfinite(value))]
        raise BadSample("nonfinite_label", f"{sample.key}: non-finite {bad}")
    if sample.focal <= 0:
        raise BadSample("bad_json", f"{sample.key}: focal {sample.focal} <= 0")


def _check_box(sample: Sample) -> None:
    """The square box must have a positive side and overlap the full image."""
    cx, cy, side = (float(v) for v in sample.box)
    width, height = sample.image_size
    if side <= 0 or not box_overlaps_image(sample.box, sample.image_size):
        raise BadSample(
            "box_outside_image",
            f"{sample.key}: box {[cx, cy, side]} vs image {width}x{height}",
        )


def _check_ranges(sample: Sample) -> None:
    """Finite labels must also be physically plausible (``label_out_of_range``), and the
    stored image within the decoding limits (``too_large``)."""
    key, (width, height) = sample.key, sample.image_size
    stored_w, stored_h = sample.stored_size
    if stored_w > MAX_STORED_SIDE or stored_h > MAX_STORED_SIDE or stored_w * stored_h > MAX_STORED_PIXELS:
        raise BadSample("too_large", f"{key}: stored_size {stored_w}x{stored_h} over the limit")
    problems = []
    longer = max(width, height)
    if longer > MAX_IMAGE_SIDE:
        problems.append(f"image_size {width}x{height} (max side {MAX_IMAGE_SIDE})")
    low, high = FOCAL_RANGE
    if not low * longer <= sample.focal <= high * longer:
        problems.append(f"focal {sample.focal:g} outside [{low}, {high}] x {longer} px")
    if side_problem := box_side_problem(float(sample.box[2]), sample.image_size):
        problems.append(side_problem)
    a = sample.affine.astype(np.float64)
    scale = affine_scale(a)
    low, high = AFFINE_SCALE_RANGE
    if not low <= scale <= high or np.abs(a[:, 2]).max() > high * MAX_IMAGE_SIDE:
        problems.append(f"affine scale {scale:g} or shift outside the plausible range")
    reach = MAX_KEYPOINT_FACTOR * longer
    keypoints, joints = sample.keypoints_2d, sample.joints_3d  # only confident points count
    if np.abs(keypoints[keypoints[:, 2] > 0, :2]).max(initial=0.0) > reach:
        problems.append(f"keypoints_2d beyond {reach:g} px")
    if np.abs(joints[joints[:, 3] > 0, :3]).max(initial=0.0) > MAX_DISTANCE_M:
        problems.append(f"joints_3d beyond {MAX_DISTANCE_M:g} m")
    if sample.cam_full is not None and np.abs(sample.cam_full).max() > MAX_DISTANCE_M:
        problems.append(f"cam_full beyond {MAX_DISTANCE_M:g} m")
    if np.linalg.norm(sample.pose.reshape(24, 3).astype(np.float64), axis=1).max() > MAX_JOINT_ANGLE:
        problems.append(f"pose: a joint rotation beyond {MAX_JOINT_ANGLE:.3g} rad")
    if np.abs(sample.betas).max() > MAX_ABS_BETA:
        problems.append(f"betas beyond +-{MAX_ABS_BETA:g}")
    if problems:
        raise BadSample("label_out_of_range", f"{key}: {'; '.join(problems)}")
