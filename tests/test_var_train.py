"""VAR end to end: `configs/var_imagenet256.py:tiny` runs two DDO rounds with online negatives through
`python -m launch.train`; a rerun of the finished run does nothing; a converted checkpoint of another family
is refused in one line."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run(*args, timeout=600):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "launch.train", *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)


def test_tiny_variant_runs_two_rounds_and_resume_is_a_no_op(tmp_path):
  work = tmp_path / "work"
  out = _run("--config", "configs/var_imagenet256.py:tiny", "--workdir", str(work))
  assert out.returncode == 0, out.stderr[-4000:]
  assert "SYNTHETIC" in out.stderr and "RANDOMLY INITIALISED" in out.stderr
  summary = json.loads((work / "summary.json").read_text())
  assert [r["round"] for r in summary["rounds"]] == [0, 1, 2]
  nll = [r["nll"] for r in summary["rounds"]]
  assert all(0 < v < 10 for v in nll) and nll[1] != nll[0] and nll[2] != nll[1], nll   # DDO moved the model
  for r in (1, 2):
    rdir = work / f"round_{r:03d}"
    rs = json.loads((rdir / "summary.json").read_text())
    assert rs["round"] == r and rs["step_compilations"] == 1
    meta = json.loads((rdir / "model.json").read_text())
    assert meta["family"] == "var" and meta["net"]["depth"] == 2 and meta["vae"]["vocab_size"] == 64
  records = [json.loads(l) for l in (work / "metrics.jsonl").read_text().splitlines()]
  losses = [r["loss"] for r in records if r.get("round") == 1 and "loss" in r]
  assert len(losses) == 2 and all(0.5 < v < 1.0 for v in losses), losses
  before = {p: p.stat().st_mtime_ns for p in work.rglob("summary.json")}
  again = _run("--config", "configs/var_imagenet256.py:tiny", "--workdir", str(work))
  assert again.returncode == 0, again.stderr[-4000:]
  assert {p: p.stat().st_mtime_ns for p in work.rglob("summary.json")} == before
  assert "compiling the DDO step" not in again.stderr


def test_checkpoint_of_another_family_is_one_line(tmp_path):
  ckpt = tmp_path / "edm2_model"
  (ckpt / "params").mkdir(parents=True)
  (ckpt / "model.json").write_text(json.dumps({"family": "edm2", "net": {}}))
  out = _run("--config", "configs/var_imagenet256.py:tiny", "--workdir", str(tmp_path / "w"),
             "--config.init.kind=checkpoint", f"--config.init.checkpoint={ckpt}", timeout=300)
  lines = out.stderr.strip().splitlines()
  errors = [l for l in lines if l.startswith("error: ")]
  assert out.returncode == 2, out.stderr[-3000:]
  assert len(errors) == 1 and "'edm2' checkpoint, not a VAR one" in errors[0], lines
  assert "(config.init.checkpoint)" in errors[0] and "launch.convert var" in errors[0]
