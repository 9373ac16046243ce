"""The sharded train step: one `jax.jit` over the mesh with explicit shardings and a donated state.

The train state is a plain dict pytree: {'step', 'params', 'opt_state', 'ema': {name: params}, 'rng'}.
`make_ddo_step` differentiates the DDO objective on the gaps a family computes; the family evaluates the
reference model inside the same program under `jax.lax.stop_gradient`. `make_mle_step` is the same step
for maximum-likelihood pretraining of toy models.

Two implementations of the gradient, chosen by `impl` (`config.step_impl`), with the same results to
float32 rounding:

* 'jit' (default): the loss is written on the global batch and XLA's SPMD partitioner splits it over the
  mesh (the gradient's cross-device sum, the FSDP gathers and reduce-scatters are inserted by XLA).
* 'shard_map': the gradient is an explicit per-device program (`jax.shard_map` over the mesh): each
  device gathers the FSDP-sharded parameters it needs (`lax.all_gather` over 'fsdp'), computes the gaps
  and the loss of its own rows, differentiates that, and the gradients are averaged across devices
  (`lax.psum_scatter` back to the FSDP shards, `lax.pmean` over the rest); the metrics likewise. The
  optimizer, projection and EMA updates are elementwise (or left to the partitioner) and shared by both.
  Random draws inside the family's loss are made per device as slices of the global draw (see
  `_batch_shard_keys`), so both implementations see the same noise.
"""
import functools
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from ddo_jax import objective, parallel, xla_options
from ddo_jax.train import ema as ema_lib

IMPLS = ("jit", "shard_map")


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


# --- the shard_map gradient ------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _batch_shard_prng(num_shards: int):
  """A PRNG implementation whose keys are (threefry key, batch shard index): a draw of shape [n, ...] made
  on one batch shard returns rows [i*n, (i+1)*n) of the threefry draw of shape [num_shards*n, ...] with
  the same key, i.e. exactly this shard's part of the draw the global program makes. Scalar draws are
  the global ones. Splitting and folding act on the threefry key and keep the shard index."""
  from jax.extend import random as jex_random  # pylint: disable=import-outside-toplevel
  base = jex_random.threefry_prng_impl

  def with_index(k, idx):
    return jnp.concatenate([k, jnp.broadcast_to(idx, k.shape[:-1] + (1,))], axis=-1)

  def seed(s):
    return with_index(base.seed(s), jnp.uint32(0))

  def split(k, shape):
    return with_index(base.split(k[..., :2], shape), k[..., 2])

  def fold_in(k, data):
    return with_index(base.fold_in(k[..., :2], data), k[..., 2])

  def random_bits(k, bit_width, shape):
    if not shape:
      return base.random_bits(k[:2], bit_width, shape)
    n = shape[0]
    bits = base.random_bits(k[:2], bit_width, (n * num_shards,) + tuple(shape[1:]))
    return lax.dynamic_slice_in_dim(bits, k[2].astype(jnp.int32) * n, n, axis=0)

  return jex_random.define_prng_impl(key_shape=(3,), seed=seed, split=split, random_bits=random_bits,
                                     fold_in=fold_in, name=f"batch_shard_threefry_{num_shards}", tag="bst")


def _batch_shard_keys(rng: jax.Array, num_shards: int, shard: jax.Array) -> jax.Array:
  """`rng` (a threefry key) as a key of this batch shard (see `_batch_shard_prng`).

  It assumes what every family here does: a random draw inside the loss is per sample, with the batch as
  its leading axis (sigma [N], noise [N, ...]). It costs each device the global draw's random bits (small
  next to the network)."""
  data = jnp.concatenate([jax.random.key_data(rng), shard.astype(jnp.uint32)[None]])
  return jax.random.wrap_key_data(data, impl=_batch_shard_prng(num_shards))


def _fsdp_dim(spec) -> int | None:
  for d, axes in enumerate(spec):
    if axes == "fsdp" or (isinstance(axes, tuple) and "fsdp" in axes):
      return d
  return None


def _varying_axes(x) -> frozenset:
  """The mesh axes over which a value inside shard_map may differ between devices (its type's 'vma')."""
  t = jax.typeof(x)
  vma = getattr(t, "vma", None)
  return frozenset(t.mat.varying if vma is None else vma)


def _to_varying(x, axes):
  """x marked as varying over every mesh axis (so that its gradient stays per device, reduced by us)."""
  missing = tuple(a for a in axes if a not in _varying_axes(x))
  return lax.pcast(x, missing, to="varying") if missing else x


def shard_map_grad(loss_fn: Callable, mesh, param_specs, ref_specs) -> Callable:
  """(params, ref_params, batch, rng) -> (grads, metrics) as one explicit per-device program.

  Per device: gather the FSDP shards of the parameters and the reference (all_gather over 'fsdp' along
  each leaf's sharded dimension), compute loss_fn on this device's rows with this shard's slice of the
  global random draw, take the gradient of that local loss, then average across devices: FSDP leaves by a
  reduce-scatter over 'fsdp' (each device keeps its shard) and a pmean over 'data', the others by a pmean
  over ('data', 'fsdp'). The per-device loss is a mean over the device's rows (every device has the same
  number), so the mean of the per-device gradients and metrics is the global batch's.
  """
  axes = parallel.BATCH_AXES
  n_fsdp = mesh.shape["fsdp"]
  n_shards = mesh.shape["data"] * n_fsdp

  def gather(tree, specs):
    def one(x, spec):
      d = _fsdp_dim(spec)
      return x if d is None else lax.all_gather(x, "fsdp", axis=d, tiled=True)
    return jax.tree_util.tree_map(one, tree, specs)

  def reduce_grad(g, spec):
    d = _fsdp_dim(spec)
    if d is None:
      return lax.pmean(g, axes)
    return lax.pmean(lax.psum_scatter(g, "fsdp", scatter_dimension=d, tiled=True) / n_fsdp, "data")

  def body(params, ref_params, batch, rng):
    shard = lax.axis_index("data") * n_fsdp + lax.axis_index("fsdp")   # this device's block of batch rows
    key = _batch_shard_keys(rng, n_shards, shard)
    full = jax.tree_util.tree_map(lambda x: _to_varying(x, axes), gather(params, param_specs))
    ref = None if ref_params is None else jax.lax.stop_gradient(gather(ref_params, ref_specs))
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(full, ref, batch, key)
    grads = jax.tree_util.tree_map(reduce_grad, grads, param_specs)
    metrics = jax.tree_util.tree_map(lambda m: lax.pmean(_to_varying(m, axes), axes), metrics)
    return grads, metrics

  batch_spec = P(axes)
  if ref_specs is None:
    fn = jax.shard_map(lambda p, b, r: body(p, None, b, r), mesh=mesh,
                       in_specs=(param_specs, batch_spec, P()), out_specs=(param_specs, P()))
    return lambda params, ref_params, batch, rng: fn(params, batch, rng)
  return jax.shard_map(body, mesh=mesh, in_specs=(param_specs, ref_specs, batch_spec, P()),
                       out_specs=(param_specs, P()))


def _specs(shardings):
  return jax.tree_util.tree_map(lambda s: s.spec, shardings)


# --- the step ---------------------------------------------------------------------------------------------

def _make_step(loss_fn: Callable, tx, ema_specs, batch_size: int, mesh, shardings, ref_shardings,
               schedule=None, project: Callable = None, impl: str = "jit"):
  """jit(step) with in/out shardings; loss_fn(params, ref_params, batch, rng) -> (loss, metrics).

  `project(params)` runs after every optimizer update (a family's `project_params`, e.g. EDM2's forced
  weight normalization); the EMAs average the projected parameters. `impl` is 'jit' or 'shard_map' (see
  the module docstring).

  The returned function has `num_traces()`: how many times it was traced, i.e. compiled (a retrace
  would mean a shape, dtype or sharding changed; a whole run should compile the step once).
  """
  if impl not in IMPLS:
    raise ValueError(f"step implementation {impl!r} is not one of {IMPLS}")
  traces = [0]
  if impl == "shard_map":
    grad_fn = shard_map_grad(loss_fn, mesh, _specs(shardings["params"]),
                             None if ref_shardings is None else _specs(ref_shardings))
  else:
    def grad_fn(params, ref_params, batch, rng):
      (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, ref_params, batch, rng)
      return grads, metrics

  def step(state, ref_params, batch):
    traces[0] += 1  # Python side effect: runs only while tracing.
    rng = jax.random.fold_in(state["rng"], state["step"])
    grads, metrics = grad_fn(state["params"], ref_params, batch, rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    if project is not None:
      params = project(params)
    new_ema = ema_lib.update(ema_specs, state["ema"], params, state["step"], batch_size)
    grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
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
                   donate_argnums=(0,), compiler_options=xla_options.compiler_options(mesh))
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
                  ref_shardings, schedule=None, impl: str = "jit"):
  """The jitted DDO step: (state, ref_params, {'real': ..., 'fake': ...}) -> (state, metrics)."""
  return _make_step(ddo_loss_fn(family, alpha, beta), tx, ema_specs, batch_size, mesh, shardings,
                    ref_shardings, schedule, project=family.project_params, impl=impl)


def make_mle_step(family, tx, ema_specs, *, batch_size: int, mesh, shardings, schedule=None, impl: str = "jit"):
  """The jitted maximum-likelihood step used to pretrain toy models: (state, None, batch) -> ..."""

  def loss_fn(params, _, batch, rng):
    loss = family.pretrain_loss(params, batch, rng)
    return loss, {"loss": loss}

  return _make_step(loss_fn, tx, ema_specs, batch_size, mesh, shardings, None, schedule,
                    project=family.project_params, impl=impl)
