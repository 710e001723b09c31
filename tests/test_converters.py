"""Converters: raw 3DPW release and SPIN-style npz -> schema-v1 shards (fixtures in the real formats)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import body_dir
from fixtures_3dpw import UNDETECTED, UNDETECTED_J24, make_3dpw_release, write_sequence_file
from fixtures_data import make_cliff_npz

from raytrain.cli import main as cli_main
from raytrain.data import ShardReader
from raytrain.data.convert import SequenceFileError, StorageConfig, convert_3dpw, convert_spin_npz, load_sequence_file
from raytrain.data.convert import spin_npz as spin_module
from raytrain.data.convert.sources import CONVERTERS
from raytrain.data.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]
#: Moves the synthetic model's rest root joint to where real SMPL has it (about 0.2 m
#: below the origin), so a converter that ignores J0 gets the camera translation wrong.
ROOT_OFFSET = torch.tensor([0.01, -0.22, 0.03])


@pytest.fixture(scope="module")
def offset_body_model(body_model):
    """The shared synthetic body model with its rest root joint moved by ROOT_OFFSET."""
    model = deepcopy(body_model)
    with torch.no_grad():
        for layer in model.smpl.values():
            layer.v_template += ROOT_OFFSET
    return model


@pytest.fixture(scope="module")
def release(tmp_path_factory, offset_body_model):
    return make_3dpw_release(tmp_path_factory.mktemp("3dpw") / "3DPW", offset_body_model)


@pytest.fixture(scope="module")
def converted(tmp_path_factory, release, offset_body_model):
    out = tmp_path_factory.mktemp("shards") / "3dpw-test"
    summary = convert_3dpw(release["root"], "test", str(out), body_model=offset_body_model,
                           maxcount=4, progress=False, printer=None)
    samples = list(ShardReader(str(out), shuffle=False, rank=0, world_size=1))
    return summary, samples, out


def _keys(samples):
    return sorted(sample.key for sample in samples)


# ----------------------------------------------------------------------------- 3DPW raw


def test_3dpw_one_sample_per_valid_actor_frame(converted, release):
    summary, samples, out = converted
    assert summary.written == release["num_valid"] == 10
    assert not summary.skipped and summary.total == 10
    assert _keys(samples) == sorted(release["valid_keys"])  # exactly once each
    manifest = read_manifest(str(out))
    assert manifest["num_samples"] == 10 and manifest["num_shards"] == 3
    assert manifest["source"] == "3dpw" and "non-commercial" in manifest["licence"]
    for sample in samples:
        assert sample.has_smpl and sample.has_3d and sample.has_2d
        assert sample.gender == ("male" if sample.key.endswith("/0") else "female")
        assert sample.image_size == (270, 480)
        assert sample.meta["principal_point"] == [135.0, 240.0]
        assert sample.focal == pytest.approx((490.0 + 494.0) / 2)


def test_3dpw_ground_truth_in_camera_frame_reprojects(converted, release, offset_body_model):
    _, samples, _ = converted
    for sample in samples:
        _, name, frame, actor = sample.key.split("/")
        frame, actor = int(frame), int(actor)
        seq = release["sequences"][name]
        K = seq["cam_intrinsics"]
        # 3D joints reproject through the intrinsics onto the stored 2D keypoints.
        joints = sample.joints_3d[:, :3].astype(np.float64)
        uvw = joints @ K.T
        np.testing.assert_allclose(uvw[:, :2] / uvw[:, 2:], sample.keypoints_2d[:, :2], atol=1e-2)
        # The stored camera-frame SMPL (pose, betas, cam_full) gives the stored joints and
        # the release's world joints (jointPositions) moved by cam_poses.
        with torch.no_grad():
            out = offset_body_model.forward_axis_angle(torch.as_tensor(sample.pose[None]),
                                                torch.as_tensor(sample.betas[None]),
                                                sample.gender)
        cam = seq["cam_poses"][frame]
        world = seq["jointPositions"][actor][frame].reshape(24, 3)
        expected = world @ cam[:3, :3].T + cam[:3, 3]
        np.testing.assert_allclose(out.joints_smpl[0].numpy() + sample.cam_full, expected, atol=2e-4)
        np.testing.assert_allclose(out.joints_j24[0].numpy() + sample.cam_full, joints, atol=2e-4)
        np.testing.assert_allclose(sample.betas, seq["betas"][actor][:10], atol=1e-6)
        # The box centre lands at the stored region's centre.
        centre = sample.affine[:, :2] @ sample.box[:2] + sample.affine[:, 2]
        np.testing.assert_allclose(centre, np.array(sample.stored_size) / 2, atol=1e-3)
        # Visibility: OpenPose's undetected joint has confidence 0, the others 1 (in view).
        confidence = sample.keypoints_2d[:, 2]
        if (actor, frame) == UNDETECTED[:2]:
            assert confidence[UNDETECTED_J24] == 0 and confidence.sum() == 23
        else:
            assert np.all(confidence == 1)


def test_3dpw_missing_keys_refused(tmp_path, release):
    root = tmp_path / "3DPW"
    data = dict(release["sequences"]["courtyard_fixture_00"])
    del data["cam_poses"], data["trans"]
    bad = root / "sequenceFiles" / "test" / "broken_seq_00.pkl"
    write_sequence_file(bad, data)
    with pytest.raises(SequenceFileError) as error:
        load_sequence_file(bad)
    message = str(error.value)
    assert "broken_seq_00.pkl" in message and "'cam_poses'" in message and "'trans'" in message
    # The driver checks every file before writing anything.
    out = tmp_path / "out"
    with pytest.raises(SequenceFileError, match="broken_seq_00.pkl"):
        convert_3dpw(root, "test", str(out), progress=False, printer=None)
    assert not out.exists()
    # A file that is not a pickle is refused too, naming it.
    bad.write_bytes(b"not a pickle")
    with pytest.raises(SequenceFileError, match="broken_seq_00.pkl"):
        load_sequence_file(bad)


class _Planted:
    def __reduce__(self):
        import os
        return (os.system, ("touch planted-by-pickle",))


def test_3dpw_sequence_pickles_are_read_with_the_restricted_unpickler(tmp_path, release, monkeypatch):
    """A crafted sequence file that would run code is refused naming the file; the
    release's own pickles (numpy arrays, lists, strings, numbers) still load."""
    import pickle
    monkeypatch.chdir(tmp_path)
    good = tmp_path / "good.pkl"
    write_sequence_file(good, dict(release["sequences"]["courtyard_fixture_00"]))
    assert load_sequence_file(good)["sequence"]
    data = dict(release["sequences"]["courtyard_fixture_00"], extra=_Planted())
    bad = tmp_path / "crafted_seq_00.pkl"
    bad.write_bytes(pickle.dumps(data, protocol=2))
    with pytest.raises(SequenceFileError, match="crafted_seq_00.pkl.*refused global posix.system"):
        load_sequence_file(bad)
    assert not (tmp_path / "planted-by-pickle").exists()


def test_3dpw_skips_with_reasons_limit_and_workers(tmp_path, release, offset_body_model, converted):
    root = tmp_path / "3DPW"
    copy = make_3dpw_release(root, offset_body_model)  # same seed: same data as `release`
    (root / "imageFiles" / "downtown_fixture_01" / "image_00001.jpg").unlink()  # 2 samples
    (root / "imageFiles" / "courtyard_fixture_00" / "image_00003.jpg").write_bytes(b"garbage")
    summary = convert_3dpw(root, "test", str(tmp_path / "out"), body_model=offset_body_model,
                           workers=2, progress=False, printer=None)
    assert summary.written == copy["num_valid"] - 4
    assert dict(summary.skipped) == {"missing_image": 2, "bad_image": 2}
    assert "image_00001.jpg" in summary.examples["missing_image"]
    assert "missing_image: 2" in summary.format() and "total 10" in summary.format()
    samples = list(ShardReader(str(tmp_path / "out"), shuffle=False, rank=0, world_size=1))
    assert len(samples) == 6
    # Parallel workers write the same samples in the same order as one process.
    reference = {s.key: s for s in converted[1]}
    for sample in samples:
        assert sample.jpeg == reference[sample.key].jpeg
        np.testing.assert_array_equal(sample.joints_3d, reference[sample.key].joints_3d)
    limited = convert_3dpw(root, "test", str(tmp_path / "limited"), body_model=offset_body_model,
                           limit=3, progress=False, printer=None)
    assert limited.total == 3 and read_manifest(str(tmp_path / "limited"))["num_samples"] == limited.written


def test_shard_3dpw_script(tmp_path, release):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(REPO / "datasets" / "shard_3dpw.py"), "--root", str(release["root"]),
         "--split", "test", "--out", str(out), "--limit", "2", "--workers", "1",
         "--no-progress", "--storage", "full", "--smpl-dir", body_dir()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "written 2" in result.stdout and "total 2" in result.stdout
    samples = list(ShardReader(str(out), shuffle=False, rank=0, world_size=1))
    assert len(samples) == 2 and samples[0].stored_size == (270, 480)
    # A missing split is a clear one-line error, not a traceback.
    result = subprocess.run(
        [sys.executable, str(REPO / "datasets" / "shard_3dpw.py"), "--root", str(release["root"]),
         "--split", "train", "--out", str(tmp_path / "none"), "--no-progress", "--smpl-dir", body_dir()],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "sequenceFiles/train" in result.stderr
    assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- SPIN npz


def _write_image(path: Path, width: int, height: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = rng.integers(0, 255, size=(height, width, 3), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


def _spin_npz(tmp_path: Path, n: int = 6, with_3d: bool = True) -> tuple[Path, Path, dict]:
    """A SPIN-style npz (H36M-like: part, S, pose, shape, gender) plus its images."""
    rng = np.random.default_rng(1)
    img_root = tmp_path / "images"
    names = [f"S1/Directions 1.54138969/frame_{i:06d}.jpg" for i in range(n)]
    for i, name in enumerate(names):
        _write_image(img_root / name, 200, 160, i)
    part = np.zeros((n, 24, 3))
    part[:, :, 0] = rng.uniform(60, 140, size=(n, 24))
    part[:, :, 1] = rng.uniform(40, 120, size=(n, 24))
    part[:, :, 2] = (rng.uniform(size=(n, 24)) > 0.2).astype(float)
    S = np.concatenate([rng.normal(scale=0.3, size=(n, 24, 3)) + [0, 0, 4.5],
                        np.ones((n, 24, 1))], axis=2)
    data = {
        "imgname": np.array(names),
        "center": rng.uniform(80, 120, size=(n, 2)),
        "scale": rng.uniform(0.4, 0.7, size=n),
        "part": part,
        "pose": rng.normal(scale=0.2, size=(n, 72)),
        "shape": rng.normal(size=(n, 10)),
        "has_smpl": np.array([1, 1, 0, 1, 1, 1]),
        "gender": np.array(["m", "f", "m", "f", "m", "f"]),
    }
    if with_3d:
        data["S"] = S * [1000, 1000, 1000, 1]  # millimetres: detected and converted
    path = tmp_path / "h36m_valid_protocol2.npz"
    np.savez(path, **data)
    return path, img_root, data


def test_spin_npz_roundtrip(tmp_path):
    path, img_root, data = _spin_npz(tmp_path)
    out = tmp_path / "out"
    summary = convert_spin_npz(path, img_root, str(out), "h36m", progress=False, printer=None,
                               storage=StorageConfig(crop_size=64))
    assert summary.written == 6 and summary.total == 6
    samples = {s.key: s for s in ShardReader(str(out), shuffle=False, rank=0, world_size=1)}
    assert read_manifest(str(out))["source"] == "h36m"
    for row in range(6):
        key = f"h36m/S1-Directions_1_54138969/frame_{row:06d}/{row}"
        sample = samples[key]
        np.testing.assert_allclose(sample.box, [*data["center"][row], 200 * data["scale"][row]],
                                   rtol=1e-6)
        np.testing.assert_allclose(sample.keypoints_2d, data["part"][row], rtol=1e-6)
        np.testing.assert_allclose(sample.joints_3d[:, :3], data["S"][row, :, :3] / 1000, atol=1e-6)
        np.testing.assert_allclose(sample.pose, data["pose"][row], rtol=1e-6)
        np.testing.assert_allclose(sample.betas, data["shape"][row], rtol=1e-6)
        assert sample.has_smpl == bool(data["has_smpl"][row]) and sample.has_3d and sample.has_2d
        assert sample.gender == ("male" if data["gender"][row] == "m" else "female")
        assert sample.image_size == (200, 160)
        assert sample.focal == pytest.approx(np.hypot(200, 160))  # default_focal
        assert sample.stored_size == (197, 197)  # round(2 * 64 / 0.65): the context rule
        assert sample.cam_full is None and sample.meta["imgname"].endswith(".jpg")


def test_spin_npz_skips_with_reasons(tmp_path):
    path, img_root, data = _spin_npz(tmp_path)
    (img_root / str(data["imgname"][0])).unlink()  # missing image
    (img_root / str(data["imgname"][1])).write_bytes(b"\xff\xd8 truncated")  # undecodable
    data = dict(data)
    data["pose"] = data["pose"].copy()
    data["pose"][2, 5] = np.nan  # NaN label
    data["center"] = data["center"].copy()
    data["center"][3] = [5000.0, 5000.0]  # box outside the image
    np.savez(path, **data)
    out = tmp_path / "out"
    summary = convert_spin_npz(path, img_root, str(out), "coco", workers=2, progress=False,
                               printer=None)
    assert summary.written == 2 and summary.total == 6
    assert dict(summary.skipped) == {"missing_image": 1, "bad_image": 1, "nonfinite_label": 1,
                                     "box_outside_image": 1}
    keys = _keys(ShardReader(str(out), shuffle=False, rank=0, world_size=1))
    assert [k.rsplit("/", 1)[1] for k in keys] == ["4", "5"]


def test_spin_npz_3dpw_form_and_scripts(tmp_path):
    """SPIN's 3DPW test file has no part/S: SMPL only, through shard_3dpw.py --npz."""
    path, img_root, data = _spin_npz(tmp_path, with_3d=False)
    del data["part"], data["has_smpl"]
    np.savez(path, **data)
    out = tmp_path / "out"
    assert cli_main(["shard", "3dpw", "--npz", str(path), "--img-root", str(img_root), "--out",
                     str(out), "--workers", "1", "--no-progress"]) == 0
    samples = list(ShardReader(str(out), shuffle=False, rank=0, world_size=1))
    assert len(samples) == 6
    assert all(s.has_smpl and not s.has_2d and not s.has_3d for s in samples)
    assert "3DPW" in read_manifest(str(out))["licence"]
    # The scripts are thin wrappers of `raytrain shard <source>`, one registry entry each.
    for source in ("3dpw", "h36m", "mpi_inf_3dhp", "coco", "mpii"):
        script = (REPO / "datasets" / f"shard_{source}.py").read_text()
        assert f'main(["shard", "{source}", *sys.argv[1:]])' in script
        assert source in CONVERTERS and source in spin_module.SOURCES
    assert cli_main(["shard", "mpii", "--npz", str(path), "--img-root", str(img_root), "--out",
                     str(tmp_path / "mpii"), "--limit", "2", "--workers", "1",
                     "--no-progress"]) == 0
    manifest = json.loads((tmp_path / "mpii" / "manifest.json").read_text())
    assert manifest["num_samples"] == 2 and "BSD" in manifest["licence"]


def test_spin_npz_bad_files(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, imgname=np.array(["a.jpg"]), center=np.zeros((1, 2)))
    with pytest.raises(ValueError, match=r"bad.npz: missing keys \['scale'\]"):
        spin_module.read_spin_npz(path)
    np.savez(path, imgname=np.array(["a.jpg"], dtype=object), center=np.zeros((1, 2)),
             scale=np.ones(1))
    with pytest.raises(ValueError, match="object arrays"):
        spin_module.read_spin_npz(path)


# ----------------------------------------------------------------------------- CLIFF pseudo-GT


def test_cliff_npz_keeps_focal_and_full_camera(tmp_path):
    path, img_root, data = make_cliff_npz(tmp_path)
    lines = []
    summary = convert_spin_npz(path, img_root, str(tmp_path / "out"), "coco", progress=False,
                               printer=lines.append, storage=StorageConfig(crop_size=64))
    assert summary.written == 5
    assert summary.ignored_keys == ["annot_id", "openpose"]  # named, not dropped silently
    assert "ignored input keys (not converted): annot_id, openpose" in lines[0]
    samples = list(ShardReader(str(tmp_path / "out"), shuffle=False, rank=0, world_size=1))
    assert len(samples) == 5
    for row, sample in enumerate(samples):
        assert sample.key.endswith(f"/{row}")
        assert sample.focal == data["focal_l"][row]  # exact: the json keeps float64
        assert sample.meta["cam_full"] == list(data["global_t"][row])
        np.testing.assert_array_equal(sample.cam_full, data["global_t"][row].astype(np.float32))
        assert sample.has_smpl and sample.has_2d
    # has_cam follows cam_full into the training batch
    from raytrain.data.crop import MultiRoICropper
    from raytrain.geometry import build_schedule
    cropper = MultiRoICropper(build_schedule("fixed", 2, offset=0.1, scales=(1.5,)), crop_size=64)
    item = cropper(samples[0], np.random.default_rng(0))
    assert item["has_cam"] and np.allclose(item["cam_full"], data["global_t"][0], rtol=1e-6)


def test_spin_npz_without_cliff_keys_has_no_camera(tmp_path):
    path, img_root, data = make_cliff_npz(tmp_path, n=2)
    del data["global_t"], data["openpose"], data["annot_id"]
    data["focal_length"] = np.float64(500.0)  # one focal for the whole file
    np.savez(path, **data)
    summary = convert_spin_npz(path, img_root, str(tmp_path / "out"), "coco", progress=False,
                               printer=None)
    assert summary.ignored_keys == [] and "focal_l" in data  # focal_l wins over focal_length
    samples = list(ShardReader(str(tmp_path / "out"), shuffle=False, rank=0, world_size=1))
    assert [s.focal for s in samples] == pytest.approx(list(data["focal_l"]))
    assert all(s.cam_full is None for s in samples)
    np.savez(path, **{**data, "global_t": np.zeros((2, 2))})
    with pytest.raises(ValueError, match=r"global_t has shape \(2, 2\), expected \(2, 3\)"):
        spin_module.read_spin_npz(path)


def test_shard_command_bad_input_is_one_line(tmp_path, capsys):
    args = ["--img-root", str(tmp_path), "--out", str(tmp_path / "out"), "--no-progress"]
    assert cli_main(["shard", "coco", "--npz", str(tmp_path / "none.npz"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raytrain shard: error: ") and "none.npz: npz file not found" in err
    np.savez(tmp_path / "short.npz", imgname=np.array(["a.jpg"]), center=np.zeros((1, 2)))
    assert cli_main(["shard", "mpii", "--npz", str(tmp_path / "short.npz"), *args]) == 2
    assert "missing keys ['scale']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["shard", "lsp", "--npz", "x"])  # argparse names the known sources
    assert "invalid choice: 'lsp'" in capsys.readouterr().err


def test_3dpw_summary_names_ignored_sequence_keys(converted):
    summary = converted[0]
    assert summary.ignored_keys == ["img_frame_ids", "jointPositions"]
    assert "ignored input keys (not converted): img_frame_ids, jointPositions" in summary.format()


# ----------------------------------------------------------------------------- Ray tasks


def _shard_members(out: Path) -> list[tuple[str, dict]]:
    """Every (key, {extension: bytes}) of a shard set, in manifest order."""
    from raytrain.data.formats.tar import tar_samples

    members = []
    for entry in read_manifest(str(out))["shards"]:
        with open(out / entry["name"], "rb") as handle:
            members += [(raw["__key__"], {k: v for k, v in raw.items() if not k.startswith("__")})
                        for raw in tar_samples(handle)]
    return members


def test_task_options_ask_for_data_cpu_where_the_cluster_has_it():
    from raytrain.data.convert.distributed import chunk_ranges, task_options

    assert task_options({"CPU": 8.0}) == {"num_cpus": 1, "max_retries": 3}
    assert task_options({"CPU": 8.0, "data_cpu": 64.0})["resources"] == {"data_cpu": 1}
    assert chunk_ranges(10, 4) == [(0, 0, 4), (1, 4, 8), (2, 8, 10)]


@pytest.mark.ray
@pytest.mark.slow
def test_shard_3dpw_with_ray_gives_the_same_samples(tmp_path, release, capsys):
    import ray

    from raytrain.data.shards import verify_shards

    common = ["--root", str(release["root"]), "--split", "test", "--smpl-dir", body_dir(),
              "--maxcount", "2", "--no-progress"]
    local, tasks = tmp_path / "local", tmp_path / "ray"
    assert cli_main(["shard", "3dpw", *common, "--out", str(local), "--workers", "1"]) == 0
    ray.init(address="local", num_cpus=2, resources={"data_cpu": 2}, include_dashboard=False)
    try:
        assert cli_main(["shard", "3dpw", *common, "--out", str(tasks), "--ray", "--chunk", "4"]) == 0
        out = capsys.readouterr().out
        assert "3 chunks of 4 records, 3 to convert as Ray tasks on data_cpu, 0 done before" in out
        assert f"written {release['num_valid']}" in out and "img_frame_ids" in out
        expected = _shard_members(local)
        assert len(expected) == release["num_valid"] and _shard_members(tasks) == expected
        assert verify_shards(str(tasks)) == []
        # chunks of 4 records cut at shard boundaries of 2: the very same shard bytes
        digests = [[e["sha256"] for e in read_manifest(str(d))["shards"]] for d in (local, tasks)]
        assert digests[0] == digests[1]
        # a finished set is not written over without --overwrite (the local writer's rule)
        assert cli_main(["shard", "3dpw", *common, "--out", str(tasks), "--ray", "--chunk", "4"]) == 2
        assert "already holds a shard set" in capsys.readouterr().err
        # restartable: a conversion stopped before its manifest, one chunk lost (its part
        # record and a shard): that chunk is converted again, alone
        (tasks / "manifest.json").unlink()
        (tasks / "WRITING.incomplete").write_text("stopped\n")
        (tasks / "parts" / "part-00001.json").unlink()
        (tasks / "part-00001-000000.tar").unlink()
        assert cli_main(["shard", "3dpw", *common, "--out", str(tasks), "--ray", "--chunk", "4"]) == 0
        assert "1 to convert as Ray tasks on data_cpu, 2 done before" in capsys.readouterr().out
        assert _shard_members(tasks) == expected and verify_shards(str(tasks)) == []
        assert not (tasks / "WRITING.incomplete").exists()
    finally:
        ray.shutdown()
@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(500)
def test_shard_ray_never_reuses_another_inputs_chunks_and_a_killed_folder_is_refused(tmp_path, capsys):
    """A real `raytrain shard coco --ray` killed after its first chunk leaves a folder the
    reader refuses; rerun with another input of the same record count, every chunk is
    converted again (none reused); a finished folder needs --overwrite."""
    import os
    import signal
    import time

    import ray

    from raytrain.data import ManifestError
    npz_a, img_root, data = make_cliff_npz(tmp_path, n=24)
    npz_b = tmp_path / "other.npz"
    np.savez(npz_b, **{**data, "pose": data["pose"] * 0.5, "global_t": data["global_t"] + [0.0, 0.0, 1.0]})

    def args(npz, out, *extra):
        return ["shard", "coco", "--npz", str(npz), "--img-root", str(img_root), "--out", str(out),
                "--chunk", "1", "--maxcount", "2", "--no-progress", *extra]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "raytrain.cli", *args(npz_a, killed, "--ray")],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 300
    while not (killed / "parts" / "part-00000.json").exists():
        assert proc.poll() is None and time.time() < deadline, "the conversion ended before a part"
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "manifest.json").exists() and (killed / "WRITING.incomplete").exists()
    with pytest.raises(ManifestError, match="did not finish"):
        ShardReader(str(killed), rank=0, world_size=1)

    for name, npz in (("local_a", npz_a), ("local_b", npz_b)):
        assert cli_main(args(npz, tmp_path / name, "--workers", "1")) == 0
    capsys.readouterr()
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        assert cli_main(args(npz_b, killed, "--ray")) == 0  # another input into the killed folder
        assert ", 0 done before" in capsys.readouterr().out
        assert _shard_members(killed) == _shard_members(tmp_path / "local_b") != _shard_members(tmp_path / "local_a")
        assert not (killed / "WRITING.incomplete").exists() and len(ShardReader(str(killed), rank=0, world_size=1))
        assert cli_main(args(npz_a, killed, "--ray")) == 2  # a finished set needs --overwrite
        assert "already holds a shard set" in capsys.readouterr().err
        assert cli_main(args(npz_a, killed, "--ray", "--overwrite")) == 0
        assert ", 0 done before" in capsys.readouterr().out
        assert _shard_members(killed) == _shard_members(tmp_path / "local_a")
    finally:
        ray.shutdown()


@pytest.mark.timeout(300)
@pytest.mark.skipif("PYTEST_XDIST_WORKER" in os.environ,
                    reason="beside another test under xdist the interrupted command has not exited within "
                           "60 s (a hang not yet explained); run it alone: pytest tests/test_converters.py -k ctrl_c")
def test_ctrl_c_during_shard_is_one_line_and_leaves_a_refused_folder(tmp_path):
    """SIGINT to the command's process group (Ctrl-C in a terminal), worker processes
    included: one line, no traceback from the command or its workers, exit 130, and the
    half-written folder is refused by the reader."""
    import os
    import signal
    import time

    from raytrain.data import ManifestError
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "raytrain.cli", "shard", "synthetic", "--out", str(out),
                             "--n", "2000", "--workers", "2", "--maxcount", "8"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.time() + 200
    while not list(out.glob("*.tar")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert err.strip().splitlines()[-1].startswith("raytrain: interrupted: the output folder stays marked unfinished")
    with pytest.raises(ManifestError, match="did not finish"):
        ShardReader(str(out), rank=0, world_size=1)


# ----------------------------------------------------------------------------- untrusted input


def _run_spin(argv):
    """`raytrain shard h36m ARGV`: (exit status, stderr)."""
    import contextlib
    import io
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli_main(["shard", "h36m", *argv])
        except SystemExit as stop:
            code = stop.code
    return code, err.getvalue().strip()


@pytest.mark.parametrize("damage, message", [
    (lambda d: d.update(focal_length=np.ones(4)), "focal_length has shape (4,)"),
    (lambda d: d.update(imgname=np.array([b"ok.jpg"] * 5 + [b"caf\xe9.jpg"])), "row 5 is not UTF-8"),
    (lambda d: d.update(imgname=np.array(["../../etc/passwd.jpg"] + ["a.jpg"] * 5)), "row 0"),
    (lambda d: d.update(imgname=np.array(["/etc/passwd.jpg"] * 6)), "inside --img-root"),
    (lambda d: d.update(center=np.zeros((6, 3))), "center has shape"),
])
def test_spin_npz_input_errors_are_one_line_before_anything_is_written(tmp_path, damage, message):
    path, img_root, data = _spin_npz(tmp_path)
    data = dict(data)
    damage(data)
    np.savez(path, **data)
    out = tmp_path / "out"
    code, err = _run_spin(["--npz", str(path), "--img-root", str(img_root), "--out", str(out),
                           "--workers", "1", "--no-progress"])
    assert code == 2 and message in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_spin_npz_text_file_is_not_called_object_arrays(tmp_path):
    path = tmp_path / "labels.npz"
    path.write_text("imgname,center\n")
    with pytest.raises(ValueError, match="not an npz file") as caught:
        spin_module.read_spin_npz(path)
    assert "object arrays" not in str(caught.value)


def test_conversion_that_writes_nothing_fails_and_leaves_nothing(tmp_path):
    path, img_root, data = _spin_npz(tmp_path)
    for name in data["imgname"]:
        (img_root / str(name)).write_bytes(b"not an image")
    out = tmp_path / "out"
    code, err = _run_spin(["--npz", str(path), "--img-root", str(img_root), "--out", str(out),
                           "--workers", "1", "--no-progress"])
    assert code == 2 and "nothing written" in err and "bad_image: 6" in err
    assert not list(out.glob("*")) if out.exists() else True
    code, err = _run_spin(["--npz", str(path), "--img-root", str(tmp_path / "missing"), "--out",
                           str(out), "--workers", "1", "--no-progress"])
    assert code == 2 and "--img-root" in err


def test_existing_output_needs_overwrite_and_a_stale_manifest_is_never_read(tmp_path):
    """Re-converting into a shard folder is refused without --overwrite; with it, the old
    manifest goes first, so an interrupted run leaves no manifest beside new shards, and
    a folder whose write did not finish is refused by the reader."""
    from raytrain.data import ManifestError
    from raytrain.data.shards import INCOMPLETE_NAME
    path, img_root, _ = _spin_npz(tmp_path)
    out = tmp_path / "out"
    args = ["--npz", str(path), "--img-root", str(img_root), "--out", str(out), "--workers", "1",
            "--no-progress", "--maxcount", "2"]
    assert _run_spin(args)[0] == 0
    code, err = _run_spin(args)
    assert code == 2 and "--overwrite" in err
    assert _run_spin([*args, "--overwrite", "--limit", "4"])[0] == 0
    assert read_manifest(str(out))["num_samples"] == 4 and len(list(out.glob("*.tar"))) == 2
    (out / INCOMPLETE_NAME).write_text("interrupted")  # a writer killed half-way
    with pytest.raises(ManifestError, match="did not finish"):
        ShardReader(str(out), rank=0, world_size=1)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    code, err = _run_spin([*args[:4], "--out", str(tmp_path / "mine"), "--overwrite", "--no-progress"])
    assert code == 2 and "not shards" in err and (tmp_path / "mine" / "notes.txt").exists()


def test_a_row_the_reader_would_refuse_is_not_written(tmp_path):
    """Finite but absurd labels (a focal of 1e9 px, a pose of 1e4 rad) are skipped at
    conversion with the reader's reason, not written to be dropped at training time."""
    path, img_root, data = _spin_npz(tmp_path)
    data = dict(data)
    data["focal_length"] = np.array([1e9, 500, 500, 500, 500, 500], dtype=np.float64)
    data["pose"] = data["pose"].copy()
    data["pose"][1, 3:6] = 1e4
    np.savez(path, **data)
    summary = convert_spin_npz(path, img_root, str(tmp_path / "out"), "h36m", progress=False, printer=None,
                               storage=StorageConfig(crop_size=64))
    assert summary.written == 4 and dict(summary.skipped) == {"rejected_by_reader": 2}
    assert "label_out_of_range" in summary.examples["rejected_by_reader"]
