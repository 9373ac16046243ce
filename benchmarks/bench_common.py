"""Helpers shared by the benchmark scripts: logging to stderr, memory and cost figures of compiled programs."""
import resource
import sys


def log(*a):
  print(*a, file=sys.stderr, flush=True)


def mib(n) -> float:
  return round(n / 2 ** 20, 1)


def rss_mib() -> float:
  """Peak resident set size of this process so far (ru_maxrss), MiB."""
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def rss_now_mib() -> float:
  """Current resident set size (VmRSS), MiB; 0 where /proc is missing."""
  try:
    for line in open("/proc/self/status"):
      if line.startswith("VmRSS:"):
        return round(int(line.split()[1]) / 1024)
  except OSError:
    pass
  return 0


def buffers(compiled) -> dict:
  """XLA's buffer sizes of a compiled program (arguments, outputs, temporaries, aliased), MiB."""
  try:
    m = compiled.memory_analysis()
    return dict(args_mib=mib(m.argument_size_in_bytes), out_mib=mib(m.output_size_in_bytes),
                temp_mib=mib(m.temp_size_in_bytes), alias_mib=mib(m.alias_size_in_bytes))
  except Exception as e:  # some backends do not implement it
    return dict(error=type(e).__name__)


def flops(compiled) -> float:
  """XLA's cost-analysis FLOPs of a compiled program (0 where unavailable)."""
  try:
    ca = compiled.cost_analysis()
    if isinstance(ca, (list, tuple)):
      ca = ca[0] if ca else {}
    return float(ca.get("flops", 0.0) or 0.0)
  except Exception:
    return 0.0


def device_stats(dev) -> dict:
  try:
    return dev.memory_stats() or {}
  except Exception:
    return {}


def median(v):
  v = sorted(v)
  n = len(v)
  return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def tree_bytes(tree) -> int:
  """Bytes of a pytree's arrays or ShapeDtypeStructs (PRNG keys count 0)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  def nbytes(x):
    try:
      return int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
    except TypeError:
      return 0
  return int(sum(nbytes(x) for x in jax.tree_util.tree_leaves(tree)))
