"""What a training worker iterates: shards -> reader -> multi-RoI cropper -> batches.

    with Loader(cfg, "train", rank, world_size) as loader:
        for batch in loader.epoch(epoch, skip=0):
            ...                     # CONVENTIONS.md batch; images uint8 (N, M, 3, S, S)
            loader.release(batch)   # its images are read no more: the worker may refill them

The reader splits every epoch by rank and by DataLoader worker and skips what a
checkpoint says was consumed; the cropper runs inside the DataLoader workers (decode and
crop scale with `data.loader_workers`, independent of the number of GPUs). Augmentation
is drawn from a generator seeded by (seed, epoch, sample key), so a resumed epoch crops
exactly as the interrupted one would have.

A `Loader` belongs to whoever made it and lives until it is closed: with
`data.persistent_workers` (default) its workers are forked once and serve every later
epoch of it (the reader's position lives in shared memory and each epoch sets it);
`train.loop.run_loop` makes one for training and one for validation and closes both.
`shard_sets(cfg)` says which shard sets a config reads.

The crops of a training batch arrive in a shared-memory buffer of the worker that made
it; `loader.release(batch)` (once the batch's images are no longer read:
`train.loop.run_loop` calls it after each step) hands the buffer back for the worker to
fill again (`collate.BatchSink`). A batch not released keeps its pixels.

With `data.device_crop` the workers of the training split only decode and draw the
augmentation (`device_crop.DeviceCropPrep`): a batch carries the decoded regions and
the crops are made after the move to the device (`train.loop.batch_to_device`).
Validation always crops in the workers.
"""
import multiprocessing
import os
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..body.model import root_joint_model
from ..geometry import schedule_from_config
from .collate import BatchSink, batch_to_torch, collate_arrays
from .crop import MultiRoICropper
from .device_crop import DeviceCropPrep, collate_regions
from .mixture import MixtureReader
from .reader import Reader, ShardReader
from .shards import count_samples


def epoch_length(cfg, split: str, rank: int, world_size: int) -> int:
    """Samples each rank sees per epoch of `split` (the same on every rank): the largest
    source's per-rank length for a mixture (``MixtureReader``)."""
    return max(count_samples(s.source) for s in _sources(cfg, split)) // world_size


@lru_cache(maxsize=4)
def _root_joint(smpl_dir: str | None):
    from ..body import load_body_model
    return root_joint_model(load_body_model(smpl_dir))


class CropTransform:
    """Picklable per-sample transform run inside the reader: sample -> cropped dict."""

    def __init__(self, cropper: MultiRoICropper, seed: int, epoch: int = 0,
                 sink: BatchSink | None = None):
        self.cropper, self.seed, self.epoch = cropper, seed, epoch
        self.sink = sink  # in DataLoader workers: crops go straight into the batch buffer

    def start_epoch(self, epoch: int) -> None:
        """Called by the reader at the start of every iteration, where it iterates."""
        self.epoch = epoch
        if self.sink is not None:
            self.sink.reset()

    def __call__(self, sample):
        rng = np.random.default_rng([self.seed, self.epoch, zlib.crc32(sample.key.encode())])
        destination = self.sink.destination() if self.sink is not None else None
        out = self.cropper(sample, rng, out=destination)
        out["gender"] = sample.gender
        if destination is not None:
            self.sink.commit(out["images"])
        if self.sink is not None:
            out["sample"] = sample  # for ``substitute``
        return out

    def substitute(self, item):
        """The reader yields ``item`` again in place of a bad sample. With a sink, its
        sample is cropped once more into the next slot (the same pixels: the
        augmentation is seeded by the sample's key): ``item``'s own crops may sit in a
        buffer already sent, which the receiver may have released for refilling."""
        if self.sink is None or not isinstance(item, dict) or "sample" not in item:
            return item
        return self(item["sample"])


class Loader:
    """One rank's batches of one split ('train' or 'val'), epoch after epoch: the split's
    reader (``ShardReader``, or ``MixtureReader`` for a training mixture), the multi-RoI
    cropper in its DataLoader workers, and the batches' return path.

        loader = Loader(cfg, "train", rank, world_size)   # opens nothing yet
        for batch in loader.epoch(epoch, skip):           # skip: samples of it consumed
            ...
            loader.release(batch)                         # its images are read no more
        loader.close()                                    # or: with Loader(...) as loader:

    States:

    - *unopened*: made, no epoch drawn yet. Nothing is read until the first batch of
      the first epoch is asked for: a data error of opening the shards (a missing or
      inconsistent manifest) is raised there, like one met reading them.
    - *iterating*: the batches of one epoch are being drawn. One epoch at a time: a
      later ``epoch()`` ends an earlier one still open, which raises if drawn from again.
    - *waiting*: with persistent workers (``data.persistent_workers`` and
      ``data.loader_workers`` > 0) the DataLoader workers, forked by the first epoch,
      wait for the next one; each epoch sets the reader's shared position (epoch,
      samples to skip) before it starts them again. Forking the workers of a large
      training process costs ~0.1 s per epoch, and the training loop's validation
      loader would fork its workers at every validation otherwise. Without persistent
      workers every epoch forks its own and stops them at its end. An epoch that raises
      (e.g. too many bad samples) stops its workers: the next epoch forks new ones.
    - *closed*: ``close()`` (or the end of a ``with`` block, or the loader's garbage
      collection) stopped the workers; an epoch iterating then raises, ``epoch()``
      refuses. The owner closes the loader (``train.loop.run_loop`` closes its two);
      one dropped without closing stops its workers when it is collected.

    With ``data.device_crop`` the workers of the training split only decode
    (``device_crop.DeviceCropPrep``); validation always crops in the workers.

    When the workers crop the training split, each has a return queue (made before any
    worker starts, so every worker process inherits it): ``release`` sends a batch's
    buffer name back through it (``collate.BatchSink``).
    """

    def __init__(self, cfg, split: str, rank: int = 0, world_size: int = 1,
                 batch_size: int | None = None, seed: int | None = None):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        self.cfg, self.split, self.rank, self.world_size = cfg, split, rank, world_size
        if batch_size is None:  # data.batch_size counts persons over all ranks
            batch_size = cfg.data.batch_size // world_size if split == "train" else cfg.data.val_batch_size
        self.batch_size, self.seed = int(batch_size), cfg.seed if seed is None else int(seed)
        workers = cfg.data.loader_workers
        self.persistent = cfg.data.persistent_workers and workers > 0
        self.max_batches = None
        if split == "val" and cfg.data.max_val_samples:
            self.max_batches = max(1, cfg.data.max_val_samples // world_size // self.batch_size)
        # names this loader's batch buffers: a release of another loader's batch is ignored
        self.number = secrets.randbits(62)
        self.reader: Reader | None = None  # opened by the first epoch
        self.returns: list | None = None
        self._data_loader: DataLoader | None = None
        self._batches: Iterator | None = None  # the DataLoader iterator of the current epoch
        self._current = 0  # counts the epochs started: an older one's batches are refused
        self.closed = False
        self._pid = os.getpid()

    # ---------------------------------------------------------------- the epoch

    def epoch(self, epoch: int, skip: int = 0) -> Iterator[dict]:
        """The batches (CONVENTIONS.md; images uint8 (N, M, 3, S, S)) of ``epoch`` on this
        rank, after the first ``skip`` samples of it (a checkpoint's position)."""
        if self.closed:
            raise RuntimeError(f"the {self.split} loader is closed")
        self._current += 1
        return self._epoch(self._current, int(epoch), int(skip))

    def _epoch(self, token: int, epoch: int, skip: int) -> Iterator[dict]:
        if self.reader is None:
            self._open()
        self.reader.reset_shared_counts()
        self.reader.load_state_dict({"epoch": epoch, "consumed": skip})
        if self._data_loader is None:
            self._data_loader = self._make_data_loader()
        self._batches = iter(self._data_loader)  # persistent workers: they start the epoch
        index = 0
        while self.max_batches is None or index < self.max_batches:
            if self.closed:  # stopped under this iteration: the epoch cannot complete
                raise RuntimeError(f"the {self.split} loader was closed in the middle of an "
                                   "epoch; the epoch is incomplete")
            if token != self._current:
                raise RuntimeError(f"a later epoch of the {self.split} loader started in the "
                                   "middle of this one")
            try:
                batch = next(self._batches, None)
            except Exception as error:  # e.g. too many bad samples: do not reuse these workers
                self._stop_workers()
                # without the iterator's frames, which would keep its workers alive as long
                # as the error is kept (a worker's own traceback is in the message)
                raise error.with_traceback(None) from None
            if batch is None:
                return
            yield batch_to_torch(batch)
            index += 1

    def release(self, batch: dict) -> None:
        """The receiver is done with ``batch``: the worker that made it may fill its image
        buffer with a later batch. Call it once nothing reads ``batch["images"]`` any more
        (``train.loop.run_loop`` does after each step); a batch not released keeps its
        pixels. Nothing happens for a batch that names no worker buffer (no
        ``"buffer"``: made in this process, validation, crops made on the device), for a
        batch of another loader or of workers stopped since, and the second time (the
        name is removed)."""
        name = batch.pop("buffer", None) if isinstance(batch, dict) else None
        if name is None or self.closed or self.returns is None:
            return
        source, worker, process, buffer, use = name
        if source == self.number and 0 <= worker < len(self.returns):
            self.returns[worker].put((process, buffer, use))

    @property
    def bad_counts(self) -> dict[str, int]:
        """Bad samples of the current epoch by reason, over every worker (so far): the
        counts the workers keep in shared memory."""
        return (self.reader.shared_bad_counts() or {}) if self.reader is not None else {}

    # ---------------------------------------------------------------- the workers

    def close(self) -> None:
        """Stop the workers (dropping the DataLoader and its iterator shuts its workers
        down and joins them: their CPU time is reaped). Closing twice does nothing."""
        if self.closed:
            return
        self.closed = True
        self._stop_workers()
        for returns in self.returns or ():
            returns.close()

    def __enter__(self) -> "Loader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        if getattr(self, "_pid", None) == os.getpid():  # not in a forked worker's copy
            self.close()

    def _stop_workers(self) -> None:
        self._batches = self._data_loader = None

    def _open(self) -> None:
        """The reader of the split (resolves its shards) and, where the workers crop the
        training split, their return queues."""
        cfg, train = self.cfg, self.split == "train"
        self.reader = _reader(cfg, self.split, self.rank, self.world_size, self.batch_size, self.seed)
        workers = cfg.data.loader_workers
        self.reader.share_counts(workers)
        if self.persistent:
            self.reader.share_position()
        if train and workers > 0 and not cfg.data.device_crop:  # validation: fresh buffers
            context = multiprocessing.get_context()  # the DataLoader's
            self.returns = [context.Queue() for _ in range(workers)]
            for returns in self.returns:
                returns.cancel_join_thread()  # exiting never waits for a stopped worker to read

    def _make_data_loader(self) -> DataLoader:
        """The DataLoader over the reader, its transform cropping (or, with
        ``data.device_crop``, only decoding) into the workers' batch buffers."""
        cfg, train = self.cfg, self.split == "train"
        # with data.device_crop the training workers only decode (device_crop.py);
        # validation always crops here, on the CPU
        device_crop = train and cfg.data.device_crop
        cropper = MultiRoICropper(schedule_from_config(cfg.rois), crop_size=cfg.data.crop_size,
                                  augment=cfg.data if train else None,
                                  root_joint=_root_joint(cfg.model.smpl_dir))
        workers = cfg.data.loader_workers
        prefetch = 2 if workers else None
        sink = None
        if workers > 0 and not device_crop:
            # a worker keeps what it has in flight and what the receiver holds, with margin
            item_shape = (cropper.num_rois, cropper.crop_size, cropper.crop_size, 3)
            sink = BatchSink(self.batch_size, item_shape, self.returns, self.number, keep=2 * prefetch + 2)
        prep = DeviceCropPrep(cropper) if device_crop else cropper
        self.reader.transform = CropTransform(prep, self.seed, sink=sink)
        collate = collate_regions if device_crop else collate_arrays
        # its own generator: starting an iteration never draws from the global torch RNG,
        # whose state a checkpoint restores for dropout (a resume would shift it)
        return DataLoader(self.reader, batch_size=self.batch_size, num_workers=workers,
                          collate_fn=_collate_batch(sink, collate),
                          drop_last=train, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.persistent, prefetch_factor=prefetch,
                          multiprocessing_context=multiprocessing.get_context() if workers else None,
                          generator=torch.Generator().manual_seed(self.seed))


class _collate_batch:
    """Collate (labels stay numpy until ``Loader`` receives the batch: cheaper to send
    from a worker) into the sink's buffer when there is one."""

    def __init__(self, sink: BatchSink | None = None, collate=collate_arrays):
        self.sink, self.collate = sink, collate

    def __call__(self, items):
        images, name = None, None
        taken = self.sink.take(len(items)) if self.sink is not None else None
        if taken is not None:  # crops already in place
            buffer, name = taken
            images = buffer if len(items) == buffer.shape[0] else buffer[:len(items)]
        batch = self.collate(items, images)
        if name is not None:
            batch["buffer"] = name  # for Loader.release
        batch["gender"] = [item["gender"] for item in items]
        if "source" in items[0]:  # a mixture names each item's shard set
            batch["sources"] = [item["source"] for item in items]
        return batch


def _reader(cfg, split: str, rank: int, world_size: int, batch_size: int, seed: int) -> Reader:
    """The split's ShardReader, or for a training mixture its MixtureReader."""
    sets = _sources(cfg, split)
    common = dict(seed=seed, shuffle_buffer=cfg.data.shuffle_buffer, rank=rank, world_size=world_size,
                  batch_size=batch_size, max_bad_fraction=cfg.data.max_bad_fraction, decode_images=False)
    if split == "train" and cfg.data.mixture:
        return MixtureReader({s.name: s.source for s in sets}, {s.name: s.weight for s in sets}, **common)
    train = split == "train"
    # training fills a bad sample's slot to keep ranks in step; validation and
    # evaluation score each good sample once and count the bad ones exactly
    return ShardReader(sets[0].source, shuffle=train, substitute_bad=train, **common)


@dataclass(frozen=True)
class ShardSet:
    """One shard set a config reads: the config key that names it (for messages), the
    set itself (manifest, folder, pattern; "" when unset), the split that reads it, and
    for a mixture source its name and weight."""

    key: str
    source: str
    split: str  # "train" | "val"
    name: str = ""
    weight: float = 1.0


def shard_sets(cfg, split: str | None = None) -> list[ShardSet]:
    """The shard sets a run of ``cfg`` reads, training first (``split``: only that split's).
    Training reads ``data.train_shards``, or each ``data.mixture`` source of positive
    weight (a weight-0 source is never opened); validation reads ``data.val_shards``.
    The pre-flight, ``raytrain doctor`` and the loader all ask this one function."""
    sets = []
    if split in (None, "train"):
        if cfg.data.mixture:
            sets += [ShardSet(f"data.mixture[{i}].shards ({m.name})", m.shards, "train", m.name, m.weight)
                     for i, m in enumerate(cfg.data.mixture) if m.weight > 0]
        else:
            sets.append(ShardSet("data.train_shards", cfg.data.train_shards, "train"))
    if split in (None, "val"):
        sets.append(ShardSet("data.val_shards", cfg.data.val_shards, "val"))
    return sets


def _sources(cfg, split: str) -> list[ShardSet]:
    """The shard sets `split` reads (ValueError naming the key of an unset one)."""
    sets = shard_sets(cfg, split)
    for shard_set in sets:
        if not shard_set.source:
            raise ValueError(f"{shard_set.key} is not set")
    return sets
