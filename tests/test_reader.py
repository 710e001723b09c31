"""Streaming reader: shard lists, split by rank and worker, shuffling, resume, bad data."""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from fixtures_data import make_fake_samples, rewrite_npz
from torch.utils.data import DataLoader

from raytrain.data import BadSample, SchemaError, ShardReader, TooManyBadSamples, resolve_shards, write_shards
from raytrain.data.plan import positions_before


def _write(path, n, maxcount=10, seed=0):
    samples = make_fake_samples(n, seed=seed)
    write_shards(samples, str(path), source="fake", licence="test", maxcount=maxcount)
    return [s["__key__"] for s in samples]


def _keys(reader) -> list[str]:
    return [sample.key for sample in reader]


def _collate_keys(batch):
    return [sample.key for sample in batch]


def _loader_keys(reader, batch_size, num_workers, max_batches=None) -> list[str]:
    loader = DataLoader(reader, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate_keys)
    keys = []
    for index, batch in enumerate(loader):
        if max_batches is not None and index >= max_batches:
            break
        keys.extend(batch)
    return keys


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory):
    """102 samples in shards of 10 (the last one short)."""
    path = tmp_path_factory.mktemp("shards")
    return path, _write(path, 102, maxcount=10)


def test_shard_lists_from_directory_pattern_manifest_and_without_manifest(shard_set, tmp_path):
    path, keys = shard_set
    by_dir = resolve_shards(str(path))
    assert [r.num_samples for r in by_dir] == [10] * 10 + [2]
    assert resolve_shards(str(path / "manifest.json")) == by_dir
    pattern = resolve_shards(str(path / "shard-{000000..000010}.tar"))
    assert [(r.url, r.num_samples) for r in pattern] == [(r.url, r.num_samples) for r in by_dir]
    bare = tmp_path / "bare"
    bare.mkdir()
    for ref in by_dir[:3]:
        shutil.copy(ref.url, bare / ref.name)
    assert [r.num_samples for r in resolve_shards(str(bare))] == [10, 10, 10]
    assert sorted(_keys(ShardReader(str(bare), world_size=1, rank=0))) == sorted(keys[:30])


def test_one_epoch_in_process_delivers_everything_once(shard_set):
    path, keys = shard_set
    got = _keys(ShardReader(str(path), seed=3, rank=0, world_size=1, shuffle_buffer=20))
    assert sorted(got) == sorted(keys) and got != keys


def test_two_ranks_two_workers_every_sample_exactly_once(shard_set):
    path, keys = shard_set
    per_rank = []
    for rank in range(2):
        reader = ShardReader(str(path), seed=5, rank=rank, world_size=2, batch_size=4, shuffle_buffer=16)
        assert len(reader) == 51
        per_rank.append(_loader_keys(reader, batch_size=4, num_workers=2))
    assert [len(k) for k in per_rank] == [51, 51]
    assert sorted(per_rank[0] + per_rank[1]) == sorted(keys)


def test_ranks_get_equal_counts_and_drop_the_remainder(tmp_path):
    keys = _write(tmp_path, 23, maxcount=4)
    readers = [ShardReader(str(tmp_path), seed=1, rank=r, world_size=3) for r in range(3)]
    per_rank = [_keys(reader) for reader in readers]
    assert [len(k) for k in per_rank] == [7, 7, 7] and readers[0].dropped_per_epoch == 2
    seen = [key for rank_keys in per_rank for key in rank_keys]
    assert len(set(seen)) == 21 and set(seen) <= set(keys)


def test_shuffling_is_deterministic_per_seed_and_changes_per_epoch(shard_set):
    path, _ = shard_set

    def epoch_keys(seed, epoch):
        reader = ShardReader(str(path), seed=seed, rank=1, world_size=2, shuffle_buffer=16)
        reader.set_epoch(epoch)
        return _keys(reader)

    assert epoch_keys(7, 0) == epoch_keys(7, 0)
    assert epoch_keys(7, 0) != epoch_keys(7, 1)
    assert epoch_keys(7, 0) != epoch_keys(8, 0)
    assert set(epoch_keys(7, 0)) != set(epoch_keys(7, 1))  # ranks get different parts each epoch


def test_no_shuffle_keeps_manifest_order(shard_set):
    path, keys = shard_set
    assert _keys(ShardReader(str(path), shuffle=False, rank=0, world_size=1)) == keys


def test_resume_mid_epoch_in_process(shard_set):
    path, _ = shard_set
    full = _keys(ShardReader(str(path), seed=2, rank=0, world_size=2, shuffle_buffer=16))
    reader = ShardReader(str(path), seed=2, rank=0, world_size=2, shuffle_buffer=16)
    first = []
    for sample in reader:
        first.append(sample.key)
        if len(first) == 19:
            break
    state = reader.state_dict()
    assert state["consumed"] == 19 and state["epoch"] == 0
    resumed = ShardReader(str(path), seed=2, rank=0, world_size=2, shuffle_buffer=16)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    rest = _keys(resumed)
    assert first + rest == full
    assert resumed.state_dict()["consumed"] == 51
    assert len(_keys(resumed)) == 51 and resumed.epoch == 1  # a finished epoch moves on


def test_resume_mid_epoch_with_dataloader_workers(shard_set):
    path, _ = shard_set
    options = dict(seed=4, rank=1, world_size=2, batch_size=4, shuffle_buffer=8)
    full = _loader_keys(ShardReader(str(path), **options), batch_size=4, num_workers=2)
    reader = ShardReader(str(path), **options)
    reader.set_epoch(0)
    first = _loader_keys(reader, batch_size=4, num_workers=2, max_batches=5)
    reader.advance(len(first))
    resumed = ShardReader(str(path), **options)
    resumed.load_state_dict(reader.state_dict())
    rest = _loader_keys(resumed, batch_size=4, num_workers=2)
    assert first + rest == full and len(full) == 51


@pytest.mark.parametrize("n, workers, batch", [(51, 2, 4), (10, 3, 1), (7, 2, 8), (0, 2, 2)])
def test_worker_positions_partition_the_epoch(n, workers, batch):
    assert sum(positions_before(n, w, workers, batch) for w in range(workers)) == n
    owner = [(j // batch) % workers for j in range(n)]
    for w in range(workers):
        assert positions_before(n, w, workers, batch) == owner.count(w)


def test_unknown_manifest_schema_refused_at_construction(tmp_path):
    _write(tmp_path, 5)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["schema_version"] = 3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match="manifest.json"):
        ShardReader(str(tmp_path))
    with pytest.raises(SchemaError):
        ShardReader(str(tmp_path / "shard-{000000..000000}.tar"))


# ------------------------------------------------------------------------- fuzz: bad data


def _members(path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def _rewrite_json(raw: dict, **changes) -> None:
    meta = json.loads(raw["json"])
    meta.update(changes)
    raw["json"] = json.dumps(meta).encode()


def _corrupt_samples(samples: list[dict]) -> dict[str, int]:
    """Damage one sample in each of shards 2..7 (10 per shard); return expected counts."""
    samples[24]["jpg"] = b"\xff\xd8" + bytes(range(256)) * 4 + b"\xff\xd9"
    rewrite_npz(samples[35], "pose", np.full(72, np.nan, np.float32))
    _rewrite_json(samples[41], box=[5000.0, 5000.0, 30.0])
    del samples[57]["npz"]
    samples[63]["json"] = b'{"schema_version": 1, "box": [1, 2'
    rewrite_npz(samples[76], "joints_3d", np.zeros((17, 4), np.float32))
    return {"bad_jpeg": 1, "nonfinite_label": 1, "box_outside_image": 1,
            "missing_key": 1, "bad_json": 1, "bad_array": 1}


def _damage_tars(path) -> tuple[set[int], int]:
    """Garbage over a header in shard 0, a shard 1 cut inside sample 17: lost indices."""
    shard0 = path / "shard-000000.tar"
    target = [m for m in _members(shard0) if m.name.endswith("000003/0.jpg")][0]
    data = bytearray(shard0.read_bytes())
    header = target.offset_data - 512
    data[header : header + 512] = np.random.default_rng(0).bytes(512)
    shard0.write_bytes(bytes(data))
    shard1 = path / "shard-000001.tar"
    cut = [m for m in _members(shard1) if m.name.endswith("000017/0.jpg")][0]
    shard1.write_bytes(shard1.read_bytes()[: cut.offset_data + 100])
    return {3, 17, 18, 19}, 4


@pytest.fixture()
def fuzzed(tmp_path):
    samples = make_fake_samples(80, seed=9)
    expected = _corrupt_samples(samples)
    write_shards(samples, str(tmp_path), source="fake", licence="test", maxcount=10)
    lost, corrupt = _damage_tars(tmp_path)
    expected["corrupt_member"] = corrupt
    bad_index = lost | {24, 35, 41, 57, 63, 76}
    good = {s["__key__"] for i, s in enumerate(samples) if i not in bad_index}
    return tmp_path, expected, good


def test_fuzz_epoch_finishes_with_counts_and_every_good_sample(fuzzed, caplog):
    path, expected, good = fuzzed
    reader = ShardReader(str(path), seed=1, rank=0, world_size=1, shuffle_buffer=16,
                         max_bad_fraction=0.5, substitute_bad=False)
    with caplog.at_level(logging.WARNING, logger="raytrain.data.reader"):
        keys = _keys(reader)
    assert sorted(keys) == sorted(good) and len(keys) == 70
    assert dict(reader.bad_counts) == expected
    assert "10 bad of 80 samples" in caplog.text


def test_fuzz_with_substitution_keeps_rank_lengths_equal(fuzzed):
    path, expected, good = fuzzed
    readers = [ShardReader(str(path), seed=2, rank=r, world_size=2, max_bad_fraction=0.5) for r in range(2)]
    per_rank = [_keys(reader) for reader in readers]
    assert [len(keys) for keys in per_rank] == [40, 40]
    assert set(per_rank[0]) | set(per_rank[1]) == good
    assert sum(r.substituted for r in readers) == 10
    total = sum((r.bad_counts for r in readers), start=Counter())
    assert dict(total) == expected


def test_fuzz_through_dataloader_workers(fuzzed):
    path, _, good = fuzzed
    reader = ShardReader(str(path), seed=3, rank=0, world_size=1, batch_size=4, max_bad_fraction=0.5)
    keys = _loader_keys(reader, batch_size=4, num_workers=2)
    assert len(keys) == 80 and set(keys) == good


def test_max_bad_fraction_is_per_epoch_and_the_error_names_the_shard(tmp_path):
    """4 bad of 30 at max_bad_fraction 0.2 is fine (all in one shard of 10: a per-shard
    rule would stop); 7 of 30 stops, naming the shard that holds them and the counts."""
    samples = make_fake_samples(30, seed=4)
    for index in range(12, 16):
        samples[index]["jpg"] = b"\xff\xd8broken\xff\xd9"
    write_shards(samples, str(tmp_path / "four"), source="fake", licence="test", maxcount=10)
    reader = ShardReader(str(tmp_path / "four"), rank=0, world_size=1, max_bad_fraction=0.2)
    assert len(_keys(reader)) == 30 and reader.bad_counts == {"bad_jpeg": 4}
    for index in range(16, 19):
        samples[index]["jpg"] = b"\xff\xd8broken\xff\xd9"
    write_shards(samples, str(tmp_path / "seven"), source="fake", licence="test", maxcount=10)
    reader = ShardReader(str(tmp_path / "seven"), rank=0, world_size=1, max_bad_fraction=0.2)
    with pytest.raises(TooManyBadSamples, match="shard-000001.tar") as caught:
        _keys(reader)
    assert caught.value.counts == {"bad_jpeg": 7} and caught.value.total == 30
    assert "bad_jpeg: 7" in str(caught.value)


def test_missing_shard_file_counts_as_corrupt(tmp_path):
    _write(tmp_path, 30, maxcount=10)
    (tmp_path / "shard-000002.tar").unlink()
    with pytest.raises(TooManyBadSamples, match="shard-000002.tar"):
        _keys(ShardReader(str(tmp_path), rank=0, world_size=1))


class _RejectEveryFifth:
    """A stand-in for the cropper: returns the key, rejects some samples as bad."""

    def __call__(self, sample):
        if int(sample.key.split("/")[2]) % 5 == 0:
            raise BadSample("box_outside_image", f"{sample.key}: rejected by the transform")
        return sample.key.upper()


def test_transform_runs_in_reader_and_its_bad_samples_are_counted(tmp_path):
    keys = _write(tmp_path, 20, maxcount=10)
    reader = ShardReader(str(tmp_path), rank=0, world_size=1, decode_images=False,
                         max_bad_fraction=0.3, transform=_RejectEveryFifth())
    items = list(reader)
    assert len(items) == 20 and reader.substituted == 4
    assert set(items) == {k.upper() for k in keys if int(k.split("/")[2]) % 5}
    assert dict(reader.bad_counts) == {"box_outside_image": 4}


# ---------------------------------------------------------------------------- Loader


def _loader_config(path, workers):
    from raytrain.bench.data import bench_config

    cfg = bench_config(str(path), workers)
    cfg.data.crop_size = 32
    cfg.data.shuffle_buffer = 16
    return cfg


def test_loader_never_recycles_a_batch_still_held(tmp_path):
    """Batches the training loop keeps are never overwritten by the workers, and every
    sample of the epoch arrives exactly once."""
    from raytrain.data.pipeline import Loader

    keys = _write(tmp_path, 96, maxcount=12)
    cfg = _loader_config(tmp_path, workers=2)
    held, sums, seen = [], [], []
    with Loader(cfg, "train", batch_size=4, seed=0) as loader:
        batches = list(loader.epoch(0))
    for batch in batches:
        assert batch["images"].shape == (4, 5, 3, 32, 32)
        assert all(isinstance(batch[name], torch.Tensor) for name in ("boxes", "pose", "has_cam"))
        held.append(batch)
        sums.append(int(batch["images"].sum()))
        seen.extend(batch["keys"])
    assert sorted(seen) == sorted(keys)
    assert [int(batch["images"].sum()) for batch in held] == sums


@pytest.mark.parametrize("batch_size", [3, 4])
def test_loader_crops_in_place_match_in_process_crops_with_substitution(fuzzed, batch_size):
    """Crops written straight into the workers' batch buffers, released and refilled
    (substituted bad samples cropped again into their own slot), equal the in-process
    crops of the same keys."""
    from raytrain.data.pipeline import Loader

    path, _, good = fuzzed

    def crops(workers, size):
        cfg = _loader_config(path, workers)
        cfg.data.max_bad_fraction = 0.5
        out = []
        with Loader(cfg, "train", batch_size=size, seed=0) as loader:
            for batch in loader.epoch(0):
                out += [(key, image.clone()) for key, image in zip(batch["keys"], batch["images"])]
                loader.release(batch)  # buffers refilled while substitutes are made
        return out

    reference = dict(crops(0, 1))
    streamed = crops(2, batch_size)
    assert set(reference) == good and len(streamed) >= 72  # whole batches of each worker
    assert len({key for key, _ in streamed}) >= len(streamed) - 10  # <= 10 substitutes
    for key, image in streamed:
        assert torch.equal(image, reference[key]), key


def _epoch_crops(loader, epoch: int, skip: int = 0) -> dict:
    out = {}
    for batch in loader.epoch(epoch, skip):
        out.update((key, image.clone()) for key, image in zip(batch["keys"], batch["images"]))
        loader.release(batch)  # as the training loop does: its buffer is filled again
        del batch
    return out


def test_persistent_workers_serve_every_epoch_like_fresh_ones(tmp_path):
    """Persistent DataLoader workers (forked once, their batch buffers released and
    refilled across epochs) deliver each epoch, and a resumed epoch, exactly as a fresh
    set of workers would: same keys, same crops (augmentation seeded per epoch), each
    sample once."""
    from raytrain.data.pipeline import Loader

    keys = _write(tmp_path, 48, maxcount=12)
    cfg = _loader_config(tmp_path, workers=2)
    fresh = _loader_config(tmp_path, workers=2)
    fresh.data.persistent_workers = False
    pids = set()
    with Loader(cfg, "train", batch_size=4, seed=0) as loader, \
            Loader(fresh, "train", batch_size=4, seed=0) as forking:
        for epoch, skip in ((0, 0), (1, 0), (2, 16), (1, 0)):
            crops = _epoch_crops(loader, epoch, skip)
            pids.update(child.pid for child in multiprocessing.active_children())
            reference = _epoch_crops(forking, epoch, skip)
            assert list(crops) == list(reference) and len(crops) == 48 - skip
            if skip == 0:
                assert sorted(crops) == sorted(keys)
            for key, image in crops.items():
                assert torch.equal(image, reference[key]), (epoch, key)
        assert len(pids) == 2  # the same two workers for all four iterations
    assert not pids & {child.pid for child in multiprocessing.active_children()}  # stopped


def test_persistent_workers_after_abandoned_epochs(tmp_path):
    """Iterations broken off after two batches (in-flight batches drained and dropped)
    leave the next epoch complete."""
    from raytrain.data.pipeline import Loader

    keys = _write(tmp_path, 48, maxcount=12)
    with Loader(_loader_config(tmp_path, workers=2), "train", batch_size=4, seed=0) as loader:
        for epoch in range(4):
            for index, _batch in enumerate(loader.epoch(epoch)):
                if index == 1:
                    break
        del _batch
        assert sorted(_epoch_crops(loader, 4)) == sorted(keys)


def test_a_later_epoch_ends_an_open_one(tmp_path):
    """One epoch at a time: starting the next epoch while one is still open ends the open
    one (drawing from it again raises), and the new epoch is complete."""
    from raytrain.data.pipeline import Loader

    keys = _write(tmp_path, 24, maxcount=12)
    with Loader(_loader_config(tmp_path, workers=2), "train", batch_size=4, seed=0) as loader:
        first = loader.epoch(0)
        next(first)
        assert sorted(_epoch_crops(loader, 1)) == sorted(keys)
        with pytest.raises(RuntimeError, match="later epoch"):
            next(first)


def test_two_loaders_of_a_split_have_their_own_workers(tmp_path):
    """Two loaders of the same split iterated at once: each its own workers, the same batches."""
    from raytrain.data.pipeline import Loader

    keys = _write(tmp_path, 24, maxcount=12)
    cfg = _loader_config(tmp_path, workers=2)
    with Loader(cfg, "train", batch_size=4, seed=0) as first, Loader(cfg, "train", batch_size=4, seed=0) as second:
        pairs = list(zip(first.epoch(0), second.epoch(0)))
        assert len(pairs) == 6 and len(multiprocessing.active_children()) >= 4
        assert [b["keys"] for b, _ in pairs] == [b["keys"] for _, b in pairs]
        assert sorted(k for b, _ in pairs for k in b["keys"]) == sorted(keys)


def test_closing_the_loader_mid_epoch_is_an_error(tmp_path):
    """close() under a running epoch ends it with an error, not a short epoch; a closed
    loader refuses another epoch."""
    from raytrain.data.pipeline import Loader

    _write(tmp_path, 48, maxcount=12)
    loader = Loader(_loader_config(tmp_path, workers=2), "train", batch_size=4, seed=0)
    batches = 0
    with pytest.raises(RuntimeError, match="closed in the middle of an epoch"):
        for _batch in loader.epoch(0):
            batches += 1
            if batches == 2:
                loader.close()
    assert batches < 12
    with pytest.raises(RuntimeError, match="closed"):
        loader.epoch(1)


def _forgotten_loader(path) -> set[int]:
    """A loader whose persistent workers served a whole epoch, dropped without close()."""
    from raytrain.data.pipeline import Loader

    loader = Loader(_loader_config(path, workers=2), "train", batch_size=4, seed=0)
    before = {child.pid for child in multiprocessing.active_children()}
    assert len(_epoch_crops(loader, 0)) == 24
    return {child.pid for child in multiprocessing.active_children()} - before


def test_a_loader_dropped_without_close_stops_its_workers(tmp_path):
    """Persistent workers do not outlive the loader that forked them: a caller that forgets
    close() leaks no worker processes into what runs after it."""
    _write(tmp_path, 24, maxcount=12)
    workers = _forgotten_loader(tmp_path)
    assert len(workers) == 2
    assert not workers & {child.pid for child in multiprocessing.active_children()}


def test_an_epoch_that_raises_stops_its_workers_and_the_next_forks_new_ones(tmp_path):
    """Too many bad samples: the epoch raises, its persistent workers are not reused; the
    next epoch (the bad shard gone) runs on freshly forked ones."""
    from raytrain.data.errors import TooManyBadSamples
    from raytrain.data.pipeline import Loader

    samples = make_fake_samples(24, seed=3)
    for sample in samples[:6]:
        sample["jpg"] = b"\xff\xd8broken\xff\xd9"
    write_shards(samples, str(tmp_path), source="fake", licence="test", maxcount=12)
    cfg = _loader_config(tmp_path, workers=2)
    cfg.data.max_bad_fraction = 0.1
    with Loader(cfg, "train", batch_size=4, seed=0) as loader:
        failed = set()
        with pytest.raises(TooManyBadSamples):
            for _batch in loader.epoch(0):
                failed.update(child.pid for child in multiprocessing.active_children())
        assert len(failed) == 2 and not failed & {child.pid for child in multiprocessing.active_children()}
        loader.reader.max_bad_fraction = 1.0  # inherited by the workers forked next
        assert len(_epoch_crops(loader, 1)) == 18  # every good sample (bad ones substituted)


# ---------------------------------------------------------------------------- batch buffers


def test_released_buffers_are_filled_again_and_held_ones_never(tmp_path):
    """One persistent worker, two epochs: the buffer of a released batch comes back with
    later batches (same buffer number, next use); the buffer of a batch held without
    release never does and keeps its pixels, also when released after the worker forgot
    it (more than ``keep`` = 6 buffers out); every sample arrives once per epoch."""
    from raytrain.data.pipeline import Loader

    keys = _write(tmp_path, 96, maxcount=12)
    cfg = _loader_config(tmp_path, workers=1)
    names, held = [], []
    with Loader(cfg, "train", batch_size=4, seed=0) as loader:
        for epoch in range(2):
            seen = []
            for index, batch in enumerate(loader.epoch(epoch)):
                seen += batch["keys"]
                source, worker, process, buffer, use = batch["buffer"]
                kept = epoch == 0 and index % 3 == 0
                names.append((process, buffer, use, not kept))
                if kept:  # never released, except the first after the epoch
                    held.append((batch, batch["images"].clone()))
                else:
                    loader.release(batch)
                    loader.release(batch)  # the second time: nothing
                    assert "buffer" not in batch
            assert sorted(seen) == sorted(keys)
            if epoch == 0:  # 8 buffers held: the first is forgotten, its release ignored
                loader.release(held[0][0])
    assert len(names) == 48 and len({process for process, *_ in names}) == 1
    for batch, pixels in held:
        assert torch.equal(batch["images"], pixels)
    uses: dict[int, list] = {}
    for _, buffer, use, released in names:
        uses.setdefault(buffer, []).append((use, released))
    assert len(uses[names[0][1]]) == 1  # forgotten: never filled again
    assert sum(len(sends) > 1 for sends in uses.values()) >= 2 and len(uses) <= 24
    for sends in uses.values():
        assert [use for use, _ in sends] == list(range(1, len(sends) + 1))
        assert all(released for _, released in sends[:-1])  # only a released buffer comes back


def test_releases_from_earlier_workers_never_free_a_later_workers_buffer(tmp_path):
    """Without persistent workers each iteration forks new ones (same return queues):
    releasing the first iteration's batches during the second frees none of the second's
    buffers, which the receiver holds."""
    from raytrain.data.pipeline import Loader

    _write(tmp_path, 48, maxcount=12)
    cfg = _loader_config(tmp_path, workers=1)
    cfg.data.persistent_workers = False
    loader = Loader(cfg, "train", batch_size=4, seed=0)
    first = list(loader.epoch(0))
    first_processes = {batch["buffer"][2] for batch in first}
    second = []
    for batch in loader.epoch(0):
        second.append((batch, batch["images"].clone()))
        if first:
            loader.release(first.pop())
    assert len(second) == 12 and not first
    assert {batch["buffer"][2] for batch, _ in second}.isdisjoint(first_processes)
    for batch, pixels in second:
        assert torch.equal(batch["images"], pixels)


def test_release_is_a_no_op_for_batches_made_in_process(tmp_path):
    from raytrain.data.pipeline import Loader

    _write(tmp_path, 8, maxcount=8)
    loader = Loader(_loader_config(tmp_path, workers=0), "train", batch_size=4, seed=0)
    batch = next(loader.epoch(0))
    assert "buffer" not in batch
    pixels = batch["images"].clone()
    loader.release(batch)
    assert torch.equal(batch["images"], pixels)


def test_substitute_crops_the_sample_again_without_reading_the_old_crops(tmp_path):
    """A bad sample's position is filled by cropping the previous good sample once more
    (its crops may sit in a buffer already released): the same pixels, whatever its old
    buffer holds now."""
    from raytrain.data.collate import BatchSink
    from raytrain.data.crop import MultiRoICropper
    from raytrain.data.pipeline import CropTransform
    from raytrain.data.schema import decode_sample

    cfg = _loader_config(tmp_path, workers=0)
    cropper = MultiRoICropper("paper", 5, crop_size=32, augment=cfg.data)
    transform = CropTransform(cropper, seed=3, epoch=1, sink=BatchSink(4, (5, 32, 32, 3)))
    item = transform(decode_sample(make_fake_samples(1, seed=4)[0], decode_image=False))
    expected = item["images"].copy()
    assert expected.any()
    item["images"][:] = 0  # its buffer filled with another batch
    again = transform.substitute(item)
    assert again["key"] == item["key"] and np.array_equal(again["images"], expected)
