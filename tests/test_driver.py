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


def _assert_same_results(workdir, ref_dir):
  """Bitwise-equal chosen parameters of every round, equal summaries and metrics.jsonl records."""
  for a, b in zip(_chosen_params(ref_dir, (0, 1, 2)), _chosen_params(workdir, (0, 1, 2))):
    for x, y in zip(jax_leaves(a), jax_leaves(b)):
      np.testing.assert_array_equal(x, y)            # bitwise
  assert json.loads((workdir / "summary.json").read_text())["rounds"] == \
      json.loads((ref_dir / "summary.json").read_text())["rounds"]
  for r in (1, 2):
    name = f"round_{r:03d}/summary.json"
    assert json.loads((workdir / name).read_text()) == json.loads((ref_dir / name).read_text()), name
  # metrics.jsonl holds each logged step once, with the same values as the uninterrupted run.
  lines = lambda w: sorted((w / "metrics.jsonl").read_text().splitlines())
  assert lines(workdir) == lines(ref_dir)


def _run_killed_at(workdir, point):
  """Run with DDO_JAX_KILL_AT=point (ddo_jax/faults.py); returns the exit code (-9 when the kill landed)."""
  env = dict(_env(), DDO_JAX_KILL_AT=point)
  return subprocess.run(_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600).returncode


# Each entry kills a fresh process of the same command at the n-th time it reaches a named point, in phase
# order, so that together they cover every phase boundary of the run (see ddo_jax/faults.py).
KILL_SCHEDULE = [
    "save_tree:1",          # round 0's chosen/ written to .partial, not renamed (pretraining is redone)
    "after_chosen:1",       # round 0's chosen/ complete, summary.json not written
    "in_eval:1",            # inside round 0's evaluation
    "negatives_chunk:3",    # inside round 1's negative generation
    "after_eval:1",         # round 1 evaluated step 8 (the round's best so far), its checkpoint not written
    "checkpoint_saved:2",   # round 1 saved step 12 past the best at 8, before pruning
    "after_chosen:1",       # round 1's chosen/ written, summary.json not
    "after_summary:1",      # round 1 done
    "checkpoint_saved:3",   # round 2 saved step 12 past its best (step 8): the best must survive
    "save_tree:1",          # inside the save of round 2's chosen/
]


def test_kill_at_every_phase_boundary_then_resume_is_bitwise_identical(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "killed"
  for point in KILL_SCHEDULE:
    assert _run_killed_at(workdir, point) == -signal.SIGKILL, f"the kill at {point} did not land"
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_results(workdir, ref_dir)
  # Round 2's best (step 8) came before its last save (16): kept through the kill after step 12.
  assert json.loads((workdir / "round_002" / "summary.json").read_text())["step_compilations"] == 1


def test_kill_at_random_moments_then_resume_is_bitwise_identical(reference_run, tmp_path):
  """SIGKILL at random moments (DDO_JAX_RANDOM_KILLS of them, default 5; more in a slow run), rerunning
  the same command after each; the result is the uninterrupted run's."""
  ref_dir, _ = reference_run
  workdir = tmp_path / "random"
  rng = np.random.default_rng(int(os.environ.get("DDO_JAX_KILL_SEED", "0")))
  kills = int(os.environ.get("DDO_JAX_RANDOM_KILLS", "5"))
  landed = 0
  for _ in range(kills):
    delay = rng.uniform(0.5, 8.0)
    landed += _run_and_kill(workdir, lambda w, t0=time.time(), d=delay: time.time() - t0 > d)
    if (workdir / "summary.json").exists():
      break
  print(f"{landed} random kills landed before the run completed")
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  _assert_same_results(workdir, ref_dir)


def _copy_run(src, dst):
  import shutil
  shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
  return dst


def test_damaged_files_are_detected_and_rebuilt(reference_run, tmp_path):
  ref_dir, _ = reference_run
  # A workdir killed in round 2 after its step-12 save: then damage what a rerun reads back.
  workdir = tmp_path / "damaged"
  for point in ("after_summary:1", "checkpoint_saved:3"):
    assert _run_killed_at(workdir, point) == -signal.SIGKILL
  latest = workdir / "round_002" / "checkpoints" / "12"
  victim = max((p for p in (latest / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])          # truncated checkpoint
  chunk = workdir / "round_002" / "negatives" / "chunk_00003.npz"
  chunk.write_bytes(chunk.read_bytes()[:100])                                    # truncated negatives chunk
  chosen = workdir / "round_001" / "chosen"
  data = max((p for p in chosen.rglob("*") if p.is_file() and "checksum" not in p.name),
             key=lambda p: p.stat().st_size)
  raw = bytearray(data.read_bytes())
  raw[len(raw) // 2] ^= 0x10                                                     # one flipped bit
  data.write_bytes(bytes(raw))
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write('{"round": 2, "step": 13, "lo')                                       # torn last line
  out = _run(workdir)
  assert out.returncode == 0, out.stderr[-3000:]
  for what in ("checkpoints/12", "chunk_00003.npz", "round_001/chosen", "torn last line"):
    assert what in out.stderr, (what, out.stderr[-3000:])
  assert (workdir / "round_002" / "corrupt").is_dir() and (workdir / "round_001" / "corrupt").is_dir()
  _assert_same_results(workdir, ref_dir)


def test_non_finite_training_stops_before_saving(tmp_path):
  workdir = tmp_path / "nan"
  out = _run(workdir, ["--config.optim.lr=1e30"])
  assert out.returncode == 2, out.stderr[-3000:]
  line = out.stderr.strip().splitlines()[-1]
  assert line.startswith("error: non-finite training at round 1 step ") and "config.optim.lr" in line
  assert "Traceback" not in out.stderr
  assert not (workdir / "round_001" / "checkpoints").exists() or \
      not any((workdir / "round_001" / "checkpoints").iterdir())
  assert (workdir / "round_000" / "chosen").is_dir()            # what was valid is kept


def test_second_process_on_a_workdir_is_refused(tmp_path):
  import fcntl
  workdir = tmp_path / "locked"
  workdir.mkdir()
  with open(workdir / ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    f.write("pid 1234 on testhost since now\n")
    f.flush()
    t0 = time.time()
    out = _run(workdir)
    assert time.time() - t0 < 60
  assert out.returncode == 2
  assert "another process is running in this workdir (pid 1234 on testhost" in out.stderr
  assert not (workdir / "config.json").exists()


def test_config_is_validated_before_anything_is_written(tmp_path):
  workdir = tmp_path / "w"
  bad = _run(workdir, ["--config.ddo.alpha=-1"])
  assert bad.returncode == 2 and "ddo.alpha must be > 0" in bad.stderr and not workdir.exists()
  missing = _run(workdir, ["--config.init.kind=checkpoint", "--config.init.checkpoint=/no/such/dir"])
  assert missing.returncode == 2 and "(config.init.checkpoint)" in missing.stderr and not workdir.exists()
  # A workdir with rounds but no config.json is not resumed under a guessed config.
  (workdir / "round_000").mkdir(parents=True)
  lost = _run(workdir)
  assert lost.returncode == 2 and "--rewrite_config" in lost.stderr
  (workdir / "config.json").write_text("{not json")
  garbage = _run(workdir)
  assert garbage.returncode == 2 and str(workdir / "config.json") in garbage.stderr
  assert "Traceback" not in garbage.stderr


def test_rerun_of_a_finished_run_says_so(reference_run):
  ref_dir, _ = reference_run
  out = _run(ref_dir)
  assert out.returncode == 0
  assert "holds a complete run of 2 rounds; nothing to do" in out.stdout
  assert "metrics of each round's chosen model" in out.stdout


def jax_leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_invalid_and_unknown_config_values_fail_at_start(tmp_path):
  bad = subprocess.run(_cmd(tmp_path / "a", ["--config.ddo.alpha=-1"]), cwd=REPO, env=_env(),
                       capture_output=True, text=True, timeout=300)
  assert bad.returncode == 2 and "ddo.alpha must be > 0" in bad.stderr
  unknown = subprocess.run(_cmd(tmp_path / "b", ["--config.ddo.alph=1"]), cwd=REPO, env=_env(),
                           capture_output=True, text=True, timeout=300)
  assert unknown.returncode == 2
  assert unknown.stderr.strip() == ("error: unknown config key 'ddo.alph' (Did you mean \"alpha\" instead of "
                                    "\"alph\"?) (--config.ddo.alph): list the keys with --print_config")
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_resume_with_a_different_config_is_refused(tmp_path):
  from configs import toy_diffusion
  from ddo_jax.train import rounds
  config = toy_diffusion.get_config("tiny")
  rounds.check_workdir_config(config, tmp_path)
  config.ddo.alpha = 3.0
  with pytest.raises(ValueError, match="different config.*ddo.alpha"):
    rounds.check_workdir_config(config, tmp_path)


def test_help_exits_zero_and_print_config_lists_variants_and_keys(tmp_path):
  run = lambda *a: subprocess.run([sys.executable, "-m", "launch.train", *a], cwd=REPO, env=_env(),
                                  capture_output=True, text=True, timeout=300)
  helped = run("--help")
  assert helped.returncode == 0 and "configs/toy_diffusion.py:tiny" in helped.stdout and "--workdir" in helped.stdout
  shown = run("--config", "configs/toy_diffusion.py:tiny", "--print_config", "--config.ddo.alpha=2")
  assert shown.returncode == 0, shown.stderr
  assert "variants (--config FILE:VARIANT)" in shown.stdout and "tiny" in shown.stdout
  assert "alpha: 2.0" in shown.stdout and "eval_every: 8" in shown.stdout
  assert not (tmp_path / "w").exists()


def test_resume_on_another_device_count_is_logged(reference_run, tmp_path):
  ref_dir, _ = reference_run
  workdir = tmp_path / "moved"
  assert _run_killed_at(workdir, "checkpoint_saved:2") == -signal.SIGKILL      # round 1, step 8, 2 devices
  env = dict(_env(), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  out = subprocess.run(_cmd(workdir), cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "resuming on 4 devices a state saved on 2" in out.stderr
  # Round 1 went on from step 8 with another reduction order: equal to float32 rounding, not bitwise.
  worst = max(float(np.max(np.abs(x - y)) / (np.max(np.abs(y)) + 1e-30))
              for x, y in zip(jax_leaves(_chosen_params(workdir, (1,))[0]), jax_leaves(_chosen_params(ref_dir, (1,))[0])))
  print(f"round 1 chosen params, 4 vs 2 devices after step 8: max relative difference {worst:.2g}")
  assert worst < 1e-4
