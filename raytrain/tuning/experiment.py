"""The layout of a tuning experiment directory, shared by the driver, export and ablations.

    <train.storage_path>/tune/<name>/
        raytrain_base_config.yaml   the experiment's base config
        raytrain_space.yaml         its search space
        <trial dir>/trial_config.yaml, params.json, result.json
        train_runs/<trial_id>/      each trial's Ray Train run (checkpoints)
"""
from pathlib import Path

from ..config import ExperimentConfig, load_config
from .space import load_space

BASE_CONFIG_FILE = "raytrain_base_config.yaml"
SPACE_FILE = "raytrain_space.yaml"
TRIAL_CONFIG_FILE = "trial_config.yaml"
TRAIN_RUNS_DIR = "train_runs"      # <experiment>/train_runs/<trial_id>: each trial's Ray Train run


def experiment_dir(cfg: ExperimentConfig) -> str:
    """`<train.storage_path>/tune/<cfg.name>` (absolute for local paths)."""
    from ..train.launch import storage_uri
    return f"{storage_uri(cfg.train.storage_path).rstrip('/')}/tune/{cfg.name}"


def load_experiment_inputs(exp_path: str):
    """(base config, SearchSpace) saved beside a local experiment."""
    base = load_config(str(Path(exp_path) / BASE_CONFIG_FILE))
    space = load_space(str(Path(exp_path) / SPACE_FILE), base)
    return base, space


def read_trial_config(trial_dir: str) -> ExperimentConfig | None:
    path = Path(trial_dir) / TRIAL_CONFIG_FILE
    return load_config(str(path)) if path.exists() else None
