"""Shard writer, manifest and sample schema: real tars on disk."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import webdataset as wds
from fixtures_data import fake_arrays, fake_jpeg, fake_meta, make_fake_samples, rewrite_npz

from raytrain.data import (
    SCHEMA_VERSION,
    BadSample,
    SchemaError,
    decode_sample,
    encode_sample,
    read_manifest,
    verify_shards,
    write_shards,
)
from raytrain.data.schema import ARRAY_SHAPES


def _read_tar(path) -> list[dict]:
    """Group a tar's members into raw samples with plain tarfile (independent of the reader)."""
    samples: dict[str, dict] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.rsplit("/", 1)[0], member.name.rsplit("/", 1)[1]
            stem, _, ext = ext.partition(".")
            raw = samples.setdefault(f"{key}/{stem}", {"__key__": f"{key}/{stem}"})
            raw[ext] = tar.extractfile(member).read()
    return list(samples.values())


def test_roundtrip_every_field(tmp_path):
    originals = make_fake_samples(23, seed=1)
    manifest = write_shards(originals, str(tmp_path), source="fake", licence="test only", maxcount=10)
    assert [s["num_samples"] for s in manifest["shards"]] == [10, 10, 3]
    decoded = [decode_sample(raw) for entry in manifest["shards"] for raw in _read_tar(tmp_path / entry["name"])]
    assert [s.key for s in decoded] == [o["__key__"] for o in originals]
    for sample, original in zip(decoded, originals):
        meta = json.loads(original["json"])
        assert sample.jpeg == original["jpg"]
        assert sample.image.shape == (40, 48, 3) and sample.image.dtype == np.uint8
        assert sample.image_size == (320, 240) and sample.focal == pytest.approx(meta["focal"])
        np.testing.assert_allclose(sample.box, meta["box"], rtol=1e-6)
        np.testing.assert_allclose(sample.affine, meta["affine"], rtol=1e-6)
        assert sample.has_smpl and sample.gender == "neutral" and sample.cam_full.shape == (3,)
        with np.load(io.BytesIO(original["npz"])) as arrays:
            for name, shape in ARRAY_SHAPES.items():
                assert getattr(sample, name).shape == shape
                np.testing.assert_array_equal(getattr(sample, name), arrays[name])


def test_manifest_counts_and_checksums(tmp_path):
    manifest = write_shards(make_fake_samples(25, seed=2), str(tmp_path), "fake", "CC-BY test", maxcount=7)
    on_disk = read_manifest(str(tmp_path))
    assert on_disk == manifest
    assert manifest["schema_version"] == SCHEMA_VERSION and manifest["licence"] == "CC-BY test"
    assert manifest["num_samples"] == 25 and manifest["num_shards"] == 4
    assert [s["name"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    for entry in manifest["shards"]:
        data = (tmp_path / entry["name"]).read_bytes()
        assert entry["bytes"] == len(data)
        assert entry["sha256"] == hashlib.sha256(data).hexdigest()
    assert verify_shards(str(tmp_path)) == []
    (tmp_path / "shard-000001.tar").write_bytes(b"x" * 10)
    assert verify_shards(str(tmp_path / "manifest.json")) == [
        f"{tmp_path}/shard-000001.tar: size/sha256 differ from the manifest"
    ]


def test_writing_is_reproducible_and_maxsize_splits(tmp_path):
    samples = make_fake_samples(12, seed=3)
    first = write_shards(samples, str(tmp_path / "a"), "fake", "x", maxcount=100, maxsize=5000)
    second = write_shards(samples, str(tmp_path / "b"), "fake", "x", maxcount=100, maxsize=5000)
    assert first["shards"] == second["shards"]
    assert first["num_shards"] > 1 and first["num_samples"] == 12


def test_shards_are_plain_webdataset(tmp_path):
    write_shards(make_fake_samples(5, seed=4), str(tmp_path), "fake", "x")
    dataset = wds.WebDataset(str(tmp_path / "shard-000000.tar"), shardshuffle=False)
    raws = list(dataset)
    assert len(raws) == 5 and all(decode_sample(raw).key == raw["__key__"] for raw in raws)


def test_unknown_manifest_schema_refused_naming_file(tmp_path):
    write_shards(make_fake_samples(3), str(tmp_path), "fake", "x")
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = 99
    path.write_text(json.dumps(manifest))
    with pytest.raises(SchemaError, match=r"manifest\.json.*schema_version 99"):
        read_manifest(str(tmp_path))


def test_malformed_manifest_errors_name_file(tmp_path):
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest.json"):
        read_manifest(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="nothere"):
        read_manifest(str(tmp_path / "nothere"))


def _good_raw(seed: int = 0) -> dict:
    return make_fake_samples(1, seed=seed)[0]


def _with_meta(**changes) -> dict:
    raw = _good_raw()
    meta = json.loads(raw["json"])
    meta.update(changes)
    raw["json"] = json.dumps(meta).encode()
    return raw


def _with_array(name: str, value) -> dict:
    return rewrite_npz(_good_raw(), name, value)


@pytest.mark.parametrize(
    "make_raw, reason",
    [
        (lambda: {k: v for k, v in _good_raw().items() if k != "npz"}, "missing_key"),
        (lambda: {**_good_raw(), "json": b"{oops"}, "bad_json"),
        (lambda: _with_meta(box="wide"), "bad_json"),
        (lambda: {**_good_raw(), "npz": b"PK\x03\x04garbage"}, "bad_array"),
        (lambda: _with_array("pose", np.zeros(69, np.float32)), "bad_array"),
        (lambda: _with_array("betas", np.array([np.nan] * 10, np.float32)), "nonfinite_label"),
        (lambda: _with_meta(focal=float("inf")), "nonfinite_label"),
        (lambda: _with_meta(box=[900.0, 100.0, 50.0]), "box_outside_image"),
        (lambda: _with_meta(box=[100.0, 100.0, 0.0]), "box_outside_image"),
        (lambda: {**_good_raw(), "jpg": b"\xff\xd8not a jpeg\xff\xd9"}, "bad_jpeg"),
        (lambda: _with_meta(stored_size=[10, 10]), "bad_jpeg"),
    ],
)
def test_decode_rejects_bad_samples(make_raw, reason):
    with pytest.raises(BadSample) as caught:
        decode_sample(make_raw())
    assert caught.value.reason == reason


def test_box_overlapping_the_border_is_kept():
    sample = decode_sample(_with_meta(box=[-10.0, 100.0, 60.0]))
    assert sample.box[0] == -10.0


def test_pickled_npz_is_never_loaded():
    raw = _with_array("pose", np.array([{"evil": 1}] * 72, dtype=object))
    with pytest.raises(BadSample) as caught:
        decode_sample(raw)
    assert caught.value.reason == "bad_array"


def test_unknown_sample_schema_raises_schema_error():
    with pytest.raises(SchemaError, match="schema_version 2"):
        decode_sample(_with_meta(schema_version=2))


def test_encode_validates_at_write_time():
    rng = np.random.default_rng(0)
    jpg, meta, arrays = fake_jpeg(rng), fake_meta(rng), fake_arrays(rng)
    with pytest.raises(ValueError, match="dots"):
        encode_sample("a/b.c/0", jpg, meta, arrays)
    with pytest.raises(ValueError, match="pose"):
        encode_sample("a/b/0", jpg, meta, {**arrays, "pose": np.zeros(3)})
    with pytest.raises(ValueError, match="focal"):
        encode_sample("a/b/0", jpg, {k: v for k, v in meta.items() if k != "focal"}, arrays)
    encoded = encode_sample("a/b/0", jpg, meta, {})  # missing labels are zeros
    assert not decode_sample(encoded).betas.any()


def test_fast_npz_parser_matches_np_load_and_falls_back_safely():
    """The npz fast path reads what np.savez writes exactly as np.load does; anything else
    (compressed, object arrays, damaged bytes) goes through np.load(allow_pickle=False)."""
    import io

    import numpy as np

    from raytrain.data.formats.npz import parse_npz
    from raytrain.data.schema import ARRAY_SHAPES, BadSample, _load_arrays

    rng = np.random.default_rng(0)
    arrays = {name: rng.normal(size=shape).astype(np.float32) for name, shape in ARRAY_SHAPES.items()}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    payload = buffer.getvalue()
    fast = parse_npz(payload)
    assert fast is not None and fast.keys() == arrays.keys()
    for name, value in arrays.items():
        np.testing.assert_array_equal(fast[name], value)
        assert fast[name].flags.writeable and fast[name].dtype == np.float32
    fortran = io.BytesIO()
    np.savez(fortran, pose=np.asfortranarray(rng.normal(size=(3, 4))))
    with np.load(io.BytesIO(fortran.getvalue())) as npz:
        np.testing.assert_array_equal(parse_npz(fortran.getvalue())["pose"], npz["pose"])
    compressed = io.BytesIO()
    np.savez_compressed(compressed, **arrays)
    assert parse_npz(compressed.getvalue()) is None
    np.testing.assert_array_equal(_load_arrays("k", compressed.getvalue())["pose"], arrays["pose"])
    objects = io.BytesIO()
    np.savez(objects, **{**arrays, "pose": np.array([{}] * 72, dtype=object)}, allow_pickle=True)
    assert parse_npz(objects.getvalue()) is None
    with pytest.raises(BadSample, match="bad_array"):
        _load_arrays("k", objects.getvalue())
    damaged = bytearray(payload)
    damaged[len(payload) // 3] ^= 0xFF
    assert parse_npz(bytes(damaged)) is None
    with pytest.raises(BadSample, match="bad_array"):
        _load_arrays("k", bytes(damaged))
