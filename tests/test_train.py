"""Training loop, checkpoints, resume and fault tolerance on real components."""
import os
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from raytrain.config import ConfigError, load_config
from raytrain.train.checkpoint import is_complete, latest_complete_checkpoint, load_checkpoint, save_checkpoint
from raytrain.train.loop import run_loop
from raytrain.train.session import BareSession

DEMO = str(REPO / "raytrain" / "configs" / "demo.yaml")


def _keys(log_prefix, rank=0):
    """Last logged (epoch, key) list per step: a resumed run re-logs replayed steps."""
    per_step = defaultdict(list)
    path = Path(f"{log_prefix}.rank{rank}.txt")
    seen_step = None
    for line in path.read_text().splitlines():
        step, epoch, key = line.split(" ", 2)
        step = int(step)
        if step != seen_step:
            per_step[step] = []
            seen_step = step
        per_step[step].append((int(epoch), key))
    return per_step


def test_bare_resume_is_exact(synthetic_shards, tmp_path):
    """Stopping at a checkpoint and resuming sees exactly the keys of an uninterrupted run."""
    train, val = synthetic_shards
    whole = load_config(DEMO, tiny_overrides(train, val, tmp_path / "a", **{
        "optim.max_steps": 16, "train.sample_log": tmp_path / "a/keys"}))
    run_loop(whole, BareSession(str(tmp_path / "a"), device="cpu"))
    first = load_config(DEMO, tiny_overrides(train, val, tmp_path / "b", **{
        "optim.max_steps": 9, "train.sample_log": tmp_path / "b/keys"}))
    run_loop(first, BareSession(str(tmp_path / "b"), device="cpu"))
    rest = load_config(DEMO, tiny_overrides(train, val, tmp_path / "b", **{
        "optim.max_steps": 16, "train.sample_log": tmp_path / "b/keys"}))
    run_loop(rest, BareSession(str(tmp_path / "b"), device="cpu"))
    expected, resumed = _keys(tmp_path / "a/keys"), _keys(tmp_path / "b/keys")
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == expected
    epoch0 = [k for step in sorted(expected) for e, k in expected[step] if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 48  # 12 steps x 4: each sample once per epoch


def test_interrupted_checkpoint_is_never_latest(tmp_path):
    save_checkpoint(tmp_path / "run/step_1", {"step": 1, "w": torch.ones(3)})
    save_checkpoint(tmp_path / "run/step_2", {"step": 2, "w": torch.ones(3) * 2})
    # a write killed after state.pt but before COMMIT.json, and one with a torn state.pt
    (tmp_path / "run/step_3").mkdir()
    torch.save({"step": 3}, tmp_path / "run/step_3/state.pt")
    save_checkpoint(tmp_path / "run/step_4", {"step": 4, "w": torch.ones(3) * 4})
    state = (tmp_path / "run/step_4/state.pt").read_bytes()
    (tmp_path / "run/step_4/state.pt").write_bytes(state[: len(state) // 2])
    assert not is_complete(tmp_path / "run/step_3") and not is_complete(tmp_path / "run/step_4")
    assert latest_complete_checkpoint(tmp_path / "run").name == "step_2"
    assert load_checkpoint(tmp_path / "run/step_2")["step"] == 2
    with pytest.raises(Exception, match="incomplete"):
        load_checkpoint(tmp_path / "run/step_4")


def test_bad_input_stops_before_workers_start(synthetic_shards, tmp_path):
    from raytrain.train.launch import preflight_data
    train, val = synthetic_shards
    with pytest.raises(ConfigError, match="data.train_shards"):
        preflight_data(load_config(DEMO, tiny_overrides(str(tmp_path / "nothing"), val, tmp_path)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text('{"schema_version": 1, "num_samples": 0, "source": "x", '
                                         '"licence": "", "shards": []}')
    with pytest.raises(ConfigError, match="data.val_shards"):
        preflight_data(load_config(DEMO, tiny_overrides(train, str(empty), tmp_path)))
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(DEMO, tiny_overrides(train, val, tmp_path, **{"ray.num_workers": 8}))


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for this module's Ray tests, started as `raytrain train` starts
    it (init_ray: 2 CPUs, log_to_driver=False)."""
    import ray

    from raytrain.train.launch import init_ray
    init_ray(load_config(DEMO, ["ray.num_cpus=2"]))
    yield
    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_ray_gpu_request_fails_fast(synthetic_shards, tmp_path, local_ray):
    from raytrain.train.launch import preflight_resources
    train, val = synthetic_shards
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path, **{"ray.use_gpu": True}))
    with pytest.raises(ConfigError, match="GPU"):
        preflight_resources(cfg)
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path, **{"ray.cpus_per_worker": 16}))
    with pytest.raises(ConfigError, match="ray.cpus_per_worker"):
        preflight_resources(cfg)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_killed_worker_resumes_from_latest_checkpoint(synthetic_shards, tmp_path, caplog, local_ray):
    """SIGKILL the training worker mid-run: Ray restarts it, it resumes from the latest
    checkpoint, the step count is continuous and no sample of the epoch is lost or repeated.
    The workers' own lines (progress, the resume notice) reach the driver's logging once."""
    import logging
    caplog.set_level(logging.INFO, logger="raytrain")

    from raytrain.train.launch import run_training
    train, val = synthetic_shards
    log = tmp_path / "keys"
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path / "runs", **{
        "optim.max_steps": 12, "train.checkpoint_every": 2, "train.val_every": 100,
        "train.sample_log": log, "ray.max_failures": 2, "ray.cpus_per_worker": 1}))
    killed = {}

    def killer():
        deadline = time.time() + 300
        while time.time() < deadline:
            path = Path(f"{log}.rank0.txt")
            steps = [int(row.split()[0]) for row in path.read_text().splitlines()] if path.exists() else []
            if steps and max(steps) >= 5:
                pid = int(Path(f"{log}.rank0.pid").read_text())
                os.kill(pid, signal.SIGKILL)
                killed["pid"], killed["step"] = pid, max(steps)
                return
            time.sleep(0.05)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = run_training(cfg)
    thread.join(timeout=5)
    assert killed, "the worker was never killed"
    assert result.error is None
    assert int(Path(f"{log}.rank0.pid").read_text()) != killed["pid"]  # a new worker finished
    per_step = _keys(log)
    assert sorted(per_step) == list(range(1, 13))       # continuous step count
    keys = [k for step in sorted(per_step) for e, k in per_step[step] if e == 0]
    assert len(keys) == len(set(keys)) == 48            # epoch 0: every sample exactly once
    assert result.metrics["step"] == 12
    forwarded = [r.getMessage() for r in caplog.records if r.name.startswith("raytrain.train.")]
    assert sum(m.startswith("[raytrain] step 12/12 ") for m in forwarded) == 1, forwarded
    assert sum("resumed from step" in m for m in forwarded) == 1, forwarded
