"""Build and run the TorchTrainer from a validated config; fail fast before workers start.

Ray is started with `log_to_driver=False`: the output of Ray's own processes (the Train
controller, its placement-group cleaner, worker stdout) stays in Ray's session logs, and the
workers send raytrain's log records to the driver through `console.WorkerLines`
(docs/design.md §6).
"""
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig, to_dict
from ..connect import connect_ray
from ..data.io import join_url
from ..data.shards import checked_count
from .fatal import RunStopped, clear_fatal_error, read_fatal_error
from .run_identity import claim_run


def storage_uri(path: str) -> str:
    """Ray wants absolute local paths; URLs pass through."""
    return path if "://" in path else str(Path(path).expanduser().resolve())


def run_dir_of(cfg: ExperimentConfig) -> str:
    """Where Ray Train keeps this run: ``train.storage_path/<name>``."""
    return join_url(storage_uri(cfg.train.storage_path), cfg.name)


def preflight_data(cfg: ExperimentConfig):
    """Missing, inconsistent or unreachable shards or zero samples fail here, naming the
    key (every set ``data.pipeline.shard_sets`` says the run reads; with
    ``data.verify_checksums`` every shard's sha256 is checked too)."""
    from ..data.pipeline import shard_sets
    sets = shard_sets(cfg)
    train = [s for s in sets if s.split == "train"]
    largest = 0
    for shard_set in sets:
        total = checked_count(shard_set.key, shard_set.source, cfg.data.verify_checksums)
        if shard_set.split == "train":
            largest = max(largest, total)
    if largest < cfg.data.batch_size:
        raise ConfigError(f"{train[0].key if len(train) == 1 else 'data.mixture'}: {largest} samples is "
                          f"fewer than one batch (data.batch_size={cfg.data.batch_size})")


def preflight_model(cfg: ExperimentConfig):
    """A backbone checkpoint that is unreadable or matches too little (see
    model.backbones.load_backbone_weights) fails here, naming the key (the backbone's name
    is checked against the registry by config validation)."""
    from ..model.backbones import BackboneLoadError, create_backbone
    if cfg.model.backbone_checkpoint:
        try:
            create_backbone(cfg.model.backbone, cfg.model.backbone_checkpoint,
                            partial_ok=cfg.model.backbone_partial_ok)
        except (BackboneLoadError, FileNotFoundError) as err:
            raise ConfigError(f"model.backbone_checkpoint: {err}") from None


def preflight_body_model(cfg: ExperimentConfig):
    """``model.smpl_dir`` must hold body model files that load, before a worker starts."""
    from ..body.model import BodyModelError, check_body_model
    try:
        check_body_model(cfg.model.smpl_dir)
    except BodyModelError as err:
        raise ConfigError(f"model.smpl_dir: {err}") from None


def preflight_storage(cfg: ExperimentConfig):
    """``train.storage_path`` on object storage needs its fsspec backend and credentials."""
    path = cfg.train.storage_path
    if "://" not in path:
        return
    from ..data.io import get_fs, storage_error_hint
    try:  # a fresh client: fsspec's instance cache may hold one made before credentials were set
        fs, root = get_fs(path, {"skip_instance_cache": True})
        fs.exists(root)
    except Exception as err:  # noqa: BLE001 - reported with what to install or configure
        hint = storage_error_hint(path, err)
        if hint is None:
            raise
        raise ConfigError(f"train.storage_path: {hint}") from None


def run_log_path(cfg: ExperimentConfig, experiment: str | None = None) -> Path:
    """Where an entry point writes the run's log file: `<train.storage_path>/<name>/raytrain.log`
    (`experiment`: that directory instead), or `$RAYTRAIN_HOME/logs/<name>.log` for URLs."""
    if experiment and "://" not in experiment:
        return Path(experiment) / "raytrain.log"
    if "://" in cfg.train.storage_path or (experiment and "://" in experiment):
        from ..body.model import raytrain_home
        return raytrain_home() / "logs" / f"{cfg.name}.log"
    return Path(run_dir_of(cfg)) / "raytrain.log"


def init_ray(cfg: ExperimentConfig):
    """Connect to `ray.address` / RAY_ADDRESS, or start a local instance with ray.num_cpus.
    Ray's processes log to its session directory, not to this console (log_to_driver=False)."""
    connect_ray(cfg.ray.address, cfg.ray.num_cpus, log_to_driver=False, logging_level=logging.WARNING)


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
    clear_fatal_error(run_dir_of(cfg))  # a new attempt of the run: forget an old stop
    resources = {"CPU": cfg.ray.cpus_per_worker}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    return TorchTrainer(
        ray_train_worker,
        train_loop_config={"config": to_dict(cfg), "console": console, "run_dir": run_dir_of(cfg)},
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


def prepare(cfg: ExperimentConfig, check_data: bool = True, start_ray: bool = True,
            before_ray: Callable[[], Any] | None = None) -> Any:
    """The pre-flight of every command that trains (``train``, ``tune``, ``study``, ``demo``):
    what a worker would meet too late fails here, before Ray starts, as a ``ConfigError``
    naming the key (exit status 2). In order: the body model files, the storage backend,
    the shards (``check_data``), the backbone checkpoint; then ``before_ray`` (a command's
    own checks, e.g. tune's experiment folder, or the claim on a run directory: returned);
    then, with ``start_ray``, Ray is started or joined and the resources the run asks for
    are checked against the cluster."""
    preflight_body_model(cfg)
    preflight_storage(cfg)
    if check_data:
        preflight_data(cfg)
    preflight_model(cfg)
    held = before_ray() if before_ray is not None else None
    if start_ray:
        init_ray(cfg)
        preflight_resources(cfg)
    return held


def run_training(cfg: ExperimentConfig, check_data: bool = True):
    """Validate, start or connect to Ray, train, and return the Ray Train Result;
    ``RunStopped`` when a worker stopped the run on a deterministic error."""
    # another run's directory, or a live one: refused before Ray starts
    claim = prepare(cfg, check_data, before_ray=lambda: claim_run(cfg, run_dir_of(cfg)))
    run_dir = run_dir_of(cfg)
    from ..console import WorkerLines
    try:
        with WorkerLines() as lines:
            result = build_trainer(cfg, console=lines.queue).fit()
    except Exception as err:  # a deterministic error of a worker: one line, not Ray's dump
        fatal = read_fatal_error(run_dir) or _data_error_in(err)
        if fatal is not None:
            raise RunStopped(fatal) from None
        raise
    finally:
        claim.release()
    raise_if_run_stopped(cfg)
    return result


def raise_if_run_stopped(cfg: ExperimentConfig) -> None:
    """After ``fit()`` returned: ``RunStopped`` with the recorded line when the workers
    stopped on a deterministic error (they return normally then, ``fatal.py``)."""
    fatal = read_fatal_error(run_dir_of(cfg))
    if fatal is not None:
        raise RunStopped(fatal)


def _data_error_in(error: BaseException) -> str | None:
    """The one line of a ``DataError`` (or ``NonFiniteLoss``, or a ``CheckpointError`` of the
    checkpoint it resumed from) a worker raised, if any."""
    from ..checkpoints import CheckpointError
    from ..data.errors import DataError, user_line
    from .fatal import NonFiniteLoss
    seen, stack = set(), [error]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, (DataError, NonFiniteLoss, CheckpointError)):
            return user_line(current)
        stack.extend([current.__cause__, current.__context__, getattr(current, "cause", None)])
        stack.extend(getattr(current, "worker_failures", {}).values() if isinstance(
            getattr(current, "worker_failures", None), dict) else [])
    return None
