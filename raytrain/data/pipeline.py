"""What a training worker iterates: shards -> reader -> multi-RoI cropper -> batches.

    loader = build_loader(cfg, "train", rank, world_size, epoch, skip=0, batch_size=B, seed=0)
    for batch in loader:
        ...                     # CONVENTIONS.md batch; images uint8 (N, M, 3, S, S)
        loader.release(batch)   # its images are read no more: the worker may refill them

The reader splits every epoch by rank and by DataLoader worker and skips what a
checkpoint says was consumed; the cropper runs inside the DataLoader workers (decode and
crop scale with `data.loader_workers`, independent of the number of GPUs). Augmentation
is drawn from a generator seeded by (seed, epoch, sample key), so a resumed epoch crops
exactly as the interrupted one would have.

With `data.persistent_workers` (default) the workers are forked once per split and
serve every later epoch and validation pass of the same config (`EpochSource`): the
reader's position lives in shared memory and each `Loader` sets it before it iterates.
`close_loaders()` stops them (`train.loop.run_loop` does at its end).

The crops of a training batch arrive in a shared-memory buffer of the worker that made
it; `loader.release(batch)` (once the batch's images are no longer read:
`train.loop.run_loop` calls it after each step) hands the buffer back for the worker to
fill again (`collate.BatchSink`). A batch not released keeps its pixels.

With `data.device_crop` the workers of the training split only decode and draw the
augmentation (`device_crop.DeviceCropPrep`): a batch carries the decoded regions and
the crops are made after the move to the device (`train.loop.batch_to_device`).
Validation always crops in the workers.
"""
import itertools
import multiprocessing
import zlib
from collections.abc import Callable, Iterator
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..body.model import root_joint_model
from ..geometry import schedule_from_config
from .collate import BatchSink, BufferName, batch_to_torch, collate_arrays
from .crop import MultiRoICropper
from .device_crop import DeviceCropPrep, collate_regions
from .mixture import MixtureReader
from .reader import ShardReader
from .shards import count_samples, resolve_shards


def epoch_length(cfg, split: str, rank: int, world_size: int) -> int:
    """Samples each rank sees per epoch of `split` (the same on every rank): the largest
    source's per-rank length for a mixture (``MixtureReader``)."""
    return max(count_samples(source) for source in _sources(cfg, split)) // world_size


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


#: Numbers of the ``EpochSource`` objects of this process (the ``source`` of a buffer name).
_SOURCE_NUMBERS = itertools.count(1)


class EpochSource:
    """What iterates one rank's epochs of a split: the reader and its DataLoader.

    With ``persistent`` (``data.persistent_workers``), the DataLoader's worker processes
    are forked once and serve every later epoch: each ``Loader`` sets the reader's
    shared position (epoch, samples to skip) before it starts an iteration; forking the
    workers of a large training process costs ~0.1 s per epoch otherwise. One iteration
    at a time: ``owner`` is the ``Loader`` iterating now.

    When the workers crop the training split, each has a return queue (``returns``,
    made here before any worker starts, so every worker process inherits it): ``release``
    sends a batch's buffer name back through it (``collate.BatchSink``).
    """

    def __init__(self, cfg, split: str, rank: int, world_size: int, batch_size: int,
                 seed: int, persistent: bool):
        train = split == "train"
        # with data.device_crop the training workers only decode (device_crop.py);
        # validation always crops here, on the CPU
        device_crop = train and cfg.data.device_crop
        cropper = MultiRoICropper(schedule_from_config(cfg.rois), crop_size=cfg.data.crop_size,
                                  augment=cfg.data if train else None,
                                  root_joint=_root_joint(cfg.model.smpl_dir))
        self.reader = _reader(cfg, split, rank, world_size, batch_size, seed)
        workers = cfg.data.loader_workers
        # training fills a bad sample's slot to keep ranks in step; validation and
        # evaluation score each good sample once and count the bad ones exactly
        self.reader.share_counts(workers)
        self.persistent = persistent and workers > 0
        if self.persistent:
            self.reader.share_position()
        self.number = next(_SOURCE_NUMBERS)
        context = multiprocessing.get_context()  # the DataLoader's and the return queues'
        prefetch = 2 if workers else None
        self.returns = None
        if train and workers > 0 and not device_crop:  # validation: fresh buffers
            self.returns = [context.Queue() for _ in range(workers)]
            for returns in self.returns:
                returns.cancel_join_thread()  # exiting never waits for a stopped worker to read
        item_shape = (cropper.num_rois, cropper.crop_size, cropper.crop_size, 3)
        sink = None
        if workers > 0 and not device_crop:
            # a worker keeps what it has in flight and what the receiver holds, with margin
            sink = BatchSink(batch_size, item_shape, self.returns, self.number,
                             keep=2 * prefetch + 2)
        prep = DeviceCropPrep(cropper) if device_crop else cropper
        self.reader.transform = CropTransform(prep, seed, sink=sink)
        collate = collate_regions if device_crop else collate_arrays
        # its own generator: starting an iteration never draws from the global torch RNG,
        # whose state a checkpoint restores for dropout (a resume would shift it)
        self.loader = DataLoader(self.reader, batch_size=batch_size, num_workers=workers,
                                 collate_fn=_collate_batch(sink, collate),
                                 drop_last=train, pin_memory=torch.cuda.is_available(),
                                 persistent_workers=self.persistent, prefetch_factor=prefetch,
                                 multiprocessing_context=context if workers else None,
                                 generator=torch.Generator().manual_seed(seed))
        self.max_batches = None
        if not train and cfg.data.max_val_samples:
            self.max_batches = max(1, cfg.data.max_val_samples // world_size // batch_size)
        self.owner = None
        self.closed = False

    def release(self, name: BufferName) -> None:
        """Send a batch's buffer name back to the worker that made it (``Loader.release``);
        nothing for a name of another source, or once the workers are stopped."""
        source, worker, process, buffer, use = name
        if source != self.number or self.closed or self.returns is None:
            return
        if 0 <= worker < len(self.returns):
            self.returns[worker].put((process, buffer, use))

    def close(self) -> None:
        """Stop the persistent workers: dropping the DataLoader drops its iterator, which
        shuts its workers down and joins them (their CPU time is reaped)."""
        self.closed = True
        self.loader = None
        for returns in self.returns or ():
            returns.close()


class Loader:
    """One epoch of one rank (from a skip position) over an ``EpochSource``, plus the
    bad-sample counts of its workers."""

    def __init__(self, source: EpochSource, epoch: int, skip: int, rebuild=None):
        self.source, self.epoch, self.skip = source, int(epoch), int(skip)
        self._rebuild = rebuild  # -> a private EpochSource when the shared one is busy

    @property
    def reader(self) -> ShardReader | MixtureReader:
        return self.source.reader

    @property
    def loader(self) -> DataLoader:
        return self.source.loader

    @property
    def max_batches(self) -> int | None:
        return self.source.max_batches

    @property
    def bad_counts(self) -> dict[str, int]:
        """Bad samples of this epoch by reason, over every worker (so far): the counts the
        workers keep in shared memory (``EpochSource`` always shares them)."""
        return self.source.reader.shared_bad_counts()

    def __iter__(self) -> Iterator[dict]:
        source = self.source
        if source.persistent and (source.closed or source.owner not in (None, self)):
            # the shared workers iterate for another loader now (or were stopped)
            source = self.source = self._rebuild()
        source.owner = self
        source.reader.reset_shared_counts()
        source.reader.load_state_dict({"epoch": self.epoch, "consumed": self.skip})
        try:
            yield from self._batches(source)
        except Exception:
            if source.persistent:  # e.g. too many bad samples: do not reuse these workers
                _PERSISTENT.forget(source)
            raise
        finally:
            if source.owner is self:
                source.owner = None

    def _batches(self, source: EpochSource) -> Iterator[dict]:
        batches = iter(source.loader)
        for index, batch in enumerate(batches):
            if self.max_batches is not None and index >= self.max_batches:
                break
            yield batch_to_torch(batch)
            if source.closed:  # stopped under this iteration: the epoch cannot complete
                raise RuntimeError("the loader's workers were stopped (close_loaders) in the "
                                   "middle of an epoch; the epoch is incomplete")

    def release(self, batch: dict) -> None:
        """The receiver is done with ``batch``: the worker that made it may fill its image
        buffer with a later batch. Call it once nothing reads ``batch["images"]`` any more
        (``train.loop.run_loop`` does after each step); a batch not released keeps its
        pixels. Nothing happens for a batch that names no worker buffer (no
        ``"buffer"``: made in this process, validation, crops made on the device), for a
        batch of workers stopped since, and the second time (the name is removed)."""
        name = batch.pop("buffer", None) if isinstance(batch, dict) else None
        if name is not None:
            self.source.release(name)

    def close(self) -> None:
        """Stop the (persistent) workers this loader iterates with, e.g. after a one-off
        evaluation pass; a later ``build_loader`` forks new ones."""
        if self.source.persistent:
            _PERSISTENT.forget(self.source)

    def __len__(self):
        n = len(self.loader)
        return n if self.max_batches is None else min(n, self.max_batches)


class PersistentSources:
    """The persistent ``EpochSource`` of each split in this process, with the key it was
    built for (data and RoI config, body model, split, rank, world size, batch size, seed,
    resolved shard list).

    A split holds no source, or one that is *idle* (its workers wait between iterations)
    or *iterating* for one ``Loader`` (``source.owner``). ``get`` returns the source held
    for a key (idle or iterating: an iterating one makes the new ``Loader`` build private
    workers when it starts); ``hold`` replaces what a split held, stopping it first, by a
    new source; ``forget`` stops a source's workers and drops it (an error in its
    iteration, ``Loader.close``); ``close`` forgets them all (``close_loaders``). A
    forgotten source is *closed*: a ``Loader`` still referring to it builds private
    workers.
    """

    def __init__(self):
        self._held: dict[str, tuple[tuple, EpochSource]] = {}

    def __len__(self) -> int:
        return len(self._held)

    def get(self, split: str, key: tuple) -> EpochSource | None:
        held = self._held.get(split)
        if held is not None and held[0] == key and not held[1].closed:
            return held[1]
        return None

    def iterating(self, split: str) -> bool:
        """True while the source held for ``split`` iterates for a ``Loader``."""
        held = self._held.get(split)
        return held is not None and held[1].owner is not None

    def hold(self, split: str, key: tuple, build: Callable[[], EpochSource]) -> EpochSource:
        """``build()`` as the source of ``split`` for ``key``; the one it replaces stops first."""
        held = self._held.get(split)
        if held is not None:
            self.forget(held[1])
        source = build()
        self._held[split] = (key, source)
        return source

    def forget(self, source: EpochSource) -> None:
        """Stop ``source``'s workers and drop it."""
        for split, (_, held) in list(self._held.items()):
            if held is source:
                del self._held[split]
        source.close()

    def close(self) -> None:
        for _, source in list(self._held.values()):
            self.forget(source)


_PERSISTENT = PersistentSources()


def build_loader(cfg, split: str, rank: int, world_size: int, epoch: int, skip: int,
                 batch_size: int, seed: int = 0) -> Loader:
    """One epoch of `split` ('train' or 'val') for one rank, resuming after `skip` samples.

    With ``data.persistent_workers`` (and ``data.loader_workers`` > 0), successive calls
    with the same config, rank, batch size and seed (and the same shard set on disk)
    share one set of DataLoader workers; ``close_loaders()`` stops them.
    """
    args = (split, rank, world_size, batch_size, seed)

    def private() -> EpochSource:
        return EpochSource(cfg, *args, persistent=False)

    if not (cfg.data.persistent_workers and cfg.data.loader_workers > 0):
        return Loader(private(), epoch, skip, private)
    key = (repr(cfg.data), repr(cfg.rois), cfg.model.smpl_dir, *args,
           tuple((ref.url, ref.num_samples) for source in _sources(cfg, split)
                 for ref in resolve_shards(source)))
    source = _PERSISTENT.get(split, key)
    if source is None and _PERSISTENT.iterating(split):  # another key, still iterating
        return Loader(private(), epoch, skip, private)
    if source is None:  # first use, or another config, shard set, rank or batch size
        source = _PERSISTENT.hold(split, key, lambda: EpochSource(cfg, *args, persistent=True))
    return Loader(source, epoch, skip, private)


def close_loaders() -> None:
    """Stop every persistent DataLoader worker of this process (e.g. after training)."""
    _PERSISTENT.close()


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


def _reader(cfg, split: str, rank: int, world_size: int, batch_size: int, seed: int):
    """The split's ShardReader, or for a training mixture its MixtureReader."""
    train = split == "train"
    if _mixture(cfg, split):
        mixture = cfg.data.mixture
        return MixtureReader({m.name: m.shards for m in mixture}, {m.name: m.weight for m in mixture},
                             seed=seed, shuffle_buffer=cfg.data.shuffle_buffer, rank=rank,
                             world_size=world_size, batch_size=batch_size,
                             max_bad_fraction=cfg.data.max_bad_fraction, decode_images=False)
    return ShardReader(_source(cfg, split), seed=seed, shuffle=train,
                       shuffle_buffer=cfg.data.shuffle_buffer, rank=rank, world_size=world_size,
                       batch_size=batch_size, max_bad_fraction=cfg.data.max_bad_fraction,
                       decode_images=False, substitute_bad=train)


def _mixture(cfg, split: str) -> bool:
    return split == "train" and bool(cfg.data.mixture)


def _sources(cfg, split: str) -> list[str]:
    """Every shard set `split` reads."""
    if _mixture(cfg, split):
        return [m.shards for m in cfg.data.mixture if m.weight > 0]
    return [_source(cfg, split)]


def _source(cfg, split: str) -> str:
    source = cfg.data.train_shards if split == "train" else cfg.data.val_shards
    if not source:
        raise ValueError(f"data.{split}_shards is not set")
    return source
