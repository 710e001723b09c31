#!/usr/bin/env python
"""Shard MPI-INF-3DHP from a SPIN/CLIFF-style .npz plus its images (see datasets/README.md);
needs raytrain installed (`pip install -e .`).

    python datasets/shard_mpi_inf_3dhp.py --npz mpi_inf_3dhp_train.npz --img-root /data/mpi_inf_3dhp \
        --out shards/mpi_inf_3dhp
"""
import sys

from raytrain.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", "mpi_inf_3dhp", *sys.argv[1:]]))  # = raytrain shard mpi_inf_3dhp ...
