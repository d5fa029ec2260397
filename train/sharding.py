"""Device mesh, FSDP-style parameter sharding and global batches (``jax.jit`` + ``NamedSharding``).

The mesh has two axes: ``data`` and ``fsdp``. The batch is split over both (every device sees different
examples); parameters and optimizer state are split over ``fsdp`` along their largest divisible
dimension (ZeRO-3 / FSDP), small ones stay replicated. XLA inserts the all-gathers and reduce-scatters.
BatchNorm reduces over the whole batch axis inside the jitted step, so its statistics are those of the
global batch (torch's SyncBatchNorm) whatever the mesh.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA, FSDP = "data", "fsdp"
BATCH_AXES = (DATA, FSDP)


def make_mesh(data: int = -1, fsdp: int = 1, devices: list[Any] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over all devices (``data=-1``: every device not used by ``fsdp``)."""
    devices = devices if devices is not None else jax.devices()
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ValueError(f"mesh: fsdp={fsdp} does not divide the {n} devices")
    if data == -1:
        data = n // fsdp
    if data < 1 or data * fsdp != n:
        raise ValueError(f"mesh: data={data} x fsdp={fsdp} = {data * fsdp}, but there are {n} devices")
    return jax.make_mesh(
        (data, fsdp), (DATA, FSDP), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over every device of the mesh."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp_size: int, min_size: int = 2**14) -> P:
    """Split the largest dimension divisible by ``fsdp_size`` over ``fsdp``; replicate small arrays."""
    if fsdp_size <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
        return P()
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
        if shape[dim] % fsdp_size == 0:
            spec: list[str | None] = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


def state_shardings(tree: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
    """NamedShardings for a pytree of arrays (params, optimizer state): FSDP by shape, scalars replicated.

    The rule depends on the shape only, so an optimizer moment gets its parameter's sharding.
    """
    fsdp_size = mesh.shape[FSDP]

    def one(leaf: Any) -> NamedSharding:
        return NamedSharding(mesh, fsdp_spec(tuple(np.shape(leaf)), fsdp_size, min_size))

    return jax.tree.map(one, tree)


def global_batch(mesh: Mesh, *local_arrays: Any) -> tuple[Any, ...]:
    """Global arrays, batch-sharded, from this process's slices (``make_array_from_process_local_data``);
    each argument may be a pytree of them (detection targets)."""
    sharding = batch_sharding(mesh)

    def one(a: Any) -> jax.Array:
        return jax.make_array_from_process_local_data(sharding, np.asarray(a))

    return tuple(jax.tree.map(one, a) for a in local_arrays)


def to_host(tree: Any) -> Any:
    """A pytree of (possibly sharded, multi-process) arrays as full numpy arrays on every process."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, jax.device_get(tree))
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_count: int | None = None,
) -> bool:
    """``jax.distributed.initialize`` when asked: arguments, or ``JAX_COORDINATOR_ADDRESS`` /
    ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` in the environment, or a cluster jax detects itself
    when ``MBV3_DISTRIBUTED=auto`` (SLURM, TPU pods, ...). CPU processes use gloo collectives.
    Must run before anything touches a device. Returns whether it initialised."""
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAX_COORDINATOR_ADDRESS")
    auto = env.get("MBV3_DISTRIBUTED", "").lower() == "auto"
    if not coordinator_address and not auto:
        return False
    if num_processes is None and env.get("JAX_NUM_PROCESSES"):
        num_processes = int(env["JAX_NUM_PROCESSES"])
    if process_id is None and env.get("JAX_PROCESS_ID"):
        process_id = int(env["JAX_PROCESS_ID"])
    if local_device_count:
        jax.config.update("jax_num_cpu_devices", int(local_device_count))
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if auto and not coordinator_address:
        jax.distributed.initialize()
    else:
        jax.distributed.initialize(
            coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
        )
    return True
