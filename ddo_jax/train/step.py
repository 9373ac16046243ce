"""The sharded train step: one `jax.jit` over the mesh with explicit shardings and a donated state.

The train state is a plain dict pytree: {'step', 'params', 'opt_state', 'ema': {name: params}, 'rng'}.
`make_ddo_step` differentiates the DDO objective on the gaps a family computes; the family evaluates the
reference model inside the same program under `jax.lax.stop_gradient`. `make_mle_step` is the same step
for maximum-likelihood pretraining of toy models.
"""
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

from ddo_jax import objective, parallel
from ddo_jax.train import ema as ema_lib


def init_state(params: Any, rng: jax.Array, *, tx: optax.GradientTransformation,
               ema_specs: Mapping[str, Any]) -> dict:
  """A fresh train state around `params` (EMA trees start equal to the parameters)."""
  return {
      "step": jnp.zeros([], jnp.int32),
      "params": params,
      "opt_state": tx.init(params),
      "ema": {name: jax.tree_util.tree_map(jnp.copy, params) for name in ema_specs},
      "rng": rng,
  }


def state_shardings(abstract_state: Any, mesh, rules=()) -> Any:
  """Shardings for a train state: parameter-shaped subtrees follow the rules, scalars are replicated."""
  return parallel.param_shardings(abstract_state, mesh, rules)


def _make_step(loss_fn: Callable, tx, ema_specs, batch_size: int, mesh, shardings, ref_shardings,
               schedule=None, project: Callable = None):
  """jit(step) with in/out shardings; loss_fn(params, ref_params, batch, rng) -> (loss, metrics).

  `project(params)` runs after every optimizer update (a family's `project_params`, e.g. EDM2's forced
  weight normalization); the EMAs average the projected parameters.

  The returned function has `num_traces()`: how many times it was traced, i.e. compiled (a retrace
  would mean a shape, dtype or sharding changed; a whole run should compile the step once).
  """
  traces = [0]

  def step(state, ref_params, batch):
    traces[0] += 1  # Python side effect: runs only while tracing.
    rng = jax.random.fold_in(state["rng"], state["step"])
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], ref_params, batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if project is not None:
      params = project(params)
    new_ema = ema_lib.update(ema_specs, state["ema"], params, state["step"], batch_size)
    grad_norm, param_norm = optax.global_norm(grads), optax.global_norm(params)
    # One flag for the driver's non-finite check (a NaN or Inf anywhere makes a norm non-finite).
    finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    metrics = dict(metrics, grad_norm=grad_norm, param_norm=param_norm, finite=finite)
    if schedule is not None:
      metrics["lr"] = jnp.asarray(schedule(state["step"]), jnp.float32)
    new_state = {"step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": new_ema,
                 "rng": state["rng"]}
    return new_state, metrics

  jitted = jax.jit(step,
                   in_shardings=(shardings, ref_shardings, parallel.batch_sharding(mesh)),
                   out_shardings=(shardings, parallel.replicated(mesh)),
                   donate_argnums=(0,))
  jitted.num_traces = lambda: traces[0]
  return jitted


def ddo_loss_fn(family, alpha: float, beta: float) -> Callable:
  """loss_fn(params, ref_params, batch, rng) of DDO on the family's gaps (with its row weights if any)."""

  def loss_fn(params, ref_params, batch, rng):
    gap_real, gap_fake = family.log_ratio(params, ref_params, batch, rng)
    weights = family.ddo_weights(batch, alpha)
    if weights is None:
      return objective.ddo_loss(gap_real, gap_fake, alpha=alpha, beta=beta)
    w_real, w_fake, norm = weights
    return objective.ddo_loss(gap_real, gap_fake, alpha=alpha, beta=beta, weight_real=w_real,
                              weight_fake=w_fake, normalizer=norm)

  return loss_fn


def make_ddo_step(family, tx, ema_specs, *, alpha: float, beta: float, batch_size: int, mesh, shardings,
                  ref_shardings, schedule=None):
  """The jitted DDO step: (state, ref_params, {'real': ..., 'fake': ...}) -> (state, metrics)."""
  return _make_step(ddo_loss_fn(family, alpha, beta), tx, ema_specs, batch_size, mesh, shardings,
                    ref_shardings, schedule, project=family.project_params)


def make_mle_step(family, tx, ema_specs, *, batch_size: int, mesh, shardings, schedule=None):
  """The jitted maximum-likelihood step used to pretrain toy models: (state, None, batch) -> ..."""

  def loss_fn(params, _, batch, rng):
    loss = family.pretrain_loss(params, batch, rng)
    return loss, {"loss": loss}

  return _make_step(loss_fn, tx, ema_specs, batch_size, mesh, shardings, None, schedule,
                    project=family.project_params)
