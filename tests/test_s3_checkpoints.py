"""Training whose checkpoints live on S3 (a moto server on loopback) and resume from there."""

import pytest
from conftest import REPO, tiny_overrides

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.mark.timeout(600)
def test_checkpoints_on_s3_and_resume(synthetic_shards, s3_endpoint, caplog, tmp_path, monkeypatch):
    import logging

    import ray
    caplog.set_level(logging.INFO, logger="raytrain")
    home = tmp_path / "home"
    monkeypatch.setenv("RAYTRAIN_HOME", str(home))

    from raytrain.config import load_config
    from raytrain.train.launch import run_training
    train, val = synthetic_shards
    config = str(REPO / "configs" / "demo.yaml")
    first = load_config(config, tiny_overrides(train, val, "s3://runs/experiments", **{
        "optim.max_steps": 4, "train.checkpoint_every": 2, "name": "s3run"}))
    try:
        result = run_training(first)
        assert result.error is None and result.metrics["step"] == 4
        keys = [o["Key"] for o in s3_endpoint.list_objects_v2(Bucket="runs")["Contents"]]
        assert any(k.startswith("experiments/s3run/checkpoint_") and k.endswith("COMMIT.json")
                   for k in keys), keys
        again = load_config(config, tiny_overrides(train, val, "s3://runs/experiments", **{
            "optim.max_steps": 8, "train.checkpoint_every": 2, "name": "s3run"}))
        result = run_training(again)
    finally:
        ray.shutdown()
    assert result.error is None and result.metrics["step"] == 8
    assert result.checkpoint.path.startswith("runs/experiments/s3run/")
    assert any("resumed from step 4" in r.getMessage() for r in caplog.records)   # the worker's line

    # `raytrain eval --experiment s3://...` ranks what Ray Train uploaded by the commit records
    from raytrain.eval.run import select_checkpoints
    targets = select_checkpoints("s3://runs/experiments/s3run", best=True, top=4)
    assert len(targets) == 1 and targets[0].origin.startswith("s3://runs/experiments/s3run/checkpoint_")
    assert targets[0].path.is_relative_to(home) and targets[0].step in (2, 4, 6, 8)
