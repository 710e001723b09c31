"""The epoch plan: shard order, the rank's slice, each DataLoader worker's positions.

Pure integer arithmetic (see ``reader.ShardReader`` for the rules it implements).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

log = logging.getLogger(__name__)



def epoch_shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """Shard indices in the order of this epoch (a seeded permutation when shuffling)."""
    if not shuffle:
        return list(range(num_shards))
    return np.random.default_rng([seed, epoch]).permutation(num_shards).tolist()


def positions_before(n: int, worker: int, num_workers: int, batch_size: int) -> int:
    """How many rank-local positions ``j < n`` belong to ``worker``.

    Position ``j`` belongs to worker ``(j // batch_size) % num_workers``: the order of a
    torch DataLoader that takes one batch from each worker in turn.
    """
    full_chunks, rest = divmod(n, batch_size)
    owned_chunks = max(0, (full_chunks - worker + num_workers - 1) // num_workers)
    partial = rest if full_chunks % num_workers == worker else 0
    return owned_chunks * batch_size + partial


def sequence_segments(
    order: Sequence[int], counts: Sequence[int], start: int, stop: int
) -> list[tuple[int, int, int]]:
    """``(shard index, first, end)`` pieces of the global sequence ``[start, stop)``."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
        if offset >= stop:
            break
    return pieces


@dataclass
class WorkerPlan:
    """What one (rank, worker) reads and yields in one epoch."""

    segments: list[tuple[int, int, int]]  # (shard index, first, end) read in this order
    quota: int  # positions this worker yields in the whole epoch
    skip: int  # positions already consumed before a resume


def plan_worker(
    counts: Sequence[int], order: Sequence[int], rank: int, world_size: int,
    worker: int, num_workers: int, batch_size: int, consumed: int,
) -> WorkerPlan:
    """The contiguous range of the epoch sequence that one (rank, worker) owns."""
    per_rank = sum(counts) // world_size
    quotas = [positions_before(per_rank, w, num_workers, batch_size) for w in range(num_workers)]
    start = rank * per_rank + sum(quotas[:worker])
    return WorkerPlan(
        segments=sequence_segments(order, counts, start, start + quotas[worker]),
        quota=quotas[worker],
        skip=positions_before(min(consumed, per_rank), worker, num_workers, batch_size),
    )


def buffer_shuffle(items: Iterable, size: int, rng: random.Random) -> Iterator:
    """Shuffle a stream with a buffer of ``size`` items (no shuffle for size <= 1)."""
    if size <= 1:
        yield from items
        return
    buffer: list = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer

