"""Where the training loop runs: under Ray Train, or bare in one process (benchmarks, tests).

Both expose the same small surface so `loop.run_loop` is one piece of code.
"""
import tempfile
from pathlib import Path
from typing import Any

import torch

from .checkpoint import latest_complete_checkpoint


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

    def __init__(self):
        import ray.train
        ctx = ray.train.get_context()
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
        """The latest *complete* checkpoint Ray knows, else the newest complete one on disk."""
        import ray.train

        from .checkpoint import is_complete
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = checkpoint.to_directory(tempfile.mkdtemp(prefix="raytrain-restore-"))
        if is_complete(self._restored):
            return self._restored
        run_dir = Path(checkpoint.path).parent
        found = latest_complete_checkpoint(str(run_dir)) if run_dir.exists() else None
        return str(found) if found else None

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
