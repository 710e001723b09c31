"""`raytrain tune`: Ray Tune over full distributed training runs.

    grid = run_tune(cfg, "tune/spaces/paper.yaml", trials=16)            # new experiment
    grid = run_tune(cfg, "tune/spaces/paper.yaml", trials=16, resume=True)  # finish it

Every trial is a small function trainable (`CPU: TuneSettings.driver_cpus`) that builds the
trial's config (base config + the space's `fixed` + variant + sampled parameters), launches
`build_trainer(trial_cfg).fit()` — a whole Ray Train `TorchTrainer` run with its own workers —
and forwards each fresh validation to Tune through a `TuneReportCallback`. Search: Optuna
TPE (seeded with `cfg.seed`); grid spaces (`grid` entries or `variants`) use Tune's grid
search instead. Scheduler: ASHA on `val_mpjpe` (mode min) with the training step as time
attribute, or FIFO. The experiment lives in `<train.storage_path>/tune/<cfg.name>`; after the
run the best trial is exported to `<experiment>/best/` (export.py).
"""
import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, ExperimentConfig, dump_yaml, to_dict
from ..workarounds import placement_group_recorder, release_callback
from .ablations import write_ablation_table
from .experiment import BASE_CONFIG_FILE, SPACE_FILE, TRAIN_RUNS_DIR, TRIAL_CONFIG_FILE, experiment_dir
from .export import export_best
from .space import SearchSpace, load_space

log = logging.getLogger(__name__)


@dataclass
class TuneSettings:
    """Driver settings. Sources, later wins: defaults, the space file's `tune:` block,
    run_tune(settings=...)."""
    metric: str = "val_mpjpe"
    mode: str = "min"
    scheduler: str = "asha"               # asha | fifo (grid spaces default to fifo)
    max_concurrent_trials: int = 0        # 0: as many as the cluster's CPUs/GPUs hold
    driver_cpus: float = 0.1              # the trial's own function actor (Train's controller takes 0)
    grace_period: int = 0                 # ASHA, in training steps; 0: train.val_every
    reduction_factor: float = 2.0         # ASHA
    max_t: int = 0                        # ASHA, in steps; 0: the run's total steps
    n_startup_trials: int = 0             # Optuna TPE random start-up trials; 0: max(2, trials // 4)
    repeats: int = 1                      # grid spaces: runs per grid point
    export: bool = True                   # export the best trial when the run ends

    @classmethod
    def from_sources(cls, cfg: ExperimentConfig, space: SearchSpace, overrides: dict | None = None):
        values: dict[str, Any] = {}
        if space.has_grid:
            values["scheduler"] = "fifo"
        for source, label in ((space.tune, f"{space.path}: tune"), (overrides or {}, "settings")):
            for key, value in source.items():
                if key not in _FIELDS:
                    raise ConfigError(f"{label}.{key}: unknown tune setting; known: {', '.join(_FIELDS)}")
                values[key] = value
        settings = cls(**values)
        settings.check()
        return settings

    def check(self):
        if self.mode not in ("min", "max"):
            raise ConfigError(f"tune.mode: {self.mode!r} is not min or max")
        if self.scheduler not in ("asha", "fifo"):
            raise ConfigError(f"tune.scheduler: {self.scheduler!r} is not asha or fifo")
        for name in ("max_concurrent_trials", "grace_period", "max_t", "n_startup_trials"):
            if getattr(self, name) < 0:
                raise ConfigError(f"tune.{name}: must be >= 0, got {getattr(self, name)}")
        if self.driver_cpus < 0:
            raise ConfigError(f"tune.driver_cpus: must be >= 0, got {self.driver_cpus}")
        if self.reduction_factor <= 1:
            raise ConfigError(f"tune.reduction_factor: must be > 1, got {self.reduction_factor}")
        if self.repeats < 1:
            raise ConfigError(f"tune.repeats: must be >= 1, got {self.repeats}")


_FIELDS = [f.name for f in dataclasses.fields(TuneSettings)]


# ----------------------------------------------------------------------------- the trial

class _ValidationReportCallback:
    """Built lazily (inside the trial) as a TuneReportCallback subclass: forwards only reports
    that carry a fresh validation (every checkpoint, and steps divisible by train.val_every),
    because Tune rejects results without the metric and ASHA should see real values."""

    @staticmethod
    def create(val_every: int, metric: str):
        from ray.tune.integration.ray_train import TuneReportCallback

        class ForwardValidations(TuneReportCallback):
            def after_report(self, run_context, metrics, checkpoint):
                first = metrics[0] if metrics else {}
                if metric not in first:
                    return
                if checkpoint is None and int(first.get("step", 0)) % val_every:
                    return
                super().after_report(run_context, metrics, checkpoint)

        return ForwardValidations()


def make_trainable(base: dict[str, Any], space: SearchSpace, exp_path: str, metric: str):
    """The function trainable of every trial (closes over plain, picklable data)."""

    def raytrain_trial(params: dict[str, Any]):
        from ray import tune

        from ..config import config_from_raw
        from ..train.launch import build_trainer, raise_if_run_stopped
        ctx = tune.get_context()
        trial_id = ctx.get_trial_id()
        raw = space.apply(base, params)
        raw["name"] = trial_id
        raw["train"]["storage_path"] = f"{exp_path}/{TRAIN_RUNS_DIR}"
        cfg = config_from_raw(raw)
        trial_dir = Path(ctx.get_trial_dir())
        trial_dir.mkdir(parents=True, exist_ok=True)
        dump_yaml(cfg, str(trial_dir / TRIAL_CONFIG_FILE))
        trainer = build_trainer(cfg)
        callbacks = list(trainer.run_config.callbacks or [])
        callbacks.append(_ValidationReportCallback.create(cfg.train.val_every, metric))
        recorder = placement_group_recorder(trial_id)
        if recorder is not None:
            callbacks.append(recorder)
        trainer.run_config.callbacks = callbacks
        trainer.fit()
        raise_if_run_stopped(cfg)  # a deterministic error: the trial fails with its line

    return raytrain_trial


# ----------------------------------------------------------------------------- the driver

def run_tune(cfg: ExperimentConfig, space_path: str, trials: int, resume: bool = False,
             storage_path: str | None = None, settings: dict[str, Any] | None = None,
             check_data: bool = True):
    """Run (or with resume=True, finish) a search; returns Ray Tune's ResultGrid.

    `storage_path` replaces `train.storage_path` for this experiment; `settings` overrides
    TuneSettings fields. Ray is started or joined as for training (`ray.*` settings).
    """
    # Save the experiment state every 2 s (Tune's default is adaptive and can be minutes):
    # a driver killed right after a trial finished must not forget that it finished.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune's console output engine prints its experiment table even at verbose=0; the classic
    # reporter honours verbose=0 (docs/design.md §6.5)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    from ray import tune

    from ..train.launch import prepare, storage_uri
    if storage_path:
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, storage_path=storage_path))
    if trials < 1:
        raise ConfigError(f"--trials: must be at least 1, got {trials}")
    space = load_space(space_path, cfg)
    tset = TuneSettings.from_sources(cfg, space, settings)
    exp_path = experiment_dir(cfg)
    local = "://" not in exp_path

    def check_experiment():
        if resume and not tune.Tuner.can_restore(exp_path):
            raise ConfigError(f"--resume: no Tune experiment to resume at {exp_path}")
        if not resume and local and Path(exp_path, "tuner.pkl").exists():
            raise ConfigError(f"{exp_path} already holds a Tune experiment: pass --resume to finish it, "
                              f"or choose another name (name=...) or train.storage_path")

    prepare(cfg, check_data, before_ray=check_experiment)
    concurrency = _concurrency(cfg, tset)
    trainable = tune.with_resources(make_trainable(to_dict(cfg), space, exp_path, tset.metric),
                                    {"CPU": tset.driver_cpus})
    if resume:
        log.info("[raytrain] resuming %s", exp_path)
        tuner = tune.Tuner.restore(exp_path, trainable=trainable, resume_errored=True,
                                   resume_unfinished=True)
    else:
        if local:
            Path(exp_path).mkdir(parents=True, exist_ok=True)
            dump_yaml(cfg, str(Path(exp_path) / BASE_CONFIG_FILE))
            shutil.copyfile(space.path, Path(exp_path) / SPACE_FILE)
        num_samples = tset.repeats if space.has_grid else trials
        total_trials = space.grid_size * tset.repeats if space.has_grid else trials
        if space.has_grid and trials != total_trials:
            log.warning("%s is a grid: running its %d points x %d repeat(s), not --trials %d",
                        space_path, space.grid_size, tset.repeats, trials)
        tuner = tune.Tuner(
            trainable,
            param_space=space.tune_param_space(),
            tune_config=tune.TuneConfig(
                metric=tset.metric, mode=tset.mode, num_samples=num_samples,
                search_alg=_searcher(cfg, space, tset, trials),
                scheduler=_scheduler(cfg, tset),
                max_concurrent_trials=concurrency,
            ),
            run_config=tune.RunConfig(name=cfg.name,
                                      storage_path=f"{storage_uri(cfg.train.storage_path).rstrip('/')}/tune",
                                      failure_config=tune.FailureConfig(max_failures=0),
                                      callbacks=[release_callback(), _trial_lines(tset.metric, total_trials)],
                                      verbose=0),
        )
    grid = tuner.fit()
    _raise_if_all_failed(grid, exp_path)
    if space.variants and local:
        try:
            table = write_ablation_table(exp_path)
            log.info("%s", table.read_text())
        except FileNotFoundError as err:
            log.warning("no ablation table: %s", err)
    if tset.export and local:
        try:
            out = export_best(exp_path, metric=tset.metric, mode=tset.mode)
            log.info("[raytrain] best trial exported to %s", out)
        except (ValueError, FileNotFoundError) as err:
            log.warning("no best trial to export: %s", err)
    elif not local:
        log.info("[raytrain] %s is in object storage: no best/ export or ablation table; "
                 "`raytrain eval --experiment %s --best --data ...` ranks its checkpoints", exp_path, exp_path)
    return grid


def _raise_if_all_failed(grid, exp_path: str) -> None:
    """``RunStopped`` (exit status 1) when every trial of the experiment failed: there is
    nothing to rank or export, and the trials' errors are in their directories."""
    from ..data.errors import user_line
    from ..train.fatal import RunStopped
    if len(grid) and grid.num_errors == len(grid):
        first = next(iter(grid.errors), None)
        reason = f" (the first: {user_line(first)})" if first is not None else ""
        raise RunStopped(f"all {len(grid)} trials failed{reason}; each trial's error is in error.txt "
                         f"of its directory under {exp_path}")


def _trial_lines(metric: str, num_samples: int):
    """One console line per finished trial (Tune's own status tables are off: verbose=0)."""
    from ray import tune

    class TrialLines(tune.Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            result = trial.last_result or {}
            value = result.get(metric)
            shown = f"{metric}={value:.1f}" if isinstance(value, (int, float)) else f"no {metric}"
            params = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in (trial.config or {}).items())
            log.info("[raytrain] trial %s ended at step %s: %s (%s) [%d of %d trials started]",
                     trial.trial_id, result.get("step", "?"), shown, params, len(trials), num_samples)

        def on_trial_error(self, iteration, trials, trial, **info):
            log.warning("trial %s failed; its error: %s", trial.trial_id,
                        getattr(trial, "error_file", None) or "see the trial directory")

    return TrialLines()


def _concurrency(cfg: ExperimentConfig, tset: TuneSettings) -> int:
    """Trials that fit side by side; asking for more than fit fails now, naming the setting."""
    import ray
    total = ray.cluster_resources()
    per_trial_cpu = tset.driver_cpus + cfg.ray.num_workers * cfg.ray.cpus_per_worker
    fit = math.floor(total.get("CPU", 0) / per_trial_cpu + 1e-9) if per_trial_cpu > 0 else 10 ** 6
    if cfg.ray.use_gpu:
        fit = min(fit, int(total.get("GPU", 0)) // cfg.ray.num_workers)
    if fit < 1:
        raise ConfigError(f"one trial needs tune.driver_cpus={tset.driver_cpus} + ray.num_workers="
                          f"{cfg.ray.num_workers} x ray.cpus_per_worker={cfg.ray.cpus_per_worker} CPUs; "
                          f"the cluster has {total.get('CPU', 0)} (lower ray.cpus_per_worker)")
    if tset.max_concurrent_trials == 0:
        return fit
    if tset.max_concurrent_trials > fit:
        raise ConfigError(f"tune.max_concurrent_trials={tset.max_concurrent_trials}: only {fit} trial(s) "
                          f"of {per_trial_cpu} CPUs fit the cluster's {total.get('CPU', 0)} CPUs; "
                          "trials beyond that would wait for workers forever")
    return tset.max_concurrent_trials


def _searcher(cfg: ExperimentConfig, space: SearchSpace, tset: TuneSettings, trials: int):
    if space.has_grid:
        from ray.tune.search.basic_variant import BasicVariantGenerator
        return BasicVariantGenerator(random_state=cfg.seed)
    import optuna
    from ray.tune.search.optuna import OptunaSearch
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    startup = tset.n_startup_trials or max(2, trials // 4)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=startup)
    return OptunaSearch(sampler=sampler, metric=tset.metric, mode=tset.mode)


def _scheduler(cfg: ExperimentConfig, tset: TuneSettings):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    if tset.scheduler == "fifo":
        return FIFOScheduler()
    grace = tset.grace_period or cfg.train.val_every
    max_t = tset.max_t or _max_steps(cfg)
    # max_t one past the last step: a trial that reaches the end finishes by itself instead
    # of being stopped (killed) by ASHA at its final report
    return ASHAScheduler(time_attr="step", max_t=max(max_t, grace) + 1, grace_period=grace,
                         reduction_factor=tset.reduction_factor)


def _max_steps(cfg: ExperimentConfig) -> int:
    """The steps of a trial (``train.loop.run_steps``); only an upper bound for ASHA, so
    shards that cannot be counted here (``check_data=False``) leave it open."""
    from ..train.loop import run_steps
    try:
        return run_steps(cfg, cfg.ray.num_workers)
    except Exception:                           # noqa: BLE001 - only an upper bound for ASHA
        return cfg.optim.max_steps or cfg.optim.epochs * 10 ** 6
