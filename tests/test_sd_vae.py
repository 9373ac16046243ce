"""SD VAE (diffusers AutoencoderKL, sd-vae-ft-mse family) and EDM2's encoders against the PyTorch goldens.

goldens/sd_vae: a tiny AutoencoderKL in diffusers folder format (config.json + safetensors), its encode /
decode outputs (io.npz) and EDM2's StabilityVAEEncoder conventions on it (edm2_encoder_io.npz);
goldens/keys/sd-vae-ft-mse.json: the full-size key manifest; goldens/edm2/dpmv3_sampler: images that
StandardRGBEncoder.decode made from the sampler's final states.

Tolerance: 1e-5 max abs on every float output (float32, 'highest' matmuls, set in conftest). The outputs
are of order 1 to 6 (no large sums), so a fixed absolute tolerance is meaningful here; the goldens README
measured 1e-6 to 5e-6 between PyTorch CPU kernels alone. uint8 pixels may differ by one where a value lies
within rounding error of an integer boundary (the README saw 2 of 6144 flip from a memory-layout change).
"""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax.convert import sd_vae as sd_vae_convert
from ddo_jax.convert import torch_write
from ddo_jax.nets import edm2_encoders, sd_vae
from tests.goldens import golden_path, load_json, load_npz

ATOL = 1e-5


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


def _err(got, want):
  return float(np.max(np.abs(_nchw(got).astype(np.float64) - np.asarray(want, np.float64))))


def _folder():
  return golden_path("sd_vae", "diffusers_tiny")


def _hash_uniform(seed, scale, offset, shape, grid):
  """The goldens' weight rule (goldens/README.md): counter-based fmix64 hash -> uniform -> f16/f32 grid."""
  key = np.uint64((int(seed) * 0x9E3779B97F4A7C15) % 2 ** 64)
  with np.errstate(over="ignore"):
    x = np.arange(int(np.prod(shape)), dtype=np.uint64) + key
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xff51afd7ed558ccd)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xc4ceb9fe1a85ec53)
    x ^= x >> np.uint64(33)
  u = (x >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
  w = offset + scale * (2 * u - 1)
  w = w.astype(np.float16).astype(np.float32) if grid == "f16" else w.astype(np.float32)
  return w.reshape(shape)


_CACHE = {}


def _vae():
  if "vae" not in _CACHE:
    config, params = sd_vae_convert.load_diffusers_folder(_folder())
    _CACHE["vae"] = (config, sd_vae.build_autoencoder_kl(config), params)
  return _CACHE["vae"]


def test_config_matches_fixture():
  meta = load_json("sd_vae", "config.json")
  config = sd_vae_convert.read_diffusers_config(_folder())
  for k, v in meta["init_kwargs"].items():
    assert config[k] == (tuple(v) if isinstance(v, list) else v), k
  assert config["use_quant_conv"] and config["use_post_quant_conv"] and config["mid_block_add_attention"]
  with pytest.raises(ValueError, match="_class_name"):
    sd_vae_convert.config_from_diffusers(dict(meta["init_kwargs"], _class_name="UNet2DModel"))
  with pytest.raises(ValueError, match="unknown AutoencoderKL kwargs"):
    sd_vae_convert.config_from_diffusers(dict(meta["init_kwargs"], spam=1))
  with pytest.raises(ValueError, match="not supported"):
    sd_vae_convert.config_from_diffusers(dict(meta["init_kwargs"], down_block_types=["AttnDownEncoderBlock2D"] * 2))


def test_safetensors_weights_follow_the_rule_and_round_trip():
  """The numpy reader gives every tensor of the fixture's rule bit for bit; torch -> Flax -> torch is lossless
  and comes back in state_dict order."""
  meta = load_json("sd_vae", "config.json")
  tensors = meta["weights"]["tensors"]
  state = sd_vae_convert.read_state_dict(_folder())
  assert sorted(state) == sorted(t["key"] for t in tensors)
  for t in tensors:
    want = _hash_uniform(t["seed"], t["scale"], t["offset"], tuple(t["shape"]), t["grid"])
    assert state[t["key"]].dtype == np.float32, t["key"]
    np.testing.assert_array_equal(state[t["key"]], want, err_msg=t["key"])
  config, _, params = _vae()
  back = sd_vae_convert.flax_to_torch(params, config)
  assert list(back) == [t["key"] for t in tensors]  # the fixture lists them in state_dict() order
  for k, v in back.items():
    np.testing.assert_array_equal(v, state[k], err_msg=k)


def _vae_outputs():
  if "io" not in _CACHE:
    _, vae, params = _vae()
    io = load_npz("sd_vae", "io.npz")

    @jax.jit
    def run(p, image, latent):
      moments = vae.apply({"params": p}, image, method="encode")
      mean, logvar, std = sd_vae.posterior(moments)
      return dict(moments=moments, posterior_mean=mean, posterior_logvar=logvar, posterior_std=std,
                  decoded=vae.apply({"params": p}, latent, method="decode"))

    _CACHE["io"] = (jax.device_get(run(params, _nhwc(io["image"]), _nhwc(io["latent"]))), io)
  return _CACHE["io"]


def test_autoencoder_kl_parity():
  out, io = _vae_outputs()
  errs = {k: _err(v, io[k]) for k, v in out.items()}
  print("SD-VAE max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (k, e)
  # The clamp of the log-variance is inactive on this fixture; check it on its own.
  _, logvar, std = sd_vae.posterior(jnp.array([[[[0.0, 0.0, -50.0, 30.0]]]]))
  np.testing.assert_array_equal(np.asarray(logvar).ravel(), [-30.0, 20.0])
  np.testing.assert_allclose(np.asarray(std).ravel(), np.exp([-15.0, 10.0]), rtol=1e-6)


def test_legacy_attention_names(tmp_path):
  """A folder written with the old query/key/value/proj_attn names loads to the same parameters, from
  safetensors and from a pickled .bin."""
  config, _, params = _vae()
  state = sd_vae_convert.read_state_dict(_folder())
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  renamed, n = {}, 0
  for k, v in state.items():
    for new, old in legacy.items():
      if f".attentions.0.{new}." in k:
        k, n = k.replace(f".attentions.0.{new}.", f".attentions.0.{old}."), n + 1
        break
    renamed[k] = v
  assert n == 16  # weight and bias of 4 layers in the encoder's and the decoder's mid block
  assert sd_vae_convert.canonical_key("decoder.mid_block.attentions.0.proj_attn.bias") == \
      "decoder.mid_block.attentions.0.to_out.0.bias"
  assert sd_vae_convert.canonical_key("encoder.down_blocks.0.resnets.0.conv1.weight") == \
      "encoder.down_blocks.0.resnets.0.conv1.weight"
  folder = tmp_path / "legacy"
  folder.mkdir()
  shutil.copy(_folder() / "config.json", folder / "config.json")
  torch_write.save_safetensors(renamed, folder / "diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
  config2, params2 = sd_vae_convert.load_diffusers_folder(folder)
  assert config2 == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
  # The older pickled weight file (torch.save zip) of such a folder, read without torch.
  (folder / "diffusion_pytorch_model.safetensors").unlink()
  torch_write.save_torch_zip(renamed, folder / "diffusion_pytorch_model.bin")
  assert sd_vae_convert.weight_file(folder).name == "diffusion_pytorch_model.bin"
  _, params3 = sd_vae_convert.load_diffusers_folder(folder)
  jax.tree_util.tree_map(np.testing.assert_array_equal, params3, params)
  # Both spellings of one tensor at once is an error, as are missing, unexpected and misshapen tensors.
  both = dict(state, **{"encoder.mid_block.attentions.0.query.weight": state["encoder.mid_block.attentions.0.to_q.weight"]})
  with pytest.raises(ValueError, match="given twice"):
    sd_vae_convert.torch_to_flax(both, config)
  broken = dict(state)
  del broken["quant_conv.bias"]
  broken["encoder.conv_in.weight"] = broken["encoder.conv_in.weight"][:, :2]
  broken["decoder.extra.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as info:
    sd_vae_convert.torch_to_flax(broken, config)
  msg = str(info.value)
  assert "quant_conv.bias" in msg and "decoder.extra.weight" in msg and "encoder.conv_in.weight: got [32, 2, 3, 3]" in msg


def _edm2_outputs():
  if "edm2" not in _CACHE:
    meta = load_json("sd_vae", "config.json")["edm2_encoder"]
    _, vae, params = _vae()
    kw = {k: v for k, v in meta["init_kwargs"].items()}
    enc = edm2_encoders.StabilityVAEEncoder(vae, **kw)
    io = load_npz("sd_vae", "edm2_encoder_io.npz")

    @jax.jit
    def run(p, pixels, noise, final):
      raw = enc.encode_pixels(p, pixels)
      return dict(raw_latents=raw, final_latents=enc.encode_latents(raw, noise=noise),
                  decoder_input=enc.decoder_input(final), decoded_float=enc.decode_float(p, final),
                  decoded_pixels=enc.decode(p, final))

    out = run(params, _nhwc(io["pixels"]), _nhwc(io["noise"]), _nhwc(io["final_latents"]))
    _CACHE["edm2"] = (enc, jax.device_get(out), io, meta)
  return _CACHE["edm2"]


def test_stability_vae_encoder_constants():
  enc, _, io, meta = _edm2_outputs()
  assert enc.batch_size == meta["init_kwargs"]["batch_size"]
  np.testing.assert_array_equal(enc.scale, io["scale"])
  np.testing.assert_array_equal(enc.bias, io["bias"])
  np.testing.assert_array_equal(enc.scale, np.float32(meta["constants"]["scale"]))
  np.testing.assert_array_equal(enc.bias, np.float32(meta["constants"]["bias"]))
  # An EDM2 pickle stores scale and bias (not raw_mean / raw_std): the same encoder from those.
  again = edm2_encoders.StabilityVAEEncoder.from_state(enc.vae, {"scale": io["scale"], "bias": io["bias"],
                                                                 "batch_size": 8, "vae_name": enc.vae_name})
  np.testing.assert_array_equal(again.scale, enc.scale)
  np.testing.assert_array_equal(again.bias, enc.bias)
  # Upstream's defaults are the sd-vae-ft-mse statistics the fixture uses.
  default = edm2_encoders.StabilityVAEEncoder(enc.vae)
  np.testing.assert_array_equal(default.scale, enc.scale)
  np.testing.assert_array_equal(default.bias, enc.bias)


def test_stability_vae_encoder_parity():
  _, out, io, _ = _edm2_outputs()
  errs = {k: _err(out[k], io[k]) for k in ("raw_latents", "final_latents", "decoder_input", "decoded_float")}
  print("StabilityVAEEncoder max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (k, e)
  # The affine map alone, from upstream's raw latents and noise (jitted, XLA may fuse the multiply-add:
  # differences of one ulp remain).
  enc = _edm2_outputs()[0]
  final = jax.jit(lambda r, n: enc.encode_latents(r, noise=n))(_nhwc(io["raw_latents"]), _nhwc(io["noise"]))
  print("final_latents from upstream's raw latents:", _err(final, io["final_latents"]))
  assert _err(final, io["final_latents"]) <= 2.5e-7
  # (x - bias) / scale is elementwise: IEEE division gives upstream's values bit for bit.
  np.testing.assert_array_equal(_nchw(out["decoder_input"]), io["decoder_input"])
  # uint8: clamp(0, 1) * 255 truncated. From upstream's own floats the conversion is exact ...
  from_golden = edm2_encoders._to_uint8(jnp.clip(jnp.asarray(io["decoded_float"]), 0, 1) * np.float32(255))
  np.testing.assert_array_equal(np.asarray(from_golden), io["decoded_pixels"])
  # ... and from ours, a pixel may differ by one only where upstream's float sits within our error of an
  # integer boundary (decoded_float * 255 within 255 * ATOL of an integer).
  got, want = _nchw(out["decoded_pixels"]).astype(int), io["decoded_pixels"].astype(int)
  diff = got != want
  print("uint8 pixels off by one:", int(diff.sum()), "of", diff.size)
  assert np.all(np.abs(got - want) <= 1)
  scaled = io["decoded_float"].astype(np.float64) * 255
  assert np.all(np.abs(scaled[diff] - np.round(scaled[diff])) <= 255 * ATOL)


def test_stability_vae_encoder_batching_and_sampling():
  """Chunks of batch_size images (lax.map, last chunk padded) give the same latents; noise from a key."""
  enc, out, io, _ = _edm2_outputs()
  _, vae, params = _vae()
  small = edm2_encoders.StabilityVAEEncoder(vae, scale=enc.scale, bias=enc.bias, batch_size=1)
  pixels = np.concatenate([io["pixels"], io["pixels"][:1]])  # 3 images: chunks of 1
  raw = jax.jit(small.encode_pixels)(params, _nhwc(pixels))
  assert raw.shape[0] == 3
  assert _err(raw[:2], io["raw_latents"]) <= ATOL
  assert _err(raw[2:], io["raw_latents"][:1]) <= ATOL
  dec = jax.jit(small.decode_float)(params, _nhwc(io["final_latents"]))
  assert _err(dec, io["decoded_float"]) <= ATOL
  # Sampled latents: mean + N(0, 1) * std, then the affine map.
  key = jax.random.key(0)
  final = enc.encode_latents(jnp.asarray(out["raw_latents"]), key)
  noise = jax.random.normal(key, final.shape, jnp.float32)
  mean, std = np.split(out["raw_latents"], 2, axis=-1)
  np.testing.assert_allclose(np.asarray(final), (mean + np.asarray(noise) * std) * enc.scale + enc.bias,
                             rtol=0, atol=1e-6)
  with pytest.raises(ValueError, match="PRNG key or the noise"):
    enc.encode_latents(jnp.asarray(out["raw_latents"]))


def test_standard_rgb_encoder():
  enc = edm2_encoders.StandardRGBEncoder()
  pixels = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
  np.testing.assert_array_equal(np.asarray(enc.encode(None, jnp.asarray(pixels))),
                                pixels.astype(np.float32) / np.float32(127.5) - np.float32(1))
  x = np.linspace(-1.2, 1.2, 4001, dtype=np.float32).reshape(1, 1, -1, 1)
  want = np.clip(x * np.float32(127.5) + np.float32(128), 0, 255).astype(np.uint8)
  np.testing.assert_array_equal(np.asarray(enc.decode(None, jnp.asarray(x))), want)
  # Upstream's images of the DPM-Solver-v3 goldens: decode(x_final), x_final cast to float32 first.
  for run in ("short", "default", "guided"):
    d = load_npz("edm2", "dpmv3_sampler", f"{run}.npz")
    got = enc.decode(None, _nhwc(d["x_final"].astype(np.float32)))
    np.testing.assert_array_equal(_nchw(got), d["images"], err_msg=run)


def test_full_size_manifest_maps_to_the_flax_tree():
  """keys/sd-vae-ft-mse.json: every key and shape, in order, is the Flax model's jax.eval_shape tree."""
  manifest = load_json("keys", "sd-vae-ft-mse.json")
  config = sd_vae_convert.config_from_diffusers(manifest["init_kwargs"])
  entries = sd_vae_convert.expected_entries(config)
  assert [[e.torch_key, list(e.torch_shape)] for e in entries] == [[k, list(s)] for k, s, _, _ in manifest["entries"]]
  assert {kind for _, _, _, kind in manifest["entries"]} == {"param"}
  assert sd_vae_convert.num_parameters(config) == manifest["num_parameters"]
  # The same tree, straight from jax.eval_shape of the module, through the name rule.
  shapes = sd_vae_convert.abstract_shapes(config)
  abstract = jax.tree_util.tree_leaves_with_path(sd_vae.abstract_params(sd_vae.build_autoencoder_kl(config)))
  assert len(abstract) == len(manifest["entries"]) == len(shapes)
  from_manifest = {sd_vae_convert.torch_to_flax_path(k): s for k, s, _, _ in manifest["entries"]}
  for e in entries:
    assert e.flax_path in from_manifest and tuple(shapes[e.flax_path]) == _flax_shape(e.kind, from_manifest[e.flax_path])
  # The legacy attention spelling maps onto the same leaves.
  for old, new in sd_vae_convert.LEGACY_ATTENTION.items():
    for part in ("encoder", "decoder"):
      key = f"{part}.mid_block.attentions.0.{old}.weight"
      assert sd_vae_convert.torch_to_flax_path(sd_vae_convert.canonical_key(key)) in shapes, key


def _flax_shape(kind, torch_shape):
  torch_shape = tuple(torch_shape)
  if kind == "conv":
    return tuple(torch_shape[i] for i in (2, 3, 1, 0))
  if kind == "dense":
    return torch_shape[::-1]
  return torch_shape
