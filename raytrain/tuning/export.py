"""Best-trial export of a Tune experiment into `<experiment>/best/`.

    out = export_best("runs/tune/demo")      # -> Path("runs/tune/demo/best")

Writes `config.yaml` (the best trial's full config, loadable by `load_config`),
`checkpoint/` (its best checkpoint by the metric, copied), `summary.json`, `trials.csv`
(one row per trial: status, parameters, best metrics, last step, early stop), and PNGs:
`optimization_history.png`, `param_importances.png` (Optuna fANOVA; a rank-correlation
fallback with fewer than 4 finished trials), and `mpjpe_vs_<param>.png` per parameter.
Reads only files: the trials' `params.json` / `result.json` written by Tune and their
`trial_config.yaml` written by the trial, so it runs with or without Ray.
"""
import csv
import json
import logging
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..numeric import is_finite_number
from .experiment import load_experiment_inputs, read_trial_config

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "checkpoint_path"
METRIC_COLUMNS = ("val_mpjpe", "val_pa_mpjpe", "val_pve", "val_cam_err")


@dataclass
class TrialRecord:
    trial_id: str
    directory: Path
    params: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    errored: bool = False

    @property
    def last_step(self) -> int:
        return int(self.results[-1].get("step", 0)) if self.results else 0

    @property
    def start_time(self) -> float:
        return float(self.results[0].get("timestamp", 0)) if self.results else math.inf

    def best(self, metric="val_mpjpe", mode="min", with_checkpoint=False) -> dict[str, Any] | None:
        rows = [r for r in self.results if is_finite_number(r.get(metric))
                and (not with_checkpoint or r.get(CHECKPOINT_KEY))]
        if not rows:
            return None
        pick = min if mode == "min" else max
        return pick(rows, key=lambda r: r[metric])


def load_trials(exp_path: str) -> list[TrialRecord]:
    """Every trial directory of a local Tune experiment, oldest first."""
    from .space import decode_params
    trials = []
    for params_file in sorted(Path(exp_path).glob("*/params.json")):
        directory = params_file.parent
        params = decode_params(json.loads(params_file.read_text()))
        results = []
        result_file = directory / "result.json"
        if result_file.exists():
            for line in result_file.read_text().splitlines():
                line = line.strip()
                if line:
                    try:
                        results.append(json.loads(line))
                    except ValueError:
                        continue              # a line cut by a kill
        trial_id = results[0].get("trial_id") if results else _trial_id_from_dir(directory.name)
        trials.append(TrialRecord(trial_id=str(trial_id), directory=directory, params=params,
                                  results=results, errored=(directory / "error.txt").exists()))
    trials.sort(key=lambda t: (t.start_time, t.directory.name))
    return trials


def best_trial(trials: list[TrialRecord], metric="val_mpjpe", mode="min"):
    """(trial, report) with the best checkpointed value of `metric` over all trials."""
    scored = [(t, t.best(metric, mode, with_checkpoint=True)) for t in trials]
    scored = [(t, r) for t, r in scored if r is not None]
    if not scored:
        raise ValueError("no trial reported a checkpoint with a finite " + metric)
    pick = min if mode == "min" else max
    return pick(scored, key=lambda tr: tr[1][metric])


def export_best(exp_path: str, out: str | None = None, metric="val_mpjpe", mode="min",
                plots: bool = True) -> Path:
    trials = load_trials(exp_path)
    if not trials:
        raise FileNotFoundError(f"no trials (*/params.json) under {exp_path}")
    out_dir = Path(out) if out else Path(exp_path) / "best"
    out_dir.mkdir(parents=True, exist_ok=True)
    trial, report = best_trial(trials, metric, mode)
    cfg = _trial_config(exp_path, trial)
    from ..config import dump_yaml
    dump_yaml(cfg, str(out_dir / "config.yaml"))
    source = str(report[CHECKPOINT_KEY])
    target = out_dir / "checkpoint"
    export_checkpoint(source, target)
    max_step = max(t.last_step for t in trials)
    summary = {
        "trial_id": trial.trial_id, "trial_dir": str(trial.directory), "metric": metric, "mode": mode,
        metric: report[metric], "step": report.get("step"),
        "metrics": {k: report[k] for k in METRIC_COLUMNS if k in report},
        "params": trial.params, "checkpoint_source": str(source), "checkpoint": str(target),
        "num_trials": len(trials), "num_errored": sum(t.errored for t in trials),
        "num_stopped_early": sum(_stopped_early(t, max_step) for t in trials),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    write_trials_csv(trials, out_dir / "trials.csv", metric, mode, max_step)
    if plots:
        write_plots(trials, out_dir, metric, mode, exp_path)
    return out_dir


def export_checkpoint(source: str, target: Path) -> None:
    """Copy checkpoint ``source`` (local path or URL) to ``target``, verified: opened
    through ``checkpoints.open_checkpoint`` (a URL copied into the cache first), so an
    incomplete or changed checkpoint is refused, not exported."""
    from ..checkpoints import COMMIT_FILE, STATE_FILE, open_checkpoint
    checkpoint = open_checkpoint(source)
    if target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for name in (STATE_FILE, COMMIT_FILE):
        shutil.copy2(checkpoint.path / name, target / name)


def write_trials_csv(trials, path, metric="val_mpjpe", mode="min", max_step=None):
    max_step = max_step if max_step is not None else max((t.last_step for t in trials), default=0)
    names = _param_names(trials)
    header = ["trial_id", "status", "last_step", "reports", "stopped_early", *names,
              *METRIC_COLUMNS, "best_step", CHECKPOINT_KEY]
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for t in trials:
            best = t.best(metric, mode) or {}
            best_ckpt = t.best(metric, mode, with_checkpoint=True) or {}
            status = "error" if t.errored else ("no_results" if not t.results else "ok")
            writer.writerow([t.trial_id, status, t.last_step, len(t.results), _stopped_early(t, max_step),
                             *[_cell(t.params.get(n)) for n in names],
                             *[best.get(k, "") for k in METRIC_COLUMNS], best.get("step", ""),
                             best_ckpt.get(CHECKPOINT_KEY, "")])


# ----------------------------------------------------------------------------- plots

def write_plots(trials, out_dir: Path, metric="val_mpjpe", mode="min", exp_path=None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    finished = [(t, t.best(metric, mode)) for t in trials]
    finished = [(t, b[metric]) for t, b in finished if b]
    pick = min if mode == "min" else max

    fig, ax = plt.subplots(figsize=(6, 4))
    if finished:
        xs = list(range(len(finished)))
        ys = [v for _, v in finished]
        running = [pick(ys[:i + 1]) for i in xs]
        ax.scatter(xs, ys, label="trial (best report)", color="tab:blue")
        ax.step(xs, running, where="post", label="best so far", color="tab:red")
        ax.legend()
    ax.set_xlabel("trial (start order)")
    ax.set_ylabel(f"{metric} (mm)")
    ax.set_title("Optimisation history")
    written.append(_save(fig, out_dir / "optimization_history.png"))

    importances, method = param_importances(trials, metric, mode, exp_path)
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.45 * max(1, len(importances))))
    if importances:
        names = list(importances)[::-1]
        ax.barh(names, [importances[n] for n in names], color="tab:green")
    ax.set_xlabel(f"importance ({method})")
    ax.set_title("Parameter importances")
    written.append(_save(fig, out_dir / "param_importances.png"))

    for name in _param_names(trials):
        pts = [(t.params.get(name), v) for t, v in finished if name in t.params]
        fig, ax = plt.subplots(figsize=(5, 3.5))
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in pts)
        if numeric and pts:
            ax.scatter([x for x, _ in pts], [y for _, y in pts], color="tab:blue")
            positive = all(x > 0 for x, _ in pts)
            if positive and max(x for x, _ in pts) / min(x for x, _ in pts) > 20:
                ax.set_xscale("log")
        elif pts:
            labels = sorted({_cell(x) for x, _ in pts})
            index = {label: i for i, label in enumerate(labels)}
            ax.scatter([index[_cell(x)] for x, _ in pts], [y for _, y in pts], color="tab:blue")
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlabel(name)
        ax.set_ylabel(f"{metric} (mm)")
        ax.set_title(f"{metric} vs {name}")
        written.append(_save(fig, out_dir / f"mpjpe_vs_{_safe(name)}.png"))
    return written


def param_importances(trials, metric="val_mpjpe", mode="min", exp_path=None):
    """({param: importance}, method): Optuna fANOVA with >= 4 finished trials, else |Spearman rho|."""
    rows = [(t.params, t.best(metric, mode)[metric]) for t in trials if t.best(metric, mode)]
    names = [n for n in _param_names(trials) if len({_cell(p.get(n)) for p, _ in rows}) > 1]
    if not names or len(rows) < 2:
        return {}, "too few trials"
    if len(rows) >= 4:
        try:
            return _optuna_importances(rows, names, mode), "fANOVA"
        except Exception as err:            # noqa: BLE001 - fall back, say so
            log.warning("optuna importance failed (%s); using rank correlation", err)
    return _rank_importances(rows, names), "|Spearman rho|"


def _optuna_importances(rows, names, mode):
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    dists = {}
    for n in names:
        values = [p.get(n) for p, _ in rows]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            lo, hi = float(min(values)), float(max(values))
            log = lo > 0 and hi / lo > 20
            dists[n] = FloatDistribution(lo, hi, log=log)
        else:
            dists[n] = CategoricalDistribution(sorted({_cell(v) for v in values}))
    study = optuna.create_study(direction="minimize" if mode == "min" else "maximize")
    for params, value in rows:
        p = {n: (float(params[n]) if isinstance(dists[n], FloatDistribution) else _cell(params[n]))
             for n in names}
        study.add_trial(optuna.trial.create_trial(params=p, distributions=dists, value=float(value)))
    evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
    return dict(optuna.importance.get_param_importances(study, evaluator=evaluator))


def _rank_importances(rows, names):
    import numpy as np

    def ranks(values):
        order = {v: i for i, v in enumerate(sorted(set(values)))}
        return np.array([order[v] for v in values], dtype=float)
    y = ranks([v for _, v in rows])
    out = {}
    for n in names:
        x = ranks([_cell(p.get(n)) if not isinstance(p.get(n), (int, float)) else p.get(n) for p, _ in rows])
        rho = 0.0 if x.std() == 0 or y.std() == 0 else float(np.corrcoef(x, y)[0, 1])
        out[n] = abs(rho)
    total = sum(out.values()) or 1.0
    return dict(sorted(((k, v / total) for k, v in out.items()), key=lambda kv: -kv[1]))


# ----------------------------------------------------------------------------- helpers

def _trial_config(exp_path, trial: TrialRecord):
    cfg = read_trial_config(str(trial.directory))
    if cfg is None:
        base, space = load_experiment_inputs(exp_path)
        cfg = space.trial_config(base, trial.params)
    return cfg


def _stopped_early(t: TrialRecord, max_step: int) -> bool:
    return bool(t.results) and not t.errored and t.last_step < max_step


def _param_names(trials) -> list[str]:
    names: list[str] = []
    for t in trials:
        for n in t.params:
            if n not in names:
                names.append(n)
    return names


def _trial_id_from_dir(name: str) -> str:
    match = re.search(r"_([0-9a-f]{5}_\d{5})_", name)
    return match.group(1) if match else name


def _cell(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else ("" if v is None else str(v))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return path
