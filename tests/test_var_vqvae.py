"""VAR's multi-scale VQVAE (ddo_jax.nets.var_vqvae, ddo_jax.convert.vqvae) against the PyTorch goldens.

goldens/var/vqvae: a tiny VQVAE of the vae_ch160v4096z32 class (config.json: init_kwargs, the weight rule with a
sha256 per tensor, the meaning of every array in io.npz); goldens/keys/vae_ch160v4096z32.json: the full-size
key manifest; goldens/formats/var_tiny.pth: a VAR transformer file (the wrong family for the VQVAE reader).

Tolerances: tokens exactly equal; f, f_hat after every scale and the decoded images (clamped and pre-clamp) 1e-5 max
abs. Those arrays are of order 1 (no large sums), so a fixed absolute tolerance is meaningful; the resampling
matrices differ from torch's bicubic / area kernels only in float32 summation order.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax import cli
from ddo_jax.convert import torch_write
from ddo_jax.convert import vqvae as vqvae_convert
from ddo_jax.nets import var_vqvae as vq
from tests import hashweights
from tests.goldens import golden_path, load_json, load_npz

ATOL = 1e-5
_CACHE = {}


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _err(got_nhwc, want_nchw):
  got = np.asarray(got_nhwc, np.float64).transpose(0, 3, 1, 2)
  return float(np.max(np.abs(got - np.asarray(want_nchw, np.float64))))


def _vae_from_kwargs(kw):
  return vq.VQVAE(vocab_size=kw["vocab_size"], z_channels=kw["z_channels"], ch=kw["ch"],
                  share_quant_resi=kw["share_quant_resi"], patch_nums=tuple(kw["v_patch_nums"]),
                  quant_resi=kw.get("quant_resi", 0.5), default_qresi_counts=kw.get("default_qresi_counts", 0),
                  using_znorm=kw.get("using_znorm", False))


def _state():
  """The tiny VQVAE's state dict regenerated from config.json's rule, each tensor checked against its sha256.

  Returns a fresh dict (the arrays shared) so that a caller that drops or replaces entries to test a
  refusal cannot change what later tests see."""
  if "state" not in _CACHE:
    meta = load_json("var", "vqvae", "config.json")
    state, bad = {}, []
    for t in meta["weights"]["tensors"]:
      if t["randomized"]:
        w = hashweights.hash_uniform(t["seed"], tuple(t["shape"]), t["scale"], t["offset"], t["grid"])
      else:  # the constructor buffer ema_vocab_hit_SV (zeros)
        w = np.zeros(t["shape"], np.float32)
      if hashweights.sha256_float32(w) != t["sha256_float32"]:
        bad.append(t["key"])
      state[t["key"]] = w
    assert not bad, f"regenerated weights fail their sha256: {bad}"
    _CACHE["state"] = (meta, state)
  meta, state = _CACHE["state"]
  return meta, dict(state)


def _model():
  if "model" not in _CACHE:
    meta, state = _state()
    vae = _vae_from_kwargs(meta["init_kwargs"])
    _CACHE["model"] = (vae, vqvae_convert.vqvae_params_from_torch(state, vae))
  return _CACHE["model"]


def _outputs():
  if "out" not in _CACHE:
    vae, params = _model()
    io = load_npz("var", "vqvae", "io.npz")

    @jax.jit
    def run(p, img):
      f = vae.apply(p, img, method="encode")
      idx, fhats = vq.f_to_idx_and_fhat(vae, p, f)
      f_hat = vq.idx_to_fhat(vae, p, idx)
      return dict(f=f, idx=idx, fhats=fhats, f_hat=f_hat, rec_img=vq.fhat_to_img(vae, p, f_hat),
                  rec_img_preclamp=vq.fhat_to_img(vae, p, f_hat, clamp=False),
                  idx_direct=vq.img_to_idx(vae, p, img), var_input=vq.idx_to_var_input(vae, p, idx))

    _CACHE["out"] = (jax.device_get(run(params, _nhwc(io["img"]))), io)
  return _CACHE["out"]


def test_phi_index_rule():
  meta, _ = _state()
  kw = meta["init_kwargs"]
  assert vq.phi_index(len(kw["v_patch_nums"]), kw["share_quant_resi"]) == meta["derived"]["phi_index_per_scale"]
  # The released 10 scales (docs/ARCHITECTURES.md §4.3: the float64 ties at si = 2 and 7 resolve downwards).
  assert vq.phi_index(10, 4) == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
  assert vq.phi_index(10, 1) == [0] * 10
  assert vq.phi_index(4, 0) == [0, 1, 2, 3]
  assert _model()[0].img_size == meta["derived"]["img_size"]


def test_resampling_matches_torch_semantics():
  """Bicubic: A = -0.75, source coordinate not clamped, taps clamped; area: adaptive average pooling windows."""
  w = vq.bicubic_matrix(3, 16)
  np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
  # Output 0: s = 0.5 * 3/16 - 0.5 = -0.40625 < 0 -> i0 = -1, t = 0.59375, taps -2..1 clamped to 0, 0, 0, 1.
  t = 0.59375
  a = -0.75
  cc1 = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1
  cc2 = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  np.testing.assert_allclose(w[0], [cc2(t + 1) + cc1(t) + cc1(1 - t), cc2(2 - t), 0.0], atol=1e-7)
  np.testing.assert_array_equal(vq.bicubic_matrix(1, 16), np.ones((16, 1), np.float32))
  np.testing.assert_array_equal(vq.bicubic_matrix(16, 16), np.eye(16, dtype=np.float32))
  m = vq.area_matrix(16, 13)
  assert np.count_nonzero(m[0]) == 2 and np.count_nonzero(m[6]) == 2 and np.count_nonzero(m[12]) == 2
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  x = jnp.arange(2 * 16 * 16 * 3, dtype=jnp.float32).reshape(2, 16, 16, 3)
  np.testing.assert_allclose(vq.area_downsample(x, 4), x.reshape(2, 4, 4, 4, 4, 3).mean(axis=(2, 4)), rtol=1e-6)


def test_tokens_fhat_and_images_match_torch():
  out, io = _outputs()
  meta, _ = _state()
  pns = meta["init_kwargs"]["v_patch_nums"]
  errs = {"f": _err(out["f"], io["f"]), "f_hat": _err(out["f_hat"], io["f_hat"]),
          "rec_img": _err(out["rec_img"], io["rec_img"]),
          "rec_img_preclamp": _err(out["rec_img_preclamp"], io["rec_img_preclamp"])}
  for si, pn in enumerate(pns):
    want = io[f"idx_s{si}"]
    assert out["idx"][si].dtype == np.int32 and out["idx"][si].shape == (want.shape[0], pn * pn)
    np.testing.assert_array_equal(out["idx"][si], want, err_msg=f"tokens of scale {si}")
    np.testing.assert_array_equal(out["idx_direct"][si], want, err_msg=f"img_to_idx scale {si}")
    errs[f"f_hat_s{si}"] = _err(out["fhats"][si], io[f"f_hat_s{si}"])
    errs[f"f_hat_all[{si}]"] = _err(out["fhats"][si], io["f_hat_all"][si])
  print("VQVAE max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (k, e)
  # The clamp is active on this fixture (otherwise rec_img would not test it).
  assert np.abs(io["rec_img_preclamp"]).max() > 1.0
  assert np.abs(out["rec_img"]).max() <= 1.0


def test_var_input_and_next_ar_input_are_consistent():
  """idx_to_var_input = the area-downsampled f_hat after each scale (the golden f_hat_s*), and stepping
  next_ar_input through the scales rebuilds the same inputs and the final f_hat."""
  out, io = _outputs()
  vae, params = _model()
  pns = tuple(vae.patch_nums)
  b, c = io["f"].shape[:2]
  assert out["var_input"].shape == (b, sum(p * p for p in pns) - pns[0] ** 2, c)
  start = 0
  for si in range(len(pns) - 1):
    nxt = pns[si + 1]
    want = np.asarray(vq.area_downsample(_nhwc(io[f"f_hat_s{si}"]), nxt)).reshape(b, nxt * nxt, c)
    got = out["var_input"][:, start:start + nxt * nxt]
    assert float(np.abs(got - want).max()) <= ATOL, si
    start += nxt * nxt
  # The pure functions jit with the module as a static argument (patch_nums static through it).
  again = jax.jit(vq.idx_to_var_input, static_argnums=0)(vae, params, [jnp.asarray(i) for i in out["idx"]])
  np.testing.assert_allclose(np.asarray(again), out["var_input"], atol=1e-6)
  emb = np.asarray(params["params"]["quantize"]["embedding"])
  step = jax.jit(lambda si, f_hat, h: vq.next_ar_input(vae, params, si, f_hat, h), static_argnums=0)
  f_hat = jnp.zeros((b, pns[-1], pns[-1], c), jnp.float32)
  start = 0
  for si, pn in enumerate(pns):
    h = jnp.asarray(emb[out["idx"][si]].reshape(b, pn, pn, c))
    f_hat, nxt_in = step(si, f_hat, h)
    if si < len(pns) - 1:
      nn_ = pns[si + 1]
      assert nxt_in.shape == (b, nn_, nn_, c)
      np.testing.assert_allclose(np.asarray(nxt_in).reshape(b, -1, c),
                                 out["var_input"][:, start:start + nn_ * nn_], atol=1e-6)
      start += nn_ * nn_
    else:
      assert nxt_in is None
  assert _err(f_hat, io["f_hat"]) <= ATOL


def test_full_size_manifest_maps_onto_eval_shape():
  """keys/vae_ch160v4096z32.json converts exactly onto the full VQVAE's eval_shape tree (no extra or missing leaf,
  equal shapes); the training buffer is the only entry without a Flax leaf."""
  man = load_json("keys", "vae_ch160v4096z32.json")
  kw = man["init_kwargs"]
  vae = _vae_from_kwargs(kw)
  assert vae == vq.VQVAE(**vq.vqvae_config_full())
  shapes = {k: tuple(s) for k, s, *_ in man["entries"]}
  assert vqvae_convert.vqvae_state_dict_problems(shapes, vae) == {"missing": [], "unexpected": [], "mismatched": []}
  entries = vqvae_convert.expected_entries(vae)
  params_in_manifest = [e[0] for e in man["entries"] if e[3] == "param"]
  assert [e.torch_key for e in entries] == params_in_manifest  # state_dict order
  abstract = vqvae_convert.abstract_shapes(vae)
  assert {e.flax_path for e in entries} == set(abstract)
  for e in entries:
    flax_shape = abstract[e.flax_path]
    assert vqvae_convert._torch_shape(e.kind, flax_shape) == shapes[e.torch_key], e.torch_key  # pylint: disable=protected-access
  n = vqvae_convert.num_parameters(vae)
  print("vae_ch160v4096z32 parameters:", n)
  assert n == man["num_parameters"]
  assert [e[0] for e in man["entries"] if e[3] == "buffer"] == [vqvae_convert.BUFFER_KEY]
  # The buffer is ignored whatever its first dimension (upstream's load_state_dict replaces it) or absent.
  assert not any(vqvae_convert.vqvae_state_dict_problems(dict(shapes, **{vqvae_convert.BUFFER_KEY: (7, 4096)}),
                                                         vae).values())


def test_round_trip_and_files(tmp_path):
  """torch -> Flax -> torch is exact and in state_dict order (buffer included as zeros); the zip, legacy and
  safetensors files load to the same parameters; the config is read off the shapes."""
  meta, state = _state()
  vae, params = _model()
  back = vqvae_convert.vqvae_params_to_torch(params, vae)
  assert list(back) == [t["key"] for t in meta["weights"]["tensors"]]
  for k, v in back.items():
    assert v.dtype == np.float32
    np.testing.assert_array_equal(v, state[k], err_msg=k)
  # Bare trees are accepted too.
  key = "quantize.quant_resi.qresi_ls.1.weight"
  np.testing.assert_array_equal(vqvae_convert.vqvae_params_to_torch(params["params"], vae)[key], state[key])
  torch_write.save_torch_zip(state, tmp_path / "vae.pth")
  torch_write.save_safetensors(state, tmp_path / "vae.safetensors")
  for name in ("vae.pth", "vae.safetensors"):
    vae2, params2 = vqvae_convert.load_vqvae_file(tmp_path / name, patch_nums=vae.patch_nums)
    assert vae2 == vae, name
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_torch_written_files(tmp_path):
  """Files written by torch itself (zip and legacy non-zip torch.save) load to the same parameters."""
  torch = pytest.importorskip("torch")
  _, state = _state()
  vae, params = _model()
  tensors = {k: torch.from_numpy(v.copy()) for k, v in state.items()}
  torch.save(tensors, tmp_path / "zip.pth")
  torch.save(tensors, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
  for name in ("zip.pth", "legacy.pth"):
    _, params2 = vqvae_convert.load_vqvae_file(tmp_path / name, vae)
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)


def test_full_size_shapes():
  """The released config end to end under eval_shape: tokens per scale, teacher-forcing input [B, 679, 32], image."""
  vae = vq.VQVAE(**vq.vqvae_config_full())
  params = {"params": vq.abstract_params(vae)}
  img = jax.ShapeDtypeStruct((2, vae.img_size, vae.img_size, 3), jnp.float32)

  def run(p, x):
    idx = vq.img_to_idx(vae, p, x)
    return idx, vq.idx_to_var_input(vae, p, idx), vq.fhat_to_img(vae, p, vq.idx_to_fhat(vae, p, idx))

  idx, var_in, out = jax.eval_shape(run, params, img)
  assert [i.shape for i in idx] == [(2, p * p) for p in vae.patch_nums] and idx[0].dtype == jnp.int32
  assert var_in.shape == (2, 679, 32) and out.shape == (2, 256, 256, 3)


@pytest.mark.parametrize("name", ["var_tiny.pth", "var_tiny_legacy.pth", "var_tiny.safetensors"])
def test_wrong_family_file(name):
  with pytest.raises(cli.UserError) as info:
    vqvae_convert.load_vqvae_file(golden_path("formats", name))
  msg = str(info.value)
  assert msg.startswith("error: ") and "VAR transformer" in msg and "(--src)" in msg and "\n" not in msg


def test_wrong_family_and_broken_dicts():
  vae, _ = _model()
  _, state = _state()
  var_state = load_npz("var", "var", "state.npz")
  problems = vqvae_convert.vqvae_state_dict_problems({k: v.shape for k, v in var_state.items()}, vae)
  assert len(problems["missing"]) == len(vqvae_convert.expected_entries(vae)) and problems["unexpected"]
  with pytest.raises(ValueError, match="VAR transformer"):
    vqvae_convert.vqvae_params_from_torch(var_state, vae)
  broken = dict(state)
  del broken["quant_conv.bias"]
  broken["encoder.conv_in.weight"] = broken["encoder.conv_in.weight"][:, :2]
  broken["decoder.extra.weight"] = np.zeros(3, np.float32)
  problems = vqvae_convert.vqvae_state_dict_problems({k: v.shape for k, v in broken.items()}, vae)
  assert problems["missing"] == ["quant_conv.bias"] and problems["unexpected"] == ["decoder.extra.weight"]
  assert problems["mismatched"] == [f"encoder.conv_in.weight: got [{vae.ch}, 2, 3, 3] vs expected [{vae.ch}, 3, 3, 3]"]
  with pytest.raises(ValueError, match="quant_conv.bias"):
    vqvae_convert.vqvae_params_from_torch(broken, vae)


def test_wrong_sizes_and_unreadable_files(tmp_path):
  vae, _ = _model()
  _, state = _state()
  broken = dict(state)
  del broken["quant_conv.bias"]
  torch_write.save_torch_zip(broken, tmp_path / "broken.pth")
  with pytest.raises(cli.UserError, match=r"missing keys \(quant_conv.bias\)"):
    vqvae_convert.load_vqvae_file(tmp_path / "broken.pth", vae)
  # The full-size model against the tiny file: shape mismatches, one line.
  with pytest.raises(cli.UserError) as info:
    vqvae_convert.load_vqvae_file(tmp_path / "broken.pth", vq.VQVAE(**vq.vqvae_config_full()))
  assert "shape mismatches" in str(info.value) and "\n" not in str(info.value)
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
  with pytest.raises(cli.UserError, match="cannot read"):
    vqvae_convert.load_vqvae_file(tmp_path / "junk.pth")
  with pytest.raises(cli.UserError, match="no such file"):
    vqvae_convert.load_vqvae_file(tmp_path / "absent.pth")


@pytest.mark.parametrize("share,quant_resi,phi_keys", [
    (1, 0.5, ["quantize.quant_resi.qresi.weight"]),
    (0, 0.5, [f"quantize.quant_resi.{k}.weight" for k in range(4)]),
    (2, -0.5, [f"quantize.quant_resi.qresi_ls.{k}.weight" for k in range(2)]),
    (4, 0.0, []),
])
def test_other_phi_sharings_map_onto_the_flax_tree(share, quant_resi, phi_keys):
  """PhiShared (1), PhiNonShared (0), PhiPartiallyShared (K) and the identity phi (quant_resi 0): the name map
  covers the Flax tree exactly, and the config is read back off the shapes."""
  vae = vq.VQVAE(vocab_size=16, z_channels=4, ch=32, share_quant_resi=share, patch_nums=(1, 2, 3, 4),
                 quant_resi=quant_resi)
  keys = [e.torch_key for e in vqvae_convert.expected_entries(vae)]
  assert [k for k in keys if k.startswith("quantize.quant_resi") and k.endswith(".weight")] == phi_keys
  shapes = {e.torch_key: e.torch_shape for e in vqvae_convert.expected_entries(vae)}
  cfg = vqvae_convert.config_from_state_dict(shapes, patch_nums=vae.patch_nums)
  assert cfg["share_quant_resi"] == (share if phi_keys else 4) and cfg["vocab_size"] == 16 and cfg["ch"] == 32
  assert cfg["quant_resi"] == (0.5 if phi_keys else 0.0)
  # ticks: one phi -> all 0; 4 non-shared -> linspace(1/12, 11/12, 4); 2 shared -> linspace(1/4, 3/4, 2).
  assert vq.phi_index(4, share) == {1: [0, 0, 0, 0], 0: [0, 1, 2, 3], 2: [0, 0, 1, 1], 4: [0, 1, 2, 3]}[share]


def test_converted_folder_and_export(tmp_path):
  """convert_vqvae_file -> save_converted -> load_converted gives the same model and parameters; export_vqvae
  writes the upstream state dict (buffer included) that the reader takes back."""
  _, state = _state()
  vae, params = _model()
  torch_write.save_torch_zip(state, tmp_path / "vae.pth")
  vae2, variables, report = vqvae_convert.convert_vqvae_file(tmp_path / "vae.pth", patch_nums=vae.patch_nums)
  assert vae2 == vae and report["param_count"] == vqvae_convert.num_parameters(vae)
  assert report["buffer_shape"] == list(state[vqvae_convert.BUFFER_KEY].shape)
  out = vqvae_convert.save_converted(tmp_path / "conv", vae2, variables, report)
  vae3, params3 = vqvae_convert.load_converted(out)
  assert vae3 == vae
  jax.tree_util.tree_map(np.testing.assert_array_equal, params3, params)
  with pytest.raises(cli.UserError, match="no model.json"):
    vqvae_convert.load_converted(tmp_path)
  exported = vqvae_convert.export_vqvae(params3, vae, tmp_path / "back.safetensors")
  reread = torch_write.load_safetensors(tmp_path / "back.safetensors")
  assert sorted(reread) == sorted(exported) == sorted(state)
  for k in state:
    np.testing.assert_array_equal(reread[k], state[k], err_msg=k)
