"""The device mesh and how arrays are laid out on it: every sharding decision lives here.

Mesh axes (MaxText-style names):
  data:   pure data parallelism (params replicated across it),
  fsdp:   data parallelism whose params and optimizer state are sharded across it (ZeRO-3/FSDP),
  tensor: tensor parallelism inside a layer (heads, MLP, vocab).
The batch is split over data x fsdp. Parameters carry logical axis names (see `models/gpt_neo.py`);
`LOGICAL_RULES` maps them to mesh axes. A dimension that an axis does not divide stays replicated,
so tiny test models run on any mesh.
"""

import os
from typing import Any, Sequence

from absl import logging

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from rlhf_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Logical parameter axis -> mesh axis.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 to take what is left."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise UserError(f"mesh: at most one of data/fsdp/tensor may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if any(s == 0 or s < -1 for s in sizes) or len(devices) % known:
    raise UserError(f"mesh: data={data} fsdp={fsdp} tensor={tensor} does not fit "
                    f"{len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise UserError(f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are "
                    f"{len(devices)} devices")
  # Auto axes: jit propagates shardings from the annotated params and batch (the classic model).
  return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def mesh_from_config(mesh_config) -> Mesh:
  """The mesh described by a config's `mesh` section (fields data, fsdp, tensor)."""
  return make_mesh(mesh_config.data, mesh_config.fsdp, mesh_config.tensor)


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (those dims stay replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    size = int(np.prod([mesh.shape[a] for a in names])) if names else 1
    fitted.append(axes if names and dim % size == 0 else None)
  return P(*fitted)


def param_shardings(logical_specs: Any, shapes: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for a parameter tree.

  Args:
    logical_specs: tree of PartitionSpecs of logical names (`gpt_neo.logical_axes(model)`).
    shapes: matching tree of arrays or ShapeDtypeStructs.
    mesh: the device mesh.
  """
  mesh_specs = nn.logical_to_mesh(logical_specs, rules)
  return jax.tree.map(lambda spec, x: NamedSharding(mesh, _fit(spec, x.shape, mesh)),
                      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host-local batch (this process's rows) as global arrays split over data x fsdp."""
  def put(x):
    x = np.asarray(x)
    sharding = batch_sharding(mesh, x.ndim)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: put(v) for k, v in batch.items()}


def _cluster_detected() -> bool:
  """True when the environment says this process is one of several (SLURM, TPU pod, MPI, env)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  return "," in env.get("TPU_WORKER_HOSTNAMES", "")


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-host JAX (`jax.distributed.initialize`) when this run spans several processes.

  Explicit arguments win (e.g. the local launcher's 127.0.0.1:PORT); otherwise JAX's own cluster
  detection handles TPU pod slices, SLURM and MPI. A single process does nothing.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise UserError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info("Process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def to_host(tree: Any) -> Any:
  """Whole arrays as NumPy on every process (gathering shards from other hosts when needed)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)
  return jax.tree.map(np.asarray, jax.device_get(tree))
