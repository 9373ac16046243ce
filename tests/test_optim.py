"""ddo_jax/train/optim.py: schedules (EDM's ramp, VAR's lin0), AdamW with VAR's weight-decay rule, torch-style
clipping, gradient accumulation; config_check's optim keys. Parity with torch.optim.AdamW driven the way
VAR's trainer drives it."""
import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import edm2_img64, edm_cifar10, toy_diffusion
from ddo_jax import cli, families, parallel
from ddo_jax.train import config_check, optim, step as step_lib

# VAR's nowd_keys (FoundationVision/VAR train.py, passed to filter_params).
VAR_NO_DECAY = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def var_optim(**kw):
  c = dict(name="adamw", lr=4e-6, b1=0.9, b2=0.95, eps=1e-8, warmup_steps=200, warmup_from=0.005, decay="lin0",
           total_steps=10010, end_ratio=0.1, weight_decay=0.05, no_decay_keys=VAR_NO_DECAY, clip_norm=2.0,
           clip_eps=1e-6, accumulate=8)
  c.update(kw)
  return ml_collections.ConfigDict(c)


def upstream_lin0(g_it, wp_it, max_it, wp0, wpe):
  """VAR's lr_wd_annealing('lin0') factor, in Python floats, written from its formula."""
  if g_it < wp_it:
    return wp0 + (1 - wp0) * g_it / wp_it
  passed = (g_it - wp_it) / (max_it - 1 - wp_it)
  return 1.0 if passed < 0.05 else wpe + (1 - wpe) * (1 - passed) / 0.95


# ---------------------------------------------------------------------------------------------
# Schedules.


def test_lin0_exact_values():
  s = optim.make_schedule(var_optim())
  f = lambda step: float(s(jnp.int32(step))) / float(np.float32(4e-6))   # the factor of the float32 peak
  # warm-up 0.005 -> 1 over 200 micro-steps (d16: round(0.02 * 10010)), then flat for 5% of the rest.
  assert f(0) == pytest.approx(0.005, rel=1e-6)
  assert f(100) == pytest.approx(0.5025, rel=1e-6)
  assert f(199) == pytest.approx(0.995025, rel=1e-6)
  assert f(200) == 1.0 and f(690) == 1.0          # 490 / 9809 = 0.04995 < 0.05
  assert f(691) == pytest.approx(0.1 + 0.9 * (1 - 491 / 9809) / 0.95, rel=1e-6)   # 0.999947
  assert f(10009) == pytest.approx(0.1, rel=1e-6)
  # DDO's d16 run stops after 784 micro-steps (98 optimizer steps): lr still 0.99x peak.
  assert f(783) == pytest.approx(0.1 + 0.9 * (1 - 583 / 9809) / 0.95, rel=1e-6)    # 0.99106
  for step in [0, 1, 7, 150, 199, 200, 201, 690, 691, 692, 783, 5000, 10009]:
    assert f(step) == pytest.approx(upstream_lin0(step, 200, 10010, 0.005, 0.1), rel=2e-7, abs=1e-7), step


def test_lin0_without_warmup_and_optimizer_count_mapping():
  s = optim.make_schedule(var_optim(warmup_steps=0, total_steps=101))
  assert float(s(0)) == float(np.float32(4e-6)) and float(s(100)) == pytest.approx(0.4e-6, rel=1e-6)
  # With accumulate = 8, the optimizer's k-th update uses the value at micro-step 8k + 7 (VAR steps at
  # (g_it + 1) % ac == 0 with the lr set at that g_it).
  opt = optim.optimizer_schedule(var_optim())
  assert float(opt(0)) / 4e-6 == pytest.approx(0.005 + 0.995 * 7 / 200, rel=1e-6)    # 0.039825
  assert float(opt(24)) / 4e-6 == pytest.approx(0.005 + 0.995 * 199 / 200, rel=1e-6)
  assert float(opt(25)) == float(np.float32(4e-6))
  with pytest.raises(ValueError, match="total_steps"):
    optim.make_schedule(var_optim(total_steps=201))


def test_edm_schedules_unchanged():
  c = ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=4))
  s = optim.make_schedule(c)
  # float32: the peak and the fraction each rounded once (2 ulps of 2^-23 relative).
  assert [float(s(i)) for i in range(6)] == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3], rel=2.4e-7)
  r = optim.make_schedule(ml_collections.ConfigDict(dict(lr=1e-3, warmup_steps=2, decay="rsqrt", ref_steps=4)))
  assert float(r(16)) == pytest.approx(5e-4, rel=1e-7)
  w = optim.make_schedule(ml_collections.ConfigDict(dict(lr=1.0, warmup_steps=4, warmup_from=0.2)))
  assert [float(w(i)) for i in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0], rel=1e-7)


def test_edm_optimizer_unchanged():
  c = edm_cifar10.get_config("tiny").optim
  params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones(3)}
  grads = jax.tree.map(lambda p: jnp.sin(p + 1.0), params)
  old = optax.chain(optax.adam(optax.linear_schedule(0.0, c.lr, c.warmup_steps), b1=c.b1, b2=c.b2, eps=c.eps))
  new = optim.make_optimizer(c)
  so, sn = old.init(params), new.init(params)
  assert jax.tree.structure(so) == jax.tree.structure(sn)     # checkpoints keep their layout
  for _ in range(3):
    uo, so = old.update(grads, so, params)
    un, sn = new.update(grads, sn, params)
    jax.tree.map(np.testing.assert_array_equal, uo, un)


# ---------------------------------------------------------------------------------------------
# Weight-decay mask.


def var_like_params():
  z = lambda *s: jnp.zeros(s, jnp.float32)
  return {"class_emb": {"embedding": z(1001, 8)}, "pos_start": z(1, 1, 8), "pos_1LC": z(1, 680, 8),
          "lvl_embed": {"embedding": z(10, 8)}, "word_embed": {"kernel": z(32, 8), "bias": z(8)},
          "blocks_0": {"attn": {"mat_qkv": {"kernel": z(8, 24)}, "q_bias": z(8), "scale_mul_1H11": z(1, 2, 1, 1),
                                "proj": {"kernel": z(8, 8), "bias": z(8)}},
                       "ada_lin": {"kernel": z(8, 48), "bias": z(48)}, "ln_wo_grad": {"scale": z(8)}},
          "head_nm": {"ada_lin": {"kernel": z(8, 16)}}, "head": {"kernel": z(8, 4096), "bias": z(4096)}}


def test_decay_mask_follows_vars_filter_params():
  mask = optim.decay_mask(var_like_params(), VAR_NO_DECAY)
  flat = {optim.path_name(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  decayed = sorted(k for k, v in flat.items() if v)
  # class_emb is an embedding but upstream decays it (2-D, no no-wd key in its name); lvl_embed and the
  # position embeddings are excluded by name, biases by name, norms and q_bias by being 1-D.
  assert decayed == ["blocks_0/ada_lin/kernel", "blocks_0/attn/mat_qkv/kernel", "blocks_0/attn/proj/kernel",
                     "class_emb/embedding", "head/kernel", "head_nm/ada_lin/kernel", "word_embed/kernel"]
  assert optim.decays("x/gamma", (3, 3), VAR_NO_DECAY) is False and optim.decays("x/w", (3, 3)) is True
  # A family's own predicate replaces the name rule.
  only_head = optim.decay_mask(var_like_params(), predicate=lambda path, shape: path.startswith("head/"))
  assert sorted(optim.path_name(p) for p, v in jax.tree_util.tree_flatten_with_path(only_head)[0] if v) == [
      "head/bias", "head/kernel"]


def test_adamw_decays_only_the_mask():
  c = var_optim(decay="none", warmup_steps=0, warmup_from=0.0, lr=0.1, accumulate=1, clip_norm=0.0)
  params = {"w": jnp.full((2, 2), 2.0), "bias": jnp.full((2,), 2.0), "pos_embed": jnp.full((1, 2), 2.0)}
  tx = optim.make_optimizer(c)
  grads = jax.tree.map(jnp.zeros_like, params)
  upd, _ = tx.update(grads, tx.init(params), params)
  # Zero gradients: the Adam part is 0, only the decoupled decay -lr * wd * p = -0.1 * 0.05 * 2 remains.
  np.testing.assert_allclose(upd["w"], np.full((2, 2), -0.01), rtol=1e-6)
  np.testing.assert_array_equal(upd["bias"], 0.0)
  np.testing.assert_array_equal(upd["pos_embed"], 0.0)


# ---------------------------------------------------------------------------------------------
# Clipping and accumulation.


def test_torch_clip_rule():
  g = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([[4.0]])}          # global norm 5
  clipped, _ = optim.clip_by_global_norm_torch(2.0, 1e-6).update(g, optax.EmptyState())
  scale = np.float32(2.0) / (np.float32(5.0) + np.float32(1e-6))
  np.testing.assert_array_equal(clipped["a"], np.array([3.0, 0.0], np.float32) * scale)
  np.testing.assert_array_equal(clipped["b"], np.array([[4.0]], np.float32) * scale)
  small = {"a": jnp.array([0.3, 0.4])}
  np.testing.assert_array_equal(optim.clip_by_global_norm_torch(2.0).update(small, optax.EmptyState())[0]["a"],
                                small["a"])


def test_accumulation_is_one_step_on_the_mean_gradient():
  c = var_optim(lr=0.1, warmup_steps=4, total_steps=100, accumulate=2, clip_norm=0.0)
  params = {"w": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.1, 0.2])}
  g1 = {"w": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.array([1.0, -1.0])}
  g2 = {"w": jnp.array([[0.3, -0.2], [0.1, 0.0]]), "bias": jnp.array([3.0, 1.0])}
  tx = optim.make_optimizer(c)
  state = tx.init(params)
  u1, state = tx.update(g1, state, params)
  jax.tree.map(lambda u: np.testing.assert_array_equal(u, 0.0), u1)      # first micro-step: no change
  u2, state = tx.update(g2, state, params)
  # The same as one plain AdamW step on the mean gradient at the lr of driver step 1 (= 0.1 * (0.005 +
  # 0.995 / 4)).
  lr = 0.1 * (0.005 + 0.995 * 1 / 4)
  plain = optax.adamw(lr, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.05,
                      mask={"w": True, "bias": False})
  mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
  expected, _ = plain.update(mean, plain.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u2, expected)


def test_matches_torch_adamw_driven_like_vars_trainer():
  """VAR's loop: lr set every micro-step (lin0 at g_it), loss / ac accumulated, at (g_it + 1) % ac == 0
  clip_grad_norm_(2.0) and AdamW.step with per-group weight decay (0 for the no-wd group)."""
  torch = pytest.importorskip("torch")
  ac, n_micro = 2, 10
  c = var_optim(lr=1e-2, warmup_steps=3, total_steps=12, end_ratio=0.1, accumulate=ac, clip_norm=2.0)
  rng = np.random.default_rng(0)
  init = {"w": rng.normal(size=(3, 4)).astype(np.float32), "bias": rng.normal(size=(4,)).astype(np.float32),
          "pos_embed": rng.normal(size=(1, 2, 4)).astype(np.float32)}
  grads = [{k: (rng.normal(size=v.shape) * 3).astype(np.float32) for k, v in init.items()} for _ in range(n_micro)]

  tp = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in init.items()}
  groups = [{"params": [tp["w"]], "wd_sc": 1.0}, {"params": [tp["bias"], tp["pos_embed"]], "wd_sc": 0.0}]
  opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0)
  for g_it in range(n_micro):
    lr = 1e-2 * upstream_lin0(g_it, 3, 12, 0.005, 0.1)
    for group in opt.param_groups:
      group["lr"], group["weight_decay"] = lr, 0.05 * group["wd_sc"]
    for k, p in tp.items():   # backward of loss * (1 / ac) adds g / ac to .grad
      g = torch.from_numpy(grads[g_it][k]) * (1 / ac)
      p.grad = g if p.grad is None else p.grad + g
    if (g_it + 1) % ac == 0:
      torch.nn.utils.clip_grad_norm_(list(tp.values()), 2.0)
      opt.step()
      opt.zero_grad(set_to_none=True)

  tx = optim.make_optimizer(c)
  params = {k: jnp.asarray(v) for k, v in init.items()}
  state = tx.init(params)
  update = jax.jit(tx.update)
  for g_it in range(n_micro):
    u, state = update({k: jnp.asarray(v) for k, v in grads[g_it].items()}, state, params)
    params = optax.apply_updates(params, u)
  for k in init:
    ours, theirs = np.asarray(params[k]), tp[k].detach().numpy()
    assert np.abs(ours - init[k]).max() > 1e-2        # the parameters moved (5 steps of lr ~1e-2)
    # float32 rounding only: a few ulps of the O(1) parameters (the mean is accumulated in another order,
    # the update formula rounds differently); measured max error 1.8e-7 (jax 0.10.2, torch 2.13 CPU).
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=6e-7, err_msg=k)


def test_accumulation_through_the_sharded_ddo_step():
  config = toy_diffusion.get_config("tiny")
  config.optim.update(name="adamw", weight_decay=0.05, clip_norm=1.0, clip_eps=1e-6, accumulate=2)
  family = families.make(config)
  mesh = parallel.make_mesh(data=4, fsdp=2)
  tx = optim.make_optimizer(config.optim)
  params = family.init_params(jax.random.key(0))
  init = functools.partial(step_lib.init_state, tx=tx, ema_specs={})
  rules = ((".*", "fsdp"),)
  shardings = parallel.param_shardings(jax.eval_shape(init, params, jax.random.key(0)), mesh, rules)
  param_sh = parallel.param_shardings(params, mesh, rules)
  state = jax.jit(init, out_shardings=shardings)(params, jax.random.key(1))
  ref = jax.device_put(jax.tree.map(lambda p: p * 1.01, params), param_sh)
  fn = step_lib.make_ddo_step(family, tx, {}, alpha=2.0, beta=1.0, batch_size=64, mesh=mesh, shardings=shardings,
                              ref_shardings=param_sh, schedule=optim.make_schedule(config.optim))
  rng = np.random.default_rng(0)
  before = jax.tree.map(np.asarray, state["params"])
  seen = []
  for _ in range(4):
    batch = {"real": {"x": rng.normal(size=(64, 2)).astype(np.float32)},
             "fake": {"x": rng.normal(size=(64, 2)).astype(np.float32)}}
    state, m = fn(state, ref, parallel.global_batch(batch, mesh))
    seen.append(jax.tree.map(np.asarray, state["params"]))
  leaves = lambda t: jax.tree.leaves(t)
  assert all(np.array_equal(a, b) for a, b in zip(leaves(before), leaves(seen[0])))     # micro-step 1
  assert not all(np.array_equal(a, b) for a, b in zip(leaves(seen[0]), leaves(seen[1])))   # optimizer step
  assert all(np.array_equal(a, b) for a, b in zip(leaves(seen[1]), leaves(seen[2])))
  assert int(state["step"]) == 4 and fn.num_traces() == 1


# ---------------------------------------------------------------------------------------------
# Config validation.


def _valid_var_like():
  c = toy_diffusion.get_config("tiny")
  c.optim = dict(var_optim(total_steps=1000, accumulate=2))
  c.rounds.images = 4 * c.rounds.batch_size
  c.selection.eval_every = 2
  c.checkpoint.every = 2
  return c


@pytest.mark.parametrize("key,value,where", [
    ("optim.name", "sgd", "config.optim.name"),
    ("optim.decay", "cos", "config.optim.decay"),
    ("optim.total_steps", 100, "config.optim.total_steps"),     # not > warmup_steps + 1 = 201
    ("optim.end_ratio", 1.5, "config.optim.end_ratio"),
    ("optim.warmup_from", -0.1, "config.optim.warmup_from"),
    ("optim.weight_decay", -1.0, "config.optim.weight_decay"),
    ("optim.clip_eps", -1e-6, "config.optim.clip_eps"),
    ("optim.accumulate", 0, "config.optim.accumulate"),
    ("optim.accumulate", 3, "config.rounds.images"),
    ("selection.eval_every", 3, "config.selection.eval_every"),
    ("checkpoint.every", 1, "config.checkpoint.every"),
    ("optim.no_decay_keys", ("bias", 3), "config.optim.no_decay_keys"),
])
def test_config_check_refuses_bad_optim_values(key, value, where):
  c = _valid_var_like()
  config_check.validate(c)
  section, name = key.split(".")
  c[section][name] = value
  with pytest.raises(cli.ConfigError) as e:
    config_check.validate(c)
  assert f"({where})" in str(e.value) and "\n" not in str(e.value)


def test_config_check_weight_decay_needs_adamw_and_existing_configs_pass():
  c = _valid_var_like()
  c.optim.name = "adam"
  with pytest.raises(cli.ConfigError, match=r"\(config.optim.weight_decay\): set --config.optim.name=adamw"):
    config_check.validate(c)
  cond = edm_cifar10.get_config("cond")
  cond.init.checkpoint = "converted"
  for config in (toy_diffusion.get_config("tiny"), cond, edm_cifar10.get_config("tiny"), edm2_img64.get_config("s")):
    config.init.checkpoint = config.init.checkpoint or "converted"
    config_check.validate(config)


# ---------------------------------------------------------------------------------------------
# configs/var_imagenet256.py (the family itself is not registered yet: only the numbers are checked here).


@pytest.mark.parametrize("variant,micro,ac,warmup,total", [("d16", 128, 8, 200, 10010), ("d30", 32, 32, 801, 40037)])
def test_var_config_numbers(variant, micro, ac, warmup, total):
  from configs import var_imagenet256
  c = var_imagenet256.get_config(variant)
  assert c.family == "var" and c.model.depth == int(variant[1:])
  assert c.rounds.batch_size == micro and c.optim.accumulate == ac and micro * ac == 1024
  assert c.optim.lr == pytest.approx(4e-6, rel=1e-12)                     # ac * 1e-6 * bs / 256
  assert (c.optim.warmup_steps, c.optim.total_steps) == (warmup, total)
  assert c.optim.warmup_steps / ac == pytest.approx(25, abs=0.05)         # 25 optimizer steps of warm-up
  steps = c.rounds.images // c.rounds.batch_size
  assert steps == 98 * ac and c.rounds.images == 98 * 1024 and c.rounds.num == 2
  assert c.checkpoint.every == c.selection.eval_every == 4 * ac
  assert (c.ddo.alpha, c.ddo.beta, c.model.uncond_ratio) == (50.0, 0.02, 0.5)
  assert (c.optim.b1, c.optim.b2, c.optim.weight_decay, c.optim.clip_norm) == (0.9, 0.95, 0.05, 2.0)
  assert tuple(c.model.eval.cfg) == (1.0, 1.5) and c.model.eval.per_class == 50
  assert (c.model.data.resolution, c.model.data.resize) == (256, 288)
  c.init.checkpoint = "converted"
  config_check.validate(c)
  # The lr of the last optimizer step of a round: still 0.99x peak (METHOD.md §3.4).
  last = float(optim.make_schedule(c.optim)(steps - 1)) / float(np.float32(4e-6))
  assert last == pytest.approx(upstream_lin0(steps - 1, warmup, total, 0.005, 0.1), rel=1e-6)
  assert 0.99 < last < 0.992
