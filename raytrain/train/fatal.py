"""Errors that retrying cannot fix, and how a run stops on them without being retried.

A data error (``data.errors.DataError``: bad shards, inconsistent manifest) or a
non-finite loss fails the same way on every attempt. Ray Train restarts the worker group
after any worker error (``ray.max_failures``), so no worker raises on one: the ranks meet
once per training step (``ranks.stop_together``: one all-reduce of a flag) and, when any rank
met such an error, every rank returns normally from the train function at that same
point. The rank that met it records its line in
``<storage_path>/<name>/raytrain_error.json`` (first writer wins); the others stop
because a peer did (``ranks.PeerStopped``). Ray sees a finished run and restarts nothing; the
driver finds the record and reports its line (``RunStopped``). A worker group restarted
for another reason (a lost node) that finds the record returns at once. A rank that
cannot write the record raises its error instead (Ray's restarts then meet it again, and
the driver reports it). The driver clears the record when a run starts.
"""

from __future__ import annotations

import json

from ..data.errors import user_line
from ..data.io import exists, get_fs, join_url, open_url

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


def fatal_path(run_dir: str) -> str:
    return join_url(run_dir, FATAL_FILE)


def clear_fatal_error(run_dir: str) -> None:
    path = fatal_path(run_dir)
    try:
        if exists(path):
            fs, target = get_fs(path)
            fs.rm(target)
    except OSError:
        pass


def record_fatal_error(path: str, error: BaseException) -> bool:
    """Write the error's one line (first writer wins; never raises). False when no
    record could be written."""
    try:
        if exists(path):
            return True
        with open_url(path, "wb") as handle:
            handle.write(json.dumps({"type": type(error).__name__, "message": user_line(error)}).encode())
        return True
    except Exception:  # noqa: BLE001 - the original error is what matters
        return False


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
