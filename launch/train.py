"""Run or resume DDO self-play rounds.

  python -m launch.train --config configs/toy_diffusion.py --workdir /tmp/ddo_toy
  python -m launch.train --config configs/toy_diffusion.py:tiny --workdir W --config.ddo.alpha=2

Rerunning the same command in the same workdir resumes where it stopped (bitwise-identical result).
"""
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "configs/<file>.py[:variant]", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (created; resumed if it exists)")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ddo_jax.parallel import maybe_initialize_distributed
  maybe_initialize_distributed()
  from ddo_jax.train import rounds
  rounds.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
