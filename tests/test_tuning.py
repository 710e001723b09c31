"""Search spaces, the Tune driver (real Ray, synthetic shards), resume and best-trial export."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, tiny_overrides
from conftest import body_dir as tiny_body_dir

from raytrain.config import ConfigError, load_config
from raytrain.tuning.space import load_space

SPACES = sorted((REPO / "tune" / "spaces").glob("*.yaml"))


# ----------------------------------------------------------------------------- space loader

@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.stem)
def test_shipped_spaces_load(path):
    for cfg in (load_config(), load_config(str(REPO / "configs" / "demo.yaml"))):
        space = load_space(str(path), cfg)
        assert space.params or space.variants
        space.tune_param_space()


def test_shipped_space_names():
    assert {p.stem for p in SPACES} >= {"paper", "rois", "demo", "ablations"}
    ablations = load_space(str(REPO / "tune/spaces/ablations.yaml"))
    assert ablations.has_grid and ablations.grid_size == 9
    expected = {"no_raf", "no_lcam", "no_lcont", "self_attention", "m1", "m2", "m3", "m4", "full"}
    assert expected == set(ablations.variants)
    from raytrain.tuning.ablations import LABELS
    assert expected <= set(LABELS)                     # every variant has its table label


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, needle", [
    ("space:\n  loss.lamda_cam: {dist: uniform, low: 0, high: 1}\n", "loss.lamda_cam"),          # typo
    ("space:\n  los.lambda_cam: {dist: uniform, low: 0, high: 1}\n", "los.lambda_cam"),
    ("space:\n  rois.num_rois: {dist: int, low: 1, high: 6}\n", "rois.num_rois"),              # above max 5
    ("space:\n  data.flip_prob: {dist: uniform, low: 0.0, high: 1.5}\n", "data.flip_prob"),
    ("space:\n  loss.lambda_cam: {dist: uniform, low: -1.0, high: 1.0}\n", "loss.lambda_cam"),   # below min 0
    ("space:\n  model.fusion: {dist: choice, values: [raf, rafx]}\n", "model.fusion"),           # bad choice
    ("space:\n  rois.num_rois: {dist: uniform, low: 1, high: 5}\n", "rois.num_rois"),           # float dist on int
    ("space:\n  model.backbone: {dist: loguniform, low: 1, high: 5}\n", "model.backbone"),       # wrong type
    ("space:\n  optim.lr: {dist: loguniform, low: 0, high: 1.0e-3}\n", "optim.lr"),             # log of 0
    ("space:\n  optim.lr: {dist: uniform, low: 1.0e-3, high: 1.0e-4}\n", "optim.lr"),           # low > high
    ("space:\n  optim.lr: {dist: gaussian, low: 0, high: 1}\n", "optim.lr"),                    # unknown dist
    ("space:\n  optim.lr: {dist: uniform, lo: 0, high: 1}\n", "optim.lr"),                      # unknown field
    ("space:\n  loss.cam_weights.3: {dist: uniform, low: 0, high: 1}\n", "loss.cam_weights.3"),  # index
    ("space:\n  loss.cam_weights: {dist: choice, values: [[0.1, 0.1]]}\n", "loss.cam_weights"),  # length 2
    ("space:\n  data.train_shards.x: {dist: choice, values: [a]}\n", "data.train_shards.x"),
    ("variants:\n  broken: {model.fusoin: none}\n", "broken"),
    ("fixed: {optim.epochs: 0}\nspace:\n  optim.lr: {dist: loguniform, low: 1.0e-5, high: 1.0e-3}\n", "optim.epochs"),
    ("spaces:\n  optim.lr: {dist: uniform, low: 0, high: 1}\n", "spaces"),
    ("space: {}\n", "empty"),
])
def test_space_rejects_bad_entries_naming_them(tmp_path, text, needle):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_space(path)
    message = str(err.value)
    assert needle in message and path in message, message


def test_space_per_element_and_list_choices(tmp_path):
    path = _write(tmp_path, "space:\n"
                  "  loss.cam_weights.2: {dist: loguniform, low: 1.0e-5, high: 1.0e-3}\n"
                  "  rois.scales: {dist: choice, values: [[1.5, 1.25, 0.8, 0.65], [1.2, 1.1, 0.9, 0.8]]}\n"
                  "  rois.num_rois: {dist: int, low: 1, high: 5}\n")
    space = load_space(path)
    domains = space.tune_param_space()
    assert domains["rois.num_rois"].lower == 1 and domains["rois.num_rois"].upper == 6   # inclusive 5
    encoded = domains["rois.scales"].categories[1]
    cfg = space.trial_config(load_config(), {"loss.cam_weights.2": 5e-4, "rois.scales": encoded,
                                             "rois.num_rois": 3})
    assert cfg.loss.cam_weights == [0.1, 0.1, 5e-4]
    assert cfg.rois.scales == [1.2, 1.1, 0.9, 0.8] and cfg.rois.num_rois == 3


def test_ablation_variants_apply():
    space = load_space(str(REPO / "tune/spaces/ablations.yaml"))
    base = load_config()
    assert space.trial_config(base, {"variant": "no_raf"}).model.fusion == "none"
    assert space.trial_config(base, {"variant": "no_lcam"}).loss.lambda_cam == 0.0
    assert space.trial_config(base, {"variant": "m3"}).rois.num_rois == 3


def test_tune_settings_reject_unknown(tmp_path):
    from raytrain.tuning.driver import TuneSettings
    space = load_space(_write(tmp_path, "space:\n  optim.lr: {dist: uniform, low: 0, high: 1}\n"
                                        "tune: {max_concurent_trials: 2}\n"))
    with pytest.raises(ConfigError, match="max_concurent_trials"):
        TuneSettings.from_sources(load_config(), space)


# ----------------------------------------------------------------------------- real sweeps

def _tune_args(train, val, run_dir, name, **extra):
    extra.setdefault("ray.cpus_per_worker", 0.9)      # + 0.1 for the trial driver: 2 trials on 2 CPUs
    extra.setdefault("optim.max_steps", 6)
    extra.setdefault("train.val_every", 2)
    extra.setdefault("train.checkpoint_every", 2)
    extra.setdefault("name", name)
    return tiny_overrides(train, val, run_dir, **extra)


def _cli(args, **kwargs):
    env = dict(os.environ, RAY_TRAIN_ENABLE_PRINT_PATCH="0", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "raytrain.cli", *args], cwd=str(REPO), env=env,
                            start_new_session=True, **kwargs)


def _finish(proc, timeout):
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        raise


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(900)
def test_sweep_asha_killed_driver_resume_and_export(synthetic_shards, tmp_path):
    """One 6-trial sweep (Optuna TPE + ASHA): the driver is SIGKILLed once a trial has
    finished, `--resume` finishes the experiment without rerunning finished trials, ASHA
    stopped at least one trial early, and the best trial's export reproduces Tune's MPJPE."""
    from raytrain.tuning.export import load_trials
    train, val = synthetic_shards
    n, last_step = 6, 6
    args = ["tune", "--config", str(REPO / "configs/demo.yaml"),
            "--space", str(REPO / "tune/spaces/demo.yaml"),
            "--trials", str(n), *_tune_args(train, val, tmp_path / "runs", "sweep")]
    exp = tmp_path / "runs" / "tune" / "sweep"
    log = open(tmp_path / "first.log", "w")
    proc = _cli(args, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.time() + 420
    while time.time() < deadline:                       # interrupt once one trial has finished
        try:
            done = [t for t in load_trials(str(exp)) if t.results] if exp.exists() else []
        except ValueError:                              # a file Tune is writing right now
            done = []
        if any(t.last_step >= last_step for t in done) or proc.poll() is not None:
            time.sleep(6)                               # > the driver's 2 s state-save period
            break
        time.sleep(2)
    assert proc.poll() is None, "the sweep ended before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)                # the driver dies without saving anything
    proc.wait(60)
    before = load_trials(str(exp))
    assert len(before) < n or any(not t.results or t.last_step < last_step for t in before)
    finished_before = {t.trial_id: t.last_step for t in before if t.last_step >= last_step}
    log = open(tmp_path / "second.log", "w")
    rc = _finish(_cli([*args[:args.index("--trials") + 2], "--resume", *args[args.index("--trials") + 2:]],
                      stdout=log, stderr=subprocess.STDOUT), 600)
    second_log = (tmp_path / "second.log").read_text()
    assert rc == 0, second_log[-4000:]
    trials = load_trials(str(exp))
    assert len(trials) == n, [t.trial_id for t in trials]
    assert not any(t.errored for t in trials)
    for trial_id, step in finished_before.items():     # finished trials were not run again
        trial = next(t for t in trials if t.trial_id == trial_id)
        assert trial.last_step == step and len([r for r in trial.results if r.get("step") == 2]) == 1
    last = [t.last_step for t in trials]
    assert max(last) == last_step and min(last) < last_step, last    # ASHA stopped >= 1 early
    # the console: one line per finished trial, none of Tune's tables or Ray's chatter
    first_log = (tmp_path / "first.log").read_text()
    assert "[raytrain] trial " in first_log and "best trial exported" in second_log
    for chatter in ("PlacementGroupCleaner", "Reporting training result", "Trial status"):
        assert chatter not in first_log + second_log, chatter
    best = exp / "best"
    for name in ("config.yaml", "summary.json", "trials.csv", "optimization_history.png",
                 "param_importances.png", "mpjpe_vs_optim.lr.png", "mpjpe_vs_loss.lambda_cam.png",
                 "checkpoint/state.pt", "checkpoint/COMMIT.json"):
        assert (best / name).exists(), name
    summary = json.loads((best / "summary.json").read_text())
    assert summary["num_trials"] == n and summary["num_stopped_early"] >= 1
    cfg = load_config(str(best / "config.yaml"))
    assert cfg.name == summary["trial_id"]
    assert cfg.optim.lr == pytest.approx(summary["params"]["optim.lr"])
    recorded = min(r["val_mpjpe"] for t in trials for r in t.results if r.get("checkpoint_path"))
    assert summary["val_mpjpe"] == pytest.approx(recorded)
    from raytrain.checkpoints import verify_local
    state = verify_local(best / "checkpoint").state()
    assert state["step"] == summary["step"]
    assert state["metrics"]["val_mpjpe"] == pytest.approx(summary["val_mpjpe"], abs=0.1)
    rows = (best / "trials.csv").read_text().splitlines()
    assert len(rows) == n + 1
    # re-evaluating the exported checkpoint reproduces the MPJPE Tune recorded
    from raytrain.eval.run import run_eval
    evaluated = run_eval(checkpoint=str(best / "checkpoint"), data=val, out=str(tmp_path / "eval"),
                         overlays=0, quiet=True, smpl_dir=tiny_body_dir())
    assert evaluated["overall"]["mpjpe"] == pytest.approx(summary["val_mpjpe"], abs=0.1)


@pytest.mark.parametrize("variant", ["full", "no_raf", "no_lcam", "no_lcont", "self_attention",
                                     "m1", "m2", "m3", "m4"])
def test_every_shipped_ablation_variant_trains(synthetic_shards, tmp_path, variant):
    """Each variant of tune/spaces/ablations.yaml, applied to the test config, trains and
    validates (the bare loop; the Tune grid below runs a subset of them)."""
    from raytrain.train.loop import run_loop
    from raytrain.train.session import BareSession
    train, val = synthetic_shards
    base = load_config(str(REPO / "configs/demo.yaml"), tiny_overrides(
        train, val, tmp_path, **{"optim.max_steps": 1, "data.max_val_samples": 8}))
    cfg = load_space(str(REPO / "tune/spaces/ablations.yaml"), base).trial_config(base, {"variant": variant})
    metrics = run_loop(cfg, BareSession(str(tmp_path), device="cpu"))
    assert metrics["val_samples"] == 8 and metrics["val_mpjpe"] > 0


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_ablation_grid_writes_the_table(synthetic_shards, tmp_path):
    """A grid of named variants runs every variant once (FIFO) and writes the table with the
    paper's labels and the difference to the full method (two of tune/spaces/ablations.yaml's
    variants, side by side; all of them train in the test above)."""
    train, val = synthetic_shards
    space = tmp_path / "ablations.yaml"
    space.write_text("variants:\n  full: {}\n"
                     "  m1: {rois.num_rois: 1, loss.lambda_cam: 0.0, loss.lambda_cont: 0.0}\n"
                     "tune:\n  scheduler: fifo\n")
    args = ["tune", "--config", str(REPO / "configs/demo.yaml"), "--space", str(space),
            "--trials", "2", *_tune_args(train, val, tmp_path / "runs", "abl", **{"optim.max_steps": 2,
                                                                                  "train.val_every": 2})]
    log = open(tmp_path / "abl.log", "w")
    rc = _finish(_cli(args, stdout=log, stderr=subprocess.STDOUT), 540)
    assert rc == 0, (tmp_path / "abl.log").read_text()[-4000:]
    table = (tmp_path / "runs" / "tune" / "abl" / "ablation_table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "Variant" not in line]
    assert len(rows) == 2, table
    for label in ("Full method", "M = 1"):
        assert any(label in row for row in rows), label
    assert "Δ MPJPE" in table and "+0.0" in next(row for row in rows if "Full method" in row)


# ----------------------------------------------------------------------------- the pre-flight

def _half_backbone(path):
    """A backbone file holding 40 % of the tiny backbone's tensors (refused below 90 %)."""
    import timm
    import torch
    state = timm.create_model("mobilenetv3_small_050", pretrained=False).state_dict()
    keys = list(state)
    torch.save({k: state[k] for k in keys[:int(0.4 * len(keys))]}, path)
    return str(path)


def test_tune_refuses_a_backbone_file_that_matches_too_little_before_ray(synthetic_shards, tmp_path):
    """`raytrain tune` runs the pre-flight of `raytrain train`: a backbone file that matches
    < 90 % of the backbone exits 2 naming the key, before Ray starts and before any trial."""
    import ray

    from raytrain.tuning.driver import run_tune
    train, val = synthetic_shards
    args = _tune_args(train, val, tmp_path / "runs", "refused",
                      **{"model.backbone_checkpoint": _half_backbone(tmp_path / "half.pth")})
    proc = _cli(["tune", "--config", "configs/demo.yaml", "--space", "tune/spaces/demo.yaml",
                 "--trials", "2", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _finish(proc, 300)
    err = proc.stderr.read()
    assert proc.returncode == 2, err[-4000:]
    assert "raytrain: config error: model.backbone_checkpoint:" in err and "Traceback" not in err
    assert not (tmp_path / "runs" / "tune" / "refused" / "tuner.pkl").exists()  # no Tuner either
    cfg = load_config("configs/demo.yaml", args)
    with pytest.raises(ConfigError, match="model.backbone_checkpoint: .*half.pth matches only"):
        run_tune(cfg, "tune/spaces/demo.yaml", trials=2)
    assert not ray.is_initialized()


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(600)
def test_a_sweep_whose_trials_all_fail_exits_non_zero(synthetic_shards, tmp_path):
    """Shards whose manifest is sound but whose every image is broken pass the pre-flight
    and stop each trial at its first batch: the sweep exits 1 with one line saying so and
    where the trials' errors are, not 0 with "no best trial to export"."""
    from fixtures_data import make_fake_samples

    from raytrain.data.shards import write_shards
    _, val = synthetic_shards
    samples = make_fake_samples(24, seed=5)
    for sample in samples:
        sample["jpg"] = b"\xff\xd8broken\xff\xd9"
    broken = tmp_path / "broken"
    write_shards(samples, str(broken), source="fake", licence="test", maxcount=12)
    args = _tune_args(str(broken), val, tmp_path / "runs", "failing",
                      **{"optim.max_steps": 2, "ray.max_failures": 0})
    log = open(tmp_path / "tune.log", "w")
    rc = _finish(_cli(["tune", "--config", "configs/demo.yaml", "--space", "tune/spaces/demo.yaml",
                       "--trials", "2", *args], stdout=log, stderr=subprocess.STDOUT), 540)
    out = (tmp_path / "tune.log").read_text()
    assert rc == 1, out[-4000:]
    exp = tmp_path / "runs" / "tune" / "failing"
    line = next(line for line in out.splitlines() if line.startswith("raytrain: stopped:"))
    assert "all 2 trials failed" in line and str(exp) in line and "bad" in line, line
    assert "no best trial to export" not in out
