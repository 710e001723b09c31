"""Per-sample dicts of the cropper -> the batch of docs/CONVENTIONS.md (torch tensors).

``images`` comes out with shape (N, M, 3, S, S) uint8 RGB. By default it is a permuted
*view* of the channels-last buffer (N, M, S, S, 3) the crops were written into (no
transpose copy on the CPU); after ``.to(device)`` and ``reshape(N*M, 3, S, S)`` it is a
``torch.channels_last`` tensor, the fast layout for convolutions on GPUs. Pass
``contiguous=True`` for a contiguous (N, M, 3, S, S) tensor.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.data

#: Float label arrays of a sample dict and their per-sample shapes.
FLOAT_KEYS = {"boxes": None, "image_size": (2,), "focal": (), "keypoints_2d": (24, 3),
              "joints_3d": (24, 4), "pose": (72,), "betas": (10,), "cam_full": (3,)}
FLAG_KEYS = ("has_smpl", "has_3d", "has_2d", "has_cam")
SAMPLE_KEYS = ("key", "images", *FLOAT_KEYS, *FLAG_KEYS)


def collate_crops(samples: list[dict], contiguous: bool = False) -> dict:
    """List of cropper outputs (``images`` (M, S, S, 3)) -> batch dict of tensors."""
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    first = samples[0]["images"]
    images = _batch_buffer((len(samples), *first.shape))  # (N, M, S, S, 3)
    np.stack([s["images"] for s in samples], out=images.numpy())
    batch = {"images": images.permute(0, 1, 4, 2, 3)}
    if contiguous:
        batch["images"] = batch["images"].contiguous()
    for name in FLOAT_KEYS:
        batch[name] = torch.from_numpy(np.stack([np.asarray(s[name], np.float32) for s in samples]))
    for name in FLAG_KEYS:
        batch[name] = torch.tensor([bool(s[name]) for s in samples], dtype=torch.bool)
    batch["keys"] = [s["key"] for s in samples]
    return batch


def _batch_buffer(shape) -> torch.Tensor:
    """uint8 tensor for the batch's crops; in a DataLoader worker, allocated in shared
    memory (as torch's ``default_collate`` does) so that sending the batch to the main
    process does not copy it once more."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape)


def normalise_images(images: torch.Tensor, mean=(0.485, 0.456, 0.406),
                     std=(0.229, 0.224, 0.225)) -> torch.Tensor:
    """uint8 (..., 3, S, S) RGB -> float ImageNet-normalised, on the tensor's device."""
    mean = torch.tensor(mean, device=images.device).view(3, 1, 1) * 255
    std = torch.tensor(std, device=images.device).view(3, 1, 1) * 255
    return (images.float() - mean) / std
