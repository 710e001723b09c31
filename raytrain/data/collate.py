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
is never overwritten. Pools made by ``BatchPool.acquire`` allocate their buffers before
the workers start and are reused by the next epoch's loader once an epoch ran to its
end. ``BatchSink`` lets the cropper write each item's crops straight into its slot of
the pooled buffer (collate then copies nothing).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.utils.data

#: ``BatchPool.state`` of a buffer: free, filled by its worker (in flight), held by the receiver.
FREE, SENT, HELD = 0, 1, 2
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
    """Worker side: the crops of each item go straight into its slot of a pooled batch
    buffer (no per-sample array, no copy in collate).

    The reader's items come out of a DataLoader worker in order, ``batch_size`` of them
    per batch: the ``k``-th item yielded goes into slot ``k`` of the batch's buffer.
    ``destination()`` is the slot of the next item (the same until ``commit()``, so a
    transform that fails half-way leaves nothing behind), ``commit()`` marks it taken
    when the item is yielded, ``take()`` (in collate) hands the filled buffer over and
    starts a new one. A substituted item (the reader re-yields the previous good one)
    is copied into its own slot by ``substitute`` when it is yielded: every item
    yielded since its source was written is a copy of that source, so the source slot
    still holds it then, even if its buffer came back for this batch.

    Outside a DataLoader worker (or without a pool) ``destination()`` is None: the
    cropper allocates, collate copies.
    """

    def __init__(self, pool: BatchPool, batch_size: int, item_shape):
        self.pool, self.batch_size = pool, int(batch_size)
        self.item_shape = tuple(item_shape)
        self._forget_buffer()

    def _forget_buffer(self) -> None:
        """The next item starts a new buffer."""
        self._slot, self._buffer, self._array, self._filled = (-1, -1), None, None, 0

    def destination(self) -> np.ndarray | None:
        if self.pool is None or torch.utils.data.get_worker_info() is None:
            return None
        if self._filled >= self.batch_size:  # collate did not take it: stop writing in place
            return None
        if self._buffer is None:
            self._slot, self._buffer = self.pool.buffer((self.batch_size, *self.item_shape))
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

    def reset(self) -> None:
        """Worker side, at the start of every epoch (workers may persist across epochs):
        forget a buffer the previous epoch left part-filled (its last items dropped by
        ``drop_last``, or the iteration abandoned) and hand back this worker's buffers
        of batches that were sent but never received: the new iteration's start
        drains and drops them (see ``BatchPool.received``)."""
        info = torch.utils.data.get_worker_info()
        if self.pool is not None and info is not None:
            state = self.pool.state[info.id].numpy()
            state[state == SENT] = FREE
        self._forget_buffer()

    def take(self):
        """(slot, buffer tensor, items written) of the buffer being filled, or None;
        the next item starts a new buffer."""
        if self._buffer is None:
            return None
        taken = self._slot, self._buffer, self._filled
        self._forget_buffer()
        return taken


class BatchPool:
    """Per-worker ring of shared-memory image buffers, recycled once released.

    Created before the DataLoader starts its workers (the state array lives in shared
    memory, inherited by the workers). ``state[w, k]`` of buffer ``k`` of worker ``w`` is
    ``FREE`` (or not created yet), ``SENT`` from when the worker fills it, ``HELD`` once
    the receiving process got its batch, until it has seen that nothing references it
    any more. Only the worker sets ``SENT``; the receiver sets ``HELD`` and ``FREE``; a
    worker starting an epoch frees its ``SENT`` buffers (``BatchSink.reset``).

    Worker side: ``buffer(shape)`` -> (slot, tensor); slot -1 means a fresh, unpooled
    buffer (every pooled one is still in use, or a shape that differs).
    Receiving side: ``received(slot, images)`` for every batch, then
    ``release_unused()``; ``release(slot)`` when the images were copied (pinned memory).
    """

    def __init__(self, num_workers: int, size: int, shape=None):
        self.size = int(size)
        self.num_workers = max(num_workers, 1)
        self.state = torch.zeros((self.num_workers, self.size), dtype=torch.uint8).share_memory_()
        self._buffers: list[torch.Tensor] = []  # worker side: this worker's buffers
        # with ``shape``: every worker's buffers are made here, before the workers start,
        # so a pool reused for later epochs (``acquire``/``recycle``) keeps their pages
        # (a fresh 12 MB buffer costs ~11 ms of page faults and zeroing on first fill)
        self.shape = tuple(shape) if shape is not None else None
        self._shared = ([[_shared_buffer(self.shape) for _ in range(self.size)]
                         for _ in range(self.num_workers)] if shape is not None else None)
        self._held: dict[tuple[int, int], torch.Tensor] = {}  # receiving side
        self._out: set[tuple[int, int]] = set()
        self.fresh = 0  # worker side: batches that did not get a pooled buffer
        self.owner = None  # receiving side: who iterates with it now (``claim``)

    # -- worker side

    def buffer(self, shape) -> tuple[tuple[int, int], torch.Tensor]:
        info = torch.utils.data.get_worker_info()
        if info is None:
            return (-1, -1), torch.empty(shape, dtype=torch.uint8)
        state = self.state[info.id].numpy()
        shape = tuple(shape)
        if self._shared is not None and not self._buffers:
            self._buffers = list(self._shared[info.id])
        for k in range(self.size):
            if k == len(self._buffers):
                self._buffers.append(_batch_buffer(shape))
            if state[k] == FREE and tuple(self._buffers[k].shape) == shape:
                state[k] = SENT
                return (info.id, k), self._buffers[k]
        self.fresh += 1
        return (-1, -1), _batch_buffer(shape)

    # -- reuse across epochs (receiving side)

    @classmethod
    def acquire(cls, num_workers: int, size: int, shape) -> BatchPool:
        """A pool with buffers of ``shape``: an idle one from an epoch that ran to its end
        (its buffers' pages already in memory), else a new one. A pool serves one
        DataLoader iteration at a time: its user ``claim``s it before each iteration."""
        key = (max(num_workers, 1), int(size), tuple(shape))
        idle = _IDLE_POOLS.pop(key, None)
        return idle if idle is not None else cls(num_workers, size, shape)

    def claim(self, owner) -> bool:
        """Make ``owner`` the pool's only user; False when another owner got it after
        this one recycled it (``owner`` then needs another pool)."""
        if self.owner is None or self.owner is owner:
            key = (self.num_workers, self.size, self.shape)
            if _IDLE_POOLS.get(key) is self:
                del _IDLE_POOLS[key]
            self.owner = owner
            return True
        return False

    def recycle(self) -> None:
        """Offer the pool to a later ``acquire``. Only once the DataLoader iterator that
        used it is exhausted (its workers joined): no worker writes its buffers any more.
        Batches still held keep their buffers (``HELD``) until released."""
        self.owner = None
        if self._shared is not None:
            _IDLE_POOLS[(self.num_workers, self.size, self.shape)] = self

    # -- receiving side

    def received(self, slot, images: torch.Tensor) -> None:
        """Note that the batch of pooled ``slot`` arrived with ``images`` (its buffer)."""
        if slot[0] < 0:
            return
        self.state[slot] = HELD
        self._held[slot] = images  # also keeps the buffer mapped here between uses
        self._out.add(slot)

    def release(self, slot) -> None:
        """Hand ``slot`` back now (its contents were copied elsewhere)."""
        if slot[0] >= 0:
            self._out.discard(slot)
            self._held.pop(slot, None)
            self.state[slot] = FREE

    def release_unused(self) -> None:
        """Hand back every buffer that only the pool itself still references."""
        for slot in list(self._out):
            if _only_reference(self._held, slot):
                self._out.discard(slot)
                self.state[slot] = FREE


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


#: Idle pools by (workers, size, shape), at most one each (see ``BatchPool.acquire``).
_IDLE_POOLS: dict = {}


def _shared_buffer(shape) -> torch.Tensor:
    """uint8 tensor of ``shape`` in shared memory (file-descriptor sharing)."""
    numel = int(np.prod(shape))
    storage = torch.empty(0, dtype=torch.uint8)._typed_storage()._new_shared(numel, device="cpu")
    return torch.empty(0, dtype=torch.uint8).new(storage).view(shape)


def _batch_buffer(shape) -> torch.Tensor:
    """uint8 tensor for the batch's crops; in a DataLoader worker, allocated in shared
    memory (as torch's ``default_collate`` does) so that sending the batch to the main
    process does not copy it once more."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    return _shared_buffer(shape)
