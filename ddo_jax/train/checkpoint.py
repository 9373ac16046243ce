"""Orbax checkpointing: the in-round manager (train state + data iterator + eval history) and the
per-round chosen parameters that are kept for good.

Layout under a round directory:
  checkpoints/<step>/{state,data,history}   CheckpointManager; the latest and the best-by-metric are kept
  chosen/                                  the round's chosen parameters (what the next round uses as
                                           reference), written once with a StandardCheckpointer
Orbax writes every checkpoint to a temporary directory and renames it when complete, so a process killed
mid-save leaves nothing that looks finished.
"""
import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from ddo_jax.tree_io import abstract_like, load_tree, save_tree  # noqa: F401 (the driver's tree I/O)


class RoundCheckpoints:
  """Orbax CheckpointManager for one round's train state, data iterator state and eval history."""

  def __init__(self, directory, *, keep_latest: int = 1, keep_best: int = 1, metric: Optional[str] = None,
               mode: str = "min", async_save: bool = False):
    policies = [cm.LatestN(n=keep_latest)]
    if metric is not None and keep_best > 0:
      policies.append(cm.BestN(get_metric_fn=lambda m: m[metric], reverse=(mode == "min"), n=keep_best,
                               keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save,
        preservation_policy=cm.AnyPreservationPolicy(policies))
    self.manager = ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options,
                                         item_names=("state", "data", "history"))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return self.manager.all_steps()

  def save(self, step: int, state: Any, data_state: dict, history: list, metrics: Optional[dict] = None):
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        history=ocp.args.JsonSave({"evals": history})), metrics=metrics)

  def restore(self, step: int, abstract_state: Any):
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
        history=ocp.args.JsonRestore()))
    return out["state"], out["data"], out["history"]["evals"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
