"""Person crops for inference: a detector box -> the square box of training -> M RoI crops.

The crops are cut by the training cropper (``raytrain.data.crop.MultiRoICropper``) with
the RoI schedule and crop size of the checkpoint's config and no augmentation, exactly as
the validation loader cuts them: an image file is a full frame (identity affine), its
JPEG decoded at libjpeg's reduced scale where every RoI allows it, once per scale for all
persons of the image. A video frame (or a photo turned by its EXIF orientation) arrives
decoded.

Box convention of the training data (``data/convert``, ``synthetic``): a square around
the person, side = 1.2 x the larger side of the person's tight box. A detector's box
(x, y, w, h) becomes (x + w/2, y + h/2, box_scale * max(w, h)), admitted by the shard
reader's rule (``data.admission.box_problem``). Persons are cropped one at a time
(``PersonCropper.crops`` is a generator): memory does not grow with the boxes of a picture.
"""
from __future__ import annotations

import zlib
from collections.abc import Iterator

import numpy as np

from ..data.admission import box_problem
from ..data.crop import MultiRoICropper
from ..data.pipeline import schedule_from_config
from ..data.schema import BadSample, Sample
from .inputs import Detection, SkipItem, SkipLog, Unit
from .options import BOX_SCALE

_IDENTITY = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], np.float32)
_ZERO = {"keypoints_2d": (24, 3), "joints_3d": (24, 4), "pose": (72,), "betas": (10,)}


def square_box(bbox, scale: float = BOX_SCALE) -> np.ndarray:
    """(x, y, w, h) -> (cx, cy, b) float64; ``SkipItem("degenerate_box")`` if not a box."""
    x, y, w, h = (float(v) for v in bbox)
    if not all(np.isfinite([x, y, w, h])) or w <= 0 or h <= 0:
        raise SkipItem("degenerate_box", f"bbox {[x, y, w, h]}")
    return np.array([x + w / 2, y + h / 2, scale * max(w, h)])


def check_box(box: np.ndarray, image_size) -> None:
    """The square box must pass the shard reader's box rule (``SkipItem`` with its reason)."""
    problem = box_problem(box, image_size)
    if problem:
        raise SkipItem(*problem)


def image_diagonal(image_size) -> float:
    """CLIFF's focal length when none is known (``geometry.default_focal``), in px."""
    return float(np.hypot(float(image_size[0]), float(image_size[1])))


class PersonCropper:
    """Crops the persons of a unit the way the validation loader does.

    rois / crop_size: the checkpoint's ``cfg.rois`` and ``cfg.data.crop_size``; focal:
    px, None for the image diagonal; seed: for a random RoI schedule (drawn per person).
    """

    def __init__(self, rois, crop_size: int, focal: float | None = None,
                 box_scale: float = BOX_SCALE, seed: int = 0):
        self.cropper = MultiRoICropper(schedule_from_config(rois), crop_size=crop_size, augment=None)
        self.focal, self.box_scale, self.seed = focal, float(box_scale), int(seed)

    def crops(self, unit: Unit, detections: list[Detection], skips: SkipLog) -> Iterator[dict]:
        """The persons' crops (dicts, see ``crop_person``), one at a time; the skipped ones
        go to ``skips``."""
        if not detections:
            skips.add("no_detection", _where(unit, None))
            return
        decoded: dict = {}
        for person, detection in enumerate(detections):
            try:
                yield self.crop_person(unit, person, detection, decoded)
            except SkipItem as skip:
                skips.skip(_where(unit, person), skip)

    def crop_person(self, unit: Unit, person: int, detection: Detection, decoded: dict) -> dict:
        """One person -> {image, frame, person, bbox, score, images (M, S, S, 3) uint8 RGB,
        boxes (M, 3), image_size (2,), focal}."""
        box = square_box(detection.bbox, self.box_scale)
        check_box(box, unit.size)
        focal = self.focal if self.focal is not None else image_diagonal(unit.size)
        sample = _sample(unit, box, focal)
        rng = np.random.default_rng([self.seed, zlib.crc32(unit.name.encode()), unit.frame or 0, person])
        try:
            crop = self.cropper(sample, rng, decoded=decoded)
        except BadSample:  # the JPEG did not decode
            raise SkipItem("unreadable_image", "decoding failed") from None
        return {"image": unit.name, "frame": unit.frame, "person": person,
                "bbox": [float(v) for v in detection.bbox], "score": float(detection.score),
                "images": crop["images"], "boxes": crop["boxes"], "image_size": crop["image_size"],
                "focal": crop["focal"]}


def _sample(unit: Unit, box: np.ndarray, focal: float) -> Sample:
    """A full-frame shard sample of the unit (identity affine), without labels."""
    zeros = {name: np.zeros(shape, np.float32) for name, shape in _ZERO.items()}
    return Sample(key=unit.name, jpeg=unit.data or b"", image_size=tuple(unit.size), focal=float(focal),
                  box=box.astype(np.float32), affine=_IDENTITY, stored_size=tuple(unit.size),
                  source="predict", gender="neutral", has_smpl=False, has_3d=False, has_2d=False,
                  cam_full=None, image=unit.pixels, **zeros)


def _where(unit: Unit, person: int | None) -> str:
    where = unit.name if unit.frame is None else f"{unit.name} frame {unit.frame}"
    return where if person is None else f"{where} person {person}"
