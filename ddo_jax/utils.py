"""Logging with progress (rate and ETA), JSONL metrics, atomic file writes."""
import contextlib
import json
import logging
import os
import pathlib
import sys
import tempfile
import threading
import time

log = logging.getLogger("ddo_jax")

# Third-party loggers kept at WARNING and above (Orbax logs every save at INFO, absl and JAX chat at INFO).
QUIET_LOGGERS = ("absl", "jax", "jaxlib", "orbax", "etils", "matplotlib", "PIL", "urllib3", "grain")


# --- logging --------------------------------------------------------------------------------------------

class _TerminalFormatter(logging.Formatter):
  """'17:20:00 message' for our INFO lines; 'HH:MM:SS WARNING message' from WARNING up; other loggers'
  records (only WARNING and up reach the terminal) also name their logger."""

  def __init__(self):
    super().__init__(datefmt="%H:%M:%S")

  def format(self, record: logging.LogRecord) -> str:
    parts = [self.formatTime(record, self.datefmt)]
    if record.levelno >= logging.WARNING:
      parts.append(record.levelname)
    if record.name != log.name and not record.name.startswith(log.name + "."):
      parts.append(f"{record.name}:")
    parts.append(record.getMessage())
    line = " ".join(parts)
    if record.exc_info:
      line += "\n" + self.formatException(record.exc_info)
    if record.stack_info:
      line += "\n" + self.formatStack(record.stack_info)
    return line


class _StderrHandler(logging.StreamHandler):
  """A StreamHandler on whatever sys.stderr is at emit time (pytest's capture, a redirected stderr)."""

  def __init__(self):
    super().__init__(sys.stderr)

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    del value


_FILE_FORMAT = "%(asctime)s.%(msecs)03d %(levelname)s %(name)s %(module)s:%(lineno)d] %(message)s"
_OURS = "_ddo_jax_handler"   # attribute marking the handlers setup_logging installed (replaced on a new call)


def _remove_our_handlers(logger: logging.Logger) -> None:
  for h in list(logger.handlers):
    if getattr(h, _OURS, False):
      logger.removeHandler(h)
      if isinstance(h, logging.FileHandler):
        h.close()


def setup_logging(level=logging.INFO, *, log_file=None, quiet=QUIET_LOGGERS) -> None:
  """Our lines on stderr as 'HH:MM:SS message', also under absl.app.run (no absl prefix).

  The 'ddo_jax' logger gets its own stderr handler and does not propagate, so absl's handler (which
  absl.app.run puts on the root logger) never formats our records. Third-party loggers in `quiet` are
  kept at WARNING and above. With `log_file`, full records (date, time, level, logger, module:line) of
  our logger and of every WARNING+ record reaching the root logger are appended to that file too.
  Calling it again replaces what an earlier call installed.
  """
  log.setLevel(level)
  log.propagate = False
  root = logging.getLogger()
  _remove_our_handlers(log)
  _remove_our_handlers(root)

  terminal = _StderrHandler()
  terminal.setFormatter(_TerminalFormatter())
  setattr(terminal, _OURS, True)
  log.addHandler(terminal)
  if not root.handlers:
    # Not under absl.app.run and nothing configured: third-party warnings on stderr in our format
    # (absl.app.run's use_absl_handler removes this one, being a stderr stream handler).
    root_terminal = _StderrHandler()
    root_terminal.setFormatter(_TerminalFormatter())
    root_terminal.setLevel(logging.WARNING)
    setattr(root_terminal, _OURS, True)
    root.addHandler(root_terminal)

  if log_file is not None:
    log_file = pathlib.Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    formatter = logging.Formatter(_FILE_FORMAT, datefmt="%Y-%m-%d %H:%M:%S")
    ours = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    ours.setFormatter(formatter)
    setattr(ours, _OURS, True)
    log.addHandler(ours)
    # Third-party records reach the file through the root logger; a second handler on the same file
    # (both append, line-buffered by the logging lock of each handler).
    others = logging.FileHandler(log_file, mode="a", encoding="utf-8")
    others.setFormatter(formatter)
    others.setLevel(logging.WARNING)
    setattr(others, _OURS, True)
    root.addHandler(others)

  for name in quiet:
    logger = logging.getLogger(name)
    if logger.level < logging.WARNING:   # NOTSET (inherits root, INFO under absl) or INFO/DEBUG
      logger.setLevel(logging.WARNING)


# --- progress -------------------------------------------------------------------------------------------

def _fmt_seconds(s: float) -> str:
  s = int(max(s, 0))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def _fmt_rate(rate: float) -> str:
  return f"{rate:.1f}" if rate >= 1 else f"{rate:.2g}"


class Progress:
  """Log lines 'what: done/total (pct) rate unit/s ETA m:ss extra', at most every `every` seconds.

  The clock of the rate starts at the first `update`, not at construction, so compiling the first step
  does not inflate the ETA: the first update logs 'N unit done in X s' (with '(compile + run)' after
  `compiling()`), and the rate and ETA are measured from there on (from the second update).
  `compiling()` logs at once, so a long compilation shows up within the first second.
  """

  def __init__(self, what: str, total: int, unit: str = "it", every: float = 5.0, start: int = 0):
    self.what, self.total, self.unit, self.every = what, total, unit, every
    self.start_count = start
    self.t0 = self.last = time.time()
    self.first = None          # (time, done) of the first update: the origin of the rate
    self._compiling = False

  def compiling(self, what: str = "the first step") -> None:
    """Say now that the next stretch includes compilation."""
    self._compiling = True
    log.info("%s: compiling %s...", self.what, what)

  def _head(self, done: int) -> str:
    pct = 100.0 * done / max(self.total, 1)
    return f"{self.what}: {done}/{self.total} ({pct:.0f}%)"

  def update(self, done: int, extra: str = "", force: bool = False) -> None:
    now = time.time()
    tail = f" {extra}" if extra else ""
    if self.first is None:
      self.first = (now, done)
      self.last = now
      note = " (compile + run)" if self._compiling else ""
      log.info("%s %d %s done in %.1f s%s%s", self._head(done), done - self.start_count, self.unit,
               now - self.t0, note, tail)
      return
    if not force and now - self.last < self.every and done < self.total:
      return
    self.last = now
    t1, d1 = self.first
    rate = (done - d1) / (now - t1) if now > t1 else 0.0
    if done >= self.total:
      when = f"done in {_fmt_seconds(now - self.t0)}"
    else:
      when = f"ETA {_fmt_seconds((self.total - done) / rate)}" if rate > 0 else "ETA ?"
    log.info("%s %s %s/s %s%s", self._head(done), _fmt_rate(rate), self.unit, when, tail)


# --- atomic writes --------------------------------------------------------------------------------------

_umask_lock = threading.Lock()


def current_umask() -> int:
  """The process umask, read without changing it where /proc says it (Linux >= 4.7); elsewhere by
  setting and restoring it (under a lock, momentarily 0o077: never more permissive than before)."""
  try:
    with open("/proc/self/status", encoding="ascii", errors="replace") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  with _umask_lock:
    mask = os.umask(0o077)
    os.umask(mask)
  return mask


def default_file_mode() -> int:
  """The permissions a plain open(path, 'w') gives a new file: 0o666 & ~umask."""
  return 0o666 & ~current_umask()


def fsync_dir(directory) -> None:
  """Make a rename in `directory` durable; a no-op where directories cannot be opened or synced."""
  try:
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", *, encoding=None):
  """Open a temporary file next to `path` ('w' or 'wb'); on a clean exit it is flushed, fsync'ed, given
  the permissions a plain open() would give (mkstemp makes 0600), and renamed over `path`, and the folder
  is fsync'ed. On an exception the temporary file is removed and `path` is untouched."""
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
  try:
    try:
      os.fchmod(fd, default_file_mode())
    except OSError:   # a filesystem without permissions (some FUSE mounts): keep what it gives
      pass
    with os.fdopen(fd, mode, encoding=encoding if "b" not in mode else None) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  fsync_dir(path.parent)


def atomic_write_text(path, text: str) -> None:
  """Write to a temporary file in the same folder, then rename over `path`."""
  with atomic_open(path, "w", encoding="utf-8") as f:
    f.write(text)


def atomic_write_bytes(path, data: bytes) -> None:
  with atomic_open(path, "wb") as f:
    f.write(data)


def atomic_write_json(path, obj) -> None:
  atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=True, default=float) + "\n")


def atomic_savez(path, **arrays) -> None:
  import numpy as np  # pylint: disable=import-outside-toplevel
  with atomic_open(path, "wb") as f:
    np.savez(f, **arrays)


# --- metrics.jsonl --------------------------------------------------------------------------------------

def _scan_jsonl(path: pathlib.Path):
  """Parse a JSONL file. Returns (records, raw, torn): the parsed records, their lines as bytes, and None
  or (line_number, byte_offset) of an unparseable last line (a write cut short by a kill). An unparseable
  line before the last non-blank one raises ValueError naming the file and line."""
  data = path.read_bytes()
  records, raws, bad = [], [], None
  offset = 0
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":
    lines.pop()
  last = max((i for i, l in enumerate(lines) if l.strip()), default=-1)
  for i, raw in enumerate(lines):
    start, offset = offset, offset + len(raw) + 1
    if not raw.strip():
      continue
    try:
      record = json.loads(raw)
      if not isinstance(record, dict):
        raise ValueError(f"a JSON {type(record).__name__}, not an object")
    except ValueError as e:   # JSONDecodeError and UnicodeDecodeError are ValueErrors
      if i != last:
        raise ValueError(f"{path}:{i + 1}: not a JSON record ({e}); the file is damaged before its last "
                         "line: fix or remove that line") from None
      bad = (i + 1, start)
      continue
    records.append(record)
    raws.append(raw)
  return records, raws, bad


def read_jsonl(path) -> list:
  """The records of a JSONL file ([] if it does not exist); a torn last line is skipped with a warning."""
  path = pathlib.Path(path)
  if not path.exists():
    return []
  records, _, torn = _scan_jsonl(path)
  if torn:
    log.warning("%s:%d: ignoring a torn last line (a write cut short)", path, torn[0])
  return records


class MetricWriter:
  """Appends one JSON object per line to workdir/metrics.jsonl (only on process 0).

  On open, a torn last line (a process killed mid-append) is cut off with a warning; an unparseable line
  before the end raises ValueError naming the file and line. Each record is flushed to the OS when
  written; `flush()` and `close()` also fsync (and `write` does every `fsync_every` seconds).
  """

  def __init__(self, path, enabled: bool = True, fsync_every: float = 60.0):
    self.path = pathlib.Path(path)
    self.enabled = enabled
    self.fsync_every = fsync_every
    self._f = None
    self._last_sync = time.monotonic()
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self._repair()

  def _repair(self) -> None:
    """Cut a torn last line off (and end a complete last line with its newline) before appending."""
    if not self.path.exists():
      return
    _, _, torn = _scan_jsonl(self.path)
    if torn:
      line, start = torn
      log.warning("%s:%d: dropping a torn last line (a write cut short by a killed process)", self.path, line)
      os.truncate(self.path, start)
    size = self.path.stat().st_size
    if size:
      with open(self.path, "rb") as f:
        f.seek(size - 1)
        ends_with_newline = f.read(1) == b"\n"
      if not ends_with_newline:
        with open(self.path, "a", encoding="utf-8") as f:
          f.write("\n")

  def read_records(self, where=None) -> list:
    """The records in the file so far (those for which where(record) holds, if given); [] when disabled
    (processes other than 0)."""
    if not self.enabled:
      return []
    if self._f is not None:
      self._f.flush()
    records = read_jsonl(self.path)
    return records if where is None else [r for r in records if where(r)]

  def drop(self, predicate) -> None:
    """Remove the records for which predicate(record) holds (used on resume: a restarted phase logs
    its steps again, so the file keeps one record per step). Atomic rewrite."""
    if not self.enabled or not self.path.exists():
      return
    self.close()   # the rewrite replaces the file: appends must go to the new one
    records, raws, torn = _scan_jsonl(self.path)
    if torn:
      log.warning("%s:%d: dropping a torn last line (a write cut short by a killed process)", self.path,
                  torn[0])
    keep = [raw for rec, raw in zip(records, raws) if not predicate(rec)]
    if len(keep) != len(records) or torn:
      atomic_write_bytes(self.path, b"".join(raw + b"\n" for raw in keep))

  def write(self, **record) -> None:
    if not self.enabled:
      return
    if self._f is None:
      self._f = open(self.path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    self._f.write(json.dumps(record, default=float, sort_keys=True) + "\n")
    self._f.flush()
    if time.monotonic() - self._last_sync >= self.fsync_every:
      self.flush()

  def flush(self) -> None:
    """Flush and fsync what was written."""
    if self._f is not None:
      self._f.flush()
      os.fsync(self._f.fileno())
    self._last_sync = time.monotonic()

  def close(self) -> None:
    if self._f is not None:
      self.flush()
      self._f.close()
      self._f = None

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def flatten_dict(d, prefix: str = "") -> dict:
  """{'a': {'b': 1}} -> {'a.b': 1} (nested dicts only)."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flatten_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
