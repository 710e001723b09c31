"""A run directory knows its run: one name with other data, another model or a second live
process is refused before Ray starts (one line, exit 2); a finished run says so (exit 0)."""
import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO, tiny_overrides

from raytrain.cli import main as cli_main
from raytrain.config import load_config
from raytrain.train.run_identity import (
    IDENTITY_FILE,
    LOCK_FILE,
    RunDirectoryError,
    RunLock,
    claim_run,
    run_fingerprint,
)

DEMO = str(REPO / "configs" / "demo.yaml")


def _train(overrides):
    """`raytrain train --config demo.yaml OVERRIDES` in this process: (exit, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli_main(["train", "--config", DEMO, *overrides])
    return code, out.getvalue(), err.getvalue().strip()


def _one_line_refusal(code, err, *words):
    assert code == 2, err
    line = err.splitlines()[-1]
    assert "Traceback" not in err and line.startswith("raytrain: config error: name=shared: "), err
    for word in words:
        assert word in line, line


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_one_name_other_data_another_model_a_live_run_and_a_finished_run(synthetic_shards, tmp_path):
    """Through `raytrain train`: while a run is live, a second run of its name is refused;
    after it finished, other data (with a step budget under the one reached) and a changed
    model are refused naming the difference, before Ray starts; the same run again is
    already at its last step and exits 0 without training."""
    import ray

    from raytrain.synthetic.people import shard_synthetic
    train, val = synthetic_shards
    other = tmp_path / "other"
    shard_synthetic(str(other), n=48, seed=7, maxcount=16)
    runs = tmp_path / "runs"
    run = runs / "shared"
    base = tiny_overrides(train, val, runs, name="shared", **{"optim.max_steps": 4, "train.val_every": 100})
    live = subprocess.Popen([sys.executable, "-m", "raytrain.cli", "train", "--config", DEMO, *base],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not (run / IDENTITY_FILE).exists():
            assert live.poll() is None and time.time() < deadline, live.communicate()
            time.sleep(0.05)
        code, _, err = _train(base)
        _one_line_refusal(code, err, "in use by a live run", f"pid {live.pid}")
        assert not ray.is_initialized()
        out, err = live.communicate(timeout=500)
        assert live.returncode == 0, err
    finally:
        if live.poll() is None:
            os.killpg(live.pid, signal.SIGKILL)

    code, _, err = _train(tiny_overrides(str(other), val, runs, name="shared", **{"optim.max_steps": 10}))
    _one_line_refusal(code, err, "data.train_shards: manifest ", "holds another run",
                      "train.accept_changed_run=true")
    code, _, err = _train([*base, "model.decoder_hidden=32"])
    _one_line_refusal(code, err, "model.decoder_hidden: 64 -> 32", "choose a new name")
    assert "accept_changed_run" not in err  # a changed model cannot resume at all
    code, out, err = _train(base)
    assert code == 0 and "already at its last step (4 of 4): nothing to train" in err, err
    assert '"metrics"' not in out and '"checkpoint"' not in out  # no result claimed as this command's
    assert not ray.is_initialized()


def _tiny(tmp_path, train, val, **extra):
    return load_config(DEMO, tiny_overrides(train, val, tmp_path / "runs", name="shared", **extra))


def test_accepting_a_changed_run_records_the_new_fingerprint(synthetic_shards, tmp_path):
    """The step budget is not part of the fingerprint, the RoI schedule and the data are;
    with a checkpoint in the run directory other data is refused unless
    train.accept_changed_run=true, which records the new fingerprint; a run directory
    without a checkpoint holds nothing to adopt (a new run)."""
    from raytrain.checkpoints import save_checkpoint
    train, val = synthetic_shards
    first = _tiny(tmp_path, train, val)
    run_dir = tmp_path / "runs" / "shared"
    claim_run(first, str(run_dir)).release()
    record = json.loads((run_dir / IDENTITY_FILE).read_text())["fingerprint"]
    assert record == run_fingerprint(first) and not any(key.startswith("optim.") for key in record)
    assert run_fingerprint(_tiny(tmp_path, train, val, **{"optim.max_steps": 99})) == record
    assert run_fingerprint(_tiny(tmp_path, train, val, **{"rois.num_rois": 3})) != record
    swapped = _tiny(tmp_path, val, train, **{"optim.max_steps": 10})
    claim_run(swapped, str(run_dir)).release()  # no checkpoint yet: nothing to adopt
    assert json.loads((run_dir / IDENTITY_FILE).read_text())["fingerprint"] == run_fingerprint(swapped)

    save_checkpoint(str(run_dir / "checkpoint_2" / "checkpoint"), {"step": 2})
    with pytest.raises(RunDirectoryError, match=r"data\.train_shards: manifest \w+ -> manifest \w+"):
        claim_run(_tiny(tmp_path, train, val, **{"optim.max_steps": 10}), str(run_dir))
    accepted = _tiny(tmp_path, train, val, **{"optim.max_steps": 10, "train.accept_changed_run": True})
    claim_run(accepted, str(run_dir)).release()
    assert json.loads((run_dir / IDENTITY_FILE).read_text())["fingerprint"] == record


def test_a_killed_holder_never_blocks_the_run(tmp_path):
    """The lock is the OS's: a process holding it and killed with SIGKILL leaves it free."""
    path = tmp_path / "run" / LOCK_FILE
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from pathlib import Path; "
         "from raytrain.train.run_identity import RunLock; "
         f"lock = RunLock(Path({str(path)!r})); assert lock.acquire() is None; print('held', flush=True); "
         "time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        busy = RunLock(path).acquire()
        assert busy is not None and f"pid {holder.pid} on host" in busy
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(path)
    assert lock.acquire() is None
    lock.release()


def test_the_default_run_name_is_the_config_files_name(tmp_path):
    path = tmp_path / "r50 paper-v2.yaml"
    path.write_text("optim:\n  lr: 0.001\n")
    assert load_config(str(path)).name == "r50_paper-v2"
    assert load_config(str(path), ["name=mine"]).name == "mine"
    assert load_config().name == "experiment"
