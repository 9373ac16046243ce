"""Device mesh, sharding rules and global batches.

The train step runs as one `jax.jit` over a `jax.sharding.Mesh` with two axes:

* `data`: the batch is split over it (pure data parallelism).
* `fsdp`: the batch is split over it too, and parameters matched by an `fsdp` rule are sharded over it
  along their largest divisible dimension (ZeRO-3 style), so large models fit.

`config.mesh.data = -1` means "all devices not used by fsdp". Parameters are replicated unless a rule
says otherwise. Rules are (regex on the '/'-joined parameter path, strategy) pairs, first match wins;
strategies are 'replicate' and 'fsdp'.
"""
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be >= 1 and divide the device count {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must equal the device count {n} "
                     "(use mesh.data=-1 to take all remaining devices)")
  grid = np.asarray(devices, dtype=object).reshape(data, fsdp)
  return Mesh(grid, BATCH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over both mesh axes."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _path_str(path) -> str:
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def _fsdp_spec(shape, fsdp_size: int) -> P:
  """Shard the largest dimension divisible by the fsdp size; replicate if none is."""
  if fsdp_size == 1:
    return P()
  dims = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in dims:
    if shape[d] % fsdp_size == 0 and shape[d] >= fsdp_size:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def param_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = ()) -> Any:
  """NamedShardings for a pytree of arrays (or ShapeDtypeStructs) by regex rules on the path."""
  fsdp_size = mesh.shape["fsdp"]
  compiled = [(re.compile(pattern), strategy) for pattern, strategy in rules]
  for _, strategy in compiled:
    if strategy not in ("replicate", "fsdp"):
      raise ValueError(f"unknown sharding strategy {strategy!r}; use 'replicate' or 'fsdp'")

  def one(path, leaf):
    name = _path_str(path)
    strategy = "replicate"
    for pattern, s in compiled:
      if pattern.search(name):
        strategy = s
        break
    shape = getattr(leaf, "shape", ())
    spec = _fsdp_spec(shape, fsdp_size) if strategy == "fsdp" else P()
    return NamedSharding(mesh, spec)

  return jax.tree_util.tree_map_with_path(one, tree)


def global_batch(local: Any, mesh: Mesh) -> Any:
  """Assemble a global batch-sharded jax.Array from this process's slice of the global batch.

  `local` holds rows [process_index * b, (process_index + 1) * b) of the global batch, with b the
  per-process batch size. On one process this is a plain sharded device_put.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(local, sharding)

  def one(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map(one, local)


def to_host(x: Any) -> Any:
  """Fetch a (possibly sharded, possibly multi-process) pytree to host numpy."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    x = multihost_utils.process_allgather(x, tiled=True)
  return jax.tree_util.tree_map(np.asarray, x)


def check_batch_divisible(batch_size: int, mesh: Mesh, what: str = "batch size") -> None:
  n = mesh.shape["data"] * mesh.shape["fsdp"]
  if batch_size % n:
    raise ValueError(f"{what} {batch_size} must be divisible by the number of batch shards {n} "
                     f"(mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']})")
  if batch_size % jax.process_count():
    raise ValueError(f"{what} {batch_size} must be divisible by the process count {jax.process_count()}")


def tree_size(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def barrier(name: str) -> None:
  """Wait until every process gets here (no-op on one process); used after process 0 writes files."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def maybe_initialize_distributed() -> None:
  """Call jax.distributed.initialize() when launched as one of several processes.

  Multi-process launches are recognised by the variables their launchers set: TPU pod slices
  (TPU_WORKER_HOSTNAMES with several hosts), SLURM (SLURM_NTASKS > 1), Open MPI (OMPI_COMM_WORLD_SIZE > 1),
  or an explicit JAX_COORDINATOR_ADDRESS (then JAX_NUM_PROCESSES and JAX_PROCESS_ID are read by JAX).
  Must run before any other JAX call.
  """
  import os
  env = os.environ
  multi = (len(env.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1
           or int(env.get("SLURM_NTASKS", "1")) > 1
           or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
           or "JAX_COORDINATOR_ADDRESS" in env)
  if multi:
    jax.distributed.initialize()
