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
OVERSIZED_FLAG = "__oversized__"  # extensions of members skipped for their size
DUPLICATE_FLAG = "__duplicate__"  # "key": a key seen before in the tar; "member": a member twice

#: Default largest member kept (bytes); ``tar_samples`` takes a per-name limit.
DEFAULT_MEMBER_LIMIT = 64 << 20


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


def _skip(handle: IO[bytes], size: int) -> int:
    """Skip ``size`` bytes without holding them (seek when possible); bytes skipped."""
    try:
        if handle.seekable():
            start = handle.tell()
            end = handle.seek(0, 2)
            target = min(start + size, end)
            handle.seek(target)
            return target - start
    except (OSError, ValueError, AttributeError):
        pass
    left = size
    while left > 0:
        chunk = handle.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)
    return size - left


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
_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE, tarfile.XGLTYPE)
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


def tar_events(handle: IO[bytes], limit=None) -> Iterator[tuple[str, str, bytes]]:
    """Yield ``("member", name, data)`` for regular files and ``("corrupt", detail, b"")``.

    One ``corrupt`` event is emitted per run of damaged blocks; a truncated member ends
    the stream after its event. Directories, links and global headers are skipped.
    A member larger than ``limit(name)`` bytes (default ``DEFAULT_MEMBER_LIMIT``) is
    skipped without being held and reported as ``("oversized", name, b"")``.
    """
    limit = limit or (lambda name: DEFAULT_MEMBER_LIMIT)
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
            if size > limit(name):
                if _skip(handle, padded) < size:
                    yield ("corrupt", f"truncated member {name}", b"")
                    return
                yield ("oversized", name, b"")
                continue
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
        name = long_name or info.name
        if info.size > max(limit(name), 1 << 20 if info.type in _META_TYPES else 0):
            if _skip(handle, _padded(info.size)) < info.size:
                yield ("corrupt", f"truncated member {name}", b"")
                return
            if info.isreg():
                yield ("oversized", name, b"")
            long_name = None
            continue
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


def tar_samples(handle: IO[bytes], limit=None) -> Iterator[dict]:
    """Group a tar stream into raw samples ``{"__key__": key, ext: bytes, ...}``.

    A sample next to a damaged region (the one open when it happened and the one that
    starts right after) carries ``CORRUPT_FLAG: True``, so that an incomplete sample can
    be told apart from one written without a member. A member over ``limit(name)``
    bytes is not kept: its extension is listed under ``OVERSIZED_FLAG``. A sample whose
    key came before in the tar, or that holds a member twice, carries ``DUPLICATE_FLAG``
    (``"key"`` / ``"member"``): it is delivered, to be counted as bad, never merged.
    """
    current: dict | None = None
    flag_next = False
    seen: set[int] = set()  # hashes of the keys so far (bounded by the tar's size / 1536)
    for kind, name, data in tar_events(handle, limit):
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
            if hash(key) in seen:
                current[DUPLICATE_FLAG] = "key"
            seen.add(hash(key))
            if flag_next:
                current[CORRUPT_FLAG] = True
                flag_next = False
        if ext in current or ext in current.get(OVERSIZED_FLAG, ()):
            current.setdefault(DUPLICATE_FLAG, "member")
        if kind == "oversized":
            current.setdefault(OVERSIZED_FLAG, []).append(ext)
            continue
        current[ext] = data
    if current is not None:
        yield current

