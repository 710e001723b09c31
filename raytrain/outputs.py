"""The output rule of every command that writes results into a folder (`raytrain predict`,
`raytrain eval`'s report):

    out = claim_output(args.out, overwrite=args.overwrite)   # before any model loads
    with out.atomic("predictions.jsonl") as tmp: ...          # written to a temporary name, renamed
    out.write_text("summary.json", text)
    out.release()

- ``--out`` is checked first, in one line (``ConfigError``, exit 2): a link, a file, a
  path inside a file, or a folder that cannot be written.
- A second writer is refused while the first holds the folder (an exclusive lock on it).
- A folder that is not empty is refused unless ``overwrite``; with it, what the previous
  run wrote is removed (every entry, sub-folders included) before anything new is written.
  Only a folder a run claimed (it holds the ``MARKER`` file) or one holding nothing but the
  names the command writes (``ours``) is ever cleared: ``--out`` set to a folder of photos
  by mistake is refused, not emptied.
- Every file is written to a temporary name beside it and renamed into place; the final
  name and every folder on its way are checked to be real folders under ``out`` (links are
  never followed) and the relative name to be clean (``clean_relative``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError


def clean_relative(name: str) -> str | None:
    """``name`` as a clean relative path (``./`` parts dropped), or None when it is empty,
    absolute or holds ``..``, an empty part or a NUL."""
    if not name or "\x00" in name or name.startswith("/"):
        return None
    parts = [part for part in name.split("/") if part != "."]
    if not parts or any(part in ("", "..") for part in parts):
        return None
    return "/".join(parts)


def check_output(path: str | os.PathLike, flag: str = "--out") -> Path:
    """``ConfigError`` (one line) when ``path`` cannot be an output folder: a link, a file,
    a path inside a file, or not writable. Nothing is created."""
    out = Path(path)
    if out.is_symlink():
        raise ConfigError(f"{flag} {out}: is a link (an output folder is never a link)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out}: is a file, not a folder")
    existing = out
    while not existing.exists() and not existing.is_symlink():
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise ConfigError(f"{flag} {out}: is inside {existing}, which is a file")
    if existing == out:   # an existing folder is left as it is (its claim writes the marker)
        if not os.access(out, os.W_OK | os.X_OK):
            raise ConfigError(f"{flag} {out}: is not writable")
        return out
    try:   # a real probe: access() says yes to root on a read-only or virtual file system
        os.rmdir(tempfile.mkdtemp(prefix=".raytrain-probe-", dir=existing))
    except OSError as error:
        raise ConfigError(f"{flag} {out}: {existing} is not writable ({error.strerror or error})") from None
    return out


#: The file that marks a folder as a run's output (so --overwrite may clear it).
MARKER = ".raytrain-output"


def claim_output(path: str | os.PathLike, overwrite: bool = False, flag: str = "--out",
                 ours: tuple[str, ...] = ()) -> Output:
    """The checked, locked, empty output folder (see the module docstring)."""
    out = check_output(path, flag)
    created = [folder for folder in (out, *out.parents) if not folder.exists()]   # innermost first
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as error:
        raise ConfigError(f"{flag} {out}: cannot be created ({error.strerror or error})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if not os.path.samestat(os.fstat(fd), os.stat(out)):   # removed by a run that let go
            raise BlockingIOError
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise ConfigError(f"{flag} {out}: another run is writing there now") from None
    entries = sorted(os.listdir(out))
    shown = next((name for name in entries if name != MARKER), MARKER)
    problem = None
    if entries and not overwrite:
        problem = (f"not empty ({len(entries)} entries, e.g. {shown}); pass --overwrite to replace "
                   "what a previous run wrote")
    elif entries and MARKER not in entries and not set(entries) <= set(ours):
        problem = (f"holds {len(entries)} entries (e.g. {shown}) that no run wrote there; "
                   "--overwrite clears only a folder a run wrote: choose another --out")
    if problem:
        os.close(fd)
        raise ConfigError(f"{flag} {out}: {problem}")
    for name in entries:
        _remove(out / name)
    claimed = Output(out, fd, created)
    try:
        claimed.write_text(MARKER, "a raytrain command writes its results here; --overwrite may clear this folder\n")
    except OSError as error:
        claimed.release()
        raise ConfigError(f"{flag} {out}: is not writable ({error.strerror or error})") from None
    return claimed


def _remove(path: Path) -> None:
    """Remove a file, link or folder without following links."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


class Output:
    """A claimed output folder: files are written under it, never outside."""

    def __init__(self, root: Path, fd: int | None, created: list[Path] | None = None):
        self.root, self._fd, self.created = Path(root), fd, created or []

    def path(self, name: str) -> Path:
        """The final path of the relative ``name``; its folders are created as real folders
        under the root (``ValueError`` for an unclean name or a link on the way)."""
        clean = clean_relative(name)
        if clean is None:
            raise ValueError(f"{name!r} is not a clean relative path")
        folder = self.root
        for part in clean.split("/")[:-1]:
            folder = folder / part
            try:
                os.mkdir(folder)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(folder).st_mode):
                    raise ValueError(f"{folder} is not a folder (links are never followed)") from None
        target = folder / posixpath.basename(clean)
        if target.is_symlink():
            target.unlink()   # replaced by the rename, never written through
        return target

    def staged(self, name: str) -> Staged:
        """A temporary file beside ``name``, renamed to it by ``commit()``."""
        return Staged(self.path(name))

    @contextlib.contextmanager
    def atomic(self, name: str) -> Iterator[Path]:
        """A temporary path beside ``name`` (same suffix, for encoders that choose by it);
        renamed to ``name`` when the block ends without an error, removed otherwise."""
        staged = self.staged(name)
        try:
            yield staged.tmp
            staged.commit()
        finally:
            staged.discard()

    def write_text(self, name: str, text: str) -> Path:
        with self.atomic(name) as tmp:
            with open(tmp, "x") as handle:
                handle.write(text)
        return self.path(name)

    def release(self) -> None:
        """Unlock the folder (another run may write there again, with --overwrite). A run
        that wrote nothing leaves the folder as it found it."""
        if self._fd is None:
            return
        try:
            if os.listdir(self.root) == [MARKER]:
                (self.root / MARKER).unlink()
                for folder in self.created:          # the folders the claim made, if still empty
                    if any(folder.iterdir()):
                        break
                    folder.rmdir()
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Staged:
    """``tmp`` (``.<stem>.tmp-<pid><suffix>`` beside ``target``) is written, then renamed."""

    def __init__(self, target: Path):
        self.target = target
        self.tmp = target.with_name(f".{target.stem}.tmp-{os.getpid()}{target.suffix}")
        self.discard()   # a stale one (or a link put there) is never written through

    def commit(self) -> Path:
        os.replace(self.tmp, self.target)
        return self.target

    def discard(self) -> None:
        if self.tmp.exists() or self.tmp.is_symlink():
            self.tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """One file written to a temporary name beside it and renamed (a link at ``path`` is
    replaced, never followed): for writers that hold their folder by other means."""
    target = Path(path)
    return Output(target.parent, None).write_text(target.name, text)
