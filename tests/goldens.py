"""Locating the PyTorch goldens in ../shared/goldens (or $DDO_JAX_GOLDENS).

When DDO_JAX_GOLDENS is set (as CI does) a missing file is a failure; when it is unset and the default
folder is absent, the parity test is skipped with a message saying how to point at the goldens.
"""
import json
import os
import pathlib

import numpy as np
import pytest

_DEFAULT = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "goldens"


def golden_path(*parts) -> pathlib.Path:
  env = os.environ.get("DDO_JAX_GOLDENS")
  root = pathlib.Path(env) if env else _DEFAULT
  path = root.joinpath(*parts)
  if not path.exists():
    if env:
      pytest.fail(f"golden file {path} is missing (DDO_JAX_GOLDENS={env})")
    pytest.skip(f"goldens not found at {path}; set DDO_JAX_GOLDENS to the shared/goldens folder")
  return path


def load_npz(*parts) -> dict:
  with np.load(golden_path(*parts)) as f:
    return {k: f[k] for k in f.files}


def load_json(*parts) -> dict:
  return json.loads(golden_path(*parts).read_text())
