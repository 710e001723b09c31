"""Small fsspec helpers: one code path for local paths and ``s3://`` / ``gs://`` URLs.

``storage_options`` are passed through to the fsspec filesystem (for example
``{"key": ..., "secret": ..., "client_kwargs": {"endpoint_url": ...}}`` for s3fs).
Filesystems are resolved on demand, never stored in picklable objects, so readers
can be shipped to DataLoader or Ray worker processes.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import IO, Any

import fsspec


def get_fs(url: str, storage_options: dict | None = None):
    """Return ``(filesystem, path)`` for a local path or URL."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def is_remote(url: str) -> bool:
    """True for a URL with a protocol other than ``file``."""
    return "://" in url and not url.startswith("file://")


def join_url(base: str, *names: str) -> str:
    """Join path components onto a local path or URL (always with ``/``)."""
    return posixpath.join(base.rstrip("/") if base not in ("", "/") else base, *names)


def dirname_url(url: str) -> str:
    """The parent of a local path or URL, keeping the protocol."""
    return posixpath.dirname(url.rstrip("/"))


def open_url(url: str, mode: str = "rb", storage_options: dict | None = None) -> IO[Any]:
    """Open a local path or URL; the caller closes it (use ``with``)."""
    fs, path = get_fs(url, storage_options)
    if "w" in mode and not is_remote(url):
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def exists(url: str, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.exists(path)


def isdir(url: str, storage_options: dict | None = None) -> bool:
    fs, path = get_fs(url, storage_options)
    return fs.isdir(path)


def list_files(url: str, suffix: str, storage_options: dict | None = None) -> list[str]:
    """Sorted URLs of the files directly in directory ``url`` ending with ``suffix``."""
    fs, path = get_fs(url, storage_options)
    names = sorted(posixpath.basename(p.rstrip("/")) for p in fs.ls(path, detail=False))
    return [join_url(url, name) for name in names if name.endswith(suffix)]


def file_sizes(url: str, suffix: str, storage_options: dict | None = None) -> dict[str, int]:
    """{name: size in bytes} of the files directly in directory ``url`` ending with
    ``suffix``, from one listing (one request on object storage)."""
    fs, path = get_fs(url, storage_options)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return {}
    sizes = {}
    for entry in entries:
        name = posixpath.basename(str(entry["name"]).rstrip("/"))
        if name.endswith(suffix) and entry.get("type") != "directory":
            sizes[name] = int(entry.get("size") or 0)
    return sizes


#: fsspec protocol -> the raytrain extra that installs its backend.
STORAGE_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}
CREDENTIAL_HINTS = {
    "s3": "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE, or use an instance role",
    "gs": "run `gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS",
}


def storage_error_hint(url: str, error: BaseException) -> str | None:
    """What to install or configure for a storage error the user can fix (a missing
    fsspec backend, missing credentials), or None for any other error."""
    scheme = url.split("://", 1)[0] if "://" in url else "file"
    if isinstance(error, ImportError):
        extra = STORAGE_EXTRAS.get(scheme)
        install = f"pip install 'raytrain[{extra}]'" if extra else "install its fsspec backend"
        return f"{scheme}:// needs a package that is not installed ({error}): {install}"
    names = {cls.__name__ for cls in type(error).__mro__}
    if names & {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}:
        hint = CREDENTIAL_HINTS.get("gs" if scheme == "gcs" else scheme, "configure its credentials")
        return f"no credentials for {scheme}:// ({error}): {hint}, or pass them in storage options"
    return None


class HashingWriter:
    """A write-only file wrapper that counts bytes and computes sha256 on the fly.

    ``close()`` closes the wrapped file (so an object-store upload is committed);
    ``bytes_written`` and ``hexdigest()`` stay available afterwards.
    """

    def __init__(self, fileobj: IO[bytes]):
        self._file = fileobj
        self._hash = hashlib.sha256()
        self.bytes_written = 0
        self.closed = False

    def write(self, data) -> int:
        view = memoryview(data)
        self._hash.update(view)
        self.bytes_written += view.nbytes
        self._file.write(view)
        return view.nbytes

    def flush(self) -> None:
        self._file.flush()

    def tell(self) -> int:
        return self.bytes_written

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            self.closed = True


def sha256_of(url: str, storage_options: dict | None = None, block: int = 1 << 20) -> tuple[int, str]:
    """``(size in bytes, sha256 hex)`` of a file, streamed."""
    digest = hashlib.sha256()
    size = 0
    with open_url(url, "rb", storage_options) as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def upload_dir(local, url: str) -> None:
    """Copy every file below local directory ``local`` to the same relative names below ``url``."""
    from pathlib import Path
    fs, root = get_fs(url)
    local = Path(local)
    for file in sorted(p for p in local.rglob("*") if p.is_file()):
        fs.put_file(str(file), posixpath.join(root.rstrip("/"), file.relative_to(local).as_posix()))
