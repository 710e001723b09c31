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
batch's shared-memory buffer (collate then copies nothing), and reuses the buffers the
receiver hands back: a batch made in a worker names its buffer (``batch["buffer"]``), the
receiver calls ``pipeline.Loader.release(batch)`` once it no longer reads the batch's
images, and the name travels back to the worker through a queue. A buffer is filled
again only after that explicit release (a fresh 12 MB buffer costs 6.9 ms, mostly the
kernel zeroing its pages); a batch never released keeps its pixels.
"""

from __future__ import annotations

import queue
import secrets
from collections import OrderedDict

import numpy as np
import torch
import torch.utils.data

from ..workarounds import new_shared_tensor

#: Float label arrays of a sample dict and their per-sample shapes.
FLOAT_KEYS = {"boxes": None, "image_size": (2,), "focal": (), "keypoints_2d": (24, 3),
              "joints_3d": (24, 4), "pose": (72,), "betas": (10,), "cam_full": (3,)}
FLAG_KEYS = ("has_smpl", "has_3d", "has_2d", "has_cam")
SAMPLE_KEYS = ("key", "images", *FLOAT_KEYS, *FLAG_KEYS)

#: Name of a batch's image buffer, ``batch["buffer"]``: (source, worker, process, buffer,
#: use). ``source`` is a random token of the ``pipeline.Loader`` that receives it,
#: ``worker`` the DataLoader worker, ``process`` is a random token of that worker process
#: (a name never matches a buffer of another process, e.g. the workers of a later epoch
#: without persistent workers), ``buffer`` numbers the worker's buffers and ``use`` counts
#: the times that buffer was sent, so each send has its own name.
BufferName = tuple[int, int, int, int, int]


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
    buffer (no per-sample array, no copy in collate), and a buffer the receiver hands
    back is filled again instead of allocating a fresh one.

    Filling. The reader's items come out of a DataLoader worker in order, ``batch_size``
    of them per batch: the ``k``-th item yielded goes into slot ``k`` of the batch's
    buffer. ``destination()`` is the slot of the next item (the same until ``commit()``,
    so a transform that fails half-way leaves nothing behind), ``commit()`` marks it taken
    when the item is yielded, ``take()`` (in collate) sends the filled buffer with its
    name and starts a new one. Outside a DataLoader worker ``destination()`` is None: the
    cropper allocates, collate copies.

    States of a buffer, in the worker that made it:

    - *filling*: the buffer of the batch being made; only this worker writes it, only
      now. A new one is a *released* buffer if the worker has one, else fresh shared
      memory. One part-filled at an epoch's start (workers persist across epochs) or not
      taken by collate was never sent: it is dropped.
    - *sent*: collate handed it over with the batch (``take``); the worker keeps a
      reference, never writes it.
    - *released*: the receiver called ``pipeline.Loader.release(batch)`` and the name came
      back through this worker's return queue (``returns[worker]``, read without waiting
      when a new buffer starts): the receiver no longer reads it.
    - *reused*: a released buffer becomes the next *filling* one, sent again under a new
      name (``use`` + 1); a late or repeated release of the old name matches nothing.
    - *forgotten*: the worker references at most ``keep`` sent and released buffers; past
      that it drops its reference to the oldest sent one, which is freed with the
      receiver's last reference and never written again.

    So a buffer is refilled only after an explicit release of its last send: a batch the
    receiver keeps without releasing is never overwritten. Without ``returns`` (e.g.
    validation) nothing is kept and every batch gets a fresh buffer.
    """

    def __init__(self, batch_size: int, item_shape, returns: list | None = None,
                 source: int = 0, keep: int = 6):
        self.batch_size = int(batch_size)
        self.item_shape = tuple(item_shape)
        self.returns = returns  # per-worker multiprocessing queues of released names, or None
        self.source, self.keep = int(source), int(keep)
        self._process: int | None = None  # this worker process's token, drawn on its first send
        self._count = 0  # buffers this process allocated
        self._sent: OrderedDict[int, tuple[int, torch.Tensor]] = OrderedDict()  # buffer -> (use, tensor)
        self._released: list[tuple[int, int, torch.Tensor]] = []  # (buffer, use, tensor)
        self.reset()

    def reset(self) -> None:
        """The next item starts a new buffer (also at every epoch's start: workers may
        persist across epochs, and the previous epoch may have left one part-filled,
        never sent, which is dropped)."""
        self._buffer, self._array, self._filled, self._number, self._use = None, None, 0, 0, 0

    def destination(self) -> np.ndarray | None:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return None
        if self._filled >= self.batch_size:  # collate did not take it: stop writing in place
            return None
        if self._buffer is None:
            self._number, self._use, self._buffer = self._new_buffer(info.id)
            self._array = self._buffer.numpy()
        return self._array[self._filled]

    def commit(self, images) -> None:
        """The item just yielded has ``images``; advance if they sit in their slot."""
        if self._array is not None and _is_at(images, self._array, self._filled):
            self._filled += 1

    def take(self, count: int) -> tuple[torch.Tensor, BufferName] | None:
        """(buffer, name) when the first ``count`` slots of the buffer being filled hold
        the batch collate is making: the buffer is then *sent*. Else None (collate
        copies). Either way the next item starts a new buffer."""
        buffer, filled, number, use = self._buffer, self._filled, self._number, self._use
        self.reset()
        info = torch.utils.data.get_worker_info()
        if buffer is None or filled != count or info is None:
            return None
        if self._process is None:
            self._process = secrets.randbits(62)
        if self.returns is not None:
            self._sent[number] = (use, buffer)
            while self._sent and len(self._sent) + len(self._released) > self.keep:
                self._sent.popitem(last=False)  # forgotten
        return buffer, (self.source, info.id, self._process, number, use)

    def _new_buffer(self, worker: int) -> tuple[int, int, torch.Tensor]:
        """(buffer number, use, tensor) for the next batch: a released buffer, else fresh."""
        self._collect(worker)
        if self._released:  # every buffer has the one shape of this sink
            number, use, buffer = self._released.pop()
            return number, use + 1, buffer
        self._count += 1
        return self._count, 1, batch_buffer((self.batch_size, *self.item_shape))

    def _collect(self, worker: int) -> None:
        """Sent buffers whose names came back through this worker's queue -> released."""
        if self.returns is None:
            return
        returns = self.returns[worker]
        while True:
            try:
                process, number, use = returns.get_nowait()
            except queue.Empty:
                return
            sent = self._sent.get(number) if process == self._process else None
            if sent is not None and sent[0] == use:
                del self._sent[number]
                self._released.append((number, use, sent[1]))


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
