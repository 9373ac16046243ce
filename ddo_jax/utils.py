"""Logging with progress (rate and ETA), JSONL metrics, atomic file writes."""
import json
import logging
import os
import pathlib
import tempfile
import time

log = logging.getLogger("ddo_jax")


def setup_logging(level=logging.INFO) -> None:
  """Our INFO lines on stderr; Orbax's and JAX's chatter (absl INFO) only from WARNING up."""
  if not logging.getLogger().handlers:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
  log.setLevel(level)
  for name in ("absl", "jax", "orbax"):
    logging.getLogger(name).setLevel(logging.WARNING)


def _fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


class Progress:
  """Periodic log line 'what: done/total (pct) rate unit/s ETA h:mm:ss' at most every `every` seconds."""

  def __init__(self, what: str, total: int, unit: str = "it", every: float = 5.0, start: int = 0):
    self.what, self.total, self.unit, self.every = what, total, unit, every
    self.start_count = start
    self.t0 = self.last = time.time()

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    now = time.time()
    if not force and now - self.last < self.every and done < self.total:
      return
    self.last = now
    rate = (done - self.start_count) / max(now - self.t0, 1e-9)
    eta = (self.total - done) / rate if rate > 0 else float("inf")
    eta_s = _fmt_seconds(eta) if eta != float("inf") else "?"
    pct = 100.0 * done / max(self.total, 1)
    log.info("%s: %d/%d (%.0f%%) %.1f %s/s ETA %s %s", self.what, done, self.total, pct, rate, self.unit,
             eta_s, extra)


def atomic_write_text(path, text: str) -> None:
  """Write to a temporary file in the same folder, then rename over `path`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(text)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def atomic_write_json(path, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=float) + "\n")


def atomic_savez(path, **arrays) -> None:
  import numpy as np
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **arrays)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


class MetricWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl (only on process 0)."""

  def __init__(self, path, enabled: bool = True):
    self.path = pathlib.Path(path)
    self.enabled = enabled
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)

  def drop(self, predicate) -> None:
    """Remove the records for which predicate(record) holds (used on resume: a restarted phase logs
    its steps again, so the file keeps one record per step). Atomic rewrite."""
    if not self.enabled or not self.path.exists():
      return
    lines = self.path.read_text().splitlines()
    keep = [l for l in lines if l.strip() and not predicate(json.loads(l))]
    if len(keep) != len(lines):
      atomic_write_text(self.path, "".join(l + "\n" for l in keep))

  def write(self, **record) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record, default=float, sort_keys=True) + "\n")


def flatten_dict(d, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1} (nested dicts only)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
