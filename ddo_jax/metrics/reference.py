"""What a reference file gives an evaluation: FID statistics, precision/recall features, or images.

* EDM `.npz` (`mu`, `sigma`), OpenAI reference batch `.npz` (`mu`, `sigma`, `arr_0` images for
  precision/recall), an `.npz` written by `launch.evaluate --make_ref` (`mu`, `sigma`, optional
  `features`), or EDM2 `.pkl` (`fid.mu`, `fid.sigma`; no precision/recall).
* Precision/recall use the reference's `features` when present, else the features of its `arr_0`
  images (to compute; 10k images for the ImageNet references). An `.npz` with images but no
  `mu`/`sigma` (e.g. another sample batch) gets its statistics computed too.

`parse_metrics('auto', ref)` is fid and is, plus pr when the reference holds `features` or `arr_0`.
Problems with the file or the metric list are `ddo_jax.cli.UserError`s naming the flag.
"""
import os
from typing import List, NamedTuple, Optional

import numpy as np

from ddo_jax import cli
from ddo_jax.data import images as images_lib
from ddo_jax.metrics import reference_stats

METRIC_NAMES = ("fid", "is", "pr")
REF_FIX = ("give EDM's or OpenAI's reference .npz, an EDM2 .pkl, or make one with "
           "`python -m launch.evaluate --make_ref --images DATASET --out ref.npz`")


class Reference(NamedTuple):
  stats: Optional[tuple]  # (mu, sigma) or None
  features: Optional[np.ndarray]  # [K, 2048] or None
  images: Optional[images_lib.ImageSource]  # reference images to compute the missing parts from


def _npz_members(path: str, where: str) -> List[str]:
  try:
    with np.load(path, allow_pickle=False) as f:
      return list(f.files)
  except (OSError, ValueError) as e:
    raise cli.UserError(f"{path} is not a readable .npz ({e})", where, REF_FIX) from e


def read_reference(path: str, want_stats: bool, want_features: bool, where: str = "--ref") -> Reference:
  """Reads what the reference file holds of statistics, features and images."""
  if not os.path.exists(path):
    raise cli.UserError(f"{path} does not exist", where, REF_FIX)
  if os.path.isdir(path):
    raise cli.UserError(f"{path} is a folder", where, REF_FIX)
  if path.lower().endswith(".pkl"):
    if want_features:
      raise cli.UserError(f"{path}: an EDM2 .pkl holds no features or images for precision/recall", where,
                          "leave pr out (--metrics fid,is) or give a reference .npz with features or arr_0")
    try:
      return Reference(reference_stats.load_reference_stats(path, "fid"), None, None)
    except (KeyError, ValueError) as e:
      raise cli.UserError(f"{path}: {e}", where, REF_FIX) from e
  files = _npz_members(path, where)
  stats = reference_stats.load_edm_npz(path) if {"mu", "sigma"} <= set(files) else None
  features = None
  if want_features and "features" in files:
    with np.load(path, allow_pickle=False) as f:
      features = np.asarray(f["features"], np.float32)
  images = None
  if (want_stats and stats is None) or (want_features and features is None):
    if "arr_0" not in files:
      missing = "mu/sigma" if want_stats and stats is None else "features"
      raise cli.UserError(f"{path}: has no {missing} and no 'arr_0' images to compute them from "
                          f"(members: {files})", where, REF_FIX)
    images = images_lib.npz_source(path, "arr_0", where)
  return Reference(stats, features, images)


def reference_auto_pr(path: Optional[str]) -> bool:
  """Whether `--metrics auto` includes precision/recall for this reference."""
  if path is None or path.lower().endswith(".pkl") or not os.path.isfile(path):
    return False
  files = _npz_members(path, "--ref")
  return "features" in files or "arr_0" in files


def parse_metrics(spec: str, ref: Optional[str]) -> List[str]:
  """The metrics to compute from `--metrics` (see the module docstring)."""
  if spec == "auto":
    names = ["is"] + (["fid"] if ref else []) + (["pr"] if reference_auto_pr(ref) else [])
  else:
    names = [m.strip() for m in spec.split(",") if m.strip()]
  bad = [m for m in names if m not in METRIC_NAMES]
  if bad or not names:
    raise cli.UserError(f"unknown metrics {bad}" if bad else "no metric named", "--metrics",
                        f"give a comma list of {', '.join(METRIC_NAMES)}, or auto")
  if ref is None and ({"fid", "pr"} & set(names)):
    raise cli.UserError("fid and pr need reference statistics", "--ref",
                        "pass --ref REF.npz (or ask only for --metrics is)")
  return names
