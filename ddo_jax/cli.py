"""What every command in launch/ shares: one-line user errors, `--help` that exits 0, `--debug`.

A mistake a user can make (a missing file, a bad flag value, an unknown config key, a dataset that is not
prepared) is raised as `UserError(what, where, fix)` anywhere in the library and printed by `run` as one
line on stderr,

    error: <what> (<flag or key>): <how to fix>

with exit code 2. Anything else is a bug and keeps its traceback (exit 1). `--debug` prints the traceback
of a user error too.
"""
import sys
import traceback
from typing import Callable, Sequence

from absl import app, flags

HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "--helpfull", "-?")
EXIT_USER_ERROR = 2


class UserError(Exception):
  """An error the user can fix: `what` went wrong, `where` (a flag, config key or file), `fix`."""

  def __init__(self, what: str, where: str = "", fix: str = ""):
    self.what, self.where, self.fix = what, where, fix
    super().__init__(format_error(what, where, fix))


class ConfigError(UserError, ValueError):
  """An invalid config or flag value (also a ValueError, for library callers)."""


def format_error(what: str, where: str = "", fix: str = "") -> str:
  line = f"error: {what}"
  if where:
    line += f" ({where})"
  if fix:
    line += f": {fix}"
  return line


def fail(what: str, where: str = "", fix: str = "") -> None:
  """Print the one-line error and exit 2 (for code outside `run`, e.g. flag parsing)."""
  print(format_error(what, where, fix), file=sys.stderr, flush=True)
  sys.exit(EXIT_USER_ERROR)


def _debug(argv: Sequence[str]) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True") for a in argv)


def _print_help(doc: str) -> None:
  print((doc or "").strip() + "\n")
  print("flags:")
  print(flags.FLAGS.main_module_help())
  print("\n  --debug: show the Python traceback of a user error too")


def _root_cause(e: BaseException) -> BaseException:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ if e.__cause__ is not None else e.__context__
  return e


def _config_override(argv: Sequence[str], key: str) -> str:
  """The `--config.a.b` override among `argv` that names `key` (its last part), or ''."""
  for a in argv:
    if a.startswith("--config.") and a.split("=", 1)[0].split(".")[-1] == key:
      return a.split("=", 1)[0]
  return ""


def _parse_flags(argv: Sequence[str]):
  """absl's parser, with its errors (unknown or malformed flags, an unknown config key, a config file that
  does not load) turned into one line."""
  try:
    return flags.FLAGS(list(argv))
  except Exception as e:  # pylint: disable=broad-except (absl and ml_collections raise many kinds)
    if _debug(argv):
      traceback.print_exc()
    root = _root_cause(e)
    if isinstance(root, UserError):
      fail(root.what, root.where, root.fix)
    if isinstance(root, (KeyError, AttributeError)):
      text = str(root).strip("\"' ")
      key = text.split("'")[0].strip() if "'" in text else text
      flag = _config_override(argv, key)
      if flag:
        chain, x = [], e
        while x is not None:
          chain.append(str(x))
          x = x.__cause__ if x.__cause__ is not None else x.__context__
        said = next((t for t in chain if "Did you mean" in t), "")
        hint = said[said.index("Did you mean"):].strip("\"' ") if said else ""
        fail(f"unknown config key {flag[len('--config.'):]!r}" + (f" ({hint})" if hint else ""), flag,
             "list the keys with --print_config")
    message = str(root).strip().splitlines() or [type(root).__name__]
    if isinstance(e, flags.IllegalFlagValueError) and root is not e:
      flag = str(e).split(":", 1)[0].replace("flag ", "")
      fail(message[-1], flag, "see --help")
    fail(str(e).strip().splitlines()[0] if str(e).strip() else message[-1], "command line", "see --help")


def run(main: Callable, doc: str = "", user_errors: tuple = ()) -> None:
  """`absl.app.run(main)` with `--help` exiting 0 and user errors printed as one line (exit 2).

  `user_errors` lists further exception types to treat as user errors (printed as `error: <message>`).
  """
  argv = [a for a in sys.argv if a not in ("--debug", "--debug=true", "--debug=True", "--nodebug")]
  debug = _debug(sys.argv)
  if any(a in HELP_FLAGS for a in argv[1:]):
    # absl's own --help exits 1; print the same text and exit 0.
    app.define_help_flags()
    try:
      flags.FLAGS(argv[:1])
    except flags.Error:
      pass
    _print_help(doc)
    sys.exit(0)

  def wrapped(args):
    try:
      return main(args)
    except UserError as e:
      if debug:
        traceback.print_exc()
      print(str(e), file=sys.stderr, flush=True)
      sys.exit(EXIT_USER_ERROR)
    except app.UsageError as e:
      if debug:
        traceback.print_exc()
      fail(str(e), "command line", "see --help")
    except user_errors as e:  # pylint: disable=catching-non-exception
      if debug:
        traceback.print_exc()
      text = str(e)
      print(text if text.startswith("error:") else f"error: {text}", file=sys.stderr, flush=True)
      sys.exit(EXIT_USER_ERROR)

  app.run(wrapped, argv=argv, flags_parser=_parse_flags)
