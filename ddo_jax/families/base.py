"""The family contract: what a model family gives the model-agnostic DDO step and the round driver.

A family is the one place where a model type meets DDO. It is built from the run config's `model` block
and has two parts.

Pure functions, traced inside `jax.jit` by the train step and the samplers (no host side effects):

  init_params(rng) -> params                         parameter pytree (plain nested dicts)
  log_ratio(params, ref_params, batch, rng)          per-sample gaps log p_theta(x) - log p_ref(x) on
      -> (gap_real [N], gap_fake [M])                batch['real'] and batch['fake']; the reference enters
                                                     only under `jax.lax.stop_gradient`
  ddo_weights(batch, alpha)                          optional row weights (VAR's label dropout):
      -> None | (w_real, w_fake, normalizer)         None = the plain mean (default)
  sample(params, keys [B], seeds [B]) -> dict        one sample per key ({'x': ..., optional 'label'})
  project_params(params) -> params                   applied after every optimizer update (EDM2's forced
                                                     weight normalization); default identity
  pretrain_loss(params, batch, rng) -> scalar        maximum-likelihood loss (toy families pretrain with it);
                                                     default: this family has no pretraining
  finalize_pretrained(params) -> params              applied once to the pretrained parameters; identity

Host-side hooks, called by the driver outside jit:

  real_source(seed) -> (source, num)                 the training data: source(indices) -> dict of arrays
  evaluate(params, sample, seed) -> {metric: value}  the selection metric(s); `sample(num, start=0)`
                                                     draws samples of `params` through the driver's
                                                     sharded sampler
  metric_mode                                        'min' or 'max': which direction of the metric is better
  reference_metrics(seed) -> dict                    the metrics of fresh data (a floor), {} if unknown
  ground_truth(seed, num) -> array | None            data samples for the ground-truth plot panel
  plot_samples(ax, x, title)                         draw samples on a matplotlib axis
  model_json() -> dict                               written as round_r/model.json next to chosen/, so
                                                     launch tools can rebuild the network
  check_converted(model_json_path)                   refuse a converted checkpoint that does not match the
                                                     config (default: accept)

Required parts are abstract (a family missing one cannot be built); optional parts have defaults here, so
nothing probes with `hasattr`. A new family subclasses `Family` and is registered by name in
`ddo_jax/families/__init__.py` (see README.md beside this file).
"""
import abc
from typing import Any, Callable, Optional, Tuple

import jax
import ml_collections
import numpy as np


class Family(abc.ABC):
  """Base class of every model family; `config` is the run config's `model` block."""

  name: str = ""
  metric_mode: str = "min"

  def __init__(self, config):
    self.config = config

  # --- pure functions (inside jit) ------------------------------------------------------------------
  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """A parameter pytree for `rng` (used for shapes by `jax.eval_shape`, and to initialise toys)."""

  @abc.abstractmethod
  def log_ratio(self, params, ref_params, batch: dict, rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(gap_real, gap_fake): log p_theta - stop_gradient(log p_ref) per real and per fake sample."""

  def ddo_weights(self, batch: dict, alpha: float) -> Optional[Tuple[jax.Array, jax.Array, jax.Array]]:
    """Per-row weights and normalizer of the DDO loss, or None for the plain mean over rows."""
    del batch, alpha
    return None

  @abc.abstractmethod
  def sample(self, params, keys: jax.Array, seeds: jax.Array) -> dict:
    """One sample per key: a dict of [B, ...] arrays with at least 'x'."""

  def project_params(self, params) -> Any:
    """Applied to the parameters after every optimizer update (e.g. forced weight normalization)."""
    return params

  def pretrain_loss(self, params, batch: dict, rng: jax.Array) -> jax.Array:
    """Maximum-likelihood training loss for `init.kind='pretrain'`."""
    raise NotImplementedError(f"family {self.name!r} has no pretraining loss: start from a converted "
                              "checkpoint (init.kind='checkpoint')")

  def finalize_pretrained(self, params) -> Any:
    """Applied once to the parameters that pretraining ends with."""
    return params

  # --- host side (the driver) -----------------------------------------------------------------------
  @property
  def has_pretraining(self) -> bool:
    return type(self).pretrain_loss is not Family.pretrain_loss

  @abc.abstractmethod
  def real_source(self, seed: int) -> Tuple[Callable, int]:
    """(source, num): `source(indices)` returns a dict of host arrays for those training examples."""

  @abc.abstractmethod
  def evaluate(self, params, sample: Callable, seed: int) -> dict:
    """The selection metric(s) of `params`; `sample(num, start=0)` draws samples of them."""

  def reference_metrics(self, seed: int) -> dict:
    """The metrics of fresh data (the floor a perfect model reaches), or {} when unknown."""
    del seed
    return {}

  def ground_truth(self, seed: int, num: int) -> Optional[np.ndarray]:
    """Data samples in the form of sample()['x'] for the ground-truth plot panel (None: no panel)."""
    del seed, num
    return None

  @abc.abstractmethod
  def plot_samples(self, ax, x: np.ndarray, title: str) -> None:
    """Draws samples `x` (host array, as sample()['x']) on a matplotlib axis."""

  def model_json(self) -> dict:
    """What is written next to each round's chosen/ parameters to rebuild the model."""
    return {"family": self.name, "config": ml_collections.ConfigDict(self.config).to_dict()}

  def check_converted(self, model_json_path) -> None:
    """Refuse a converted checkpoint (its model.json) that does not match this family's config."""
    del model_json_path
