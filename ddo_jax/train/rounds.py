"""The self-play round driver: a plain loop over DDO rounds with Orbax checkpoints and exact resume.

Round r = 1..R:
  1. The reference is round r-1's chosen parameters (round 0: the pretrained or converted model).
  2. Negatives: offline, the reference's jitted sampler fills round_r/negatives (resumable); online, the
     reference samples a fresh fake batch inside every step.
  3. The target starts from the reference with a fresh optimizer and EMA, and trains for
     `rounds.images` images on real batches paired 1:1 with fake batches.
  4. Every `selection.eval_every` steps the selected weights (raw or an EMA) are evaluated; checkpoints
     (train state, data position, eval history) are written every `checkpoint.every` steps and at each
     evaluation; the latest and the best (known from the persisted history) are kept.
  5. The round's checkpoint is chosen (best by metric, or last), saved to round_r/chosen for good, and
     becomes the next reference. round_r/summary.json, written last, marks the round as done.

Everything random is a function of (config.seed, round, step, sample index), so a process killed at any
point and restarted with the same command continues where the last complete file left off and ends with
bitwise the same parameters as an uninterrupted run (on the same machine, process and device count; on
another count the results agree to float32 rounding, and a resumed round says so).

Several processes (one per host: `launch/local_multiprocess.py`, a TPU pod, SLURM) run the same driver:
each feeds its rows of every global batch, every collective step (sampling, training, checkpoint and tree
saves and loads, checksums) is taken by all of them, and process 0 alone writes the plain files (lock,
config.json, metrics.jsonl, summaries, plots, negative chunks) with a barrier after each. A process that
fails exits without waiting for the others (`parallel.fail_fast`), so they stop too. Damaged files are detected when read back (checksums)
and rebuilt from what precedes them; non-finite training stops the run before anything non-finite is saved.

Layout of the workdir:
  config.json  metrics.jsonl  train.log  summary.json  metrics_per_round.png  samples_per_round.png  .lock
  round_000/{chosen/, model.json, summary.json}            round 0 (pretrained or converted)
  round_001/{negatives/, checkpoints/, chosen/, model.json, summary.json, metrics.png}  ...
"""
import fcntl
import functools
import json
import os
import pathlib
import shutil
import socket
import time

import jax
import ml_collections
import numpy as np

from ddo_jax import cli, faults, families, parallel, plots, tree_io, utils
from ddo_jax.data import negatives as negatives_lib
from ddo_jax.data import pipeline
from ddo_jax.sampling import seeded
from ddo_jax.train import checkpoint, config_check, optim, step as step_lib
from ddo_jax.train import ema as ema_lib

log = utils.log


def _round_dir(workdir: pathlib.Path, r: int) -> pathlib.Path:
  return workdir / f"round_{r:03d}"


class NonFiniteError(cli.UserError):
  """Training produced NaN or Inf; raised before anything non-finite is saved."""


def _read_json(path: pathlib.Path, fix: str):
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise cli.UserError(f"{path} is not valid JSON ({e})", str(path), fix) from e


class Driver:
  """Holds what is built once per run: family, mesh, shardings, jitted step and sampler. Builds and checks
  everything without writing a file."""

  def __init__(self, config: ml_collections.ConfigDict, workdir):
    config_check.validate(config)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    try:
      self.family = families.make(config)
    except ValueError as e:
      if isinstance(e, cli.UserError):
        raise
      raise cli.ConfigError(str(e), "config.model", "fix the value in the config file or with "
                            "--config.model.<key>=...") from e
    if config.init.kind == "pretrain" and not self.family.has_pretraining:
      raise cli.ConfigError(f"family {self.family.name!r} cannot be pretrained here", "config.init.kind",
                            "start from a converted checkpoint: --config.init.kind=checkpoint "
                            "--config.init.checkpoint=DIR")
    if config.init.kind == "checkpoint" and not pathlib.Path(config.init.checkpoint).exists():
      raise cli.UserError(f"no converted checkpoint at {config.init.checkpoint}", "config.init.checkpoint",
                          "convert the released weights with `python -m launch.convert ...` and pass its --out")
    self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    self.rules = [tuple(r) for r in config.sharding_rules]
    self.batch_size = config.rounds.batch_size
    for size, key in ((self.batch_size, "rounds.batch_size"), (config.sampling.batch_size, "sampling.batch_size")):
      try:
        parallel.check_batch_divisible(size, self.mesh, key)
      except ValueError as e:
        raise cli.ConfigError(str(e), f"config.{key}", "use a multiple of the number of batch shards") from e
    self.writer = None   # opened by run(), after the workdir is locked

    params_shape = jax.eval_shape(self.family.init_params, jax.random.key(0))
    self.param_shardings = parallel.param_shardings(params_shape, self.mesh, self.rules)
    self.steps_per_round = config.rounds.images // self.batch_size
    self.schedule = optim.make_schedule(config.optim)
    self.tx = optim.make_optimizer(config.optim)
    self.ema_specs = {k: dict(v) for k, v in config.ema.items()}
    ema_lib.validate(self.ema_specs)
    def init(params, rng):
      # The target starts from the reference projected as after an update (EDM2: forced weight
      # normalization, what upstream's first training-mode forward does in place); identity elsewhere.
      return step_lib.init_state(self.family.project_params(params), rng, tx=self.tx, ema_specs=self.ema_specs)

    self.abstract_state = jax.eval_shape(init, params_shape, jax.random.key(0))
    self.state_shardings = parallel.param_shardings(self.abstract_state, self.mesh, self.rules)
    self.init_state = jax.jit(init, in_shardings=(self.param_shardings, parallel.replicated(self.mesh)),
                              out_shardings=self.state_shardings)
    self.step_fn = step_lib.make_ddo_step(
        self.family, self.tx, self.ema_specs, alpha=config.ddo.alpha, beta=config.ddo.beta,
        batch_size=self.batch_size, mesh=self.mesh, shardings=self.state_shardings,
        ref_shardings=self.param_shardings, schedule=self.schedule, impl=config.get("step_impl", "jit"))
    self.sample_fn = seeded.make_seeded_sampler(self.family.sample, self.mesh, self.param_shardings)
    self.paired_sample_fn = seeded.make_paired_sampler(self.family.sample_paired, self.mesh, self.param_shardings)
    self.real, self.num_real = self.family.real_source(config.seed)
    self.timings = {}
    self.lockstep = parallel.cpu_lockstep()   # several CPU devices: one step in flight at a time

  # --- helpers ------------------------------------------------------------------------------------
  def abstract_params(self):
    return tree_io.abstract_like(jax.eval_shape(self.family.init_params, jax.random.key(0)),
                                 self.param_shardings)

  def load_chosen(self, r: int):
    """Round r's chosen parameters, verified; a damaged chosen/ is rebuilt from what it was made of."""
    path = _round_dir(self.workdir, r) / "chosen"
    try:
      return tree_io.load_tree(path, {"params": self.abstract_params()})["params"]
    except tree_io.CorruptCheckpointError as e:
      log.warning("%s; rebuilding round %d's chosen parameters", e, r)
      self._quarantine(path)
      (_round_dir(self.workdir, r) / "summary.json").unlink(missing_ok=True)
      self.ensure_round0() if r == 0 else self.run_round(r)
      return tree_io.load_tree(path, {"params": self.abstract_params()})["params"]

  def _quarantine(self, path: pathlib.Path) -> None:
    if jax.process_index() == 0 and path.exists():
      target = path.parent / "corrupt" / f"{path.name}-{int(time.time())}"
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(path), str(target))
      log.warning("moved %s to %s", path, target)
    parallel.barrier(f"quarantine-{path.parent.name}-{path.name}")

  def _round_done(self, r: int) -> bool:
    rdir = _round_dir(self.workdir, r)
    return (rdir / "summary.json").exists() and (rdir / "chosen").exists()

  def sample(self, params, num: int, seed: int, start: int = 0) -> dict:
    """Samples for seeds [start, start + num) (keys fold_in(key(seed), s)), in sampler batches, on host.
    The last batch is cut to what is needed, rounded up to the number of batch shards."""
    bs = self.config.sampling.batch_size
    shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    base = jax.random.key(seed)
    sharding = parallel.batch_sharding(self.mesh)
    out = []
    for first in range(start, start + num, bs):
      n = min(bs, -(-(start + num - first) // shards) * shards)
      ids = jax.device_put(np.arange(first, first + n, dtype=np.int32), sharding)
      out.append(parallel.to_host(self.sample_fn(params, base, ids)))
    return {k: np.concatenate([o[k] for o in out])[:num] for k in out[0]}

  def evaluate(self, params) -> dict:
    t0 = time.time()
    seed = self.config.seed + 10_000
    metrics = self.family.evaluate(params, lambda num, start=0: self.sample(params, num, seed, start),
                                   seed=self.config.seed)
    faults.point("in_eval")
    self.timings["evaluation"] = self.timings.get("evaluation", 0.0) + time.time() - t0
    return metrics

  def write_model_json(self, r: int) -> None:
    """round_r/model.json next to chosen/, so launch.sample and launch.convert can rebuild the net."""
    if jax.process_index() == 0:
      utils.atomic_write_json(_round_dir(self.workdir, r) / "model.json", self.family.model_json())

  def selected(self, state):
    name = self.config.selection.params
    return state["params"] if name == "params" else state["ema"][name]

  def check_finite(self, pending: list, r: int, last_saved) -> None:
    """Raise NonFiniteError naming the first step whose loss, gradients or parameters were not finite.
    `pending`: (step, metrics) of the steps since the last check (device arrays; fetched here)."""
    if not pending:
      return
    flags = jax.device_get([m["finite"] for _, m in pending])
    for (s, m), ok in zip(pending, flags):
      if not ok:
        vals = {k: float(v) for k, v in jax.device_get(m).items() if k in ("loss", "grad_norm", "param_norm")}
        where = f"round {r} step {s}" if r else f"pretraining step {s}"
        saved = (f"nothing after step {last_saved} was saved" if last_saved
                 else "nothing of this round was saved")
        raise NonFiniteError(
            f"non-finite training at {where} ({', '.join(f'{k}={v:.4g}' for k, v in vals.items())}); {saved}",
            "config.optim.lr, config.ddo.beta",
            "likely a learning rate or beta too large for this model, or NaN/Inf in the reference "
            f"(round_{max(r - 1, 0):03d}/chosen) or the data; start a new --workdir with a lower "
            "--config.optim.lr or --config.ddo.beta")
    pending.clear()

  # --- round 0 --------------------------------------------------------------------------------------
  def ensure_round0(self) -> None:
    rdir = _round_dir(self.workdir, 0)
    if self._round_done(0):
      return
    path = rdir / "chosen"
    if not path.exists():
      c = self.config.init
      if c.kind == "pretrain":
        params = self.pretrain()
      elif c.kind == "random":   # an untrained network: smoke runs only (configs/edm_cifar10.py:tiny)
        log.warning("round 0 is a RANDOMLY INITIALISED network (init.kind='random'), not a trained model")
        params = jax.jit(self.family.init_params, out_shardings=self.param_shardings)(
            jax.random.key(self.config.seed))
      else:
        # A converted model (launch.convert: DIR/params + DIR/model.json) or a round's chosen/ folder.
        src = pathlib.Path(c.checkpoint)
        self.family.check_converted(src / "model.json")
        tree = src / "params" if (src / "params").exists() else src
        params = tree_io.load_tree(tree, {"params": self.abstract_params()})["params"]
      tree_io.save_tree(path, {"params": params})
    faults.point("after_chosen")
    self.write_model_json(0)
    metrics = self.evaluate(self.load_chosen(0))
    self.writer.drop(lambda rec: rec.get("round") == 0)
    self.writer.write(round=0, step=0, **metrics)
    if jax.process_index() == 0:
      utils.atomic_write_json(rdir / "summary.json",
                              {"round": 0, "chosen_step": 0, "metrics": metrics, "reference_metrics": metrics})
    parallel.barrier("round-0-summary")

  def pretrain(self):
    """Maximum-likelihood pretraining (toy families); deterministic, restarted if interrupted."""
    c = self.config.pretrain
    tx = optim.make_optimizer(c.optim)
    params = jax.jit(self.family.init_params, out_shardings=self.param_shardings)(
        jax.random.key(self.config.seed))
    init = functools.partial(step_lib.init_state, tx=tx, ema_specs={})
    shardings = parallel.param_shardings(jax.eval_shape(init, params, jax.random.key(0)), self.mesh, self.rules)
    state = jax.jit(init, out_shardings=shardings)(params, jax.random.key(self.config.seed + 1))
    step = step_lib.make_mle_step(self.family, tx, {}, batch_size=c.batch_size, mesh=self.mesh,
                                  shardings=shardings, impl=self.config.get("step_impl", "jit"))
    data = pipeline.PairedBatches(self.real, self.num_real, c.batch_size, seed=self.config.seed)
    self.writer.drop(lambda rec: rec.get("phase") == "pretrain")   # an interrupted pretraining restarts
    progress = utils.Progress("pretrain", c.steps, unit="steps")
    progress.compiling()
    pending = []
    for i in range(c.steps):
      state, metrics = step(state, None, parallel.global_batch(data.next()["real"], self.mesh))
      if self.lockstep:
        jax.block_until_ready(metrics)
      pending.append((i + 1, metrics))
      if (i + 1) % self.config.log_every == 0 or i + 1 == c.steps:
        self.check_finite(pending, 0, None)
        loss = float(metrics["loss"])
        self.writer.write(phase="pretrain", step=i + 1, loss=loss)
        progress.update(i + 1, f"loss {loss:.4f}")
    return jax.jit(self.family.finalize_pretrained, out_shardings=self.param_shardings)(state["params"])

  # --- one round ------------------------------------------------------------------------------------
  def run_round(self, r: int) -> dict:
    cfg = self.config
    rdir = _round_dir(self.workdir, r)
    ref = self.load_chosen(r - 1)
    round_seed = cfg.seed * 1_000 + r
    self.timings = {}

    fake_source, num_fake = None, 0
    if cfg.negatives.mode == "offline":
      t0 = time.time()
      negatives_lib.generate(self.sample_fn, ref, num=cfg.negatives.num, chunk_size=cfg.sampling.batch_size,
                             directory=rdir / "negatives", seed=round_seed, mesh=self.mesh)
      fakes = negatives_lib.load(rdir / "negatives")
      fake_source, num_fake = pipeline.array_source(fakes), len(next(iter(fakes.values())))
      self.timings["negatives"] = time.time() - t0
    data = pipeline.PairedBatches(self.real, self.num_real, self.batch_size,
                                  seed=round_seed, fake=fake_source, num_fake=num_fake)

    metric, mode = cfg.selection.metric, self.family.metric_mode
    ckpts = checkpoint.RoundCheckpoints(rdir / "checkpoints", metric=metric, mode=mode,
                                        async_save=cfg.checkpoint.async_save)
    abstract_state = tree_io.abstract_like(self.abstract_state, self.state_shardings)
    restored = ckpts.restore_latest_valid(abstract_state)
    compilations = 0
    if restored is None:
      start = 0
      self.writer.drop(lambda rec: rec.get("round") == r)
      state = self.init_state(ref, jax.random.key(round_seed))
      ref_metrics = self.evaluate(ref)
      history = [{"step": 0, **ref_metrics}]
      self.writer.write(round=r, step=0, eval=True, **ref_metrics)
    else:
      start, state, data_state, history, record = restored
      compilations = record.get("step_compilations", 0)
      # Records of this round past the restored step are logged again below; drop the stale ones.
      self.writer.drop(lambda rec: rec.get("round") == r and rec.get("step", 0) > start)
      data.set_state(data_state)
      saved = (record.get("num_processes", 1), record.get("num_devices"))
      if saved[1] is not None and saved != (jax.process_count(), jax.device_count()):
        log.warning("round %d: resuming on %d devices a state saved on %d (%d process(es) now, %d then): from "
                    "here the results match an uninterrupted run to float32 rounding, not bitwise (the "
                    "cross-device sums run in another order)", r, jax.device_count(), saved[1],
                    jax.process_count(), saved[0])
      log.info("round %d: resuming from step %d", r, start)

    steps = self.steps_per_round
    online_base = jax.random.key(round_seed + 500_000)
    progress = utils.Progress(f"round {r}", steps, unit="steps", start=start)
    if start < steps and self.step_fn.num_traces() == 0:
      progress.compiling("the DDO step")
    pending, last_saved = [], start
    t_train = time.time()
    for i in range(start, steps):
      batch = data.next()
      if cfg.negatives.mode == "online":
        ids = np.arange(i * self.batch_size, (i + 1) * self.batch_size, dtype=np.int32)
        batch = parallel.global_batch(batch, self.mesh)
        batch["fake"] = self.paired_sample_fn(ref, online_base, jax.device_put(ids, parallel.batch_sharding(self.mesh)),
                                              batch["real"])
      else:
        batch = parallel.global_batch(batch, self.mesh)
      state, metrics = self.step_fn(state, ref, batch)
      if self.lockstep:
        jax.block_until_ready(metrics)
      s = i + 1
      pending.append((s, metrics))
      is_eval = s % cfg.selection.eval_every == 0 or s == steps
      is_save = is_eval or s % cfg.checkpoint.every == 0
      if s % cfg.log_every == 0 or s == steps or is_save:
        self.check_finite(pending, r, last_saved)
      if s % cfg.log_every == 0 or s == steps:
        m = {k: float(v) for k, v in metrics.items() if k != "finite"}
        self.writer.write(round=r, step=s, **m)
        progress.update(s, f"loss {m['loss']:.4f} d_real {m['d_real']:.3f} d_fake {m['d_fake']:.3f}")
      eval_metrics = None
      if is_eval:
        eval_metrics = self.evaluate(self.selected(state))
        history.append({"step": s, **eval_metrics})
        self.writer.write(round=r, step=s, eval=True, **eval_metrics)
        log.info("round %d step %d: %s", r, s, " ".join(f"{k}={v:.5g}" for k, v in eval_metrics.items()))
        faults.point("after_eval")
      if is_save:
        extra = {"step_compilations": max(compilations, self.step_fn.num_traces()),
                 "num_devices": jax.device_count(), "num_processes": jax.process_count()}
        ckpts.save(s, state, data.get_state(), history, extra=extra)
        last_saved = s
        faults.point("checkpoint_saved")
    ckpts.prune(history)
    self.timings["training"] = time.time() - t_train - self.timings.get("evaluation", 0.0)

    # Choose the round's checkpoint among the evaluated trained ones (step 0 is the reference itself).
    candidates = [h for h in history if h["step"] > 0]
    chosen_step = (checkpoint.best_step(history, metric, mode) if cfg.selection.choose == "best"
                   else candidates[-1]["step"])
    chosen = next(h for h in history if h["step"] == chosen_step)
    if chosen_step not in ckpts.all_steps():
      raise cli.UserError(f"round {r}'s best checkpoint (step {chosen_step}) is missing or was damaged",
                          str(rdir / "checkpoints"), f"delete {rdir} to train round {r} again")
    try:
      state, _, _, _ = ckpts.restore(chosen_step, abstract_state)
    except tree_io.CorruptCheckpointError as e:
      raise cli.UserError(f"round {r}'s best checkpoint is damaged: {e}", str(rdir / "checkpoints"),
                          f"delete {rdir} to train round {r} again") from e
    ckpts.close()
    chosen_dir = rdir / "chosen"
    if chosen_dir.exists():   # written before a kill that came ahead of summary.json: keep it if intact
      try:
        tree_io.load_tree(chosen_dir, {"params": self.abstract_params()})
      except tree_io.CorruptCheckpointError as e:
        log.warning("%s; writing it again", e)
        self._quarantine(chosen_dir)
    if not chosen_dir.exists():
      tree_io.save_tree(chosen_dir, {"params": self.selected(state)})
    faults.point("after_chosen")
    self.write_model_json(r)
    summary = {"round": r, "chosen_step": chosen_step, "metrics": {k: v for k, v in chosen.items() if k != "step"},
               "reference_metrics": {k: v for k, v in history[0].items() if k != "step"}, "history": history,
               "step_compilations": max(compilations, self.step_fn.num_traces())}
    if jax.process_index() == 0:
      floor = self.family.reference_metrics(cfg.seed)
      plots.round_curve(rdir / "metrics.png", history, metric, r, mode=mode, chosen_step=chosen_step,
                        floor=floor.get(metric), train_records=self.writer.read_records(
                            where=lambda rec, r=r: rec.get("round") == r and "loss" in rec))
      utils.atomic_write_json(rdir / "summary.json", summary)
    self.writer.flush()
    faults.point("after_summary")
    parallel.barrier(f"round-{r}-summary")
    times = ", ".join(f"{k} {v:.0f} s" for k, v in self.timings.items())
    log.info("round %d: chose step %d (%s=%.5g); time: %s", r, chosen_step, metric, chosen[metric], times)
    return summary

  # --- the run --------------------------------------------------------------------------------------
  def run(self) -> list:
    self.writer = utils.MetricWriter(self.workdir / "metrics.jsonl", enabled=jax.process_index() == 0)
    try:
      return self._run()
    finally:
      self.writer.close()

  def _run(self) -> list:
    t0 = time.time()
    fix = "restore it from a backup, or delete it to redo that round"
    if (self.workdir / "summary.json").exists() and all(
        self._round_done(r) for r in range(self.config.rounds.num + 1)):
      summaries = [_read_json(_round_dir(self.workdir, r) / "summary.json", fix)
                   for r in range(self.config.rounds.num + 1)]
      if jax.process_index() == 0:
        print(f"{self.workdir} holds a complete run of {self.config.rounds.num} rounds; nothing to do. "
              "Its results:", flush=True)
      self.print_table(summaries)
      return summaries
    self.ensure_round0()
    summaries = [_read_json(_round_dir(self.workdir, 0) / "summary.json", fix)]
    for r in range(1, self.config.rounds.num + 1):
      if self._round_done(r):
        summaries.append(_read_json(_round_dir(self.workdir, r) / "summary.json", fix))
        continue
      summaries.append(self.run_round(r))
    self.finish(summaries)
    log.info("done in %.0f s; step compiled %d time(s)", time.time() - t0, self.step_fn.num_traces())
    return summaries

  def print_table(self, summaries: list) -> None:
    metric = self.config.selection.metric
    keys = list(summaries[0]["metrics"].keys())
    lines = ["round  " + "  ".join(f"{k:>10s}" for k in keys)]
    for s in summaries:
      lines.append(f"{s['round']:5d}  " + "  ".join(f"{s['metrics'][k]:10.5f}" for k in keys))
    floor = self.family.reference_metrics(self.config.seed)
    if floor:
      lines.append("data   " + "  ".join(f"{floor.get(k, float('nan')):10.5f}" for k in keys))
    note = "; 'data' = fresh ground-truth samples" if floor else ""
    if jax.process_index() == 0:   # one table for the run, not one per process
      print(f"\nmetrics of each round's chosen model ({metric} selects{note}):\n" + "\n".join(lines), flush=True)

  def finish(self, summaries: list) -> None:
    self.print_table(summaries)
    # Loading and sampling are collective (every process takes part); only process 0 writes.
    n = self.config.plot_samples
    samples = [self.sample(self.load_chosen(s["round"]), n, seed=self.config.seed + 20_000)["x"]
               for s in summaries]
    if jax.process_index() == 0:
      metric = self.config.selection.metric
      floor = self.family.reference_metrics(self.config.seed)
      plots.metrics_per_round(self.workdir / "metrics_per_round.png", summaries, floor,
                              modes={metric: self.family.metric_mode})
      plots.samples_per_round(self.workdir / "samples_per_round.png", self.family, samples,
                              [f"round {s['round']}: {metric}={s['metrics'][metric]:.4f}" for s in summaries],
                              ground_truth=self.family.ground_truth(self.config.seed, n))
      utils.atomic_write_json(self.workdir / "summary.json", {
          "metric": metric, "rounds": [{"round": s["round"], "chosen_step": s["chosen_step"], **s["metrics"]}
                                       for s in summaries], "data_floor": floor})
    parallel.barrier("run-summary")


# --- the workdir: one writer, one config ----------------------------------------------------------------

class WorkdirLock:
  """An exclusive lock on WORKDIR/.lock held by process 0 for the whole run (released by the kernel when
  the process dies, so a killed run never leaves a stale lock). Every process of a multi-process run learns
  process 0's result, so all of them refuse together."""

  def __init__(self, workdir):
    self.path = pathlib.Path(workdir) / ".lock"
    self.fd = None

  def __enter__(self):
    ok, holder = True, ""
    if jax.process_index() == 0:
      self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, utils.default_file_mode())
      try:
        fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n".encode())
      except BlockingIOError:
        ok = False
        holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip()
        os.close(self.fd)
        self.fd = None
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      ok = bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))
    if not ok:
      raise cli.UserError(f"another process is running in this workdir ({holder or 'held by process 0'})",
                          str(self.path.parent), "wait for it to finish or stop it, or use another --workdir")
    return self

  def __exit__(self, *exc):
    if self.fd is not None:
      fcntl.flock(self.fd, fcntl.LOCK_UN)
      os.close(self.fd)
      self.fd = None


# Keys added to the configs after runs were started: a saved config.json without one resumes when the
# current value is the default (the behaviour the run had).
ADDED_KEYS = {"step_impl": "jit"}


def check_workdir_config(config: ml_collections.ConfigDict, workdir, rewrite_config: bool = False) -> None:
  """Write config.json on first start; refuse to resume a workdir with a different config, or one that holds
  rounds but lost its config.json (unless `rewrite_config`)."""
  workdir = pathlib.Path(workdir)
  path = workdir / "config.json"
  text = config.to_json_best_effort(indent=1, sort_keys=True)
  exists = path.exists()
  parallel.barrier("config-json-checked")   # every process looked before process 0 may write it
  if exists and not rewrite_config:
    old = _read_json(path, "restore it, or rerun with --rewrite_config to write the current config in its place")
    new = json.loads(text)
    flat_old, flat_new = utils.flatten_dict(old), utils.flatten_dict(new)
    diff = sorted(k for k in set(flat_old) | set(flat_new) if flat_old.get(k) != flat_new.get(k)
                  and not (k not in flat_old and ADDED_KEYS.get(k, object()) == flat_new[k]))
    if diff:
      raise cli.ConfigError(f"{workdir} holds a run with a different config (keys differ: {', '.join(diff)})",
                            "--workdir", "resume with the same config, or use a new --workdir")
    return
  if not exists and any(workdir.glob("round_*")) and not rewrite_config:
    raise cli.UserError(f"{workdir} holds rounds but no config.json, so the run's config is unknown",
                        "--workdir", "rerun with --rewrite_config if this command's config is the run's, or "
                        "use a new --workdir")
  if jax.process_index() == 0:
    utils.atomic_write_text(path, text + "\n")
  parallel.barrier("config-json")


def train(config: ml_collections.ConfigDict, workdir, *, rewrite_config: bool = False) -> list:
  """Run (or resume) the whole self-play schedule in `workdir`; returns the per-round summaries.

  Everything is validated (config values, the family, the data, the init checkpoint) before any file is
  written; the workdir then gets its lock, its config.json and a train.log of full log records.
  """
  utils.setup_logging()
  workdir = pathlib.Path(workdir)
  if workdir.exists() and not workdir.is_dir():
    raise cli.UserError(f"{workdir} exists and is not a folder", "--workdir", "pass a folder path")
  try:
    with jax.set_mesh(parallel.make_mesh(config.mesh.data, config.mesh.fsdp)):
      driver = Driver(config, workdir)
      workdir.mkdir(parents=True, exist_ok=True)
      with WorkdirLock(workdir):
        check_workdir_config(config, workdir, rewrite_config)
        if jax.process_index() == 0:
          utils.setup_logging(log_file=workdir / "train.log")
        return driver.run()
  except BaseException as e:
    parallel.fail_fast(e)   # several processes: exit without waiting for the others (they would wait for us)
    raise
