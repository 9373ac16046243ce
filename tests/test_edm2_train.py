"""EDM2 end to end: the `tiny` variants of configs/edm2_img64.py (pixels) and configs/edm2_img512.py
(latents) run two DDO rounds with offline negatives through `python -m launch.train`; the full variants
stop at start with one line when their data is missing."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.parametrize("config,channels", [("edm2_img64.py", 3), ("edm2_img512.py", 4)])
def test_tiny_variant_runs_two_rounds(tmp_path, config, channels):
  work = tmp_path / "work"
  out = _run("--config", f"configs/{config}:tiny", "--workdir", str(work))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "SYNTHETIC" in out.stderr and "RANDOMLY INITIALISED" in out.stderr
  summary = json.loads((work / "summary.json").read_text())
  assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
  for r in (1, 2):
    rdir = work / f"round_{r:03d}"
    with np.load(rdir / "negatives" / "chunk_00000.npz") as f:
      assert f["x"].shape == (32, 16, 16, channels) and np.all(np.isfinite(f["x"]))
      np.testing.assert_array_equal(np.argmax(f["label"], -1), np.arange(32) % 10)   # class-balanced
    rs = json.loads((rdir / "summary.json").read_text())
    assert rs["step_compilations"] == 1
    meta = json.loads((rdir / "model.json").read_text())
    assert meta["family"] == "edm2" and meta["space"] == ("latent" if channels == 4 else "pixel")
  # DDO moved the model: each round's chosen denoising loss differs from the previous round's.
  losses = [r["denoise_loss"] for r in summary["rounds"]]
  assert losses[1] != losses[0] and losses[2] != losses[1], losses
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  lrs = [r["lr"] for r in records if r.get("round") == 1 and "lr" in r]
  assert lrs and all(np.isfinite(lrs))
  assert (work / "samples_per_round.png").stat().st_size > 0


@pytest.mark.parametrize("variant", ["edm2_img64.py:s", "edm2_img512.py:l"])
def test_full_variant_without_data_is_one_line(tmp_path, variant):
  out = _run("--config", f"configs/{variant}", "--workdir", str(tmp_path / "w"),
             "--config.init.checkpoint=/nonexistent/edm2", timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2, out.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: ") and "config.model.data.path" in lines[0], lines
  assert "dataset_tool.py" in lines[0]
  assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_bad_schedule_is_one_line(tmp_path):
  out = _run("--config", "configs/edm2_img64.py:tiny", "--workdir", str(tmp_path / "w"),
             "--config.optim.ref_steps=0", timeout=120)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and len(lines) == 1 and "(config.optim.ref_steps)" in lines[0], out.stderr[-2000:]


def test_tiny_latent_run_through_the_sd_vae_with_fid_selection(tmp_path):
  """configs/edm2_img512.py:tiny through the goldens' tiny SD VAE (diffusers folder): SYNTHETIC disc images
  encoded into latents on the fly, two DDO rounds, each checkpoint chosen by FID of class-balanced samples
  decoded by the VAE (random Inception, an EDM2-style reference .pkl)."""
  import pickle
  from ddo_jax.convert import inception_names
  from ddo_jax.metrics import evaluator as evaluator_lib
  from tests import test_evaluator
  from tests.goldens import golden_path
  evaluator_lib.save_inception_npz(
      inception_names.inception_variables_from_state_dict(test_evaluator.hash_inception_state_dict()),
      tmp_path / "inception.npz")
  rng = np.random.default_rng(0)
  a = rng.standard_normal((2048, 64)) * 0.1
  with open(tmp_path / "img512.pkl", "wb") as f:
    pickle.dump({"num_images": 50000, "fid": {"mu": rng.standard_normal(2048) * 0.1,
                                              "sigma": a @ a.T + 0.01 * np.eye(2048)}}, f)
  work = tmp_path / "work"
  out = _run("--config", "configs/edm2_img512.py:tiny", "--workdir", str(work),
             "--config.model.data.source=synthetic_images",
             f"--config.model.vae={golden_path('sd_vae', 'diffusers_tiny')}",
             "--config.model.metric=fid", "--config.selection.metric=fid",
             f"--config.model.eval.inception={tmp_path / 'inception.npz'}",
             f"--config.model.eval.ref_stats={tmp_path / 'img512.pkl'}",
             "--config.model.eval.num_samples=8", "--config.model.eval.batch_size=8")
  assert out.returncode == 0, out.stderr[-4000:]
  assert "encoded by the VAE of model.vae" in out.stderr
  summary = json.loads((work / "summary.json").read_text())
  assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
  fids = [r["fid"] for r in summary["rounds"]]
  assert all(np.isfinite(fids)) and fids[1] != fids[0], fids
  for r in (1, 2):
    rdir = work / f"round_{r:03d}"
    with np.load(rdir / "negatives" / "chunk_00000.npz") as f:
      assert f["x"].shape == (32, 16, 16, 4) and np.all(np.isfinite(f["x"]))
    assert json.loads((rdir / "summary.json").read_text())["step_compilations"] == 1
