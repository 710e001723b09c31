"""Build and run the TorchTrainer from a validated config; fail fast before workers start.

Ray is started with `log_to_driver=False`: the output of Ray's own processes (the Train
controller, its placement-group cleaner, worker stdout) stays in Ray's session logs, and the
workers send raytrain's log records to the driver through `console.WorkerLines`
(docs/design.md §6).
"""
import logging
import os
from pathlib import Path

from ..config import ConfigError, ExperimentConfig, to_dict


def storage_uri(path: str) -> str:
    """Ray wants absolute local paths; URLs pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def preflight_data(cfg: ExperimentConfig):
    """Missing shards or zero samples fail here, naming the key."""
    from ..data.pipeline import count_samples
    for key in ("train_shards", "val_shards"):
        source = getattr(cfg.data, key)
        if not source:
            raise ConfigError(f"data.{key}: not set")
        try:
            total = count_samples(source)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise ConfigError(f"data.{key}: cannot read shards at {source!r}: {err}") from None
        if total == 0:
            raise ConfigError(f"data.{key}: {source!r} holds zero samples")
        if key == "train_shards" and total < cfg.data.batch_size:
            raise ConfigError(f"data.train_shards: {total} samples is fewer than one batch "
                              f"(data.batch_size={cfg.data.batch_size})")


def run_log_path(cfg: ExperimentConfig, experiment: str | None = None) -> Path:
    """Where an entry point writes the run's log file: `<train.storage_path>/<name>/raytrain.log`
    (`experiment`: that directory instead), or `$RAYTRAIN_HOME/logs/<name>.log` for URLs."""
    if experiment and "://" not in experiment:
        return Path(experiment) / "raytrain.log"
    if "://" in cfg.train.storage_path or (experiment and "://" in experiment):
        from ..body.model import raytrain_home
        return raytrain_home() / "logs" / f"{cfg.name}.log"
    return Path(storage_uri(cfg.train.storage_path)) / cfg.name / "raytrain.log"


def init_ray(cfg: ExperimentConfig):
    """Connect to `ray.address` / RAY_ADDRESS, or start a local instance with ray.num_cpus.
    Ray's processes log to its session directory, not to this console (log_to_driver=False)."""
    import ray
    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, **quiet)


def preflight_resources(cfg: ExperimentConfig):
    """More GPUs or CPUs asked than the cluster has fails now, naming the setting."""
    import ray
    total = ray.cluster_resources()
    workers = cfg.ray.num_workers
    if cfg.ray.use_gpu and total.get("GPU", 0) < workers:
        raise ConfigError(f"ray.num_workers={workers} with ray.use_gpu=true needs {workers} GPUs; "
                          f"the cluster has {int(total.get('GPU', 0))}")
    need_cpu = workers * cfg.ray.cpus_per_worker
    if total.get("CPU", 0) < need_cpu:
        raise ConfigError(f"ray.cpus_per_worker={cfg.ray.cpus_per_worker} x ray.num_workers={workers} "
                          f"needs {need_cpu} CPUs; the cluster has {total.get('CPU', 0)} "
                          f"(lower ray.cpus_per_worker, fractions are fine)")


def build_trainer(cfg: ExperimentConfig, console=None):
    """The TorchTrainer of `cfg`; `console`: a WorkerLines queue the workers log to, or None
    (their records then stay in Ray's worker logs)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from .loop import ray_train_worker
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        ray_train_worker,
        train_loop_config={"config": to_dict(cfg), "console": console},
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                                     resources_per_worker=resources),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage_uri(cfg.train.storage_path),
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints,
                                               checkpoint_score_attribute="val_mpjpe",
                                               checkpoint_score_order="min"),
        ),
    )


def run_training(cfg: ExperimentConfig, check_data: bool = True):
    """Validate, start or connect to Ray, train, and return the Ray Train Result."""
    if check_data:
        preflight_data(cfg)
    init_ray(cfg)
    preflight_resources(cfg)
    from ..console import WorkerLines
    with WorkerLines() as lines:                 # fit() raises the workers' error if they fail
        return build_trainer(cfg, console=lines.queue).fit()
