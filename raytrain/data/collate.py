"""Per-sample dicts of the cropper -> the batch of docs/CONVENTIONS.md (torch tensors).

``images`` comes out with shape (N, M, 3, S, S) uint8 RGB. By default it is a permuted
*view* of the channels-last buffer (N, M, S, S, 3) the crops were written into (no
transpose copy on the CPU); after ``.to(device)`` and ``reshape(N*M, 3, S, S)`` it is a
``torch.channels_last`` tensor, the fast layout for convolutions on GPUs. Pass
``contiguous=True`` for a contiguous (N, M, 3, S, S) tensor.

Two steps, so that a DataLoader worker hands over cheaply: ``collate_arrays`` (in the
worker) writes the crops into one uint8 tensor, in shared memory inside a worker, and
stacks the labels as *numpy* arrays (pickled by value through the worker's pipe: every
torch tensor sent from a worker costs a shared-memory file and a file-descriptor
hand-over, ~0.1 ms on each side); ``batch_to_torch`` (in the receiving process) turns the
labels into tensors without copying. ``collate_crops`` is both in one call.

``BatchPool`` recycles the workers' shared-memory image buffers: a fresh 12 MB
shared-memory buffer per batch costs ~8 ms of page allocation, zeroing and freeing
(~0.5 ms per sample at N = 16, M = 5, S = 224), refilling a recycled one ~0.3 ms. A
buffer goes back to its worker only once nothing outside the pool references its
memory any more (see ``BatchPool.release_unused``), so a batch the training loop keeps
is never overwritten.
"""

from __future__ import annotations

import sys

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
    return batch_to_torch(collate_arrays(samples), contiguous)


def collate_arrays(samples: list[dict], images: torch.Tensor | None = None) -> dict:
    """Cropper outputs -> ``images`` (N, M, S, S, 3) uint8 tensor and numpy labels.

    ``images``: the (N, M, S, S, 3) buffer to copy the crops into, else one is allocated
    (shared memory in a DataLoader worker).
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    if images is None:
        images = _batch_buffer((len(samples), *samples[0]["images"].shape))
    np.stack([s["images"] for s in samples], out=images.numpy())
    batch = {"images": images}
    for name in FLOAT_KEYS:
        batch[name] = np.stack([np.asarray(s[name], np.float32) for s in samples])
    for name in FLAG_KEYS:
        batch[name] = np.array([bool(s[name]) for s in samples], dtype=np.bool_)
    batch["keys"] = [s["key"] for s in samples]
    return batch


class BatchPool:
    """Per-worker ring of shared-memory image buffers, recycled once released.

    Created before the DataLoader starts its workers (the state array lives in shared
    memory, inherited by the workers). ``state[w, k]`` is 0 while buffer ``k`` of worker
    ``w`` is free (or not created yet) and 1 from when the worker fills it until the
    receiving process has seen that nothing references it any more. Only the worker
    sets 1 and only the receiver sets 0.

    Worker side: ``buffer(shape)`` -> (slot, tensor); slot -1 means a fresh, unpooled
    buffer (every pooled one is still in use, or a shape that differs).
    Receiving side: ``received(slot, images)`` for every batch, then
    ``release_unused()``; ``release(slot)`` when the images were copied (pinned memory).
    """

    def __init__(self, num_workers: int, size: int):
        self.size = int(size)
        self.state = torch.zeros((max(num_workers, 1), self.size), dtype=torch.uint8).share_memory_()
        self._buffers: list[torch.Tensor] = []  # worker side: this worker's buffers
        self._held: dict[tuple[int, int], torch.Tensor] = {}  # receiving side
        self._out: set[tuple[int, int]] = set()
        self.fresh = 0  # worker side: batches that did not get a pooled buffer

    # -- worker side

    def buffer(self, shape) -> tuple[tuple[int, int], torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return (-1, -1), torch.empty(shape, dtype=torch.uint8)
        state = self.state[info.id].numpy()
        shape = tuple(shape)
        for k in range(self.size):
            if k == len(self._buffers):
                self._buffers.append(_batch_buffer(shape))
            if state[k] == 0 and tuple(self._buffers[k].shape) == shape:
                state[k] = 1
                return (info.id, k), self._buffers[k]
        self.fresh += 1
        return (-1, -1), _batch_buffer(shape)

    # -- receiving side

    def received(self, slot, images: torch.Tensor) -> None:
        """Note that the batch of pooled ``slot`` arrived with ``images`` (its buffer)."""
        if slot[0] < 0:
            return
        self._held[slot] = images  # also keeps the buffer mapped here between uses
        self._out.add(slot)

    def release(self, slot) -> None:
        """Hand ``slot`` back now (its contents were copied elsewhere)."""
        if slot[0] >= 0:
            self._out.discard(slot)
            self._held.pop(slot, None)
            self.state[slot] = 0

    def release_unused(self) -> None:
        """Hand back every buffer that only the pool itself still references."""
        for slot in list(self._out):
            if _only_reference(self._held, slot):
                self._out.discard(slot)
                self.state[slot] = 0


def _references(holder: dict, key) -> tuple[int, int, int]:
    """How much refers to ``holder[key]``: the tensor object's Python refcount (other
    dicts, lists, numpy arrays made by ``.numpy()``), its storage's C++ use count (views,
    other tensors on the same memory) and the storage object's Python refcount."""
    tensor = holder[key]
    storage = tensor.untyped_storage()
    return (sys.getrefcount(tensor), torch._C._storage_Use_Count(storage._cdata),
            sys.getrefcount(storage))


#: ``_references`` of a tensor that only its holder references (measured, not assumed).
_ALONE = _references({0: torch.empty(1, dtype=torch.uint8)}, 0)


def _only_reference(holder: dict, key) -> bool:
    """True when nothing but ``holder`` references the tensor ``holder[key]`` or its memory."""
    return _references(holder, key) == _ALONE


def batch_to_torch(batch: dict, contiguous: bool = False) -> dict:
    """In place: numpy labels -> tensors (no copy), images (N, M, S, S, 3) -> (N, M, 3, S, S)."""
    for name, value in batch.items():
        if isinstance(value, np.ndarray):
            batch[name] = torch.from_numpy(value)
    images = batch["images"]
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    batch["images"] = images.permute(0, 1, 4, 2, 3)
    if contiguous:
        batch["images"] = batch["images"].contiguous()
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
