"""Real Ray clusters: `ray job submit` against a local head, and DDP across two nodes."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, LocalRayHead, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def ray_head():
    """One local `ray start` head (2 CPUs) for the job-submission tests: each job ends
    before the next starts and gives its CPUs back."""
    with LocalRayHead(num_cpus=2) as head:
        yield head


@pytest.mark.timeout(600)
def test_ray_job_submit_trains_and_checkpoints(synthetic_shards, tmp_path, ray_head):
    """The real `ray job submit` of a demo training against a local head started with
    explicit CPUs: the job succeeds and leaves a complete checkpoint."""
    from ray.job_submission import JobStatus
    train, val = synthetic_shards
    runs = tmp_path / "runs"
    overrides = tiny_overrides(train, val, runs, **{"ray.num_cpus": "null", "name": "job"})
    head = ray_head
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", "train-1",
         "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
         "--", "raytrain", "train", "--config", "configs/demo.yaml", *overrides],
        env=head.env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    status, logs = head.wait_for_job("train-1", timeout=480)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-3000:]}"
    assert list((runs / "job").glob("checkpoint_*/COMMIT.json")), f"no checkpoint under {runs / 'job'}"
    # the job's console: the workers' progress lines, once each; none of Ray's own chatter
    progress = [line for line in logs.splitlines() if line.startswith("[raytrain] step ")]
    assert [line.split()[2] for line in progress if "validation" not in line] == [f"{i}/6" for i in range(1, 7)]
    for chatter in ("PlacementGroupCleaner", "Reporting training result", "TrainController"):
        assert chatter not in logs, chatter


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_a_sweep(synthetic_shards, tmp_path, ray_head):
    """`raytrain tune` submitted as a Ray job: both trials finish and the best is exported."""
    import json

    from ray.job_submission import JobStatus
    train, val = synthetic_shards
    runs = tmp_path / "runs"
    overrides = tiny_overrides(train, val, runs, **{
        "ray.num_cpus": "null", "name": "jobsweep", "ray.cpus_per_worker": 0.9,
        "optim.max_steps": 4, "train.val_every": 2, "train.checkpoint_every": 2})
    head = ray_head
    submit = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--no-wait", "--submission-id", "sweep-1",
         "--working-dir", str(REPO), "--runtime-env", str(REPO / "cluster" / "runtime_env.yaml"),
         "--", "raytrain", "tune", "--config", "configs/demo.yaml",
         "--space", "tune/spaces/demo.yaml", "--trials", "2", *overrides],
        env=head.env, capture_output=True, text=True, timeout=180)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    status, logs = head.wait_for_job("sweep-1", timeout=480)
    assert status == JobStatus.SUCCEEDED, f"{status}\n{logs[-3000:]}"
    summary = json.loads((runs / "tune" / "jobsweep" / "best" / "summary.json").read_text())
    assert summary["num_trials"] == 2


@pytest.mark.timeout(600)
def test_two_node_ddp_replicas_agree(synthetic_shards, tmp_path):
    """Two nodes with one CPU each: one worker per node, identical parameters after K steps."""
    import ray
    from ray.cluster_utils import Cluster
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raytrain.config import load_config, to_dict
    train, val = synthetic_shards
    cfg = load_config(str(REPO / "configs/demo.yaml"), tiny_overrides(
        train, val, tmp_path / "runs", **{"ray.num_workers": 2, "data.batch_size": 8,
                                          "optim.max_steps": 4, "train.checkpoint_every": 100}))
    out = tmp_path / "digests"
    out.mkdir()

    def worker(raw):
        import ray.train
        import torch

        from raytrain.config import config_from_raw
        from raytrain.train.loop import run_loop
        from raytrain.train.session import RaySession
        session = RaySession()
        run_loop(config_from_raw(raw["cfg"]), session)
        module = session.model.module if hasattr(session.model, "module") else session.model
        flat = torch.cat([p.detach().flatten() for p in module.parameters()]).numpy().tobytes()
        node = ray.get_runtime_context().get_node_id()
        Path(raw["out"], f"rank{session.rank}.txt").write_text(
            f"{node} {hashlib.sha256(flat).hexdigest()}")

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address)
    try:
        result = TorchTrainer(
            worker, train_loop_config={"cfg": to_dict(cfg), "out": str(out)},
            scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name="two-node", storage_path=str(tmp_path / "ray"))).fit()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert result.error is None
    (node0, digest0), (node1, digest1) = (
        (out / f"rank{r}.txt").read_text().split() for r in (0, 1))
    assert node0 != node1, "both workers ran on one node"
    assert digest0 == digest1, "DDP replicas diverged"
