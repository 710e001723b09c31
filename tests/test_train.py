"""Training loop, checkpoints, resume and fault tolerance on real components."""
import os
import shutil
import signal
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides

from raytrain.checkpoints import IncompleteCheckpoint, latest_checkpoint, save_checkpoint, verify_local
from raytrain.config import ConfigError, load_config
from raytrain.train.loop import run_loop
from raytrain.train.session import BareSession

DEMO = str(REPO / "configs" / "demo.yaml")


def _keys(log_prefix, rank=0, per_step_size=4):
    """Last logged (epoch, key) list per step: a resumed run re-logs replayed steps
    (also the step the interrupted run was logging when it died)."""
    per_step = defaultdict(list)
    path = Path(f"{log_prefix}.rank{rank}.txt")
    seen_step = None
    for line in path.read_text().splitlines():
        step, epoch, key = line.split(" ", 2)
        step = int(step)
        replay = len(per_step[step]) == per_step_size or key in {k for _, k in per_step[step]}
        if step != seen_step or replay:
            per_step[step] = []
            seen_step = step
        per_step[step].append((int(epoch), key))
    return per_step


@pytest.mark.parametrize("workers", [0, 2])
def test_bare_resume_is_exact(synthetic_shards, tmp_path, workers):
    """Stopping at a checkpoint and resuming sees exactly the keys of an uninterrupted run,
    also with persistent loader workers (serving two epochs and the validations), which
    the loop stops when it ends."""
    import multiprocessing
    train, val = synthetic_shards
    before = {child.pid for child in multiprocessing.active_children()}
    for run, steps in (("a", 16), ("b", 9), ("b", 16)):
        cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path / run, **{
            "optim.max_steps": steps, "train.sample_log": tmp_path / f"{run}/keys",
            "data.loader_workers": workers}))
        run_loop(cfg, BareSession(str(tmp_path / run), device="cpu"))
        assert {child.pid for child in multiprocessing.active_children()} == before  # none left
    expected, resumed = _keys(tmp_path / "a/keys"), _keys(tmp_path / "b/keys")
    assert sorted(resumed) == list(range(1, 17))
    assert resumed == expected
    epoch0 = [k for step in sorted(expected) for e, k in expected[step] if e == 0]
    assert len(epoch0) == len(set(epoch0)) == 48  # 12 steps x 4: each sample once per epoch


def test_run_steps_is_the_same_on_every_world_size(synthetic_shards, tmp_path):
    """One formula for the run's length (the loop's end and schedule, tune's ASHA max_t):
    epochs of whole per-rank batches, capped by optim.max_steps and the caller's cap."""
    from raytrain.train.loop import run_steps
    train, val = synthetic_shards  # 48 training samples, data.batch_size 4
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path, **{"optim.max_steps": 0, "optim.epochs": 2}))
    assert [run_steps(cfg, world) for world in (1, 2, 4)] == [24, 24, 24]
    assert run_steps(cfg, 1, max_steps=5) == 5
    cfg.optim.max_steps = 7
    assert run_steps(cfg, 2) == 7 and run_steps(cfg, 2, max_steps=9) == 7


def test_interrupted_checkpoint_is_never_latest(tmp_path):
    save_checkpoint(tmp_path / "run/step_1", {"step": 1, "w": torch.ones(3)})
    save_checkpoint(tmp_path / "run/step_2", {"step": 2, "w": torch.ones(3) * 2})
    # a write killed after state.pt but before COMMIT.json, and one with a torn state.pt
    (tmp_path / "run/step_3").mkdir()
    torch.save({"step": 3}, tmp_path / "run/step_3/state.pt")
    save_checkpoint(tmp_path / "run/step_4", {"step": 4, "w": torch.ones(3) * 4})
    state = (tmp_path / "run/step_4/state.pt").read_bytes()
    (tmp_path / "run/step_4/state.pt").write_bytes(state[: len(state) // 2])
    with pytest.raises(IncompleteCheckpoint, match="not a complete checkpoint"):
        verify_local(tmp_path / "run/step_3")
    with pytest.raises(IncompleteCheckpoint, match="interrupted"):
        verify_local(tmp_path / "run/step_4")
    assert latest_checkpoint(tmp_path / "run").path.name == "step_2"
    assert verify_local(tmp_path / "run/step_2").state()["step"] == 2
    # a commit record we did not write (a step that is not a count) is not complete either
    save_checkpoint(tmp_path / "run/step_5", {"step": 5, "w": torch.ones(3)})
    (tmp_path / "run/step_5/COMMIT.json").write_text('{"step": "5; rm -rf /", "sha256": "x"}')
    with pytest.raises(IncompleteCheckpoint):
        verify_local(tmp_path / "run/step_5")
    assert latest_checkpoint(tmp_path / "run").path.name == "step_2"


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
    it (init_ray: 2 CPUs, log_to_driver=False), its processes with a temp directory of their
    own (TMPDIR; short: Ray puts its sockets there): yields that directory."""
    import tempfile

    import ray

    from raytrain.train.launch import init_ray
    private = Path(tempfile.mkdtemp(prefix="rt-"))
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"], tempfile.tempdir = str(private), None
    try:
        init_ray(load_config(DEMO, ["ray.num_cpus=2"]))
        yield private
    finally:
        ray.shutdown()
        shutil.rmtree(private, ignore_errors=True)
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        tempfile.tempdir = None


def raytrain_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("raytrain"))


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
    The workers' own lines (progress, the resume notice) reach the driver's logging once.
    Nothing of raytrain's is left in the temp directory: not the copies of the killed
    worker, not the copy it resumed from, not those of the run that finished."""
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
    # the killed worker's staged checkpoint, the restore copy and every persisted one: all gone
    assert raytrain_files(local_ray) == []


class Planted:
    """Any class: a pickle of it runs code the file chooses when unpickled in full."""


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(400)
def test_resuming_from_a_state_holding_a_pickled_object_stops_in_one_line(synthetic_shards, tmp_path, local_ray):
    """The run directory's latest checkpoint holds a pickled object (its commit record
    matching the file): the resumed run stops on the checkpoint's one line, recorded
    once instead of met again on every restart, never advising unsafe loading."""
    from raytrain.train.fatal import RunStopped
    from raytrain.train.launch import run_dir_of, run_training
    train, val = synthetic_shards
    overrides = {"train.checkpoint_every": 3, "train.val_every": 100, "ray.max_failures": 2}
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path / "runs", **{"optim.max_steps": 3, **overrides}))
    run_training(cfg)
    found = latest_checkpoint(run_dir_of(cfg))
    state = dict(found.state(), planted=Planted())
    shutil.rmtree(found.path)
    save_checkpoint(found.path, state)
    more = load_config(DEMO, tiny_overrides(train, val, tmp_path / "runs", **{"optim.max_steps": 6, **overrides}))
    with pytest.raises(RunStopped, match="holds a pickled object") as stopped:
        run_training(more)
    assert len(str(stopped.value).splitlines()) == 1 and "weights_only" not in str(stopped.value)


def test_copies_of_a_stopped_process_are_removed(tmp_path, monkeypatch):
    """A local checkpoint copy whose process is gone (a worker killed mid-save) is removed
    when the next session starts; a live process's copy stays."""
    import subprocess
    import sys
    import tempfile

    from raytrain.checkpoints import local_copy_dir, remove_orphaned_copies
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                           text=True, check=True)
    stale = tmp_path / f"raytrain-ckpt-{int(child.stdout)}-x1"
    (stale / "step_00000004").mkdir(parents=True)
    (stale / "step_00000004" / "state.pt").write_bytes(b"half")
    mine = local_copy_dir("restore")
    assert mine.parent == tmp_path
    assert remove_orphaned_copies() == [stale]
    assert raytrain_files(tmp_path) == [mine.name]


def test_resume_takes_the_latest_complete_checkpoint_on_disk(tmp_path):
    """A checkpoint written but never registered with Ray (the run was interrupted in
    between) is newer than Ray's: resume takes it and says so; an incomplete one never."""
    from raytrain.checkpoints import choose_resume
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoint_a", {"step": 4})
    save_checkpoint(run / "checkpoint_b", {"step": 8})
    (run / "checkpoint_c").mkdir()
    torch.save({"step": 12}, run / "checkpoint_c/state.pt")   # no COMMIT.json: incomplete
    registered = tmp_path / "restored"
    save_checkpoint(registered, {"step": 4})
    chosen, note = choose_resume(str(registered), str(run))
    assert chosen.path == run / "checkpoint_b" and "step 8" in note and "step 4" in note
    save_checkpoint(tmp_path / "restored2", {"step": 8})
    chosen, note = choose_resume(str(tmp_path / "restored2"), str(run))
    assert (chosen.path, note) == (tmp_path / "restored2", "")
    chosen, note = choose_resume(None, str(run))
    assert chosen.path == run / "checkpoint_b" and "registered none" in note
    assert choose_resume(None, str(tmp_path / "empty")) == (None, "")


def test_non_finite_loss_stops_before_the_optimiser(synthetic_shards, tmp_path):
    """A batch whose loss is infinite raises NonFiniteLoss naming the step, the batch's
    samples and the loss terms; no parameter changes."""
    from raytrain.body import load_body_model, load_mean_params
    from raytrain.data.pipeline import Loader
    from raytrain.model import build_model
    from raytrain.train.fatal import NonFiniteLoss
    from raytrain.train.loop import train_step
    train, val = synthetic_shards
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path))
    body = load_body_model(cfg.model.smpl_dir)
    model = build_model(cfg.model, body_model=body, mean_params=load_mean_params(cfg.model.smpl_dir))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    with Loader(cfg, "train", batch_size=4, seed=0) as loader:
        batch = next(loader.epoch(0))
    batch["joints_3d"][0, :, :3] = float("inf")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLoss) as caught:
        train_step(cfg, model, body, optimizer, scheduler, scaler, batch, torch.device("cpu"), step=7)
    message = str(caught.value)
    assert "step 7" in message and batch["keys"][0] in message and "total=" in message
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    import pickle
    assert pickle.loads(pickle.dumps(caught.value)).keys == batch["keys"]
    # a finite loss whose gradient overflows (here forced by a hook) stops before Adam too
    with Loader(cfg, "train", batch_size=4, seed=0) as loader:
        batch = next(loader.epoch(0))
    first = next(p for p in model.parameters() if p.requires_grad)
    handle = first.register_hook(lambda grad: grad * float("inf"))
    with pytest.raises(NonFiniteLoss, match="non-finite gradient at step 8.*grad_norm="):
        train_step(cfg, model, body, optimizer, scheduler, scaler, batch, torch.device("cpu"), step=8)
    handle.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ranks_stop_together_alone():
    """One process (no torch.distributed): no collective; this rank's problem is raised as
    it is, none returns; a count of failing peers alone gives PeerStopped."""
    from raytrain.data.errors import TooManyBadSamples
    from raytrain.ranks import PeerStopped, raise_if_stopped, stop_together
    assert not torch.distributed.is_initialized()
    assert stop_together(None, torch.device("cpu")) is None
    problem = TooManyBadSamples("too many bad samples in shard-00001.tar")
    with pytest.raises(TooManyBadSamples) as caught:
        stop_together(problem, torch.device("cpu"))
    assert caught.value is problem
    with pytest.raises(PeerStopped, match="1 other rank"):
        raise_if_stopped(None, 1)
    assert raise_if_stopped(None, 0) is None


def _stop_together_rank(rank: int, world_size: int, port: int, failing: tuple[int, ...], out: str):
    import json

    from raytrain.data.errors import TooManyBadSamples
    from raytrain.ranks import PeerStopped, stop_together
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world_size)
    outcomes = []
    try:
        for step in range(3):
            problem = TooManyBadSamples(f"rank {rank}") if (step == 2 and rank in failing) else None
            try:
                stop_together(problem, torch.device("cpu"))
                outcomes.append("go")
            except PeerStopped:
                outcomes.append("peer")
            except TooManyBadSamples:
                outcomes.append("own")
        Path(out, f"rank{rank}.json").write_text(json.dumps(outcomes))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_stop_together_over_gloo(tmp_path):
    """Two processes over gloo: steps 0 and 1 go on everywhere; at step 2 only rank 1 has
    a problem: rank 1 raises its own, rank 0 stops because a peer did."""
    import json

    import torch.multiprocessing as mp
    from conftest import free_ports
    mp.spawn(_stop_together_rank, args=(2, free_ports(1)[0], (1,), str(tmp_path)), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert outcomes == [["go", "go", "peer"], ["go", "go", "own"]]


class _NaNFromThirdStep(BareSession):
    """A bare session whose model's output turns NaN from its third training forward pass on."""

    def prepare_model(self, model):
        calls = []

        def poison(module, inputs, output):
            calls.append(module.training)
            if sum(calls) < 3:
                return output
            return {k: v * float("nan") if torch.is_tensor(v) and v.is_floating_point() else v
                    for k, v in output.items()}
        model.register_forward_hook(poison)
        return super().prepare_model(model)


def test_non_finite_loss_stops_the_bare_loop_before_its_step(synthetic_shards, tmp_path):
    """The loop stops at the step whose loss is NaN, naming it, before anything of that
    step is applied: the last checkpoint is the one before."""
    from raytrain.train.fatal import NonFiniteLoss
    train, val = synthetic_shards
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path, **{
        "train.checkpoint_every": 2, "train.val_every": 100}))
    with pytest.raises(NonFiniteLoss, match="non-finite loss at step 3 "):
        run_loop(cfg, _NaNFromThirdStep(str(tmp_path), device="cpu"))
    assert latest_checkpoint(tmp_path / "checkpoints").step == 2


def _group_starts(caplog) -> int:
    """How many worker groups started, from the line rank 0 of each logs (forwarded)."""
    return sum(r.getMessage().startswith("[raytrain] worker group started")
               for r in caplog.records if r.name.startswith("raytrain.train."))


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(300)
@pytest.mark.parametrize("split", ["train", "val"])
def test_bad_data_of_one_ddp_rank_stops_both_together(synthetic_shards, tmp_path, caplog, local_ray, split):
    """Two DDP workers, bad samples only in rank 1's part (of the training data, or of the
    validation set, past its first batch): both ranks stop at the same step instead of
    rank 0 waiting in a collective, Ray starts one worker group although it may retry
    twice, and the run stops with one line naming rank 1's shard, the counts and the
    reason (not a TypeError from unpickling the worker's error)."""
    import logging

    from fixtures_data import make_fake_samples

    from raytrain.data.plan import epoch_shard_order
    from raytrain.data.shards import write_shards
    from raytrain.train.fatal import RunStopped, read_fatal_error
    from raytrain.train.launch import run_dir_of, run_training
    caplog.set_level(logging.INFO, logger="raytrain")
    train, val = synthetic_shards
    seed = load_config(DEMO, tiny_overrides(train, val, tmp_path)).seed
    if split == "train":  # two shards of 24: rank 1 reads the second of the epoch's order
        samples = make_fake_samples(48, seed=3)
        bad_shard = epoch_shard_order(2, seed, 0, shuffle=True)[1]
        for index in range(24 * bad_shard + 16, 24 * bad_shard + 20):
            samples[index]["jpg"] = b"\xff\xd8broken\xff\xd9"
        train, maxcount = str(tmp_path / "bad"), 24
    else:  # one shard of 16, not shuffled: rank 1 validates samples 8-15, two per batch
        samples = make_fake_samples(16, seed=3)
        bad_shard = 0
        for index in (14, 15):
            samples[index]["jpg"] = b"\xff\xd8broken\xff\xd9"
        val, maxcount = str(tmp_path / "bad"), 16
    write_shards(samples, str(tmp_path / "bad"), source="fake", licence="test", maxcount=maxcount)
    keys = tmp_path / "keys"
    cfg = load_config(DEMO, tiny_overrides(train, val, tmp_path / "runs", **{
        "ray.num_workers": 2, "ray.max_failures": 2, "data.max_bad_fraction": 0.01,
        "data.val_batch_size": 2, "optim.max_steps": 12, "train.val_every": 3,
        "train.checkpoint_every": 100, "train.sample_log": keys}))
    with pytest.raises(RunStopped) as caught:
        run_training(cfg)
    message = str(caught.value)
    assert message.startswith("TooManyBadSamples: ") and f"shard-{bad_shard:06d}.tar" in message, message
    assert "bad_jpeg" in message and "Traceback" not in message and "\n" not in message
    assert read_fatal_error(run_dir_of(cfg)) == message
    last_steps = [max(int(line.split()[0]) for line in Path(f"{keys}.rank{rank}.txt").read_text().splitlines())
                  for rank in range(2)]
    assert last_steps[0] == last_steps[1] < 12, last_steps
    if split == "val":
        assert last_steps == [3, 3]
    assert _group_starts(caplog) == 1
