"""The converter registry behind ``raytrain shard <source>``: one entry per data source.

    entry = CONVERTERS.get("coco")      # ShardSource(help, add_arguments, run)
    parser = entry.add_arguments(argparse.ArgumentParser())

Real sources share one runner (``run_record_set``): their entry turns the parsed
arguments into a ``RecordSet`` and the runner converts it on this machine
(``--workers`` processes) or as Ray tasks (``--ray``, ``distributed.shard_with_ray``).
The synthetic source is registered by ``raytrain.cli`` (library code does not import
``raytrain.synthetic``). The ``datasets/shard_<source>.py`` scripts call
``raytrain shard <source>``.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from raytrain.body.model import BodyModelError
from raytrain.registry import Registry

from . import pw3d, spin_npz
from .common import ConversionError, RecordSet, add_output_args, convert_record_set, storage_from_args


@dataclass(frozen=True)
class ShardSource:
    """One ``raytrain shard`` source: its help line, its options, what runs it."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


CONVERTERS = Registry("shard source")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Output, storage and execution options every real source shares."""
    add_output_args(parser)
    parser.add_argument("--ray", action="store_true",
                        help="convert as Ray tasks (on `data_cpu` nodes where the cluster has "
                             "them); restartable: a rerun converts only unfinished chunks")
    parser.add_argument("--ray-address", default=None,
                        help="with --ray: cluster address (default: RAY_ADDRESS, else a local "
                             "Ray instance)")
    parser.add_argument("--chunk", type=int, default=2000,
                        help="with --ray: records per Ray task (one CPU each; --workers applies "
                             "without --ray only)")


def run_record_set(make: Callable[[argparse.Namespace], RecordSet], args: argparse.Namespace) -> int:
    """Build the record set from ``args`` and convert it; bad input exits 2 in one line."""
    try:
        record_set = make(args)
        storage = storage_from_args(args)
        if args.ray:
            from .distributed import shard_with_ray

            shard_with_ray(record_set, args.out, chunk=args.chunk, maxcount=args.maxcount,
                           limit=args.limit, storage=storage, address=args.ray_address,
                           overwrite=args.overwrite)
        else:
            convert_record_set(record_set, args.out, limit=args.limit, workers=args.workers,
                               maxcount=args.maxcount, storage=storage,
                               progress=not args.no_progress, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, BodyModelError, ConversionError) as error:
        print(f"raytrain shard: error: {error}", file=sys.stderr)
        return 2
    return 0


def _real_source(add_source_arguments: Callable[[argparse.ArgumentParser], None]):
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_source_arguments(parser)
        add_run_arguments(parser)
    return add_arguments


CONVERTERS.register("3dpw", ShardSource(
    help="3DPW: the raw release (--root, --split) or a SPIN-style npz (--npz, --img-root)",
    add_arguments=_real_source(pw3d.add_arguments),
    run=partial(run_record_set, pw3d.record_set_from_args)))

_NPZ_HELP = {"h36m": "Human3.6M", "mpi_inf_3dhp": "MPI-INF-3DHP", "coco": "COCO", "mpii": "MPII"}
for _source, _title in _NPZ_HELP.items():
    CONVERTERS.register(_source, ShardSource(
        help=f"{_title}: a SPIN/CLIFF-style npz (--npz) plus its images (--img-root)",
        add_arguments=_real_source(spin_npz.add_arguments),
        run=partial(run_record_set, partial(spin_npz.record_set_from_args, _source))))
