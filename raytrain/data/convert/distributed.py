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

**Restart.** A chunk whose ``parts/part-<i>.json`` exists for the same record range,
source and record count is not converted again: a rerun of the same command after a crash or preemption
converts only the missing chunks, then writes the manifest.
"""
from __future__ import annotations

import itertools
import json
import logging
from collections import Counter
from collections.abc import Callable

from ...connect import connect_ray
from ..io import exists, get_fs, join_url, open_url
from ..shards import MANIFEST_NAME, PARTS_DIR, make_manifest, write_json
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


def convert_chunk(record_set: RecordSet, index: int, start: int, end: int, out: str,
                  maxcount: int, storage: StorageConfig | None,
                  storage_options: dict | None) -> dict:
    """Convert records ``[start, end)`` into ``part-<index>-*.tar``; write and return its
    part record (shard entries, written and skipped counts)."""
    records = itertools.islice(record_set.make_records(), start, end)
    summary = run_conversion(records, out, record_set.source, record_set.licence,
                             maxcount=maxcount, total=end - start, storage=storage,
                             progress=False, printer=None, storage_options=storage_options,
                             prefix=f"part-{index:05d}", write_manifest=False)
    part = {"index": index, "start": start, "end": end, "source": record_set.source,
            "records": record_set.total,
            "shards": summary.manifest["shards"], "written": summary.written,
            "skipped": dict(summary.skipped), "examples": summary.examples}
    write_json(part_url(out, index), part, storage_options)  # last: marks the chunk done
    return part


def read_done_part(out: str, index: int, start: int, end: int, record_set: RecordSet,
                   storage_options: dict | None) -> dict | None:
    """The part record of a chunk converted before (same range, source and number of
    records), else None."""
    url = part_url(out, index)
    if not exists(url, storage_options):
        return None
    try:
        with open_url(url, "rb", storage_options) as handle:
            part = json.loads(handle.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        log.warning("%s unreadable (%s): converting that chunk again", url, error)
        return None
    same = (isinstance(part, dict) and part.get("start") == start and part.get("end") == end
            and part.get("source") == record_set.source and part.get("records") == record_set.total
            and isinstance(part.get("shards"), list))
    if not same:
        log.warning("%s is from another conversion: converting that chunk again", url)
    return part if same else None


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

    A rerun reuses the chunks an earlier run of the same conversion finished (their part
    records must match the range, source and record count); its manifest is removed first
    and written anew at the end, so no manifest ever describes shards being rewritten.
    ``overwrite`` starts from an empty folder instead."""
    import ray

    if overwrite:
        prepare_output(out, True, storage_options)
    elif exists(join_url(out, MANIFEST_NAME), storage_options):
        get_fs(out, storage_options)[0].rm(get_fs(join_url(out, MANIFEST_NAME), storage_options)[1])

    connect_ray(address)
    total = record_set.total if limit is None else min(record_set.total, max(0, limit))
    chunks = chunk_ranges(total, chunk)
    parts: dict[int, dict] = {}
    for index, start, end in chunks:
        done = read_done_part(out, index, start, end, record_set, storage_options)
        if done is not None:
            parts[index] = done
    options = task_options(ray.cluster_resources())
    task = ray.remote(convert_chunk).options(**options)
    pending = {task.remote(record_set, index, start, end, out, maxcount, storage, storage_options): index
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


def _merge(record_set: RecordSet, out: str, parts: list[dict], storage_options: dict | None,
           printer) -> ConversionSummary:
    shards = [entry for part in parts for entry in part["shards"]]
    manifest = make_manifest(shards, record_set.source, record_set.licence)
    write_json(join_url(out, MANIFEST_NAME), manifest, storage_options)
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
