"""Reading files that come from outside, with bounds: every reader of a small file or a
torch file goes through here, so the limits and the one-line errors are written once.

    payload = read_bounded(url, MAX_BYTES, f"config file {path}", error=ConfigError)
    state = load_torch_file(path, f"checkpoint {path}", error=CheckpointError)

``read_bounded`` reads at most ``limit + 1`` bytes of a regular file (local path or fsspec
URL) and refuses a longer one. ``load_torch_file`` is ``torch.load(weights_only=True)``
behind two checks: the zip members' declared sizes (what the file inflates to) may not add
up to more than the file itself (``torch.save`` stores them uncompressed; a DEFLATE-packed
file of 20 MB could otherwise inflate to gigabytes), and a file holding anything but
tensors and plain data ends in one line that names the file, never in torch's advice to
load it unsafely.
"""
from __future__ import annotations

import os
import pickle
import re
import stat
import zipfile
from typing import Any

import fsspec


def read_bounded(url: str, limit: int, what: str, error: type[Exception] = ValueError,
                 storage_options: dict | None = None) -> bytes:
    """The bytes of the small file ``url`` (a local path or URL), at most ``limit`` of them;
    ``error("<what>: larger than <limit> bytes")`` for a longer file and
    ``error("<what>: not a regular file")`` for a local FIFO, device or directory (which
    would hang or never end). ``OSError`` (missing, unreadable) propagates."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if "://" not in url or url.startswith("file://"):
        try:
            mode = os.stat(path).st_mode
        except FileNotFoundError:
            raise FileNotFoundError(f"{what}: file not found") from None
        if not stat.S_ISREG(mode):
            raise error(f"{what}: not a regular file")
    with fs.open(path, "rb") as handle:
        payload = handle.read(limit + 1)
    if len(payload) > limit:
        raise error(f"{what}: larger than {limit} bytes")
    return payload


def inflated_size(path: str) -> int | None:
    """The sum of the declared uncompressed sizes of a zip file's members (what
    ``torch.load`` would allocate for them), or None for a file that is not a zip archive
    (torch's legacy format, read as it is stored)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return sum(info.file_size for info in archive.infolist())
    except zipfile.BadZipFile:
        return None


def load_torch_file(path: str, what: str, error: type[Exception] = ValueError, *,
                    max_bytes: int = 16 << 30, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU, for a file from outside.

    Refused with one-line ``error`` naming ``what``: a file larger than ``max_bytes``, one
    whose zip members declare more bytes than the file holds (compressed members: what
    ``torch.save`` never writes), and one that does not load as tensors and plain data (a
    pickled object, a truncated or foreign file). ``mmap``: tensors stay in the file until
    touched (zip format only; a legacy file is read whole)."""
    import torch
    try:
        size = os.stat(path).st_size
    except OSError as err:
        raise error(f"{what}: cannot read ({err.strerror or err})") from None
    if size > max_bytes:
        raise error(f"{what}: {size} bytes, more than the {max_bytes} allowed")
    inflated = inflated_size(path)
    if inflated is not None and inflated > size:
        raise error(f"{what}: its members inflate to {inflated} bytes from a file of {size} (compressed "
                    "members; torch.save writes them stored): refused")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and inflated is not None)
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise error(f"{what}: holds a pickled object" + (f" ({named.group(1)})" if named else "")
                    + ", not only tensors and plain data; refused") from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError,
            AttributeError, TypeError, ImportError, MemoryError) as err:
        first = (str(err).splitlines() or [""])[0][:200]
        raise error(f"{what}: not a readable torch file ({type(err).__name__}: {_without_advice(first)})") from None


def _without_advice(text: str) -> str:
    """A torch message line without its advice to load unsafely."""
    return "" if "weights_only" in text else text.rstrip(".")
