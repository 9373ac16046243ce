"""VAR sampler (ddo_jax.sampling.var_sample) against goldens var/sample: greedy (top_k = 1) autoregressive_infer_cfg
with cfg 2.5 on the tiny VAR of var/var and the tiny VQVAE of var/vqvae (weights regenerated from its rule, each
tensor checked against its sha256): tokens equal, per-scale CFG logits, f_hat and the decoded image; one compiled
program for all scales and calls; upstream's top-k / top-p masking rule; the two named guidance conventions.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax.convert import var_names
from ddo_jax.convert import vqvae as vqvae_convert
from ddo_jax.nets import var as var_net
from ddo_jax.nets import var_vqvae as vq
from ddo_jax.sampling import var_sample
from tests import hashweights
from tests.goldens import load_json, load_npz


@functools.lru_cache(maxsize=None)
def _models():
  state = load_npz("var", "var", "state.npz")
  cfg = var_names.config_from_shapes({k: v.shape for k, v in state.items()}, state["lvl_1L"])
  var = var_net.build_var(cfg)
  var_params = var_names.torch_to_flax(state, cfg)
  meta = load_json("var", "vqvae", "config.json")
  kw = meta["init_kwargs"]
  vae = vq.VQVAE(vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"],
                 share_quant_resi=kw["share_quant_resi"], patch_nums=tuple(kw["v_patch_nums"]),
                 quant_resi=kw["quant_resi"], default_qresi_counts=kw["default_qresi_counts"],
                 using_znorm=kw["using_znorm"])
  tensors = [t if t["randomized"] else dict(t, rule="zero") for t in meta["weights"]["tensors"]]
  vae_state = hashweights.regenerate_state_dict(tensors)  # checks every sha256
  vae_params = vqvae_convert.vqvae_params_from_torch(vae_state, vae)
  return var, var_params, vae, vae_params


def _sample(labels, key, **kw):
  var, var_params, vae, vae_params = _models()
  return var_sample.autoregressive_infer_cfg(var, var_params, vae, vae_params, vq, jnp.asarray(labels), key,
                                             **dict(dict(return_logits=True), **kw))


@functools.lru_cache(maxsize=None)
def _greedy():
  call = load_json("var", "sample", "config.json")["call"]
  assert call["top_k"] == 1 and not call["more_smooth"]
  before = var_sample.compile_count()
  out = _sample(np.asarray(call["label_B"]), var_sample.g_seed_key(call["g_seed"]), cfg=call["cfg"],
                guidance="var", top_k=call["top_k"], top_p=call["top_p"], return_logits=True)
  out = jax.device_get(out)
  return out, var_sample.compile_count() - before


def test_greedy_sample_matches_goldens():
  io = load_npz("var", "sample", "io.npz")
  conf = load_json("var", "sample", "config.json")
  out, compiles = _greedy()
  assert compiles == 1  # one program for all the scales
  np.testing.assert_array_equal(io["labels"], conf["call"]["label_B"])
  worst = 0.0
  for si in range(len(out["idx"])):
    np.testing.assert_array_equal(out["idx"][si], io[f"idx_s{si}"], err_msg=f"tokens of scale {si}")
    worst = max(worst, float(np.abs(out["cfg_logits"][si] - io[f"cfg_logits_s{si}"]).max()))
  f_err = float(np.abs(out["f_hat"].transpose(0, 3, 1, 2) - io["f_hat"]).max())
  img_err = float(np.abs(out["image"].transpose(0, 3, 1, 2) - io["image"]).max())
  print(f"VAR sampler: tokens equal at all {len(out['idx'])} scales; CFG logits max err {worst:.2e} (tol 1e-4, "
        f"smallest greedy margin {min(conf['greedy_margin_per_scale']):.3f}), f_hat {f_err:.2e} (tol 1e-5), "
        f"image {img_err:.2e} (tol 1e-5)")
  # CFG logits: the teacher-forced logits' tolerance (upstream moves them by 9e-6 with other kernels).
  assert worst <= 1e-4
  assert f_err <= 1e-5 and img_err <= 1e-5


def test_one_compiled_program_across_scales_and_calls():
  var, _, _, _ = _models()
  _, compiles = _greedy()
  assert compiles == 1
  size = var_sample.cache_size()
  before = var_sample.compile_count()
  # other labels (null class as -1), key, guidance weight and convention, top-k / top-p and more_smooth: the
  # same program (they are data, not compile-time constants)
  for kw in (dict(cfg=2.5, top_k=1), dict(cfg=0.0, top_k=0), dict(cfg=1.4, guidance="one_plus_w", top_k=900,
                                                                  top_p=0.96), dict(cfg=4.0, more_smooth=True)):
    out = _sample(np.asarray([4, -1]), jax.random.key(5), **kw)
    assert [o.shape for o in out["idx"]] == [(2, p * p) for p in var.patch_nums]
  assert var_sample.compile_count() == before
  assert var_sample.cache_size() == size


def _upstream_mask(logits, top_k, top_p):
  """numpy transcription of the rule in ARCHITECTURES.md §7.3 (sample_with_top_k_top_p_), float64 softmax."""
  x = np.array(logits, np.float64)
  if top_k > 0:
    kth = np.sort(x, -1)[..., -top_k][..., None]
    x = np.where(x < kth, -np.inf, x)
  if top_p > 0:
    order = np.argsort(x, -1, kind="stable")
    s = np.take_along_axis(x, order, -1)
    p = np.exp(s - s.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    rm = np.cumsum(p, -1) <= 1 - top_p
    rm[..., -1] = False
    back = np.zeros_like(rm)
    np.put_along_axis(back, order, rm, -1)
    x = np.where(back, -np.inf, x)
  return np.isfinite(x)


@pytest.mark.parametrize("top_k, top_p", [(0, 0.0), (1, 0.0), (5, 0.0), (0, 0.5), (0, 0.96), (7, 0.8), (3, 0.999)])
def test_top_k_top_p_masking_rule(top_k, top_p):
  rng = np.random.default_rng(0)
  logits = (rng.standard_normal((3, 5, 40)) * 3).astype(np.float32)
  logits[0, 0, :4] = logits[0, 0].max() + 1  # ties at the top are all kept by top-k
  got = np.isfinite(np.asarray(var_sample.mask_top_k_top_p(jnp.asarray(logits), top_k, top_p)))
  want = _upstream_mask(logits, top_k, top_p)
  np.testing.assert_array_equal(got, want)
  assert got.any(-1).all()  # the largest is never masked
  if top_k == 1:
    assert got[0, 0, :4].all()


def test_guidance_conventions():
  assert var_sample.guidance_weight(1.0, "var") == 1.0
  assert var_sample.guidance_weight(1.0, "one_plus_w") == 0.0
  assert var_sample.guidance_weight(1.4, "one_plus_w") == pytest.approx(0.4)
  with pytest.raises(ValueError, match="one_plus_w"):
    var_sample.guidance_weight(1.0, "ddo")
  # si = 0 is always unguided; t ramps to w at the last scale
  co = var_sample.guidance_coefficients(2.5, 4)
  assert co[0] == (1.0, 0.0) and co[-1] == (np.float32(3.5), np.float32(2.5))
  # 'one_plus_w' with cfg 1 is 'var' with cfg 0: guidance-free, the logits are the conditional ones
  key = jax.random.key(0)
  a = jax.device_get(_sample(np.asarray([3, 10]), key, cfg=1.0, guidance="one_plus_w", top_k=1,
                             return_logits=True))
  b = jax.device_get(_sample(np.asarray([3, 10]), key, cfg=0.0, guidance="var", top_k=1, return_logits=True))
  for x, y in zip(a["idx"], b["idx"]):
    np.testing.assert_array_equal(x, y)
  # guidance-free logits = teacher-forced conditional logits on the sampled tokens
  var, var_params, vae, vae_params = _models()
  x_in = vq.idx_to_var_input(vae, vae_params, [jnp.asarray(i) for i in b["idx"]])
  tf = np.asarray(jax.jit(var.apply)(var_params, jnp.asarray([3, 10]), x_in))
  np.testing.assert_allclose(np.concatenate(b["cfg_logits"], 1), tf, rtol=0, atol=1e-4)


def test_stochastic_and_more_smooth_paths():
  key = jax.random.key(3)
  labels = np.asarray([1, 2])
  a = jax.device_get(_sample(labels, key, cfg=1.5, top_k=20, top_p=0.9))
  b = jax.device_get(_sample(labels, key, cfg=1.5, top_k=20, top_p=0.9))
  c = jax.device_get(_sample(labels, jax.random.key(4), cfg=1.5, top_k=20, top_p=0.9))
  assert all(np.array_equal(x, y) for x, y in zip(a["idx"], b["idx"]))  # seeded by the key
  assert not all(np.array_equal(x, y) for x, y in zip(a["idx"], c["idx"]))
  s = jax.device_get(_sample(labels, key, cfg=1.5, more_smooth=True))
  img = s["image"]
  assert img.shape == a["image"].shape and np.isfinite(img).all() and img.min() >= 0 and img.max() <= 1
  assert not np.array_equal(img, a["image"])
