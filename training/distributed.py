"""Processes, devices and the data-parallel mesh.

Every step runs under `jax.jit` over a one-axis mesh of all devices of all processes: the batch
is sharded on "data", the train state replicated, and XLA inserts the cross-device reductions
(the gradient of a replicated parameter is the global-batch gradient, BatchNorm statistics are
global-batch statistics).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def initialize(coordinator_address: str = "", num_processes: int = 1, process_id: int = 0):
    """Joins a multi-process run. With no arguments, `jax.distributed.initialize` finds the
    cluster itself where it can (Cloud TPU, SLURM, Open MPI); otherwise name the coordinator
    ("host:port"), the number of processes and this one's id. CPU processes talk over gloo."""
    if not coordinator_address and num_processes <= 1:
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address or None, num_processes, process_id)


def data_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def global_batch(local_batch: dict, sharding: NamedSharding) -> dict:
    """This process's rows -> arrays over the global batch (rows of process p follow p-1's)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def total_over_processes(count: int) -> int:
    """The sum of each process's `count`, on every process."""
    if jax.process_count() == 1:
        return count
    return int(np.sum(multihost_utils.process_allgather(np.asarray(count))))


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (e.g. one of them got SIGTERM)."""
    return total_over_processes(int(flag)) > 0
