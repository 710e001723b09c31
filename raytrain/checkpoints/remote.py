"""Checkpoints in object storage (`s3://`, `gs://`): copied into a local cache before
anything is loaded, the copy hashed once against the commit record.

    $RAYTRAIN_HOME/checkpoints/<hash>-<name>/   the copies (state.pt + COMMIT.json), reused
                                                while the stored SHA-256 is unchanged
"""
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from ..body.model import raytrain_home
from ..data.io import get_fs, storage_error_hint
from .format import (
    COMMIT_FILE,
    MAX_STATE_BYTES,
    STATE_FILE,
    Checkpoint,
    CheckpointError,
    IncompleteCheckpoint,
    read_commit,
    verify_local,
)

log = logging.getLogger(__name__)


def cache_dir(url: str) -> Path:
    """Where the copy of checkpoint `url` lives: a hash of the URL and its last name."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", posixpath.basename(url.rstrip("/")))[:60]
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    return raytrain_home() / "checkpoints" / f"{digest}-{name}"


def fetch_checkpoint(url: str) -> Checkpoint:
    """Checkpoint directory `url`, copied into the local cache (unless the copy there has
    the same SHA-256 in its record) and hashed once there. A state.pt that does not match
    its commit record, or larger than MAX_STATE_BYTES, is refused with CheckpointError. The
    copy is made in a staging directory and renamed into place, so processes copying the
    same checkpoint at once (prediction actors on one node) each see a whole copy."""
    commit = read_commit(url)
    if commit is None:
        raise IncompleteCheckpoint(f"{url} is not a complete checkpoint directory ({STATE_FILE} + {COMMIT_FILE})")
    local = cache_dir(url)
    cached = read_commit(local)
    if cached is not None and cached["sha256"] == commit["sha256"]:
        try:
            return verify_local(local, origin=url, commit=cached)
        except IncompleteCheckpoint:
            log.info("[raytrain] the cached copy %s is damaged: copying %s again", local, url)
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
        verify_local(staging, origin=url, commit=commit)    # the one hash of this copy
        shutil.rmtree(local, ignore_errors=True)
        try:
            os.rename(staging, local)
        except OSError:                          # another process renamed its copy first
            if read_commit(local) != commit:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return Checkpoint(path=local, commit=commit, origin=url)


def stored_commits(root: str) -> list[tuple[str, str, dict]]:
    """(directory URL or path, its path relative to `root`, commit record) of every
    checkpoint below `root` (local path or URL) with a valid commit record, in path order;
    nothing but the records is read."""
    fs, base = get_fs(root)
    base = base.rstrip("/")
    scheme = root.split("://", 1)[0] + "://" if "://" in root else ""
    found = []
    for path in sorted(fs.find(base)):
        if posixpath.basename(path) != COMMIT_FILE:
            continue
        directory = posixpath.dirname(path)
        commit = read_commit(f"{scheme}{directory}")
        if commit is not None:
            found.append((f"{scheme}{directory}", posixpath.relpath(directory, base), commit))
    return found


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
