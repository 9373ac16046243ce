"""SongUNet / EDM preconditioning parity with the PyTorch goldens (goldens/edm/ddpmpp_*)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax.convert import edm_names
from ddo_jax.nets import edm_precond
from ddo_jax.nets import songunet
from tests.goldens import load_json, load_npz

ATOL = 1e-5
UNCOND_EXCLUDE = ("model.map_label.weight", "model.map_label.bias")


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def _fixture(name):
  """(config, params, io arrays) of goldens/edm/<name>, weights through torch_to_flax."""
  meta = load_json("edm", name, "config.json")
  config = edm_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
  state = load_npz("edm", "ddpmpp_cond", "state.npz")
  exclude = meta["weights"].get("exclude_keys", [])
  state = {k: v for k, v in state.items() if k not in exclude}
  params = edm_names.torch_to_flax(state, config)
  return config, params, load_npz("edm", name, "io.npz")


@pytest.fixture(scope="module")
def cond():
  return _fixture("ddpmpp_cond")


@pytest.fixture(scope="module")
def uncond():
  return _fixture("ddpmpp_uncond")


def _max_err(got_nhwc, want_nchw):
  return float(np.max(np.abs(_nchw(got_nhwc) - want_nchw)))


def test_fixture_configs_are_what_the_readme_says(cond, uncond):
  for config, label_dim in ((cond[0], 10), (uncond[0], 0)):
    mk = config["model_kwargs"]
    assert config["class_name"] == "EDMPrecond"
    assert mk["label_dim"] == label_dim and mk["augment_dim"] == 9
    assert mk["channel_mult"] == (1, 2) and mk["num_blocks"] == 1 and mk["attn_resolutions"] == (8,)
    assert config["precond_kwargs"]["sigma_data"] == 0.5
  assert sorted(uncond[2]) == ["D", "D_aug", "F", "augment_labels", "sigma", "x"]


def test_cond_parity(cond):
  config, params, io = cond
  net = edm_precond.build_precond(config)
  v = {"params": params}
  x, sigma = _nhwc(io["x"]), jnp.asarray(io["sigma"])
  labels, aug = jnp.asarray(io["class_labels"]), jnp.asarray(io["augment_labels"])
  outs = {
      "D": net.apply(v, x, sigma, labels),
      "D_aug": net.apply(v, x, sigma, labels, augment_labels=aug),
      "D_nolabel": net.apply(v, x, sigma, None),
      "F": net.apply(v, x, sigma, labels, method="raw"),
  }
  errs = {k: _max_err(o, io[k]) for k, o in outs.items()}
  print("cond max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (k, e)
  # the raw flag and the raw method agree
  np.testing.assert_array_equal(np.asarray(net.apply(v, x, sigma, labels, raw=True)),
                                np.asarray(outs["F"]))


def test_uncond_parity(uncond):
  config, params, io = uncond
  assert "map_label" not in params["model"]
  net = edm_precond.build_precond(config)
  v = {"params": params}
  x, sigma = _nhwc(io["x"]), jnp.asarray(io["sigma"])
  outs = {
      "D": net.apply(v, x, sigma),
      "D_aug": net.apply(v, x, sigma, augment_labels=jnp.asarray(io["augment_labels"])),
      "F": net.apply(v, x, sigma, method="raw"),
  }
  errs = {k: _max_err(o, io[k]) for k, o in outs.items()}
  print("uncond max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (k, e)


def test_vp_parity(cond):
  """VPPrecond on the cond weights (io_vp.npz). D = x - sigma*F reaches |D| ~ 340 at sigma 80.

  float32 spacing at 340 is 3e-5 and torch itself moves this D by 1.3e-4 between CPU kernels
  (goldens README), so 1e-5 absolute is impossible for sigma=80. The criterion is 1e-5 on the
  F scale: |dD| <= 1e-5 * max(1, |c_out|) per sample (c_out = -sigma).
  """
  config, params, _ = cond
  io = load_npz("edm", "ddpmpp_cond", "io_vp.npz")
  vp_config = dict(config, class_name="VPPrecond",
                   precond_kwargs=dict(edm_names.PRECOND_DEFAULTS["VPPrecond"]))
  net = edm_precond.build_precond(vp_config)
  d = net.apply({"params": params}, _nhwc(io["x"]), jnp.asarray(io["sigma"]),
                jnp.asarray(io["class_labels"]))
  err = np.abs(_nchw(d) - io["D"]).reshape(len(io["sigma"]), -1).max(axis=1)
  scale = np.maximum(1.0, np.abs(io["sigma"]))
  print("VP max abs error per sample:", err.tolist(), "F-scale:", (err / scale).tolist(),
        "relative to max|D|:", float(err.max() / np.abs(io["D"]).max()))
  assert np.all(err / scale <= ATOL), err / scale
  # the three smallest sigmas (|D| <= ~5) also meet the plain absolute bound
  assert np.all(err[:3] <= ATOL), err


def test_vp_sigma_range():
  net = edm_precond.VPPrecond(model=None)
  assert abs(net.sigma_min - 1.0005e-3) < 1e-6
  assert abs(net.sigma_max - 152.2) < 0.1
  s = jnp.asarray([0.01, 0.5, 3.0, 80.0], jnp.float32)
  # The round trip goes through log(1 + s^2) in float32: rounding 1 + s^2 (<= eps/2 absolute) moves s^2 by
  # eps/(2 s^2) relative and s by eps/(4 s^2), 3e-4 at s = 0.01 (measured 8e-5); the other ops add a few
  # ulp (VPPrecond computes in float32 as upstream does), hence a bound of eps / s^2 + 1e-5 relative.
  eps = np.finfo(np.float32).eps
  got = np.asarray(net.sigma(net.sigma_inv(s)), np.float64)
  np.testing.assert_array_less(np.abs(got - np.asarray(s)) / np.asarray(s), eps / np.asarray(s) ** 2 + 1e-5)


def test_ve_precond_formula(cond):
  config, params, io = cond
  net = edm_precond.build_precond(dict(config, class_name="VEPrecond", precond_kwargs={}))
  v = {"params": params}
  x, sigma, labels = _nhwc(io["x"]), jnp.asarray(io["sigma"]), jnp.asarray(io["class_labels"])
  d = net.apply(v, x, sigma, labels)
  f = net.model.apply({"params": params["model"]}, x, jnp.log(0.5 * sigma), labels)
  np.testing.assert_allclose(np.asarray(d), np.asarray(x + sigma[:, None, None, None] * f),
                             rtol=1e-6, atol=1e-6)


def test_scalar_sigma_broadcasts(cond):
  config, params, io = cond
  net = edm_precond.build_precond(config)
  v = {"params": params}
  x, labels = _nhwc(io["x"]), jnp.asarray(io["class_labels"])
  a = net.apply(v, x, jnp.float32(0.7), labels)
  b = net.apply(v, x, jnp.full((x.shape[0],), 0.7, jnp.float32), labels)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dropout_flag(cond):
  config, params, io = cond
  mk = dict(config["model_kwargs"], dropout=0.2, label_dropout=0.5)
  net = edm_precond.build_precond(dict(config, model_kwargs=mk))
  v = {"params": params}
  x, sigma, labels = _nhwc(io["x"]), jnp.asarray(io["sigma"]), jnp.asarray(io["class_labels"])
  det = net.apply(v, x, sigma, labels)
  np.testing.assert_array_equal(np.asarray(det), np.asarray(
      edm_precond.build_precond(config).apply(v, x, sigma, labels)))
  r1 = net.apply(v, x, sigma, labels, deterministic=False, rngs={"dropout": jax.random.PRNGKey(1)})
  r2 = net.apply(v, x, sigma, labels, deterministic=False, rngs={"dropout": jax.random.PRNGKey(2)})
  assert np.max(np.abs(np.asarray(r1) - np.asarray(det))) > 1e-3
  assert np.max(np.abs(np.asarray(r1) - np.asarray(r2))) > 1e-3
  with pytest.raises(Exception):
    net.apply(v, x, sigma, labels, deterministic=False)  # no 'dropout' rng


def test_init_tree_equals_the_converted_tree(cond):
  """The tree flax init would create (eval_shape; a real init compiles ~100 threefry draws, slow on CPU)."""
  config, params, _ = cond
  net = edm_precond.build_precond(config)
  args = (jnp.zeros((4, 16, 16, 3)), jnp.ones((4,)), jnp.zeros((4, 10)))
  init = jax.eval_shape(net.init, jax.random.PRNGKey(0), *args)["params"]
  shapes = lambda t: jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), np.dtype(a.dtype)), t)
  assert shapes(init) == shapes(params)


def _torch_resample_1d(x, f, up):
  """Reference 1-D resampling along axis 1 with torch conv / conv_transpose semantics (loops)."""
  f = np.asarray(f, np.float64)
  g = f / f.sum() * (2 if up else 1)
  k, p = len(f), (len(f) - 1) // 2
  n = x.shape[1]
  if up:
    out = np.zeros((x.shape[0], 2 * n) + x.shape[2:])
    for i in range(n):
      for j in range(k):
        o = 2 * i + j - p
        if 0 <= o < 2 * n:
          out[:, o] += x[:, i] * g[j]
    return out
  m = (n + 2 * p - k) // 2 + 1
  xp = np.pad(x, [(0, 0), (p, p)] + [(0, 0)] * (x.ndim - 2))
  return np.stack([sum(xp[:, 2 * o + j] * g[j] for j in range(k)) for o in range(m)], axis=1)


@pytest.mark.parametrize("filt", [(1, 1), (1, 3, 3, 1)])
def test_resampling_matches_torch_semantics(filt):
  x = np.random.RandomState(0).randn(2, 8, 8, 3)
  for up, fn in ((True, songunet.upsample), (False, songunet.downsample)):
    want = _torch_resample_1d(_torch_resample_1d(x, filt, up).swapaxes(1, 2), filt, up).swapaxes(1, 2)
    got = np.asarray(fn(jnp.asarray(x, jnp.float32), filt))
    np.testing.assert_allclose(got, want, atol=1e-5)
  if filt == (1, 1):
    xj = jnp.asarray(x, jnp.float32)
    np.testing.assert_array_equal(np.asarray(songunet.upsample(xj, filt)),
                                  np.repeat(np.repeat(np.asarray(xj), 2, 1), 2, 2))


# --- the fast paths keep upstream's arithmetic -------------------------------------------------------------

def _gn_plain(x, scale, bias, groups, eps, silu):
  """GroupNorm (+ SiLU) written out plainly (autodiff reference for the fused custom-VJP op)."""
  xg = x.reshape(x.shape[:-1] + (groups, x.shape[-1] // groups))
  axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
  mean = jnp.mean(xg, axis=axes, keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
  y = ((xg - mean) / jnp.sqrt(var + eps)).reshape(x.shape) * scale + bias
  return y * jax.nn.sigmoid(y) if silu else y


@pytest.mark.parametrize("silu", [False, True])
def test_group_norm_value_and_gradient_against_float64(silu):
  rng = np.random.RandomState(0)
  x = (rng.randn(3, 8, 8, 64) * 2 + 0.5).astype(np.float32)
  x[1] += 20.0                                            # a sample with a large mean (cancellation test)
  scale = (1 + 0.1 * rng.randn(64)).astype(np.float32)
  bias = (0.1 * rng.randn(64)).astype(np.float32)
  ct = rng.randn(3, 8, 8, 64).astype(np.float32)
  f = lambda x, s, b: jnp.sum(songunet.group_norm(x, s, b, 16, 1e-6, silu) * ct)
  got_y = np.asarray(songunet.group_norm(jnp.asarray(x), scale, bias, 16, 1e-6, silu))
  got_g = jax.grad(f, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
  with jax.enable_x64(True):
    a64 = [jnp.asarray(v.astype(np.float64)) for v in (x, scale, bias, ct)]
    want_y = np.asarray(_gn_plain(*a64[:3], 16, 1e-6, silu))
    want_g = jax.grad(lambda x, s, b: jnp.sum(_gn_plain(x, s, b, 16, 1e-6, silu) * a64[3]),
                      argnums=(0, 1, 2))(*a64[:3])
  assert np.max(np.abs(got_y - want_y)) < 1e-5
  for g, w in zip(got_g, want_g):
    w = np.asarray(w)
    assert np.max(np.abs(np.asarray(g) - w)) <= 1e-5 * max(1.0, np.max(np.abs(w))), (silu, np.max(np.abs(w)))


def test_group_norm_module_equals_plain_formula_float32():
  rng = np.random.RandomState(1)
  x = jnp.asarray(rng.randn(2, 4, 4, 32).astype(np.float32))
  gn = songunet.GroupNorm(silu=True)
  v = gn.init(jax.random.PRNGKey(0), x)
  v = {"params": {"scale": jnp.asarray(rng.randn(32).astype(np.float32)),
                  "bias": jnp.asarray(rng.randn(32).astype(np.float32))}}
  got = gn.apply(v, x)
  want = _gn_plain(x, v["params"]["scale"], v["params"]["bias"], 8, songunet.NORM_EPS, True)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-6)


@pytest.mark.parametrize("filt", [(1, 1), (2, 2)])
def test_box_resampling_equals_the_convolution_path(filt):
  x = jnp.asarray(np.random.RandomState(2).randn(2, 6, 8, 5).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(songunet.upsample(x, filt)),
                                np.asarray(songunet._upsample_conv(x, filt)))
  np.testing.assert_allclose(np.asarray(songunet.downsample(x, filt)),
                             np.asarray(songunet._downsample_conv(x, filt)), rtol=0, atol=1e-6)
  odd = x[:, :5]  # odd height: the convolution path (floor division of the size, as torch)
  assert songunet.downsample(odd, filt).shape == (2, 2, 4, 5)
  np.testing.assert_array_equal(np.asarray(songunet.downsample(odd, filt)),
                                np.asarray(songunet._downsample_conv(odd, filt)))


def test_upsampling_skip_runs_at_low_resolution_with_the_same_values():
  x = jnp.asarray(np.random.RandomState(3).randn(2, 4, 4, 6).astype(np.float32))
  conv = songunet.Conv2d(5, 1, up=True)
  v = conv.init(jax.random.PRNGKey(0), x)
  v = {"params": {"kernel": v["params"]["kernel"], "bias": jnp.arange(5, dtype=jnp.float32)}}
  got = conv.apply(v, x)
  k = v["params"]["kernel"]
  want = jax.lax.conv_general_dilated(songunet._upsample_conv(x, (1, 1)), k, (1, 1), ((0, 0), (0, 0)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC")) + v["params"]["bias"]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_qkv_split_equals_upstream_channel_order():
  rng = np.random.RandomState(4)
  x = jnp.asarray(rng.randn(2, 3, 3, 8).astype(np.float32))
  for heads in (1, 2):
    m = songunet.QKV(8, heads)
    v = {"params": {"kernel": jnp.asarray(rng.randn(1, 1, 8, 24).astype(np.float32)),
                    "bias": jnp.asarray(rng.randn(24).astype(np.float32))}}
    q, k, vv = m.apply(v, x)
    full = jnp.einsum("nhwc,co->nhwo", x, v["params"]["kernel"][0, 0]) + v["params"]["bias"]
    full = np.asarray(full).reshape(2, 3, 3, heads, 8 // heads, 3)   # (head, c, {q, k, v}) as upstream
    for i, t in enumerate((q, k, vv)):
      np.testing.assert_allclose(np.asarray(t), full[..., i].reshape(2, 3, 3, 8), rtol=1e-6, atol=1e-6)


def _with_model_kwargs(config, **kw):
  return dict(config, model_kwargs=dict(config["model_kwargs"], **kw))


def test_remat_option_same_values_and_gradients(cond):
  config, params, io = cond
  x, sigma = _nhwc(io["x"]), jnp.asarray(io["sigma"])
  labels = jnp.asarray(io["class_labels"])
  outs, grads = [], []
  for remat in (False, True):
    net = edm_precond.build_precond(_with_model_kwargs(config, remat=remat))
    f = lambda p: jnp.sum(net.apply({"params": p}, x, sigma, labels) ** 2)
    outs.append(np.asarray(net.apply({"params": params}, x, sigma, labels)))
    grads.append(jax.grad(f)(params))
  np.testing.assert_allclose(outs[1], outs[0], rtol=0, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(grads[0]), jax.tree_util.tree_leaves(grads[1])):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6 * float(np.max(np.abs(a))))


def test_bfloat16_option_runs_close_to_float32(cond):
  config, params, io = cond
  x, sigma = _nhwc(io["x"]), jnp.asarray(io["sigma"])
  labels = jnp.asarray(io["class_labels"])
  net = edm_precond.build_precond(_with_model_kwargs(config, compute_dtype="bfloat16"))
  f = net.apply({"params": params}, x, sigma, labels, method="raw")
  assert f.dtype == jnp.float32
  want = _nhwc(io["F"])
  err = float(jnp.max(jnp.abs(f - want)) / jnp.max(jnp.abs(want)))
  print("bfloat16 F: max abs error relative to max|F|", err)
  assert err < 0.1, err
  assert jax.tree_util.tree_structure(
      jax.eval_shape(net.init, jax.random.PRNGKey(0), x, sigma, labels)["params"]) == \
      jax.tree_util.tree_structure(params)
  with pytest.raises(ValueError, match="compute_dtype"):
    edm_precond.build_precond(_with_model_kwargs(config, compute_dtype="float16")).apply(
        {"params": params}, x, sigma, labels)


@pytest.mark.parametrize("k", [1, 3])
def test_conv_nhwc_value_and_gradient_are_the_plain_convolution(k):
  rng = np.random.RandomState(5)
  x = jnp.asarray(rng.randn(2, 6, 6, 4).astype(np.float32))
  w = jnp.asarray(rng.randn(k, k, 4, 5).astype(np.float32))
  ct = jnp.asarray(rng.randn(2, 6, 6, 5).astype(np.float32))
  plain = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), ((k // 2, k // 2),) * 2,
                                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(songunet.conv_nhwc(x, w)), np.asarray(plain(x, w)), rtol=1e-6, atol=1e-6)
  got = jax.jit(jax.grad(lambda x, w: jnp.sum(songunet.conv_nhwc(x, w) * ct), argnums=(0, 1)))(x, w)
  want = jax.jit(jax.grad(lambda x, w: jnp.sum(plain(x, w) * ct), argnums=(0, 1)))(x, w)
  for g, h in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-6, atol=1e-6)
