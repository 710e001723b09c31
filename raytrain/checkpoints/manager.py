"""What training saves and restores, in one object (torchtitan's `CheckpointManager`).

    checkpoints = CheckpointManager(session, cfg, model=model, optimizer=optimizer,
                                    scheduler=scheduler, scaler=scaler)
    pos = checkpoints.restore()                  # Position() when there is nothing to resume
    ...
    checkpoints.save(pos, metrics, reported)     # rank 0 writes, every rank reports

A checkpoint holds each stateful object's ``state_dict()`` under its name, the data
position (step, epoch, samples consumed in the epoch), the RNG states (Python, NumPy,
torch), the step's metrics and the config as JSON text: tensors and plain data only.
Where it is written and how Ray hears of it is the session's (``train/session.py``).

Temporary local copies (a checkpoint staged before Ray persists it, Ray's checkpoint
restored for loading) live in ``raytrain-<kind>-<pid>-*`` directories of the temp
directory: removed once persisted or loaded, and a copy left by a killed process is
removed by the next session on that machine (`remove_orphaned_copies`).
"""
import json
import logging
import os
import random
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ExperimentConfig, to_dict, with_legacy_defaults
from .format import save_checkpoint

log = logging.getLogger(__name__)

COPY_KINDS = ("ckpt", "restore")


@dataclass
class Position:
    """Where training is: the optimizer steps taken and the data consumed."""
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0   # samples this rank has consumed in `epoch`


class CheckpointManager:
    """Saves and restores the named stateful objects of a training run (anything with
    ``state_dict()`` / ``load_state_dict()``: model, optimizer, scheduler, grad scaler)
    together with the data position and the RNG states. A DDP model is saved unwrapped."""

    def __init__(self, session, cfg: ExperimentConfig, **states):
        self.session, self.cfg = session, cfg
        model = states.get("model")
        if model is not None and hasattr(model, "module"):
            states["model"] = model.module
        self.states = states

    def state_dict(self, pos: Position, metrics: dict[str, float]) -> dict[str, Any]:
        return {**{name: obj.state_dict() for name, obj in self.states.items()}, **asdict(pos),
                "rng": rng_state(), "metrics": {k: float(v) for k, v in metrics.items()},
                "config": json.dumps(to_dict(self.cfg))}   # JSON text: loads under weights_only

    def save(self, pos: Position, metrics: dict[str, float], reported: dict[str, Any]) -> None:
        """Rank 0 writes the checkpoint of step ``pos.step``; every rank reports
        ``reported`` with it (a Ray report is a barrier)."""
        directory = None
        if self.session.rank == 0:
            directory = self.session.checkpoint_dir(pos.step)
            save_checkpoint(directory, self.state_dict(pos, metrics))
        self.session.report(reported, checkpoint_dir=directory)

    def restore(self) -> Position:
        """Load the checkpoint the session resumes from into every object; its position, or
        ``Position()`` when there is none."""
        with self.session.resume() as checkpoint:
            if checkpoint is None:
                return Position()
            state = checkpoint.state()
            self._warn_on_other_camera_start(checkpoint.path, state)
            for name, obj in self.states.items():
                obj.load_state_dict(state[name])
            set_rng_state(state["rng"])
            return Position(step=state["step"], epoch=state["epoch"], samples_in_epoch=state["samples_in_epoch"])

    def _warn_on_other_camera_start(self, path: Path, state: dict) -> None:
        if not state.get("config"):
            return
        stored = with_legacy_defaults(json.loads(state["config"])).get("model", {})
        cam_init = self.cfg.model.cam_init
        if stored.get("cam_init", cam_init) != cam_init:
            log.warning("%s was trained with model.cam_init=%s, resuming with %s: pass "
                        "model.cam_init=%s to keep its camera start", path, stored["cam_init"],
                        cam_init, stored["cam_init"])


# ----------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain lists (weights_only-safe)."""
    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "python": [version, list(internal), gauss],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# ----------------------------------------------------------------------------- local copies


def local_copy_dir(kind: str) -> Path:
    """A fresh temporary directory for a local copy of a checkpoint (``kind``: "ckpt" staged
    for Ray to persist, "restore" to load), named after this process so that one a killed
    process leaves behind is found (`remove_orphaned_copies`). The caller removes it."""
    assert kind in COPY_KINDS, kind
    return Path(tempfile.mkdtemp(prefix=f"raytrain-{kind}-{os.getpid()}-"))


def remove_orphaned_copies() -> list[Path]:
    """Remove the local checkpoint copies of processes that no longer run (a worker killed
    mid-save or mid-restore); the removed directories."""
    removed = []
    pattern = re.compile(rf"raytrain-({'|'.join(COPY_KINDS)})-(\d+)-")
    for path in Path(tempfile.gettempdir()).glob("raytrain-*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and not _alive(int(match.group(2))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True        # another user's process
    return True
