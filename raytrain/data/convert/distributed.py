"""One conversion split into Ray tasks: record ranges -> shards + one manifest, restartable.

    summary = shard_with_ray(record_set, "s3://bucket/coco", chunk=2000, maxcount=1000)

The records ``[0, total)`` are cut into chunks of ``chunk`` records; task ``i`` converts
records ``[i*chunk, (i+1)*chunk)`` (``itertools.islice`` of the record set's factory, so
every task makes the same records in the same order as the single-machine path) into
shards ``part-<i>-<k>.tar`` and, last, writes ``parts/part-<i>.json`` (its shard entries
and skip counts). ``manifest.json`` lists the parts' shards in chunk order, so the
output holds the same samples in the same order as ``run_conversion``'s, only cut into
shards at other places.

**Where tasks run.** Each task asks for one CPU and, where the cluster offers the custom
resource ``data_cpu`` (the CPU-only node type of ``cluster/aws.yaml``, ``gcp.yaml`` and
the KubeRay specs), one ``data_cpu`` too, so conversions land on those nodes and never
on a GPU node; a cluster without it runs them on plain CPUs. Input files (npz, images,
3DPW release) must be readable at the same path on every node (a shared filesystem or
the image); output may be a local path (one machine) or an ``s3://`` / ``gs://`` URL.

**Restart.** The folder holds ``WRITING.incomplete`` from before the first part until
after the manifest, so a killed conversion's folder is refused by the reader, ``raytrain
doctor`` and training until a rerun finishes it. Every part record carries the
fingerprint of its conversion (``conversion_fingerprint``: the source, the record count,
the converter's arguments with the content of every input file they name, the storage
options, ``maxcount``) and its record range. A rerun of the same command into such an
unfinished folder reuses a chunk only when its part record has the same fingerprint and
its shards are there at their recorded sizes; every other chunk is converted again (its
old shards removed first). As for the single-machine writer, an ``--out`` holding
anything else (a finished shard set, shards without part records) is refused without
``--overwrite``, and ``--overwrite`` starts from an empty folder.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
from collections import Counter
from collections.abc import Callable

from ...connect import connect_ray
from ..io import exists, file_sizes, get_fs, join_url, open_url
from ..shards import INCOMPLETE_NAME, MANIFEST_NAME, PARTS_DIR, make_manifest, write_json
from .common import ConversionSummary, RecordSet, StorageConfig, prepare_output, run_conversion

log = logging.getLogger(__name__)

DATA_RESOURCE = "data_cpu"  # the custom resource of the CPU-only node type


def chunk_ranges(total: int, chunk: int) -> list[tuple[int, int, int]]:
    """``(index, start, end)`` of every chunk of ``[0, total)``."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    return [(i, start, min(start + chunk, total)) for i, start in enumerate(range(0, total, chunk))]


def part_url(out: str, index: int) -> str:
    return join_url(join_url(out, PARTS_DIR), f"part-{index:05d}.json")


def conversion_fingerprint(record_set: RecordSet, storage: StorageConfig | None, maxcount: int) -> str:
    """sha256 of what a conversion's output depends on: the source, licence and record
    count, the record factory's name and arguments (each argument naming a file by the
    file's size and sha256; folders and other values as they are), the storage options
    and ``maxcount``."""
    factory = record_set.make_records
    args = [*getattr(factory, "args", ()), *sorted(getattr(factory, "keywords", {}).items())]
    described = {
        "source": record_set.source, "licence": record_set.licence, "total": record_set.total,
        "factory": _qualified(getattr(factory, "func", factory)),
        "arguments": [_describe(value) for value in args],
        "storage": dataclasses.asdict(storage or StorageConfig()), "maxcount": maxcount,
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()


def _qualified(function) -> str:
    return f"{getattr(function, '__module__', '?')}.{getattr(function, '__qualname__', type(function).__name__)}"


def _describe(value):
    """A factory argument as plain JSON: a file by its content's hash, containers item by
    item, objects by their type (never a memory address)."""
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], str):
        return [value[0], _describe(value[1])]  # a keyword
    if isinstance(value, (list, tuple)):
        return [_describe(item) for item in value]
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str) and os.path.isfile(value):
        digest = hashlib.sha256()
        with open(value, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return {"file": os.path.abspath(value), "sha256": digest.hexdigest()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, functools.partial):
        return [_qualified(value.func), _describe(list(value.args))]
    return f"<{type(value).__module__}.{type(value).__qualname__}>"


def convert_chunk(record_set: RecordSet, index: int, start: int, end: int, out: str,
                  maxcount: int, storage: StorageConfig | None,
                  storage_options: dict | None, fingerprint: str = "") -> dict:
    """Convert records ``[start, end)`` into ``part-<index>-*.tar``; write and return its
    part record (shard entries, written and skipped counts, the conversion's fingerprint)."""
    records = itertools.islice(record_set.make_records(), start, end)
    summary = run_conversion(records, out, record_set.source, record_set.licence,
                             maxcount=maxcount, total=end - start, storage=storage,
                             progress=False, printer=None, storage_options=storage_options,
                             prefix=f"part-{index:05d}", write_manifest=False)
    part = {"index": index, "start": start, "end": end, "source": record_set.source,
            "records": record_set.total, "fingerprint": fingerprint,
            "shards": summary.manifest["shards"], "written": summary.written,
            "skipped": dict(summary.skipped), "examples": summary.examples}
    write_json(part_url(out, index), part, storage_options)  # last: marks the chunk done
    return part


def read_done_part(out: str, index: int, start: int, end: int, fingerprint: str,
                   sizes: dict[str, int], storage_options: dict | None) -> dict | None:
    """The part record of a chunk this very conversion finished before (same fingerprint
    and record range, every shard there at its recorded size), else None."""
    url = part_url(out, index)
    if not exists(url, storage_options):
        return None
    try:
        with open_url(url, "rb", storage_options) as handle:
            part = json.loads(handle.read(1 << 24).decode("utf-8"))
    except (OSError, ValueError, RecursionError) as error:
        log.warning("%s unreadable (%s): converting that chunk again", url, str(error)[:200])
        return None
    same = (isinstance(part, dict) and part.get("fingerprint") == fingerprint and part.get("start") == start
            and part.get("end") == end and isinstance(part.get("shards"), list)
            and all(isinstance(e, dict) and sizes.get(e.get("name")) == e.get("bytes") for e in part["shards"]))
    if not same:
        log.warning("%s is from another conversion or its shards changed: converting that chunk again", url)
    return part if same else None


def prepare_ray_output(out: str, overwrite: bool, storage_options: dict | None) -> None:
    """``out`` ready for a conversion as Ray tasks, marked unfinished: emptied with
    ``overwrite``; else missing, empty or an unfinished conversion of this kind (the
    unfinished-write marker and ``parts/``, no manifest) to resume; ``ConversionError``
    otherwise (the single-machine writer's rule)."""
    fs, root = get_fs(out, storage_options)
    resumable = (not overwrite and exists(join_url(out, INCOMPLETE_NAME), storage_options)
                 and exists(join_url(out, PARTS_DIR), storage_options)
                 and not exists(join_url(out, MANIFEST_NAME), storage_options))
    if not resumable:
        prepare_output(out, overwrite, storage_options)
    if not fs.exists(root) and "://" not in out:
        fs.makedirs(root, exist_ok=True)
    with open_url(join_url(out, INCOMPLETE_NAME), "wb", storage_options) as handle:  # before any part
        handle.write(b"a conversion as Ray tasks is writing here; unusable until its manifest is\n")


def _remove_chunk_shards(out: str, index: int, sizes: dict[str, int], storage_options: dict | None) -> None:
    """Shards an earlier attempt left for chunk ``index`` (it is converted again)."""
    fs, _ = get_fs(out, storage_options)
    for name in sizes:
        if name.startswith(f"part-{index:05d}-"):
            fs.rm(get_fs(join_url(out, name), storage_options)[1])


def task_options(cluster_resources: dict) -> dict:
    """Ray task options: one CPU, plus one ``data_cpu`` where the cluster offers it."""
    options = {"num_cpus": 1, "max_retries": 3}
    if cluster_resources.get(DATA_RESOURCE, 0) >= 1:
        options["resources"] = {DATA_RESOURCE: 1}
    return options


def shard_with_ray(record_set: RecordSet, out: str, *, chunk: int = 2000, maxcount: int = 1000,
                   limit: int | None = None, storage: StorageConfig | None = None,
                   storage_options: dict | None = None, address: str | None = None,
                   printer: Callable[[str], None] | None = print, overwrite: bool = False) -> ConversionSummary:
    """Convert ``record_set`` into shards under ``out`` with one Ray task per chunk.

    ``out`` must be empty or missing, or hold an unfinished conversion of this kind to
    resume (the module doc); ``overwrite`` empties a folder holding a shard set first.
    A resumed conversion reuses only the chunks whose part records carry this
    conversion's fingerprint and range and whose shards are intact."""
    import ray

    prepare_ray_output(out, overwrite, storage_options)
    connect_ray(address)
    total = record_set.total if limit is None else min(record_set.total, max(0, limit))
    chunks = chunk_ranges(total, chunk)
    conversion = conversion_fingerprint(record_set, storage, maxcount)
    fingerprints = {index: chunk_fingerprint(conversion, start, end) for index, start, end in chunks}
    sizes = file_sizes(out, ".tar", storage_options)
    parts: dict[int, dict] = {}
    for index, start, end in chunks:
        done = read_done_part(out, index, start, end, fingerprints[index], sizes, storage_options)
        if done is not None:
            parts[index] = done
        else:
            _remove_chunk_shards(out, index, sizes, storage_options)
    _remove_other_shards(out, {i for i, _, _ in chunks}, sizes, storage_options)
    options = task_options(ray.cluster_resources())
    task = ray.remote(convert_chunk).options(**options)
    pending = {task.remote(record_set, index, start, end, out, maxcount, storage, storage_options,
                           fingerprints[index]): index
               for index, start, end in chunks if index not in parts}
    reused = len(parts)
    if printer is not None:
        kind = DATA_RESOURCE if "resources" in options else "CPU"
        printer(f"shard {record_set.source}: {len(chunks)} chunks of {chunk} records, "
                f"{len(pending)} to convert as Ray tasks on {kind}, {reused} done before")
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        part = ray.get(ready[0])
        parts[pending.pop(ready[0])] = part
    return _merge(record_set, out, [parts[i] for i, _, _ in chunks], storage_options, printer)


def chunk_fingerprint(conversion: str, start: int, end: int) -> str:
    """The fingerprint a part record of records ``[start, end)`` of a conversion carries."""
    return hashlib.sha256(f"{conversion}:{start}:{end}".encode()).hexdigest()


def _remove_other_shards(out: str, indices: set[int], sizes: dict[str, int], storage_options: dict | None) -> None:
    """Shards of chunks this conversion does not have (another record count or chunk size)."""
    fs, _ = get_fs(out, storage_options)
    for name in sizes:
        head = name.split("-")
        if len(head) < 3 or head[0] != "part" or not head[1].isdigit() or int(head[1]) not in indices:
            fs.rm(get_fs(join_url(out, name), storage_options)[1])


def _merge(record_set: RecordSet, out: str, parts: list[dict], storage_options: dict | None,
           printer) -> ConversionSummary:
    shards = [entry for part in parts for entry in part["shards"]]
    manifest = make_manifest(shards, record_set.source, record_set.licence)
    write_json(join_url(out, MANIFEST_NAME), manifest, storage_options)
    fs, marker = get_fs(join_url(out, INCOMPLETE_NAME), storage_options)
    fs.rm(marker)  # last: the folder is a usable shard set from now on
    summary = ConversionSummary(source=record_set.source, out=out, manifest=manifest,
                                ignored_keys=list(record_set.ignored_keys))
    summary.written = sum(part["written"] for part in parts)
    summary.skipped = sum((Counter(part["skipped"]) for part in parts), Counter())
    for part in parts:
        for reason, example in part.get("examples", {}).items():
            summary.examples.setdefault(reason, example)
    if printer is not None:
        printer(summary.format())
    return summary
