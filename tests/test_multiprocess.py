"""Multi-process runs on one CPU machine: JAX's multi-controller runtime (one process per "host") rehearsed
with launch/local_multiprocess.py, 2 processes x 2 virtual CPU devices against 1 process x 4 devices.

What a 2-process run changes: the global batch is assembled from each process's rows, the cross-device sums
of the gradients run through gloo (TCP) instead of in-process, files are written by process 0 behind
barriers, Orbax and the checksums gather shards from both processes. Results match the 1-process run to
float32 rounding, not bitwise: gloo's all-reduce adds the per-device partial sums in another order than
XLA's in-process all-reduce (a run with the same process and device counts is bitwise reproducible, which
the resume test checks).

The quick tests run by default (about a minute and a half on 2 cores); the slower ones (`@SLOW`: several
full runs each) run with DDO_JAX_SLOW=1. Every subprocess has a timeout, and the launcher's own --timeout
stops all its processes before it, so nothing here can hang.

The worker half of this file (`python -m tests.test_multiprocess WORKER OUT`, started by the launcher)
is at the bottom.
"""
import functools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SLOW = pytest.mark.skipif(not os.environ.get("DDO_JAX_SLOW"),
                          reason="slow multi-process test (several full runs); set DDO_JAX_SLOW=1")
TOY = "configs/toy_diffusion.py:tiny"


# --- helpers --------------------------------------------------------------------------------------------

def _base_env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env.pop("XLA_FLAGS", None)   # the launcher (or _single) sets the device count
  env.pop("DDO_JAX_KILL_AT", None)
  return env


def _launch(command, *, n=2, d=2, timeout=600, grace=10, heartbeat=30, env=None):
  """Run `command` as n processes x d devices through launch/local_multiprocess.py."""
  cmd = [sys.executable, "-m", "launch.local_multiprocess", "-n", str(n), "-d", str(d), "--grace", str(grace),
         "--heartbeat_timeout", str(heartbeat), "--timeout", str(timeout - 30), "--", *command]
  return subprocess.run(cmd, cwd=REPO, env=dict(_base_env(), **(env or {})), capture_output=True, text=True,
                        timeout=timeout)


def _single(command, *, d=4, timeout=600, env=None):
  """Run `command` as one process with d devices."""
  e = dict(_base_env(), XLA_FLAGS=f"--xla_force_host_platform_device_count={d}", **(env or {}))
  return subprocess.run(command, cwd=REPO, env=e, capture_output=True, text=True, timeout=timeout)


def _train(workdir, config=TOY, extra=()):
  return [sys.executable, "-m", "launch.train", "--config", config, "--workdir", str(workdir), *extra]


def _ok(out):
  if out.returncode != 0:   # the first fatal lines (XLA's F... / Check failed, Python's errors), then the tail
    first = [l for l in out.stderr.splitlines() if re.match(r"(\[p\d\] )?(F\d{4} |E\d{4} |.*Error|.*error:)", l)]
    raise AssertionError(f"exit code {out.returncode}\n" + "\n".join(first[:20]) + "\n...\n" + out.stderr[-3000:])
  return out


def _chosen(workdir):
  from ddo_jax import tree_io
  rounds = sorted(int(p.name[6:]) for p in pathlib.Path(workdir).glob("round_*") if (p / "chosen").is_dir())
  return {r: tree_io.load_params_dir(pathlib.Path(workdir) / f"round_{r:03d}" / "chosen") for r in rounds}


def _leaves(tree):
  import jax
  return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def _max_rel_diff(a, b) -> float:
  """Largest |a - b| / max|a| over the leaves (0.0 when bitwise equal)."""
  worst = 0.0
  for x, y in zip(_leaves(a), _leaves(b)):
    assert x.shape == y.shape and x.dtype == y.dtype
    if not np.array_equal(x, y):
      worst = max(worst, float(np.max(np.abs(x.astype(np.float64) - y)) / max(np.max(np.abs(x)), 1e-30)))
  return worst


def _assert_same_run(a, b, *, rtol, bitwise=False):
  """Chosen parameters of every round equal (bitwise, or to `rtol` relative to each leaf's scale), the same
  chosen steps; returns the largest relative difference."""
  ca, cb = _chosen(a), _chosen(b)
  assert sorted(ca) == sorted(cb) and len(ca) >= 2
  worst = 0.0
  for r in ca:
    d = _max_rel_diff(ca[r], cb[r])
    if bitwise:
      assert d == 0.0, (r, d)
    assert d <= rtol, (r, d)
    worst = max(worst, d)
  for r in sorted(ca)[1:]:
    sa = json.loads((pathlib.Path(a) / f"round_{r:03d}" / "summary.json").read_text())
    sb = json.loads((pathlib.Path(b) / f"round_{r:03d}" / "summary.json").read_text())
    assert sa["chosen_step"] == sb["chosen_step"], r
  return worst


# --- the launcher itself (no JAX) ---------------------------------------------------------------------------

def test_launcher_sets_the_environment_prefixes_output_and_returns_the_failing_code():
  script = ("import os, sys; i = int(os.environ['JAX_PROCESS_ID']); "
            "print(i, os.environ['JAX_NUM_PROCESSES'], os.environ['JAX_COORDINATOR_ADDRESS'], "
            "os.environ['XLA_FLAGS'], os.environ['JAX_PLATFORMS']); print('err', i, file=sys.stderr); "
            "sys.exit(3 if i == 1 else 0)")
  out = _launch(["python", "-c", script], n=3, d=2, timeout=120)
  assert out.returncode == 3, out.stderr
  port = re.search(r"coordinator localhost:(\d+)", out.stderr).group(1)
  for i in range(3):
    assert f"[p{i}] {i} 3 localhost:{port} --xla_force_host_platform_device_count=2 cpu" in out.stdout
    assert f"[p{i}] err {i}" in out.stderr
  assert "process 1 failed (exit code 3)" in out.stderr


def test_launcher_stops_the_others_when_one_dies():
  script = ("import os, signal, time; i = int(os.environ['JAX_PROCESS_ID']); time.sleep(0.5); "
            "os.kill(os.getpid(), signal.SIGKILL) if i == 1 else time.sleep(300)")
  t0 = time.time()
  out = _launch(["python", "-c", script], n=2, d=1, grace=1, timeout=120)
  took = time.time() - t0
  assert out.returncode == 128 + signal.SIGKILL, out.stderr
  assert "process 1 failed (killed by SIGKILL)" in out.stderr
  assert "sending SIGTERM to process 0" in out.stderr
  assert took < 30, took


def test_launch_scripts_take_the_same_auto_init_path(monkeypatch):
  """launch/tpu_pod.sh, launch/slurm_gpu.sbatch and the local launcher all end in
  parallel.maybe_initialize_distributed, through the variables each one sets."""
  import jax
  from ddo_jax import parallel
  from launch import local_multiprocess
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
  monkeypatch.setattr(parallel.atexit, "register", lambda fn: None)
  launched = local_multiprocess.process_env({}, process_id=1, num_processes=2, devices=2, port=1234,
                                            heartbeat_s=30)
  cases = {
      "local": launched,
      "tpu_pod.sh": {"DDO_JAX_DISTRIBUTED": "1", "DDO_JAX_HEARTBEAT_TIMEOUT": "100"},
      "slurm": {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_JOB_ID": "7"},
      "gke tpu": {"TPU_WORKER_HOSTNAMES": "a,b"},
      "mpirun": {"OMPI_COMM_WORLD_SIZE": "2"},
  }
  for name, env in cases.items():
    for k in list(os.environ):
      if k.startswith(("JAX_", "SLURM_", "TPU_", "OMPI_", "DDO_JAX_")):
        monkeypatch.delenv(k)
    for k, v in env.items():
      monkeypatch.setenv(k, v)
    calls.clear()
    assert parallel.maybe_initialize_distributed(), name
    assert len(calls) == 1, name
    if name == "local":
      assert calls[0] == {"num_processes": 2, "process_id": 1, "heartbeat_timeout_seconds": 30}
    else:   # the rest is JAX's cluster detection (metadata server, SLURM variables, Open MPI)
      assert calls[0] == {"heartbeat_timeout_seconds": 100}, name
  for k in list(os.environ):
    if k.startswith(("JAX_COORDINATOR", "SLURM_", "TPU_", "OMPI_", "DDO_JAX_")):
      monkeypatch.delenv(k)
  calls.clear()
  assert not parallel.maybe_initialize_distributed() and not calls   # a plain one-process run
  monkeypatch.setenv("SLURM_NTASKS", "1")
  assert not parallel.maybe_initialize_distributed()                 # a one-task SLURM job
  # The scripts set what the detection needs and start the same entry point.
  tpu = (REPO / "launch" / "tpu_pod.sh").read_text()
  assert "export DDO_JAX_DISTRIBUTED=1" in tpu and "-m launch.train" in tpu and "--worker=all" in tpu
  slurm = (REPO / "launch" / "slurm_gpu.sbatch").read_text()
  assert "#SBATCH --ntasks-per-node=1" in slurm and "srun" in slurm and "-m launch.train" in slurm
  assert "DDO_JAX_HEARTBEAT_TIMEOUT" in tpu and "DDO_JAX_HEARTBEAT_TIMEOUT" in slurm


# --- steps and checkpoints across processes -----------------------------------------------------------------

STEP_CASES = {   # name: (mesh data, mesh fsdp, sharding rule, step implementation)
    "dp_jit": (-1, 1, "replicate", "jit"),
    "dp_shard_map": (-1, 1, "replicate", "shard_map"),
    "fsdp4_jit": (1, 4, "fsdp", "jit"),               # parameters sharded over both processes' devices
    "fsdp4_shard_map": (1, 4, "fsdp", "shard_map"),
    "fsdp2_shard_map": (2, 2, "fsdp", "shard_map"),   # sharded inside each process, data across them
}


def run_step_cases(devices=None, steps: int = 3) -> dict:
  """The toy DDO step (4 devices, global batch 32) for each of STEP_CASES; {name: (state, metrics)} with the
  states on host. Every process feeds only its rows of each global batch."""
  import jax
  from configs import toy_diffusion
  from ddo_jax import families, parallel
  from ddo_jax.train import optim, step as step_lib
  config = toy_diffusion.get_config("tiny")
  family = families.make(config)
  tx = optim.make_optimizer(config.optim)
  specs = {"ema": dict(kind="halflife", halflife_kimg=0.5, rampup_ratio=0.05)}
  params = family.init_params(jax.random.key(0))
  init = functools.partial(step_lib.init_state, tx=tx, ema_specs=specs)
  rng = np.random.default_rng(0)
  batches = [{"real": {"x": rng.normal(size=(32, 2)).astype(np.float32)},
              "fake": {"x": rng.normal(size=(32, 2)).astype(np.float32)}} for _ in range(steps)]
  p, n = jax.process_index(), jax.process_count()
  out = {}
  for name, (data, fsdp, rule, impl) in STEP_CASES.items():
    mesh = parallel.make_mesh(data, fsdp, devices=devices)
    rules = [(".*", rule)]
    shardings = parallel.param_shardings(jax.eval_shape(init, params, jax.random.key(0)), mesh, rules)
    ref_shardings = parallel.param_shardings(params, mesh, rules)
    state = jax.jit(init, out_shardings=shardings)(params, jax.random.key(1))
    ref = jax.jit(lambda q: jax.tree_util.tree_map(lambda x: x * 1.01, q), out_shardings=ref_shardings)(params)
    fn = step_lib.make_ddo_step(family, tx, specs, alpha=2.0, beta=1.0, batch_size=32, mesh=mesh,
                                shardings=shardings, ref_shardings=ref_shardings,
                                schedule=optim.make_schedule(config.optim), impl=impl)
    metrics = []
    for b in batches:
      local = jax.tree_util.tree_map(lambda x: x[p * len(x) // n:(p + 1) * len(x) // n], b)
      state, m = fn(state, ref, parallel.global_batch(local, mesh))
      metrics.append({k: float(v) for k, v in m.items()})
    out[name] = (state, metrics)
  return out


def _host_state(state):
  from ddo_jax import parallel
  return parallel.to_host({k: v for k, v in state.items() if k != "rng"})


def _abstract_state(mesh):
  import jax
  from configs import toy_diffusion
  from ddo_jax import families, parallel, tree_io
  from ddo_jax.train import optim, step as step_lib
  config = toy_diffusion.get_config("tiny")
  family = families.make(config)
  init = functools.partial(step_lib.init_state, tx=optim.make_optimizer(config.optim),
                           ema_specs={"ema": dict(kind="halflife", halflife_kimg=0.5, rampup_ratio=0.05)})
  abstract = jax.eval_shape(init, jax.eval_shape(family.init_params, jax.random.key(0)), jax.random.key(0))
  return tree_io.abstract_like(abstract, parallel.param_shardings(abstract, mesh, [(".*", "replicate")]))


@pytest.fixture(scope="module")
def two_process_steps(tmp_path_factory):
  out = tmp_path_factory.mktemp("steps")
  t0 = time.time()
  res = _ok(_launch(["python", "-m", "tests.test_multiprocess", "steps", str(out)], timeout=600))
  print(f"2 processes x 2 devices, {len(STEP_CASES)} step cases + checkpoints: {time.time() - t0:.0f} s")
  return out, res


def test_steps_across_processes_match_one_process(two_process_steps):
  """jit and shard_map steps, data parallel and FSDP over devices of both processes: 2 processes x 2
  devices equal 1 process x 4 devices to float32 rounding, and shard_map equals jit likewise."""
  import jax
  out, _ = two_process_steps
  multi = dict(np.load(out / "steps.npz"))
  single = {name: (_host_state(state), metrics) for name, (state, metrics) in
            run_step_cases(devices=jax.devices()[:4]).items()}
  report = {}
  for name, (state, metrics) in single.items():
    flat = [v for k, v in sorted(multi.items()) if k.startswith(name + "/")]
    leaves = _leaves(state)
    assert len(flat) == len(leaves)
    d = _max_rel_diff(leaves, flat)
    report[name] = d
    assert d < 1e-5, (name, d)   # float32 rounding of a sum of 4 partial gradients, through Adam
    m = json.loads((out / "metrics.json").read_text())[name]
    np.testing.assert_allclose([x["loss"] for x in m], [x["loss"] for x in metrics], rtol=1e-6)
  base = single["dp_jit"][0]
  for name in STEP_CASES:
    assert _max_rel_diff(base, single[name][0]) < 1e-5, name
    assert int(single[name][0]["step"]) == 3
  print("max relative difference, 2x2 vs 1x4:", report)


def test_checkpoint_of_two_processes_restores_on_one_and_on_four(two_process_steps, tmp_path):
  """A train state saved by 2 processes (Orbax, every process writing its shards; checksum gathered from
  both) restores on 1 process x 4 devices and on 4 processes x 1 device, verified."""
  import jax
  from ddo_jax import parallel, tree_io
  from ddo_jax.train import checkpoint
  out, _ = two_process_steps
  saved = dict(np.load(out / "steps.npz"))
  want = [v for k, v in sorted(saved.items()) if k.startswith("fsdp4_shard_map/")]
  mesh = parallel.make_mesh(devices=jax.devices()[:4])
  ckpts = checkpoint.RoundCheckpoints(out / "checkpoints", metric="loss")
  state, data_state, history, record = ckpts.restore(3, _abstract_state(mesh))   # verifies the checksum
  ckpts.close()
  assert data_state == {"position": 3} and record["num_processes"] == 2 and history[-1]["step"] == 3
  assert _max_rel_diff(_leaves(_host_state(state)), want) == 0.0
  tree = tree_io.load_tree(out / "tree", {"params": tree_io.abstract_like(state["params"],
                                                                          parallel.param_shardings(state["params"], mesh))})
  assert _max_rel_diff(tree["params"], state["params"]) == 0.0
  res = _ok(_launch(["python", "-m", "tests.test_multiprocess", "restore", str(out)], n=4, d=1, timeout=300))
  assert "[p0] restored and verified on 4 processes" in res.stdout


def test_a_dead_process_stops_its_peers(tmp_path):
  """One process SIGKILLs itself between collectives. The launcher is told to wait 120 s before stopping
  anyone, so the survivor must end by itself: at once when its next collective sees the closed connection
  (gloo's all-gather), with our message; or, when the collective waits on (gloo's all-reduce), when the
  coordinator declares the dead process gone (heartbeat timeout, 10 s here) and JAX terminates it."""
  took = {}
  for how, heartbeat in (("allgather", 30), ("allreduce", 10)):
    d = tmp_path / how
    d.mkdir()
    t0 = time.time()
    out = _launch(["python", "-m", "tests.test_multiprocess", "die", str(d), how], grace=120, timeout=300,
                  heartbeat=heartbeat)
    assert out.returncode == 128 + signal.SIGKILL, out.stderr[-3000:]
    assert "process 1 failed (killed by SIGKILL)" in out.stderr
    assert "sending SIGTERM" not in out.stderr           # it ended by itself, not by the launcher
    died = float((d / "died_at").read_text())
    ended = re.search(r"exit codes \[(\d+), (\d+)\] after ([0-9.]+) s", out.stderr)
    took[how] = t0 + float(ended.group(3)) - died      # launcher start + its run time - the death
    if how == "allgather":
      assert "process 0 of 2 stops (JaxRuntimeError" in out.stderr, out.stderr[-3000:]
      assert ended.group(1) == "1" and took[how] < 15, took
    else:
      assert "Terminating process because the JAX distributed service detected fatal errors" in out.stderr
      assert ended.group(1) == "134" and took[how] < 3 * heartbeat + 10, took
  print("seconds from the death of process 1 to the exit of process 0:", {k: round(v, 1) for k, v in took.items()})


# --- full runs of launch.train ------------------------------------------------------------------------------

FAST_TOY = ["--config.pretrain.steps=60"]


@pytest.fixture(scope="module")
def toy_runs(tmp_path_factory):
  """The toy config (offline negatives, evaluation, Orbax checkpoints, chosen/ trees) on 1 x 4 and 2 x 2."""
  root = tmp_path_factory.mktemp("toy")
  t0 = time.time()
  single = _ok(_single(_train(root / "single", extra=FAST_TOY)))
  t1 = time.time()
  multi = _ok(_launch(_train(root / "multi", extra=FAST_TOY)))
  print(f"toy tiny: 1 process x 4 devices {t1 - t0:.0f} s, 2 processes x 2 devices {time.time() - t1:.0f} s")
  return root, single, multi


def test_toy_run_on_two_processes_matches_one_process(toy_runs):
  root, _, multi = toy_runs
  worst = _assert_same_run(root / "single", root / "multi", rtol=2e-5)
  print(f"toy_diffusion tiny, 2x2 vs 1x4: max relative difference of the chosen parameters {worst:.2g}")
  # One writer: one metrics.jsonl record per logged step, one table on stdout, files complete.
  records = [json.loads(l) for l in (root / "multi" / "metrics.jsonl").read_text().splitlines()]
  keys = [(r.get("phase"), r.get("round"), r.get("step"), bool(r.get("eval"))) for r in records]
  assert len(keys) == len(set(keys))
  assert multi.stdout.count("metrics of each round's chosen model") == 1
  for name in ("summary.json", "samples_per_round.png", "metrics_per_round.png"):
    assert (root / "multi" / name).stat().st_size > 0
  for r in (1, 2):
    assert (root / "multi" / f"round_{r:03d}" / "negatives" / "manifest.json").exists()
    rs = json.loads((root / "multi" / f"round_{r:03d}" / "summary.json").read_text())
    assert rs["step_compilations"] == 1
  # The negatives both processes generated into one store are the 1-process store's to rounding.
  from ddo_jax.data import negatives
  a = negatives.load(root / "single" / "round_001" / "negatives")["x"]
  b = negatives.load(root / "multi" / "round_001" / "negatives")["x"]
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@SLOW
def test_killed_process_stops_the_run_and_the_rerun_resumes_bitwise(toy_runs, tmp_path):
  """SIGKILL one process mid-round: the other exits by itself within seconds with a message; rerunning the
  launch resumes and ends bitwise equal to the uninterrupted 2-process run."""
  root, _, _ = toy_runs
  workdir = tmp_path / "killed"
  cmd = [sys.executable, "-m", "launch.local_multiprocess", "-n", "2", "-d", "2", "--grace", "120",
         "--heartbeat_timeout", "30", "--timeout", "500", "--", *_train(workdir, extra=FAST_TOY)]
  proc = subprocess.Popen(cmd, cwd=REPO, env=_base_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  pids, killed_at, lines, ended_at = None, None, [], None
  try:
    for line in proc.stderr:
      lines.append(line)
      m = re.search(r"pids \[(\d+), (\d+)\]", line)
      if m:
        pids = [int(m.group(1)), int(m.group(2))]
      if killed_at is None and (workdir / "round_001" / "checkpoints" / "4").is_dir():
        os.kill(pids[1], signal.SIGKILL)
        killed_at = time.time()
      if killed_at and "exit codes" in line:
        ended_at = time.time()
    proc.wait(timeout=400)
  finally:
    if proc.poll() is None:
      proc.kill()
  text = "".join(lines)
  assert killed_at is not None, text[-3000:]
  assert "process 1 failed (killed by SIGKILL)" in text and "process 0 of 2 stops" in text, text[-3000:]
  assert "sending SIGTERM" not in text
  print(f"survivor exited {ended_at - killed_at:.1f} s after its peer was killed")
  assert ended_at - killed_at < 60
  _ok(_launch(_train(workdir, extra=FAST_TOY)))
  _assert_same_run(root / "multi", workdir, rtol=0.0, bitwise=True)


@SLOW
def test_checkpoint_of_a_two_process_run_resumes_on_one_and_on_four_processes(toy_runs, tmp_path):
  """Stop a 2 x 2 run after a round-1 checkpoint, resume copies on 1 x 4 and on 4 x 1: a note says the results
  now match to rounding, and they do."""
  root, _, _ = toy_runs
  first = tmp_path / "first"
  out = _launch(_train(first, extra=FAST_TOY), env={"DDO_JAX_KILL_AT": "checkpoint_saved:2"})
  assert out.returncode == 128 + signal.SIGKILL, out.stderr[-3000:]
  for name, run in (("one", lambda w: _single(_train(w, extra=FAST_TOY))),
                    ("four", lambda w: _launch(_train(w, extra=FAST_TOY), n=4, d=1))):
    w = tmp_path / name
    shutil.copytree(first, w, ignore=shutil.ignore_patterns(".lock"))
    res = _ok(run(w))
    assert "a state saved on 4 (" in res.stderr and "2 then)" in res.stderr and "float32 rounding" in res.stderr
    worst = _assert_same_run(root / "multi", w, rtol=2e-5)
    print(f"resumed on {name}: max relative difference {worst:.2g}")


@SLOW
def test_fsdp_and_shard_map_runs_across_processes(toy_runs, tmp_path):
  """mesh.fsdp=4 (parameters sharded over the devices of both processes), with the jit step and with the
  shard_map step, matches the data-parallel run to rounding."""
  root, _, _ = toy_runs
  for name, extra in (("fsdp", ["--config.mesh.fsdp=4", "--config.sharding_rules=[('.*', 'fsdp')]"]),
                      ("fsdp_shard_map", ["--config.mesh.fsdp=4", "--config.sharding_rules=[('.*', 'fsdp')]",
                                          "--config.step_impl=shard_map"]),
                      ("shard_map", ["--config.step_impl=shard_map"])):
    _ok(_launch(_train(tmp_path / name, extra=FAST_TOY + extra)))
    worst = _assert_same_run(root / "multi", tmp_path / name, rtol=1e-4)
    print(f"{name} on 2x2 vs data-parallel jit: max relative difference {worst:.2g}")


@SLOW
@pytest.mark.parametrize("config,extra", [
    ("configs/toy_grid.py:tiny", ["--config.negatives.mode=online"]),
    ("configs/edm_cifar10.py:tiny", []),
])
def test_other_configs_on_two_processes_match_one_process(config, extra, tmp_path):
  _ok(_single(_train(tmp_path / "single", config, extra), timeout=900))
  _ok(_launch(_train(tmp_path / "multi", config, extra), timeout=900))
  worst = _assert_same_run(tmp_path / "single", tmp_path / "multi", rtol=1e-4)
  print(f"{config} {extra}: 2x2 vs 1x4 max relative difference {worst:.2g}")



# --- evaluation and sampling across processes ---------------------------------------------------------------

def test_evaluator_counts_samples_held_by_every_process_once(tmp_path):
  """Samples fetched to every host (the driver's FID, launch.evaluate --model) are fed with
  add_global_uint8: on 2 processes every image counts once, and the statistics and logits equal one
  process's. A cheap linear feature map stands in for Inception (what is tested is who feeds which rows)."""
  _ok(_launch(["python", "-m", "tests.test_multiprocess", "evaluator", str(tmp_path / "multi")], timeout=300))
  _ok(_single([sys.executable, "-m", "tests.test_multiprocess", "evaluator", str(tmp_path / "single")],
              timeout=300))
  multi, single = (dict(np.load(tmp_path / name / "evaluator.npz")) for name in ("multi", "single"))
  assert int(multi["count"]) == int(single["count"]) == 13
  assert multi["logits"].shape == single["logits"].shape == (13, 1008)
  # Each feature is one float32 dot product of 768 terms, computed on another device (other blocking):
  # bound the difference by 768 float32 ulps of the sum of |terms| (rows * |w|), stored in the worker.
  for key in ("logits", "mu"):
    bound = multi["bound_" + key]
    assert np.all(np.abs(multi[key] - single[key]) <= bound), key
  np.testing.assert_allclose(multi["sigma"], single["sigma"], rtol=0, atol=float(multi["bound_sigma"]))


@pytest.fixture(scope="module")
def edm_model(tmp_path_factory):
  """The goldens' tiny conditional EDM (16x16, 10 classes), converted, and random Inception weights."""
  from ddo_jax.convert import edm
  from ddo_jax.metrics import evaluator as evaluator_lib
  from tests.goldens import golden_path
  root = tmp_path_factory.mktemp("edm_model")
  params, config, report = edm.convert_edm_pickle(golden_path("formats", "edm_tiny_cond.pkl"))
  edm.save_converted(root / "edm-tiny", params, config, report)
  from tests import test_evaluator
  from ddo_jax.convert import inception_names
  from tests.hashweights import hash_uniform
  state, k = {}, 0
  for name, (_, _, shape) in inception_names.expected_layout().items():
    scale, offset = test_evaluator._rule(name, shape)   # pylint: disable=protected-access
    state[name] = hash_uniform(test_evaluator.SEED_BASE + k, shape, scale, offset)
    k += 2 if name.endswith("running_var") else 1
  evaluator_lib.save_inception_npz(inception_names.inception_variables_from_state_dict(state),
                                   root / "inception.npz")
  from ddo_jax.metrics import reference_stats
  rng = np.random.default_rng(0)
  reference_stats.save_stats_npz(root / "ref.npz", rng.normal(size=2048), np.eye(2048))
  return root


def test_sample_across_processes_writes_the_same_images(edm_model, tmp_path):
  """launch.sample on 2 processes x 2 devices writes the PNGs (and npz) of 1 process x 4 devices, bitwise:
  each image is computed from its own seed's noise by the same program on one device."""
  cmd = [sys.executable, "-m", "launch.sample", "--model", str(edm_model / "edm-tiny"), "--seeds", "0-9",
         "--steps", "4", "--batch_size", "8", "--npz"]
  _ok(_launch([*cmd, "--outdir", str(tmp_path / "multi")], timeout=400))
  _ok(_single([*cmd, "--outdir", str(tmp_path / "single")], timeout=400))
  a, b = (np.load(tmp_path / name / "samples.npz") for name in ("multi", "single"))
  assert a["arr_0"].shape == (10, 16, 16, 3)
  np.testing.assert_array_equal(a["arr_0"], b["arr_0"])
  np.testing.assert_array_equal(a["labels"], b["labels"])


@SLOW
def test_evaluate_model_across_processes_matches_one_process(edm_model, tmp_path):
  """launch.evaluate --model on 2 processes x 2 devices: the same image count and the metrics of one process
  x 4 devices (Inception features to float32 rounding, statistics in float64)."""
  cmd = [sys.executable, "-m", "launch.evaluate", "--model", str(edm_model / "edm-tiny"), "--num", "12",
         "--steps", "4", "--batch_size", "8", "--inception", str(edm_model / "inception.npz"),
         "--ref", str(edm_model / "ref.npz"), "--metrics", "fid,is", "--is_splits", "2"]
  records = {}
  for name, run in (("multi", _launch), ("single", _single)):
    _ok(run([*cmd, "--out", str(tmp_path / f"{name}.json")], timeout=600))
    records[name] = json.loads((tmp_path / f"{name}.json").read_text())
  print(records)
  assert records["multi"]["num_images"] == records["single"]["num_images"] == 12
  for key in ("fid", "is_mean"):
    np.testing.assert_allclose(records["multi"][key], records["single"][key], rtol=1e-5)


# --- the worker half (run by the launcher) ------------------------------------------------------------------

def _worker_steps(out: pathlib.Path) -> None:
  import jax
  from ddo_jax import parallel, tree_io
  from ddo_jax.train import checkpoint
  results = run_step_cases()
  flat, metrics = {}, {}
  for name, (state, m) in results.items():
    for i, leaf in enumerate(_leaves(_host_state(state))):
      flat[f"{name}/{i:03d}"] = leaf
    metrics[name] = m
  if jax.process_index() == 0:
    np.savez(out / "steps.npz", **flat)
    (out / "metrics.json").write_text(json.dumps(metrics))
  # Checkpoints written by both processes: FSDP-sharded state (each process holds half of every leaf).
  state = results["fsdp4_shard_map"][0]
  ckpts = checkpoint.RoundCheckpoints(out / "checkpoints", metric="loss")
  ckpts.save(3, state, {"position": 3}, [{"step": 3, "loss": 1.0}], extra={"num_processes": jax.process_count()})
  ckpts.close()
  tree_io.save_tree(out / "tree", {"params": state["params"]})
  parallel.barrier("worker-steps-done")


def _worker_restore(out: pathlib.Path) -> None:
  import jax
  from ddo_jax import parallel
  from ddo_jax.train import checkpoint
  mesh = parallel.make_mesh()
  ckpts = checkpoint.RoundCheckpoints(out / "checkpoints", metric="loss")
  state, data_state, _, _ = ckpts.restore(3, _abstract_state(mesh))   # raises if the checksum differs
  ckpts.close()
  saved = dict(np.load(out / "steps.npz"))
  want = [v for k, v in sorted(saved.items()) if k.startswith("fsdp4_shard_map/")]
  assert _max_rel_diff(_leaves(_host_state(state)), want) == 0.0 and data_state == {"position": 3}
  parallel.barrier("worker-restore-done")
  print(f"restored and verified on {jax.process_count()} processes", flush=True)


def _worker_die(out: pathlib.Path, how: str) -> None:
  """Collectives in a loop; process 1 SIGKILLs itself after the 4th. `how`: 'allgather' (gloo sees the
  closed connection at once) or 'allreduce' (gloo's all-reduce waits on: the heartbeat ends it)."""
  import jax
  import jax.numpy as jnp
  from jax.experimental import multihost_utils
  from ddo_jax import parallel
  mesh = parallel.make_mesh()
  total = jax.jit(jnp.sum, out_shardings=parallel.replicated(mesh))
  x = parallel.global_batch(np.arange(4, dtype=np.float32) + 4 * jax.process_index(), mesh)
  try:
    for i in range(1000):
      if how == "allgather":
        assert multihost_utils.process_allgather(np.float32(i)).tolist() == [i, i]
      else:
        assert float(total(x)) == 28.0
      if i == 3 and jax.process_index() == 1:
        (out / "died_at").write_text(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(0.2)
  except BaseException as e:
    (out / "survivor_exit").write_text(repr(time.time()))
    parallel.fail_fast(e)   # what launch.train does (ddo_jax.train.rounds.train)
    raise


def _worker_evaluator(out: pathlib.Path) -> None:
  """13 images held by every process, fed in calls of 5 and 8 with add_global_uint8, global batch 8."""
  import jax
  import jax.numpy as jnp
  from ddo_jax import parallel
  from ddo_jax.metrics import evaluator as evaluator_lib

  class LinearFeatures:   # stands in for InceptionV3: pool3 and logits linear in the pixels
    def apply(self, variables, x):
      flat = x.reshape(x.shape[0], -1)
      return {"pool3": jnp.dot(flat, variables["w"], precision="highest"),
              "logits_unbiased": jnp.dot(flat, variables["v"], precision="highest")}

  rng = np.random.default_rng(0)
  variables = {"w": rng.normal(size=(768, 2048)).astype(np.float32),
               "v": rng.normal(size=(768, 1008)).astype(np.float32)}
  images = rng.integers(0, 256, size=(13, 16, 16, 3), dtype=np.uint8)
  ev = evaluator_lib.Evaluator(variables, parallel.make_mesh(), batch_size=8, model=LinearFeatures(),
                               compute_is=True)
  ev.add_global_uint8(images[:5])
  ev.add_global_uint8(images[5:])
  stats = ev.feature_stats()
  mu, sigma = ev.statistics()
  logits = ev.logits()
  if jax.process_index() == 0:
    out.mkdir(parents=True, exist_ok=True)
    x = images.reshape(13, -1).astype(np.float64) / 255.0   # what uint8_to_unit feeds the features
    eps = np.finfo(np.float32).eps
    bound_w = 768 * eps * (x @ np.abs(variables["w"]))
    bound_v = 768 * eps * (x @ np.abs(variables["v"]))
    feats = x @ np.abs(variables["w"])
    np.savez(out / "evaluator.npz", count=np.int64(stats.count), mu=mu, sigma=sigma, logits=logits,
             bound_logits=bound_v, bound_mu=bound_w.mean(0),
             # a covariance entry moves by at most ~2 * max|feature| * max feature error
             bound_sigma=np.float64(2.0 * 2.0 * feats.max() * bound_w.max()))
  parallel.barrier("worker-evaluator-done")


if __name__ == "__main__":
  from ddo_jax import parallel as _parallel
  _parallel.maybe_initialize_distributed()
  import jax as _jax
  _jax.config.update("jax_default_matmul_precision", "highest")
  {"steps": _worker_steps, "restore": _worker_restore, "die": _worker_die,
   "evaluator": _worker_evaluator}[sys.argv[1]](
      pathlib.Path(sys.argv[2]), *sys.argv[3:])
