"""Errors that retrying cannot fix, and how a run stops on them instead of being retried.

Ray Train restarts the worker group after any worker error (``ray.max_failures``). A data
error (``data.errors.DataError``: bad shards, inconsistent manifest) or a non-finite loss
fails the same way on every attempt, so the worker that meets one records it in
``<storage_path>/<name>/raytrain_error.json`` before raising; a restarted worker finds
the record and stops at once (no data is read, no step is taken again), and the driver
reports the recorded line (``RunStopped``). The driver clears the record when a run
starts.
"""

from __future__ import annotations

import json

from ..data.errors import user_line
from ..data.io import exists, get_fs, open_url

FATAL_FILE = "raytrain_error.json"


class NonFiniteLoss(ArithmeticError):
    """The loss (or, ``what="gradient"``, the gradient) of a training step is NaN or
    infinite; nothing reached the optimiser."""

    def __init__(self, step: int, keys: list[str], terms: dict[str, float], what: str = "loss"):
        self.step, self.keys, self.terms, self.what = int(step), list(keys), dict(terms), what
        shown = ", ".join(self.keys[:8]) + (f", ... ({len(self.keys)} in all)" if len(self.keys) > 8 else "")
        values = ", ".join(f"{name}={value:.4g}" for name, value in self.terms.items())
        super().__init__(f"non-finite {what} at step {self.step} ({values}); batch samples: {shown}; "
                         "the run stops (check these samples' labels, lower optim.lr or set optim.grad_clip)")

    def __reduce__(self):
        return NonFiniteLoss, (self.step, self.keys, self.terms, self.what)


class RunStopped(RuntimeError):
    """The run stopped on a deterministic error of a worker; ``str()`` is its one line."""


class RepeatedFailure(RuntimeError):
    """A restarted worker found the record of a deterministic error and stopped."""


def fatal_path(run_dir: str) -> str:
    return run_dir.rstrip("/") + "/" + FATAL_FILE


def clear_fatal_error(run_dir: str) -> None:
    path = fatal_path(run_dir)
    try:
        if exists(path):
            fs, target = get_fs(path)
            fs.rm(target)
    except OSError:
        pass


def record_fatal_error(path: str, error: BaseException) -> None:
    """Write the error's one line (first writer wins; never raises)."""
    try:
        if exists(path):
            return
        with open_url(path, "wb") as handle:
            handle.write(json.dumps({"type": type(error).__name__, "message": user_line(error)}).encode())
    except Exception:  # noqa: BLE001 - the original error is what matters
        pass


def read_fatal_error(run_dir_or_path: str) -> str | None:
    path = run_dir_or_path if run_dir_or_path.endswith(".json") else fatal_path(run_dir_or_path)
    try:
        if not exists(path):
            return None
        with open_url(path, "rb") as handle:
            record = json.loads(handle.read(1 << 16).decode("utf-8"))
        return f"{record['type']}: {record['message']}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def stop_if_failed_before(path: str) -> None:
    """In a (restarted) worker: raise at once when an earlier attempt recorded an error."""
    line = read_fatal_error(path)
    if line is not None:
        raise RepeatedFailure(f"{line} (recorded by an earlier attempt: not retried)")
