"""What a training worker iterates: shards -> reader -> multi-RoI cropper -> batches.

    loader = build_loader(cfg, "train", rank, world_size, epoch, skip=0, batch_size=B, seed=0)
    for batch in loader: ...   # CONVENTIONS.md batch; images uint8 (N, M, 3, S, S)

The reader splits every epoch by rank and by DataLoader worker and skips what a
checkpoint says was consumed; the cropper runs inside the DataLoader workers (decode and
crop scale with `data.loader_workers`, independent of the number of GPUs). Augmentation
is drawn from a generator seeded by (seed, epoch, sample key), so a resumed epoch crops
exactly as the interrupted one would have.
"""
import zlib
from collections import Counter
from functools import lru_cache
from typing import Dict, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..geometry import build_schedule
from .augment import AugmentConfig, root_joint_model
from .collate import BatchPool, BatchSink, batch_to_torch, collate_arrays
from .crop import MultiRoICropper
from .reader import ShardReader, resolve_shards


def count_samples(source: str) -> int:
    """Samples in a shard set (manifest counts, else read once)."""
    return sum(ref.num_samples for ref in resolve_shards(source))


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
                         occlusion_prob=data.occlusion_prob)


@lru_cache(maxsize=4)
def _root_joint(smpl_dir: Optional[str]):
    from ..body import load_body_model
    return root_joint_model(load_body_model(smpl_dir))


class CropTransform:
    """Picklable per-sample transform run inside the reader: sample -> cropped dict."""

    def __init__(self, cropper: MultiRoICropper, seed: int, epoch: int,
                 sink: Optional[BatchSink] = None):
        self.cropper, self.seed, self.epoch = cropper, seed, epoch
        self.sink = sink  # in DataLoader workers: crops go straight into the batch buffer

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


class Loader:
    """A DataLoader over one epoch of one rank, plus the bad-sample counts of its workers."""

    def __init__(self, reader: ShardReader, loader: DataLoader, max_batches: Optional[int],
                 pool: Optional[BatchPool] = None):
        self.reader, self.loader, self.max_batches = reader, loader, max_batches
        self.pool = pool
        if pool is not None:
            pool.claim(self)
        self._bad_by_worker: Dict[int, Counter] = {}

    @property
    def bad_counts(self) -> Dict[str, int]:
        total = Counter()
        for counts in self._bad_by_worker.values():
            total.update(counts)
        return dict(total)

    def __iter__(self) -> Iterator[dict]:
        if self.pool is not None and not self.pool.claim(self):
            # recycled after an earlier iteration and taken by another loader since
            pool = BatchPool.acquire(self.pool.num_workers, self.pool.size, self.pool.shape)
            pool.claim(self)
            self.pool = self.loader.collate_fn.pool = pool
            if self.loader.collate_fn.sink is not None:
                self.loader.collate_fn.sink.pool = pool
        for index, batch in enumerate(self.loader):
            if self.max_batches is not None and index >= self.max_batches:
                break
            worker, counts = batch.pop("bad_counts", (0, {}))
            self._bad_by_worker[worker] = Counter(counts)
            slot = batch.pop("pool_slot", (-1, -1))
            if self.pool is not None:
                if self.loader.pin_memory:  # the images were copied to pinned memory
                    self.pool.release(slot)
                else:
                    self.pool.received(slot, batch["images"])
                self.pool.release_unused()
            yield batch_to_torch(batch)
        else:  # the DataLoader iterator ran out: its workers have exited
            if self.pool is not None and self.max_batches is None:
                self.pool.recycle()

    def __len__(self):
        n = len(self.loader)
        return n if self.max_batches is None else min(n, self.max_batches)


def build_loader(cfg, split: str, rank: int, world_size: int, epoch: int, skip: int,
                 batch_size: int, seed: int = 0) -> Loader:
    """One epoch of `split` ('train' or 'val') for one rank, resuming after `skip` samples."""
    train = split == "train"
    cropper = MultiRoICropper(schedule_from_config(cfg.rois), crop_size=cfg.data.crop_size,
                              augment=augment_from_config(cfg.data) if train else None,
                              root_joint=_root_joint(cfg.model.smpl_dir))
    reader = ShardReader(_source(cfg, split), seed=seed, shuffle=train,
                         shuffle_buffer=cfg.data.shuffle_buffer, rank=rank, world_size=world_size,
                         batch_size=batch_size, max_bad_fraction=cfg.data.max_bad_fraction,
                         decode_images=False, epoch=epoch)
    reader.load_state_dict({"epoch": epoch, "consumed": skip})
    workers = cfg.data.loader_workers
    prefetch = 2
    # per worker: `prefetch` batches in flight, one being filled, one held by the training
    # loop, one spare; a batch that finds no free buffer gets a fresh one
    item_shape = (cropper.num_rois, cropper.crop_size, cropper.crop_size, 3)
    pool = BatchPool.acquire(workers, prefetch + 3, (batch_size, *item_shape)) if workers else None
    sink = BatchSink(pool, batch_size, item_shape) if workers else None
    reader.transform = CropTransform(cropper, seed, epoch, sink)
    loader = DataLoader(reader, batch_size=batch_size, num_workers=workers,
                        collate_fn=_collate_with_counts(reader, pool, sink), drop_last=train,
                        pin_memory=torch.cuda.is_available(),
                        persistent_workers=False, prefetch_factor=prefetch if workers else None)
    max_batches = None
    if not train and cfg.data.max_val_samples:
        max_batches = max(1, cfg.data.max_val_samples // world_size // batch_size)
    return Loader(reader, loader, max_batches, pool)


class _collate_with_counts:
    """Collate (labels stay numpy until ``Loader`` receives the batch: cheaper to send
    from a worker), and attach this worker's cumulative bad-sample counts."""

    def __init__(self, reader, pool: Optional[BatchPool] = None, sink: Optional[BatchSink] = None):
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
            self.pool.state[spare] = 0  # only this worker sets its slots to 1
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
