"""Crop all RoIs of a batch on the training device (``affine_grid`` + ``grid_sample``).

With ``data.device_crop`` the DataLoader workers of the training split only decode:
``DeviceCropPrep`` takes the cropper's plan (``crop.MultiRoICropper.plan``, the one the
CPU cropper renders: augmentation, RoIs, per-RoI colour, the stored region decoded at
its DCT reduction, labels) and turns it into, per RoI, the 3x3 matrix decoded px -> crop
px the CPU cropper warps with (RoI box, flip, rotation, scale folded in), the colour
gains (the person's times the RoI's) and the occluder rectangle. ``collate_regions``
pads the regions to a common size and turns the matrices into ``grid_sample``'s
normalised form. After the batch is moved to the device, ``crop_batch`` makes the
(N, M, 3, S, S) uint8 crops there; they equal the CPU cropper's within interpolation
error (bilinear, zero border) and the labels are identical.

    prep = DeviceCropPrep(cropper)                              # in the workers
    batch = batch_to_torch(collate_regions([prep(s, rng) for s in samples]))
    batch = crop_batch({k: v.to(device) ...}, crop_size=224)     # on the device
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .collate import batch_buffer, collate_arrays
from .crop import MultiRoICropper, crop_transform
from .schema import Sample

#: Batch keys that only the device step reads (dropped once the crops are made).
DEVICE_KEYS = ("regions", "roi_theta", "colour", "occluders", "occluder_colour")


def roi_matrices(decoded_to_virtual: np.ndarray, boxes: np.ndarray, crop_size: int) -> np.ndarray:
    """(3, 3) decoded px -> virtual px, boxes (M, 3) virtual px -> (M, 3, 3) decoded px -> crop px."""
    return np.stack([crop_transform(box, crop_size) @ decoded_to_virtual for box in boxes])


def grid_to_region(matrices: np.ndarray, crop_size: int) -> np.ndarray:
    """matrices (M, 3, 3) region px -> crop px -> (M, 3, 3) normalised crop coords
    (``affine_grid``'s [-1, 1], align_corners=False) -> region px."""
    s = float(crop_size)
    crop_to_norm = np.array([[2 / s, 0, -1], [0, 2 / s, -1], [0, 0, 1]])
    return np.linalg.inv(matrices) @ np.linalg.inv(crop_to_norm)


def grid_theta(to_region: np.ndarray, region_size) -> np.ndarray:
    """(..., 3, 3) normalised crop -> region px, region_size (W, H) of the padded region
    tensor -> ``affine_grid`` matrices (..., 2, 3) normalised crop -> normalised region."""
    w, h = float(region_size[0]), float(region_size[1])
    region_to_norm = np.array([[2 / w, 0, -1], [0, 2 / h, -1], [0, 0, 1]])
    return (region_to_norm @ to_region)[..., :2, :].astype(np.float32)


class DeviceCropPrep:
    """Worker side, per sample: the cropper's plan (``MultiRoICropper.plan``: augmentation,
    RoIs, per-RoI colour, decoded image, labels) as the arrays ``crop_on_device`` renders.

    Called like the cropper (``prep(sample, rng)``), so ``pipeline.CropTransform`` runs
    either; the result's ``images`` is an empty (M, 0, 0, 3) placeholder."""

    def __init__(self, cropper: MultiRoICropper):
        self.cropper = cropper

    def __call__(self, sample: Sample, rng: np.random.Generator, out=None) -> dict:
        plan, size = self.cropper.plan(sample, rng), self.cropper.crop_size
        placeholder = np.empty((len(plan.boxes), 0, 0, 3), np.uint8)
        matrices = roi_matrices(plan.decoded_to_virtual, plan.boxes, size)
        return {**plan.labels, "images": placeholder,
                "region": plan.image,  # (h, w, 3) uint8 RGB
                "grid_to_region": grid_to_region(matrices, size),  # (M, 3, 3)
                "colour": plan.gains.astype(np.float32),  # (M, 3)
                "occluders": plan.occluders,  # (M, 4)
                "occluder_colour": plan.occluder_colour.astype(np.float32)}  # (3,)


def collate_regions(items: list[dict], images=None) -> dict:
    """``DeviceCropPrep`` items -> the batch of ``collate.collate_arrays`` (labels as numpy,
    ``images`` an empty (N, M, 0, 0, 3) placeholder) plus ``regions`` (N, H, W, 3) uint8
    zero-padded at the bottom/right (shared memory in a worker), ``roi_theta``
    (N, M, 2, 3), ``colour`` (N, M, 3) RGB gains per crop, ``occluders`` (N, M, 4)
    crop-px rectangles (x0, y0, x1, y1; empty: none) and ``occluder_colour`` (N, 3)."""
    n, m = len(items), len(items[0]["grid_to_region"])
    batch = collate_arrays(items, torch.empty((n, m, 0, 0, 3), dtype=torch.uint8))
    h = max(item["region"].shape[0] for item in items)
    w = max(item["region"].shape[1] for item in items)
    regions = batch_buffer((n, h, w, 3))
    target = regions.numpy()
    for i, item in enumerate(items):
        rh, rw = item["region"].shape[:2]
        target[i, :rh, :rw] = item["region"]
        target[i, rh:], target[i, :rh, rw:] = 0, 0
    batch["regions"] = regions
    batch["roi_theta"] = grid_theta(np.stack([item["grid_to_region"] for item in items]), (w, h))
    for name in ("colour", "occluders", "occluder_colour"):
        batch[name] = np.stack([item[name] for item in items])
    return batch


def crop_on_device(batch: dict, crop_size: int = 224, as_uint8: bool = True) -> torch.Tensor:
    """All RoIs of the batch at once -> (N, M, 3, S, S) (uint8, or float 0..255).

    ``batch['regions']`` (N, H, W, 3) uint8 RGB and ``roi_theta`` (N, M, 2, 3), on the
    device that should do the work; optional ``colour`` (N, M, 3) gains per crop and
    ``occluders`` (N, M, 4) with ``occluder_colour`` (N, 3).
    """
    regions = batch["regions"].permute(0, 3, 1, 2).float()  # (N, 3, H, W)
    theta = batch["roi_theta"].to(regions.device, torch.float32)
    n, m, s = theta.shape[0], theta.shape[1], crop_size
    grid = F.affine_grid(theta.reshape(n * m, 2, 3), [n * m, 3, s, s], align_corners=False)
    grid = grid.view(n, m * s, s, 2)  # the M crops of a sample stacked along y: no copy of the region
    crops = F.grid_sample(regions, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crops = crops.view(n, 3, m, s, s).transpose(1, 2)  # (N, M, 3, S, S)
    if "colour" in batch:
        crops = crops * batch["colour"].to(crops)[..., None, None]
    if "occluders" in batch:
        crops = _occlude(crops, batch["occluders"].to(crops.device), batch["occluder_colour"].to(crops))
    crops = crops.clamp(0, 255)
    return crops.round().to(torch.uint8) if as_uint8 else crops


def crop_batch(batch: dict, crop_size: int) -> dict:
    """A batch from ``collate_regions`` (already on its device) -> the same batch with
    ``images`` (N, M, 3, S, S) uint8 made there and the device-only keys dropped; a
    batch without ``regions`` (cropped in the workers) is returned as it is."""
    if "regions" not in batch:
        return batch
    images = crop_on_device(batch, crop_size)
    out = {k: v for k, v in batch.items() if k not in DEVICE_KEYS}
    out["images"] = images
    return out


def _occlude(crops, rects, colour):
    """Paint rectangles rects (N, M, 4) (integer crop px) with colour (N, 3)."""
    s = crops.shape[-1]
    pos = torch.arange(s, device=crops.device)
    x0, y0, x1, y1 = (rects[..., k, None] for k in range(4))  # (N, M, 1)
    inside_x = (pos >= x0) & (pos < x1)  # (N, M, S)
    inside_y = (pos >= y0) & (pos < y1)
    mask = (inside_y[..., :, None] & inside_x[..., None, :])[:, :, None]  # (N, M, 1, S, S)
    return torch.where(mask, colour[:, None, :, None, None], crops)
