"""Crop all RoIs of a batch on the training device (``affine_grid`` + ``grid_sample``).

With this option the CPU workers only decode: they ship the decoded stored regions
(zero-padded to a common size) and, per RoI, the 3x3 matrix stored px -> crop px that
the CPU cropper would have used (augmentation folded in), plus colour gains and the
occluder. ``crop_on_device`` then produces the same (N, M, 3, S, S) crops as
``crop.MultiRoICropper`` within interpolation error (bilinear, zero border).

    prep = DeviceCropPrep(cropper)                     # CPU worker
    batch = prep(samples, rng)                         # labels + 'regions', 'roi_matrices', ...
    images = crop_on_device(batch, crop_size=224)      # on the GPU, after .to(device)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .augment import virtual_transform
from .collate import collate_crops
from .crop import MultiRoICropper, crop_transform, homogeneous, occluder_rects
from .schema import Sample, decode_jpeg


def roi_matrices(affine: np.ndarray, boxes: np.ndarray, crop_size: int,
                 full_to_virtual: np.ndarray | None = None) -> np.ndarray:
    """(2, 3) affine full -> stored, boxes (M, 3) virtual px -> (M, 3, 3) stored -> crop px."""
    virtual = np.eye(3) if full_to_virtual is None else full_to_virtual
    stored_to_virtual = virtual @ np.linalg.inv(homogeneous(affine))
    return np.stack([crop_transform(box, crop_size) @ stored_to_virtual for box in boxes])


def sample_grid(matrices: torch.Tensor, region_size: torch.Tensor, crop_size: int) -> torch.Tensor:
    """Sampling grids (N*M, S, S, 2) for ``grid_sample`` (align_corners=False).

    matrices (N, M, 3, 3) stored px -> crop px (pixel-edge convention); region_size
    (N, 2) (W, H) of the padded region tensor the grid will sample.
    """
    n, m = matrices.shape[:2]
    dtype, device = matrices.dtype, matrices.device
    s = float(crop_size)
    crop_to_norm = torch.tensor([[2 / s, 0, -1], [0, 2 / s, -1], [0, 0, 1]], dtype=dtype, device=device)
    w, h = region_size[:, 0].to(dtype), region_size[:, 1].to(dtype)
    stored_to_norm = torch.zeros(n, 1, 3, 3, dtype=dtype, device=device)
    stored_to_norm[:, 0, 0, 0], stored_to_norm[:, 0, 1, 1] = 2 / w, 2 / h
    stored_to_norm[:, 0, :2, 2], stored_to_norm[:, 0, 2, 2] = -1, 1
    theta = stored_to_norm @ torch.linalg.inv(matrices) @ torch.linalg.inv(crop_to_norm)
    return F.affine_grid(theta[:, :, :2].reshape(n * m, 2, 3), [n * m, 3, crop_size, crop_size],
                         align_corners=False)


def crop_on_device(batch: dict, crop_size: int = 224, as_uint8: bool = True) -> torch.Tensor:
    """All RoIs of the batch at once -> (N, M, 3, S, S) (uint8, or float 0..255).

    ``batch['regions']`` (N, 3, H, W) uint8 RGB, ``batch['roi_matrices']`` (N, M, 3, 3);
    optional ``colour`` (N, 3) gains and ``occluders`` (N, M, 4) crop-px rectangles
    (x0, y0, x1, y1; empty rectangles mean none) with ``occluder_colour`` (N, 3).
    """
    regions = batch["regions"]
    n, _, h, w = regions.shape
    matrices = batch["roi_matrices"].to(regions.device, torch.float64)
    m = matrices.shape[1]
    size = torch.tensor([[w, h]], device=regions.device).expand(n, 2)
    grid = sample_grid(matrices, size, crop_size).to(torch.float32)
    source = regions.float().repeat_interleave(m, dim=0)  # (N*M, 3, H, W)
    crops = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    crops = crops.view(n, m, 3, crop_size, crop_size)
    if "colour" in batch:
        crops = crops * batch["colour"].to(crops)[:, None, :, None, None]
    if "occluders" in batch:
        crops = _occlude(crops, batch["occluders"].to(crops.device), batch["occluder_colour"].to(crops))
    crops = crops.clamp(0, 255)
    return crops.round().to(torch.uint8) if as_uint8 else crops


def _occlude(crops, rects, colour):
    """Paint rectangles rects (N, M, 4) (integer crop px) with colour (N, 3)."""
    s = crops.shape[-1]
    pos = torch.arange(s, device=crops.device)
    x0, y0, x1, y1 = (rects[..., k, None] for k in range(4))  # (N, M, 1)
    inside_x = (pos >= x0) & (pos < x1)  # (N, M, S)
    inside_y = (pos >= y0) & (pos < y1)
    mask = (inside_y[..., :, None] & inside_x[..., None, :])[:, :, None]  # (N, M, 1, S, S)
    return torch.where(mask, colour[:, None, :, None, None], crops)


class DeviceCropPrep:
    """CPU side: decode, draw the cropper's augmentation and RoIs, label, pad regions."""

    def __init__(self, cropper: MultiRoICropper):
        self.cropper = cropper

    def __call__(self, samples: list[Sample], rng: np.random.Generator) -> dict:
        items, regions, extras = [], [], []
        for sample in samples:
            params, boxes = self.cropper.draw(sample, rng)
            virtual = virtual_transform(params, sample.image_size)
            matrices = roi_matrices(sample.affine, boxes, self.cropper.crop_size, virtual)
            images = np.zeros((len(boxes), 1, 1, 3), np.uint8)  # placeholder, cropped on device
            items.append(self.cropper._labels(sample, params, boxes, images))
            regions.append(sample.image if sample.image is not None else decode_jpeg(sample.jpeg))
            extras.append((matrices, params, occluder_rects(params, boxes, self.cropper.crop_size)))
        batch = collate_crops(items)
        del batch["images"]
        batch["regions"] = _pad_regions(regions)
        batch["roi_matrices"] = torch.from_numpy(np.stack([e[0] for e in extras]))
        batch["colour"] = torch.from_numpy(np.stack([e[1].color for e in extras]).astype(np.float32))
        batch["occluders"] = torch.from_numpy(np.stack([e[2] for e in extras]))
        batch["occluder_colour"] = torch.from_numpy(
            np.stack([e[1].occluder_color.astype(np.uint8) for e in extras]).astype(np.float32))
        return batch


def _pad_regions(regions: list[np.ndarray]) -> torch.Tensor:
    """(h_i, w_i, 3) uint8 images -> (N, 3, H, W) zero-padded at the bottom/right."""
    h = max(r.shape[0] for r in regions)
    w = max(r.shape[1] for r in regions)
    out = np.zeros((len(regions), h, w, 3), np.uint8)
    for i, region in enumerate(regions):
        out[i, : region.shape[0], : region.shape[1]] = region
    return torch.from_numpy(out).permute(0, 3, 1, 2)
