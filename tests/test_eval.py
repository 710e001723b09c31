"""`raytrain eval`: the oracle check, a known rigid perturbation, and evaluation of a real
checkpoint reproducing the validation it was trained with. No mocks: synthetic shards,
the synthetic body model, a small network trained for two steps with the real loop."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import body_dir

from raytrain.body import load_body_model
from raytrain.checkpoints import Checkpoint
from raytrain.cli import main as cli_main
from raytrain.config import load_config
from raytrain.data.shards import write_shards
from raytrain.eval.protocol import validate
from raytrain.eval.report import write_report
from raytrain.eval.run import (
    Target,
    data_name,
    eval_config,
    evaluate_model,
    protocol_of,
    run_eval,
    select_checkpoints,
    sequence_of,
    summarize,
)
from raytrain.synthetic.people import SyntheticConfig, SyntheticGenerator, encode_raw
from raytrain.train.loop import run_loop
from raytrain.train.session import BareSession

GENDERS = ("neutral", "male", "female")
N_VAL = 12


def small_overrides(root):
    return [f"data.train_shards={root / 'train'}", f"data.val_shards={root / 'val'}",
            "data.crop_size=64", "data.batch_size=4", "data.val_batch_size=5",
            "data.loader_workers=0", "model.backbone=mobilenetv3_small_050",
            "model.decoder_hidden=32", "model.fusion_hidden=16", "model.proj_dim=8",
            "rois.num_rois=2", "optim.max_steps=2", "train.val_every=1",
            "train.checkpoint_every=1", "train.tensorboard=false", "name=evaltest",
            f"model.smpl_dir={body_dir()}"]


def write_synthetic(out, n, seed, genders=("neutral",), sequences=1):
    """Synthetic people into shards; genders and sequence names cycle over the samples."""
    generator = SyntheticGenerator(SyntheticConfig(crop_size=64))
    samples = []
    for raw in generator.samples(seed, range(n)):
        index = int(raw["key"].split("/")[2])
        raw["meta"]["gender"] = genders[index % len(genders)]
        raw["key"] = f"synthetic/seq{index % sequences}/{index:08d}/0"
        samples.append(encode_raw(raw))
    return write_shards(samples, str(out), "synthetic", "test", maxcount=5)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaldata")
    write_synthetic(root / "train", 8, seed=1)
    write_synthetic(root / "val", N_VAL, seed=2, genders=GENDERS, sequences=3)
    return root


@pytest.fixture(scope="module")
def body():
    return load_body_model(body_dir(), genders=GENDERS)


@pytest.fixture(scope="module")
def trained(data_root):
    """Two trials of the real training loop (bare session), a checkpoint after each step."""
    runs = {}
    for trial, lr in (("trial_a", 1e-3), ("trial_b", 1e-4)):
        cfg = load_config(None, small_overrides(data_root) + [f"optim.lr={lr}"])
        session = BareSession(str(data_root / "experiment" / trial), device="cpu")
        run_loop(cfg, session)
        runs[trial] = (cfg, session)
    return runs


def oracle_predictor(body, rotation=None):
    """Ground-truth parameters as predictions (optionally the whole mesh rigidly rotated)."""
    def predict(batch):
        gt = body.forward_axis_angle(batch["pose"], batch["betas"], gender=batch.get("gender"))
        vertices, joints = gt.vertices, gt.joints_h36m
        if rotation is not None:
            shift = torch.tensor([0.3, -0.1, 2.0])
            vertices = vertices @ rotation.T + shift
            joints = joints @ rotation.T + shift
        n, m = batch["boxes"].shape[:2]
        return {"vertices": vertices, "joints_h36m": joints,
                "cam_full": batch["cam_full"][:, None].expand(n, m, 3)}
    return predict


def axis_angle_matrix(axis, angle):
    axis = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * k + (1 - math.cos(angle)) * k @ k


def eval_cfg(data_root):
    return eval_config(load_config(None, small_overrides(data_root)), str(data_root / "val"), smpl_dir=body_dir())


def test_oracle_gives_zero_on_every_metric(data_root, body, tmp_path):
    cfg = eval_cfg(data_root)
    ev = evaluate_model(cfg, None, body, torch.device("cpu"), predictor=oracle_predictor(body))
    assert len(ev.keys) == N_VAL and ev.gendered
    for name in ("mpjpe", "pa_mpjpe", "pve", "cam_err"):
        assert np.abs(getattr(ev, name)).max() < 1e-3, name
    assert np.abs(ev.per_joint).max() < 1e-3
    checkpoint = Checkpoint(path=tmp_path, commit={"step": 0, "sha256": ""}, origin=str(tmp_path))
    target = Target(checkpoint=checkpoint, config=cfg, config_source="test")
    metrics = summarize(ev, target, str(data_root / "val"))
    assert set(metrics["per_sequence"]) == {"seq0", "seq1", "seq2"}
    values = [metrics["overall"][k] for k in ("mpjpe", "pa_mpjpe", "pve", "cam_err")]
    values += [v for s in metrics["per_sequence"].values() for k, v in s.items()
               if k not in ("num_samples", "const_cam_err", "scale_ratio")]
    values += list(metrics["per_joint"].values())
    assert max(abs(v) for v in values) < 1e-3
    # the camera baselines beside the error: the true camera is unbiased; one constant camera
    # for people at different depths and places is not the truth
    np.testing.assert_allclose(ev.scale_ratio, 1.0, atol=1e-5)
    assert metrics["overall"]["scale_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["overall"]["const_cam_err"] > 10.0 and len(metrics["constant_camera"]["crop_cam"]) == 3
    # the gendered ground truth matters: the neutral mesh of a male/female sample is not 0 mm
    batch_pose = torch.stack([torch.zeros(72)] * 2)
    betas = torch.full((2, 10), 1.0)
    male = body.forward_axis_angle(batch_pose, betas, gender=["male", "male"]).vertices
    neutral = body.forward_axis_angle(batch_pose, betas, gender=["neutral", "neutral"]).vertices
    assert (male - neutral).norm(dim=-1).mean() > 1e-3


def test_rigid_rotation_gives_zero_pa_mpjpe_and_expected_mpjpe(data_root, body):
    angle, axis = math.radians(20.0), np.array([0.3, 1.0, -0.2])
    rotation = torch.tensor(axis_angle_matrix(axis, angle), dtype=torch.float32)
    cfg = eval_cfg(data_root)
    ev = evaluate_model(cfg, None, body, torch.device("cpu"),
                        predictor=oracle_predictor(body, rotation))
    assert np.abs(ev.pa_mpjpe).max() < 0.05
    # Independently: rotating a point d (relative to the pelvis, which moves with the mesh)
    # by angle a about unit axis u moves it by 2 sin(a/2) |d - (d.u) u|.
    unit = axis / np.linalg.norm(axis)
    lsp_from_h36m = [6, 5, 4, 1, 2, 3, 16, 15, 14, 11, 12, 13, 8, 10]     # CONVENTIONS.md
    expected_mpjpe, expected_pve = {}, {}
    batch = _gt_batch(data_root)
    gt = body.forward_axis_angle(batch["pose"], batch["betas"], gender=batch["gender"])
    j14 = gt.joints_h36m.double().numpy()[:, lsp_from_h36m]
    pelvis = j14[:, [2, 3]].mean(axis=1, keepdims=True)                     # mid-hips
    for points, out in ((j14, expected_mpjpe), (gt.vertices.double().numpy(), expected_pve)):
        d = points - pelvis
        perp = d - (d @ unit)[..., None] * unit
        moved = 1000 * 2 * math.sin(angle / 2) * np.linalg.norm(perp, axis=-1).mean(axis=1)
        out.update(zip(batch["keys"], moved))
    expected_mpjpe = [expected_mpjpe[k] for k in ev.keys]
    expected_pve = [expected_pve[k] for k in ev.keys]
    np.testing.assert_allclose(ev.mpjpe, expected_mpjpe, atol=0.05)
    np.testing.assert_allclose(ev.pve, expected_pve, atol=0.05)
    assert np.mean(expected_mpjpe) > 50.0        # a real perturbation, not a no-op


def _gt_batch(data_root):
    """Ground-truth parameters, genders and keys of every val sample, read from the shards."""
    from raytrain.data.reader import ShardReader
    samples = list(ShardReader(str(data_root / "val"), shuffle=False, decode_images=False))
    return {"pose": torch.stack([torch.as_tensor(s.pose) for s in samples]),
            "betas": torch.stack([torch.as_tensor(s.betas) for s in samples]),
            "gender": [s.gender for s in samples], "keys": [s.key for s in samples]}


def test_run_eval_on_checkpoint_reproduces_validation(data_root, trained, body, tmp_path):
    cfg, session = trained["trial_a"]
    checkpoint = session.latest_checkpoint_dir()
    out = tmp_path / "report"
    result = run_eval(checkpoint=checkpoint, data=str(data_root / "val"), out=str(out), quiet=True, smpl_dir=body_dir())
    for name in ("metrics.json", "report.md", "per_joint.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    overlays = sorted((out / "overlays").glob("*.png"))
    assert 1 <= len(overlays) <= 4
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["overall"]["num_samples"] == N_VAL
    assert set(metrics["per_sequence"]) == {"seq0", "seq1", "seq2"}
    assert len(metrics["per_joint"]) == 14
    assert metrics["gendered_gt"] is True
    report = (out / "report.md").read_text()
    assert "![per-joint MPJPE](per_joint.png)" in report and "overlays/" in report
    # the same MPJPE as the validation recorded in the checkpoint and as validate() now
    stored = metrics["stored_validation"]["val_mpjpe"]
    assert abs(result["overall"]["mpjpe"] - stored) < 0.1
    model = _model(cfg, body, session)
    fresh = validate(cfg, model, body, session, torch.device("cpu"))
    assert abs(result["overall"]["mpjpe"] - fresh["val_mpjpe"]) < 0.1
    assert abs(result["overall"]["pa_mpjpe"] - fresh["val_pa_mpjpe"]) < 0.1
    assert abs(result["overall"]["pve"] - fresh["val_pve"]) < 0.1
    assert abs(result["overall"]["scale_ratio"] - fresh["val_scale_ratio"]) < 1e-3
    assert result["overall"]["const_cam_err"] > 0 and "constant camera" in report


def test_experiment_best_and_top_k(data_root, trained, tmp_path):
    experiment = data_root / "experiment"
    targets = select_checkpoints(str(experiment), best=True, top=2)
    assert len(targets) == 2 and targets[0].path.parent != targets[1].path.parent
    stored = [t.stored_metrics["val_mpjpe"] for t in targets]
    assert stored == sorted(stored)
    every = [json.loads((p / "COMMIT.json").read_text()) for p in experiment.rglob("step_*")]
    assert len(every) == 4
    out = tmp_path / "top2"
    result = cli_main(["eval", "--experiment", str(experiment), "--best", "--top", "2",
                       "--data", str(data_root / "val"), "--out", str(out)])
    assert result == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [row["rank"] for row in summary["evaluations"]] == [1, 2]
    for row in summary["evaluations"]:
        assert abs(row["mpjpe"] - row["stored_val_mpjpe"]) < 0.1
        assert (Path(row["out"]) / "metrics.json").is_file()
    # default output directory: <experiment>/eval/<data name>
    default = run_eval(experiment=str(experiment), best=True, data=str(data_root / "val"), quiet=True,
                       smpl_dir=body_dir())
    assert default["out"] == str(experiment / "eval" / "val")
    assert default["checkpoint"] == str(targets[0].path)


def test_checkpoint_errors_are_clear(data_root, trained, tmp_path, capsys):
    with pytest.raises(Exception, match="--experiment"):
        run_eval(checkpoint=str(data_root / "experiment"), data=str(data_root / "val"), quiet=True, smpl_dir=body_dir())
    with pytest.raises(Exception, match="exactly one"):
        run_eval(data=str(data_root / "val"))
    capsys.readouterr()
    assert cli_main(["eval", "--checkpoint", str(tmp_path / "none"), "--data", str(data_root / "val")]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"raytrain: checkpoint error: {tmp_path / 'none'} is not a complete checkpoint directory "
        "(state.pt + COMMIT.json)"]


def test_helpers():
    assert sequence_of("3dpw/downtown_walking_00/000123/1") == "downtown_walking_00"
    assert data_name("shards/3dpw-test/") == "3dpw-test"
    assert data_name("shards/val/manifest.json") == "val"
    assert data_name("s3://bucket/h36m-p2-{000000..000009}.tar") == "h36m-p2"
    assert protocol_of(["h36m/S9_walking/1/0", "h36m/S11_eating/2/0"])["name"] == "h36m_p2"
    assert "S1" in protocol_of(["h36m/S1_walking/1/0"])["note"]
    assert protocol_of(["3dpw/seq/1/0"])["name"] == "3dpw"


def test_a_full_disk_never_leaves_a_truncated_metrics_json(tmp_path):
    """A write that fails half-way (the file-size limit stands in for a full disk) leaves
    the previous metrics.json, or none, and no temporary file."""
    import subprocess
    import sys
    script = (
        "import resource, signal, sys\n"
        "from pathlib import Path\n"
        "from raytrain.eval.report import write_report\n"
        "out = Path(sys.argv[1])\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))\n"
        "try:\n"
        "    write_report(out, {'padding': list(range(100000)), 'per_joint': {}})\n"
        "except OSError as err:\n"
        "    print('failed', err.errno)\n"
    )
    for before in (None, '{"old": true}'):
        out = tmp_path / f"out-{before is None}"
        out.mkdir()
        if before:
            (out / "metrics.json").write_text(before)
        run = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
        assert run.stdout.startswith("failed"), run.stdout + run.stderr
        metrics = out / "metrics.json"
        assert (metrics.read_text() == before) if before else not metrics.exists()
        assert [p.name for p in out.iterdir()] == (["metrics.json"] if before else [])


def test_constant_camera_and_scale_ratio_by_hand():
    """One crop camera for everyone: it is the median and its constant camera is exact; a
    camera twice as far away has half the true scale."""
    from raytrain.eval.protocol import constant_camera_error, median_crop_camera, scale_ratio
    from raytrain.geometry.camera import cam_crop_to_full
    boxes = torch.tensor([[320.0, 240.0, 200.0], [100.0, 300.0, 80.0], [500.0, 100.0, 150.0]], dtype=torch.float64)
    size = torch.tensor([[640.0, 480.0]] * 3, dtype=torch.float64)
    focal = torch.tensor([800.0, 900.0, 1000.0], dtype=torch.float64)
    crop = torch.tensor([0.9, 0.05, -0.1], dtype=torch.float64)
    full = cam_crop_to_full(crop.expand(3, 3), boxes, size, focal)
    torch.testing.assert_close(median_crop_camera(full, boxes, size, focal), crop)
    assert constant_camera_error(crop, full, boxes, size, focal).abs().max() < 1e-6
    far = full * torch.tensor([1.0, 1.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(scale_ratio(far, full), torch.full((3,), 0.5, dtype=torch.float64))
    assert (constant_camera_error(crop, far, boxes, size, focal) > 1000 * full[:, 2] * 0.9).all()


def test_report_writes_every_file_without_overlays(tmp_path):
    metrics = {"data": "d", "checkpoint": "c", "protocol": {"name": "mesh", "note": "n"},
               "overall": {"mpjpe": 1.0, "pa_mpjpe": 0.5, "pve": 2.0, "num_samples": 3},
               "per_sequence": {"s": {"mpjpe": 1.0, "pa_mpjpe": 0.5, "pve": 2.0, "num_samples": 3}},
               "per_joint": {f"j{i}": float(i) for i in range(14)}, "stored_validation": {}}
    paths = write_report(tmp_path, metrics)
    assert all(Path(p).is_file() for p in paths.values())


# ---------------------------------------------------------------- untrusted data and configs


def test_eval_scores_each_good_sample_once_and_reports_skipped(data_root, trained, body, tmp_path):
    """One undecodable sample among the validation data: evaluation and validation score
    the others once each (no copy in its slot) and report the skipped one by reason."""
    from raytrain.data.formats.tar import tar_samples
    samples = []
    for shard in sorted((data_root / "val").glob("*.tar")):
        with open(shard, "rb") as handle:
            samples += [{k: v for k, v in raw.items() if k in ("__key__", "jpg", "json", "npz")}
                        for raw in tar_samples(handle)]
    samples[4]["jpg"] = b"\xff\xd8 not a frame \xff\xd9"
    write_shards(samples, str(tmp_path / "damaged"), "synthetic", "test", maxcount=5)
    cfg, session = trained["trial_a"]
    out = tmp_path / "report"
    result = run_eval(checkpoint=session.latest_checkpoint_dir(), data=str(tmp_path / "damaged"),
                      out=str(out), quiet=True, smpl_dir=body_dir())
    assert result["overall"]["num_samples"] == N_VAL - 1
    assert result["skipped"] == {"total": 1, "by_reason": {"bad_jpeg": 1}}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["skipped"]["by_reason"] == {"bad_jpeg": 1}
    assert "Skipped 1 bad sample" in (out / "report.md").read_text()
    evaluation = evaluate_model(eval_config(cfg, str(tmp_path / "damaged"), smpl_dir=body_dir()),
                                _model(cfg, body, session), body, torch.device("cpu"), overlays=0)
    assert len(evaluation.keys) == len(set(evaluation.keys)) == N_VAL - 1
    assert samples[4]["__key__"] not in evaluation.keys
    val_cfg = load_config(None, small_overrides(data_root) + [f"data.val_shards={tmp_path / 'damaged'}",
                                                              "data.max_bad_fraction=0.5"])
    metrics = validate(val_cfg, _model(cfg, body, session), body, session, torch.device("cpu"))
    assert metrics["val_samples"] == N_VAL - 1 and metrics["val_skipped"] == 1


def _model(cfg, body, session):
    from raytrain.checkpoints import load_trained_model, verify_local
    return load_trained_model(verify_local(session.latest_checkpoint_dir()), "cpu", body_model=body)


def test_eval_config_that_differs_from_the_checkpoint_is_refused(data_root, trained, tmp_path):
    """cam_init changes nothing in the tensor shapes: the weights would load and be scored
    under another camera start without a word."""
    import yaml
    cfg, session = trained["trial_a"]
    from raytrain.config import to_dict
    raw = to_dict(cfg)
    raw["model"]["cam_init"] = "mean" if cfg.model.cam_init != "mean" else "consistent"
    path = tmp_path / "other.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = cli_main(["eval", "--checkpoint", session.latest_checkpoint_dir(), "--config", str(path),
                     "--data", str(data_root / "val"), "--out", str(tmp_path / "out")])
    assert code == 2
    with pytest.raises(Exception, match="model.cam_init"):
        run_eval(checkpoint=session.latest_checkpoint_dir(), config=str(path), data=str(data_root / "val"),
                 out=str(tmp_path / "out"), quiet=True, smpl_dir=body_dir())


def test_eval_never_takes_the_body_model_from_a_stored_config(data_root, trained, tmp_path, capsys):
    """A checkpoint whose stored config names another SMPL folder: eval scores with the
    synthetic body model (or --smpl-dir), never reads the stored folder."""
    from raytrain.checkpoints import save_checkpoint, verify_local
    _, session = trained["trial_a"]
    state = dict(verify_local(session.latest_checkpoint_dir()).state())
    stored = json.loads(state["config"])
    stored["model"]["smpl_dir"] = str(tmp_path / "planted")
    state["config"] = json.dumps(stored)
    save_checkpoint(str(tmp_path / "ckpt"), state)
    code = cli_main(["eval", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(data_root / "val"),
                     "--out", str(tmp_path / "out")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "planted" not in printed and "synthetic body model" in printed


@pytest.mark.parametrize("data, message", [("/dev/urandom", "not a regular file"),
                                           ("/nonexistent/shards", "no such file")])
def test_eval_data_that_cannot_be_read_is_one_line_not_a_hang(data_root, trained, capsys, data, message):
    _, session = trained["trial_a"]
    code = cli_main(["eval", "--checkpoint", session.latest_checkpoint_dir(), "--data", data])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "--data" in err and message in err and len(err.splitlines()) == 1, err


def test_eval_on_a_tar_of_non_samples_is_one_line(data_root, trained, tmp_path, capsys):
    """A tar holding files that are not samples: one line naming --data, exit 2."""
    import tarfile
    (tmp_path / "README.txt").write_text("not a sample\n")
    (tmp_path / "photo.png").write_bytes(bytes(range(256)) * 8)
    with tarfile.open(tmp_path / "junk.tar", "w") as tar:
        for name in ("README.txt", "photo.png"):
            tar.add(tmp_path / name, arcname=name)
    _, session = trained["trial_a"]
    code = cli_main(["eval", "--checkpoint", session.latest_checkpoint_dir(), "--data", str(tmp_path / "junk.tar"),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("raytrain: config error: --data ") and "missing_key" in err, err


def test_eval_out_in_a_missing_bucket_stops_before_the_evaluation(data_root, tmp_path, capsys, s3_endpoint):
    """--out in a bucket that does not exist is found before any checkpoint is loaded
    (here: none exists at all) or any sample is evaluated."""
    code = cli_main(["eval", "--checkpoint", str(tmp_path / "not-loaded"), "--data", str(data_root / "val"),
                     "--out", "s3://missing-bucket/report"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("raytrain: config error: --out s3://missing-bucket/report: cannot write there"), err


def test_experiment_in_object_storage_is_ranked_copied_and_reported_back(data_root, trained, tmp_path, monkeypatch,
                                                                         s3_endpoint):
    """An experiment in s3:// (a moto server on loopback) evaluates like its local copy: the
    same checkpoints chosen from their commit records alone, each copied once into the cache,
    the report uploaded to <experiment>/eval/<data>; a state.pt changed in storage is refused."""
    from raytrain.checkpoints import CheckpointError

    monkeypatch.setenv("RAYTRAIN_HOME", str(tmp_path / "home"))
    client = s3_endpoint
    experiment = data_root / "experiment"
    for path in sorted(p for p in experiment.rglob("*") if p.is_file() and "eval" not in p.parts):
        client.upload_file(str(path), "runs", f"exp/{path.relative_to(experiment).as_posix()}")
    url = "s3://runs/exp"
    with pytest.raises(CheckpointError, match="s3://runs/nothing not found"):
        select_checkpoints("s3://runs/nothing", best=True)

    local = select_checkpoints(str(experiment), best=True, top=2)
    remote = select_checkpoints(url, best=True, top=2)
    assert [t.origin for t in remote] == [f"{url}/{t.path.relative_to(experiment).as_posix()}" for t in local]
    assert [t.stored_metrics for t in remote] == [t.stored_metrics for t in local]
    cached = remote[0].path
    assert cached.is_relative_to(tmp_path / "home" / "checkpoints")
    copied_at = (cached / "state.pt").stat().st_mtime_ns
    assert [t.label for t in remote] == [t.label for t in local]

    result = run_eval(experiment=url, best=True, data=str(data_root / "val"), quiet=True, smpl_dir=body_dir())
    assert result["out"] == f"{url}/eval/val" and result["checkpoint"] == remote[0].origin
    assert (cached / "state.pt").stat().st_mtime_ns == copied_at, "an unchanged checkpoint is copied once"
    stored = json.loads(client.get_object(Bucket="runs", Key="exp/eval/val/metrics.json")["Body"].read())
    at_home = run_eval(checkpoint=str(local[0].path), data=str(data_root / "val"), out=str(tmp_path / "here"),
                       quiet=True, smpl_dir=body_dir())
    assert stored["overall"] == at_home["overall"]
    assert client.head_object(Bucket="runs", Key="exp/eval/val/report.md")["ContentLength"] > 0

    best_key = remote[0].origin.removeprefix("s3://runs/") + "/state.pt"
    client.put_object(Bucket="runs", Key=best_key, Body=b"not the checkpoint that was committed")
    shutil.rmtree(tmp_path / "home" / "checkpoints")           # no good copy left to use
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        run_eval(checkpoint=remote[0].origin, data=str(data_root / "val"), quiet=True, smpl_dir=body_dir())
