"""Progress lines, TensorBoard events, MLflow (optional) and the sample-key audit log.

Progress and validation lines are INFO records of this module's logger, one per interval
on rank 0; the entry point decides where they go (raytrain/console.py).
"""
import logging
import os
import time
from collections import Counter
from pathlib import Path

log = logging.getLogger(__name__)


class RunLogger:
    """Rank 0 logs progress and writes events; every rank may write its sample-key log."""

    def __init__(self, cfg, session, total_steps: int):
        self.cfg, self.session, self.total_steps = cfg, session, total_steps
        self.rank = session.rank
        self.t0 = time.perf_counter()
        self.last_t, self.last_step, self.samples = self.t0, None, 0
        self.source_counts: Counter = Counter()  # data.mixture: samples per source, this rank
        self.tb = self._tensorboard() if self.rank == 0 and cfg.train.tensorboard else None
        self.mlflow = self._mlflow() if self.rank == 0 and cfg.train.mlflow_uri else None
        self.key_log = None
        if cfg.train.sample_log:
            path = Path(f"{cfg.train.sample_log}.rank{self.rank}.txt")
            path.parent.mkdir(parents=True, exist_ok=True)
            self.key_log = open(path, "a", buffering=1)
            Path(f"{cfg.train.sample_log}.rank{self.rank}.pid").write_text(str(os.getpid()))

    def step(self, pos, terms: dict[str, float], num_samples: int, lr: float, keys,
             sources: list[str] | None = None):
        if self.key_log:
            self.key_log.writelines(f"{pos.step} {pos.epoch} {k}\n" for k in keys)
        self.samples += num_samples
        if sources:
            self.source_counts.update(sources)
        if self.last_step is None:
            self.last_step = pos.step - 1
        if pos.step % self.cfg.train.log_every and pos.step != self.total_steps:
            return
        now = time.perf_counter()
        rate = self.samples * self.session.world_size / max(now - self.last_t, 1e-9)
        eta = (self.total_steps - pos.step) * (now - self.last_t) / max(pos.step - self.last_step, 1)
        self.last_t, self.last_step, self.samples = now, pos.step, 0
        if self.rank != 0:
            return
        losses = " ".join(f"{k}={v + 0.0:.4g}" for k, v in terms.items())   # + 0.0: no "-0"
        mix = (" sources " + " ".join(f"{k}={v}" for k, v in sorted(self.source_counts.items()))
               if self.source_counts else "")
        log.info("[raytrain] step %d/%d epoch %d %.1f persons/s lr=%.3g %s%s eta %s", pos.step,
                 self.total_steps, pos.epoch, rate, lr, losses, mix, _duration(eta))
        self._scalars({f"train/{k}": v for k, v in terms.items()} | {"train/lr": lr,
                      "train/persons_per_s": rate}
                      | {f"data/samples_{k}": v for k, v in self.source_counts.items()}, pos.step)

    def validation(self, pos, metrics: dict[str, float]):
        if self.rank != 0:
            return
        shown = " ".join(f"{k}={v:.3f}" if k.endswith("_ratio") else f"{k}={v:.1f}"
                         for k, v in metrics.items() if k != "val_samples")   # mm, ratios
        log.info("[raytrain] step %d validation (%d persons): %s", pos.step,
                 int(metrics.get("val_samples", 0)), shown)
        self._scalars({f"val/{k[4:]}": v for k, v in metrics.items()}, pos.step)

    def close(self):
        if self.tb:
            self.tb.close()
        if self.key_log:
            self.key_log.close()

    def _scalars(self, values: dict[str, float], step: int):
        if self.tb:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)
        if self.mlflow:
            self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in values.items()}, step=step)

    def _tensorboard(self):
        storage = self.cfg.train.storage_path
        if "://" in storage:
            from ..body.model import raytrain_home
            directory = raytrain_home() / "tb" / self.cfg.name
        else:
            directory = Path(storage) / self.cfg.name / "tensorboard"
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(directory))

    def _mlflow(self):
        try:
            import mlflow
        except ImportError:
            raise RuntimeError("train.mlflow_uri is set but mlflow is not installed: "
                               "pip install 'raytrain[mlflow]'") from None
        mlflow.set_tracking_uri(self.cfg.train.mlflow_uri)
        mlflow.set_experiment(self.cfg.name)
        mlflow.start_run()
        return mlflow


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"
