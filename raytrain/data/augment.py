"""SPIN-style augmentation, defined on a *virtual full image* so every label stays exact.

The augmentation of one person is a transform of the whole full image, shared by all
of its RoIs:

* **flip**: mirror about the vertical line x = W/2 through the principal point;
* **rotation** by ``angle`` about the image centre (the principal point): a roll of the
  camera about its optical axis, so it is an exact perspective re-imaging;
* **scale jitter** of the detected box (the image is unchanged, the box moves);
* **colour jitter** (per-channel gains) and a **synthetic occluder** (a rectangle in the
  virtual image, hence at the same place of the person in every RoI).

The ranges are the ``data.*`` augmentation fields of ``config.DataConfig`` (those marked
``augment``); the per-RoI colour (``data.roi_color_jitter``) is drawn by the cropper's
plan (``crop.MultiRoICropper.plan``), after the person's parameters.

The virtual image has the same size (W, H) and focal f as the original. Boxes, 2D
keypoints, 3D joints, SMPL pose and the full camera in the batch are expressed in it:
keypoints map through the 2D transform, 3D joints/root orientation/camera translation
through the matching 3D rotation/mirror (flip: x -> -x plus left/right swap; rotation:
R_z(angle) about the optical axis). A crop of the virtual image with a box equals the
crop of the original image with the back-transformed box, rotated/flipped: the cropper
folds all of it into one 2x3 matrix per RoI.

Pixel convention (all affines in this package): continuous coordinates, pixel (i, j)
covers [i, i+1) x [j, j+1), so its centre is (i+0.5, j+0.5) and the image centre is
(W/2, H/2), the principal point of ``raytrain.geometry.perspective_projection``.

Camera translation under rotation: SMPL rotates the body about its root joint J0(beta),
so t' = R (t + J0) - J0. Pass ``root_joint`` (mean (3,), shape directions (3, 10)) from
the body model for the exact label; without it J0 = 0 is assumed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from raytrain.body.joints import J24_FLIP_PERM, flip_smpl_pose
from raytrain.config import DataConfig

_J24_FLIP = np.asarray(J24_FLIP_PERM)

#: Probability of a rotation when ``data.rot_jitter_deg`` > 0.
ROT_PROB = 0.4
#: Range of the occluder's sides as fractions of the (jittered) box side.
OCCLUDER_SIDES = (0.1, 0.4)


@dataclass
class AugmentParams:
    """One draw of the augmentation for one person (shared by its RoIs)."""

    flip: bool = False
    angle: float = 0.0  # radians; positive turns image content clockwise on screen (y down)
    scale: float = 1.0
    color: np.ndarray = field(default_factory=lambda: np.ones(3))  # RGB gains
    occluder: np.ndarray | None = None  # (4,) x0, y0, x1, y1 in virtual-image px
    occluder_color: np.ndarray = field(default_factory=lambda: np.zeros(3))  # RGB 0..255


def sample_params(data: DataConfig, rng: np.random.Generator, box: np.ndarray,
                  image_size) -> AugmentParams:
    """Draw the augmentation of a person whose box (3,) is given in full-image px, with
    the ranges of ``data`` (``flip_prob``, ``scale_jitter``, ``rot_jitter_deg``,
    ``color_jitter``, ``occlusion_prob``; ``roi_color_jitter`` is the cropper's)."""
    sf, rf = data.scale_jitter, data.rot_jitter_deg
    scale = float(np.clip(1 + rng.normal() * sf, 1 - sf, 1 + sf))
    angle = 0.0
    if rf > 0 and rng.random() < ROT_PROB:
        angle = float(np.deg2rad(np.clip(rng.normal() * rf, -2 * rf, 2 * rf)))
    params = AugmentParams(
        flip=bool(rng.random() < data.flip_prob),
        angle=angle,
        scale=scale,
        color=rng.uniform(1 - data.color_jitter, 1 + data.color_jitter, 3),
    )
    if rng.random() < data.occlusion_prob:
        params.occluder, params.occluder_color = _sample_occluder(rng, params, box, image_size)
    return params


def _sample_occluder(rng, params, box, image_size):
    """A rectangle somewhere over the (jittered, transformed) box, in virtual px."""
    vbox = augment_box(params, box, image_size)
    size = rng.uniform(*OCCLUDER_SIDES, 2) * vbox[2]  # (2,) w, h
    centre = vbox[:2] + rng.uniform(-0.4, 0.4, 2) * vbox[2]
    rect = np.concatenate([centre - size / 2, centre + size / 2])
    return rect, rng.uniform(0, 255, 3)


# --------------------------------------------------------------------------- transforms


def virtual_transform(params: AugmentParams, image_size) -> np.ndarray:
    """(3, 3) matrix: full-image px -> virtual-image px (flip, then rotation about centre)."""
    w, h = float(image_size[0]), float(image_size[1])
    flip = np.array([[-1.0, 0, w], [0, 1, 0], [0, 0, 1]]) if params.flip else np.eye(3)
    c, s = np.cos(params.angle), np.sin(params.angle)
    to_centre = np.array([[1.0, 0, -w / 2], [0, 1, -h / 2], [0, 0, 1]])
    rotate = np.array([[c, -s, 0.0], [s, c, 0], [0, 0, 1]])
    back = np.array([[1.0, 0, w / 2], [0, 1, h / 2], [0, 0, 1]])
    return back @ rotate @ to_centre @ flip


def rotation_3d(params: AugmentParams) -> np.ndarray:
    """(3, 3) linear map of camera-frame points matching ``virtual_transform``."""
    c, s = np.cos(params.angle), np.sin(params.angle)
    rotate = np.array([[c, -s, 0.0], [s, c, 0], [0, 0, 1]])
    mirror = np.diag([-1.0, 1.0, 1.0]) if params.flip else np.eye(3)
    return rotate @ mirror


def augment_box(params: AugmentParams, box: np.ndarray, image_size) -> np.ndarray:
    """Detected box (3,) in full px -> jittered box (3,) in virtual px."""
    box = np.asarray(box, dtype=np.float64)
    side = box[2] * params.scale
    moved = virtual_transform(params, image_size) @ np.array([box[0], box[1], 1.0])
    return np.array([moved[0], moved[1], side])


def augment_keypoints(params: AugmentParams, keypoints: np.ndarray, image_size) -> np.ndarray:
    """J24 keypoints (24, 3) full px + conf -> virtual px, left/right swapped on flip."""
    T = virtual_transform(params, image_size)
    out = keypoints.astype(np.float32, copy=True)
    out[:, :2] = keypoints[:, :2] @ T[:2, :2].T + T[:2, 2]
    return out[_J24_FLIP] if params.flip else out


def augment_joints_3d(params: AugmentParams, joints: np.ndarray) -> np.ndarray:
    """J24 camera-frame joints (24, 4) -> virtual camera frame, swapped on flip."""
    out = joints.astype(np.float32, copy=True)
    out[:, :3] = joints[:, :3] @ rotation_3d(params).T
    return out[_J24_FLIP] if params.flip else out


def augment_pose(params: AugmentParams, pose: np.ndarray) -> np.ndarray:
    """SMPL axis-angle (72,): flip swaps sides and mirrors; rotation turns the root."""
    out = flip_smpl_pose(pose.astype(np.float64)) if params.flip else pose.astype(np.float64)
    if params.angle != 0.0:
        c, s = np.cos(params.angle), np.sin(params.angle)
        roll = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        out = out.copy()
        root = cv2.Rodrigues(np.ascontiguousarray(out[:3]))[0]  # ~10x faster than scipy for one vector
        out[:3] = cv2.Rodrigues(roll @ root)[0].ravel()
    return out.astype(np.float32)


def augment_cam_full(params: AugmentParams, cam_full: np.ndarray, betas: np.ndarray,
                     root_joint=None) -> np.ndarray:
    """Full camera translation (3,) -> virtual camera: t' = R (t + J0) - J0 (flip: x -> -x)."""
    t = np.asarray(cam_full, dtype=np.float64)
    if params.flip:
        t = t * np.array([-1.0, 1.0, 1.0])
    if params.angle != 0.0:
        j0 = root_position(betas, root_joint)
        c, s = np.cos(params.angle), np.sin(params.angle)
        roll = np.array([[c, -s, 0.0], [s, c, 0], [0, 0, 1]])
        t = roll @ (t + j0) - j0
    return t.astype(np.float32)


def root_position(betas: np.ndarray, root_joint=None) -> np.ndarray:
    """SMPL root joint J0(beta) (3,) of the rest pose, from (mean (3,), dirs (3, 10))."""
    if root_joint is None:
        return np.zeros(3)
    mean, dirs = root_joint
    return np.asarray(mean, np.float64) + np.asarray(dirs, np.float64) @ np.asarray(betas, np.float64)
