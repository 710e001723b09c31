"""Shared fixtures: small synthetic shard sets, written once per test session."""
import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory):
    """(train_dir, val_dir): 48 + 16 rendered synthetic people."""
    from raytrain.data.synthetic import shard_synthetic
    root = tmp_path_factory.mktemp("synthetic")
    shard_synthetic(str(root / "train"), n=48, seed=1, maxcount=16)
    shard_synthetic(str(root / "val"), n=16, seed=2, maxcount=16)
    return str(root / "train"), str(root / "val")


def tiny_overrides(train, val, run_dir, **extra):
    """Overrides for a seconds-long training run on CPU."""
    values = {
        "data.train_shards": train, "data.val_shards": val, "data.crop_size": 64,
        "data.batch_size": 4, "data.val_batch_size": 8, "data.loader_workers": 0,
        "data.shuffle_buffer": 8, "model.backbone": "mobilenetv3_small_050",
        "model.decoder_hidden": 64, "model.pe_bands": 4, "optim.max_steps": 6,
        "train.val_every": 3, "train.checkpoint_every": 3, "train.log_every": 1,
        "train.tensorboard": False, "train.storage_path": str(run_dir), "ray.num_cpus": 2,
        "ray.cpus_per_worker": 0.5, "name": "tiny",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]
