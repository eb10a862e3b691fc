"""The device mesh and how arrays are laid out on it: every sharding decision lives here.

Mesh axes (MaxText-style names):
  data:   pure data parallelism (params replicated across it),
  fsdp:   data parallelism whose params and optimizer state are sharded across it (ZeRO-3/FSDP),
  tensor: tensor parallelism inside a layer (heads, MLP, vocab).
The batch is split over data x fsdp. Parameters carry logical axis names (see `models/gpt_neo.py`);
`LOGICAL_RULES` maps them to mesh axes. A dimension that an axis does not divide stays replicated,
so tiny test models run on any mesh. ZeRO-3: every parameter is split over `fsdp`, by its `embed`
dimension, or where it has none (the MLP's c_fc bias) by its largest dimension that `fsdp` divides;
the optimizer moments take their parameter's sharding (`training/loop.state_shardings`). So with
fsdp = N each device holds 1/N of the params and of the Adam moments (a parameter whose every
dimension is indivisible by N, e.g. a 1-wide head, stays replicated).

Multi-host: `initialize_distributed` joins the processes; host code only ever reads gathered values
(`to_host`), and host values that every process holds in full become global arrays through
`global_from_host` / `global_batch` (never a plain `device_put` onto devices of other processes).
"""

import importlib
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


def _axis_names(axes) -> tuple[str, ...]:
  return (axes,) if isinstance(axes, str) else tuple(axes or ())


def _axes_size(axes, mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in _axis_names(axes)]))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes that do not divide their dimension (those dims stay replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = _axis_names(axes)
    fitted.append(axes if names and dim % _axes_size(axes, mesh) == 0 else None)
  return P(*fitted)


def _with_fsdp(spec: P, logical: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Adds `fsdp` to the largest dimension it divides when the rules left a parameter unsplit over
  it (ZeRO-3 shards every parameter); the scanned `layers` dimension is left alone, since the
  layer loop slices it."""
  fsdp = mesh.shape.get("fsdp", 1)
  axes = list(spec) + [None] * (len(shape) - len(spec))
  if fsdp == 1 or any("fsdp" in _axis_names(a) for a in axes):
    return spec
  names = tuple(logical) + (None,) * (len(shape) - len(logical))
  candidates = [i for i, dim in enumerate(shape)
                if names[i] != "layers" and dim % (_axes_size(axes[i], mesh) * fsdp) == 0]
  if not candidates:
    return spec
  i = max(candidates, key=lambda i: shape[i])
  axes[i] = _axis_names(axes[i]) + ("fsdp",) if axes[i] else "fsdp"
  return P(*axes)


def param_shardings(logical_specs: Any, shapes: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, Any]] = LOGICAL_RULES) -> Any:
  """NamedShardings for a parameter tree.

  Args:
    logical_specs: tree of PartitionSpecs of logical names (`gpt_neo.logical_axes(model)`).
    shapes: matching tree of arrays or ShapeDtypeStructs.
    mesh: the device mesh.
    rules: logical axis -> mesh axis.
  """
  def sharding_of(logical: P, x) -> NamedSharding:
    spec = _fit(nn.logical_to_mesh_axes(tuple(logical), rules), x.shape, mesh)
    return NamedSharding(mesh, _with_fsdp(spec, logical, x.shape, mesh))
  return jax.tree.map(sharding_of, logical_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded arrays or ShapeDtypeStructs (the largest shard of
  each leaf, from its real sharding; a leaf without one counts whole)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = tuple(leaf.shape)
    leaf_sharding = getattr(leaf, "sharding", None)
    if leaf_sharding is not None:
      shape = leaf_sharding.shard_shape(shape)
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def mesh_of(tree: Any) -> Mesh | None:
  """The mesh of the first leaf placed with a NamedSharding (None if none is)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(getattr(leaf, "sharding", None), NamedSharding):
      return leaf.sharding.mesh
  return None


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) dimension split over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def global_from_host(tree: Any, shardings: Any) -> Any:
  """Global arrays on `shardings` (a matching tree, or one sharding for all leaves) from host
  values that every process holds in full (a loaded HF checkpoint, fresh init params, prompts).

  Each process copies only the shards its own devices hold, so this works across processes,
  where `jax.device_put` of a host value onto other processes' devices does not.
  """
  if not isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x, s: global_from_host(x, s), tree, shardings)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, shardings, lambda index: x[index])
  return jax.tree.map(put, tree)


def batch_devices(mesh: Mesh) -> int:
  """How many ways a batch's rows are split: the size of data x fsdp."""
  return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def rows_sharding(mesh: Mesh, x: np.ndarray, global_rows: int) -> NamedSharding:
  """The one rule for a batch array: rows split over data x fsdp when they divide, else
  replicated (a batch smaller than the device count, or not a multiple of it, still runs: every
  device then computes all of it)."""
  if x.ndim and global_rows % batch_devices(mesh) == 0:
    return batch_sharding(mesh, x.ndim)
  return replicated(mesh)


def global_batch(batch: Any, mesh: Mesh) -> Any:
  """Host arrays that every process holds in full (e.g. the same prompts everywhere) as global
  arrays with rows split over data x fsdp, or replicated where that does not divide the rows.

  Generation and scoring then run data-parallel like training; read results with `to_host`.
  """
  def put(x):
    x = np.asarray(x)
    return global_from_host(x, rows_sharding(mesh, x, x.shape[0] if x.ndim else 0))
  return jax.tree.map(put, batch)


def shard_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Places a host-local batch (this process's rows) as global arrays split over data x fsdp.

  In one process, rows that data x fsdp does not divide are replicated (`rows_sharding`); across
  processes each holds only its own rows, so they must divide: a UserError says so.
  """
  def put(name, x):
    x = np.asarray(x)
    global_rows = x.shape[0] * jax.process_count() if x.ndim else 0
    sharding = rows_sharding(mesh, x, global_rows)
    if jax.process_count() == 1:
      return jax.device_put(x, sharding)
    if x.ndim and sharding.spec == replicated(mesh).spec:
      raise UserError(f"batch field {name!r}: {global_rows} rows over {jax.process_count()} "
                      f"processes cannot be split over the {batch_devices(mesh)} data x fsdp "
                      "devices; make --config.train.batch_size a multiple of that count")
    return jax.make_array_from_process_local_data(sharding, x)
  return {k: put(k, v) for k, v in batch.items()}


def _on_cloud_tpu_vm() -> bool:
  """Whether JAX found a Cloud TPU VM when it was imported (JAX's own flag; False if it moved)."""
  try:
    return bool(getattr(importlib.import_module("jax._src.cloud_tpu_init"),
                        "running_in_cloud_tpu_vm", False))
  except ImportError:
    return False


def _cluster_detected() -> bool:
  """True when the environment says this process is one of several (SLURM, TPU VM, MPI, env)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return True
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return True
  # A Cloud TPU VM: JAX reads the slice's workers from the metadata server (a single-host VM
  # simply becomes a job of one process).
  return _on_cloud_tpu_vm()


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Starts multi-host JAX (`jax.distributed.initialize`) when this run spans several processes.

  Explicit arguments win (e.g. the local launcher's 127.0.0.1:PORT); otherwise JAX's own cluster
  detection handles TPU pod slices, SLURM and MPI. A single process does nothing.
  SLURM with one process per node driving several GPUs: set JAX_LOCAL_DEVICE_IDS=0,1,...
  (`launch/slurm.sbatch` does), since JAX's SLURM detection gives each process one GPU.
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
