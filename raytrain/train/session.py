"""Where the training loop runs: under Ray Train, or bare in one process (benchmarks, tests).

Both expose the same small surface so `loop.run_loop` is one piece of code.
"""
import logging
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import checkpoint_step, is_complete, latest_complete_checkpoint

log = logging.getLogger(__name__)


class BareSession:
    """One process, no Ray: checkpoints go to `run_dir/checkpoints/step_XXXXXXX`."""
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, run_dir: str, device: str | None = None):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports = []

    def prepare_model(self, model):
        return model.to(self.device)

    def latest_checkpoint_dir(self) -> str | None:
        found = latest_complete_checkpoint(str(self.run_dir / "checkpoints"))
        return str(found) if found else None

    def checkpoint_dir(self, step: int) -> str:
        return str(self.run_dir / "checkpoints" / f"step_{step:08d}")

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None):
        self.reports.append(dict(metrics, checkpoint=checkpoint_dir))

    def barrier(self):
        pass


class RaySession:
    """Inside a Ray Train worker: DDP via prepare_model, checkpoints via ray.train.report."""

    def __init__(self, run_dir: str | None = None):
        import ray.train
        ctx = ray.train.get_context()
        self.run_dir = run_dir  # train.storage_path/<name>: scanned for complete checkpoints
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        from ray.train.torch import get_device
        self.device = get_device()
        self._tmp = tempfile.TemporaryDirectory(prefix="raytrain-ckpt-")
        self._restored = None

    def prepare_model(self, model):
        from ray.train.torch import prepare_model
        return prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    def latest_checkpoint_dir(self) -> str | None:
        """The latest complete checkpoint: Ray's last registered one or a newer complete
        one in the run directory (``choose_resume``), saying which and why."""
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        registered = None
        if checkpoint is not None:
            self._restored = checkpoint.to_directory(tempfile.mkdtemp(prefix="raytrain-restore-"))
            registered = self._restored
        run_dir = self.run_dir
        if run_dir is None and checkpoint is not None:
            run_dir = str(Path(checkpoint.path).parent)
        chosen, note = choose_resume(registered, run_dir)
        if note and self.rank == 0:
            log.info("[raytrain] %s", note)
        return chosen

    def checkpoint_dir(self, step: int) -> str:
        path = Path(self._tmp.name) / f"step_{step:08d}"
        path.mkdir(parents=True, exist_ok=True)
        return str(path)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None):
        import ray.train
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)

    def barrier(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()


def choose_resume(registered: str | None, run_dir: str | None) -> tuple[str | None, str]:
    """(checkpoint to resume from, a note for the user) given Ray's last registered
    checkpoint (restored to a local directory, or None) and the run directory.

    The newest *complete* checkpoint wins: Ray's, unless it is incomplete or the run
    directory (local) holds a complete one of a later step (a checkpoint written but
    not registered when the run was interrupted). The note says what was skipped."""
    candidates = []
    registered_ok = registered is not None and is_complete(registered)
    if registered_ok:
        registered_step = checkpoint_step(registered)
        candidates.append((registered_step, registered, "Ray's last registered checkpoint"))
    on_disk = None
    if run_dir and "://" not in run_dir and Path(run_dir).is_dir():
        on_disk = latest_complete_checkpoint(run_dir)
    if on_disk is not None:
        candidates.append((checkpoint_step(str(on_disk)), str(on_disk), "the latest complete checkpoint on disk"))
    if not candidates:
        note = (f"Ray's last checkpoint {registered} is incomplete and {run_dir} holds no complete "
                "one: starting from scratch") if registered is not None else ""
        return None, note
    step, chosen, origin = max(candidates, key=lambda item: item[0])
    if registered is not None and chosen != registered:
        why = f"is at step {registered_step}" if registered_ok else "is incomplete"
        return chosen, f"resuming from {origin} {chosen} (step {step}): Ray's last registered checkpoint {why}"
    if registered is None:
        return chosen, f"resuming from {origin} {chosen} (step {step}): Ray registered none"
    return chosen, ""
