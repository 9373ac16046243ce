"""launch.sample on EDM2 models (ddo_jax.families.load_model_dir -> EDM2.from_model_dir): the autoguided Heun
sampler and DPM-Solver-v3 on the goldens' tiny nets give the images of the sampler functions (already parity-tested
in tests/test_edm2_sampling.py) run on each seed's noise and DDO's position-balanced labels, quantized as EDM2's
StandardRGBEncoder; a latent model decodes through the tiny SD-VAE; resume; the label rule against
goldens/edm2/balanced_labels; the one-line errors (exit 2) of the options contract.

The image comparisons run launch.sample on one device with the batch of the in-process reference (the same
program shapes), so the uint8 images are compared exactly; the sharded latent run is compared to +-1 on a pixel
(XLA may order a float32 sum differently for another batch layout, see launch/sample.py).
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

from ddo_jax import cli, families
from ddo_jax.convert import edm2, edm2_names
from ddo_jax.data import images
from ddo_jax.nets import edm2_encoders, edm2_unet
from ddo_jax.sampling import dpmv3, heun, labels as labels_lib, seeded
from tests.goldens import golden_path, load_json, load_npz

REPO = pathlib.Path(__file__).resolve().parents[1]
RGB = {"class_name": "StandardRGBEncoder", "init_kwargs": {}}


def _run(*args, devices=1, module="launch.sample"):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
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
  """Converted folders: the goldens' precond_img net (main net of the sampler goldens; float32 weights), the
  tiny EDM2 pickles (img guide, latent) through the converter, and the tiny SD-VAE through launch.convert."""
  root = tmp_path_factory.mktemp("edm2_models")
  meta = load_json("edm2", "precond_img", "config.json")
  state = load_npz("edm2", "precond_img", *meta["weights"]["file"].split("/"))
  config = edm2_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
  variables = edm2_names.torch_to_flax(state, config)
  edm2.save_converted(root / "img", variables, config, RGB, {"source_path": "goldens/edm2/precond_img"})
  for name, pkl in (("guide", "edm2_tiny_img_guide"), ("lat", "edm2_tiny_latent")):
    v, c, enc, report = edm2.convert_edm2_pickle(golden_path("formats", f"{pkl}.pkl"))
    edm2.save_converted(root / name, v, c, enc, report)
  _ok(_run("sd-vae", "--src", golden_path("sd_vae", "diffusers_tiny"), "--out", root / "vae",
           module="launch.convert"))
  return root


def _pngs(outdir, seeds):
  return images.read_pngs(outdir, seeds)


def _reference(model_dir, seeds, positions, sampler, *, guide_dir=None, guidance=1.0, num_steps, float64):
  """What launch.sample should make: noise = float32 normal from fold_in(key(0), seed), class = position mod
  label_dim, the sampler function on the converted nets (model.json gain_dtype), StandardRGBEncoder.decode."""
  variables, config, meta = edm2.load_converted(model_dir)
  net = edm2.build_net(meta)
  guide = gvars = None
  if guide_dir is not None:
    gvars, _, gmeta = edm2.load_converted(guide_dir)
    guide = edm2.build_net(gmeta)
  label_dim = config["label_dim"]
  shape = (config["img_resolution"],) * 2 + (config["img_channels"],)

  def run(v, gv, seeds, positions):
    keys = seeded.seed_keys(jax.random.key(seeded.CLI_BASE_SEED), seeds)
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
    noise = noise.astype(jnp.float64 if float64 else jnp.float32)
    labels = labels_lib.one_hot_labels(labels_lib.balanced_classes(positions, label_dim), label_dim)
    den = lambda x, s, l: net.apply(v, x, s, l)
    gden = None if guide is None else (lambda x, s, l: guide.apply(gv, x, s, l))
    if sampler == "dpmv3":
      x = dpmv3.dpmv3_sample(den, noise, labels, guide=gden, guidance=guidance, num_steps=num_steps)
    else:
      x = heun.edm2_heun_sample(den, noise, labels, guide=gden, guidance=guidance, num_steps=num_steps)
    return edm2_encoders.StandardRGBEncoder().decode(None, x)

  with jax.enable_x64(float64):
    out = jax.jit(run)(variables, gvars, np.asarray(seeds, np.int32), np.asarray(positions, np.int32))
  return np.asarray(out)


def test_guided_heun_images_and_resume(dirs, tmp_path):
  """goldens/edm2/guided_sampler's protocol (EDM2 edm_sampler, guidance 1.1, its step count, float32) through
  launch.sample: the images equal edm2_heun_sample's on each seed's noise, quantized; a truncated PNG is made
  again, identical; another seed list (other position labels) into the same folder is refused."""
  kw = load_json("edm2", "guided_sampler", "config.json")["sampler_kwargs"]
  out = tmp_path / "heun"
  seeds = [0, 1, 2, 3]
  common = ("--model", dirs / "img", "--outdir", out, "--guide", dirs / "guide", "--guidance", kw["guidance"],
            "--steps", kw["num_steps"], "--seeds", "0-3", "--batch_size", "4", "--npz")
  _ok(_run(*common))
  got = _pngs(out, seeds)
  want = _reference(dirs / "img", seeds, seeds, "heun", guide_dir=dirs / "guide", guidance=kw["guidance"],
                    num_steps=kw["num_steps"], float64=False)
  unguided = _reference(dirs / "img", seeds, seeds, "heun", num_steps=kw["num_steps"], float64=False)
  assert got.shape == (4, 16, 16, 3) and got.std() > 20
  np.testing.assert_array_equal(got, want)
  assert np.abs(want.astype(int) - unguided).max() > 10   # the guide matters: not a vacuous comparison
  settings = json.loads((out / images.SETTINGS_JSON).read_text())
  assert (settings["family"], settings["sampler"], settings["guidance"], settings["float64"]) == \
      ("edm2", "heun", kw["guidance"], False)
  assert settings["guide_gain_dtype"] == "float16" and settings["gain_dtype"] is None
  with np.load(out / "samples.npz") as f:
    np.testing.assert_array_equal(f["labels"], [0, 1, 2, 3])

  path = images.png_path(out, 2)
  path.write_bytes(path.read_bytes()[:80])
  log = _ok(_run(*common))
  assert "4 seeds requested, 3 already written, 1 to generate" in log, log
  np.testing.assert_array_equal(_pngs(out, seeds), want)
  _one_error_line(_run(*common[:-5], "--seeds", "1-4", "--batch_size", "4"),
                  "seed_list: '0-3' there vs '1-4' now", "(--outdir)")


def test_dpmv3_images_position_labels(dirs, tmp_path):
  """goldens/edm2/dpmv3_sampler's 'short' run (DPM-Solver-v3, its step count, float64 state by default as
  upstream) through launch.sample on a seed list whose positions differ from the seeds mod 10: classes are
  positions mod 10 (EDM2_sample.py), images equal dpmv3_sample's quantized."""
  steps = int(load_json("edm2", "dpmv3_sampler", "config.json")["runs"]["short"]["num_steps"])
  out = tmp_path / "dpmv3"
  seeds = [23, 5, 17, 8]
  _ok(_run("--model", dirs / "img", "--outdir", out, "--sampler", "dpmv3", "--steps", steps,
           "--seeds", "23,5,17,8", "--batch_size", "4", "--labels", "balanced", "--npz"))
  want = _reference(dirs / "img", seeds, [0, 1, 2, 3], "dpmv3", num_steps=steps, float64=True)
  np.testing.assert_array_equal(_pngs(out, seeds), want)
  with np.load(out / "samples.npz") as f:
    np.testing.assert_array_equal(f["labels"], [0, 1, 2, 3])
    np.testing.assert_array_equal(f["seeds"], seeds)
  settings = json.loads((out / images.SETTINGS_JSON).read_text())
  assert (settings["sampler"], settings["sampler.num_steps"], settings["float64"]) == ("dpmv3", steps, True)
  assert "sampler.S_churn" not in settings


def test_latent_model_decodes_through_the_vae(dirs, tmp_path):
  """A latent (img512-like) model with --vae on 2 devices: 32x32 RGB images, the sampler's latents decoded by
  the StabilityVAEEncoder (the pickle's scale/bias) on the tiny SD-VAE."""
  from ddo_jax import tree_io  # pylint: disable=import-outside-toplevel
  from ddo_jax.convert import sd_vae as sd_vae_convert  # pylint: disable=import-outside-toplevel
  from ddo_jax.nets import sd_vae  # pylint: disable=import-outside-toplevel
  out = tmp_path / "lat"
  _ok(_run("--model", dirs / "lat", "--vae", dirs / "vae", "--outdir", out, "--steps", "2", "--seeds", "0-3",
           "--batch_size", "4", devices=2))
  got = _pngs(out, range(4))
  variables, config, meta = edm2.load_converted(dirs / "lat")
  net = edm2.build_net(meta)
  vae_meta = json.loads((dirs / "vae" / "model.json").read_text())
  vae = sd_vae.build_autoencoder_kl(sd_vae_convert.config_from_diffusers(vae_meta["vae"]))
  vae_params = tree_io.load_params_dir(dirs / "vae" / "params")["params"]
  encoder = edm2_encoders.StabilityVAEEncoder.from_state(vae, meta["encoder"])
  seeds = np.arange(4, dtype=np.int32)
  keys = seeded.seed_keys(jax.random.key(seeded.CLI_BASE_SEED), seeds)
  noise = jax.vmap(lambda k: jax.random.normal(k, (16, 16, 4), jnp.float32))(keys)
  labels = labels_lib.one_hot_labels(seeds % 10, 10)
  x = jax.jit(lambda v, n: heun.edm2_heun_sample(lambda a, s, l: net.apply(v, a, s, l), n, labels,
                                                 num_steps=2))(variables, noise)
  want = np.asarray(jax.jit(encoder.decode)(vae_params, x))
  assert got.shape == want.shape == (4, 32, 32, 3) and got.std() > 5
  diff = np.abs(got.astype(int) - want)
  print("latent run vs reference: max uint8 difference", diff.max(), "fraction differing", (diff > 0).mean())
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
  settings = json.loads((out / images.SETTINGS_JSON).read_text())
  assert settings["space"] == "latent" and settings["sample_shape"] == [16, 16, 4]
  assert settings["latent_scale"] == meta["encoder"]["scale"] and settings["vae_params_checksum"]


def test_label_rules_against_upstream(dirs):
  """seed_classes: EDM2_sample.py's label of every position (goldens/edm2/balanced_labels, the cases where
  upstream is consistent and label_dim fits the tiny net), whatever the seed values; random labels come from
  the seed's key (the same for a seed at any position)."""
  data = load_npz("edm2", "balanced_labels", "labels.npz")
  cases = load_json("edm2", "balanced_labels", "config.json")["cases"]
  family, _ = families.load_model_dir(dirs / "img", sampler="dpmv3")
  checked = 0
  for name, case in cases.items():
    if not case["consistent"] or case["class_idx"] is not None or case["label_dim"] != family.label_dim:
      continue
    seeds = data[f"{name}/seeds"]
    np.testing.assert_array_equal(family.seed_classes(seeds, np.arange(len(seeds))),
                                  data[f"{name}/label_of_position"])
    checked += 1
  assert checked >= 3
  assert family.positions_matter
  rand, _ = families.load_model_dir(dirs / "img", labels="random")
  a = rand.seed_classes(np.arange(40), np.arange(40))
  b = rand.seed_classes(np.arange(40), np.arange(40)[::-1])
  np.testing.assert_array_equal(a, b)
  assert len(set(a.tolist())) >= 5 and not rand.positions_matter


def test_options_contract_errors(dirs, tmp_path):
  """Each family refuses, in one line naming the flag, what means nothing for it; EDM2's own rules."""
  def refused(path, where, *needles, **options):
    with pytest.raises(cli.UserError) as info:
      families.load_model_dir(path, **options)
    line = str(info.value)
    assert info.value.where == where and "\n" not in line and line.startswith("error:"), line
    for needle in needles:
      assert needle in line, (needle, line)

  img, lat, vae = dirs / "img", dirs / "lat", dirs / "vae"
  refused(img, "--guide", "needs a guide network", guidance=1.1)
  refused(img, "--guidance", "guidance 1 never calls the guide", guide=str(dirs / "guide"))
  refused(img, "--S_churn", "EDM2's --sampler dpmv3", sampler="dpmv3", S_churn=0.5)
  refused(img, "--vae", "pixel-space", vae=str(vae))
  refused(img, "--cfg", "an EDM2 model", cfg=1.5)
  refused(img, "--top_k", "an EDM2 model", top_k=900)
  refused(img, "--sampler", "not an EDM2 sampler", sampler="euler")
  refused(lat, "--vae", "latent-space", "launch.convert sd-vae")
  refused(lat, "--vae", "not an SD-VAE", vae=str(img))
  refused(lat, "--guide", "16x16x3", vae=str(vae), guide=str(img), guidance=2.0)
  for family in ("toy_grid", "no_such_family", "var"):
    d = tmp_path / family
    d.mkdir()
    (d / "model.json").write_text(json.dumps({"family": family}))
    if family != "var":   # a VAR family, once registered, refuses a model.json without its net in its own words
      refused(d, "--model", repr(family))
  with pytest.raises(FileNotFoundError, match="model.json not found"):
    families.load_model_dir(tmp_path / "nothing")

  # The command line: exit 2, one error line, nothing written.
  out = tmp_path / "out"
  edm_dir = tmp_path / "edm"
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  params, config, report = edm.convert_edm_pickle(golden_path("formats", "edm_tiny_cond.pkl"))
  edm.save_converted(edm_dir, params, config, report)
  _one_error_line(_run("--model", edm_dir, "--outdir", out, "--guide", dirs / "guide", "--guidance", "1.1"),
                  "--guidance means nothing for an EDM model (--guidance)")
  _one_error_line(_run("--model", edm_dir, "--outdir", out, "--sampler", "dpmv3"), "(--sampler)")
  _one_error_line(_run("--model", img, "--outdir", out, "--guidance", "1.1"), "needs a guide network (--guide)")
  _one_error_line(_run("--model", lat, "--outdir", out), "latent-space", "(--vae)", "launch.convert sd-vae")
  _one_error_line(_run("--model", tmp_path / "var", "--outdir", out))   # a bare {'family': 'var'}
  _one_error_line(_run("--model", tmp_path / "toy_grid", "--outdir", out), "'toy_grid'", "cannot sample", "(--model)")
  _one_error_line(_run("--model", img, "--outdir", out, "--vae", tmp_path / "nothing"), "(--vae)")
  assert not out.exists()


def test_evaluate_checkpoint_sampler_takes_edm2(dirs):
  """launch.evaluate --model's sampler (build_sampler -> families.load_model_dir) on an EDM2 folder: uint8
  batches of seeds 0..num-1 (the last cut to what is left), the images launch.sample makes for them (class =
  position = seed); here over the suite's 8 CPU devices, so to +-1 on a pixel."""
  from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
  from launch import evaluate as launch_evaluate  # pylint: disable=import-outside-toplevel
  sampler = launch_evaluate.build_sampler(str(dirs / "img"), 8, parallel.make_mesh(), sampler="dpmv3",
                                          num_steps=3, guide=str(dirs / "guide"), guidance=1.1)
  batches = list(sampler(10))
  assert [b.shape for b in batches] == [(8, 16, 16, 3), (2, 16, 16, 3)] and batches[0].dtype == np.uint8
  got = np.concatenate(batches)
  want = _reference(dirs / "img", range(10), range(10), "dpmv3", guide_dir=dirs / "guide", guidance=1.1,
                    num_steps=3, float64=True)
  diff = np.abs(got.astype(int) - want)
  print("evaluate sampler vs reference: max uint8 difference", diff.max(), "fraction differing", (diff > 0).mean())
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
