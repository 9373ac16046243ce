"""Model families, found by name. Each supplies per-sample log-likelihood gaps for the model-agnostic DDO
objective and the host-side hooks of the round driver; the contract is `ddo_jax.families.base.Family`.

Adding a family: a module in this folder with a `Family` subclass, and one line in `REGISTRY`.

`load_model_dir(path, **options)` opens a saved model folder (launch.sample, launch.evaluate --model) with
the family its model.json names.
"""
import importlib
import json
import pathlib

from ddo_jax import cli
from ddo_jax.families.base import Family, sampling_options

# name -> "module:Class" (imported on first use, so a run pays only for the family it trains).
REGISTRY = {
    "toy_diffusion": "ddo_jax.families.toy_diffusion:ToyDiffusion",
    "toy_grid": "ddo_jax.families.toy_grid:ToyGrid",
    "edm": "ddo_jax.families.edm:EDM",
    "edm2": "ddo_jax.families.edm2:EDM2",
    "var": "ddo_jax.families.var:VAR",
}


def get(name: str) -> type:
  """The Family subclass registered as `name`."""
  if name not in REGISTRY:
    raise ValueError(f"family={name!r} is not a known model family ({', '.join(sorted(REGISTRY))})")
  module, cls = REGISTRY[name].split(":")
  return getattr(importlib.import_module(module), cls)


def make(config) -> Family:
  """The family object named by `config.family`, built from `config.model`."""
  return get(config.family)(config.model)


MODEL_DIR_FIX = ("give a folder written by `python -m launch.convert <family>` (edm, edm2) or a round folder "
                 "round_r/ of a DDO run")


class ModelJsonNotFound(cli.UserError, FileNotFoundError):
  """A --model folder without model.json (also a FileNotFoundError, for library callers)."""


def read_model_json(path) -> dict:
  """The model.json of a saved model folder; one-line UserErrors for a missing or unreadable file."""
  meta_path = pathlib.Path(path) / "model.json"
  if not meta_path.is_file():
    raise ModelJsonNotFound(f"{meta_path} not found", "--model", MODEL_DIR_FIX)
  try:
    meta = json.loads(meta_path.read_text())
  except ValueError as e:
    raise cli.UserError(f"{meta_path} is not valid JSON ({e})", "--model", MODEL_DIR_FIX) from e
  if not isinstance(meta, dict):
    raise cli.UserError(f"{meta_path} holds no JSON object", "--model", MODEL_DIR_FIX)
  return meta


def load_model_dir(path, **options):
  """(family, params) ready to sample, from a folder written by `launch.convert <family>` or a DDO round
  folder: reads its model.json, picks the family registered as meta['family'] ('edm' for folders written
  before the key existed) and calls its `from_model_dir(path, meta, options)`.

  options: the sampling flags (keys of `base.OPTION_FLAGS`: labels, num_steps, S_churn, float64, guidance,
  guide, sampler, vae, and VAR's cfg, cfg_convention, top_k, top_p, more_smooth); a missing or None one is
  the family's default. A family refuses options that mean nothing for it (one-line cli.UserError).
  """
  path = pathlib.Path(path)
  meta = read_model_json(path)
  name = meta.get("family", "edm")
  if name not in REGISTRY:
    raise cli.UserError(f"{path / 'model.json'} names the family {name!r}, which this version of ddo-jax does "
                        f"not know ({', '.join(sorted(REGISTRY))})", "--model", MODEL_DIR_FIX)
  return get(name).from_model_dir(path, meta, sampling_options(**options))
