"""Checkpoints that are either whole or ignored: the two files, the commit record, and the
`Checkpoint` value that was verified once.

    <checkpoint>/state.pt      model, optimizer, scheduler, scaler, step, epoch, samples_in_epoch,
                               rng, metrics, config (JSON text): tensors and plain data only
    <checkpoint>/COMMIT.json   written last: {"step", "sha256" of state.pt, "format": 1, "metrics"}

Both files are written under a temporary name and renamed into place, COMMIT.json last, so
a write killed half-way leaves no record (or one state.pt does not match) and is never
loaded. The commit record is the cheap test (does a checkpoint claim to be here, of which
step and metrics: enough to rank checkpoints in object storage without copying them); the
SHA-256 of state.pt is the expensive one, done once per command by `verify_local`.
"""
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import io as data_io
from ..files import load_torch_file, read_bounded

STATE_FILE = "state.pt"
COMMIT_FILE = "COMMIT.json"
MAX_COMMIT_BYTES = 1 << 16
MAX_STATE_BYTES = 16 << 30       # a state.pt larger than this (or inflating to more) is refused


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (one line: the CLI prints it and exits 2)."""


class IncompleteCheckpoint(CheckpointError):
    """No valid commit record, or a state.pt that does not match it: interrupted or damaged."""


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (tensors and plain data) atomically into `directory`, COMMIT.json last."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (STATE_FILE + ".tmp")
    import torch
    torch.save(state, tmp)
    _, digest = data_io.sha256_of(str(tmp))
    os.replace(tmp, path / STATE_FILE)
    metrics = {k: float(v) for k, v in (state.get("metrics") or {}).items() if math.isfinite(float(v))}
    commit = {"step": int(state.get("step", 0)), "sha256": digest, "format": 1, "metrics": metrics}
    tmp_commit = path / (COMMIT_FILE + ".tmp")
    tmp_commit.write_text(json.dumps(commit))
    os.replace(tmp_commit, path / COMMIT_FILE)
    return path


def parse_commit(raw: bytes) -> dict[str, Any] | None:
    """A COMMIT.json record as written by `save_checkpoint`, or None for anything else
    (too long, not JSON, a step or digest we did not write)."""
    if len(raw) > MAX_COMMIT_BYTES:
        return None
    try:
        commit = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(commit, dict):
        return None
    step = commit.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None
    return commit if isinstance(commit.get("sha256"), str) else None


def read_commit(directory: str | Path) -> dict[str, Any] | None:
    """The commit record of checkpoint directory `directory` (a local path or a URL), or
    None when it has none we wrote."""
    url = data_io.join_url(str(directory), COMMIT_FILE)
    try:
        return parse_commit(read_bounded(url, MAX_COMMIT_BYTES, url))
    except (OSError, ValueError):
        return None


def stored_val_mpjpe(metrics) -> float:
    """The val_mpjpe of a checkpoint's stored metrics (commit record or state), inf when
    there is no finite number."""
    value = metrics.get("val_mpjpe") if isinstance(metrics, dict) else None
    finite = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if finite else math.inf


@dataclass(eq=False)
class Checkpoint:
    """A complete checkpoint directory on this machine whose state.pt had the SHA-256 of its
    commit record when it was opened (`verify_local`, or a copy made by `remote.fetch`).
    `origin`: the path or URL it was named by. Nothing hashes it again; `state()` reads it
    once (tensors memory-mapped, read when touched)."""
    path: Path
    commit: dict[str, Any]
    origin: str
    _state: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def step(self) -> int:
        return int(self.commit["step"])

    @property
    def metrics(self) -> dict[str, float]:
        metrics = self.commit.get("metrics")
        return dict(metrics) if isinstance(metrics, dict) else {}

    def state(self) -> dict[str, Any]:
        """The saved state (`save_checkpoint`'s dict), loaded once; refused in one line
        (`CheckpointError`) when it holds anything but tensors and plain data or inflates
        beyond its file."""
        if self._state is None:
            state = load_torch_file(str(self.path / STATE_FILE), f"checkpoint {self.path / STATE_FILE}",
                                    CheckpointError, max_bytes=MAX_STATE_BYTES, mmap=True)
            if not isinstance(state, dict):
                raise CheckpointError(f"checkpoint {self.path / STATE_FILE}: holds a {type(state).__name__}, "
                                      "not the dict raytrain saves")
            self._state = state
        return self._state


def verify_local(directory: str | Path, origin: str | None = None, commit: dict | None = None) -> Checkpoint:
    """The checkpoint in local `directory`, its state.pt hashed once against its commit
    record (`commit` when already read); `IncompleteCheckpoint` naming what is wrong."""
    path = Path(directory)
    commit = commit or read_commit(path)
    if commit is None:
        raise IncompleteCheckpoint(f"{path} is not a complete checkpoint directory ({STATE_FILE} + {COMMIT_FILE})")
    try:
        _, digest = data_io.sha256_of(str(path / STATE_FILE))
    except OSError:
        raise IncompleteCheckpoint(f"{path}: {COMMIT_FILE} without a readable {STATE_FILE}; the write "
                                   "was probably interrupted") from None
    if digest != commit["sha256"]:
        raise IncompleteCheckpoint(f"{origin or path}: {STATE_FILE} does not match the SHA-256 of its "
                                   f"{COMMIT_FILE} (interrupted while being written, or changed since)")
    return Checkpoint(path=path, commit=commit, origin=str(origin or path))
