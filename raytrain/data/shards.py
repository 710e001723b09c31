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
import posixpath
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import webdataset as wds
from braceexpand import braceexpand

from .formats.tar import tar_samples
from .io import HashingWriter, dirname_url, exists, get_fs, is_remote, isdir, join_url, list_files, open_url, sha256_of
from .schema import KNOWN_SCHEMA_VERSIONS, SCHEMA_VERSION, SchemaError

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"


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
    ``write_manifest=False``: only return it (a part of a larger conversion).
    """
    if maxcount < 1:
        raise ValueError(f"maxcount must be >= 1, got {maxcount}")
    fs, root = get_fs(out, storage_options)
    if not is_remote(out):
        fs.makedirs(root, exist_ok=True)
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
    log.info("wrote %d samples in %d shards to %s", manifest["num_samples"], len(shards), out)
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


def write_json(url: str, payload: dict, storage_options: dict | None = None) -> None:
    with open_url(url, "wb", storage_options) as handle:
        handle.write(json.dumps(payload, indent=1).encode("utf-8"))


def manifest_url(path_or_url: str) -> str:
    """The manifest's URL given it or the directory that holds it."""
    return path_or_url if path_or_url.endswith(".json") else join_url(path_or_url, MANIFEST_NAME)


def read_manifest(path_or_url: str, storage_options: dict | None = None) -> dict:
    """Load and check a manifest (the file itself or its directory).

    Raises ``SchemaError`` naming the file for an unknown ``schema_version`` and
    ``ValueError`` naming the file for a malformed manifest.
    """
    url = manifest_url(path_or_url)
    try:
        with open_url(url, "rb", storage_options) as handle:
            manifest = json.loads(handle.read().decode("utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard manifest at {url}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{url}: manifest is not valid JSON ({error})") from None
    _check_manifest(url, manifest)
    return manifest


def _check_manifest(url: str, manifest: object) -> None:
    if not isinstance(manifest, dict):
        raise ValueError(f"{url}: manifest is not a JSON object")
    version = manifest.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise SchemaError(
            f"{url}: unknown shard schema_version {version!r}; this raytrain reads "
            f"{list(KNOWN_SCHEMA_VERSIONS)} (re-shard the data or upgrade raytrain)"
        )
    shards = manifest.get("shards")
    if not isinstance(shards, list):
        raise ValueError(f"{url}: manifest has no 'shards' list")
    for entry in shards:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"{url}: shard entry without a name: {entry!r}")
        if not isinstance(entry.get("num_samples"), int) or entry["num_samples"] < 0:
            raise ValueError(f"{url}: shard {entry['name']} has no valid num_samples")
    total = sum(entry["num_samples"] for entry in shards)
    if manifest.get("num_samples", total) != total:
        raise ValueError(f"{url}: num_samples {manifest['num_samples']} != sum over shards {total}")


def verify_shards(path_or_url: str, storage_options: dict | None = None) -> list[str]:
    """Recompute every shard's size and sha256; return a list of mismatches (empty if ok)."""
    url = manifest_url(path_or_url)
    manifest = read_manifest(url, storage_options)
    base = url.rstrip("/").rsplit("/", 1)[0] if "/" in url else "."
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


def resolve_shards(source: str | Sequence[str], storage_options: dict | None = None) -> list[ShardRef]:
    """Shard list from a manifest, a directory, a brace pattern or a list of tar URLs.

    Counts come from the manifest (``manifest.json`` beside the shards, which is checked
    for its schema version); shards without one are counted by reading them once.
    """
    if isinstance(source, (list, tuple)):
        urls = [str(url) for url in source]
    elif source.endswith(".json"):
        return _from_manifest(source, storage_options)
    elif "{" in source:
        urls = list(braceexpand(source))
    elif isdir(source, storage_options):
        if exists(join_url(source, MANIFEST_NAME), storage_options):
            return _from_manifest(join_url(source, MANIFEST_NAME), storage_options)
        urls = list_files(source, ".tar", storage_options)
    else:
        urls = [source]
    if not urls:
        raise FileNotFoundError(f"no tar shards found at {source}")
    return _with_counts(urls, storage_options)


def _from_manifest(url: str, storage_options: dict | None) -> list[ShardRef]:
    manifest = read_manifest(url, storage_options)
    base = dirname_url(url)
    return [
        ShardRef(join_url(base, entry["name"]), entry["name"], entry["num_samples"])
        for entry in manifest["shards"]
    ]


def _with_counts(urls: list[str], storage_options: dict | None) -> list[ShardRef]:
    """Attach counts from the manifests beside the shards, else by reading the shards."""
    known: dict[str, int] = {}
    for folder in sorted({dirname_url(url) for url in urls}):
        if exists(join_url(folder, MANIFEST_NAME), storage_options):
            for ref in _from_manifest(join_url(folder, MANIFEST_NAME), storage_options):
                known[ref.url] = ref.num_samples
    unknown = [url for url in urls if url not in known]
    if unknown:
        log.warning("no manifest for %d shard(s); counting their samples by reading them", len(unknown))
    for url in unknown:
        with open_url(url, "rb", storage_options) as handle:
            known[url] = sum(1 for _ in tar_samples(handle))
    return [ShardRef(url, posixpath.basename(url), known[url]) for url in urls]


def count_samples(source: str | Sequence[str], storage_options: dict | None = None) -> int:
    """Samples in a shard set (manifest counts, else read once)."""
    return sum(ref.num_samples for ref in resolve_shards(source, storage_options))
