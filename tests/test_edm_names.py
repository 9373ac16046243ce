"""EDM torch <-> Flax name map: full-size manifests, validation errors, round trip, config parsing."""
import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax.convert import edm_names
from ddo_jax.nets import edm_precond
from tests.goldens import load_json, load_npz


def _manifest(variant):
  return load_json("keys", f"edm-cifar10-32x32-{variant}-vp.json")


def _zeros_state(manifest):
  """Zero arrays of the manifest's shapes, filter buffers at their constructor value 0.25."""
  sd = collections.OrderedDict()
  for key, shape, dtype, kind in manifest["entries"]:
    sd[key] = np.full(shape, 0.25 if kind == "buffer" else 0.0, dtype=np.dtype(dtype))
  return sd


def _tiny():
  meta = load_json("edm", "ddpmpp_cond", "config.json")
  config = edm_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
  return config, load_npz("edm", "ddpmpp_cond", "state.npz")


def _shape_tree(tree):
  return jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), tree)


@pytest.mark.parametrize("variant", ["cond", "uncond"])
def test_full_size_manifest(variant):
  manifest = _manifest(variant)
  config = edm_names.config_from_init_kwargs(manifest["init_kwargs"], manifest["class_name"])
  mk = config["model_kwargs"]
  # docs/ARCHITECTURES.md §2.1 (num_blocks, attn_resolutions, channel_mult_emb are upstream defaults)
  assert config["class_name"] == "EDMPrecond"
  assert (mk["model_channels"], mk["channel_mult"], mk["num_blocks"], mk["attn_resolutions"]) == (
      128, (2, 2, 2), 4, (16,))
  assert (mk["augment_dim"], mk["channel_mult_emb"], mk["channel_mult_noise"]) == (9, 4, 1)
  assert mk["label_dim"] == (10 if variant == "cond" else 0) and mk["dropout"] == 0.13

  state = _zeros_state(manifest)
  params = edm_names.torch_to_flax(state, config)

  # exactly the tree of the full-size Flax model (eval_shape only: nothing runs)
  net = edm_precond.build_precond(config)
  label = jnp.zeros((1, 10)) if variant == "cond" else None
  abstract = jax.eval_shape(net.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), jnp.ones((1,)),
                            label)["params"]
  assert jax.tree_util.tree_structure(_shape_tree(params)) == jax.tree_util.tree_structure(
      _shape_tree(abstract))
  assert _shape_tree(params) == _shape_tree(abstract)
  n_params = sum(int(np.prod(s.shape)) for s in jax.tree_util.tree_leaves(abstract))
  assert n_params == manifest["num_parameters"]

  # and back: the manifest's keys, order, shapes, dtypes and buffers
  back = edm_names.flax_to_torch(params, config)
  assert [(k, list(v.shape), str(v.dtype)) for k, v in back.items()] == [
      (k, s, d) for k, s, d, _ in manifest["entries"]]
  assert len(back) == manifest["num_entries"]
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k])


def test_round_trip_is_bit_exact():
  config, state = _tiny()
  back = edm_names.flax_to_torch(edm_names.torch_to_flax(state, config), config)
  assert list(back) == list(state)
  for k in state:
    assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape
    assert back[k].tobytes() == np.ascontiguousarray(state[k]).tobytes(), k


def test_layout_transposes():
  config, state = _tiny()
  params = edm_names.torch_to_flax(state, config)["model"]
  w = state["model.enc.8x8_block0.qkv.weight"]
  np.testing.assert_array_equal(params["enc_8x8_block0"]["qkv"]["kernel"], w.transpose(2, 3, 1, 0))
  w = state["model.map_layer0.weight"]
  np.testing.assert_array_equal(params["map_layer0"]["kernel"], w.T)
  np.testing.assert_array_equal(params["dec_16x16_aux_norm"]["scale"],
                                state["model.dec.16x16_aux_norm.weight"])
  assert "bias" not in params["map_augment"]
  assert all("resample_filter" not in str(p) for p in jax.tree_util.tree_flatten_with_path(params)[0])


def _error(state, config):
  with pytest.raises(ValueError) as info:
    edm_names.torch_to_flax(state, config)
  return str(info.value)


def test_validation_reports_everything_at_once():
  config, state = _tiny()
  bad = dict(state)
  del bad["model.enc.8x8_block0.proj.bias"]
  bad["model.enc.8x8_block0.extra.weight"] = np.zeros((3,), np.float32)
  bad["model.dec.8x8_in0.conv0.weight"] = np.zeros((64, 64, 1, 1), np.float32)
  bad["model.dec.16x16_up.skip.resample_filter"] = np.full((1, 1, 2, 2), 0.5, np.float32)
  msg = _error(bad, config)
  assert "missing keys (1)" in msg and "model.enc.8x8_block0.proj.bias" in msg
  assert "unexpected keys (1)" in msg and "model.enc.8x8_block0.extra.weight" in msg
  assert "model.dec.8x8_in0.conv0.weight: got [64, 64, 1, 1] vs expected [64, 64, 3, 3]" in msg
  assert "model.dec.16x16_up.skip.resample_filter" in msg
  assert "config_from_init_kwargs" in msg  # says what to do


@pytest.mark.parametrize("case", ["missing", "unexpected", "shape"])
def test_validation_single_problem(case):
  config, state = _tiny()
  bad = dict(state)
  if case == "missing":
    del bad["model.dec.16x16_aux_conv.bias"]
    expect = ["missing keys", "model.dec.16x16_aux_conv.bias"]
  elif case == "unexpected":
    bad["model.map_augment.bias"] = np.zeros((32,), np.float32)
    expect = ["unexpected keys", "model.map_augment.bias"]
  else:
    bad["model.map_label.weight"] = np.zeros((10, 32), np.float32)
    expect = ["shape mismatches", "model.map_label.weight: got [10, 32] vs expected [32, 10]"]
  msg = _error(bad, config)
  for s in expect:
    assert s in msg, (s, msg)


def test_cond_state_against_uncond_config():
  config, state = _tiny()
  uncond = edm_names.config_from_init_kwargs(
      load_json("edm", "ddpmpp_uncond", "config.json")["init_kwargs"])
  msg = _error(state, uncond)
  assert "unexpected keys (2)" in msg and "model.map_label.weight" in msg
  del state["model.map_label.weight"], state["model.map_label.bias"]
  assert "map_label" not in edm_names.torch_to_flax(state, uncond)["model"]
  msg = _error(state, config)
  assert "missing keys (2)" in msg


def test_flax_to_torch_validates():
  config, state = _tiny()
  params = edm_names.torch_to_flax(state, config)
  del params["model"]["map_label"]
  with pytest.raises(ValueError, match="missing leaves"):
    edm_names.flax_to_torch(params, config)


def test_config_from_init_kwargs_defaults_and_types():
  kw = dict(img_resolution=32, img_channels=3, label_dim=np.int64(10), model_type="SongUNet",
            channel_mult=[np.int64(2), 2, 2], dropout=np.float64(0.13), sigma_data=0.5)
  config = edm_names.config_from_init_kwargs(kw, "training.networks.EDMPrecond")
  mk = config["model_kwargs"]
  assert mk["channel_mult"] == (2, 2, 2) and type(mk["channel_mult"][0]) is int
  assert mk["num_blocks"] == 4 and mk["attn_resolutions"] == (16,) and mk["augment_dim"] == 0
  assert mk["in_channels"] == mk["out_channels"] == 3 and mk["label_dim"] == 10
  assert config["precond_kwargs"] == dict(sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5)
  vp = edm_names.config_from_init_kwargs(dict(img_resolution=32, img_channels=3), "VPPrecond")
  assert vp["precond_kwargs"]["beta_d"] == 19.9 and vp["model_kwargs"]["channel_mult"] == (1, 2, 2, 2)


@pytest.mark.parametrize("change,class_name,needle", [
    (dict(encoder_type="residual"), "EDMPrecond", "encoder_type='residual'"),
    (dict(embedding_type="fourier"), "EDMPrecond", "embedding_type='fourier'"),
    (dict(decoder_type="skip"), "EDMPrecond", "decoder_type='skip'"),
    (dict(model_type="DhariwalUNet"), "EDMPrecond", "DhariwalUNet"),
    (dict(model_type=None), "EDMPrecond", "DhariwalUNet"),  # EDMPrecond's default model_type
    (dict(channels_per_head=64), "EDMPrecond", "channels_per_head"),
    (dict(), "iDDPMPrecond", "iDDPMPrecond"),
])
def test_config_rejects_unsupported(change, class_name, needle):
  kw = dict(load_json("edm", "ddpmpp_cond", "config.json")["init_kwargs"])
  for k, v in change.items():
    if v is None:
      kw.pop(k)
    else:
      kw[k] = v
  with pytest.raises(ValueError, match="not supported|unsupported") as info:
    edm_names.config_from_init_kwargs(kw, class_name)
  assert needle in str(info.value)
