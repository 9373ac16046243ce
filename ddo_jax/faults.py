"""Named kill points for the kill-anywhere tests (a fail-point hook; inert unless the variable is set).

`point(name)` SIGKILLs the process at the n-th time it is reached when DDO_JAX_KILL_AT=name:n, so a test
can kill a run exactly inside a save, between two files of a round, or just after an evaluation. The
points are listed in `POINTS`; a run without the variable pays one dict lookup per point.
"""
import os
import signal

ENV = "DDO_JAX_KILL_AT"
POINTS = (
    "save_tree",          # chosen/ or a converted tree written to .partial, not yet renamed
    "checkpoint_saved",   # an in-round checkpoint written, older ones not yet pruned
    "after_eval",         # an evaluation logged, its checkpoint not yet written
    "negatives_chunk",    # a negatives chunk written, the next not started
    "in_eval",            # inside an evaluation, after sampling
    "after_chosen",       # a round's chosen/ written, its summary.json not yet
    "after_summary",      # a round's summary.json written
)
_counts = {}


def point(name: str) -> None:
  spec = os.environ.get(ENV)
  if not spec:
    return
  want, _, n = spec.partition(":")
  if want != name:
    return
  _counts[name] = _counts.get(name, 0) + 1
  if _counts[name] == int(n or 1):
    os.kill(os.getpid(), signal.SIGKILL)
