"""VAR family: the gaps are exact sequence log-likelihood differences of the tokenized pixels (checked against
the nets by hand, with label dropout to the null class), zero at the reference; the row weights follow the
same mask; guidance-free negatives are per-key deterministic; one sharded DDO step runs."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import var_imagenet256
from ddo_jax import objective, parallel
from ddo_jax.families import var as var_family
from ddo_jax.nets import var as var_net
from ddo_jax.nets import var_vqvae
from ddo_jax.train import optim, step as step_lib

jax.config.update("jax_default_matmul_precision", "highest")


_SAMPLED = {}


@functools.lru_cache(maxsize=None)
def _setup():
  config = var_imagenet256.get_config("tiny")
  family = var_family.VAR(config.model)
  ref = family.init_params(jax.random.key(0))
  # theta: the reference moved by a small random perturbation (so gaps are nonzero)
  leaves, tdef = jax.tree_util.tree_flatten(ref)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  theta = jax.tree_util.tree_unflatten(
      tdef, [l + 0.05 * jnp.std(l) * jax.random.normal(k, l.shape) + 1e-3 * jax.random.normal(k, l.shape)
             for l, k in zip(leaves, keys)])
  source, _ = family.real_source(0)
  real = source(np.arange(4))
  fake = jax.jit(family.sample)(ref, jax.random.split(jax.random.key(2), 4), jnp.arange(4))
  fake = {k: np.asarray(v) for k, v in fake.items()}
  _SAMPLED.update(fake)
  fake["uncond"] = np.array([False, True, False, True])   # both kinds of pair, as the goldens' mask
  return config, family, ref, theta, {"real": real, "fake": fake}


def _by_hand(family, params, x, labels):
  """seq_logp of the pixels x under params, straight from the nets (its own jitted program)."""
  return np.asarray(_hand_fn(family)(params, jnp.asarray(x), jnp.asarray(labels, jnp.int32)), np.float64)


@functools.lru_cache(maxsize=None)
def _hand_fn(family):
  return jax.jit(functools.partial(_hand, family))


def _hand(family, params, x, labels):
  idx = var_vqvae.img_to_idx(family.vae, family.vae_params, jnp.asarray(x))
  x_in = var_vqvae.idx_to_var_input(family.vae, family.vae_params, idx)
  logits = family.net.apply(params, jnp.asarray(labels, jnp.int32), x_in)
  return var_net.seq_logp(logits, jnp.concatenate(idx, axis=1))


def test_gaps_are_seq_logp_differences_with_null_class_on_dropped_pairs():
  _, family, ref, theta, batch = _setup()
  gr, gf = jax.jit(family.log_ratio)(theta, ref, batch, jax.random.key(5))
  mask = batch["fake"]["uncond"]
  lr = np.where(mask, 10, batch["real"]["label"])
  lf = np.where(mask, 10, batch["fake"]["label"])
  want_r = _by_hand(family, theta, batch["real"]["x"], lr) - _by_hand(family, ref, batch["real"]["x"], lr)
  want_f = _by_hand(family, theta, batch["fake"]["x"], lf) - _by_hand(family, ref, batch["fake"]["x"], lf)
  # The same float32 computation in another program: the sum over L = 30 tokens of log-probabilities of
  # size ~4 (|seq_logp| ~ 125) rounds at ~1e-5, so the tolerance is 1e-6 of that sum.
  scale = np.max(np.abs(_by_hand(family, ref, batch["real"]["x"], lr)))
  print("max |gap - by hand|", np.max(np.abs(np.asarray(gr) - want_r)), np.max(np.abs(np.asarray(gf) - want_f)),
        "tolerance", 1e-6 * scale)
  np.testing.assert_allclose(np.asarray(gr), want_r, rtol=0, atol=1e-6 * scale)
  np.testing.assert_allclose(np.asarray(gf), want_f, rtol=0, atol=1e-6 * scale)
  assert np.min(np.abs(want_r)) > 1e-3 and np.min(np.abs(want_f)) > 1e-3   # the perturbation is visible
  # Without the null class the dropped rows would differ: the mask is applied.
  plain = _by_hand(family, theta, batch["real"]["x"], batch["real"]["label"])
  assert np.all(np.abs(plain[mask] - _by_hand(family, theta, batch["real"]["x"], lr)[mask]) > 1e-3)


def test_gaps_are_zero_at_the_reference_and_weights_follow_the_mask():
  config, family, ref, _, batch = _setup()
  gr, gf = jax.jit(family.log_ratio)(ref, ref, batch, jax.random.key(5))
  np.testing.assert_array_equal(np.asarray(gr), 0.0)
  np.testing.assert_array_equal(np.asarray(gf), 0.0)
  alpha = config.ddo.alpha
  w_real, w_fake, norm = family.ddo_weights(batch, alpha)
  np.testing.assert_array_equal(np.asarray(w_real), [1.0, alpha, 1.0, alpha])
  np.testing.assert_array_equal(np.asarray(w_fake), [alpha, 0.0, alpha, 0.0])
  assert norm == alpha
  loss, _ = objective.ddo_loss(gr, gf, alpha=alpha, beta=config.ddo.beta, weight_real=w_real, weight_fake=w_fake,
                               normalizer=norm)
  # at theta = ref every term is log 2: (2 (1 + alpha) + 2 alpha) log 2 / (4 alpha)
  np.testing.assert_allclose(float(loss), (2 * (1 + alpha) + 2 * alpha) * np.log(2) / (4 * alpha), rtol=1e-6)


def test_negatives_are_guidance_free_pixels_deterministic_per_key():
  _, family, ref, _, _ = _setup()
  keys = jax.random.split(jax.random.key(2), 4)
  out = _SAMPLED   # family.sample(ref, keys, arange(4)), drawn by _setup
  x = np.asarray(out["x"])
  assert x.shape == (4, 64, 64, 3) and x.min() >= -1.0 and x.max() <= 1.0
  assert out["label"].dtype == jnp.int32 and np.all((np.asarray(out["label"]) >= 0) & (np.asarray(out["label"]) < 10))
  assert out["uncond"].dtype == jnp.bool_
  half = jax.jit(family.sample)(ref, keys[:2], jnp.arange(2))   # a sample depends on its key only
  # the same tokens; the decoder's float32 convolutions round differently at batch 2 and 4 (measured 1.6e-5)
  np.testing.assert_allclose(np.asarray(half["x"]), x[:2], rtol=0, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(half["label"]), np.asarray(out["label"])[:2])
  # the label-dropout draw is Bernoulli(uncond_ratio = 0.5) per key
  many = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2), family.uncond_ratio))(
      jax.random.split(jax.random.key(8), 2000))
  assert 0.45 < float(jnp.mean(many)) < 0.55


def test_online_negatives_take_the_classes_of_their_real_rows():
  """sample_paired (the driver's online negatives): fake i is sampled with real i's class (upstream's
  protocol); given the classes `sample` drew for the same keys it draws the same images and dropout mask."""
  _, family, ref, _, _ = _setup()
  keys = jax.random.split(jax.random.key(2), 4)
  paired = jax.jit(family.sample_paired)(ref, keys, jnp.arange(4), {"label": jnp.asarray(_SAMPLED["label"])})
  np.testing.assert_array_equal(np.asarray(paired["label"]), _SAMPLED["label"])
  np.testing.assert_array_equal(np.asarray(paired["uncond"]), _SAMPLED["uncond"])
  np.testing.assert_allclose(np.asarray(paired["x"]), _SAMPLED["x"], rtol=0, atol=1e-4)
  one_hot = jax.nn.one_hot(jnp.array([3, 3, 7, 0]), 10)   # the data's one-hot labels are accepted too
  other = jax.jit(family.sample_paired)(ref, keys, jnp.arange(4), {"label": one_hot})
  np.testing.assert_array_equal(np.asarray(other["label"]), [3, 3, 7, 0])


def test_one_sharded_ddo_step_moves_theta():
  config, family, ref, _, batch = _setup()
  mesh = parallel.make_mesh(-1, 1, devices=jax.devices()[:4])   # batch 4, one row per device
  tx = optim.make_optimizer(config.optim)
  init = functools.partial(step_lib.init_state, tx=tx, ema_specs={})
  shapes = jax.eval_shape(init, ref, jax.random.key(0))
  shardings = parallel.param_shardings(shapes, mesh, [(".*", "replicate")])
  ref_shardings = parallel.param_shardings(jax.eval_shape(lambda: ref), mesh, [(".*", "replicate")])
  state = jax.jit(init, out_shardings=shardings)(ref, jax.random.key(1))
  step = step_lib.make_ddo_step(family, tx, {}, alpha=config.ddo.alpha, beta=config.ddo.beta, batch_size=4,
                                mesh=mesh, shardings=shardings, ref_shardings=ref_shardings,
                                schedule=optim.make_schedule(config.optim))
  state, metrics = step(state, ref, parallel.global_batch(batch, mesh))
  alpha = config.ddo.alpha
  np.testing.assert_allclose(float(metrics["loss"]), (2 * (1 + alpha) + 2 * alpha) * np.log(2) / (4 * alpha),
                             rtol=1e-6)
  moved = jax.tree_util.tree_map(lambda a, b: float(jnp.max(jnp.abs(a - b))), state["params"], ref)
  assert max(jax.tree_util.tree_leaves(moved)) > 0


def test_wrong_family_checkpoint_and_fid_metric_are_refused(tmp_path):
  from ddo_jax import cli
  _, family, *_ = _setup()
  (tmp_path / "model.json").write_text('{"family": "edm2", "net": {}}')
  with pytest.raises(cli.UserError, match="'edm2' checkpoint, not a VAR one"):
    family.check_converted(tmp_path / "model.json")
  config = var_imagenet256.get_config("tiny")
  config.model.metric = "fid_cfg2.0"
  with pytest.raises(cli.UserError, match=r"is not 'nll' or one of \['fid_cfg1.0', 'fid_cfg1.5'\]"):
    var_family.VAR(config.model)
  config.model.metric = "fid_cfg1.0"
  config.model.eval = dict(cfg=(1.0, 1.5), cfg_convention="one_plus_w", per_class=2, ref_stats="", inception="x")
  with pytest.raises(cli.UserError, match="needs model.eval.ref_stats"):
    var_family.VAR(config.model)
  config.model.eval.update(ref_stats="r.npz", cfg_convention="ddo")
  with pytest.raises(cli.UserError, match="cfg_convention"):
    var_family.VAR(config.model)


def test_fid_metrics_score_class_balanced_guided_samples(tmp_path):
  """evaluate with a 'fid_cfg<c>' metric: for each c, per_class samples per class (sample i: class i mod 10, key
  fold_in(key(seed + 30000), i), guidance c under eval.cfg_convention) scored by the Evaluator against the
  reference statistics; the FID and IS equal those of the same images made directly (random Inception)."""
  from ddo_jax.convert import inception_names
  from ddo_jax.metrics import evaluator as evaluator_lib
  from ddo_jax.metrics import reference_stats
  from ddo_jax.convert import var_names
  from tests import test_evaluator
  from tests.goldens import load_npz
  state = load_npz("var", "var", "state.npz")   # the goldens' tiny VAR: its class conditioning is not negligible
  theta = var_names.torch_to_flax(state, var_names.config_from_shapes({k: v.shape for k, v in state.items()},
                                                                      state["lvl_1L"]))
  evaluator_lib.save_inception_npz(
      inception_names.inception_variables_from_state_dict(test_evaluator.hash_inception_state_dict()),
      tmp_path / "inception.npz")
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2048, 64)) * 0.1
  reference_stats.save_stats_npz(tmp_path / "ref.npz", rng.standard_normal(2048) * 0.1, a @ a.T + 0.01 * np.eye(2048))
  config = var_imagenet256.get_config("tiny")
  config.model.metric = "fid_cfg3.5"
  config.model.eval = dict(cfg=(1.0, 3.5), cfg_convention="one_plus_w", per_class=2, top_k=0, top_p=0.0,
                           inception=str(tmp_path / "inception.npz"), ref_stats=str(tmp_path / "ref.npz"),
                           batch_size=16, sample_batch=8)
  family = var_family.VAR(config.model)
  out = family.evaluate(theta, None, seed=3)
  assert set(out) == {"nll", "fid_cfg1.0", "is_cfg1.0", "fid_cfg3.5", "is_cfg3.5"}
  assert all(np.isfinite(v) for v in out.values()), out
  ids = np.arange(8, dtype=np.int32)   # guidance w = 2.5 changes the samples
  a, b = (family._eval_sampler(theta, c)(theta, jax.random.key(3 + 30_000), ids) for c in (1.0, 3.5))
  assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8 and np.any(a != b)
  # the same images made directly: one jitted batch of 20, classes arange(20) % 10
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3 + 30_000), i))(jnp.arange(20))
  opts = dict(cfg=3.5, guidance="one_plus_w", top_k=0, top_p=0.0, more_smooth=False)
  x = jax.jit(lambda p: family._images(p, keys, jnp.arange(20) % 10, opts))(theta)
  imgs = np.floor(np.clip(np.asarray(x), 0, 1) * 255).astype(np.uint8)
  ev = evaluator_lib.Evaluator(evaluator_lib.load_inception(str(tmp_path / "inception.npz")), batch_size=16,
                               ref_stats=reference_stats.load_reference_stats(tmp_path / "ref.npz"))
  ev.add_uint8(imgs)
  want = ev.result()
  # batches of 8 vs 20 may round a decoded pixel differently (+-1 of 255): FID and IS agree to 1e-3 relative
  np.testing.assert_allclose(out["fid_cfg3.5"], want["fid"], rtol=1e-3)
  np.testing.assert_allclose(out["is_cfg3.5"], want["is_mean"], rtol=1e-3)


def test_family_loss_and_gradients_match_goldens_ddo_var_loss():
  """The family's pieces (pair_labels with the mask, token_gaps, ddo_weights) on the goldens' tokens give
  upstream's DDO VAR loss, gaps and every gradient (ddo/var_loss); the tiny config's VAR is the goldens'."""
  from ddo_jax.convert import var_names
  from tests.goldens import load_json, load_npz
  config, family, *_ = _setup()
  state = load_npz("var", "var", "state.npz")
  cfg = var_names.config_from_shapes({k: v.shape for k, v in state.items()}, state["lvl_1L"])
  for k in ("vocab_size", "cvae", "depth", "embed_dim", "num_heads", "num_classes", "patch_nums"):
    assert family.net_config[k] == cfg[k], k
  h = load_json("ddo", "var_loss", "config.json")["hyper"]
  io = load_npz("ddo", "var_loss", "io.npz")
  ref = var_names.torch_to_flax(state, cfg)
  theta = var_names.torch_to_flax(load_npz("ddo", "var_loss", "target_state.npz"), cfg)
  want_grads = load_npz("ddo", "var_loss", "grads.npz")
  batch = {"real": {"label": io["y"]}, "fake": {"label": io["y"], "uncond": io["uncond_mask"]}}
  n = len(io["y"])

  def loss_fn(theta, ref):
    lr, lf = family.pair_labels(batch)
    tokens = jnp.concatenate([io["gt_idx_real"], io["gt_idx_fake"]])
    x_in = jnp.concatenate([io["x_BLCv_real"], io["x_BLCv_fake"]])
    gap = family.token_gaps(theta, ref, tokens, x_in, jnp.concatenate([lr, lf]))
    w_real, w_fake, norm = family.ddo_weights(batch, h["alpha"])
    loss, _ = objective.ddo_loss(gap[:n], gap[n:], alpha=h["alpha"], beta=h["beta"], weight_real=w_real,
                                 weight_fake=w_fake, normalizer=norm)
    return loss, gap

  (loss, gap), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(theta, ref)
  # Tolerances as tests/test_var_net.py argues them: 4e-6 of the largest |logp| for the gaps (a difference
  # of 30-term float32 sums of ~170), the loss error bounded through the slope of the loss in the gaps.
  gap_tol = 4e-6 * float(np.abs(np.concatenate([io[k] for k in ("logp_theta_real", "logp_ref_real",
                                                                 "logp_theta_fake", "logp_ref_fake")])).max())
  gap_err = float(np.abs(np.asarray(gap) - np.concatenate([io["gap_real"], io["gap_fake"]])).max())
  loss_tol = (h["beta"] * (io["w_real"].max() + io["w_fake"].max()) / max(h["alpha"], 1) * gap_tol
              + 4 * np.spacing(np.float32(io["loss"])))
  loss_err = abs(float(loss) - float(io["loss"]))
  got = var_names.flax_to_torch(grads, cfg)
  rel = max(float(np.abs(got[k] - w).max()) / float(np.abs(w).max()) for k, w in want_grads.items())
  print(f"family DDO-VAR: gaps err {gap_err:.2e} (tol {gap_tol:.2e}), loss err {loss_err:.2e} (tol {loss_tol:.2e}), "
        f"gradients worst relative err {rel:.2e} (tol 1e-4)")
  assert gap_err <= gap_tol and loss_err <= loss_tol and rel <= 1e-4


def test_bfloat16_compute_option_gives_the_float32_gaps_to_bfloat16_rounding():
  """model.compute_dtype='bfloat16' (issue 10 §5's option; float32 is the default for parity): the blocks run in
  bfloat16, the logits and log-softmax in float32; gaps and gradients are float32 and near the float32 ones."""
  _, family, ref, theta, batch = _setup()
  c16 = var_imagenet256.get_config("tiny")
  c16.model.compute_dtype = "bfloat16"
  fam16 = var_family.VAR(c16.model)
  g32 = np.concatenate([np.asarray(g) for g in jax.jit(family.log_ratio)(theta, ref, batch, jax.random.key(5))])
  gaps16 = jax.jit(fam16.log_ratio)(theta, ref, batch, jax.random.key(5))
  assert all(g.dtype == jnp.float32 for g in gaps16)
  g16 = np.concatenate([np.asarray(g) for g in gaps16])
  err = np.abs(g16 - g32).max()
  print(f"bfloat16 vs float32 gaps: max err {err:.3e} on gaps up to {np.abs(g32).max():.3e}")
  # bfloat16 keeps 8 mantissa bits; theta and ref run the same bfloat16 blocks on the same tokens, so much of the
  # rounding cancels in the gap: measured 1.7e-3 on gaps of ~0.19 (2026-12-06). 0.05 leaves a wide margin for
  # other CPUs and still fails a sign or scale error in the gaps.
  assert err < 0.05 and np.all(np.isfinite(g16))
  grads = jax.jit(jax.grad(lambda p, b: jnp.sum(fam16.log_ratio(p, ref, b, jax.random.key(5))[0])))(theta, batch)
  assert all(l.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(l))) for l in jax.tree_util.tree_leaves(grads))
