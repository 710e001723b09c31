"""Multi-RoI cropper: M RoI crops of one person straight from the stored image.

For each sample, ``MultiRoICropper.plan`` draws the augmentation (``augment.py``: it acts
on a *virtual full image*), jitters the detected box, expands it to the M RoIs of the
schedule in the virtual image, draws the per-RoI colour, decodes the stored image and
transforms the labels: a ``CropPlan``. ``render`` folds  stored px -> full px -> virtual
px -> crop px  into one 2x3 matrix per RoI, applied with one ``cv2.warpAffine``
(bilinear, zero border) from the stored image into an S x S uint8 crop, then the colour
gains and the occluder; no intermediate resize of the whole image. An axis-aligned RoI
inside the image (no rotation; flips allowed) takes the cheaper ``cv2.resize`` of a
source rectangle instead (``_resize_roi``: same crop within interpolation error).
``device_crop`` renders the same plan on the training device.

Speed (see ``raytrain.bench.data``): when every RoI spans at least 2x (4x, 8x) S
stored pixels, the JPEG is decoded at 1/2 (1/4, 1/8) with libjpeg's DCT scaling;
colour jitter is one ``cv2.transform`` over the M small crops (one per crop with
per-RoI colour); all crops of a sample are written into one preallocated (M, S, S, 3)
array.

Pixel convention: continuous coordinates, pixel (i, j) covers [i, i+1) x [j, j+1)
(centre at i + 0.5); the ``affine`` of a shard (full px -> stored px) uses it too.
``cv2_affine`` converts to OpenCV's integer-centre convention.

Output per sample (numpy): ``images`` (M, S, S, 3) uint8 **RGB** (channels last; the
collate step presents them as (N, M, 3, S, S)), ``boxes`` (M, 3) float32 in the virtual
full image, and the labels transformed to it (see ``collate.SAMPLE_KEYS``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from raytrain.config import DataConfig
from raytrain.geometry import FixedSchedule, build_schedule

from .admission import decode_rgb
from .augment import (
    AugmentParams,
    augment_box,
    augment_cam_full,
    augment_joints_3d,
    augment_keypoints,
    augment_pose,
    sample_params,
    virtual_transform,
)
from .schema import BadSample, Sample, affine_scale

# --------------------------------------------------------------------------- matrices


def cv2_affine(matrix: np.ndarray) -> np.ndarray:
    """Affine (2x3 or 3x3) in the pixel-edge convention -> (2, 3) for cv2 (pixel centres)."""
    linear, shift = matrix[:2, :2], matrix[:2, 2]
    return np.concatenate([linear, (shift + linear.sum(axis=1) * 0.5 - 0.5)[:, None]], axis=1)


def crop_transform(box: np.ndarray, crop_size: int) -> np.ndarray:
    """(3, 3) matrix: image px -> crop px of the square box (cx, cy, b) resized to S x S."""
    k = crop_size / box[2]
    return np.array([[k, 0.0, crop_size / 2 - k * box[0]],
                     [0.0, k, crop_size / 2 - k * box[1]],
                     [0.0, 0.0, 1.0]])


def invert_affine(affine: np.ndarray) -> np.ndarray:
    """(2, 3) (or 3x3) affine -> the (3, 3) matrix of its inverse (closed form, no LAPACK)."""
    a, b, c = float(affine[0, 0]), float(affine[0, 1]), float(affine[0, 2])
    d, e, f = float(affine[1, 0]), float(affine[1, 1]), float(affine[1, 2])
    det = a * e - b * d
    ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
    return np.array([[ia, ib, -(ia * c + ib * f)], [id_, ie, -(id_ * c + ie * f)], [0.0, 0.0, 1.0]])


def homogeneous(affine: np.ndarray) -> np.ndarray:
    """(2, 3) -> (3, 3)."""
    return np.vstack([np.asarray(affine, np.float64), [0.0, 0.0, 1.0]])


# --------------------------------------------------------------------------- cropper


@dataclass
class CropPlan:
    """Everything the crops of one sample are made from, drawn by ``MultiRoICropper.plan``
    and rendered by ``MultiRoICropper.render`` (CPU) or ``device_crop`` (training device)."""

    params: AugmentParams  # the person's augmentation (flip, rotation, scale, colour, occluder)
    boxes: np.ndarray  # (M, 3) RoIs (cx, cy, side) in virtual px
    stored_to_virtual: np.ndarray  # (3, 3) stored px -> virtual px
    image: np.ndarray  # (h, w, 3) uint8 RGB: the stored image decoded at 1 / reduction
    reduction: int  # DCT reduction of the decode
    roi_colour: np.ndarray  # (M, 3) per-RoI RGB gains on top of the person's (ones: off)
    occluders: np.ndarray  # (M, 4) int crop-px rectangles x0, y0, x1, y1 (empty: none)
    labels: dict  # the sample's labels in the virtual image (collate.SAMPLE_KEYS but images)

    @property
    def decoded_to_virtual(self) -> np.ndarray:
        """(3, 3) decoded px -> virtual px."""
        return decoded_to_virtual(self.stored_to_virtual, self.reduction)

    @property
    def gains(self) -> np.ndarray:
        """(M, 3) RGB gains of each crop: the person's times the RoI's."""
        return self.params.color[None, :] * self.roi_colour

    @property
    def occluder_colour(self) -> np.ndarray:
        """(3,) RGB of the occluder, as painted (whole grey levels)."""
        return self.params.occluder_color.astype(np.uint8)


def decoded_to_virtual(stored_to_virtual: np.ndarray, reduction: int) -> np.ndarray:
    """(3, 3) stored px -> virtual px and the decode's reduction -> decoded px -> virtual px."""
    matrix = np.array(stored_to_virtual, np.float64)
    matrix[:, :2] *= float(reduction)
    return matrix


class MultiRoICropper:
    """Crops the M RoIs of a person, with consistent augmentation and matching labels.

    schedule: a ``raytrain.geometry`` schedule (``.boxes(boxes (N,3), generator)``), or
    a kind name for ``build_schedule``; augment: the ``config.DataConfig`` whose
    augmentation fields to draw from, or None (no augmentation); decode_coverage: see
    ``_reduction``; root_joint: (mean (3,), dirs (3, 10)) of the SMPL root joint for an
    exact camera label under rotation (``augment.root_joint_model``).

    One sample: ``plan(sample, rng)`` draws and decodes everything (``CropPlan``),
    ``render(plan)`` cuts the crops on the CPU; ``cropper(sample, rng)`` does both.
    """

    def __init__(self, schedule="paper", num_rois: int = 5, crop_size: int = 224,
                 augment: DataConfig | None = None, reduced_decode: bool = True,
                 root_joint=None, border_value: int = 0, decode_coverage: float = 1.0,
                 fast_resize: bool = True):
        self.schedule = build_schedule(schedule, num_rois) if isinstance(schedule, str) else schedule
        self.crop_size = int(crop_size)
        self.augment = augment
        self.reduced_decode = reduced_decode
        self.decode_coverage = float(decode_coverage)
        self.root_joint = root_joint
        self.border_value = border_value
        self.fast_resize = fast_resize
        self._pattern = self._fixed_pattern()

    @property
    def num_rois(self) -> int:
        return int(self.schedule.num_rois)

    def _fixed_pattern(self):
        """(M, 3) RoIs of the unit box (0, 0, 1) when the schedule is deterministic."""
        if not isinstance(self.schedule, FixedSchedule):
            return None
        unit = torch.tensor([[0.0, 0.0, 1.0]], dtype=torch.float64)
        return self.schedule.boxes(unit)[0].numpy()

    def roi_boxes(self, box: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Box (3,) in virtual px -> the schedule's M RoIs (M, 3), float64."""
        if self._pattern is not None:
            p = self._pattern
            return np.stack([box[0] + p[:, 0] * box[2], box[1] + p[:, 1] * box[2],
                             p[:, 2] * box[2]], axis=1)
        generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
        boxes = torch.as_tensor(box[None], dtype=torch.float64)
        return self.schedule.boxes(boxes, generator)[0].numpy()

    def draw(self, sample: Sample, rng: np.random.Generator):
        """Augmentation parameters and the M RoI boxes (virtual px) of one sample."""
        box = np.asarray(sample.box, np.float64)
        if not box[2] > 0:
            raise BadSample("box_outside_image", f"{sample.key}: box side {box[2]}")
        params = (sample_params(self.augment, rng, box, sample.image_size)
                  if self.augment is not None else AugmentParams())
        return params, self.roi_boxes(augment_box(params, box, sample.image_size), rng)

    def plan(self, sample: Sample, rng: np.random.Generator,
             decoded: dict[int, np.ndarray] | None = None) -> CropPlan:
        """Draw one sample's augmentation, RoIs and per-RoI colour (in this order, from
        ``rng``), decode its image and transform its labels.

        ``decoded``: optional cache {reduction: decoded image} shared by the samples of one
        stored image (several persons of a photo): each reduction is decoded once."""
        params, boxes = self.draw(sample, rng)
        roi_colour = self._roi_colour(len(boxes), rng)
        image, reduction = self._decode(sample, boxes, decoded)
        return CropPlan(params=params, boxes=boxes,
                        stored_to_virtual=virtual_transform(params, sample.image_size)
                        @ invert_affine(sample.affine),
                        image=image, reduction=reduction, roi_colour=roi_colour,
                        occluders=occluder_rects(params, boxes, self.crop_size),
                        labels=self._labels(sample, params, boxes))

    def render(self, plan: CropPlan, out: np.ndarray | None = None) -> dict:
        """A plan -> dict of numpy arrays (see module docstring): the warped crops, their
        colour gains, the occluder, and the plan's labels.

        ``out``: optional (M, S, S, 3) uint8 array the crops are written into (e.g. the
        sample's slot of a batch buffer); it becomes the result's ``images``."""
        images = self.warp(plan.image, plan.stored_to_virtual, plan.boxes, plan.reduction, out=out)
        _apply_gains(images, plan.gains)
        if plan.params.occluder is not None:
            colour = plan.occluder_colour
            for m, (x0, y0, x1, y1) in enumerate(plan.occluders):
                images[m, y0:y1, x0:x1] = colour
        return {**plan.labels, "images": images}

    def __call__(self, sample: Sample, rng: np.random.Generator,
                 out: np.ndarray | None = None, decoded: dict[int, np.ndarray] | None = None) -> dict:
        """One sample -> dict of numpy arrays: ``render(plan(sample, rng, decoded), out)``."""
        return self.render(self.plan(sample, rng, decoded), out)

    # -- image

    def _roi_colour(self, num_rois: int, rng: np.random.Generator) -> np.ndarray:
        """(M, 3) per-RoI RGB gains in [1 - c, 1 + c], c = ``data.roi_color_jitter``
        (ones, and no draw, when it is 0 or there is no augmentation)."""
        jitter = self.augment.roi_color_jitter if self.augment is not None else 0.0
        if jitter <= 0:
            return np.ones((num_rois, 3))
        return rng.uniform(1 - jitter, 1 + jitter, (num_rois, 3))

    def _decode(self, sample: Sample, boxes: np.ndarray,
                decoded: dict[int, np.ndarray] | None = None) -> tuple[np.ndarray, int]:
        """Decoded stored image (RGB, straight from libjpeg) and its reduction factor."""
        if sample.image is not None:
            return sample.image, 1
        reduction = self._reduction(sample, boxes)
        if decoded is not None and reduction in decoded:
            return decoded[reduction], reduction
        # the stored pixels as they are (the json's geometry refers to them): admission.py
        image = decode_rgb(sample.jpeg, reduction, exif=False)
        if image is None:
            raise BadSample("bad_jpeg", f"{sample.key}: cv2.imdecode failed")
        if decoded is not None:
            decoded[reduction] = image
        return image, reduction

    def _reduction(self, sample: Sample, boxes: np.ndarray) -> int:
        """Largest DCT reduction r such that every RoI spans >= coverage * r * S stored px.

        coverage 1.0 (default) never upsamples a decoded pixel; below 1 trades the
        resolution of the smallest RoIs for decode speed (0.5: always 1/2 at the
        paper schedule's stored resolution)."""
        if not self.reduced_decode:
            return 1
        stored_scale = affine_scale(sample.affine)
        smallest = float(boxes[:, 2].min()) * stored_scale
        for reduction in (8, 4, 2):
            if smallest >= self.decode_coverage * reduction * self.crop_size:
                return reduction
        return 1

    def warp(self, image: np.ndarray, stored_to_virtual: np.ndarray, boxes: np.ndarray,
             reduction: int = 1, out: np.ndarray | None = None) -> np.ndarray:
        """(h, w, 3) decoded stored image -> (M, S, S, 3) crops, one resampling per RoI.

        ``out``: the (M, S, S, 3) uint8 array to write them into (else a new one).

        Axis-aligned RoIs (no rotation; flips included) that lie inside the decoded
        image are cut as a rectangle and resized (``_resize_roi``); the others (rotated,
        or reaching past the image border, where the zero border matters) use
        ``cv2.warpAffine``. Both are bilinear with the same sampling positions, up to
        the sub-pixel offset ``_resize_roi`` documents.
        """
        size = self.crop_size
        shape = (len(boxes), size, size, 3)
        if out is None:
            out = np.empty(shape, np.uint8)
        elif out.shape != shape or out.dtype != np.uint8:
            raise ValueError(f"out has shape {out.shape} {out.dtype}, crops need {shape} uint8")
        source_to_virtual = decoded_to_virtual(stored_to_virtual, reduction)
        t = source_to_virtual
        axis_aligned = (self.fast_resize and abs(t[0, 1]) <= 1e-12 * abs(t[0, 0])
                        and abs(t[1, 0]) <= 1e-12 * abs(t[1, 1]))
        if axis_aligned:
            kx, tx, ky, ty = float(t[0, 0]), float(t[0, 2]), float(t[1, 1]), float(t[1, 2])
        border = (self.border_value,) * 4
        padded = scratch = None
        for m in range(len(boxes)):
            cx, cy, side = float(boxes[m, 0]), float(boxes[m, 1]), float(boxes[m, 2])
            if axis_aligned:
                half = side / 2
                if _resize_roi(image, out[m], (cx - half - tx) / kx, (cx + half - tx) / kx,
                               (cy - half - ty) / ky, (cy + half - ty) / ky):
                    continue
            matrix = cv2_affine(crop_transform(boxes[m], size) @ source_to_virtual)
            if image.shape[2] != 3:
                cv2.warpAffine(image, matrix, (size, size), dst=out[m], flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=border)
                continue
            # OpenCV's bilinear warp has a SIMD path for 4 channels only (~2x faster than
            # 3 here, same arithmetic per channel): pad once per image, warp, drop alpha
            if padded is None:
                padded = cv2.cvtColor(image, cv2.COLOR_RGB2RGBA)
                scratch = np.empty((size, size, 4), np.uint8)
            cv2.warpAffine(padded, matrix, (size, size), dst=scratch, flags=cv2.INTER_LINEAR,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=border)
            cv2.cvtColor(scratch, cv2.COLOR_RGBA2RGB, dst=out[m])
        return out

    # -- labels

    def _labels(self, sample: Sample, params: AugmentParams, boxes) -> dict:
        has_cam = sample.cam_full is not None
        cam = (augment_cam_full(params, sample.cam_full, sample.betas, self.root_joint)
               if has_cam else np.zeros(3, np.float32))
        return {
            "key": sample.key,
            "boxes": boxes.astype(np.float32),
            "image_size": np.asarray(sample.image_size, np.float32),
            "focal": np.float32(sample.focal),
            "keypoints_2d": augment_keypoints(params, sample.keypoints_2d, sample.image_size),
            "joints_3d": augment_joints_3d(params, sample.joints_3d),
            "pose": augment_pose(params, sample.pose),
            "betas": sample.betas.astype(np.float32),
            "has_smpl": bool(sample.has_smpl),
            "has_3d": bool(sample.has_3d),
            "has_2d": bool(sample.has_2d),
            "has_cam": has_cam,
            "cam_full": cam,
        }


def occluder_rects(params: AugmentParams, boxes: np.ndarray, crop_size: int) -> np.ndarray:
    """(M, 4) integer crop-px rectangles (x0, y0, x1, y1) of the occluder in each RoI."""
    rects = np.zeros((len(boxes), 4), np.int64)
    if params.occluder is None:
        return rects
    for m, box in enumerate(boxes):
        k, origin = crop_size / box[2], box[:2] - box[2] / 2
        lo = np.clip(np.round((params.occluder[:2] - origin) * k), 0, crop_size)
        hi = np.clip(np.round((params.occluder[2:] - origin) * k), 0, crop_size)
        rects[m] = np.concatenate([lo, hi]).astype(np.int64)
    return rects


def _apply_gains(images: np.ndarray, gains: np.ndarray):
    """In place: RGB crops (M, S, S, 3) uint8 times their gains (M, 3), saturating.

    One ``cv2.transform`` (faster here than a per-channel ``cv2.LUT`` or ``cv2.multiply``)
    over all M crops when they share their gains, else one per crop."""
    if np.all(gains == gains[0]):
        if not np.all(gains[0] == 1.0):
            _transform(images, gains[0])
        return
    for m, gain in enumerate(gains):
        _transform(images[m:m + 1], gain)


def _transform(images: np.ndarray, gain: np.ndarray):
    """In place: crops (k, S, S, 3) uint8 times the RGB gain (3,)."""
    matrix = np.zeros((3, 3), np.float32)
    matrix[_CHANNELS, _CHANNELS] = gain
    flat = images.reshape(-1, images.shape[2], 3)
    cv2.transform(flat, matrix, dst=flat)


_CHANNELS = np.arange(3)


def _resize_roi(image: np.ndarray, dst: np.ndarray, x_left: float, x_right: float,
                y_top: float, y_bottom: float) -> bool:
    """Axis-aligned RoI by ``cv2.resize`` of a rectangle of ``image`` into ``dst`` (S, S, 3).

    x_left/x_right (y_top/y_bottom): source-image coordinates (pixel-edge convention) of
    the crop's left/right (top/bottom) edge; right < left means a mirrored RoI (the
    rectangle is resized, then flipped in place). The rectangle starts on the integer
    pixel nearest to the exact edge, and the resize factor is chosen so that the crop's
    centre samples exactly the RoI centre: the sampling grid differs from the exact one
    (``cv2.warpAffine``) by a scale change of at most 1 source pixel over the crop, i.e.
    at most 0.5 source pixel at the crop border and 0 at its centre. Returns False (and
    leaves ``dst``) when the rectangle is not inside the image: the caller warps instead.
    """
    size = dst.shape[0]
    flip_x, flip_y = x_right < x_left, y_bottom < y_top
    if flip_x:
        x_left, x_right = x_right, x_left
    if flip_y:
        y_top, y_bottom = y_bottom, y_top
    x0, y0 = round(x_left), round(y_top)
    # source px per crop px, corrected so that crop px S/2 lands on the exact centre
    step_x = (x_right - x_left + 2.0 * (x_left - x0)) / size
    step_y = (y_bottom - y_top + 2.0 * (y_top - y0)) / size
    if step_x <= 0 or step_y <= 0:
        return False
    w = math.ceil((size - 0.5 + 1e-6) * step_x)
    h = math.ceil((size - 0.5 + 1e-6) * step_y)
    if x0 < 0 or y0 < 0 or x0 + w > image.shape[1] or y0 + h > image.shape[0]:
        return False
    fx, fy = 1.0 / step_x, 1.0 / step_y
    view = image[y0:y0 + h, x0:x0 + w]
    if int(w * fx + 0.5) == size and int(h * fy + 0.5) == size:
        result = cv2.resize(view, (0, 0), dst=dst, fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)
    else:
        result = cv2.resize(view, (0, 0), fx=fx, fy=fy, interpolation=cv2.INTER_LINEAR)
    if result is not dst:
        if result.shape[0] < size or result.shape[1] < size:
            return False
        dst[...] = result[:size, :size]
    if flip_x or flip_y:
        cv2.flip(dst, -1 if flip_x and flip_y else (1 if flip_x else 0), dst=dst)
    return True
