"""Writing WebDataset tar shards plus ``manifest.json``, locally or to object storage.

    manifest = write_shards(samples, "s3://bucket/3dpw-test", source="3dpw",
                            licence="3DPW: non-commercial research only",
                            maxcount=1000, storage_options={...})

``samples`` yields dicts from ``schema.encode_sample``. Shards are named
``<prefix>-000000.tar`` ... beside ``manifest.json``:

    {"schema_version": 1, "num_samples": N, "num_shards": K, "source": ..., "licence": ...,
     "shards": [{"name": "shard-000000.tar", "num_samples": n, "bytes": b, "sha256": h}, ...]}

Tar member times are fixed, so the same samples give byte-identical shards.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import webdataset as wds
from braceexpand import braceexpand

from ..files import read_bounded
from .admission import file_problem
from .errors import ManifestError
from .formats.tar import tar_samples
from .io import (
    HashingWriter,
    dirname_url,
    exists,
    file_sizes,
    get_fs,
    is_remote,
    isdir,
    join_url,
    list_files,
    open_url,
    sha256_of,
)
from .schema import KNOWN_SCHEMA_VERSIONS, SCHEMA_VERSION, SchemaError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
#: Present in a shard folder while a writer fills it: the shard set is not usable.
INCOMPLETE_NAME = "WRITING.incomplete"
#: Where a conversion run as Ray tasks keeps the record of each finished chunk.
PARTS_DIR = "parts"


def write_shards(
    samples: Iterable[dict],
    out: str,
    source: str,
    licence: str,
    maxcount: int = 1000,
    maxsize: float = 1e9,
    prefix: str = "shard",
    storage_options: dict | None = None,
    write_manifest: bool = True,
) -> dict:
    """Write encoded samples into tar shards under ``out`` and return the manifest.

    A new shard starts after ``maxcount`` samples or once ``maxsize`` payload bytes
    are written. ``out`` is a local directory or an fsspec URL (``s3://``, ``gs://``).
    ``write_manifest=False``: only return it (a part of a larger conversion, whose driver
    writes the manifest). While a whole set is written the folder holds ``INCOMPLETE_NAME``
    (readers refuse it); the manifest is written last, atomically, and then the marker goes.
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    fs, root = get_fs(out, storage_options)
    if not is_remote(out):
        fs.makedirs(root, exist_ok=True)
    marker = join_url(out, INCOMPLETE_NAME)
    if write_manifest:
        with open_url(marker, "wb", storage_options) as handle:
            handle.write(b"shards are being written here; this folder is unusable until the manifest is\n")
    files: dict[str, HashingWriter] = {}
    counts: Counter = Counter()

    def opener(url: str) -> HashingWriter:
        files[url] = HashingWriter(open_url(url, "wb", storage_options))
        return files[url]

    def post(url: str) -> None:
        files[url].close()

    pattern = join_url(out, prefix).replace("%", "%%") + "-%06d.tar"
    writer = wds.ShardWriter(
        pattern, maxcount=maxcount, maxsize=maxsize, post=post, opener=opener,
        verbose=0, encoder=False, mtime=0,  # int: a float time adds a pax header per member
    )
    try:
        for sample in samples:
            writer.write(sample)
            counts[writer.fname] += 1
    finally:
        writer.close()
    shards = [_shard_entry(url, counts[url], handle) for url, handle in files.items()]
    manifest = make_manifest(shards, source, licence)
    if write_manifest:
        write_json(join_url(out, MANIFEST_NAME), manifest, storage_options)
        fs.rm(get_fs(marker, storage_options)[1])
    (log.info if write_manifest else log.debug)(  # a part: its driver reports progress
        "wrote %d samples in %d shards to %s", manifest["num_samples"], len(shards), out)
    return manifest


def _shard_entry(url: str, num_samples: int, handle: HashingWriter) -> dict:
    return {
        "name": url.rstrip("/").rsplit("/", 1)[-1],
        "num_samples": int(num_samples),
        "bytes": handle.bytes_written,
        "sha256": handle.hexdigest(),
    }


def make_manifest(shards: list[dict], source: str, licence: str) -> dict:
    """The manifest dict for a list of shard entries."""
    return {
        "schema_version": SCHEMA_VERSION,
        "num_samples": sum(entry["num_samples"] for entry in shards),
        "num_shards": len(shards),
        "source": source,
        "licence": licence,
        "shards": shards,
    }


def write_json(url: str, payload: dict, storage_options: dict | None = None, indent: int = 1,
               default=None) -> None:
    """Write ``payload`` atomically: a local file under a temporary name renamed into
    place (a full disk leaves the old file or none, never a truncated one); an
    object-store PUT is atomic by itself. ``default``: as ``json.dumps``'s."""
    data = json.dumps(payload, indent=indent, default=default).encode("utf-8")
    if is_remote(url):
        with open_url(url, "wb", storage_options) as handle:
            handle.write(data)
        return
    path = url[len("file://"):] if url.startswith("file://") else url
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def clear_shard_folder(out: str, overwrite: bool, storage_options: dict | None = None) -> None:
    """Make ``out`` ready for a new shard set: missing or empty is fine; a folder holding
    a shard set (tars, manifest, an unfinished write) is cleared with ``overwrite`` and
    refused without; a folder holding anything else is always refused."""
    fs, root = get_fs(out, storage_options)
    if not fs.exists(root):
        return
    if not fs.isdir(root):
        raise FileExistsError(f"{out}: exists and is not a folder")
    names = sorted(posixpath.basename(str(p).rstrip("/")) for p in fs.ls(root, detail=False))
    ours = [n for n in names if n.endswith(".tar") or n in (MANIFEST_NAME, INCOMPLETE_NAME, PARTS_DIR)
            or n.startswith(MANIFEST_NAME + ".tmp-")]
    others = [n for n in names if n not in ours]
    if others:
        raise FileExistsError(f"{out}: holds files that are not shards ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); choose an empty folder")
    if ours and not overwrite:
        raise FileExistsError(f"{out}: already holds a shard set ({len(ours)} files); pass --overwrite "
                              "to replace it")
    for name in sorted(ours, key=lambda n: n != MANIFEST_NAME):  # the manifest first
        fs.rm(join_url(root, name), recursive=name == PARTS_DIR)


def manifest_url(path_or_url: str) -> str:
    """The manifest's URL given it or the directory that holds it."""
    return path_or_url if path_or_url.endswith(".json") else join_url(path_or_url, MANIFEST_NAME)


def read_manifest(path_or_url: str, storage_options: dict | None = None) -> dict:
    """Load and check a manifest (the file itself or its directory).

    Raises ``SchemaError`` naming the file for an unknown ``schema_version`` and
    ``ManifestError`` (a ``ValueError``) naming the file for a malformed manifest:
    mistyped counts, duplicate or non-plain shard names, totals that do not add up.
    """
    url = manifest_url(path_or_url)
    check_regular_file(url, storage_options)
    try:
        payload = read_bounded(url, MAX_MANIFEST_BYTES, f"{url}: manifest", ManifestError, storage_options)
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {url}") from None
    try:
        manifest = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # ValueError: also a number of over 4300 digits
        raise ManifestError(f"{url}: manifest is not valid JSON ({str(error)[:200]})") from None
    _check_manifest(url, manifest)
    return manifest


#: Largest manifest read (bytes): a million shards' entries fit.
MAX_MANIFEST_BYTES = 256 << 20
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_manifest(url: str, manifest: object) -> None:
    if not isinstance(manifest, dict):
        raise ManifestError(f"{url}: manifest is not a JSON object")
    version = manifest.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS or isinstance(version, bool):
        raise SchemaError(
            f"{url}: unknown shard schema_version {version!r}; this raytrain reads "
            f"{list(KNOWN_SCHEMA_VERSIONS)} (re-shard the data or upgrade raytrain)"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ManifestError(f"{url}: manifest has no 'shards' list")
    seen: set[str] = set()
    for entry in shards:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ManifestError(f"{url}: shard entry without a name: {str(entry)[:200]}")
        name = entry["name"]
        if not _plain_name(name):
            raise ManifestError(f"{url}: shard name {name[:200]!r} is not a plain file name beside the "
                                "manifest (no folders, '..' or absolute paths)")
        if name in seen:
            raise ManifestError(f"{url}: shard {name} is listed twice")
        seen.add(name)
        if not _is_count(entry.get("num_samples")):
            raise ManifestError(f"{url}: shard {name} has no valid num_samples "
                                f"(a non-negative integer, got {entry.get('num_samples')!r})")
        if "bytes" in entry and not _is_count(entry["bytes"]):
            raise ManifestError(f"{url}: shard {name} has an invalid bytes {entry['bytes']!r}")
        if "bytes" in entry:
            check_count_fits(url, name, entry["num_samples"], entry["bytes"])
        if "sha256" in entry and not (isinstance(entry["sha256"], str) and _SHA256.fullmatch(entry["sha256"])):
            raise ManifestError(f"{url}: shard {name} has an invalid sha256")
    total = sum(entry["num_samples"] for entry in shards)
    declared = manifest.get("num_samples", total)
    if not _is_count(declared) or declared != total:
        raise ManifestError(f"{url}: num_samples {declared!r} != sum over shards {total}")


#: Fewest bytes one sample takes in a tar: a 512-byte header for each of its three members.
MIN_SAMPLE_BYTES = 3 * 512


def check_count_fits(url: str, name: str, num_samples: int, size: int) -> None:
    """``ManifestError`` when ``num_samples`` cannot fit in a shard of ``size`` bytes."""
    if num_samples > size // MIN_SAMPLE_BYTES:
        raise ManifestError(f"{url}: shard {name} is said to hold {num_samples} samples, but its {size} "
                            f"bytes hold at most {size // MIN_SAMPLE_BYTES} (every sample takes at least "
                            f"{MIN_SAMPLE_BYTES} bytes): the manifest is wrong (re-run the conversion)",
                            shard=name)


def _plain_name(name: str) -> bool:
    """A file name without folders: no '/', '\\', '..', NUL or leading '/'."""
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def verify_shards(path_or_url: str, storage_options: dict | None = None) -> list[str]:
    """Recompute every shard's size and sha256; return a list of mismatches (empty if ok)."""
    url = manifest_url(path_or_url)
    manifest = read_manifest(url, storage_options)
    base = dirname_url(url) or "."
    problems = []
    for entry in manifest["shards"]:
        shard_url = join_url(base, entry["name"])
        try:
            size, digest = sha256_of(shard_url, storage_options)
        except FileNotFoundError:
            problems.append(f"{shard_url}: missing")
            continue
        if size != entry.get("bytes") or digest != entry.get("sha256"):
            problems.append(f"{shard_url}: size/sha256 differ from the manifest")
    return problems


# ----------------------------------------------------------------------------- shard lists

@dataclass(frozen=True)
class ShardRef:
    """One shard: where it is, its name, and how many samples it holds."""

    url: str
    name: str
    num_samples: int


def resolve_shards(source: str | Sequence[str], storage_options: dict | None = None,
                   verify: bool = False) -> list[ShardRef]:
    """Shard list from a manifest, a directory, a brace pattern or a list of tar URLs.

    Counts come from the manifest (``manifest.json`` beside the shards, which is checked
    for its schema version); shards without one are counted by reading them once.
    A manifest must describe its folder: every ``.tar`` there listed, each once, each of
    the recorded size (``ManifestError`` otherwise). ``verify`` also checks every
    shard's sha256. Local shards must be regular files (not a device or a pipe).
    """
    if isinstance(source, (list, tuple)):
        urls = [str(url) for url in source]
    elif source.endswith(".json"):
        return _from_manifest(source, storage_options, verify)
    elif "{" in source:
        urls = list(braceexpand(source))
    elif isdir(source, storage_options):
        if exists(join_url(source, MANIFEST_NAME), storage_options):
            return _from_manifest(join_url(source, MANIFEST_NAME), storage_options, verify)
        _refuse_incomplete(source, storage_options)  # (_from_manifest checks it there)
        urls = list_files(source, ".tar", storage_options)
    else:
        urls = [source]
    if not urls:
        raise FileNotFoundError(f"no tar shards found at {source}")
    return _with_counts(urls, storage_options, verify)


def check_regular_file(url: str, storage_options: dict | None = None) -> None:
    """A local path must be a regular file: a device (``/dev/urandom``), a pipe or a
    socket would never end or never answer. Missing files raise ``FileNotFoundError``."""
    problem = file_problem(url)   # the admission rule of every input file (admission.py)
    if problem == "no such file":
        raise FileNotFoundError(f"{url}: no such file")
    if problem:
        raise ManifestError(f"{url}: {problem}: it cannot be a shard or a manifest")


def _refuse_incomplete(folder: str, storage_options: dict | None) -> None:
    if exists(join_url(folder, INCOMPLETE_NAME), storage_options):
        raise ManifestError(f"{folder}: a shard writer did not finish here ({INCOMPLETE_NAME} is "
                            "present): the shards and the manifest may not match; re-run the "
                            "conversion with --overwrite")


def _from_manifest(url: str, storage_options: dict | None, verify: bool = False) -> list[ShardRef]:
    base = dirname_url(url)
    _refuse_incomplete(base or ".", storage_options)
    manifest = read_manifest(url, storage_options)
    refs = [
        ShardRef(join_url(base, entry["name"]), entry["name"], entry["num_samples"])
        for entry in manifest["shards"]
    ]
    listed = {ref.name for ref in refs}
    sizes = file_sizes(base or ".", ".tar", storage_options)
    unlisted = sorted(set(sizes) - listed)
    if unlisted:
        raise ManifestError(f"{url}: {len(unlisted)} shard(s) beside the manifest are not listed in it "
                            f"({', '.join(unlisted[:3])}{', ...' if len(unlisted) > 3 else ''}): the "
                            "manifest is stale or the folder holds two shard sets (re-run the "
                            "conversion with --overwrite)")
    refused = []    # with verify: every listed shard that is missing or changed, then one error
    for entry, ref in zip(manifest["shards"], refs):
        if "bytes" not in entry and ref.name in sizes:
            check_count_fits(url, ref.name, ref.num_samples, sizes[ref.name])
        try:
            _check_shard_file(ref, entry, sizes.get(ref.name), storage_options, verify)
        except ManifestError as err:
            refused.append(err)
    if len(refused) > 1:
        raise ManifestError(f"{len(refused)} of the {len(refs)} shards listed in {url} are missing or "
                            f"changed; the first: {refused[0]}", shard=getattr(refused[0], "shard", None))
    if refused:
        raise refused[0]
    return refs


_WARNED: set[str] = set()


def _check_shard_file(ref: ShardRef, entry: dict, size: int | None, storage_options: dict | None,
                      verify: bool) -> None:
    """The shard exists as a regular file of the recorded size (and sha256 with ``verify``).

    A missing shard is left to the reader (its samples are counted as lost); a size that
    differs from the manifest is logged (the reader then counts lost samples and refuses
    extra ones); with ``verify`` any difference raises ``ManifestError``."""
    try:
        if size is None:
            raise FileNotFoundError(ref.url)
        check_regular_file(ref.url, storage_options)
    except FileNotFoundError:
        if verify:
            raise ManifestError(f"{ref.url}: missing (listed in the manifest)", shard=ref.name) from None
        if ref.url in _WARNED:
            return
        _WARNED.add(ref.url)
        log.warning("shard %s listed in the manifest is missing: its %d samples count as lost",
                    ref.url, ref.num_samples)
        return
    recorded = entry.get("bytes")
    if recorded is not None and size != recorded:
        message = (f"{ref.url}: {size} bytes, the manifest records {recorded}: the shard was "
                   "replaced, truncated or damaged in storage")
        if verify:
            raise ManifestError(message, shard=ref.name)
        if ref.url not in _WARNED:  # once per process: shard lists are resolved every epoch
            _WARNED.add(ref.url)
            log.warning("%s; its samples are checked against the manifest while read", message)
        return
    if verify and verify != SIZES and entry.get("sha256"):
        _, digest = sha256_of(ref.url, storage_options)
        if digest != entry["sha256"]:
            raise ManifestError(f"{ref.url}: sha256 differs from the manifest's: the shard was "
                                "replaced or corrupted in storage", shard=ref.name)


def _with_counts(urls: list[str], storage_options: dict | None, verify: bool = False) -> list[ShardRef]:
    """Attach counts from the manifests beside the shards, else by reading the shards."""
    known: dict[str, int] = {}
    for folder in sorted({dirname_url(url) for url in urls}):
        if exists(join_url(folder, MANIFEST_NAME), storage_options):
            for ref in _from_manifest(join_url(folder, MANIFEST_NAME), storage_options, verify):
                known[ref.url] = ref.num_samples
        else:
            _refuse_incomplete(folder or ".", storage_options)
    unknown = [url for url in urls if url not in known]
    if unknown:
        log.warning("no manifest for %d shard(s); counting their samples by reading them", len(unknown))
    for url in unknown:
        check_regular_file(url, storage_options)
        with open_url(url, "rb", storage_options) as handle:
            known[url] = sum(1 for _ in tar_samples(handle, lambda name: 0))
    return [ShardRef(url, posixpath.basename(url), known[url]) for url in urls]


def count_samples(source: str | Sequence[str], storage_options: dict | None = None,
                  verify: bool = False) -> int:
    """Samples in a shard set (manifest counts, else read once)."""
    return sum(ref.num_samples for ref in resolve_shards(source, storage_options, verify))


#: ``verify`` level of ``checked_shards`` (``raytrain doctor``): a listed shard that is
#: missing or of another size than recorded is refused, without hashing (``True``: sha256 too).
SIZES = "sizes"


def checked_shards(key: str, source: str, verify: bool | str = False) -> list[ShardRef]:
    """The shards of the set `source` named by config key or flag `key`, its manifest read
    once; ConfigError naming the key (and what to install or configure) when it is unset,
    unreadable or empty. ``verify``: as ``resolve_shards``'s, or ``SIZES``."""
    from ..config import ConfigError
    from .io import storage_error_hint
    if not source:
        raise ConfigError(f"{key}: not set")
    try:
        refs = resolve_shards(source, verify=verify)
    except Exception as err:  # noqa: BLE001 - every way shards can be unreadable
        hint = storage_error_hint(source, err)
        if hint is None and not isinstance(err, (FileNotFoundError, ValueError, OSError)):
            raise
        raise ConfigError(f"{key}: cannot read shards at {source!r}: {hint or err}") from None
    if sum(ref.num_samples for ref in refs) == 0:
        raise ConfigError(f"{key}: {source!r} holds zero samples")
    return refs


def checked_count(key: str, source: str, verify: bool = False) -> int:
    """Samples of the shard set `source` named by config key or flag `key` (``checked_shards``)."""
    return sum(ref.num_samples for ref in checked_shards(key, source, verify))
