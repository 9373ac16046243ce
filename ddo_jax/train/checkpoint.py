"""Orbax checkpointing of one round: train state + data iterator state + eval history, verified on restore.

Layout under a round directory:
  checkpoints/<step>/{state,data,history}   Orbax CheckpointManager items; `history` also holds the
                                            state's checksum and the device count that wrote it
  corrupt/<step>-<n>/                       checkpoints that failed verification, moved aside
  chosen/                                   the round's chosen parameters (`ddo_jax.tree_io.save_tree`)

Retention is ours, not Orbax's, so that it survives restarts: what is best is read from the evaluation
history persisted in every checkpoint, and after each save (once it is durable) only the latest
checkpoint and the best evaluated one are kept. The best is therefore never deleted before the round's
`chosen/` is written. Orbax writes each checkpoint to a temporary folder and renames it when complete, so
a process killed mid-save leaves nothing that looks finished.
"""
import pathlib
import shutil
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from ddo_jax import parallel, tree_io, utils


def best_step(history: list, metric: str, mode: str) -> Optional[int]:
  """The evaluated trained step with the best `metric` (the first of equals), None before any."""
  candidates = [h for h in history if h["step"] > 0 and metric in h]
  if not candidates:
    return None
  better = min if mode == "min" else max
  return better(candidates, key=lambda h: h[metric])["step"]


class RoundCheckpoints:
  """Orbax CheckpointManager for one round's train state, data iterator state and eval history."""

  def __init__(self, directory, *, metric: str, mode: str = "min", async_save: bool = False):
    self.directory = pathlib.Path(directory).absolute()
    self.metric, self.mode, self.async_save = metric, mode, async_save
    self._open()

  def _open(self):
    options = ocp.CheckpointManagerOptions(create=True, cleanup_tmp_directories=True,
                                           enable_async_checkpointing=self.async_save)
    # No `item_names` (deprecated in Orbax's CheckpointManager): the items ('state', 'data', 'history') and
    # their handlers come from the Composite args of every save/restore, through the default registry.
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, history: list, extra: Optional[dict] = None):
    """Save step `step`; then (once it is durable) keep only it and the best evaluated checkpoint."""
    if self.async_save:   # the previous save becomes durable here; prune with what was known then
      self.prune([h for h in history if h["step"] < step])
    record = {"evals": history, "checksum": tree_io.tree_checksum(state), **(extra or {})}
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        history=ocp.args.JsonSave(record)), force=True)
    if not self.async_save:
      self.prune(history)

  def prune(self, history: list) -> None:
    """Delete every checkpoint but the latest and the best by `history` (waits for pending saves)."""
    self.manager.wait_until_finished()
    steps = self.all_steps()
    if not steps:
      return
    keep = {steps[-1], best_step(history, self.metric, self.mode)}
    for s in steps:
      if s not in keep:
        self.manager.delete(s)

  def restore(self, step: int, abstract_state: Any):
    """(state, data_state, history, record) of `step`, verified against the checksum saved with it."""
    path = self.directory / str(step)
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
          history=ocp.args.JsonRestore()))
    except Exception as e:  # pylint: disable=broad-except (Orbax/tensorstore raise many kinds on damaged files)
      first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise tree_io.CorruptCheckpointError(f"{path} cannot be read ({type(e).__name__}: {first[:300]})") from e
    record = out["history"]
    tree_io.verify_tree(path, out["state"], record.get("checksum"))
    return out["state"], out["data"], record["evals"], record

  def restore_latest_valid(self, abstract_state: Any):
    """The newest checkpoint that verifies, moving damaged ones aside with a warning; None if none is left."""
    while True:
      step = self.latest_step()
      if step is None:
        return None
      try:
        return (step,) + self.restore(step, abstract_state)
      except tree_io.CorruptCheckpointError as e:
        self.quarantine(step, str(e))

  def quarantine(self, step: int, why: str) -> None:
    """Move checkpoint `step` to ../corrupt/ (kept for inspection) and reopen the manager."""
    target = self.directory.parent / "corrupt" / f"{step}"
    n = 0
    while (target.parent / f"{step}-{n}").exists():
      n += 1
    target = target.parent / f"{step}-{n}"
    utils.log.warning("checkpoint %s is damaged: %s. Moved to %s; falling back to the previous checkpoint",
                      self.directory / str(step), why, target)
    self.manager.close()
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    parallel.barrier(f"quarantine-{step}")
    self._open()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()
