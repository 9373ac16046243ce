"""Device mesh, sharding rules, global batches and the multi-process (multi-host) runtime.

The train step runs as one `jax.jit` over a `jax.sharding.Mesh` with two axes:

* `data`: the batch is split over it (pure data parallelism).
* `fsdp`: the batch is split over it too, and parameters matched by an `fsdp` rule are sharded over it
  along their largest divisible dimension (ZeRO-3 style), so large models fit.

`config.mesh.data = -1` means "all devices not used by fsdp". Parameters are replicated unless a rule
says otherwise. Rules are (regex on the '/'-joined parameter path, strategy) pairs, first match wins;
strategies are 'replicate' and 'fsdp'.
"""
import atexit
import re
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A ('data', 'fsdp') mesh over `devices` (default: all devices of all processes, grouped by process so
  that each process's devices hold one contiguous block of the batch, in process order; `global_batch`
  relies on it)."""
  if devices is None:
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  devices = list(devices)
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
    _check_process_rows(sharding, global_shape[0], x.shape[0])
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree_util.tree_map(one, local)


_checked_rows = set()


def _check_process_rows(sharding, rows: int, local_rows: int) -> None:
  """Raise unless this process's devices hold rows [p*b, (p+1)*b) of a batch-sharded [rows, ...] array
  (what the data pipeline reads for process p); checked once per mesh and batch size."""
  key = (sharding.mesh, rows, local_rows)
  if key in _checked_rows:
    return
  p = jax.process_index()
  held = set()
  for device, index in sharding.devices_indices_map((rows,)).items():
    if device.process_index == p:
      held.update(range(*index[0].indices(rows)))
  if held != set(range(p * local_rows, (p + 1) * local_rows)):
    raise ValueError(f"process {p}'s devices hold batch rows {sorted(held)[:3]}... of {rows}, not the block "
                     f"[{p * local_rows}, {(p + 1) * local_rows}) it reads; build the mesh with make_mesh() "
                     "(devices grouped by process)")
  _checked_rows.add(key)


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


def cpu_lockstep() -> bool:
  """True on CPU devices when there are several (in one process or across processes). There, XLA's CPU
  runtime can deadlock when programs with collectives are dispatched ahead of their execution: seen here
  across processes (gloo; a toy run that synchronised every 100 steps hung at its first steps, one that
  synchronised every step never did) and in one process with 4 virtual devices on a loaded 2-core machine
  (an online-negatives run whose in-process all-gather waited 40 s for its 4th participant and aborted).
  The driver then waits for each step before dispatching the next. Accelerators keep asynchronous dispatch."""
  return jax.device_count() > 1 and jax.devices()[0].platform == "cpu"


def tree_size(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))


def barrier(name: str) -> None:
  """Wait until every process gets here (no-op on one process); used after process 0 writes files."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


# Environment variables of a multi-process launch (see maybe_initialize_distributed).
EXPLICIT_ENV = "DDO_JAX_DISTRIBUTED"   # '1': initialise and let JAX detect the cluster (launch/tpu_pod.sh)
HEARTBEAT_ENV = "DDO_JAX_HEARTBEAT_TIMEOUT"
DEFAULT_HEARTBEAT_S = 100   # JAX's own default
_exit_code_on_failure = None   # set by fail_fast; read by the atexit hook of maybe_initialize_distributed


def is_multiprocess_launch(env=None) -> bool:
  """Whether the environment says this process is one of several (before jax.distributed is initialised)."""
  import os  # pylint: disable=import-outside-toplevel
  env = os.environ if env is None else env

  def count(name):
    try:
      return int(env.get(name, "1") or "1")
    except ValueError:
      return 1

  return (env.get(EXPLICIT_ENV, "") == "1"
          or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
          or count("SLURM_NTASKS") > 1
          or count("OMPI_COMM_WORLD_SIZE") > 1
          or "JAX_COORDINATOR_ADDRESS" in env)


def maybe_initialize_distributed() -> bool:
  """Call jax.distributed.initialize() when launched as one of several processes; True if it did.

  Multi-process launches are recognised by the variables their launchers set:

  * DDO_JAX_DISTRIBUTED=1: initialise, and let JAX find the cluster itself (launch/tpu_pod.sh sets it:
    a Cloud TPU VM pod slice is found through the TPU metadata server, not through the environment);
  * TPU_WORKER_HOSTNAMES with several hosts (TPU pod slices on GKE);
  * SLURM_NTASKS > 1 (launch/slurm_gpu.sbatch; JAX reads the coordinator, count and id from SLURM);
  * OMPI_COMM_WORLD_SIZE > 1 (Open MPI's mpirun);
  * JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and JAX_PROCESS_ID (launch/local_multiprocess.py, or
    any launcher that sets them). JAX itself reads only the address from the environment; the count and
    id are passed here.

  Whatever is not given is left to JAX's cluster detection (TPU metadata, SLURM, Open MPI, Kubernetes).

  A process that stops sending heartbeats (killed, crashed, its host gone) is declared dead by the
  coordinator after DDO_JAX_HEARTBEAT_TIMEOUT seconds (default 100, JAX's), and then every other process
  is terminated by JAX with an error instead of waiting forever on a collective; most deaths are seen
  sooner, by the next collective failing (see `fail_fast`). On CPU, cross-process collectives use gloo
  over TCP. Must run before any other JAX call.
  """
  import os  # pylint: disable=import-outside-toplevel
  env = os.environ
  if not is_multiprocess_launch(env) or jax.distributed.is_initialized():
    return False
  kwargs = {"heartbeat_timeout_seconds": int(env.get(HEARTBEAT_ENV, DEFAULT_HEARTBEAT_S))}
  if "JAX_NUM_PROCESSES" in env:
    kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
  if "JAX_PROCESS_ID" in env:
    kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
  if "cpu" in env.get("JAX_PLATFORMS", "").split(","):
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(**kwargs)
  atexit.register(_exit_now_after_failure)   # runs before JAX's own exit hook (atexit is last-in, first-out)
  return True


def fail_fast(exc: BaseException) -> None:
  """Called with the exception that ends this process of a multi-process run (no-op on one process).

  A process that ends normally waits at exit (jax.distributed.shutdown) until every process gets there, up
  to 5 minutes; one that fails must not: the others would wait for it on their next collective while it
  waits for them. After this call the process exits at interpreter exit without that shutdown, so its
  peers see it gone at once (their next collective fails, which brings them here too) or, at the latest,
  after the heartbeat timeout. The exit code is kept: 2 for a user error, the SystemExit code, 130 for an
  interrupt, 1 otherwise.
  """
  global _exit_code_on_failure
  if jax.process_count() == 1 or not jax.distributed.is_initialized():
    return
  from ddo_jax import cli  # pylint: disable=import-outside-toplevel
  if isinstance(exc, SystemExit):
    code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
  elif isinstance(exc, cli.UserError):
    code = cli.EXIT_USER_ERROR
  elif isinstance(exc, KeyboardInterrupt):
    code = 130
  else:
    code = 1
  if code == 0:
    return
  _exit_code_on_failure = code
  first = (str(exc).strip().splitlines() or [""])[0][:300]
  what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
  if isinstance(exc, jax.errors.JaxRuntimeError):
    why = ("a computation failed; when it names a collective (Gloo, NCCL, a barrier, a heartbeat), another "
           "process has probably died: look at its output first")
  else:
    why = "this process failed; the others stop at their next collective or after the heartbeat timeout"
  import logging  # pylint: disable=import-outside-toplevel
  logging.getLogger("ddo_jax").error("process %d of %d stops (%s): %s. Rerun the same command on every "
                                     "process to resume.", jax.process_index(), jax.process_count(), what, why)


def _exit_now_after_failure() -> None:
  if _exit_code_on_failure is None:
    return
  import logging  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  logging.shutdown()
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except Exception:  # pylint: disable=broad-except
      pass
  os._exit(_exit_code_on_failure)  # pylint: disable=protected-access (skip the shutdown barrier on purpose)
