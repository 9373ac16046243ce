"""launch.sample / launch.evaluate --model on VAR models (ddo_jax.families.load_model_dir -> VAR.from_model_dir):
the goldens' tiny VAR (formats/var_tiny.pth) and tiny VQVAE, converted with launch.convert, give the images of
`sampling.var_sample.autoregressive_infer_cfg` (parity-tested in tests/test_var_sample.py) run on each seed's key
with DDO's position-balanced classes, made uint8 as VAR's sample code does; resume; the one-line errors.

Greedy decoding (--top_k 1) makes the tokens a function of the logits' order only, so launch.sample's batch of 4
rows and the in-process reference at batch 1 agree exactly on the tokens; the decoded images are compared to +-1
on a pixel (XLA may order a float32 convolution sum differently at another batch size, launch/sample.py).
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax import families
from ddo_jax.convert import torch_write
from ddo_jax.convert import var as var_convert
from ddo_jax.convert import vqvae as vqvae_convert
from ddo_jax.data import images
from ddo_jax.nets import var as var_net
from ddo_jax.nets import var_vqvae
from ddo_jax.sampling import seeded, var_sample
from tests import test_var_vqvae
from tests.goldens import golden_path

REPO = pathlib.Path(__file__).resolve().parents[1]

jax.config.update("jax_default_matmul_precision", "highest")


def _run(*args, module="launch.sample"):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def _one_error_line(proc, *needles) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-4000:])
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """The tiny VAR through `launch.convert var` and the tiny VQVAE (written as a torch zip) through
  `launch.convert vqvae` with the VAR's patch_nums."""
  root = tmp_path_factory.mktemp("var_models")
  _ok(_run("var", "--src", golden_path("formats", "var_tiny.pth"), "--out", root / "var", module="launch.convert"))
  meta, state = test_var_vqvae._state()
  torch_write.save_torch_zip(state, root / "vae.pth")
  net = json.loads((root / "var" / "model.json").read_text())["net"]
  _ok(_run("vqvae", "--src", root / "vae.pth", "--out", root / "vae", "--patch_nums",
           ",".join(map(str, net["patch_nums"])), module="launch.convert"))
  del meta
  return root


def _reference(root, seeds, positions, *, cfg, convention, top_k):
  """What launch.sample should make: key fold_in(key(0), seed), class = position mod classes, one
  autoregressive_infer_cfg call per seed (batch 1) with fold_in(key, 3), uint8 = truncate(clip(x) * 255)."""
  variables, config, _ = var_convert.load_converted(root / "var")
  var = var_net.build_var(config)
  vae, vae_params = vqvae_convert.load_converted(root / "vae")
  params = jax.tree_util.tree_map(jnp.asarray, variables)
  vae_params = jax.tree_util.tree_map(jnp.asarray, vae_params)
  out, classes = [], []
  for s, p in zip(seeds, positions):
    key = jax.random.fold_in(jax.random.key(seeded.CLI_BASE_SEED), s)
    c = p % config["num_classes"]
    img = var_sample.autoregressive_infer_cfg(var, params, vae, vae_params, var_vqvae, jnp.asarray([c], jnp.int32),
                                              jax.random.fold_in(key, 3), cfg=cfg, guidance=convention, top_k=top_k)
    out.append(np.floor(np.clip(np.asarray(img["image"][0]), 0, 1) * 255).astype(np.uint8))
    classes.append(c)
  return np.stack(out), np.asarray(classes)


def test_greedy_guided_images_labels_and_resume(dirs, tmp_path):
  seeds = [5, 11, 12, 30]
  out = tmp_path / "s"
  args = ["--model", dirs / "var", "--vae", dirs / "vae", "--seeds", "5,11,12,30", "--outdir", out, "--cfg", "2.5",
          "--cfg_convention", "var", "--top_k", "1", "--batch_size", "4", "--npz"]
  _ok(_run(*args))
  want, classes = _reference(dirs, seeds, range(4), cfg=2.5, convention="var", top_k=1)
  got = images.read_pngs(out, seeds)
  assert got.shape == want.shape == (4, 64, 64, 3)
  diff = np.abs(got.astype(int) - want.astype(int))
  assert diff.max() <= 1 and np.mean(diff > 0) < 0.01, (diff.max(), np.mean(diff > 0))
  npz = np.load(out / "samples.npz")
  np.testing.assert_array_equal(npz["labels"], classes)
  np.testing.assert_array_equal(npz["seeds"], seeds)
  settings = json.loads((out / "sample_settings.json").read_text())
  assert (settings["family"], settings["cfg"], settings["cfg_convention"], settings["guidance_weight_w"],
          settings["top_k"], settings["labels"]) == ("var", 2.5, "var", 2.5, 1, "balanced")
  # resume: a deleted PNG is made again (in a batch of 1, so +-1 on a pixel) and the others are skipped
  first = got[2].astype(int)
  images.png_path(out, 12).unlink()
  log = _ok(_run(*args))
  assert "1 to generate" in log
  again = np.abs(images.read_pngs(out, [12])[0].astype(int) - first)
  assert again.max() <= 1 and np.mean(again > 0) < 0.01
  # another guidance into the same folder is refused (other images)
  _one_error_line(_run(*[a if a != "2.5" else "1.5" for a in args]), "--outdir")


def test_ddo_default_protocol_is_guidance_free_conditional(dirs):
  """Defaults: --cfg 1.0 under one_plus_w (w = 0), no top-k / top-p, balanced labels; the guidance weight is
  data, so guided and unguided share one compiled sampler."""
  family, params = families.load_model_dir(dirs / "var", vae=str(dirs / "vae"))
  s = family.sample_settings()
  assert (s["cfg"], s["cfg_convention"], s["guidance_weight_w"], s["top_k"], s["top_p"], s["more_smooth"]) == (
      1.0, "one_plus_w", 0.0, 0, 0.0, False)
  assert family.positions_matter and family.image_shape == (64, 64, 3)
  np.testing.assert_array_equal(family.seed_classes(np.arange(25), np.arange(25)), np.arange(25) % 10)
  rnd, _ = families.load_model_dir(dirs / "var", vae=str(dirs / "vae"), labels="random")
  assert not rnd.positions_matter
  c = rnd.seed_classes(np.arange(200), np.zeros(200, np.int64))
  assert set(c.tolist()) == set(range(10)) and np.array_equal(c, rnd.seed_classes(np.arange(200), np.arange(200)))


def test_options_contract_errors(dirs, tmp_path):
  base = ["--model", dirs / "var", "--seeds", "0-1", "--outdir", tmp_path / "o"]
  _one_error_line(_run(*base), "--vae", "launch.convert vqvae")
  withvae = base + ["--vae", dirs / "vae"]
  _one_error_line(_run(*withvae, "--steps", "3"), "--steps", "a VAR model")
  _one_error_line(_run(*withvae, "--guide", dirs / "var"), "--guide")
  _one_error_line(_run(*withvae, "--cfg_convention", "ddo"), "--cfg_convention", "one_plus_w")
  _one_error_line(_run(*withvae, "--top_p", "1.5"), "--top_p")
  _one_error_line(_run(*withvae, "--top_k", "-1"), "--top_k")
  _one_error_line(_run(*base, "--vae", dirs / "var"), "--vae")   # a VAR folder is not a VQVAE
  assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
