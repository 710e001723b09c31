"""What a training worker iterates: shards -> reader -> multi-RoI cropper -> batches.

    loader = build_loader(cfg, "train", rank, world_size, epoch, skip=0, batch_size=B, seed=0)
    for batch in loader: ...   # CONVENTIONS.md batch; images uint8 (N, M, 3, S, S)

The reader splits every epoch by rank and by DataLoader worker and skips what a
checkpoint says was consumed; the cropper runs inside the DataLoader workers (decode and
crop scale with `data.loader_workers`, independent of the number of GPUs). Augmentation
is drawn from a generator seeded by (seed, epoch, sample key), so a resumed epoch crops
exactly as the interrupted one would have.

With `data.persistent_workers` (default) the workers are forked once per split and
serve every later epoch and validation pass of the same config (`EpochSource`): the
reader's position lives in shared memory and each `Loader` sets it before it iterates.
`close_loaders()` stops them (`train.loop.run_loop` does at its end).
"""
import zlib
from collections import Counter
from collections.abc import Iterator
from functools import lru_cache

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..body.model import root_joint_model
from ..geometry import build_schedule
from .augment import AugmentConfig
from .collate import FREE, BatchPool, BatchSink, batch_to_torch, collate_arrays
from .crop import MultiRoICropper
from .reader import ShardReader
from .shards import count_samples, resolve_shards


def epoch_length(cfg, split: str, rank: int, world_size: int) -> int:
    """Samples each rank sees per epoch of `split` (the same on every rank)."""
    return count_samples(_source(cfg, split)) // world_size


def schedule_from_config(rois):
    """The RoI schedule of a `RoIConfig`."""
    if rois.schedule == "random":
        return build_schedule("random", rois.num_rois, max_offset=rois.max_offset,
                              scale_min=rois.scale_min, scale_max=rois.scale_max)
    return build_schedule("fixed", rois.num_rois, offset=rois.offset, scales=tuple(rois.scales))


def augment_from_config(data) -> AugmentConfig:
    return AugmentConfig(scale_factor=data.scale_jitter, rot_factor=data.rot_jitter_deg,
                         rot_prob=0.4 if data.rot_jitter_deg > 0 else 0.0,
                         flip_prob=data.flip_prob, color_noise=data.color_jitter,
                         occlusion_prob=data.occlusion_prob, roi_color_noise=data.roi_color_jitter)


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
        return out

    def substitute(self, item):
        """The reader yields ``item`` again in place of a bad sample (see ``BatchSink``)."""
        return self.sink.substitute(item) if self.sink is not None else item


class EpochSource:
    """What iterates one rank's epochs of a split: reader, DataLoader, buffer pool.

    With ``persistent`` (``data.persistent_workers``), the DataLoader's worker processes
    are forked once and serve every later epoch: each ``Loader`` sets the reader's
    shared position (epoch, samples to skip) before it starts an iteration; forking the
    workers of a large training process costs ~0.1 s per epoch otherwise. One iteration
    at a time: ``owner`` is the ``Loader`` iterating now.
    """

    def __init__(self, cfg, split: str, rank: int, world_size: int, batch_size: int,
                 seed: int, persistent: bool):
        train = split == "train"
        cropper = MultiRoICropper(schedule_from_config(cfg.rois), crop_size=cfg.data.crop_size,
                                  augment=augment_from_config(cfg.data) if train else None,
                                  root_joint=_root_joint(cfg.model.smpl_dir))
        self.reader = ShardReader(_source(cfg, split), seed=seed, shuffle=train,
                                  shuffle_buffer=cfg.data.shuffle_buffer, rank=rank,
                                  world_size=world_size, batch_size=batch_size,
                                  max_bad_fraction=cfg.data.max_bad_fraction,
                                  decode_images=False)
        workers = cfg.data.loader_workers
        self.persistent = persistent and workers > 0
        if self.persistent:
            self.reader.share_position()
        prefetch = 2
        # per worker: `prefetch` batches in flight, one being filled, one held by the
        # training loop, one spare; a batch that finds no free buffer gets a fresh one
        item_shape = (cropper.num_rois, cropper.crop_size, cropper.crop_size, 3)
        self.pool = (BatchPool.acquire(workers, prefetch + 3, (batch_size, *item_shape))
                     if workers else None)
        sink = BatchSink(self.pool, batch_size, item_shape) if workers else None
        self.reader.transform = CropTransform(cropper, seed, sink=sink)
        self.loader = DataLoader(self.reader, batch_size=batch_size, num_workers=workers,
                                 collate_fn=_collate_with_counts(self.reader, self.pool, sink),
                                 drop_last=train, pin_memory=torch.cuda.is_available(),
                                 persistent_workers=self.persistent,
                                 prefetch_factor=prefetch if workers else None)
        if self.pool is not None:
            self.pool.claim(self)
        self.max_batches = None
        if not train and cfg.data.max_val_samples:
            self.max_batches = max(1, cfg.data.max_val_samples // world_size // batch_size)
        self.owner = None
        self.closed = False

    def ensure_pool(self) -> None:
        """Before an iteration: keep the pool, or take another when this (non-persistent)
        source recycled it at an epoch's end and another source has claimed it since. A
        persistent source holds its pool for its workers' life."""
        if self.pool is None or self.pool.claim(self):
            return
        pool = BatchPool.acquire(self.pool.num_workers, self.pool.size, self.pool.shape)
        pool.claim(self)
        self.pool = self.loader.collate_fn.pool = pool
        if self.loader.collate_fn.sink is not None:
            self.loader.collate_fn.sink.pool = pool

    def close(self) -> None:
        """Stop the persistent workers (joined: their CPU time is reaped)."""
        self.closed = True
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None
        if self.persistent:
            self.pool.recycle()  # its workers are gone: a later loader may take it


class Loader:
    """One epoch of one rank (from a skip position) over an ``EpochSource``, plus the
    bad-sample counts of its workers."""

    def __init__(self, source: EpochSource, epoch: int, skip: int, rebuild=None):
        self.source, self.epoch, self.skip = source, int(epoch), int(skip)
        self._rebuild = rebuild  # -> a private EpochSource when the shared one is busy
        self._bad_by_worker: dict[int, Counter] = {}

    @property
    def reader(self) -> ShardReader:
        return self.source.reader

    @property
    def loader(self) -> DataLoader:
        return self.source.loader

    @property
    def pool(self) -> BatchPool | None:
        return self.source.pool

    @property
    def max_batches(self) -> int | None:
        return self.source.max_batches

    @property
    def bad_counts(self) -> dict[str, int]:
        total = Counter()
        for counts in self._bad_by_worker.values():
            total.update(counts)
        return dict(total)

    def __iter__(self) -> Iterator[dict]:
        source = self.source
        if source.persistent and (source.closed or source.owner not in (None, self)):
            # the shared workers iterate for another loader now (or were stopped)
            source = self.source = self._rebuild()
        source.ensure_pool()
        source.owner = self
        self._bad_by_worker = {}
        source.reader.load_state_dict({"epoch": self.epoch, "consumed": self.skip})
        try:
            yield from self._batches(source)
        except Exception:
            if source.persistent:  # e.g. too many bad samples: do not reuse these workers
                _forget(source)
            raise
        finally:
            if source.owner is self:
                source.owner = None

    def _batches(self, source: EpochSource) -> Iterator[dict]:
        pool = source.pool
        for index, batch in enumerate(source.loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            worker, counts = batch.pop("bad_counts", (0, {}))
            self._bad_by_worker[worker] = Counter(counts)
            slot = batch.pop("pool_slot", (-1, -1))
            if pool is not None:
                if source.loader.pin_memory:  # the images were copied to pinned memory
                    pool.release(slot)
                else:
                    pool.received(slot, batch["images"])
                pool.release_unused()
            yield batch_to_torch(batch)
        else:  # the DataLoader iterator ran out: without persistence, its workers exited
            if source.closed:  # stopped under this iteration: torch ends it without error
                raise RuntimeError("the loader's workers were stopped (close_loaders) in the "
                                   "middle of an epoch; the epoch is incomplete")
            if pool is not None and self.max_batches is None and not source.persistent:
                pool.recycle()

    def close(self) -> None:
        """Stop the (persistent) workers this loader iterates with, e.g. after a one-off
        evaluation pass; a later ``build_loader`` forks new ones."""
        if self.source.persistent:
            _forget(self.source)

    def __len__(self):
        n = len(self.loader)
        return n if self.max_batches is None else min(n, self.max_batches)


#: The persistent ``EpochSource`` of each split, with the arguments it was built for.
_PERSISTENT: dict[str, tuple] = {}


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
           tuple((ref.url, ref.num_samples) for ref in resolve_shards(_source(cfg, split))))
    cached = _PERSISTENT.get(split)
    if cached is not None and cached[0] == key and not cached[1].closed:
        return Loader(cached[1], epoch, skip, private)
    if cached is not None and cached[1].owner is not None:  # iterating for another loader
        return Loader(private(), epoch, skip, private)
    if cached is not None:  # another config, shard set, rank or batch size: replace it
        _forget(cached[1])
    source = EpochSource(cfg, *args, persistent=True)
    _PERSISTENT[split] = (key, source)
    return Loader(source, epoch, skip, private)


def _forget(source: EpochSource) -> None:
    """Stop a persistent source's workers and drop it from the cache."""
    for split, (_, cached) in list(_PERSISTENT.items()):
        if cached is source:
            del _PERSISTENT[split]
    source.close()


def close_loaders() -> None:
    """Stop every persistent DataLoader worker of this process (e.g. after training)."""
    for _, source in list(_PERSISTENT.values()):
        _forget(source)


class _collate_with_counts:
    """Collate (labels stay numpy until ``Loader`` receives the batch: cheaper to send
    from a worker), and attach this worker's bad-sample counts of the epoch so far."""

    def __init__(self, reader, pool: BatchPool | None = None, sink: BatchSink | None = None):
        self.reader, self.pool, self.sink = reader, pool, sink

    def __call__(self, items):
        images, spare = None, None
        taken = self.sink.take() if self.sink is not None else None
        if taken is not None and taken[2] == len(items):  # crops already in place
            slot, buffer, _ = taken
            images = buffer if len(items) == buffer.shape[0] else buffer[:len(items)]
        elif self.pool is not None:
            if taken is not None:
                spare = taken[0]  # not what was yielded: copy, then free it
            slot, images = self.pool.buffer((len(items), *items[0]["images"].shape))
        batch = collate_arrays(items, images)
        if spare is not None and spare[0] >= 0:
            self.pool.state[spare] = FREE  # never sent
        if self.pool is not None:
            batch["pool_slot"] = slot
        batch["gender"] = [item["gender"] for item in items]
        info = torch.utils.data.get_worker_info()
        reader = info.dataset if info is not None else self.reader
        batch["bad_counts"] = (info.id if info is not None else -1, dict(reader.bad_counts))
        return batch


def _source(cfg, split: str) -> str:
    source = cfg.data.train_shards if split == "train" else cfg.data.val_shards
    if not source:
        raise ValueError(f"data.{split}_shards is not set")
    return source
