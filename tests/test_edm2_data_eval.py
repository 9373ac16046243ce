"""EDM2 data read on the fly (ImageNet from tfds or a folder with dataset_tool's center-crop-dhariwal, encoded by
the SD VAE for latent models) and the FID round metric (class-balanced seeds, VAE decoding, autoguidance,
EDM2's reference .pkl)."""
import io
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import edm2_img64, edm2_img512
from ddo_jax import cli, xla_options
from ddo_jax.convert import edm2 as edm2_convert
from ddo_jax.convert import sd_vae as sd_vae_convert
from ddo_jax.data import edm2_imagenet, edm2_zip
from ddo_jax.families import edm2
from ddo_jax.sampling import heun, labels as labels_lib, seeded
from tests.goldens import golden_path


def _image(w, h, seed):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
  return Image.fromarray(np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8))


def test_center_crop_dhariwal_follows_dataset_tool():
  """The steps of EDM2's dataset_tool --transform=center-crop-dhariwal, written out for three shapes: BOX halving
  while the short side >= 2 * size, BICUBIC to short side = size (Python's round for the long side), centre crop."""
  img = _image(500, 375, 0)
  x = img.resize((250, 187), Image.BOX).resize((125, 93), Image.BOX)     # 187 >= 128, then 93 < 128
  x = x.resize((round(125 * 64 / 93), 64), Image.BICUBIC)                # (86, 64)
  want = np.asarray(x)[0:64, 11:75]                                       # left (86 - 64) // 2 = 11
  np.testing.assert_array_equal(edm2_imagenet.center_crop_dhariwal(img, 64), want)
  tall = _image(40, 90, 1)                                                # upsampled: 40 -> 64, 90 -> 144
  want = np.asarray(tall.resize((64, 144), Image.BICUBIC))[40:104, 0:64]
  np.testing.assert_array_equal(edm2_imagenet.center_crop_dhariwal(tall, 64), want)
  gray = _image(64, 64, 2).convert("L")                                   # converted to RGB, no resampling
  np.testing.assert_array_equal(edm2_imagenet.center_crop_dhariwal(gray, 64), np.asarray(gray.convert("RGB")))


def _png(img) -> bytes:
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


@pytest.fixture(scope="module")
def imagenet_like(tmp_path_factory):
  """A class-folder tree (3 classes, sorted names = class ids) and the same images as a tfds-like source."""
  root = tmp_path_factory.mktemp("imagenet") / "train"
  sizes = [(70, 50), (40, 90), (96, 64), (33, 33), (120, 80), (64, 70)]
  items = []
  for i, (w, h) in enumerate(sizes):
    cls = f"n0{i % 3}"
    (root / cls).mkdir(parents=True, exist_ok=True)
    img = _image(w, h, 10 + i)
    (root / cls / f"img{i}.png").write_bytes(_png(img))
    items.append((cls, f"img{i}.png", img))
  items.sort(key=lambda t: (t[0], t[1]))                                   # torchvision / dataset_tool order
  fake_tfds = [{"image": _png(img), "label": int(cls[-1])} for cls, _, img in items]
  return root, fake_tfds, [(int(cls[-1]), img) for cls, _, img in items]


def _config(module, variant="tiny", **data):
  c = module.get_config(variant)
  c.model.data.update(data)
  return c


def test_imagenet_pixels_from_folder_and_tfds(imagenet_like):
  """Pixel (img64-like) examples from a folder and from a tfds-like source: EDM2's center crop, x / 127.5 - 1,
  one-hot sorted-folder class ids; both backends give the same examples."""
  root, fake_tfds, items = imagenet_like
  family = edm2.EDM2(_config(edm2_img64, source="folder", path=str(root)).model)
  source, n = family.real_source(0)
  assert n == len(items)
  got = source(np.arange(n))
  want = np.stack([edm2_zip.standard_rgb(edm2_imagenet.center_crop_dhariwal(img, 16)) for _, img in items])
  np.testing.assert_array_equal(got["x"], want)
  np.testing.assert_array_equal(np.argmax(got["label"], -1), [c for c, _ in items])
  base, m = edm2_imagenet.open_source(_config(edm2_img64, source="tfds").model.data, 16, 10, data_source=fake_tfds)
  tfds_source, _ = edm2_imagenet.model_source(base.uint8_batch, m, 10)
  again = tfds_source(np.array([4, 0, 2]))
  np.testing.assert_array_equal(again["x"], want[[4, 0, 2]])
  np.testing.assert_array_equal(again["label"], got["label"][[4, 0, 2]])


def test_imagenet_latents_encoded_on_the_fly_by_the_vae(imagenet_like):
  """Latent (img512-like) examples from an image folder: center-cropped to the VAE's image size (32 for the
  goldens' tiny SD VAE, a diffusers folder read without conversion) and encoded into raw moments
  cat[mean, std], as EDM2's `dataset_tool.py encode` stores them (StabilityVAEEncoder.encode_pixels)."""
  root, _, items = imagenet_like
  vae_dir = golden_path("sd_vae", "diffusers_tiny")
  family = edm2.EDM2(_latent_config(root, vae_dir).model)
  source, n = family.real_source(0)
  got = source(np.arange(n))
  encoder, params = sd_vae_convert.load_stability_vae_encoder(vae_dir)
  crops = np.stack([edm2_imagenet.center_crop_dhariwal(img, 32) for _, img in items])
  # compiled as the data source compiles it (ddo_jax.xla_options; those options' own rounding is
  # tests/test_xla_options.py's subject): the same program, so the same values
  want = np.asarray(jax.jit(encoder.encode_pixels, compiler_options=xla_options.compiler_options())(
      params, jnp.asarray(crops)))
  assert got["x"].shape == (n, 16, 16, 8) and np.all(got["x"][..., 4:] > 0)   # std channels are positive
  err = np.abs(got["x"] - want).max()
  print("on-the-fly moments vs encode_pixels: max abs", err)
  np.testing.assert_allclose(got["x"], want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(np.argmax(got["label"], -1), [c for c, _ in items])


def _latent_config(root, vae_dir):
  c = _config(edm2_img512, source="folder", path=str(root))
  c.model.vae = str(vae_dir)
  return c


def test_missing_data_vae_guide_and_reference_are_one_line(tmp_path):
  def refused(config, key, *needles):
    with pytest.raises(cli.UserError) as e:
      edm2.EDM2(config.model)
    msg = str(e.value)
    assert "\n" not in msg and e.value.where == key and all(s in msg for s in needles), msg

  refused(_config(edm2_img64, source="folder", path=str(tmp_path / "none")), "config.model.data.path")
  c = _config(edm2_img512, source="folder", path=str(tmp_path))
  refused(c, "config.model.vae", "launch.convert sd-vae")
  c.model.vae = str(tmp_path / "novae")
  refused(c, "config.model.vae", "no SD VAE")
  c = _config(edm2_img512)
  c.model.metric = "fid"
  refused(c, "config.model.eval.ref_stats", "img512.pkl")
  c.model.eval.ref_stats = str(tmp_path / "missing.pkl")
  refused(c, "config.model.eval.ref_stats", "not found")
  (tmp_path / "ref.pkl").write_bytes(b"x")
  c.model.eval.ref_stats = str(tmp_path / "ref.pkl")
  c.model.eval.inception = str(tmp_path / "inception.npz")
  refused(c, "config.model.vae")
  c.model.vae = str(golden_path("sd_vae", "diffusers_tiny"))
  c.model.eval.guidance = 1.1
  refused(c, "config.model.eval.guide", "needs both")
  c.model.eval.guide = str(tmp_path)
  refused(c, "config.model.eval.guide", "launch.convert edm2")
  l_guided = edm2_img512.get_config("l_guided")
  assert l_guided.model.eval.guidance == 1.1 and l_guided.model.eval.guide == ""


def test_fid_round_metric_decodes_autoguided_class_balanced_samples(tmp_path):
  """metric 'fid' on a latent model: seeds 0..N-1 with class seed mod 10, EDM2's Heun autoguided by a converted
  guide at model.eval.guidance, decoded by the (diffusers-folder) tiny SD VAE, scored against an EDM2-style
  reference .pkl; equal to the FID of the same images made directly (random Inception)."""
  from ddo_jax.convert import inception_names
  from ddo_jax.metrics import evaluator as evaluator_lib
  from ddo_jax.metrics import reference_stats
  from tests import test_evaluator
  evaluator_lib.save_inception_npz(
      inception_names.inception_variables_from_state_dict(test_evaluator.hash_inception_state_dict()),
      tmp_path / "inception.npz")
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2048, 64)) * 0.1
  with open(tmp_path / "img512.pkl", "wb") as f:   # EDM2's dataset-refs layout
    pickle.dump({"num_images": 50000, "fid": {"mu": rng.standard_normal(2048) * 0.1,
                                              "sigma": a @ a.T + 0.01 * np.eye(2048)}}, f)
  v, c, enc, report = edm2_convert.convert_edm2_pickle(golden_path("formats", "edm2_tiny_latent.pkl"))
  edm2_convert.save_converted(tmp_path / "guide", v, c, enc, report)
  vae_dir = golden_path("sd_vae", "diffusers_tiny")
  config = edm2_img512.get_config("tiny")
  config.model.vae = str(vae_dir)
  config.model.metric = "fid"
  config.model.eval.update(inception=str(tmp_path / "inception.npz"), ref_stats=str(tmp_path / "img512.pkl"),
                           num_samples=12, batch_size=8, guide=str(tmp_path / "guide"), guidance=1.5)
  family = edm2.EDM2(config.model)
  params = family.init_params(jax.random.key(1))
  out = family.evaluate(params, None, seed=0)
  assert np.isfinite(out["fid"]) and out["num_images"] == 12, out

  # The same images made directly.
  seeds = np.arange(12, dtype=np.int32)
  keys = seeded.seed_keys(jax.random.key(seeded.CLI_BASE_SEED), jnp.asarray(seeds))
  noise = jax.vmap(lambda k: jax.random.normal(k, (16, 16, 4), jnp.float32))(keys)
  labels = labels_lib.one_hot_labels(jnp.asarray(seeds % 10), 10)
  gvars, _, gmeta = edm2_convert.load_converted(tmp_path / "guide")
  guide = edm2_convert.build_net(gmeta)
  s = config.model.sampler

  def images(guidance):
    gden = (lambda x, sig, l: guide.apply(gvars, x, sig, l)) if guidance != 1.0 else None
    x = jax.jit(lambda p, n: heun.edm2_heun_sample(lambda x, sig, l: family.net.apply(p, x, sig, l), n, labels,
                                                    guide=gden, guidance=guidance, num_steps=s.num_steps))(params,
                                                                                                           noise)
    encoder, vae_params = sd_vae_convert.load_stability_vae_encoder(vae_dir, scale=family.latent_scale,
                                                                    bias=family.latent_bias)
    return np.asarray(jax.jit(encoder.decode)(vae_params, x))

  guided = images(1.5)
  assert np.abs(guided.astype(int) - images(1.0)).max() > 10   # the guide changes the images
  ev = evaluator_lib.Evaluator(evaluator_lib.load_inception(str(tmp_path / "inception.npz")), batch_size=8,
                               ref_stats=reference_stats.load_reference_stats(tmp_path / "img512.pkl"))
  ev.add_uint8(guided)
  want = ev.result()
  # batches of 8 (the metric) vs 12 here may round a decoded pixel differently (+-1 of 255): 1e-3 relative
  np.testing.assert_allclose(out["fid"], want["fid"], rtol=1e-3)


def test_compute_dtype_and_remat_options_reach_the_net():
  c = edm2_img64.get_config("tiny")
  c.model.update(compute_dtype="bfloat16", remat=True)
  family = edm2.EDM2(c.model)
  assert family.net.unet.compute_dtype == "bfloat16" and family.net.unet.remat
  plain = edm2.EDM2(edm2_img64.get_config("tiny").model)
  assert plain.net.unet.compute_dtype == "float32" and not plain.net.unet.remat   # the parity path by default
  c.model.compute_dtype = "float16"
  with pytest.raises(cli.ConfigError, match=r"\(config.model.compute_dtype\)"):
    edm2.EDM2(c.model)
