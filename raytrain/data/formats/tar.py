"""Tar stream parsing that survives damage: samples from the 512-byte blocks.

Python's tarfile stops silently (or raises) at the first damaged header, losing the
rest of a shard. ``tar_events`` walks the blocks itself (headers parsed by
``tarfile.TarInfo.frombuf``), reports a damaged header or truncated member as a
"corrupt" event and resynchronises on the next valid header; ``tar_samples`` groups
members sharing a key into raw samples ("dir/key.ext" -> key "dir/key", as webdataset).
"""

from __future__ import annotations

import logging
import posixpath
import tarfile
from collections.abc import Iterator
from typing import IO

log = logging.getLogger(__name__)

BLOCK = 512

#: Extra entries a raw sample dict may carry besides ``__key__`` and its members.
CORRUPT_FLAG = "__corrupt__"  # a damaged member was next to this sample


def _read_exact(handle: IO[bytes], size: int) -> bytes:
    """Read ``size`` bytes unless the stream ends first."""
    parts, left = [], size
    while left > 0:
        chunk = handle.read(left)
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _padded(size: int) -> int:
    return -(-size // BLOCK) * BLOCK


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any."""
    position = 0
    while position < len(data):
        space = data.find(b" ", position)
        if space < 0:
            return None
        try:
            length = int(data[position:space])
        except ValueError:
            return None
        if length <= 0:
            return None
        record = data[space + 1 : position + length - 1]
        name, _, value = record.partition(b"=")
        if name == b"path":
            return value.decode("utf-8", "surrogateescape")
        position += length
    return None


_REGULAR = (b"0", b"\0")
_USTAR = (b"ustar\x0000", b"ustar  \x00")


def _fast_header(header: bytes) -> tuple[str, int] | None:
    """(name, size) of a plain regular-file header, else None (-> ``TarInfo.frombuf``).

    Plain: ustar/GNU magic, type '0', octal size, no prefix, a name not ending in '/',
    and an unsigned checksum that matches; anything else (links, pax/GNU long names,
    base-256 numbers, a bad checksum) takes tarfile's own parser, with its errors."""
    if header[156:157] not in _REGULAR or header[257:265] not in _USTAR or header[345] != 0:
        return None
    try:
        stored = int(header[148:156].split(b"\0", 1)[0].strip() or b"0", 8)
        size = int(header[124:136].split(b"\0", 1)[0].strip() or b"0", 8)
    except ValueError:
        return None
    if stored != sum(header) - sum(header[148:156]) + 256:
        return None
    raw_name = header[:100].split(b"\0", 1)[0]
    if raw_name.endswith(b"/"):
        return None
    return raw_name.decode("utf-8", "surrogateescape"), size


def tar_events(handle: IO[bytes]) -> Iterator[tuple[str, str, bytes]]:
    """Yield ``("member", name, data)`` for regular files and ``("corrupt", detail, b"")``.

    One ``corrupt`` event is emitted per run of damaged blocks; a truncated member ends
    the stream after its event. Directories, links and global headers are skipped.
    """
    long_name: str | None = None
    resyncing = False
    read = handle.read
    while True:
        header = read(BLOCK)
        if len(header) < BLOCK and header:
            header += _read_exact(handle, BLOCK - len(header))
        if not header:
            return
        if len(header) < BLOCK:
            yield ("corrupt", "truncated header at end of file", b"")
            return
        fast = _fast_header(header) if long_name is None else None
        if fast is not None:  # the common case: a plain member, read with its padding
            name, size = fast
            resyncing = False
            padded = _padded(size)
            data = read(padded)
            if len(data) < padded:
                data += _read_exact(handle, padded - len(data))
            if len(data) < size:
                yield ("corrupt", f"truncated member {name}", b"")
                return
            yield ("member", name, data[:size] if padded != size else data)
            continue
        if header.count(0) == BLOCK:
            if resyncing:  # zeros inside a damaged member's data: keep scanning
                continue
            return  # end-of-archive marker
        try:
            info = tarfile.TarInfo.frombuf(header, "utf-8", "surrogateescape")
        except tarfile.HeaderError as error:
            if not resyncing:
                yield ("corrupt", f"invalid tar header ({error})", b"")
                resyncing = True
            continue
        resyncing = False
        data = _read_exact(handle, info.size)
        if len(data) < info.size:
            yield ("corrupt", f"truncated member {info.name}", b"")
            return
        _read_exact(handle, _padded(info.size) - info.size)
        if info.type == tarfile.GNUTYPE_LONGNAME:
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif info.type == tarfile.XHDTYPE:
            long_name = _pax_path(data) or long_name
        elif info.isreg():
            yield ("member", long_name or info.name, data)
            long_name = None
        else:
            long_name = None


def split_name(name: str) -> tuple[str, str]:
    """``"a/b/c.seg.npz"`` -> ``("a/b/c", "seg.npz")``; no dot -> extension ``""``."""
    if "/" not in name:
        stem, _, ext = name.partition(".")
        return stem, ext
    folder, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return (posixpath.join(folder, stem) if folder else stem), ext


def tar_samples(handle: IO[bytes]) -> Iterator[dict]:
    """Group a tar stream into raw samples ``{"__key__": key, ext: bytes, ...}``.

    A sample next to a damaged region (the one open when it happened and the one that
    starts right after) carries ``CORRUPT_FLAG: True``, so that an incomplete sample can
    be told apart from one written without a member.
    """
    current: dict | None = None
    flag_next = False
    for kind, name, data in tar_events(handle):
        if kind == "corrupt":
            if current is not None:
                current[CORRUPT_FLAG] = True
            flag_next = True
            continue
        key, ext = split_name(name)
        if current is None or current["__key__"] != key:
            if current is not None:
                yield current
            current = {"__key__": key}
            if flag_next:
                current[CORRUPT_FLAG] = True
                flag_next = False
        current[ext] = data
    if current is not None:
        yield current

