"""launch.sample: never more images than asked, resumable with truncated PNGs remade, settings recorded and
enforced, npz labels that belong to their images, one-line user errors (exit 2); and the sample-folder helpers
of ddo_jax.data.images behind it."""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddo_jax import cli
from ddo_jax.data import images
from tests.goldens import golden_path

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, devices=8):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(REPO))
  return subprocess.run([sys.executable, "-m", "launch.sample", *map(str, args)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _ok(proc):
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def _one_error_line(proc, *needles) -> str:
  """Exit 2, a single `error:` line (the last on stderr), no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr[-4000:])
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
  """The goldens' tiny conditional EDM (16x16, 10 classes), converted."""
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  out = tmp_path_factory.mktemp("model") / "edm-tiny"
  params, config, report = edm.convert_edm_pickle(golden_path("formats", "edm_tiny_cond.pkl"))
  edm.save_converted(out, params, config, report)
  return out


# --------------------------------------------------------------------------- the library helpers


def test_sample_batches_never_make_more_than_the_devices_force():
  def sizes(n, bs, multiple):
    plan = list(images.sample_batches(range(n), bs, multiple))
    assert [s for chunk, _ in plan for s in chunk] == list(range(n))   # every seed once, in order
    for chunk, ids in plan:
      assert ids.dtype == np.int32 and list(ids[:len(chunk)]) == chunk and set(ids[len(chunk):]) <= {chunk[-1]}
    return [len(ids) for _, ids in plan]

  assert sizes(16, 256, 1) == [16]               # was one call of 256 (183 s instead of 10 s)
  assert sizes(4, 100000, 8) == [8]              # rounded up to the 8 devices only
  assert sizes(50, 16, 8) == [16, 16, 16, 8]     # the last call holds the 2 left, padded to 8
  assert sizes(48, 16, 8) == [16, 16, 16]
  assert sizes(0, 16, 8) == []
  assert images.describe_batches([16, 16, 16, 8]) == "3 x 16 + 1 x 8"
  with pytest.raises(ValueError, match="multiple of 8"):
    list(images.sample_batches(range(4), 12, 8))
  with pytest.raises(cli.UserError, match="not positive") as info:
    images.check_batch_size(0, 8)
  assert info.value.where == "--batch_size"
  with pytest.raises(cli.UserError, match="use 8 or 16"):
    images.check_batch_size(12, 8)


def test_truncated_png_is_pending_again(tmp_path):
  rng = np.random.default_rng(0)
  for seed in (3, 1004):
    images.write_png(images.png_path(tmp_path, seed), rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
  assert images.png_path(tmp_path, 1004) == tmp_path / "001000" / "001004.png"
  assert images.pending_seeds(tmp_path, [3, 1004, 7, 3], (16, 16, 3)) == [7]
  path = images.png_path(tmp_path, 1004)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])           # a write cut short by a kill
  assert not images.png_is_complete(path)
  assert images.pending_seeds(tmp_path, [3, 1004], (16, 16, 3)) == [1004]
  assert images.pending_seeds(tmp_path, [3], (32, 32, 3)) == [3]    # another resolution is not ours
  assert not list(tmp_path.rglob(".*.tmp"))


def test_settings_are_recorded_and_enforced(tmp_path):
  settings = {"model": "/a/ckpt", "params_sha256": "abc", "sampler.num_steps": 18, "labels": "random",
              "image_shape": (16, 16, 3)}
  images.check_settings(tmp_path, settings, "0-9")
  recorded = json.loads((tmp_path / images.SETTINGS_JSON).read_text())
  assert recorded["seeds"] == ["0-9"] and recorded["image_shape"] == [16, 16, 3]
  # Same images from a moved model folder and other seeds: accepted, the seed lists are kept.
  images.check_settings(tmp_path, dict(settings, model="/b/ckpt"), "10-19")
  assert json.loads((tmp_path / images.SETTINGS_JSON).read_text())["seeds"] == ["0-9", "10-19"]
  with pytest.raises(cli.UserError) as info:
    images.check_settings(tmp_path, dict(settings, labels="balanced", **{"sampler.num_steps": 4}), "0-9")
  line = str(info.value)
  assert info.value.where == "--outdir" and "use another --outdir or delete it" in line
  assert "labels: 'random' there vs 'balanced' now" in line and "sampler.num_steps: 18 there vs 4 now" in line
  assert "params_sha256" not in line and "\n" not in line


# --------------------------------------------------------------------------- the command line


def test_user_errors_are_one_line(tmp_path, model):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  out = tmp_path / "out"
  _one_error_line(_run("--model", model, "--outdir", out, "--seeds", "5-a"), "(--seeds)", "0-49999", "1,2,5-9")
  _one_error_line(_run("--model", model, "--outdir", out, "--seeds", "9-5"), "ends before it starts", "(--seeds)")
  _one_error_line(_run("--model", model, "--outdir", out, "--batch_size", "0"), "not positive", "(--batch_size)")
  _one_error_line(_run("--model", model, "--outdir", out, "--batch_size", "-4"), "(--batch_size)")
  _one_error_line(_run("--model", model, "--outdir", a_file), "is not a folder", "(--outdir)")
  _one_error_line(_run("--model", tmp_path, "--outdir", out), "has no model.json", "(--model)")
  _one_error_line(_run("--outdir", out), "--model")
  assert not out.exists()
  proc = _run("--help")
  assert proc.returncode == 0 and "--seeds" in proc.stdout and "Traceback" not in proc.stderr


def test_sample_resume_settings_and_npz_labels(tmp_path, model):
  out = tmp_path / "out"
  common = ("--model", model, "--outdir", out, "--steps", "2")
  # 4 seeds with a huge batch on 8 devices: one call of 8 images, not 100000.
  log = _ok(_run(*common, "--seeds", "0-3", "--batch_size", "100000", "--npz"))
  assert "compiling the sampler (first batch)..." in log and "sampler calls: 1 x 8 images" in log, log
  settings = json.loads((out / images.SETTINGS_JSON).read_text())
  assert settings["sampler.num_steps"] == 2 and settings["labels"] == "random" and settings["seeds"] == ["0-3"]
  with np.load(out / "samples.npz") as f:
    first = {k: f[k] for k in f.files}
  assert first["arr_0"].shape == (4, 16, 16, 3) and first["arr_0"].std() > 5
  assert sorted(p.name for p in (out / "000000").iterdir()) == [f"{s:06d}.png" for s in range(4)]

  # A PNG truncated by a kill is made again (the same image), the others are kept.
  path = images.png_path(out, 2)
  path.write_bytes(path.read_bytes()[:100])
  log = _ok(_run(*common, "--seeds", "0-3", "--batch_size", "8", "--npz"))
  assert "4 seeds requested, 3 already written, 1 to generate" in log and "1 existing PNGs do not decode" in log
  with np.load(out / "samples.npz") as f:
    np.testing.assert_array_equal(f["arr_0"], first["arr_0"])
    np.testing.assert_array_equal(f["labels"], first["labels"])

  # Other settings in the same folder are refused before anything is written.
  line = _one_error_line(_run(*common[:-1], "3", "--seeds", "0-7"), "sampler.num_steps: 2 there vs 3 now",
                         "(--outdir)", "use another --outdir or delete it")
  print(line)
  assert not images.png_path(out, 7).exists()

  # float64 + random labels: the npz labels are the ones the images were sampled with (under float64 the
  # random classes are drawn as int64 and differ from float32 mode's).
  out64 = tmp_path / "out64"
  _ok(_run("--model", model, "--outdir", out64, "--steps", "2", "--seeds", "0-7", "--batch_size", "8", "--float64",
           "--npz"))
  from ddo_jax.families.edm import load_model_dir  # pylint: disable=import-outside-toplevel
  from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
  family, _ = load_model_dir(model, labels="random", num_steps=2)
  seeds = np.arange(8, dtype=np.int32)

  def classes(x64):
    with jax.enable_x64(x64):
      keys = seeded.seed_keys(jax.random.key(seeded.CLI_BASE_SEED), seeds)
      return np.asarray(jax.jit(lambda k, s: family.labels_for(k, s).argmax(-1))(keys, seeds))

  with np.load(out64 / "samples.npz") as f:
    np.testing.assert_array_equal(f["labels"], classes(True))
    np.testing.assert_array_equal(f["seeds"], seeds)
  # A seed's random label does not depend on the precision mode (int32 draws under x64 too).
  np.testing.assert_array_equal(classes(True), classes(False))
  np.testing.assert_array_equal(first["labels"], classes(False)[:4])
