"""VAR transformer (ddo_jax.nets.var) against goldens var/var, and the DDO VAR loss against ddo/var_loss.

var/var: teacher-forced logits, per-token and per-sequence log-likelihoods of upstream VAR (tiny, depth 2,
attn_l2_norm with one scale_mul entry above ln 100 so the clamp is exercised, labels including the null class).
ddo/var_loss: METHOD.md §3.2 (label-dropout rows weighted by var_weights), terms, loss, loss at the reference and
every gradient.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax import objective
from ddo_jax.convert import var_names
from ddo_jax.nets import var as var_net
from tests.goldens import load_json, load_npz


@functools.lru_cache(maxsize=None)
def _golden_net():
  state = load_npz("var", "var", "state.npz")
  cfg = var_names.config_from_shapes({k: v.shape for k, v in state.items()}, state["lvl_1L"])
  init = load_json("var", "var", "config.json")["init_kwargs"]
  # the shapes give back the constructor kwargs
  for k in ("depth", "embed_dim", "num_heads", "num_classes", "patch_nums", "mlp_ratio", "attn_l2_norm"):
    assert cfg[k] == (list(init[k]) if k == "patch_nums" else init[k]), k
  cfg["norm_eps"] = init["norm_eps"]
  return var_net.build_var(cfg), cfg, state


@functools.lru_cache(maxsize=None)
def _apply():
  return jax.jit(_golden_net()[0].apply)


def test_config_has_the_clamped_scale_mul():
  _, _, state = _golden_net()
  derived = load_json("var", "var", "config.json")["derived"]
  assert np.float32(derived["max_scale_mul"]) == np.float32(var_net.MAX_SCALE_MUL)
  assert state["blocks.0.attn.scale_mul_1H11"].max() > var_net.MAX_SCALE_MUL  # the clamp is exercised


def test_teacher_forced_logits_and_likelihoods():
  net, cfg, state = _golden_net()
  io = load_npz("var", "var", "io.npz")
  assert (io["labels"] == cfg["num_classes"]).any()  # the null class is among the labels
  params = var_names.torch_to_flax(state, cfg)
  logits = np.asarray(_apply()(params, io["labels"], io["x_BLCv_wo_first_l"]))
  assert logits.shape == io["logits"].shape and logits.dtype == np.float32
  err = np.abs(logits - io["logits"]).max()
  tok = np.asarray(var_net.token_logp(logits, io["gt_idx"]))
  tok_err = np.abs(tok - io["token_logp"]).max()
  seq = np.asarray(var_net.seq_logp(logits, io["gt_idx"]))
  seq_err = np.abs(seq - io["seq_logp"]).max()
  # seq_logp is a float32 sum of L per-token terms of magnitude ~5 (sums ~170). Its error is our per-token error
  # (summed over the row: measured, and held to 1e-5 per token above) plus the rounding of two float32 sums
  # (ours and torch's), each at most ceil(log2 L) ulps-relative of sum |token_logp| for a pairwise (tree)
  # summation. A fixed absolute tolerance would ignore that the sum's ulp is ~1.5e-5 here.
  big_l = io["gt_idx"].shape[1]
  seq_tol = (np.abs(tok - io["token_logp"]).sum(-1)
             + 2 * np.ceil(np.log2(big_l)) * np.finfo(np.float32).eps * np.abs(io["token_logp"]).sum(-1))
  seq_err_rows = np.abs(seq - io["seq_logp"])
  seq_tol_max = float(seq_tol.max())
  print(f"VAR logits max err {err:.2e} (tol 1e-4), token_logp {tok_err:.2e} (tol 1e-5), "
        f"seq_logp {seq_err:.2e} (tol {seq_tol_max:.2e})")
  assert err <= 1e-4
  assert tok_err <= 1e-5
  assert np.all(seq_err_rows <= seq_tol)
  np.testing.assert_allclose(seq, tok.sum(-1), rtol=0, atol=1e-4)


def test_cached_per_scale_path_equals_teacher_forcing():
  net, cfg, state = _golden_net()
  io = load_npz("var", "var", "io.npz")
  params = var_names.torch_to_flax(state, cfg)
  want = np.asarray(_apply()(params, io["labels"], io["x_BLCv_wo_first_l"]))
  first_l = net.patch_nums[0] ** 2
  cache = var_net.empty_cache(net, len(io["labels"]))
  shapes = {jax.tree_util.tree_map(lambda a: a.shape, cache)["k"]}
  step = jax.jit(net.apply, static_argnames=("si", "method"))
  got = []
  for si, (bg, ed) in enumerate(var_net.begin_ends(net.patch_nums)):
    x = None if si == 0 else io["x_BLCv_wo_first_l"][:, bg - first_l:ed - first_l]
    logits, cache = step(params, io["labels"], x, cache, si=si, method=var_net.VAR.decode_scale)
    shapes.add(cache["k"].shape)
    got.append(np.asarray(logits))
  assert len(shapes) == 1  # the cache keeps one static shape over the scales
  err = np.abs(np.concatenate(got, 1) - want).max()
  print(f"VAR cached vs teacher-forced logits max err {err:.2e}")
  assert err <= 1e-5


def test_bfloat16_compute_option_keeps_float32_logits():
  net, cfg, state = _golden_net()
  io = load_npz("var", "var", "io.npz")
  params = var_names.torch_to_flax(state, cfg)
  bf = net.clone(dtype=jnp.bfloat16)
  logits = jax.jit(bf.apply)(params, io["labels"], io["x_BLCv_wo_first_l"])
  assert logits.dtype == jnp.float32
  # bfloat16 has 8 mantissa bits: the logits (|.| <= 8) move by a few percent, not more.
  assert np.abs(np.asarray(logits) - io["logits"]).max() < 0.5


# -- DDO VAR loss ---------------------------------------------------------------------------------------------------


def _var_loss_fn(net, alpha, beta):
  def loss_fn(theta, ref, io):
    def logp(p, x, tokens):
      return var_net.seq_logp(net.apply(p, io["labels_used"], x), tokens)
    ref = jax.lax.stop_gradient(ref)
    gap_real = logp(theta, io["x_BLCv_real"], io["gt_idx_real"]) - logp(ref, io["x_BLCv_real"], io["gt_idx_real"])
    gap_fake = logp(theta, io["x_BLCv_fake"], io["gt_idx_fake"]) - logp(ref, io["x_BLCv_fake"], io["gt_idx_fake"])
    w_real, w_fake, norm = objective.var_weights(alpha, io["uncond_mask"])
    loss, _ = objective.ddo_loss(gap_real, gap_fake, alpha=alpha, beta=beta, weight_real=w_real,
                                 weight_fake=w_fake, normalizer=norm)
    return loss, (gap_real, gap_fake, w_real, w_fake)
  return jax.jit(jax.value_and_grad(loss_fn, has_aux=True))


def test_ddo_var_loss_and_every_gradient_match_goldens():
  net, cfg, state = _golden_net()
  conf = load_json("ddo", "var_loss", "config.json")
  h = conf["hyper"]
  assert h["null_class"] == cfg["num_classes"]
  io = load_npz("ddo", "var_loss", "io.npz")
  target = load_npz("ddo", "var_loss", "target_state.npz")
  want_grads = load_npz("ddo", "var_loss", "grads.npz")
  ref = var_names.torch_to_flax(state, cfg)
  theta = var_names.torch_to_flax(target, cfg)
  np.testing.assert_array_equal(
      io["labels_used"], np.where(io["uncond_mask"], h["null_class"], io["y"]))
  fn = _var_loss_fn(net, h["alpha"], h["beta"])
  (loss, (gr, gf, wr, wf)), grads = fn(theta, ref, io)
  np.testing.assert_array_equal(np.asarray(wr), io["w_real"])
  np.testing.assert_array_equal(np.asarray(wf), io["w_fake"])
  gap_err = max(np.abs(np.asarray(gr) - io["gap_real"]).max(), np.abs(np.asarray(gf) - io["gap_fake"]).max())
  # Each gap is a difference of two 30-term sums of magnitude ~170 whose float32 rounding alone is ~1e-5 (upstream
  # itself moves the gaps by 1.5e-5 with other kernels) and whose terms each carry the logits' ~2e-6 error: the
  # gaps are compared to 4e-6 of the largest |logp| (8e-4 here, inside the goldens' suggested atol 1e-3).
  gap_tol = 1e-6 * float(np.abs(np.concatenate([io[k] for k in ("logp_theta_real", "logp_ref_real",
                                                                 "logp_theta_fake", "logp_ref_fake")])).max()) * 4
  loss_err = abs(float(loss) - float(io["loss"]))
  # |dloss/dgap_i| <= beta * w_i / (N max(alpha, 1)) (the slope of -log sigmoid is <= 1): the loss error is
  # bounded by beta (max w_real + max w_fake) / max(alpha, 1) times the gap error, plus its own rounding.
  loss_tol = (h["beta"] * (io["w_real"].max() + io["w_fake"].max()) / max(h["alpha"], 1) * gap_tol
              + 4 * np.spacing(np.float32(io["loss"])))
  print(f"DDO-VAR gaps max err {gap_err:.2e} (tol {gap_tol:.2e}), loss {loss_err:.2e} (tol {loss_tol:.2e})")
  assert gap_err <= gap_tol
  assert loss_err <= loss_tol
  # Every gradient, as upstream's p.grad, in torch layouts and names.
  got = var_names.flax_to_torch(grads, cfg)
  assert set(want_grads) == {k for k, e in zip(got, var_names.expected_entries(cfg)) if e.kind != "buffer"}
  worst = ("", 0.0)
  for k, want in want_grads.items():
    scale = float(np.abs(want).max())
    assert scale > 0, k
    rel = float(np.abs(got[k] - want).max()) / scale
    worst = max(worst, (k, rel), key=lambda t: t[1])
  # Relative to each tensor's max |g| (upstream's own kernel-to-kernel variation: 7e-8 on gradients of ~0.05).
  print(f"DDO-VAR gradients worst relative err {worst[1]:.2e} at {worst[0]} (tol 1e-4)")
  assert worst[1] <= 1e-4
  # loss at the reference: theta = ref gives zero gaps and (mean w_real + mean w_fake) log 2 / max(alpha, 1).
  # The target's log-likelihood is computed on the differentiated path and the reference's under stop_gradient:
  # XLA may fuse the two 30-term sums (|logp| ~170) differently, so a gap at theta = ref is zero up to the float32
  # rounding of those sums (one ulp of 170 is 1.5e-5; seen on some CPUs): bounded by 8 ulps of the largest |logp|,
  # and the loss by that bound through the slope of -log sigmoid (<= beta w_i / max(alpha, 1) per row).
  (loss_ref, (gr0, gf0, _, _)), _ = fn(ref, ref, io)
  logp_max = np.float32(np.abs(np.concatenate([io["logp_ref_real"], io["logp_ref_fake"]])).max())
  gap0_tol = 8 * float(np.spacing(logp_max))
  gap0_err = max(float(np.abs(np.asarray(gr0)).max()), float(np.abs(np.asarray(gf0)).max()))
  assert gap0_err <= gap0_tol, (gap0_err, gap0_tol)
  loss0_tol = (h["beta"] * (io["w_real"].max() + io["w_fake"].max()) / max(h["alpha"], 1) * gap0_tol
               + 4 * float(np.spacing(np.float32(io["loss_at_ref"]))))
  expected = (io["w_real"].mean() + io["w_fake"].mean()) * np.log(2) / max(h["alpha"], 1)
  print(f"DDO-VAR at ref: gaps {gap0_err:.2e} (tol {gap0_tol:.2e}), "
        f"loss err {abs(float(loss_ref) - float(io['loss_at_ref'])):.2e} (tol {loss0_tol:.2e})")
  assert abs(float(loss_ref) - float(io["loss_at_ref"])) <= loss0_tol
  assert abs(float(loss_ref) - expected) <= loss0_tol + 1e-6
