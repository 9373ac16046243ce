"""The sharded DDO train step on 8 virtual CPU devices."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import toy_diffusion
from ddo_jax import families, parallel
from ddo_jax.train import ema as ema_lib, optim, step as step_lib


def _setup(mesh, rules=((".*", "replicate"),)):
  config = toy_diffusion.get_config("tiny")
  family = families.make(config)
  tx = optim.make_optimizer(config.optim)
  specs = {"ema": dict(kind="halflife", halflife_kimg=0.5, rampup_ratio=0.05),
           "pema": dict(kind="power", std=0.1)}
  params = family.init_params(jax.random.key(0))
  init = functools.partial(step_lib.init_state, tx=tx, ema_specs=specs)
  abstract = jax.eval_shape(init, params, jax.random.key(0))
  shardings = parallel.param_shardings(abstract, mesh, rules)
  param_sh = parallel.param_shardings(params, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)(params, jax.random.key(1))
  ref = jax.device_put(jax.tree_util.tree_map(lambda p: p * 1.01, params), param_sh)
  fn = step_lib.make_ddo_step(family, tx, specs, alpha=2.0, beta=1.0, batch_size=64, mesh=mesh,
                              shardings=shardings, ref_shardings=param_sh, schedule=optim.make_schedule(config.optim))
  return family, state, ref, fn


def _batches(n):
  rng = np.random.default_rng(0)
  return [{"real": {"x": rng.normal(size=(64, 2)).astype(np.float32)},
           "fake": {"x": rng.normal(size=(64, 2)).astype(np.float32)}} for _ in range(n)]


def _run(mesh, batches, rules=((".*", "replicate"),)):
  _, state, ref, fn = _setup(mesh, rules)
  metrics = []
  for b in batches:
    state, m = fn(state, ref, parallel.global_batch(b, mesh))
    metrics.append(m)
  state = {k: v for k, v in state.items() if k != "rng"}
  return jax.tree_util.tree_map(np.asarray, state), metrics, fn


def test_sharded_step_equals_single_device_step():
  assert jax.device_count() == 8
  batches = _batches(4)
  single, m1, _ = _run(parallel.make_mesh(devices=jax.devices()[:1]), batches)
  sharded, m8, fn = _run(parallel.make_mesh(), batches)
  fsdp, m_fsdp, _ = _run(parallel.make_mesh(data=4, fsdp=2), batches, rules=((".*", "fsdp"),))
  for other in (sharded, fsdp):
    # float32 rounding only: the batch mean is reduced in a different order across devices.
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), single, other)
  np.testing.assert_allclose(float(m1[-1]["loss"]), float(m8[-1]["loss"]), rtol=1e-5)
  assert int(sharded["step"]) == 4
  # The parameters really moved, and the EMAs follow them.
  assert np.abs(single["params"]["out"]["kernel"] - _setup(parallel.make_mesh())[1]["params"]["out"]["kernel"]).max() > 1e-4
  assert fn.num_traces() == 1


def test_fsdp_rule_shards_parameters():
  mesh = parallel.make_mesh(data=4, fsdp=2)
  _, state, _, _ = _setup(mesh, rules=((".*", "fsdp"),))
  k = state["params"]["dense0"]["kernel"]        # [18, 32]: the 32 axis is split in 2
  assert k.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp")
  leaves = jax.tree_util.tree_flatten_with_path(state["opt_state"])[0]
  mu = [x for path, x in leaves if parallel._path_str(path).endswith("mu/dense0/kernel")]
  assert len(mu) == 1 and mu[0].sharding.spec == k.sharding.spec
  assert state["step"].sharding.spec == jax.sharding.PartitionSpec()


def test_step_compiles_once_across_rounds():
  mesh = parallel.make_mesh()
  family, state, ref, fn = _setup(mesh)
  for r, b in enumerate(_batches(3)):
    new_ref = jax.tree_util.tree_map(lambda p: p + r, ref)   # a new reference each "round"
    state, _ = fn(state, new_ref, parallel.global_batch(b, mesh))
  assert fn.num_traces() == 1


def test_step_at_reference_gives_one_plus_alpha_log2():
  mesh = parallel.make_mesh()
  family, state, _, fn = _setup(mesh)
  ref = state["params"]
  ref = jax.tree_util.tree_map(jnp.copy, ref)
  _, m = fn(state, ref, parallel.global_batch(_batches(1)[0], mesh))
  np.testing.assert_allclose(float(m["loss"]), 3 * np.log(2), rtol=1e-6)
  assert float(m["gap_real"]) == 0.0 and float(m["gap_fake"]) == 0.0


def test_ema_formulas():
  # EDM half-life: after one step of batch B with half-life H images, beta = 0.5 ** (B / H).
  spec = dict(kind="halflife", halflife_kimg=1.0, rampup_ratio=None)
  np.testing.assert_allclose(float(ema_lib.ema_beta(spec, 10, 250)), 0.5 ** 0.25, rtol=1e-6)
  ramp = dict(kind="halflife", halflife_kimg=1000.0, rampup_ratio=0.5)
  np.testing.assert_allclose(float(ema_lib.ema_beta(ramp, 4, 100)), 0.5 ** (100 / 200), rtol=1e-6)
  # EDM2 power EMA: gamma solves std^-2 = (g+2)^2 (g+3) / (g+1); beta = (1 - 1/t)^(g+1).
  for std in (0.05, 0.1, 0.2):
    g = ema_lib.std_to_exp(std)
    np.testing.assert_allclose(np.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3))), std, rtol=1e-10)
  g = ema_lib.std_to_exp(0.1)
  np.testing.assert_allclose(float(ema_lib.ema_beta(dict(kind="power", std=0.1), 9, 1)), 0.9 ** (g + 1), rtol=1e-5)
  with pytest.raises(ValueError, match="ema.bad.kind"):
    ema_lib.validate({"bad": dict(kind="cosine")})


def test_mesh_and_rule_errors():
  with pytest.raises(ValueError, match="must equal the device count"):
    parallel.make_mesh(data=3, fsdp=1)
  with pytest.raises(ValueError, match="divide the device count"):
    parallel.make_mesh(data=-1, fsdp=3)
  with pytest.raises(ValueError, match="unknown sharding strategy"):
    parallel.param_shardings({"a": jnp.zeros(4)}, parallel.make_mesh(), [(".*", "tensor")])
  with pytest.raises(ValueError, match="divisible by the number of batch shards"):
    parallel.check_batch_divisible(12, parallel.make_mesh())


def _run_impl(mesh, batches, rules, impl):
  """`_run` with the step implementation `impl` ('jit' or 'shard_map')."""
  config = toy_diffusion.get_config("tiny")
  family = families.make(config)
  tx = optim.make_optimizer(config.optim)
  specs = {"ema": dict(kind="halflife", halflife_kimg=0.5, rampup_ratio=0.05)}
  params = family.init_params(jax.random.key(0))
  init = functools.partial(step_lib.init_state, tx=tx, ema_specs=specs)
  shardings = parallel.param_shardings(jax.eval_shape(init, params, jax.random.key(0)), mesh, rules)
  param_sh = parallel.param_shardings(params, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)(params, jax.random.key(1))
  ref = jax.device_put(jax.tree_util.tree_map(lambda p: p * 1.01, params), param_sh)
  fn = step_lib.make_ddo_step(family, tx, specs, alpha=2.0, beta=1.0, batch_size=64, mesh=mesh,
                              shardings=shardings, ref_shardings=param_sh,
                              schedule=optim.make_schedule(config.optim), impl=impl)
  metrics = []
  for b in batches:
    state, m = fn(state, ref, parallel.global_batch(b, mesh))
    metrics.append({k: float(v) for k, v in m.items()})
  assert fn.num_traces() == 1
  for path, x in jax.tree_util.tree_flatten_with_path(state["params"])[0]:   # shardings kept
    assert x.sharding.spec == param_sh_leaf(param_sh, path).spec
  return jax.tree_util.tree_map(np.asarray, {k: v for k, v in state.items() if k != "rng"}), metrics


def param_sh_leaf(tree, path):
  for p, s in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if p == path:
      return s
  raise KeyError(path)


@pytest.mark.parametrize("data,fsdp,rule", [(-1, 1, "replicate"), (4, 2, "fsdp"), (1, 8, "fsdp")])
def test_shard_map_step_equals_jit_step(data, fsdp, rule):
  """config.step_impl='shard_map' (explicit per-device gaps and loss, pmean'd gradients, FSDP parameters
  all-gathered by hand) gives the jit-partitioned step's parameters, EMAs, optimizer state and metrics to
  float32 rounding: the same noise (each device draws its slice of the global draw), only the order of the
  cross-device sums differs."""
  mesh = parallel.make_mesh(data=data, fsdp=fsdp)
  rules = ((".*", rule),)
  batches = _batches(3)
  a, ma = _run_impl(mesh, batches, rules, "jit")
  b, mb = _run_impl(mesh, batches, rules, "shard_map")
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=2e-5, atol=2e-6), a, b)
  for x, y in zip(ma, mb):
    for k in x:
      np.testing.assert_allclose(x[k], y[k], rtol=2e-5, atol=1e-6, err_msg=k)
  assert ma[0]["gap_real"] != 0.0   # the reference differs from the target: gaps (and noise) are compared


def test_batch_shard_keys_give_each_device_its_slice_of_the_global_draw():
  mesh = parallel.make_mesh()
  key = jax.random.key(7)
  n = 3

  def per_device(k):
    shard = jax.lax.axis_index("data") * mesh.shape["fsdp"] + jax.lax.axis_index("fsdp")
    k = step_lib._batch_shard_keys(k, 8, shard)
    k1, k2 = jax.random.split(jax.random.fold_in(k, 5))
    return (jax.random.normal(k1, (n, 2)), jax.random.uniform(k2, (n,)),
            jax.lax.pmax(jax.random.normal(k2, ()), parallel.BATCH_AXES))

  P = jax.sharding.PartitionSpec
  rows = P(parallel.BATCH_AXES)
  normal, uniform, scalar = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(),
                                                  out_specs=(rows, rows, P())))(key)
  k1, k2 = jax.random.split(jax.random.fold_in(key, 5))
  np.testing.assert_array_equal(np.asarray(normal), np.asarray(jax.random.normal(k1, (8 * n, 2))))
  np.testing.assert_array_equal(np.asarray(uniform), np.asarray(jax.random.uniform(k2, (8 * n,))))
  np.testing.assert_array_equal(np.asarray(scalar), np.asarray(jax.random.normal(k2, ())))


def test_unknown_step_implementation_is_refused():
  from ddo_jax import cli
  from ddo_jax.train import config_check
  config = toy_diffusion.get_config("tiny")
  config.step_impl = "pmap"
  with pytest.raises(cli.ConfigError, match=r"step_impl must be 'jit' .* or 'shard_map'"):
    config_check.validate(config)
  mesh = parallel.make_mesh()
  with pytest.raises(ValueError, match="not one of"):
    step_lib.make_mle_step(families.make(config), optim.make_optimizer(config.optim), {}, batch_size=8,
                           mesh=mesh, shardings=None, impl="pmap")
