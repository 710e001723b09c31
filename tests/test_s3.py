"""Shards on an S3 endpoint on loopback (a moto server, conftest's `moto_s3`) read like local ones."""

from __future__ import annotations

import numpy as np
import pytest

boto3 = pytest.importorskip("boto3")
pytest.importorskip("s3fs")
pytest.importorskip("moto.server")

from conftest import moto_s3  # noqa: E402
from fixtures_data import make_fake_samples  # noqa: E402

from raytrain.data import ShardReader, read_manifest, verify_shards, write_shards  # noqa: E402

BUCKET = "bucket"
pytestmark = pytest.mark.filterwarnings("ignore:Your installed version of s3fs is very old")


@pytest.fixture(scope="module")
def s3_options():
    """fsspec storage options for a moto server with bucket BUCKET."""
    with moto_s3() as endpoint:
        client = boto3.client(
            "s3", endpoint_url=endpoint, region_name="us-east-1",
            aws_access_key_id="testing", aws_secret_access_key="testing",
        )
        client.create_bucket(Bucket=BUCKET)
        yield {
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"endpoint_url": endpoint, "region_name": "us-east-1"},
        }


def _read_all(reader: ShardReader) -> list[tuple]:
    return [(s.key, s.jpeg, s.image.tobytes(), s.pose.tobytes(), s.box.tobytes()) for s in reader]


def test_s3_shards_give_the_same_samples_as_disk(s3_options, tmp_path):
    samples = make_fake_samples(37, seed=11)
    local = write_shards(samples, str(tmp_path), "fake", "test", maxcount=8)
    remote = write_shards(samples, f"s3://{BUCKET}/x", "fake", "test", maxcount=8, storage_options=s3_options)
    assert remote == local  # same bytes, same checksums
    assert read_manifest(f"s3://{BUCKET}/x", s3_options) == local
    assert verify_shards(f"s3://{BUCKET}/x", s3_options) == []
    options = dict(seed=3, rank=0, world_size=1, shuffle_buffer=10)
    from_disk = _read_all(ShardReader(str(tmp_path), **options))
    from_s3 = _read_all(ShardReader(f"s3://{BUCKET}/x", storage_options=s3_options, **options))
    assert len(from_s3) == 37 and from_s3 == from_disk


def test_s3_brace_pattern_and_rank_split(s3_options):
    samples = make_fake_samples(20, seed=12)
    write_shards(samples, f"s3://{BUCKET}/y", "fake", "test", maxcount=5, storage_options=s3_options)
    pattern = f"s3://{BUCKET}/y/shard-{{000000..000003}}.tar"
    keys = []
    for rank in range(2):
        reader = ShardReader(pattern, seed=1, rank=rank, world_size=2, storage_options=s3_options)
        keys.append([s.key for s in reader])
    assert [len(k) for k in keys] == [10, 10]
    assert sorted(keys[0] + keys[1]) == sorted(s["__key__"] for s in samples)
    image = next(iter(ShardReader(pattern, rank=0, world_size=1, storage_options=s3_options))).image
    assert image.dtype == np.uint8 and image.shape == (40, 48, 3)


@pytest.mark.ray
@pytest.mark.slow
def test_ray_tasks_write_a_cliff_npz_to_s3(s3_options, tmp_path):
    """`raytrain shard <source> --ray` with an s3:// output: Ray tasks on a local instance
    write the same samples as the single-machine path, and a rerun converts nothing twice."""
    import ray
    from fixtures_data import make_cliff_npz

    from raytrain.data.convert import convert_record_set, spin_npz_record_set
    from raytrain.data.convert.distributed import shard_with_ray
    from raytrain.data.formats.tar import tar_samples
    from raytrain.data.io import open_url

    def members(out, options=None):
        found = []
        for entry in read_manifest(out, options)["shards"]:
            with open_url(f"{out}/{entry['name']}", "rb", options) as handle:
                found += [(raw["__key__"], raw["json"], raw["npz"], raw["jpg"]) for raw in tar_samples(handle)]
        return found

    npz, img_root, data = make_cliff_npz(tmp_path, n=7)
    record_set = spin_npz_record_set(npz, img_root, "coco")
    convert_record_set(record_set, str(tmp_path / "local"), maxcount=2, progress=False, printer=None)
    out = f"s3://{BUCKET}/coco-ray"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        lines = []
        summary = shard_with_ray(record_set, out, chunk=3, maxcount=2, storage_options=s3_options,
                                 printer=lines.append)
        assert summary.written == 7 and summary.ignored_keys == ["annot_id", "openpose"]
        assert "3 chunks of 3 records, 3 to convert as Ray tasks on CPU, 0 done before" in lines[0]
        assert members(out, s3_options) == members(str(tmp_path / "local"))
        assert verify_shards(out, s3_options) == []
        lines.clear()  # stopped before the manifest: a rerun converts nothing twice
        from raytrain.data.io import get_fs
        fs = get_fs(out, s3_options)[0]
        fs.rm(f"{BUCKET}/coco-ray/manifest.json")
        fs.pipe(f"{BUCKET}/coco-ray/WRITING.incomplete", b"stopped\n")
        shard_with_ray(record_set, out, chunk=3, maxcount=2, storage_options=s3_options, printer=lines.append)
        assert "0 to convert as Ray tasks on CPU, 3 done before" in lines[0]
        assert members(out, s3_options) == members(str(tmp_path / "local"))
    finally:
        ray.shutdown()
