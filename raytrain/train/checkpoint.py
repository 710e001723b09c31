"""Checkpoints that are either whole or ignored.

A checkpoint directory holds `state.pt` (model, optimiser, scheduler, step, data position,
RNG states) and `COMMIT.json`, written last, with the step, the SHA-256 of `state.pt` and
the step's finite metrics (so checkpoints in object storage are ranked without copying
them). `is_complete` checks both files, so a write killed half-way is never loaded.
Files are first written under a temporary name and renamed into place.
"""
import hashlib
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "state.pt"
COMMIT_FILE = "COMMIT.json"
MAX_COMMIT_BYTES = 1 << 16


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(directory: str, state: dict[str, Any]) -> Path:
    """Write `state` (torch-serialisable, no pickled objects) atomically into `directory`."""
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (STATE_FILE + ".tmp")
    torch.save(state, tmp)
    digest = _sha256(tmp)
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


def read_local_commit(directory: str | Path) -> dict[str, Any] | None:
    """The commit record of a local checkpoint directory (`parse_commit`), None without one."""
    try:
        with open(Path(directory) / COMMIT_FILE, "rb") as handle:
            return parse_commit(handle.read(MAX_COMMIT_BYTES + 1))
    except OSError:
        return None


def is_complete(directory: str) -> bool:
    """True when COMMIT.json exists and matches state.pt."""
    path = Path(directory)
    commit = read_local_commit(path)
    try:
        return commit is not None and commit["sha256"] == _sha256(path / STATE_FILE)
    except OSError:
        return False


def load_checkpoint(directory: str, map_location="cpu") -> dict[str, Any]:
    """Load a complete checkpoint; refuse an incomplete or tampered one."""
    if not is_complete(directory):
        raise CheckpointError(f"checkpoint {directory} is incomplete (no valid {COMMIT_FILE}); "
                              "it was probably interrupted while being written")
    return torch.load(Path(directory) / STATE_FILE, map_location=map_location, weights_only=True)


def checkpoint_step(directory: str) -> int:
    return int(json.loads((Path(directory) / COMMIT_FILE).read_text())["step"])


def list_complete_checkpoints(run_dir: str) -> list[Path]:
    """Complete checkpoint directories below a run directory, oldest step first."""
    found = [p.parent for p in Path(run_dir).rglob(COMMIT_FILE) if is_complete(p.parent)]
    return sorted(found, key=checkpoint_step)


def latest_complete_checkpoint(run_dir: str) -> Path | None:
    """The complete checkpoint of the highest step below a run directory (the last found of
    equal steps). Candidates are ranked by their commit records and hashed newest first, so
    normally one state.pt is read, not every kept one."""
    records = [(p.parent, read_local_commit(p.parent)) for p in Path(run_dir).rglob(COMMIT_FILE)]
    ranked = sorted(((directory, commit["step"]) for directory, commit in records if commit is not None),
                    key=lambda record: record[1])
    return next((directory for directory, _ in reversed(ranked) if is_complete(directory)), None)


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain lists (weights_only-safe)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": _python_state_to_list(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]):
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _python_state_to_list(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
