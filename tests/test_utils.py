"""ddo_jax.utils: atomic writes (permissions), metrics.jsonl robustness, logging format, Progress ETA."""
import json
import logging
import os
import pathlib
import re
import stat
import subprocess
import sys

import numpy as np
import pytest

from ddo_jax import utils

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def umask():
  """Set the process umask for a test, restoring it afterwards."""
  old = os.umask(0o022)
  os.umask(old)

  def set_mask(mask):
    os.umask(mask)
  yield set_mask
  os.umask(old)


class _ListHandler(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.records = []

  def emit(self, record):
    self.records.append(record)

  def messages(self, level=logging.DEBUG):
    return [r.getMessage() for r in self.records if r.levelno >= level]


@pytest.fixture
def logged():
  """The records of the 'ddo_jax' logger during a test (whatever setup_logging did to propagation)."""
  handler = _ListHandler()
  old_level = utils.log.level
  utils.log.setLevel(logging.DEBUG)
  utils.log.addHandler(handler)
  yield handler
  utils.log.removeHandler(handler)
  utils.log.setLevel(old_level)


@pytest.fixture
def restore_logging():
  """Undo what setup_logging does to the logging tree."""
  root = logging.getLogger()
  saved = (list(utils.log.handlers), utils.log.propagate, utils.log.level, list(root.handlers), root.level,
           {n: logging.getLogger(n).level for n in utils.QUIET_LOGGERS})
  yield
  for logger, handlers in ((utils.log, saved[0]), (root, saved[3])):
    for h in list(logger.handlers):
      if h not in handlers:
        logger.removeHandler(h)
        h.close()
    for h in handlers:
      if h not in logger.handlers:
        logger.addHandler(h)
  utils.log.propagate, utils.log.level = saved[1], saved[2]
  root.setLevel(saved[4])
  for n, level in saved[5].items():
    logging.getLogger(n).setLevel(level)


# --- permissions -----------------------------------------------------------------------------------------

def _writers(tmp_path):
  return {
      "text": lambda: utils.atomic_write_text(tmp_path / "a.txt", "hello\n"),
      "json": lambda: utils.atomic_write_json(tmp_path / "a.json", {"x": 1.5}),
      "bytes": lambda: utils.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01"),
      "savez": lambda: utils.atomic_savez(tmp_path / "a.npz", x=np.arange(3)),
  }


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_atomic_writers_get_the_permissions_of_a_plain_open(tmp_path, umask, mask):
  umask(mask)
  assert utils.current_umask() == mask
  assert utils.default_file_mode() == 0o666 & ~mask
  with open(tmp_path / "plain", "w") as f:
    f.write("x")
  plain = os.stat(tmp_path / "plain").st_mode & 0o777
  assert plain == 0o666 & ~mask
  for name, write in _writers(tmp_path).items():
    write()
    write()   # replacing an existing file too
  for name in ("a.txt", "a.json", "a.bin", "a.npz"):
    assert os.stat(tmp_path / name).st_mode & 0o777 == plain, name
  assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "a.json", "a.npz", "a.txt", "plain"]
  assert json.loads((tmp_path / "a.json").read_text()) == {"x": 1.5}
  np.testing.assert_array_equal(np.load(tmp_path / "a.npz")["x"], np.arange(3))


def test_umask_fallback_without_proc(umask, monkeypatch):
  umask(0o027)

  def no_proc(*args, **kwargs):
    raise OSError("no /proc here")
  monkeypatch.setattr(utils, "open", no_proc, raising=False)   # module globals shadow the builtin
  assert utils.current_umask() == 0o027
  monkeypatch.undo()
  assert utils.current_umask() == 0o027   # restored, and /proc agrees


def test_atomic_write_failure_keeps_the_old_file_and_no_temporary(tmp_path):
  path = tmp_path / "x.txt"
  utils.atomic_write_text(path, "old\n")
  with pytest.raises(RuntimeError):
    with utils.atomic_open(path, "w") as f:
      f.write("half")
      raise RuntimeError("killed")
  assert path.read_text() == "old\n"
  assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_atomic_write_fsyncs_file_and_folder(tmp_path, monkeypatch):
  synced = []
  real = os.fsync
  monkeypatch.setattr(utils.os, "fsync", lambda fd: (synced.append(os.fstat(fd).st_mode), real(fd)))
  utils.atomic_write_text(tmp_path / "x.txt", "a")
  assert [stat.S_ISREG(m) for m in synced] == [True, False]   # the file, then its directory


# --- metrics.jsonl ---------------------------------------------------------------------------------------

def _lines(path):
  return path.read_text().splitlines()


def test_torn_last_line_is_dropped_with_a_warning(tmp_path, logged):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 1, "step": 1}\n{"round": 1, "step": 2}\n{"round": 1, "st')
  assert len(utils.read_jsonl(path)) == 2          # read-only: skipped, file untouched
  assert any(f"{path}:3" in m for m in logged.messages(logging.WARNING))
  logged.records.clear()
  writer = utils.MetricWriter(path)
  warnings = logged.messages(logging.WARNING)
  assert len(warnings) == 1 and f"{path}:3" in warnings[0] and "torn" in warnings[0]
  assert _lines(path) == ['{"round": 1, "step": 1}', '{"round": 1, "step": 2}']
  writer.write(round=1, step=3)
  writer.drop(lambda rec: rec["step"] == 1)
  writer.write(round=1, step=4)
  assert [r["step"] for r in writer.read_records()] == [2, 3, 4]
  writer.close()
  assert [json.loads(l)["step"] for l in _lines(path)] == [2, 3, 4]


def test_torn_line_found_by_drop(tmp_path, logged):
  path = tmp_path / "metrics.jsonl"
  writer = utils.MetricWriter(path)
  writer.write(round=0, step=0)
  writer.close()
  with open(path, "a") as f:
    f.write('{"round": 1, "ste')        # another process was killed mid-append
  writer.drop(lambda rec: False)
  assert any(f"{path}:2" in m for m in logged.messages(logging.WARNING))
  assert _lines(path) == ['{"round": 0, "step": 0}']


def test_complete_last_line_without_newline_is_kept(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"step": 1}\n{"step": 2}')
  writer = utils.MetricWriter(path)
  writer.write(step=3)
  writer.close()
  assert [json.loads(l)["step"] for l in _lines(path)] == [1, 2, 3]


@pytest.mark.parametrize("bad", ['{"step": 2', "not json", "[1, 2]"])
def test_damaged_line_before_the_end_is_an_error_naming_file_and_line(tmp_path, bad):
  path = tmp_path / "metrics.jsonl"
  writer = utils.MetricWriter(path)        # opened while the file was still fine (here: absent)
  path.write_text(f'{{"step": 1}}\n{bad}\n{{"step": 3}}\n\n')
  for call in (lambda: utils.MetricWriter(path), lambda: utils.read_jsonl(path), writer.read_records,
               lambda: writer.drop(lambda rec: False)):
    with pytest.raises(ValueError) as e:
      call()
    message = str(e.value)
    assert message.startswith(f"{path}:2: ") and "\n" not in message


def test_drop_keeps_the_lines_byte_for_byte(tmp_path):
  path = tmp_path / "metrics.jsonl"
  writer = utils.MetricWriter(path)
  for s in range(4):
    writer.write(round=1, step=s, loss=1 / 3 + s, d_real=np.float32(0.5))
  before = _lines(path)
  writer.drop(lambda rec: rec["step"] >= 2)
  assert _lines(path) == before[:2]
  assert writer.read_records(lambda rec: rec["step"] == 1)[0]["loss"] == 1 / 3 + 1


def test_writes_are_flushed_and_fsynced_on_flush_and_close(tmp_path, monkeypatch):
  synced = []
  real = os.fsync
  monkeypatch.setattr(utils.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
  path = tmp_path / "metrics.jsonl"
  writer = utils.MetricWriter(path, fsync_every=1e9)
  writer.write(step=1)
  assert _lines(path) == ['{"step": 1}'] and not synced    # visible to readers, no fsync per record
  writer.flush()
  assert len(synced) == 1
  writer.write(step=2)
  writer.close()
  assert len(synced) == 2 and len(_lines(path)) == 2


def test_disabled_writer_touches_nothing(tmp_path):
  writer = utils.MetricWriter(tmp_path / "sub" / "metrics.jsonl", enabled=False)
  writer.write(step=1)
  writer.drop(lambda rec: True)
  writer.close()
  assert writer.read_records() == [] and not (tmp_path / "sub").exists()


# --- Progress ---------------------------------------------------------------------------------------------

class _Clock:
  def __init__(self, t):
    self.t = t

  def __call__(self):
    return self.t


def test_progress_eta_starts_after_compilation(monkeypatch, logged):
  clock = _Clock(1000.0)
  monkeypatch.setattr(utils.time, "time", clock)
  p = utils.Progress("round 1", 100, unit="steps", every=5.0)
  p.compiling()
  assert logged.messages() == ["round 1: compiling the first step..."]   # at once, before any step
  clock.t = 1012.0                      # 12 s of compilation + the first 10 steps
  p.update(10, "loss 1.3863")
  assert logged.messages()[-1] == "round 1: 10/100 (10%) 10 steps done in 12.0 s (compile + run) loss 1.3863"
  clock.t = 1013.0
  p.update(20)                          # throttled: under `every` seconds since the last line
  assert len(logged.messages()) == 2
  clock.t = 1020.0                      # 30 steps in 8 s after the first update: 3.75 steps/s
  p.update(40, "loss 1.3000")
  assert logged.messages()[-1] == "round 1: 40/100 (40%) 3.8 steps/s ETA 0:16 loss 1.3000"
  clock.t = 1028.0
  p.update(100)                         # the last update is always logged
  assert logged.messages()[-1] == "round 1: 100/100 (100%) 5.6 steps/s done in 0:28"


def test_progress_resumed_and_slow(monkeypatch, logged):
  clock = _Clock(0.0)
  monkeypatch.setattr(utils.time, "time", clock)
  p = utils.Progress("fid samples", 50_000, unit="images", every=1.0, start=20_000)
  clock.t = 3.0
  p.update(20_100)
  assert logged.messages()[-1] == "fid samples: 20100/50000 (40%) 100 images done in 3.0 s"
  clock.t = 3603.0                       # 100 images in an hour: rate < 1/s, ETA over an hour
  p.update(20_200)
  assert logged.messages()[-1] == "fid samples: 20200/50000 (40%) 0.028 images/s ETA 298:00:00"
  clock.t = 3604.0
  p.update(20_300, force=True)
  assert "ETA" in logged.messages()[-1]


# --- logging ----------------------------------------------------------------------------------------------

def test_setup_logging_is_idempotent_and_does_not_propagate(tmp_path, restore_logging, capsys):
  utils.setup_logging()
  utils.setup_logging(log_file=tmp_path / "train.log")
  ours = [h for h in utils.log.handlers if getattr(h, "_ddo_jax_handler", False)]
  assert len(ours) == 2 and not utils.log.propagate      # one terminal handler, one file handler
  utils.log.info("round 1: 40/100 (40%%) 3.2 steps/s ETA 0:19 loss %.4f", 1.38629)
  logging.getLogger("jax").info("jax chatter")
  err = capsys.readouterr().err
  assert re.fullmatch(r"\d\d:\d\d:\d\d round 1: 40/100 \(40%\) 3\.2 steps/s ETA 0:19 loss 1\.3863\n", err), err
  utils.setup_logging()                                  # a later call drops the file handler
  assert len([h for h in utils.log.handlers if getattr(h, "_ddo_jax_handler", False)]) == 1
  assert "round 1: 40/100" in (tmp_path / "train.log").read_text()


_ABSL_SCRIPT = """
import logging, sys
from absl import app
from ddo_jax import utils

def main(argv):
  utils.setup_logging(log_file=sys.argv[1])
  utils.log.info("round 1: 40/100 (40%%) 3.2 steps/s ETA 0:19 loss %.4f", 1.3863)
  logging.getLogger("absl").info("absl chatter")
  logging.getLogger("jax").info("jax chatter")
  logging.getLogger("orbax").info("orbax chatter")
  logging.getLogger("jax").warning("a jax warning")
  utils.log.warning("careful")

if __name__ == "__main__":
  app.run(main)
"""


def test_terminal_lines_have_no_absl_prefix_under_absl_app(tmp_path):
  script = tmp_path / "absl_main.py"
  script.write_text(_ABSL_SCRIPT)
  log_file = tmp_path / "train.log"
  env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, str(script), str(log_file)], capture_output=True, text=True, env=env,
                        cwd=tmp_path, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr
  lines = proc.stderr.splitlines()
  assert re.fullmatch(r"\d\d:\d\d:\d\d round 1: 40/100 \(40%\) 3\.2 steps/s ETA 0:19 loss 1\.3863", lines[0]), lines
  assert any(re.fullmatch(r"\d\d:\d\d:\d\d WARNING careful", l) for l in lines), lines
  assert "chatter" not in proc.stderr                       # third-party INFO is quiet on the terminal
  assert "a jax warning" in proc.stderr                     # their warnings still show (absl's handler)
  assert not any(re.match(r"[IWE]\d{4} ", l) and "round 1" in l for l in lines), lines
  text = log_file.read_text()
  assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} INFO ddo_jax absl_main:8\] round 1: 40/100", text,
                   re.M), text
  assert re.search(r"WARNING ddo_jax absl_main:\d+\] careful", text), text
  assert re.search(r"WARNING jax absl_main:\d+\] a jax warning", text), text
  assert "chatter" not in text
