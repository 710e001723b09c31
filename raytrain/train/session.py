"""Where the training loop runs: under Ray Train, or bare in one process (benchmarks, tests).

Both expose the same small surface so `loop.run_loop` is one piece of code; what a
checkpoint holds is `checkpoints.CheckpointManager`'s, where it goes and how it is resumed
is the session's.
"""
import logging
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import Checkpoint, choose_resume, latest_checkpoint, local_copy_dir, remove_orphaned_copies

log = logging.getLogger(__name__)


class BareSession:
    """One process, no Ray: checkpoints go to `run_dir/checkpoints/step_XXXXXXXX`."""
    rank, world_size, local_rank = 0, 1, 0

    def __init__(self, run_dir: str, device: str | None = None):
        self.run_dir = Path(run_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.reports = []

    def prepare_model(self, model):
        return model.to(self.device)

    @contextmanager
    def resume(self) -> Iterator[Checkpoint | None]:
        """The latest complete checkpoint of the run directory, or None."""
        yield latest_checkpoint(self.run_dir / "checkpoints")

    def latest_checkpoint_dir(self) -> str | None:
        found = latest_checkpoint(self.run_dir / "checkpoints")
        return str(found.path) if found else None

    def checkpoint_dir(self, step: int) -> str:
        return str(self.run_dir / "checkpoints" / f"step_{step:08d}")

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None):
        self.reports.append(dict(metrics, checkpoint=checkpoint_dir))

    def barrier(self):
        pass


class RaySession:
    """Inside a Ray Train worker: DDP via prepare_model, checkpoints via ray.train.report.

    A checkpoint is staged in a temporary directory, persisted by Ray and removed when the
    report returns; Ray's checkpoint to resume from is restored into one, removed once
    loaded. Copies a killed worker left on this machine are removed when a session starts."""

    def __init__(self, run_dir: str | None = None):
        import ray.train
        ctx = ray.train.get_context()
        self.run_dir = run_dir  # train.storage_path/<name>: scanned for complete checkpoints
        self.rank = ctx.get_world_rank()
        self.world_size = ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        from ray.train.torch import get_device
        self.device = get_device()
        self._staged: list[Path] = []
        for path in remove_orphaned_copies():
            log.info("[raytrain] removed %s, left by a stopped worker", path)

    def prepare_model(self, model):
        from ray.train.torch import prepare_model
        return prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})

    @contextmanager
    def resume(self) -> Iterator[Checkpoint | None]:
        """The latest complete checkpoint: Ray's last registered one or a newer complete
        one in the run directory (``choose_resume``), saying which and why."""
        import ray.train
        checkpoint = ray.train.get_checkpoint()
        restored = local_copy_dir("restore") if checkpoint is not None else None
        try:
            registered = checkpoint.to_directory(str(restored)) if checkpoint is not None else None
            run_dir = self.run_dir
            if run_dir is None and checkpoint is not None:
                run_dir = str(Path(checkpoint.path).parent)
            chosen, note = choose_resume(registered, run_dir)
            if note and self.rank == 0:
                log.info("[raytrain] %s", note)
            yield chosen
        finally:
            if restored is not None:
                shutil.rmtree(restored, ignore_errors=True)

    def checkpoint_dir(self, step: int) -> str:
        self._staged.append(local_copy_dir("ckpt"))
        path = self._staged[-1] / f"step_{step:08d}"
        path.mkdir()
        return str(path)

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None = None):
        import ray.train
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        try:
            ray.train.report(metrics, checkpoint=checkpoint)   # returns once Ray has persisted it
        finally:
            self.close()

    def close(self):
        """Remove the staged checkpoint copies (persisted by Ray, or not needed any more)."""
        while self._staged:
            shutil.rmtree(self._staged.pop(), ignore_errors=True)

    def barrier(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.barrier()
