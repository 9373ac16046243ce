"""Regenerating golden weights stored only as a rule (goldens README, "Weight randomization").

key  = (seed * 0x9E3779B97F4A7C15) mod 2^64
x_i  = fmix64((i + key) mod 2^64)             i = flat C-order index
u_i  = (x_i >> 11) * 2^-53                     exact float64 in [0, 1)
w_i  = offset + scale * (2 u_i - 1)            float64, then grid 'f32' (cast) or 'f16' (round to
                                               float16, widen to float32)
"""
import hashlib
from typing import Mapping

import numpy as np

_GOLDEN = 0x9E3779B97F4A7C15
_M1 = np.uint64(0xFF51AFD7ED558CCD)
_M2 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S11 = np.uint64(11)


def fmix64(x: np.ndarray) -> np.ndarray:
  """MurmurHash3's 64-bit finalizer on a uint64 array (wrapping arithmetic)."""
  x = x.copy()
  with np.errstate(over="ignore"):
    x ^= x >> _S33
    x *= _M1
    x ^= x >> _S33
    x *= _M2
    x ^= x >> _S33
  return x


def hash_uniform(seed: int, shape, scale: float, offset: float, grid: str = "f32") -> np.ndarray:
  """The golden tensor for one (seed, shape, scale, offset, grid) entry, as float32."""
  n = int(np.prod(shape, dtype=np.int64))
  key = np.uint64((int(seed) * _GOLDEN) % (1 << 64))
  with np.errstate(over="ignore"):
    x = np.arange(n, dtype=np.uint64) + key
  u = (fmix64(x) >> _S11).astype(np.float64) * 2.0**-53
  w = offset + scale * (2.0 * u - 1.0)
  if grid == "f16":
    w = w.astype(np.float16).astype(np.float32)
  elif grid == "f32":
    w = w.astype(np.float32)
  else:
    raise ValueError(f"unknown grid {grid!r}")
  return w.reshape(shape)


def sha256_float32(arr: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(arr, dtype="<f4").tobytes()).hexdigest()


def regenerate_state_dict(tensors, check: bool = True) -> Mapping[str, np.ndarray]:
  """State dict from a config.json `weights.tensors` list; checks each sha256 when `check`."""
  out = {}
  bad = []
  for t in tensors:
    if t.get("rule") == "zero":
      out[t["key"]] = np.zeros(t["shape"], dtype=t["dtype"])
      continue
    w = hash_uniform(t["seed"], tuple(t["shape"]), t["scale"], t["offset"], t["grid"])
    if check and sha256_float32(w) != t["sha256_float32"]:
      bad.append(t["key"])
    out[t["key"]] = w
  if bad:
    raise AssertionError(f"regenerated weights fail their sha256 check: {bad}")
  return out
