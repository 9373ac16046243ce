"""Reading FID reference statistics (EDM, OpenAI, EDM2) and writing EDM-compatible npz files.

Formats:

* EDM (`NVlabs/edm fid.py ref`, e.g. `fid-refs/cifar10-32x32.npz`): `np.savez(path, mu=mu,
  sigma=sigma)`: `mu` [2048], `sigma` [2048, 2048], float64 pool3 statistics.
* OpenAI guided-diffusion reference batches (`VIRTUAL_imagenet{64,128,256,512}*.npz`,
  `evaluations/README.md`):
    - `arr_0`: uint8 [N, H, W, 3] images (10k for the ImageNet refs), used for precision/recall
      and recomputing activations;
    - `mu`, `sigma`: pool3 statistics of the full reference set;
    - `mu_s`, `sigma_s`: statistics of the spatial features `mixed_6/conv:0[..., :7]` (sFID).
  Sample batches written by the samplers use the same container with only `arr_0` (and `arr_1`
  labels when class-conditional). npz members are read lazily, so asking for `mu`/`sigma` does
  not decompress `arr_0`.
* EDM2 (`NVlabs/edm2 calculate_metrics.py ref`, `dataset-refs/img512.pkl`): a plain `pickle.dump`
  of `dict(num_images=N, fid=dict(mu=..., sigma=...), fd_dinov2=dict(mu=..., sigma=...))` whose
  arrays are numpy (`mu.cpu().numpy()`), so no torch object is involved. It is read with
  `ddo_jax.convert.torch_pickle.restricted_loads` (allowlist unpickler; numpy arrays, dicts and
  `dnnlib.util.EasyDict` only, nothing from the file is executed). EDM2 also accepts EDM `.npz`
  as `{'fid': ...}`; `load_reference_stats` does the same.
"""
import os
from typing import Any, Dict, NamedTuple, Optional, Tuple

import numpy as np

from ddo_jax.convert import torch_pickle


class OpenAIReference(NamedTuple):
  """Contents of an OpenAI evaluator reference batch (fields absent from the file are None)."""
  mu: Optional[np.ndarray]
  sigma: Optional[np.ndarray]
  mu_s: Optional[np.ndarray]
  sigma_s: Optional[np.ndarray]
  images: Optional[np.ndarray]


def _load_npz_members(path, keys):
  with np.load(path, allow_pickle=False) as f:
    return {k: (f[k] if k in f.files else None) for k in keys}, list(f.files)


def load_edm_npz(path) -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) as float64 from an EDM reference `.npz` (keys `mu`, `sigma`)."""
  members, files = _load_npz_members(path, ("mu", "sigma"))
  if members["mu"] is None or members["sigma"] is None:
    raise KeyError(f"{path}: expected keys 'mu' and 'sigma', found {files}")
  return _checked(members["mu"], members["sigma"], path)


def load_openai_npz(path, load_images: bool = False) -> OpenAIReference:
  """Reads an OpenAI evaluator `.npz` (keys `arr_0`, `mu`, `sigma`, `mu_s`, `sigma_s`).

  Args:
    path: file path.
    load_images: also read `arr_0` (uint8 NHWC images; several GB for the ImageNet refs).

  Returns:
    `OpenAIReference`; statistics in float64, missing members as None.
  """
  keys = ("mu", "sigma", "mu_s", "sigma_s") + (("arr_0",) if load_images else ())
  m, _ = _load_npz_members(path, keys)
  as64 = lambda a: None if a is None else np.asarray(a, np.float64)
  return OpenAIReference(as64(m["mu"]), as64(m["sigma"]), as64(m["mu_s"]), as64(m["sigma_s"]),
                         m.get("arr_0"))


def load_openai_images(path) -> np.ndarray:
  """`arr_0` of an OpenAI-style sample or reference batch: uint8 [N, H, W, 3]."""
  m, files = _load_npz_members(path, ("arr_0",))
  if m["arr_0"] is None:
    raise KeyError(f"{path}: no 'arr_0' (found {files})")
  return m["arr_0"]


def load_edm2_pkl(path) -> Dict[str, Any]:
  """The dict of an EDM2 statistics `.pkl`: `{'num_images': N, 'fid': {'mu', 'sigma'}, ...}`.

  Read with `ddo_jax.convert.torch_pickle.restricted_loads`: an allowlist unpickler whose numpy
  and container globals are inert replacements, so no code from the file can run; any other
  global raises `torch_pickle.ForbiddenGlobalError` (a `pickle.UnpicklingError`).
  """
  path = os.fspath(path)
  with open(path, "rb") as f:
    data = torch_pickle.restricted_loads(f.read(), source=path)
  if not isinstance(data, dict):
    raise ValueError(f"{path}: expected a dict of statistics, got {type(data).__name__}")
  return data


def load_reference_stats(path, metric: str = "fid") -> Tuple[np.ndarray, np.ndarray]:
  """(mu, sigma) float64 for `metric` from any supported reference file.

  `.npz`: EDM or OpenAI (both have top-level `mu`, `sigma`; `metric` must be 'fid', or 'sfid' for
  OpenAI's `mu_s`/`sigma_s`). `.pkl`: EDM2 (`metric` is a key such as 'fid' or 'fd_dinov2').
  """
  path = os.fspath(path)
  if path.lower().endswith(".pkl"):
    data = load_edm2_pkl(path)
    if metric not in data:
      raise KeyError(f"{path}: no statistics for {metric!r}; has {sorted(data)}")
    return _checked(data[metric]["mu"], data[metric]["sigma"], path)
  if metric == "fid":
    return load_edm_npz(path)
  if metric == "sfid":
    ref = load_openai_npz(path)
    if ref.mu_s is None or ref.sigma_s is None:
      raise KeyError(f"{path}: no 'mu_s'/'sigma_s'")
    return _checked(ref.mu_s, ref.sigma_s, path)
  raise KeyError(f"{path}: an npz holds 'fid' (and OpenAI's 'sfid') statistics, not {metric!r}")


def _checked(mu, sigma, path) -> Tuple[np.ndarray, np.ndarray]:
  mu = np.asarray(mu, np.float64)
  sigma = np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
    raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not [D] and [D, D]")
  return mu, sigma


def save_stats_npz(path, mu, sigma, **extra) -> None:
  """Writes an EDM-compatible `.npz` (`mu`, `sigma`, float64, plus `extra` arrays) atomically.

  `ddo_jax.utils.atomic_savez`: a temporary file in the same folder, flushed and fsync'ed, then moved
  over `path` with `os.replace`, so readers never see a partial file.
  """
  from ddo_jax import utils  # pylint: disable=import-outside-toplevel
  path = os.fspath(path)
  mu, sigma = _checked(mu, sigma, path)
  utils.atomic_savez(path, mu=mu, sigma=sigma, **{k: np.asarray(v) for k, v in extra.items()})
