"""The self-play driver end to end: CLI, outputs, config errors, and exact resume after SIGKILL."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# Wider negative store than the tiny default so that a kill can land inside its generation.
OVERRIDES = ["--config.negatives.num=6144"]


def _env():
  env = dict(os.environ)
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _cmd(workdir, extra=()):
  return [sys.executable, "-m", "launch.train", "--config", "configs/toy_diffusion.py:tiny",
          "--workdir", str(workdir), *OVERRIDES, *extra]


def _run(workdir, extra=()):
  out = subprocess.run(_cmd(workdir, extra), cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
  return out


def _run_and_kill(workdir, condition, timeout=300):
  """Start a run, SIGKILL it as soon as condition(workdir) holds; returns whether the kill landed."""
  proc = subprocess.Popen(_cmd(workdir), cwd=REPO, env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  t0 = time.time()
  try:
    while proc.poll() is None and time.time() - t0 < timeout:
      if condition(workdir):
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        return True
      time.sleep(0.01)
    return False
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _chosen_params(workdir, rounds):
  from ddo_jax import tree_io
  return [tree_io.load_tree(pathlib.Path(workdir) / f"round_{r:03d}" / "chosen")["params"] for r in rounds]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  return workdir, out


def test_run_writes_rounds_summaries_and_pngs(reference_run):
  workdir, out = reference_run
  summary = json.loads((workdir / "summary.json").read_text())
  assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
  for name in ("samples_per_round.png", "metrics_per_round.png", "metrics.jsonl", "config.json"):
    assert (workdir / name).stat().st_size > 0, name
  for r in (1, 2):
    rs = json.loads((workdir / f"round_{r:03d}" / "summary.json").read_text())
    assert rs["step_compilations"] == 1            # the step compiled once for the whole run
    assert rs["chosen_step"] in [h["step"] for h in rs["history"] if h["step"] > 0]
    assert rs["metrics"]["swd"] == min(h["swd"] for h in rs["history"] if h["step"] > 0)
    assert (workdir / f"round_{r:03d}" / "negatives" / "manifest.json").exists()
    assert (workdir / f"round_{r:03d}" / "metrics.png").exists()
  assert "metrics of each round's chosen model" in out.stdout
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert any(r.get("round") == 2 and "d_real" in r for r in records)
  assert "step compiled 1 time(s)" in out.stderr


def test_sigkill_at_any_phase_then_resume_is_bitwise_identical(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "killed"
  negatives = workdir / "round_001" / "negatives"
  # (what, kill when, the phase was still unfinished when the process died)
  kills = [
      ("pretraining", lambda w: (w / "config.json").exists() and time.sleep(2.0) is None,
       lambda w: not (w / "round_000" / "chosen").exists()),
      ("negative generation", lambda w: len(list(negatives.glob("chunk_*.npz"))) >= 3,
       lambda w: not (negatives / "manifest.json").exists()),
      ("round 1 training", lambda w: (w / "round_001" / "checkpoints" / "8").exists(),
       lambda w: not (w / "round_001" / "chosen").exists()),
      ("round 2", lambda w: (w / "round_002" / "checkpoints" / "4").exists(),
       lambda w: not (w / "round_002" / "chosen").exists()),
  ]
  landed = []
  for what, cond, unfinished in kills:
    if _run_and_kill(workdir, cond) and unfinished(workdir):
      landed.append(what)
  print("kills that landed inside their phase:", landed)
  assert "negative generation" in landed and "round 1 training" in landed, landed
  # The store was left incomplete by the kill inside its generation: the run must finish it.
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  for a, b in zip(_chosen_params(ref_dir, (0, 1, 2)), _chosen_params(workdir, (0, 1, 2))):
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
      np.testing.assert_array_equal(x, y)            # bitwise
  assert json.loads((workdir / "summary.json").read_text())["rounds"] == \
      json.loads((ref_dir / "summary.json").read_text())["rounds"]
  # metrics.jsonl holds each logged step once, with the same values as the uninterrupted run.
  lines = lambda w: sorted((w / "metrics.jsonl").read_text().splitlines())
  assert lines(workdir) == lines(ref_dir)


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_invalid_and_unknown_config_values_fail_at_start(tmp_path):
  bad = subprocess.run(_cmd(tmp_path / "a", ["--config.ddo.alpha=-1"]), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and "ddo.alpha must be > 0" in bad.stderr
  unknown = subprocess.run(_cmd(tmp_path / "b", ["--config.ddo.gamma=1"]), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
  assert unknown.returncode != 0 and "gamma" in unknown.stderr
  assert not (tmp_path / "a" / "round_000").exists()


def test_resume_with_a_different_config_is_refused(tmp_path):
  from configs import toy_diffusion
  from ddo_jax.train import rounds
  config = toy_diffusion.get_config("tiny")
  rounds.check_workdir_config(config, tmp_path)
  config.ddo.alpha = 3.0
  with pytest.raises(ValueError, match="different config.*ddo.alpha"):
    rounds.check_workdir_config(config, tmp_path)
