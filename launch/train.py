"""Run or resume DDO self-play rounds.

  python -m launch.train --config configs/toy_diffusion.py --workdir runs/toy
  python -m launch.train --config configs/toy_diffusion.py:tiny --workdir W --config.ddo.alpha=2
  python -m launch.train --config configs/edm_cifar10.py:cond --print_config     (variants and every key)

Rerunning the same command in the same workdir resumes where it stopped (bitwise-identical result on the
same machine and device count). Mistakes (an unknown config key, an invalid value, a missing dataset or
checkpoint) are one line `error: ...` with exit code 2; --debug shows the traceback.
"""
import importlib.util
import pathlib
import sys

from absl import flags
from ml_collections import config_flags

from ddo_jax import cli, compile_cache

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if it exists)")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False, "print the config file's variants and the "
                                  "resolved config (with --config.* overrides), then exit")
_REWRITE_CONFIG = flags.DEFINE_bool("rewrite_config", False, "write this config as the workdir's config.json "
                                    "even though the workdir holds rounds without one")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", None, compile_cache.FLAG_HELP)


def _config_file() -> str:
  """The --config file path as given (without the :variant)."""
  for i, a in enumerate(sys.argv):
    if a == "--config" and i + 1 < len(sys.argv):
      return sys.argv[i + 1].split(":")[0]
    if a.startswith("--config="):
      return a.split("=", 1)[1].split(":")[0]
  return ""


def print_config(config) -> None:
  path = _config_file()
  spec = importlib.util.spec_from_file_location("_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  print(f"# {path}\n")
  print((module.__doc__ or "").strip())
  variants = getattr(module, "VARIANTS", None)
  if variants:
    print("\nvariants (--config FILE:VARIANT):")
    for name, what in variants.items():
      print(f"  {name or '(none)':8s} {what}")
  print("\nresolved config (override any key with --config.KEY=VALUE; comments in the file say what each is):\n")
  print(config)


def configs_help() -> str:
  """The experiment files in configs/ and their variants (read from each file's VARIANTS, not executed)."""
  import ast  # pylint: disable=import-outside-toplevel
  lines = ["experiment configs (--config FILE:VARIANT; --print_config shows every key):"]
  for path in sorted(pathlib.Path(__file__).resolve().parents[1].joinpath("configs").glob("*.py")):
    for node in ast.parse(path.read_text()).body:
      if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "VARIANTS" for t in node.targets):
        for name, what in ast.literal_eval(node.value).items():
          lines.append(f"  configs/{path.name}{':' + name if name else ''}".ljust(36) + what)
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}", "command line", "flags are --name=value; see --help")
  if _config_file() and not pathlib.Path(_config_file()).is_file():
    raise cli.UserError(f"no config file {_config_file()!r}", "--config",
                        "give an existing file such as configs/toy_diffusion.py[:variant]")
  try:
    config = _CONFIG.value
  except (IOError, OSError) as e:   # ml_collections defers a config file's load error to here
    raise cli.UserError(f"cannot load the config file {_config_file()!r}", "--config",
                        "give an existing file such as configs/toy_diffusion.py[:variant]") from e
  if config is None:
    raise cli.UserError("no config given", "--config", "pass --config configs/<file>.py[:variant]")
  if _PRINT_CONFIG.value:
    print_config(config)
    return 0
  if not _WORKDIR.value:
    raise cli.UserError("no run directory given", "--workdir", "pass --workdir DIR (created, or resumed)")
  if pathlib.Path(_WORKDIR.value).exists() and not pathlib.Path(_WORKDIR.value).is_dir():
    raise cli.UserError(f"{_WORKDIR.value} exists and is not a folder", "--workdir", "pass a folder path")
  from ddo_jax.parallel import maybe_initialize_distributed  # pylint: disable=import-outside-toplevel
  maybe_initialize_distributed()
  compile_cache.enable(_COMPILE_CACHE.value)
  from ddo_jax.train import rounds  # pylint: disable=import-outside-toplevel
  rounds.train(config, _WORKDIR.value, rewrite_config=_REWRITE_CONFIG.value)
  return 0


if __name__ == "__main__":
  cli.run(main, doc=__doc__ + "\n" + configs_help() if any(a in cli.HELP_FLAGS for a in sys.argv) else __doc__)
