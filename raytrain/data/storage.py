"""How a sample's image is stored in a shard: the context region around the person.

The stored region is the square of side ``context * b`` around the person's box, at the
resolution where the smallest RoI (``min_roi_scale * b``) spans ``crop_size`` pixels, so
that every RoI crop of training is a downscale (docs/design.md §3.2). Used by
the converters and the synthetic writer; the reader only applies the stored affine.
"""

from __future__ import annotations

import cv2
import numpy as np

from .crop import cv2_affine


def context_affine(box, crop_size: int = 224, min_roi_scale: float = 0.65,
                   context: float = 2.0):
    """Affine full px -> stored px of the context region, and the stored size (w, h).

    The region is the square of side ``context * b`` around the box centre, stored at
    the resolution where the smallest RoI (``min_roi_scale * b``) spans ``crop_size``
    pixels, i.e. always ``round(context * crop_size / min_roi_scale)``
    pixels wide, whatever the person's size in the frame.
    """
    cx, cy, b = (float(v) for v in box)
    side = int(round(context * crop_size / min_roi_scale))
    k = side / (context * b)
    affine = np.array([[k, 0.0, -k * (cx - context * b / 2)],
                       [0.0, k, -k * (cy - context * b / 2)]])
    return affine, (side, side)


def extract_context(image: np.ndarray, box, crop_size: int = 224, min_roi_scale: float = 0.65,
                    context: float = 2.0):
    """Cut the context region out of a full frame: (stored image, affine (2, 3), (w, h)).

    Downscaling by more than 1.5x blurs the frame's relevant window first (anti-aliasing);
    outside the frame the region is black.
    """
    affine, size = context_affine(box, crop_size, min_roi_scale, context)
    k = affine[0, 0]
    source, offset = image, np.zeros(2)
    if k < 1 / 1.5:
        source, offset = _blurred_window(image, box, context, sigma=0.45 / k)
    shifted = affine.copy()
    shifted[:, 2] += affine[:, :2] @ offset
    stored = cv2.warpAffine(source, cv2_affine(shifted), size, flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return stored, affine, size


def _blurred_window(image, box, context, sigma):
    """Gaussian-blurred window of the frame around the region; returns (window, origin)."""
    cx, cy, b = (float(v) for v in box)
    half = context * b / 2 + 3 * sigma + 2
    h, w = image.shape[:2]
    x0, y0 = max(int(cx - half), 0), max(int(cy - half), 0)
    x1, y1 = min(int(cx + half) + 1, w), min(int(cy + half) + 1, h)
    window = cv2.GaussianBlur(image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)], (0, 0), sigma)
    return window, np.array([x0, y0], np.float64)
