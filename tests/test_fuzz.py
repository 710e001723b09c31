"""Untrusted shards: a fuzz corpus with every damage class (tests/fuzz_shards.py) is read
with every good sample delivered once, every bad one counted under its reason, bounded
memory, and never an image that does not match its json; manifest inconsistencies and
devices stop the reader with an error naming the file."""

from __future__ import annotations

import json
import pickle
import re
import shutil
import tarfile

import numpy as np
import pytest
from fixtures_data import make_fake_samples
from fuzz_shards import SAMPLE_DAMAGE, TAR_DAMAGE, header_bomb_jpeg, huge_count_manifest, write_fuzz_corpus
from torch.utils.data import DataLoader

from raytrain.data import ManifestError, ShardReader, TooManyBadSamples, resolve_shards, write_shards
from raytrain.data.crop import MultiRoICropper
from raytrain.data.schema import BAD_REASONS, jpeg_frame_size


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_fuzz_corpus(tmp_path_factory.mktemp("fuzz"))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        return int(re.search(rf"{field}:\s+(\d+)", handle.read()).group(1))


class _PeakRSS:
    """Peak resident memory above the start, in MB (VmHWM reset through clear_refs)."""

    def __enter__(self):
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        self.start = _status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        self.extra_mb = (_status_kb("VmHWM") - self.start) / 1024


def test_corpus_holds_every_damage_class(corpus):
    reasons = {reason for reason, _ in SAMPLE_DAMAGE.values()} | set(TAR_DAMAGE) | {"corrupt_member"}
    assert reasons == set(BAD_REASONS)
    assert set(corpus.expected) == reasons and len(corpus.good) > 60


def test_fuzz_reader_delivers_every_good_sample_once_counts_every_bad_one(corpus):
    """Decoding reader: each good key once, the image decoded from that key's own JPEG at
    its json's stored size, bad ones by reason, under 300 MB of extra memory."""
    reader = ShardReader(str(corpus.path), seed=1, rank=0, world_size=1, shuffle_buffer=16,
                         max_bad_fraction=1.0, substitute_bad=False)
    keys = []
    with _PeakRSS() as peak:
        for sample in reader:
            keys.append(sample.key)
            assert sample.jpeg == corpus.jpegs[sample.key]
            assert sample.image.shape[:2] == (sample.stored_size[1], sample.stored_size[0])
    assert sorted(keys) == sorted(corpus.good)
    assert dict(reader.bad_counts) == dict(corpus.expected)
    assert peak.extra_mb < 300, peak.extra_mb


def test_fuzz_cropper_path_never_delivers_a_mismatched_image(corpus):
    """The training path (markers only, the cropper decodes at reduced scale) refuses the
    same samples as the decoding reader: no header bomb or other-size JPEG is cropped."""
    cropper = MultiRoICropper("paper", num_rois=2, crop_size=32)
    rng = np.random.default_rng(0)

    def crop(sample):
        out = cropper(sample, rng)
        image, _ = cropper._decode(sample, np.array([[0.0, 0.0, 1.0]]))
        assert image.shape[:2] == (sample.stored_size[1], sample.stored_size[0])  # no EXIF turn
        return sample.key, out["images"]

    reader = ShardReader(str(corpus.path), seed=2, rank=0, world_size=1, shuffle_buffer=16,
                         max_bad_fraction=1.0, substitute_bad=False, decode_images=False,
                         transform=crop)
    with _PeakRSS() as peak:
        items = list(reader)
    assert sorted(key for key, _ in items) == sorted(corpus.good)
    assert dict(reader.bad_counts) == dict(corpus.expected)
    assert peak.extra_mb < 300, peak.extra_mb


def test_fuzz_through_dataloader_workers_each_good_sample_once(corpus):
    reader = ShardReader(str(corpus.path), seed=3, rank=0, world_size=1, batch_size=4,
                         max_bad_fraction=1.0, substitute_bad=False, decode_images=False)
    reader.share_counts(2)
    loader = DataLoader(reader, batch_size=4, num_workers=2, collate_fn=lambda b: [s.key for s in b])
    keys = [key for batch in loader for key in batch]
    assert sorted(keys) == sorted(corpus.good)
    assert reader.shared_bad_counts() == dict(corpus.expected)


def test_a_header_bomb_is_refused_before_decoding():
    data = header_bomb_jpeg(30000, 30000)
    assert len(data) < 1000 and jpeg_frame_size(data) == (30000, 30000)


# ------------------------------------------------------------------------- manifests


def _shard_set(path, n=20, maxcount=10):
    samples = make_fake_samples(n, seed=5)
    write_shards(samples, str(path), source="fake", licence="test", maxcount=maxcount)
    return [s["__key__"] for s in samples]


def _edit_manifest(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _keys(reader):
    return [sample.key for sample in reader]


def test_manifest_counting_fewer_samples_than_the_tar_holds_is_an_error(tmp_path):
    _shard_set(tmp_path)

    def fewer(manifest):
        manifest["shards"][1]["num_samples"] = 5
        manifest["num_samples"] = 15
    _edit_manifest(tmp_path, fewer)
    with pytest.raises(ManifestError, match="shard-000001.tar holds more than the 5"):
        _keys(ShardReader(str(tmp_path), rank=0, world_size=1, shuffle=False))


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"].__setitem__(1, dict(m["shards"][0])), "listed twice"),
    (lambda m: m["shards"][0].update(num_samples=True), "num_samples"),
    (lambda m: m["shards"][0].update(name="../elsewhere.tar"), "not a plain file name"),
    (lambda m: m["shards"][0].update(name="/etc/passwd"), "not a plain file name"),
    (lambda m: m.update(num_samples="20"), "num_samples"),
])
def test_inconsistent_manifests_are_refused_naming_the_file(tmp_path, edit, message):
    _shard_set(tmp_path)
    _edit_manifest(tmp_path, edit)
    with pytest.raises(ManifestError, match=message) as caught:
        ShardReader(str(tmp_path), rank=0, world_size=1)
    assert "manifest.json" in str(caught.value)


def test_a_shard_not_listed_in_the_manifest_is_an_error(tmp_path):
    """An interrupted re-conversion left new shards beside the old manifest."""
    _shard_set(tmp_path)
    shutil.copy(tmp_path / "shard-000001.tar", tmp_path / "shard-000002.tar")
    with pytest.raises(ManifestError, match="not listed.*shard-000002.tar"):
        ShardReader(str(tmp_path), rank=0, world_size=1)


def test_a_replaced_shard_is_reported_and_verification_refuses_it(tmp_path, caplog):
    """A shard of another size than recorded is named in a warning and its samples are
    held to the manifest; with verify (data.verify_checksums) any difference, size or
    sha256, stops before reading."""
    keys = _shard_set(tmp_path)
    other = tmp_path / "other"
    write_shards(make_fake_samples(10, seed=8), str(other), source="fake", licence="t", maxcount=10)
    shutil.copy(other / "shard-000000.tar", tmp_path / "shard-000001.tar")  # same count, new content
    with caplog.at_level("WARNING"):
        refs = resolve_shards(str(tmp_path))
    if (tmp_path / "shard-000001.tar").stat().st_size != json.loads(
            (tmp_path / "manifest.json").read_text())["shards"][1]["bytes"]:
        assert "shard-000001.tar" in caplog.text
    assert [r.num_samples for r in refs] == [10, 10]
    with pytest.raises(ManifestError, match="shard-000001.tar"):
        resolve_shards(str(tmp_path), verify=True)
    assert len(keys) == 20


def test_a_device_as_shard_or_data_is_refused_at_once(tmp_path):
    with pytest.raises(ManifestError, match="not a regular file"):
        ShardReader("/dev/urandom", rank=0, world_size=1)
    _shard_set(tmp_path)
    (tmp_path / "shard-000001.tar").unlink()
    (tmp_path / "shard-000001.tar").symlink_to("/dev/urandom")
    with pytest.raises(ManifestError, match="not a regular file"):
        ShardReader(str(tmp_path), rank=0, world_size=1)


# ------------------------------------------------------------------------- errors


def test_too_many_bad_samples_pickles_with_its_details():
    """Ray sends a worker's error to the driver pickled: it must come back whole."""
    from raytrain.data.errors import too_many_bad
    error = too_many_bad("shard-000003.tar", 7, 30, {"bad_jpeg": 7})
    back = pickle.loads(pickle.dumps(error))
    assert isinstance(back, TooManyBadSamples) and str(back) == str(error)
    assert back.shard == "shard-000003.tar" and back.counts == {"bad_jpeg": 7}
    manifest = pickle.loads(pickle.dumps(ManifestError("m.json: listed twice", shard="x")))
    assert isinstance(manifest, ValueError) and manifest.shard == "x"


def test_skip_errors_pickle_with_their_reason_and_detail():
    """BadSample (reader) and SkipItem (predict) cross process boundaries whole."""
    from raytrain.data.schema import BadSample
    from raytrain.predict.inputs import SKIP_REASONS, SkipItem
    for error in (BadSample("duplicate_key", "k: twice"), SkipItem(SKIP_REASONS[0], "frame 3")):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and (back.reason, back.detail, str(back)) == (
            error.reason, error.detail, str(error))
    with pytest.raises(ValueError, match="unknown bad-sample reason"):
        BadSample("no_such_reason")


def test_too_many_bad_samples_from_a_loader_worker_keeps_its_type_and_line(tmp_path):
    samples = make_fake_samples(20, seed=6)
    for index in range(3, 13):
        samples[index]["jpg"] = b"\xff\xd8broken\xff\xd9"
    write_shards(samples, str(tmp_path), source="fake", licence="test", maxcount=10)
    reader = ShardReader(str(tmp_path), rank=0, world_size=1, max_bad_fraction=0.1, shuffle=False)
    loader = DataLoader(reader, batch_size=2, num_workers=1, collate_fn=list)
    with pytest.raises(TooManyBadSamples) as caught:
        list(loader)
    line = caught.value.user_line()
    assert line.startswith("too many bad samples") and "shard-0000" in line and "bad_jpeg" in line


def test_tar_member_declaring_gigabytes_is_never_allocated(tmp_path):
    """A member header declaring 8 GB: the parser skips instead of reading it, the rest
    of the shard is lost (counted), memory stays flat."""
    samples = make_fake_samples(10, seed=7)
    write_shards(samples, str(tmp_path), source="fake", licence="test", maxcount=10)
    shard = tmp_path / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        target = next(m for m in tar.getmembers() if m.name == f"{samples[6]['__key__']}.npz")
    data = bytearray(shard.read_bytes())
    header = target.offset_data - 512
    data[header + 124:header + 136] = b"77777777777\0"
    data[header + 148:header + 156] = b" " * 8
    data[header + 148:header + 156] = f"{sum(data[header:header + 512]):06o}\0 ".encode()
    shard.write_bytes(bytes(data))
    reader = ShardReader(str(tmp_path), rank=0, world_size=1, shuffle=False, max_bad_fraction=1.0,
                         substitute_bad=False)
    with _PeakRSS() as peak:
        keys = _keys(reader)
    assert keys == [s["__key__"] for s in samples[:6]]
    assert reader.bad_counts == {"corrupt_member": 4}
    assert peak.extra_mb < 100, peak.extra_mb


def test_max_bad_fraction_counts_over_the_rank_not_one_loader_worker(tmp_path):
    """96 samples, 2 loader workers, 1 bad: 1/96 is under 1.5 % of the epoch (a rule per
    loader worker would see 1/48 and stop); 2 bad is over and stops naming the counts."""
    from raytrain.bench.data import bench_config
    from raytrain.data.pipeline import Loader

    def run(bad):
        samples = make_fake_samples(96, seed=11)
        for index in bad:
            samples[index]["jpg"] = b"\xff\xd8broken\xff\xd9"
        folder = tmp_path / f"bad{len(bad)}"
        write_shards(samples, str(folder), source="fake", licence="test", maxcount=12)
        cfg = bench_config(str(folder), 2)
        cfg.data.crop_size, cfg.data.shuffle_buffer, cfg.data.max_bad_fraction = 32, 8, 0.015
        with Loader(cfg, "train", batch_size=4, seed=0) as loader:
            keys = [key for batch in loader.epoch(0) for key in batch["keys"]]
            return keys, loader.bad_counts

    keys, counts = run([5])
    assert len(keys) == 96 and counts == {"bad_jpeg": 1}
    with pytest.raises(TooManyBadSamples, match="bad_jpeg: 2"):
        run([5, 70])


# ------------------------------------------------------------------------- counts the bytes cannot hold


def test_a_manifest_claiming_more_samples_than_its_bytes_hold_is_refused_at_once(tmp_path):
    """10^12 samples in a shard of a few hundred kB: refused by the manifest check (at
    least three 512-byte tar headers per sample), before any shard is read."""
    import time

    from raytrain.data.shards import MIN_SAMPLE_BYTES, read_manifest
    huge_count_manifest(tmp_path)
    start = time.monotonic()
    with pytest.raises(ManifestError, match=r"said to hold 1000000000000 samples.*hold at most \d+"):
        read_manifest(str(tmp_path))
    with pytest.raises(ManifestError, match="shard-000001.tar"):
        ShardReader(str(tmp_path), rank=0, world_size=1)
    assert time.monotonic() - start < 5
    assert MIN_SAMPLE_BYTES == 1536


def test_a_lost_tail_is_counted_at_once_and_stops_the_reader_promptly(tmp_path):
    """A manifest without sizes whose missing shard claims 10^12 samples: the reader
    counts the whole lost tail in one step, so data.max_bad_fraction stops it at once."""
    import time
    huge_count_manifest(tmp_path, with_bytes=False)
    reader = ShardReader(str(tmp_path), rank=0, world_size=1, shuffle=False, max_bad_fraction=0.5)
    start = time.monotonic()
    with _PeakRSS() as peak, pytest.raises(TooManyBadSamples, match="corrupt_member: 1000000000000"):
        _keys(reader)
    assert time.monotonic() - start < 10 and peak.extra_mb < 100


def test_duplicate_keys_and_members_are_counted_not_delivered(tmp_path):
    """A key written twice in one tar (not adjacent) and a member present twice: each is
    counted under its reason; the first sample of the key is delivered once."""
    samples = make_fake_samples(10, seed=12)
    samples[5]["__key__"] = samples[2]["__key__"]
    write_shards(samples, str(tmp_path), source="fake", licence="test", maxcount=10)
    from fuzz_shards import _member_twice
    _member_twice(tmp_path, tmp_path / "shard-000000.tar", f"{samples[7]['__key__']}.npz")
    reader = ShardReader(str(tmp_path), rank=0, world_size=1, shuffle=False, max_bad_fraction=1.0,
                         substitute_bad=False)
    keys = _keys(reader)
    assert keys == [s["__key__"] for i, s in enumerate(samples) if i not in (5, 7)]
    assert reader.bad_counts == {"duplicate_key": 1, "duplicate_member": 1}


def test_the_huge_count_manifest_is_refused_at_once_by_eval_and_doctor(tmp_path):
    """Through the commands: `raytrain eval --data` stops before loading a checkpoint and
    `raytrain doctor` reports the shard set, each naming the shard, in seconds."""
    import contextlib
    import io
    import time

    from raytrain.cli import main as cli_main
    huge = huge_count_manifest(tmp_path / "huge")
    config = tmp_path / "huge.yaml"
    config.write_text(f"data:\n  train_shards: {huge}\n  val_shards: {huge}\n")
    for argv in (["eval", "--checkpoint", str(tmp_path / "none"), "--data", str(huge)],
                 ["doctor", "--config", str(config)]):
        out, err = io.StringIO(), io.StringIO()
        start = time.monotonic()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli_main(argv)
        assert time.monotonic() - start < 30, argv
        text = out.getvalue() + err.getvalue()
        assert code != 0 and "said to hold 1000000000000 samples" in text and "shard-000001.tar" in text, text
        assert "Traceback" not in text
