"""Exponential moving averages of the parameters, updated inside the jitted train step.

Two kinds, configured by name in `config.ema` (each entry a dict with `kind`):

* `halflife` (EDM, Karras et al. 2022): beta = 0.5 ** (batch / halflife_nimg), where the half-life is
  `halflife_kimg * 1000` images, optionally capped at `rampup_ratio * nimg` early in training.
* `power` (EDM2, Karras et al. 2024): the power-function profile with relative std `std`; with gamma
  solving std^-2 = (gamma+2)^2 (gamma+3) / (gamma+1), beta = (1 - 1/t)^(gamma+1) after t steps.
"""
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

KINDS = ("halflife", "power")


def std_to_exp(std: float) -> float:
  """EDM2's power-function exponent gamma for a relative standard deviation `std`."""
  t = float(std) ** -2
  roots = np.roots([1.0, 7.0, 16.0 - t, 12.0 - t])
  return float(roots.real.max())


def validate(specs: Mapping[str, Mapping[str, Any]]) -> None:
  for name, spec in specs.items():
    kind = spec.get("kind")
    if kind not in KINDS:
      raise ValueError(f"ema.{name}.kind={kind!r} is not one of {KINDS}")
    if kind == "halflife" and not spec.get("halflife_kimg", 0) > 0:
      raise ValueError(f"ema.{name}.halflife_kimg must be > 0, got {spec.get('halflife_kimg')}")
    if kind == "power" and not 0 < spec.get("std", 0) < 0.3:
      raise ValueError(f"ema.{name}.std must be in (0, 0.3), got {spec.get('std')}")


def ema_beta(spec: Mapping[str, Any], step: jax.Array, batch_size: int) -> jax.Array:
  """Decay factor for the update after optimizer step `step` (0-based; nimg = step * batch before it)."""
  step = jnp.asarray(step, jnp.float32)
  if spec["kind"] == "halflife":
    halflife = jnp.float32(spec["halflife_kimg"] * 1000.0)
    ratio = spec.get("rampup_ratio")
    if ratio:
      halflife = jnp.minimum(halflife, step * batch_size * ratio)
    return 0.5 ** (batch_size / jnp.maximum(halflife, 1e-8))
  gamma = std_to_exp(spec["std"])
  t = step + 1.0
  return (1.0 - 1.0 / t) ** (gamma + 1.0)


def update(specs: Mapping[str, Mapping[str, Any]], ema: Mapping[str, Any], params: Any, step: jax.Array,
           batch_size: int) -> dict:
  """New EMA trees: ema <- beta * ema + (1 - beta) * params, per configured EMA."""
  out = {}
  for name, spec in specs.items():
    beta = ema_beta(spec, step, batch_size)
    out[name] = jax.tree_util.tree_map(lambda e, p: (p + beta * (e - p)).astype(e.dtype), ema[name], params)
  return out
