"""Model families, found by name. Each supplies per-sample log-likelihood gaps for the model-agnostic DDO
objective and the host-side hooks of the round driver; the contract is `ddo_jax.families.base.Family`.

Adding a family: a module in this folder with a `Family` subclass, and one line in `REGISTRY`.
"""
import importlib

from ddo_jax.families.base import Family

# name -> "module:Class" (imported on first use, so a run pays only for the family it trains).
REGISTRY = {
    "toy_diffusion": "ddo_jax.families.toy_diffusion:ToyDiffusion",
    "toy_grid": "ddo_jax.families.toy_grid:ToyGrid",
    "edm": "ddo_jax.families.edm:EDM",
    "edm2": "ddo_jax.families.edm2:EDM2",
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
