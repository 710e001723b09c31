"""Training on a mixture of shard sets with fixed ratios, deterministic and exactly resumable.

    reader = MixtureReader({"h36m": "shards/h36m", "coco": "shards/coco"}, {"h36m": 0.4, "coco": 0.6},
                           seed=0, rank=r, world_size=R, batch_size=B)
    reader.set_epoch(epoch)
    for item in reader: ...          # item["source"] names the shard set (dict items)

**Epoch.** Each rank yields ``L = max_s L_s`` samples per epoch, ``L_s`` being what a
``ShardReader`` over source ``s`` yields per rank (SPIN's ``MixedDataset`` takes the
largest source's length as its epoch). Source ``s`` fills ``c_s`` of them, the weights
apportioned over ``L`` by largest remainder (so the ratio holds exactly per epoch, not
only on average), at positions drawn by a seeded permutation of ``(seed, epoch, rank)``.

**Sources.** Source ``s`` is read through its own ``ShardReader`` (same shuffle, rank
split and bad-sample handling as a single shard set). A mixture epoch ``e`` takes
``c_s`` samples from the rank's stream of that source: its source epochs
``e*K_s .. e*K_s + K_s - 1`` laid end to end, ``K_s = ceil(c_s / L_s)``; a small source is
repeated (each repeat reshuffled), a large one sub-sampled (a different part each epoch
as its shard order changes).

**Position.** As in ``ShardReader``: DataLoader worker ``w`` owns the rank-local
positions ``j`` with ``(j // batch_size) % num_workers == w``; it takes from each source
the contiguous range of that source's stream its positions need, and skips, without
decoding, what ``consumed`` says was used. The plan is a pure function of (seed, epoch,
rank, world size, batch size, workers, source sizes, weights), so a resumed epoch yields
the rest of the interrupted one: no sample lost or repeated.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .plan import WorkerPlan, epoch_shard_order, sequence_segments
from .reader import EpochPosition, Iteration, ShardReader, _rank_and_world


def normalised_weights(weights: Mapping[str, float]) -> dict[str, float]:
    """Weights scaled to sum 1; ValueError naming the problem if that is impossible."""
    bad = [name for name, w in weights.items() if not (math.isfinite(w) and w >= 0)]
    if bad:
        raise ValueError(f"mixture weights must be finite and >= 0: {', '.join(bad)}")
    total = sum(weights.values())
    if not total > 0:
        raise ValueError(f"mixture weights sum to {total}, need a positive sum")
    return {name: w / total for name, w in weights.items()}


def apportion(total: int, shares: list[float]) -> list[int]:
    """``total`` split by ``shares`` (summing to 1) into integers, largest remainder first."""
    exact = [total * share for share in shares]
    counts = [int(math.floor(x)) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def draw_sources(counts: list[int], seed: int, epoch: int, rank: int) -> np.ndarray:
    """(L,) source index of every rank-local position of the epoch: ``counts[s]`` of
    each, in a seeded order."""
    labels = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    return np.random.default_rng([seed, epoch, rank, 0x6D6978]).permutation(labels)


@dataclass(frozen=True)
class Piece:
    """Part of one source's rank stream a worker reads: records ``[first, end)`` of the
    rank's slice in source epoch ``epoch``, the first ``skip`` of them already consumed."""

    epoch: int
    first: int
    end: int
    skip: int


def worker_pieces(sources: np.ndarray, source: int, per_rank: int, mix_epoch: int, role: int,
                  num_workers: int, batch_size: int, consumed: int) -> list[Piece]:
    """What worker ``role`` reads of ``source`` this epoch (``sources`` from ``draw_sources``)."""
    owner = (np.arange(len(sources)) // batch_size) % num_workers
    mine = sources == source
    taken_before = int(np.count_nonzero(mine & (owner < role)))
    count = int(np.count_nonzero(mine & (owner == role)))
    skip = int(np.count_nonzero(mine[:consumed] & (owner[:consumed] == role)))
    repeats = -(-int(np.count_nonzero(mine)) // per_rank)  # K_s source epochs per mix epoch
    pieces, start, end = [], taken_before, taken_before + count
    for k in range(start // per_rank, -(-end // per_rank)):
        lo, hi = max(start, k * per_rank) - k * per_rank, min(end, (k + 1) * per_rank) - k * per_rank
        piece_skip = min(skip, hi - lo)
        skip -= piece_skip
        pieces.append(Piece(mix_epoch * repeats + k, lo, hi, piece_skip))
    return pieces


class MixtureReader(EpochPosition):
    """Iterable over the items of several shard sets in fixed ratios; see the module
    docstring. ``sources``: name -> shard set; ``weights``: name -> weight (any positive
    scale); other arguments as ``ShardReader``'s."""


    def __init__(self, sources: Mapping[str, Any], weights: Mapping[str, float], *, seed: int = 0,
                 shuffle_buffer: int = 500, rank: int | None = None, world_size: int | None = None,
                 batch_size: int = 1, max_bad_fraction: float = 0.05, decode_images: bool = True,
                 storage_options: dict | None = None, epoch: int = 0,
                 transform: Callable[[Any], Any] | None = None):
        super().__init__()
        if set(sources) != set(weights):
            raise ValueError(f"sources {sorted(sources)} and weights {sorted(weights)} differ")
        shares = normalised_weights(weights)
        self.names = [name for name in sources if shares[name] > 0]
        self.rank, self.world_size = _rank_and_world(rank, world_size)
        self.seed, self.batch_size = int(seed), int(batch_size)
        self.readers = [ShardReader(sources[name], seed=seed, shuffle=True,
                                    shuffle_buffer=shuffle_buffer, rank=self.rank,
                                    world_size=self.world_size, batch_size=batch_size,
                                    max_bad_fraction=max_bad_fraction,
                                    decode_images=decode_images, storage_options=storage_options)
                        for name in self.names]
        self.per_rank = [len(reader) for reader in self.readers]
        self.length = max(self.per_rank)
        self.counts = apportion(self.length, [shares[name] for name in self.names])
        self.epoch, self.consumed = int(epoch), 0
        self.transform = transform

    # ---------------------------------------------------------------- the reader.Reader surface

    @property
    def transform(self):
        return self._transform

    @transform.setter
    def transform(self, transform) -> None:
        self._transform = transform
        for reader in self.readers:
            reader.transform = transform

    @property
    def bad_counts(self) -> Counter:
        total = Counter()
        for reader in self.readers:
            total.update(reader.bad_counts)
        return total

    @property
    def substituted(self) -> int:
        return sum(reader.substituted for reader in self.readers)

    def reset_counts(self) -> None:
        for reader in self.readers:
            reader.reset_counts()

    def share_counts(self, num_processes: int) -> None:
        """As ``ShardReader.share_counts``, per source (``data.max_bad_fraction`` then
        applies to each source's part of the epoch)."""
        for reader in self.readers:
            reader.share_counts(num_processes)

    def reset_shared_counts(self) -> None:
        for reader in self.readers:
            reader.reset_shared_counts()

    def shared_bad_counts(self) -> dict[str, int] | None:
        counts = [reader.shared_bad_counts() for reader in self.readers]
        if all(c is None for c in counts):
            return None
        total = Counter()
        for c in counts:
            total.update(c or {})
        return dict(total)

    def __len__(self) -> int:
        return self.length

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])

    def epoch_sources(self, epoch: int) -> np.ndarray:
        """(L,) source index of each of this rank's positions in ``epoch``."""
        return draw_sources(self.counts, self.seed, epoch, self.rank)

    # ---------------------------------------------------------------- iteration

    def __iter__(self) -> Iterator[Any]:
        it = self.start_iteration()
        yield from self.counted(self._items(it), it)

    def _items(self, it: Iteration) -> Iterator[Any]:
        """The items of this process's positions of the epoch, each from its source."""
        sources = self.epoch_sources(it.epoch)
        streams = [self._source_stream(s, sources, it.epoch, it.role, it.num_workers, it.consumed)
                   for s in range(len(self.readers))]
        owner = (np.arange(len(sources)) // self.batch_size) % it.num_workers
        for position in np.flatnonzero(owner == it.role):
            if position < it.consumed:
                continue
            source = int(sources[position])
            item = next(streams[source])
            if isinstance(item, dict):
                item["source"] = self.names[source]
            yield item

    def _source_stream(self, source: int, sources: np.ndarray, epoch: int, role: int,
                       num_workers: int, consumed: int) -> Iterator[Any]:
        reader, per_rank = self.readers[source], self.per_rank[source]
        pieces = worker_pieces(sources, source, per_rank, epoch, role, num_workers,
                               self.batch_size, consumed)
        counts = [ref.num_samples for ref in reader.shards]
        streams = []
        for piece in pieces:
            order = epoch_shard_order(len(counts), self.seed, piece.epoch, True)
            offset = self.rank * per_rank
            plan = WorkerPlan(segments=sequence_segments(order, counts, offset + piece.first,
                                                         offset + piece.end),
                              quota=piece.end - piece.first, skip=piece.skip)
            streams.append(reader.stream_plan(plan, role, piece.epoch))
        return itertools.chain.from_iterable(streams)
