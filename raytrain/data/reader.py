"""Streaming reader over tar shards: shuffled, split by rank and worker, resumable, robust.

    reader = ShardReader("s3://bucket/3dpw-train", seed=0, rank=r, world_size=R,
                         batch_size=B, storage_options={...})
    reader.set_epoch(epoch)
    for sample in reader: ...             # decoded ``schema.Sample``s, image RGB uint8

**Order.** Each epoch permutes the shard order with ``(seed, epoch)``; the permuted
shards laid end to end form the epoch's global sequence, whose length comes from the
manifest counts. Rank ``r`` takes the contiguous slice ``[r*L, (r+1)*L)`` with
``L = total // world_size``: every rank yields exactly ``L`` samples, and the last
``total - world_size*L`` samples of the sequence (different ones each epoch when
shuffling) are dropped. Inside a rank, DataLoader worker ``w`` reads a contiguous
sub-range (so each sample is read by one process only, and most shards by one worker
from start to end), passes it through a shuffle buffer seeded with
``(seed, epoch, rank, w)``, and decodes after the buffer.

**Position.** Worker ``w`` owns the rank-local output positions ``j`` with
``(j // batch_size) % num_workers == w``: exactly the order in which a torch
DataLoader (``batch_size``, ``num_workers``) hands out its batches. So "``consumed``
samples of epoch ``e`` on this rank" (``state_dict``) maps to a number of positions
each worker skips, without decoding, on resume: nothing of the epoch is repeated or
skipped, and the rest of the epoch comes in the same order as without the interruption
(with DataLoader workers: when ``consumed`` is a multiple of ``batch_size``, i.e. the
position is saved between batches; otherwise still no repeat or skip, order aside). With
``num_workers=0`` the reader counts yields itself; with workers, call
``advance(n)`` in the training loop for every batch of ``n`` samples received.

**Bad data.** A corrupt tar member, an undecodable JPEG, non-finite labels, a box
outside the image, a missing member, bad json or arrays: skipped and counted by reason
in ``bad_counts`` (this process), reported at epoch end through ``logging``. To keep
every rank's count equal, a bad sample's output position is filled with the previous
good sample (``substitute_bad=True``, counted in ``substituted``). If the bad samples
of a process's epoch exceed ``max_bad_fraction`` of what it reads that epoch,
``TooManyBadSamples`` names the shard holding most of them. A manifest with an unknown
schema version, or one that disagrees with its shards, is refused (``SchemaError``,
``ManifestError``): those are not skipped, they stop the run.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch
from torch.utils.data import IterableDataset, get_worker_info

from .errors import DataError, ManifestError, TooManyBadSamples, too_many_bad
from .formats.tar import CORRUPT_FLAG, tar_samples
from .io import open_url
from .plan import WorkerPlan, buffer_shuffle, epoch_shard_order, plan_worker
from .schema import BAD_REASONS, BadSample, Sample, SchemaError, decode_sample, member_limit
from .shards import ShardRef, resolve_shards

__all__ = ["ShardReader", "TooManyBadSamples", "read_shard_range"]

log = logging.getLogger(__name__)


LOST_FLAG = "__lost__"  # a sample the manifest promises but the tar did not deliver


def read_shard_range(ref: ShardRef, first: int, end: int, storage_options: dict | None,
                     on_lost: Callable[[str, int], None] | None = None) -> Iterator[dict]:
    """Raw samples ``first..end-1`` of a shard, always exactly ``end - first`` of them.

    Samples the tar cannot deliver (truncated or unreadable shard) come as placeholders
    flagged ``LOST_FLAG`` so that they are counted as ``corrupt_member``; ``on_lost(shard,
    n)`` is told of the whole lost tail at once, before its first placeholder. A range that
    ends at the shard's end checks that the tar holds nothing more: a shard with more
    samples than its manifest records raises ``ManifestError`` (they would be lost).
    """
    delivered, surplus = 0, False
    try:
        with open_url(ref.url, "rb", storage_options) as handle:
            for index, raw in enumerate(tar_samples(handle, member_limit)):
                if index >= end:
                    surplus = index >= ref.num_samples
                    break
                if index >= first:
                    raw["__shard__"] = ref.name
                    delivered += 1
                    yield raw
    except Exception as error:  # unreadable shard (missing file, network): count its samples
        log.warning("shard %s unreadable after %d samples: %s", ref.url, delivered, error)
    if surplus:
        raise ManifestError(
            f"shard {ref.url} holds more than the {ref.num_samples} samples its manifest "
            f"records: the manifest is stale or wrong (re-run the conversion with --overwrite)",
            shard=ref.name)
    if on_lost is not None and first + delivered < end:
        on_lost(ref.name, end - first - delivered)
    for index in range(first + delivered, end):
        yield {"__key__": f"{ref.name}#{index}", "__shard__": ref.name, LOST_FLAG: on_lost is None or "counted"}


# ============================================================================ the reader


class _Position:
    """``ShardReader.epoch`` / ``.consumed``: a plain int, or slot ``index`` of the shared
    position tensor once ``share_position`` made one."""

    def __init__(self, index: int):
        self.index = index

    def __set_name__(self, owner, name: str) -> None:
        self.private = "_" + name

    def __get__(self, reader, owner=None):
        if reader is None:
            return self
        shared = reader._position
        return int(shared[self.index]) if shared is not None else getattr(reader, self.private)

    def __set__(self, reader, value) -> None:
        if reader._position is not None:
            reader._position[self.index] = int(value)
        setattr(reader, self.private, int(value))


@runtime_checkable
class Reader(Protocol):
    """What ``pipeline.Loader`` uses of a reader: ``ShardReader`` and
    ``mixture.MixtureReader`` (which forwards it to its sources' readers) both have it."""

    batch_size: int
    transform: Callable[[Any], Any] | None  # run on each good sample, in the reading process

    def __iter__(self) -> Iterator[Any]: ...
    def __len__(self) -> int: ...  # samples per epoch on this rank
    def load_state_dict(self, state: dict) -> None: ...  # the position: epoch, consumed
    def share_position(self) -> None: ...  # see EpochPosition.share_position
    def share_counts(self, num_processes: int) -> None: ...  # bad-sample counts in shared memory
    def reset_shared_counts(self) -> None: ...
    def shared_bad_counts(self) -> dict[str, int] | None: ...
    def reset_counts(self) -> None: ...  # this process's counts


class Iteration(NamedTuple):
    """Where one iteration of a reader starts (``EpochPosition.start_iteration``)."""

    epoch: int
    consumed: int       # samples of the epoch already consumed on this rank
    role: int           # the worker whose positions this process reads (see ShardReader.__iter__)
    num_workers: int
    counting: bool      # no DataLoader workers: the reader counts its yields in ``consumed``


class EpochPosition(IterableDataset):
    """What both readers (``ShardReader``, ``mixture.MixtureReader``) keep of where they
    are: the epoch, and the samples of it already consumed on this rank; and how each of
    their iterations starts from it (``start_iteration``, ``counted``).

    The rest of a reader's surface is the ``Reader`` protocol (``start_iteration`` uses
    its ``batch_size``, ``transform``, ``__len__`` and ``reset_counts``)."""

    epoch = _Position(0)
    consumed = _Position(1)
    _position: torch.Tensor | None = None  # see ``share_position``

    def start_iteration(self) -> Iteration:
        """The prologue of every iteration, in the process that iterates: a DataLoader
        worker's counts start afresh (workers may persist across epochs); without workers
        an epoch read to its end rolls over to the next; the position is read once (it
        may be shared memory); the transform's ``start_epoch(epoch)`` is called."""
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if info is not None:
            self.reset_counts()
        if info is None and len(self) and self.consumed >= len(self):
            self.epoch, self.consumed = self.epoch + 1, 0  # previous epoch was complete
        epoch, consumed = self.epoch, self.consumed
        # A fresh DataLoader starts its round robin at worker 0: after a resume, worker 0
        # plays the part of the worker that owns the next batch, so ownership never moves.
        role = (worker + consumed // self.batch_size) % num_workers
        start_epoch = getattr(self.transform, "start_epoch", None)
        if start_epoch is not None:
            start_epoch(epoch)
        return Iteration(epoch, consumed, role, num_workers, counting=info is None)

    def counted(self, items: Iterator[Any], iteration: Iteration) -> Iterator[Any]:
        """``items``, each counted in ``consumed`` when the reader counts its own yields
        (with DataLoader workers the training loop calls ``advance``)."""
        if not iteration.counting:
            yield from items
            return
        for item in items:
            self.consumed += 1
            yield item

    def share_position(self) -> None:
        """Keep ``epoch`` and ``consumed`` in shared memory from now on, so that
        persistent DataLoader workers (forked once, iterating again each epoch) start
        every iteration at what this process set before it called ``iter(loader)``."""
        if self._position is None:
            position = torch.tensor([self.epoch, self.consumed], dtype=torch.int64)
            self._position = position.share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch (resets the position unless it is the current epoch)."""
        if int(epoch) != self.epoch:
            self.epoch, self.consumed = int(epoch), 0

    def advance(self, num_samples: int) -> None:
        """Record ``num_samples`` consumed on this rank (when DataLoader workers iterate)."""
        self.consumed += int(num_samples)

    def state_dict(self) -> dict:
        """The data position: epoch and samples of it already consumed on this rank (with
        the seed, world size and batch size it depends on)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size}


class ShardReader(EpochPosition):
    """Iterable over decoded ``Sample``s of a shard set; see the module docstring.

    Args:
        source: manifest URL, shard directory, brace pattern or list of tar URLs.
        seed: base seed of the shard order and the shuffle buffers.
        shuffle: permute shards and shuffle samples (False: manifest order).
        shuffle_buffer: samples held by each worker's shuffle buffer (raw bytes).
        rank, world_size: DDP split; default from ``torch.distributed`` if initialised.
        batch_size: the DataLoader batch size (only matters with DataLoader workers:
            it decides which worker owns which position, for exact resume).
        max_bad_fraction: bad fraction of an epoch's samples that stops the run
            (checked per reading process against its share of the epoch).
        substitute_bad: fill a bad sample's position with the previous good sample so
            every rank yields the same count; False drops it.
        decode_images: decode JPEGs (``Sample.image``, RGB); False only checks markers
            (for a cropper that decodes at reduced size itself).
        transform: optional ``f(sample) -> item`` run on each good sample inside the
            reader (e.g. the multi-RoI cropper; it must not return None); a ``BadSample``
            it raises is counted, skipped and substituted like any other, and the reader
            yields its items. With a ``substitute(item)`` method, a bad sample's
            position gets ``substitute(previous item)`` instead of the item itself;
            with a ``start_epoch(epoch)`` method, it is called at the start of every
            iteration, in the process that iterates.
        storage_options: fsspec options for remote URLs.
        epoch: the first epoch.
    """


    def __init__(
        self,
        source: str | Sequence[str],
        *,
        seed: int = 0,
        shuffle: bool = True,
        shuffle_buffer: int = 500,
        rank: int | None = None,
        world_size: int | None = None,
        batch_size: int = 1,
        max_bad_fraction: float = 0.05,
        substitute_bad: bool = True,
        decode_images: bool = True,
        storage_options: dict | None = None,
        epoch: int = 0,
        transform: Callable[[Sample], Any] | None = None,
    ):
        super().__init__()
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.storage_options = storage_options
        self.shards = resolve_shards(source, storage_options)
        self.total = sum(ref.num_samples for ref in self.shards)
        if self.total < self.world_size:
            raise ValueError(f"{source}: {self.total} samples cannot feed {self.world_size} ranks")
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), shuffle, int(shuffle_buffer)
        self.batch_size = int(batch_size)
        self.max_bad_fraction = float(max_bad_fraction)
        self.substitute_bad, self.decode_images = substitute_bad, decode_images
        self.transform = transform
        self.epoch, self.consumed = int(epoch), 0
        self.bad_counts: Counter = Counter()
        self.substituted = 0
        self._shared_counts: torch.Tensor | None = None  # see ``share_counts``

    def share_counts(self, num_processes: int) -> None:
        """Also count bad samples by reason in shared memory, one row per DataLoader
        worker (row 0 without workers): ``shared_bad_counts()`` then sees every count of
        the epoch, including those after a worker's last batch."""
        if self._shared_counts is None:
            rows = max(1, int(num_processes))
            self._shared_counts = torch.zeros((rows, len(BAD_REASONS)), dtype=torch.int64).share_memory_()

    def reset_shared_counts(self) -> None:
        if self._shared_counts is not None:
            self._shared_counts.zero_()

    def shared_bad_counts(self) -> dict[str, int] | None:
        """Bad samples by reason over every process since ``reset_shared_counts``."""
        if self._shared_counts is None:
            return None
        totals = self._shared_counts.sum(dim=0).tolist()
        return {reason: int(n) for reason, n in zip(BAD_REASONS, totals) if n}

    # ---------------------------------------------------------------- size and position

    def __len__(self) -> int:
        """Samples every rank yields per epoch: ``total // world_size``."""
        return self.total // self.world_size

    @property
    def dropped_per_epoch(self) -> int:
        """Samples of each epoch that no rank sees (the tail of the shuffled sequence)."""
        return self.total - len(self) * self.world_size

    def load_state_dict(self, state: dict) -> None:
        """Resume at a saved position (the next iteration skips what was consumed)."""
        for name in ("seed", "world_size", "batch_size"):
            if name in state and state[name] != getattr(self, name):
                log.warning(
                    "resuming data position saved with %s=%s under %s=%s: the epoch's "
                    "split differs, samples may repeat or be skipped this epoch",
                    name, state[name], name, getattr(self, name),
                )
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    # ---------------------------------------------------------------- iteration

    def reset_counts(self) -> None:
        """This process's bad-sample counts start afresh."""
        self.bad_counts, self.substituted = Counter(), 0

    def __iter__(self) -> Iterator[Any]:
        it = self.start_iteration()
        counts = [ref.num_samples for ref in self.shards]
        order = epoch_shard_order(len(self.shards), self.seed, it.epoch, self.shuffle)
        plan = plan_worker(counts, order, self.rank, self.world_size, it.role, it.num_workers,
                           self.batch_size, it.consumed)
        yield from self.counted(self._stream(plan, it.role, it.epoch), it)

    def stream_plan(self, plan: WorkerPlan, worker: int, epoch: int) -> Iterator[Any]:
        """The items of a plan made elsewhere (``mixture.MixtureReader``): read, shuffle,
        skip ``plan.skip``, decode and substitute as ``__iter__`` does."""
        return self._stream(plan, worker, epoch)

    def _stream(self, plan: WorkerPlan, worker: int, epoch: int) -> Iterator[Any]:
        """Read, shuffle, skip the consumed positions, decode and substitute bad ones."""
        info = get_worker_info()
        tally = _BadTally(self, plan, epoch, 0 if info is None else info.id)
        raws = (
            raw
            for shard, first, end in plan.segments
            for raw in read_shard_range(self.shards[shard], first, end, self.storage_options, tally.add_lost)
        )
        rng = random.Random(f"raytrain:{self.seed}:{epoch}:{self.rank}:{worker}")
        size = self.shuffle_buffer if self.shuffle else 0
        last_good, owed = None, 0
        for position, raw in enumerate(buffer_shuffle(raws, size, rng)):
            if position < plan.skip:
                continue
            sample = self._decode(raw, tally)
            if sample is None:
                if not self.substitute_bad:
                    continue
                if last_good is None:
                    owed += 1
                    continue
                sample = self._again(last_good)
                self.substituted += 1
            else:
                last_good = sample
            yield sample
            while owed:
                owed -= 1
                self.substituted += 1
                yield self._again(sample)
        tally.report(worker)

    def _again(self, item: Any) -> Any:
        """``item`` once more, for a bad sample's position: the transform's
        ``substitute(item)`` if it has one (e.g. to place a copy), else ``item`` itself."""
        substitute = getattr(self.transform, "substitute", None)
        return item if substitute is None else substitute(item)

    def _decode(self, raw: dict, tally: _BadTally) -> Any:
        """Decode (and transform) one raw sample, or count it as bad and return None."""
        shard = raw.get("__shard__", "?")
        try:
            if raw.get(LOST_FLAG) == "counted":  # (``_BadTally.add_lost``)
                return None
            if raw.get(LOST_FLAG):
                raise BadSample("corrupt_member", f"{raw['__key__']}: missing from the tar stream")
            try:
                sample = decode_sample(raw, decode_image=self.decode_images)
            except BadSample as error:
                if raw.get(CORRUPT_FLAG) and error.reason == "missing_key":
                    raise BadSample("corrupt_member", error.detail) from None
                raise
            return sample if self.transform is None else self.transform(sample)
        except BadSample as error:
            tally.add(shard, error)
        except SchemaError as error:
            raise SchemaError(f"shard {shard}: {error}") from None
        except DataError:
            raise
        except Exception as error:  # never crash on data: count it, but say what happened
            log.warning("unexpected error decoding %s in %s: %r", raw.get("__key__"), shard, error)
            tally.add(shard, BadSample("corrupt_member", repr(error)))
        return None


class _BadTally:
    """Bad-sample bookkeeping of one worker's epoch: counts, threshold, report.

    The threshold is per epoch: more than ``max_bad_fraction`` of the rank's epoch
    (counted over all its loader workers when ``share_counts`` is on, else of what this
    process reads in the epoch) stops the run, naming the shard that holds most of this
    process's bad samples."""

    def __init__(self, reader: ShardReader, plan: WorkerPlan, epoch: int, row: int):
        self.reader, self.epoch, self.row = reader, epoch, row
        self.by_shard: Counter = Counter()
        self.reasons: Counter = Counter()
        self.quota = plan.quota

    def add_lost(self, shard: str, count: int) -> None:
        """A shard's tail of ``count`` samples the tar did not deliver, counted at once."""
        self.add(shard, BadSample("corrupt_member", f"{count} samples missing from the tar stream"), count)

    def add(self, shard: str, error: BadSample, count: int = 1) -> None:
        self.reader.bad_counts[error.reason] += count
        self.reasons[error.reason] += count
        self.by_shard[shard] += count
        shared = self.reader._shared_counts
        if shared is not None and self.row < shared.shape[0]:
            shared[self.row, BAD_REASONS.index(error.reason)] += count
        log.debug("bad sample in %s: %s", shard, error)
        if shared is not None:  # every loader worker of this rank: its whole epoch
            bad, size = int(shared.sum()), len(self.reader)
        else:
            bad, size = sum(self.reasons.values()), self.quota
        if bad > self.reader.max_bad_fraction * size:
            worst = self.by_shard.most_common(1)[0][0]
            reasons = self.reader.shared_bad_counts() if shared is not None else self.reasons
            raise too_many_bad(worst, bad, size, reasons)

    def report(self, worker: int) -> None:
        reader, bad = self.reader, sum(self.reasons.values())
        message = "epoch %d rank %d worker %d: %d bad of %d samples skipped %s in %s"
        args = (self.epoch, reader.rank, worker, bad, self.quota, dict(self.reasons), dict(self.by_shard))
        (log.warning if bad else log.debug)(message, *args)


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else torch.distributed's, else a single process."""
    if rank is None or world_size is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        world_size = world_size if world_size is not None else (
            torch.distributed.get_world_size() if distributed else 1
        )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world_size {world_size}")
    return int(rank), int(world_size)
