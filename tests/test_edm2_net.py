"""EDM2 U-Net / Precond parity with the PyTorch goldens (goldens/edm2/precond_*, train_mode), the forced
weight normalization, and the torch <-> Flax name map against the full-size key manifests (goldens/keys)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax.convert import edm2_names
from ddo_jax.nets import edm2_unet
from tests.goldens import load_json, load_npz

ATOL = 1e-5
PRECONDS = ("precond_img", "precond_latent", "precond_guide")
MANIFESTS = {  # parameter counts stated in the issue (docs/ARCHITECTURES.md §3.1)
    "edm2-img64-s": 280_209_381,
    "edm2-img512-l": 777_498_085,
    "edm2-img512-xs": 124_713_253,
}


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def _err(got, want):
  got = np.asarray(got)
  return float(np.max(np.abs((_nchw(got) if got.ndim == 4 else got) - want)))


def _state(name):
  """The fixture's full torch state_dict (shared tensors and overrides as its config.json says)."""
  meta = load_json("edm2", name, "config.json")
  weights = meta["weights"]
  state = load_npz("edm2", name, *weights["file"].split("/"))
  if "override_file" in weights:
    override = load_npz("edm2", name, weights["override_file"])
    assert sorted(override) == sorted(weights["override_keys"])
    state.update(override)  # same keys: the order of the dict is unchanged
  return meta, state


def _fixture(name):
  meta, state = _state(name)
  config = edm2_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
  return config, state, load_npz("edm2", name, "io.npz")


_OUTPUTS = {}


def _outputs(name):
  """Every output of one fixture from one jitted program (compiling once per fixture keeps this fast)."""
  if name in _OUTPUTS:
    return _OUTPUTS[name]
  config, state, io = _fixture(name)
  net = edm2_unet.build_precond(config)
  net_g16 = edm2_unet.build_precond(config, gain_dtype="float16")
  v32 = edm2_names.torch_to_flax(state, config)
  # The released pickles' storage: every tensor float16 (lossless here: the values lie on the f16 grid).
  v16 = edm2_names.torch_to_flax({k: a.astype(np.float16) for k, a in state.items()}, config, dtype=None)
  assert v16["params"]["unet"]["out_gain"].dtype == np.float16

  @jax.jit
  def run(v32, v16, x, sigma, labels):
    d, logvar = net.apply(v32, x, sigma, labels, return_logvar=True)
    d16, logvar16 = net.apply(v16, x, sigma, labels, return_logvar=True)
    dg16, logvarg16 = net_g16.apply(v32, x, sigma, labels, return_logvar=True)
    return dict(D=d, logvar=logvar, D_nolabel=net.apply(v32, x, sigma, None),
                F=net.apply(v32, x, sigma, labels, method="raw"),
                D_fp16w=d16, logvar_fp16w=logvar16, D_gain16=dg16, logvar_gain16=logvarg16)

  out = run(v32, v16, _nhwc(io["x"]), jnp.asarray(io["sigma"]), jnp.asarray(io["class_labels"]))
  _OUTPUTS[name] = (config, jax.device_get(out), io)
  return _OUTPUTS[name]


def test_fixture_configs():
  for name in PRECONDS:
    meta = load_json("edm2", name, "config.json")
    config = edm2_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
    uk = config["unet_kwargs"]
    for k, v in meta["unet_defaults_not_overridden"].items():  # upstream defaults, as the fixture used them
      assert uk[k] == (tuple(v) if isinstance(v, list) else v), (name, k)
    for k, v in meta["init_kwargs"].items():
      got = config[k] if k in config else uk[k]
      assert got == (tuple(v) if isinstance(v, list) else v), (name, k)
    assert config["class_name"] == "Precond"


@pytest.mark.parametrize("name", PRECONDS)
def test_precond_parity(name):
  _, out, io = _outputs(name)
  errs = {k: _err(out[k], io[k]) for k in ("D", "logvar", "D_nolabel", "F", "D_fp16w", "logvar_fp16w")}
  print(name, "max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (name, k, e)
  # The fp16 gain rounding is real: float32 gains miss D_fp16w by far more than the tolerance ...
  assert _err(out["D"], io["D_fp16w"]) > 10 * ATOL
  # ... and gain_dtype='float16' on float32 weights reproduces it (a converted fp16 checkpoint kept in f32).
  assert _err(out["D_gain16"], io["D_fp16w"]) <= ATOL
  assert _err(out["logvar_gain16"], io["logvar_fp16w"]) <= ATOL


def test_forced_weight_normalization_train_mode():
  """goldens/edm2/train_mode: one train-mode forward of precond_guide normalizes every MPConv weight."""
  meta = load_json("edm2", "train_mode", "config.json")
  config, state, _ = _fixture("precond_guide")
  after = load_npz("edm2", "train_mode", "state_after.npz")
  io = load_npz("edm2", "train_mode", "io.npz")
  changed, unchanged = meta["state_after"]["keys_changed"], meta["state_after"]["keys_unchanged"]
  assert sorted(changed + unchanged) == sorted(state) and sorted(after) == sorted(changed)

  before = edm2_names.torch_to_flax(state, config)
  projected = dict(before, params=jax.jit(edm2_unet.forced_weight_normalization)(before["params"]))
  got = edm2_names.flax_to_torch(projected, config)
  errs = {k: float(np.max(np.abs(got[k] - after[k]))) for k in changed}
  worst = max(errs, key=errs.get)
  print("forced weight normalization: max abs error", errs[worst], "at", worst,
        "; bit-exact tensors:", sum(e == 0 for e in errs.values()), "of", len(errs))
  assert errs[worst] <= ATOL
  for k in changed:  # the fixture's weights are not unit-norm: the projection moves every one of them
    assert np.max(np.abs(state[k] - after[k])) > 1e-2, k
  for k in unchanged:  # gains and Fourier buffers untouched, bit for bit
    np.testing.assert_array_equal(got[k], state[k], err_msg=k)

  net = edm2_unet.build_precond(config)
  fn = jax.jit(lambda v: net.apply(v, _nhwc(io["x"]), jnp.asarray(io["sigma"]),
                                   jnp.asarray(io["class_labels"]), return_logvar=True))
  (d_before, lv_before), (d_after, lv_after) = fn(before), fn(projected)
  # Train mode in torch = eval mode on the projected weights (the forward normalizes them once more).
  errs = {"D_eval_before": _err(d_before, io["D_eval_before"]),
          "logvar_eval_before": _err(lv_before, io["logvar_eval_before"]),
          "D_train": _err(d_after, io["D_train"]), "logvar_train": _err(lv_after, io["logvar_train"]),
          "D_eval_after": _err(d_after, io["D_eval_after"]),
          "logvar_eval_after": _err(lv_after, io["logvar_eval_after"])}
  print("train_mode max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (k, e)


def test_forced_weight_normalization_function():
  config, state, _ = _fixture("precond_guide")
  params = edm2_names.torch_to_flax(state, config)["params"]
  fwn = jax.jit(edm2_unet.forced_weight_normalization, static_argnames="exclude")
  proj = fwn(params)
  assert jax.tree_util.tree_structure(proj) == jax.tree_util.tree_structure(params)
  rms = lambda k: np.sqrt(np.mean(np.asarray(k, np.float64).reshape(-1, k.shape[-1]) ** 2, axis=0))
  k0 = params["unet"]["dec_8x8_in0"]["attn_qkv"]["kernel"]  # [1, 1, in, out]
  k1 = proj["unet"]["dec_8x8_in0"]["attn_qkv"]["kernel"]
  # unit rms per output channel, up to the eps: rms(w) / (1e-4 + rms(w))
  np.testing.assert_allclose(rms(k1), rms(k0) / (1e-4 + rms(k0)), rtol=1e-6)
  np.testing.assert_array_equal(proj["unet"]["out_gain"], params["unet"]["out_gain"])
  # the same math as the forward's normalize: the projection then leaves the effective weights unchanged
  # up to the eps (and is therefore idempotent to about 1e-4 relative)
  again = fwn(proj)
  np.testing.assert_allclose(np.asarray(again["unet"]["out_conv"]["kernel"]),
                             np.asarray(proj["unet"]["out_conv"]["kernel"]), rtol=2e-4)
  # exclude: a step that does not compute logvar leaves logvar_linear as upstream does
  part = fwn(params, exclude=("logvar_linear",))
  np.testing.assert_array_equal(part["logvar_linear"]["kernel"], params["logvar_linear"]["kernel"])
  np.testing.assert_array_equal(np.asarray(part["unet"]["emb_noise"]["kernel"]),
                                np.asarray(proj["unet"]["emb_noise"]["kernel"]))
  # dtype preserved (a float16 tree stays float16)
  p16 = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float16), params)
  assert fwn(p16)["unet"]["emb_label"]["kernel"].dtype == jnp.float16


@pytest.mark.parametrize("model", sorted(MANIFESTS))
def test_full_size_manifest(model):
  """Each key of the released checkpoint maps by the name rule onto the eval_shape tree, and back."""
  manifest = load_json("keys", f"{model}.json")
  config = edm2_names.config_from_init_kwargs(manifest["init_kwargs"], manifest["class_name"])
  net = edm2_unet.build_precond(config)
  abstract = edm2_unet.abstract_variables(net)  # jax.eval_shape: nothing is allocated
  assert sorted(abstract) == ["buffers", "params"]
  tree = {col: {tuple(getattr(p, "key") for p in path): tuple(leaf.shape)
                for path, leaf in jax.tree_util.tree_flatten_with_path(abstract[col])[0]}
          for col in abstract}

  mapped = {"params": {}, "buffers": {}}
  for key, shape, dtype, kind in manifest["entries"]:
    assert dtype == "float16"
    col, path = edm2_names.torch_to_flax_path(key)
    assert col == {"param": "params", "buffer": "buffers"}[kind], key
    if key.endswith(".weight"):  # torch [out, in, kh, kw] / [out, in] -> Flax [kh, kw, in, out] / [in, out]
      shape = [shape[2], shape[3], shape[1], shape[0]] if len(shape) == 4 else shape[::-1]
    assert path not in mapped[col], key
    mapped[col][path] = tuple(shape)
  assert mapped == tree  # the same names and shapes, nothing left over on either side

  n_params = sum(int(np.prod(s)) for s in tree["params"].values())
  n_buffers = sum(int(np.prod(s)) for s in tree["buffers"].values())
  print(model, "params", n_params, "buffers", n_buffers, "entries", len(manifest["entries"]))
  # The manifest's num_parameters counts torch Parameters only (the Fourier buffers are not in it).
  assert n_params == manifest["num_parameters"] == MANIFESTS[model]
  assert edm2_names.num_parameters(config) == n_params
  assert n_buffers == 2 * (config["logvar_channels"] + config["unet_kwargs"]["model_channels"])

  # expected_entries lists the manifest exactly: keys, state_dict order, torch shapes, kinds.
  entries = edm2_names.expected_entries(config)
  assert [(e.torch_key, list(e.torch_shape)) for e in entries] == [
      (k, s) for k, s, _, _ in manifest["entries"]]
  assert len(entries) == manifest["num_entries"]


def test_round_trip_and_order():
  config, state, _ = _fixture("precond_img")
  v = edm2_names.torch_to_flax(state, config)
  assert v["params"]["unet"]["enc_16x16_conv"]["kernel"].shape == (3, 3, 4, 32)
  np.testing.assert_array_equal(v["params"]["unet"]["enc_8x8_block0"]["attn_qkv"]["kernel"],
                                state["unet.enc.8x8_block0.attn_qkv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(v["params"]["unet"]["emb_label"]["kernel"], state["unet.emb_label.weight"].T)
  np.testing.assert_array_equal(v["buffers"]["logvar_fourier"]["phases"], state["logvar_fourier.phases"])
  assert v["params"]["unet"]["dec_8x8_in0"]["emb_gain"].shape == ()
  back = edm2_names.flax_to_torch(v, config)
  assert list(back) == list(state)  # state.npz is in state_dict() order
  for k in state:
    assert back[k].shape == state[k].shape and back[k].tobytes() == state[k].tobytes(), k
  back16 = edm2_names.flax_to_torch(v, config, dtype=np.float16)
  assert all(a.dtype == np.float16 for a in back16.values())


def test_validation_reports_everything_at_once():
  config, state, _ = _fixture("precond_img")
  bad = dict(state)
  del bad["unet.dec.8x8_in0.emb_gain"]
  bad["unet.enc.16x16_conv.bias"] = np.zeros((32,), np.float32)
  bad["unet.out_conv.weight"] = np.zeros((4, 32, 3, 3), np.float32)
  with pytest.raises(ValueError) as info:
    edm2_names.torch_to_flax(bad, config)
  msg = str(info.value)
  assert "missing keys (1)" in msg and "unet.dec.8x8_in0.emb_gain" in msg
  assert "unexpected keys (1)" in msg and "unet.enc.16x16_conv.bias" in msg
  assert "unet.out_conv.weight: got [4, 32, 3, 3] vs expected [3, 32, 3, 3]" in msg
  assert "config_from_init_kwargs" in msg


def test_config_rejects_unknown():
  kw = dict(load_json("edm2", "precond_img", "config.json")["init_kwargs"])
  with pytest.raises(ValueError, match="unknown constructor kwargs"):
    edm2_names.config_from_init_kwargs(dict(kw, embedding_type="fourier"))
  with pytest.raises(ValueError, match="not supported"):
    edm2_names.config_from_init_kwargs(kw, "training.networks.EDMPrecond")


def test_gradients_reach_every_parameter_and_no_buffer():
  config, state, io = _fixture("precond_guide")
  net = edm2_unet.build_precond(config)
  v = edm2_names.torch_to_flax(state, config)
  x, sigma, labels = _nhwc(io["x"]), jnp.asarray(io["sigma"]), jnp.asarray(io["class_labels"])
  probe = jnp.asarray(np.random.default_rng(0).standard_normal(x.shape), jnp.float32)

  @jax.jit
  def grads(v):
    def loss(v):
      d, logvar = net.apply(v, x, sigma, labels, return_logvar=True)
      return jnp.sum(d * probe) + jnp.sum(logvar)
    return jax.grad(loss)(v)

  g = grads(v)
  for path, leaf in jax.tree_util.tree_flatten_with_path(g["params"])[0]:
    assert np.max(np.abs(np.asarray(leaf))) > 0, jax.tree_util.keystr(path)
  for path, leaf in jax.tree_util.tree_flatten_with_path(g["buffers"])[0]:
    assert np.max(np.abs(np.asarray(leaf))) == 0, jax.tree_util.keystr(path)


def test_scalar_sigma_and_init_tree():
  config, state, io = _fixture("precond_guide")
  v = edm2_names.torch_to_flax(state, config)
  # the tree init would create is the converted tree (shapes and dtypes)
  net = edm2_unet.build_precond(config)
  abstract = edm2_unet.abstract_variables(net)
  spec = lambda t: jax.tree_util.tree_map(lambda a: (tuple(np.shape(a)), np.dtype(a.dtype)), t)
  assert spec(abstract) == spec(v)
  x, labels = _nhwc(io["x"]), jnp.asarray(io["class_labels"])

  @jax.jit
  def run(v):
    vector = net.apply(v, x, jnp.full((x.shape[0],), 0.7, jnp.float32), labels, return_logvar=True)
    scalar = net.apply(v, x, jnp.float32(0.7), labels, return_logvar=True)
    return vector, scalar

  vector, scalar = jax.device_get(run(v))
  assert scalar[1].shape == (x.shape[0],)  # a scalar sigma broadcasts over the batch (D and logvar [B])
  for a, b in zip(scalar, vector):
    np.testing.assert_array_equal(a, b)


def test_block_dropout_and_init():
  """Dropout (the img512-L config has 0.1) acts only when not deterministic; init gains are zero."""
  block = edm2_unet.Block(8, flavor="dec", attention=True, channels_per_head=4, dropout=0.2)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 4, 6))
  emb = jax.random.normal(jax.random.PRNGKey(1), (2, 5))
  v = jax.jit(block.init)(jax.random.PRNGKey(2), x, emb)
  p = v["params"]
  assert sorted(p) == ["attn_proj", "attn_qkv", "conv_res0", "conv_res1", "conv_skip", "emb_gain",
                       "emb_linear"]
  assert p["emb_gain"].shape == () and float(p["emb_gain"]) == 0.0
  assert p["attn_qkv"]["kernel"].shape == (1, 1, 8, 24) and p["conv_res0"]["kernel"].shape == (3, 3, 6, 8)
  v = {"params": dict(p, emb_gain=jnp.float32(0.7))}

  @jax.jit
  def run(v, key):
    det = block.apply(v, x, emb)
    r1 = block.apply(v, x, emb, deterministic=False, rngs={"dropout": key})
    r2 = block.apply(v, x, emb, deterministic=False, rngs={"dropout": key + 1})
    return det, r1, r2

  det, r1, r2 = (np.asarray(a) for a in run(v, jax.random.PRNGKey(3)))
  nodrop = edm2_unet.Block(8, flavor="dec", attention=True, channels_per_head=4)
  np.testing.assert_allclose(det, np.asarray(jax.jit(nodrop.apply)(v, x, emb)), rtol=0, atol=1e-6)
  assert np.max(np.abs(r1 - det)) > 1e-3 and np.max(np.abs(r1 - r2)) > 1e-3
