"""What a command admits of the files, pixels, boxes and numbers it reads from outside.

One rule each, used by the shard reader (``shards``, ``schema``) and by prediction
(``raytrain.predict.inputs``):

- **files**: a local input must be a regular file (or a link to one). A pipe, device or
  socket would never end or never answer; a folder listing skips them and counts them,
  a path named directly is refused as "not a regular file" (``file_problem``).
- **pixels**: ``image_size`` reads the size from the header alone and ``decode_rgb``
  decodes to RGB. An image given to a command (predict's inputs, a converter's source
  pictures) is taken as it is displayed: its EXIF orientation is applied and its size is
  reported after the turn. A shard member is a stored image whose labels refer to its
  pixels as stored (the converters write it already turned, without EXIF), so the reader
  decodes it with ``exif=False``: a stray EXIF tag cannot turn the pixels under a label.
- **boxes**: a square box (cx, cy, side) must be finite, at least 1 px, at most
  ``MAX_BOX_FACTOR`` x the longer image side, and overlap the image (``box_problem``).
- **numbers**: a JSON number is an int or a float, never a boolean or a numeric string
  (``json_number``); scores and coordinates must be finite.
"""
from __future__ import annotations

import io
import math
import os
import stat

import cv2
import numpy as np

#: Box side in units of the full image's longer side, and at least one pixel.
MAX_BOX_FACTOR = 4.0
#: EXIF orientation tag.
_ORIENTATION = 0x0112
#: Decode flags by DCT reduction: straight to RGB, the orientation applied by ``turn``.
_RGB_FLAGS = {r: (flag & ~cv2.IMREAD_COLOR) | cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
              for r, flag in {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2,
                              4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}.items()}


# ----------------------------------------------------------------------------- files


def local_path(url: str) -> str | None:
    """The local path of ``url`` (None for object storage)."""
    if url.startswith("file://"):
        return url[len("file://"):]
    return None if "://" in url else url


def file_problem(url: str) -> str | None:
    """Why ``url`` cannot be read as a file: "no such file", "not a regular file (...)",
    or None (a regular local file, or a URL: object storage holds only objects)."""
    path = local_path(url)
    if path is None:
        return None
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if not stat.S_ISREG(mode):
        return "not a regular file (a pipe, device, socket or folder)"
    return None


def read_regular(path: str, max_bytes: int) -> bytes:
    """At most ``max_bytes + 1`` bytes of a local regular file, opened without blocking so
    that a pipe put in its place after the listing is refused instead of waited on
    (``OSError``)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path}: not a regular file (a pipe, device, socket or folder)")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            return handle.read(max_bytes + 1)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- pixels


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1..8) of encoded image bytes; 1 when there is none."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            value = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # Pillow raises many types for garbage; no readable tag means upright
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def image_size(data: bytes, exif: bool = True) -> tuple[int, int] | None:
    """(W, H) from the image header alone (nothing is decoded), after the EXIF turn when
    ``exif``; None if the header is unreadable."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(_ORIENTATION, 1) if exif else 1
    except Exception:  # Pillow raises many types for garbage; all mean unreadable
        return None
    if width <= 0 or height <= 0:
        return None
    return (int(height), int(width)) if orientation in (5, 6, 7, 8) else (int(width), int(height))


def decode_rgb(data: bytes, reduction: int = 1, exif: bool = True) -> np.ndarray | None:
    """Encoded bytes -> (H, W, 3) uint8 RGB at 1/``reduction`` scale (JPEG DCT scaling),
    turned by its EXIF orientation when ``exif``; None if it does not decode."""
    buffer = np.frombuffer(data, np.uint8)
    if not buffer.size:
        return None
    pixels = cv2.imdecode(buffer, _RGB_FLAGS[reduction])
    if pixels is None or pixels.ndim != 3:
        return None
    orientation = exif_orientation(data) if exif else 1
    return pixels if orientation == 1 else np.ascontiguousarray(turn(pixels, orientation))


def turn(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """(H, W, C) stored pixels -> as displayed for an EXIF orientation 1..8."""
    if orientation in (5, 6, 7, 8):
        pixels = pixels.transpose(1, 0, 2)        # 5: transpose
        flip = {6: (False, True), 7: (True, True), 8: (True, False)}.get(orientation, (False, False))
    else:
        flip = {2: (False, True), 3: (True, True), 4: (True, False)}.get(orientation, (False, False))
    rows, cols = flip
    return pixels[::-1 if rows else 1, ::-1 if cols else 1]


# ----------------------------------------------------------------------------- boxes


def box_overlaps_image(box, image_size) -> bool:
    """The square box (cx, cy, side) covers part of the (width, height) image."""
    cx, cy, side = (float(v) for v in box)
    width, height = image_size
    half = side / 2
    return cx + half > 0 and cx - half < width and cy + half > 0 and cy - half < height


def box_side_problem(side: float, image_size) -> str | None:
    """The side must be a number of pixels in [1, MAX_BOX_FACTOR x the longer side]."""
    longer = max(image_size)
    if not (math.isfinite(side) and 1.0 <= side <= MAX_BOX_FACTOR * longer):
        return f"box side {side:g} outside [1, {MAX_BOX_FACTOR:g} x {longer}] px"
    return None


def box_problem(box, image_size) -> tuple[str, str] | None:
    """(reason, detail) when the square box (cx, cy, side) is not admitted for the
    (width, height) image: ``degenerate_box`` (not finite, side < 1 px),
    ``box_too_large`` (side over MAX_BOX_FACTOR x the longer side) or
    ``box_outside_image``; None when it is."""
    values = [float(v) for v in box]
    shown = [round(v, 1) for v in values]
    if not all(math.isfinite(v) for v in values) or values[2] < 1.0:
        return "degenerate_box", f"box {shown}"
    if box_side_problem(values[2], image_size):
        return "box_too_large", f"box {shown}: {box_side_problem(values[2], image_size)}"
    if not box_overlaps_image(values, image_size):
        return "box_outside_image", f"box {shown} vs image {image_size[0]}x{image_size[1]}"
    return None


# ----------------------------------------------------------------------------- numbers


def json_number(value, what: str) -> float:
    """A JSON number as a float (``ValueError`` for a boolean, a string or anything else)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} {value!r} is not a number")
    return float(value)
