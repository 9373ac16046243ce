"""JAX's persistent compilation cache for the project's launch commands and benchmarks.

Compiling the full-size EDM train step takes about a minute on a CPU host (the sampler and the evaluator
several seconds more); with the cache on, a second run of the same program (same shapes, shardings, jax
version, backend and XLA flags) loads the executable from disk instead.

  from ddo_jax import compile_cache
  compile_cache.enable()            # before the first jit compiles

Where the cache lives, first match wins:

* `enable(cache_dir)` with a path: that folder; `enable('off')` or `enable('')`: no cache;
* the environment variable `DDO_JAX_COMPILE_CACHE`: a folder, or `off` / empty to turn it off;
* `$XDG_CACHE_HOME/ddo_jax/jax_cache` (default `~/.cache/ddo_jax/jax_cache`).

`release_compile_memory()` returns the heap the compiler freed to the OS (call it after compiling).

Only programs that took at least `min_compile_time_secs` (1 s by default) to compile are written, so the
many small jits of a run do not fill the folder. Multi-host runs may point every host at one shared
folder. The cache key covers the program, the devices, jax/jaxlib versions and the XLA flags, so a stale
entry is never used for a different program; delete the folder to reclaim the space.
"""
import logging
import os
from typing import Optional

ENV_VAR = "DDO_JAX_COMPILE_CACHE"
FLAG_HELP = ("persistent XLA compilation cache folder, or 'off'; default: $DDO_JAX_COMPILE_CACHE, else "
             "~/.cache/ddo_jax/jax_cache (a repeated or resumed run then loads its programs instead of compiling)")
OFF = ("", "off", "none", "0", "false", "no")

_log = logging.getLogger(__name__)


def default_dir() -> str:
  """`$XDG_CACHE_HOME/ddo_jax/jax_cache`, or `~/.cache/ddo_jax/jax_cache`."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "ddo_jax", "jax_cache")


def resolve(cache_dir: Optional[str] = None) -> Optional[str]:
  """The folder `enable(cache_dir)` would use, or None for 'no cache' (see the module docstring)."""
  if cache_dir is None:
    cache_dir = os.environ.get(ENV_VAR)
    if cache_dir is None:
      return default_dir()
  if cache_dir.strip().lower() in OFF:
    return None
  return os.path.abspath(os.path.expanduser(cache_dir))


def enable(cache_dir: Optional[str] = None, *, min_compile_time_secs: float = 1.0) -> Optional[str]:
  """Turn on JAX's persistent compilation cache; returns the folder, or None when it is turned off.

  Call it before the first compilation of the process (later calls move the cache to the new folder
  for the compilations that follow). Turning it off here also turns off a cache that an earlier call or
  `JAX_COMPILATION_CACHE_DIR` turned on.
  """
  import jax

  path = resolve(cache_dir)
  if path is None:
    if jax.config.jax_compilation_cache_dir is not None:   # only undo a cache that is on
      jax.config.update("jax_compilation_cache_dir", None)
      _reset()
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_enable_compilation_cache", True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  _reset()
  _log.debug("persistent compilation cache: %s", path)
  return path


def release_compile_memory() -> bool:
  """Hand the heap memory that XLA's compiler freed back to the OS (glibc `malloc_trim`); True if done.

  Compiling (or loading from the cache) the full-size EDM step leaves ~0.4-0.5 GiB of freed but still
  resident heap in the process; the step's own buffers are large allocations that do not reuse it, so it
  adds to the peak RSS. Call after the first compilations (before allocating the train state); harmless
  to call again. No-op where the C library has no malloc_trim (non-glibc platforms).
  """
  import ctypes
  import ctypes.util
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    return bool(libc.malloc_trim(0))
  except (OSError, AttributeError):
    return False


def _reset() -> None:
  """Make JAX re-read the cache folder at its next compilation (it reads it once, at the first)."""
  quiet = logging.getLogger("jax._src.compilation_cache")   # it logs "Resetting cache" at INFO
  level = quiet.level
  quiet.setLevel(logging.WARNING)
  try:
    from jax._src import compilation_cache as cc
    cc.reset_cache()
  except Exception:  # pragma: no cover - private API; the config update alone works before any compile
    pass
  finally:
    quiet.setLevel(level)
