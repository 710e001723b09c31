"""Checkpoints in object storage (`s3://`, `gs://`): found and ranked from their small commit
records, copied into a local cache before anything is loaded; reports uploaded beside them.

    <experiment URL>/**/checkpoint_*/COMMIT.json   listed and read (64 KB at most each)
    $RAYTRAIN_HOME/checkpoints/<hash>-<name>/      the copies (state.pt + COMMIT.json), reused
                                                   while the stored SHA-256 is unchanged
"""
import hashlib
import json
import logging
import math
import os
import posixpath
import re
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ..body.model import raytrain_home
from ..data.io import get_fs, storage_error_hint
from ..train.checkpoint import (
    COMMIT_FILE,
    MAX_COMMIT_BYTES,
    STATE_FILE,
    CheckpointError,
    is_complete,
    parse_commit,
    read_local_commit,
)

log = logging.getLogger(__name__)

MAX_STATE_BYTES = 16 << 30       # a checkpoint file larger than this is refused before copying


@dataclass(frozen=True)
class StoredCheckpoint:
    """A complete checkpoint directory (local path or URL), its step and stored val_mpjpe."""
    where: str
    step: int
    val_mpjpe: float             # inf when none was stored


def stored_val_mpjpe(metrics) -> float:
    """The val_mpjpe of a checkpoint's stored metrics (state or commit record), inf when there
    is no finite number."""
    value = metrics.get("val_mpjpe") if isinstance(metrics, dict) else None
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.inf


def read_commit(url: str) -> dict | None:
    """The commit record of checkpoint directory `url`, or None when it has none we wrote."""
    fs, path = get_fs(posixpath.join(url, COMMIT_FILE))
    try:
        with fs.open(path, "rb") as handle:
            return parse_commit(handle.read(MAX_COMMIT_BYTES + 1))
    except OSError:
        return None


def remote_checkpoints(experiment: str, skip: set[str] = frozenset()) -> list[StoredCheckpoint]:
    """Every checkpoint with a valid commit record below `experiment`, oldest step first;
    directories named in `skip` (and everything below them) are left out."""
    fs, root = get_fs(experiment)
    root = root.rstrip("/")
    scheme = experiment.split("://", 1)[0]
    found = []
    for path in sorted(fs.find(root)):
        if posixpath.basename(path) != COMMIT_FILE:
            continue
        directory = posixpath.dirname(path)
        if skip & set(posixpath.relpath(directory, root).split("/")):
            continue
        url = f"{scheme}://{directory}"
        commit = read_commit(url)
        if commit is not None:
            found.append(StoredCheckpoint(url, commit["step"], stored_val_mpjpe(commit.get("metrics"))))
    return sorted(found, key=lambda c: (c.step, c.where))


def cache_dir(url: str) -> Path:
    """Where the copy of checkpoint `url` lives: a hash of the URL and its last name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", posixpath.basename(url.rstrip("/")))[:60]
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return raytrain_home() / "checkpoints" / f"{digest}-{name}"


def fetch_checkpoint(url: str) -> Path:
    """Copy checkpoint directory `url` into the local cache (unless the copy there has the
    same SHA-256) and return the local directory; a state.pt that does not match its commit
    record, or is larger than MAX_STATE_BYTES, is refused with CheckpointError. The copy is
    made in a staging directory and renamed into place, so processes copying the same
    checkpoint at once (prediction actors on one node) each see a whole copy."""
    commit = read_commit(url)
    if commit is None:
        raise CheckpointError(f"{url} is not a complete checkpoint directory ({STATE_FILE} + {COMMIT_FILE})")
    local = cache_dir(url)
    if _holds(local, commit):
        return local
    fs, path = get_fs(posixpath.join(url, STATE_FILE))
    size = fs.size(path)
    if not isinstance(size, int) or size > MAX_STATE_BYTES:
        raise CheckpointError(f"{url}/{STATE_FILE}: {size} bytes, more than the {MAX_STATE_BYTES} "
                              "a checkpoint may hold")
    local.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{local.name}.", dir=local.parent))
    try:
        log.info("[raytrain] copying %s (%.1f MB) to %s", url, size / 1e6, local)
        fs.get_file(path, str(staging / STATE_FILE))
        (staging / COMMIT_FILE).write_text(json.dumps(commit))
        if not is_complete(staging):
            raise CheckpointError(f"{url}: {STATE_FILE} does not match the SHA-256 of its {COMMIT_FILE} "
                                  "(changed or damaged in storage)")
        shutil.rmtree(local, ignore_errors=True)
        try:
            os.rename(staging, local)
        except OSError:                          # another process renamed its copy first
            if not _holds(local, commit):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return local


def _holds(local: Path, commit: dict) -> bool:
    """True when `local` is a complete copy of the checkpoint `commit` describes."""
    copied = read_local_commit(local)
    return copied is not None and copied["sha256"] == commit["sha256"] and is_complete(local)


@contextmanager
def storage_errors(url: str, action: str = "read"):
    """A failure of the object store (unreachable, no credentials, no permission) as one
    CheckpointError line naming the URL: fsspec backends raise their own exception types."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - the backends' errors share no base class
        reason = storage_error_hint(url, err) or f"{type(err).__name__}: {err}"
        raise CheckpointError(f"cannot {action} {url}: {reason}") from err


def upload_dir(local: Path, url: str) -> None:
    """Copy every file below `local` to the same relative names below `url`."""
    fs, root = get_fs(url)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(file), posixpath.join(root.rstrip("/"), file.relative_to(local).as_posix()))
