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

``BatchSink`` lets the cropper write each item's crops straight into its slot of the
batch's shared-memory buffer (collate then copies nothing). Each batch gets a fresh
buffer: recycling buffers across batches measured within noise (docs/design.md §3.3).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.utils.data

from ..workarounds import new_shared_tensor

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
        images = batch_buffer((len(samples), *samples[0]["images"].shape))
    target = images.numpy()
    for i, s in enumerate(samples):
        if not _is_at(s["images"], target, i):  # else written in place already (``BatchSink``)
            target[i] = s["images"]
    batch = {"images": images}
    for name in FLOAT_KEYS:
        batch[name] = np.stack([np.asarray(s[name], np.float32) for s in samples])
    for name in FLAG_KEYS:
        batch[name] = np.array([bool(s[name]) for s in samples], dtype=np.bool_)
    batch["keys"] = [s["key"] for s in samples]
    return batch


def _is_at(array, target: np.ndarray, index: int) -> bool:
    """True when ``array`` is exactly the slot ``target[index]`` (same memory, shape)."""
    return (isinstance(array, np.ndarray) and array.shape == target.shape[1:]
            and array.dtype == target.dtype
            and array.ctypes.data == target.ctypes.data + index * target.strides[0]
            and array.strides == target.strides[1:])


class BatchSink:
    """Worker side: the crops of each item go straight into its slot of the batch's
    buffer (no per-sample array, no copy in collate).

    The reader's items come out of a DataLoader worker in order, ``batch_size`` of them
    per batch: the ``k``-th item yielded goes into slot ``k`` of the batch's buffer.
    ``destination()`` is the slot of the next item (the same until ``commit()``, so a
    transform that fails half-way leaves nothing behind), ``commit()`` marks it taken
    when the item is yielded, ``take()`` (in collate) hands the filled buffer over and
    starts a new one. A substituted item (the reader re-yields the previous good one)
    is copied into its own slot by ``substitute`` when it is yielded.

    Outside a DataLoader worker ``destination()`` is None: the cropper allocates,
    collate copies.
    """

    def __init__(self, batch_size: int, item_shape):
        self.batch_size = int(batch_size)
        self.item_shape = tuple(item_shape)
        self.reset()

    def reset(self) -> None:
        """The next item starts a new buffer (also at every epoch's start: workers may
        persist across epochs, and the previous epoch may have left one part-filled)."""
        self._buffer, self._array, self._filled = None, None, 0

    def destination(self) -> np.ndarray | None:
        if torch.utils.data.get_worker_info() is None:
            return None
        if self._filled >= self.batch_size:  # collate did not take it: stop writing in place
            return None
        if self._buffer is None:
            self._buffer = batch_buffer((self.batch_size, *self.item_shape))
            self._array = self._buffer.numpy()
        return self._array[self._filled]

    def commit(self, images) -> None:
        """The item just yielded has ``images``; advance if they sit in their slot."""
        if self._array is not None and _is_at(images, self._array, self._filled):
            self._filled += 1

    def substitute(self, item: dict) -> dict:
        """``item`` yielded once more: a copy whose crops sit in the next slot."""
        target = self.destination()
        if target is None or not isinstance(item, dict) or "images" not in item:
            return item
        np.copyto(target, item["images"])
        item = {**item, "images": target}
        self.commit(target)
        return item

    def take(self) -> tuple[torch.Tensor, int] | None:
        """(buffer tensor, items written) of the buffer being filled, or None; the next
        item starts a new buffer."""
        if self._buffer is None:
            return None
        taken = self._buffer, self._filled
        self.reset()
        return taken


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


def batch_buffer(shape) -> torch.Tensor:
    """uint8 tensor for the batch's crops; in a DataLoader worker, allocated in shared
    memory (as torch's ``default_collate`` does) so that sending the batch to the main
    process does not copy it once more."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return new_shared_tensor(shape)
