"""What a run directory holds, and who is using it: a fingerprint and a lock.

    claim = claim_run(cfg, run_dir)   # before Ray starts; raises or returns a held claim
    ...train...
    claim.release()                   # also released by the OS when the process dies

``<train.storage_path>/<name>/run_identity.json`` records a fingerprint of what defines
the run: the model config (``model.*`` but the body-model folder), the RoI schedule
(``rois.*``) and the data sources (``data.train_shards`` or each ``data.mixture`` entry,
``data.val_shards``) by their manifests' sha256. The step budget, logging, checkpoint
cadence and Ray resources are not part of it: raising ``optim.max_steps`` continues a run.

The states a run directory can be in when ``raytrain train`` starts:

- **new** (no fingerprint, or a local folder without a complete checkpoint): the
  fingerprint is written and the run starts from scratch.
- **same** fingerprint: the run resumes from its latest checkpoint.
- **changed** fingerprint: refused (``RunDirectoryError``, exit 2) with one line naming
  what differs; a new ``name`` starts another run, ``train.accept_changed_run=true``
  resumes anyway and records the new fingerprint (not for a key that decides the network,
  ``checkpoints.MODEL_KEYS``: the run's checkpoints cannot load into another one).
- **live**: another process holds the run's lock (``run.lock`` beside the fingerprint;
  for a run directory in object storage, ``$RAYTRAIN_HOME/locks/``, which guards one
  machine only): refused with its pid and host. The lock is an ``fcntl`` lock, which the
  OS drops when its process ends in any way, so a killed run never blocks the next one.
- **finished**: a local run whose latest complete checkpoint is at its last step
  (``optim.max_steps`` / ``optim.epochs``): ``RunFinished``; ``raytrain train`` says so
  and exits 0 without training.

Tune trials are Ray Train runs of their own (``<experiment>/train_runs/<trial_id>``)
started by the tuning driver, not through this module: many trials of one experiment
never block each other.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import IO

from ..checkpoints import MODEL_KEYS
from ..config import ConfigError, ExperimentConfig, to_dict
from ..data.io import exists, is_remote, isdir, join_url, open_url

log = logging.getLogger(__name__)

IDENTITY_FILE = "run_identity.json"
LOCK_FILE = "run.lock"
#: Model keys that say where a file is, not what the network is.
_NOT_IDENTITY = ("model.smpl_dir",)


class RunDirectoryError(ConfigError):
    """The run directory belongs to another run, or a live process uses it."""


class RunFinished(Exception):
    """The run directory's run is already at its last step; ``str()`` says so."""

    def __init__(self, message: str, checkpoint: str):
        super().__init__(message)
        self.checkpoint = checkpoint


# ----------------------------------------------------------------------------- fingerprint

def run_fingerprint(cfg: ExperimentConfig) -> dict[str, str]:
    """``{dotted key: value}`` of everything that defines the run (see the module doc)."""
    flat = _flatten({"model": to_dict(cfg.model), "rois": to_dict(cfg.rois)})
    for key in _NOT_IDENTITY:
        flat.pop(key, None)
    for key, source in data_sources(cfg):
        flat[key] = source_digest(source)
    return flat


def data_sources(cfg: ExperimentConfig) -> list[tuple[str, str]]:
    """(config key, shard source) of every data source of the run."""
    if cfg.data.mixture:
        sources = [(f"data.mixture.{m.name} (weight {m.weight:g})", m.shards) for m in cfg.data.mixture]
    else:
        sources = [("data.train_shards", cfg.data.train_shards)]
    return [*sources, ("data.val_shards", cfg.data.val_shards)]


def source_digest(source) -> str:
    """``manifest <sha256 prefix>`` of a shard folder or manifest, else of its shard list
    (``unset`` / ``unreadable``: the pre-flight names those)."""
    from ..data.shards import MAX_MANIFEST_BYTES, manifest_url, resolve_shards
    if not source:
        return "unset"
    try:
        if isinstance(source, str) and "{" not in source and (source.endswith(".json") or isdir(source)):
            url = manifest_url(source)
            if exists(url):
                with open_url(url, "rb") as handle:
                    return f"manifest {hashlib.sha256(handle.read(MAX_MANIFEST_BYTES + 1)).hexdigest()[:16]}"
        listing = [(ref.name, ref.num_samples) for ref in resolve_shards(source)]
    except (OSError, ValueError) as error:
        return f"unreadable ({type(error).__name__})"
    return f"shards {hashlib.sha256(json.dumps(listing).encode()).hexdigest()[:16]}"


def _flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = json.dumps(value, sort_keys=True)
    return flat


def differences(recorded: dict[str, str], current: dict[str, str]) -> list[str]:
    """``key: old -> new`` for every key whose value differs (missing: ``-``)."""
    keys = sorted(set(recorded) | set(current))
    return [f"{key}: {recorded.get(key, '-')} -> {current.get(key, '-')}"
            for key in keys if recorded.get(key) != current.get(key)]


def read_identity(run_dir: str) -> dict | None:
    url = join_url(run_dir, IDENTITY_FILE)
    if not exists(url):
        return None
    try:
        with open_url(url, "rb") as handle:
            record = json.loads(handle.read(1 << 20).decode("utf-8"))
        return record if isinstance(record, dict) and isinstance(record.get("fingerprint"), dict) else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}


def write_identity(run_dir: str, fingerprint: dict[str, str]) -> None:
    from ..data.shards import write_json
    write_json(join_url(run_dir, IDENTITY_FILE), {"fingerprint": fingerprint, "written": time.time()})


# ----------------------------------------------------------------------------- the lock

class RunLock:
    """An ``fcntl`` lock on a file naming its holder (pid, host); dropped by the OS when
    the holding process ends, however it ends."""

    def __init__(self, path: Path):
        self.path = path
        self.handle: IO[str] | None = None

    def acquire(self) -> str | None:
        """None once held; else the holder's line."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115 - held open for the run's life
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read(300).strip() or "another process"
            handle.close()
            return holder
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on host {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        handle.flush()
        self.handle = handle
        return None

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


def lock_path(run_dir: str) -> Path:
    if not is_remote(run_dir):
        return Path(run_dir.removeprefix("file://")) / LOCK_FILE
    from ..body.model import raytrain_home
    return raytrain_home() / "locks" / f"{hashlib.sha256(run_dir.encode()).hexdigest()[:24]}.lock"


_HELD: dict[str, RunLock] = {}  # this process's claims, by run directory


# ----------------------------------------------------------------------------- the claim

def claim_run(cfg: ExperimentConfig, run_dir: str) -> RunLock:
    """Lock ``run_dir`` for this run and check its fingerprint (module doc); the held
    lock, or ``RunDirectoryError`` / ``RunFinished`` (nothing held then)."""
    previous = _HELD.pop(run_dir, None)
    if previous is not None:  # this process ran it before (sequential runs in one process)
        previous.release()
    lock = RunLock(lock_path(run_dir))
    holder = lock.acquire()
    if holder is not None:
        raise RunDirectoryError(f"name={cfg.name}: the run directory {run_dir} is in use by a live run "
                                f"({holder}); wait for it to end or choose another name (name=...)")
    try:
        _check_identity(cfg, run_dir)
    except BaseException:
        lock.release()
        raise
    _HELD[run_dir] = lock
    return lock


def _check_identity(cfg: ExperimentConfig, run_dir: str) -> None:
    current = run_fingerprint(cfg)
    record = read_identity(run_dir)
    checkpoint = _latest_checkpoint(run_dir)
    if record is None or (checkpoint is None and not is_remote(run_dir)):
        write_identity(run_dir, current)  # new: nothing of another run to adopt
        return
    changed = differences(record["fingerprint"], current) if record else [f"{IDENTITY_FILE} unreadable"]
    if changed:
        model_changed = any(line.split(":", 1)[0] in MODEL_KEYS for line in changed)
        shown = "; ".join(changed[:4]) + (f"; ... ({len(changed)} in all)" if len(changed) > 4 else "")
        if model_changed or not cfg.train.accept_changed_run:
            how = ("its checkpoints cannot load into another model: choose a new name (name=...)"
                   if model_changed else "choose a new name (name=...), or resume it with the difference "
                   "accepted (train.accept_changed_run=true)")
            raise RunDirectoryError(f"name={cfg.name}: the run directory {run_dir} holds another run "
                                    f"({shown}); {how}")
        log.warning("[raytrain] %s: resuming a run of other inputs (%s), as train.accept_changed_run=true "
                    "asks", run_dir, shown)
        write_identity(run_dir, current)
    if checkpoint is not None:
        step, last = checkpoint
        final = last_step(cfg)
        if step >= final:
            raise RunFinished(f"name={cfg.name}: the run in {run_dir} is already at its last step ({step} of "
                              f"{final}): nothing to train (raise optim.max_steps or optim.epochs to train "
                              "on, or choose a new name)", str(last))


def _latest_checkpoint(run_dir: str) -> tuple[int, Path] | None:
    """(step, folder) of the latest complete checkpoint of a local run directory."""
    if is_remote(run_dir) or not Path(run_dir).is_dir():
        return None
    from ..checkpoints import latest_checkpoint
    found = latest_checkpoint(run_dir)
    return None if found is None else (found.step, found.path)


def last_step(cfg: ExperimentConfig) -> int:
    """The step the training loop stops at (``loop.run_loop``'s total)."""
    from .loop import run_steps
    return run_steps(cfg, cfg.ray.num_workers)
