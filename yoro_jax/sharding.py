"""Device meshes and shardings: data parallel x FSDP, with JAX's own sharding machinery.

A mesh has two axes, ``("data", "fsdp")``. Batches are split over both (every device sees
different examples); parameters — frozen base weights, trainable nets and optimizer state
alike — are split FSDP-style over ``fsdp`` along their largest divisible dimension and
replicated over ``data``. ``jax.jit`` then inserts the all-gathers and reduce-scatters
(GSPMD): the model code stays free of sharding annotations.

Multi-host: call :func:`initialize_distributed` first (``jax.distributed.initialize``
reads the coordinator from the environment on managed clusters, or takes flags); each
process collates the same global batch and places its own devices' rows
(:func:`global_batch_to_mesh`), so every host pads to the same shapes. Files
that are not a sharded checkpoint (a converted base model, teacher data, exported nets,
logs) are written by process 0 alone (:func:`is_primary`) and read by every process
after a barrier (:func:`sync_processes`).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from yoro_jax.config import ConfigError

AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)  # leading (batch) dimension over every device


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """``data`` x ``fsdp`` devices; 1 x 1 means a single device and no sharding."""

    data: int = 1
    fsdp: int = 1

    @property
    def size(self) -> int:
        return self.data * self.fsdp

    def validate(self) -> MeshConfig:
        if self.data < 1 or self.fsdp < 1:
            raise ConfigError(f"mesh axes must be >= 1, got data={self.data} fsdp={self.fsdp}")
        available = jax.device_count()
        if self.size > available:
            raise ConfigError(
                f"mesh data={self.data} x fsdp={self.fsdp} needs {self.size} devices, "
                f"{available} are visible ({jax.devices()[0].platform}); on CPU, simulate "
                "more with XLA_FLAGS=--xla_force_host_platform_device_count=N"
            )
        return self


def make_mesh(config: MeshConfig) -> Mesh | None:
    """The ``(data, fsdp)`` mesh over the first data*fsdp devices; None for 1 x 1."""
    config.validate()
    if config.size == 1:
        return None
    devices = np.asarray(jax.devices()[: config.size]).reshape(config.data, config.fsdp)
    return Mesh(devices, AXES)


# Subtrees whose leaves are stacked decoder layers: their leading axis is the layer axis,
# which the block scans walk, so it is never sharded (each device holds every layer's
# slice of the weights, and the scan needs no gather to pick a layer).
LAYER_STACKS = ("layers", "compensation")


def param_spec(shape: tuple[int, ...], fsdp: int, layer_axis: bool = False) -> P:
    """Shard the largest dimension divisible by ``fsdp`` over it; replicate the rest.
    ``layer_axis``: dimension 0 is a stack of layers and stays whole."""
    if fsdp > 1:
        first = 1 if layer_axis else 0
        for dim in sorted(range(first, len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
                return P(*([None] * dim + ["fsdp"]))
    return P()


def _in_layer_stack(path: tuple[Any, ...]) -> bool:
    return any(getattr(key, "key", None) in LAYER_STACKS for key in path)


def param_shardings(tree: Any, mesh: Mesh) -> Any:
    """NamedShardings for a params-like pytree (params, optimizer state): FSDP over ``fsdp``."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda path, a: NamedSharding(
            mesh, param_spec(np.shape(a), fsdp, layer_axis=_in_layer_stack(path))
        ),
        tree,
    )


def batch_shardings(tree: Any, mesh: Mesh) -> Any:
    """Leading dimension over all devices; scalars replicated."""
    return jax.tree.map(lambda a: NamedSharding(mesh, BATCH_SPEC if np.ndim(a) else P()), tree)


def shard_params(tree: Any, mesh: Mesh | None) -> Any:
    return tree if mesh is None else jax.device_put(tree, param_shardings(tree, mesh))


def shard_batch(tree: Any, mesh: Mesh | None) -> Any:
    """Put a global batch on the mesh, split over all devices. Multi-host: every process
    passes the same global batch (so every host pads it to the same shapes) and places only
    the rows its own devices hold."""
    if mesh is None:
        return jax.tree.map(jax.numpy.asarray, tree)
    batch = jax.tree.leaves(tree)[0].shape[0]
    if batch % mesh.size:
        raise ValueError(f"batch of {batch} rows does not split over {mesh.size} devices")
    if jax.process_count() > 1:
        return global_batch_to_mesh(tree, mesh)
    return jax.device_put(tree, batch_shardings(tree, mesh))


def global_batch_to_mesh(tree: Any, mesh: Mesh) -> Any:
    """Multi-host: the global arrays of a batch every process holds whole; each process
    copies just the slices of its addressable devices."""

    def place(leaf: Any, sharding: NamedSharding) -> jax.Array:
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree.map(place, tree, batch_shardings(tree, mesh))


def is_primary() -> bool:
    """Whether this process writes the run's single-writer files (process 0)."""
    return jax.process_index() == 0


def sync_processes(name: str) -> None:
    """A barrier across processes (a no-op on one): what process 0 wrote before it is
    there for everyone after it."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x: Any) -> np.ndarray:
    """A whole array as numpy on this process. An array spanning other processes' devices
    (multi-host, on a mesh) is all-gathered: every process must make the same call."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def gather_to_host(tree: Any) -> Any:
    """:func:`to_host` on every leaf."""
    return jax.tree.map(to_host, tree)


def initialize_distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> None:
    """``jax.distributed.initialize`` from flags or the environment (no-op on one process).

    On SLURM / TPU / Kubernetes-style launchers JAX finds everything itself; elsewhere set
    ``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (or pass them).
    """
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
        num_processes = int(os.environ["JAX_NUM_PROCESSES"])
    if process_id is None and os.environ.get("JAX_PROCESS_ID"):
        process_id = int(os.environ["JAX_PROCESS_ID"])
    if coordinator is None and num_processes is None:
        return
    jax.distributed.initialize(coordinator, num_processes, process_id)
