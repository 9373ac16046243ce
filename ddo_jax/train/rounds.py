"""The self-play round driver: a plain loop over DDO rounds with Orbax checkpoints and exact resume.

Round r = 1..R:
  1. The reference is round r-1's chosen parameters (round 0: the pretrained or converted model).
  2. Negatives: offline, the reference's jitted sampler fills round_r/negatives (resumable); online, the
     reference samples a fresh fake batch inside every step.
  3. The target starts from the reference with a fresh optimizer and EMA, and trains for
     `rounds.images` images on real batches paired 1:1 with fake batches.
  4. Every `selection.eval_every` steps the selected weights (raw or an EMA) are evaluated; checkpoints
     (train state, data position, eval history) are written every `checkpoint.every` steps and at each
     evaluation; the latest and the best are kept.
  5. The round's checkpoint is chosen (best by metric, or last), saved to round_r/chosen for good, and
     becomes the next reference.

Everything random is a function of (config.seed, round, step, sample index), so a process killed at any
point and restarted with the same command continues where the last complete file left off and ends with
bitwise the same parameters as an uninterrupted run.

Layout of the workdir:
  config.json  metrics.jsonl  summary.json  metrics_per_round.png  samples_per_round.png
  round_000/chosen/                                        round 0 (pretrained or converted)
  round_001/{negatives/, checkpoints/, summary.json, chosen/}  ...
"""
import functools
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np

from ddo_jax import families, parallel, utils
from ddo_jax.data import negatives as negatives_lib
from ddo_jax.data import pipeline
from ddo_jax.sampling import seeded
from ddo_jax.train import checkpoint, config_check, optim, plots, step as step_lib
from ddo_jax.train import ema as ema_lib

log = utils.log


def _round_dir(workdir: pathlib.Path, r: int) -> pathlib.Path:
  return workdir / f"round_{r:03d}"


class Driver:
  """Holds what is built once per run: family, mesh, shardings, jitted step and sampler."""

  def __init__(self, config: ml_collections.ConfigDict, workdir):
    config_check.validate(config)
    self.config = config
    self.workdir = pathlib.Path(workdir)
    self.family = families.make(config)
    self.mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp)
    self.rules = [tuple(r) for r in config.sharding_rules]
    self.batch_size = config.rounds.batch_size
    parallel.check_batch_divisible(self.batch_size, self.mesh)
    parallel.check_batch_divisible(config.sampling.batch_size, self.mesh, "sampling.batch_size")
    self.writer = utils.MetricWriter(self.workdir / "metrics.jsonl", enabled=jax.process_index() == 0)

    params_shape = jax.eval_shape(self.family.init_params, jax.random.key(0))
    self.param_shardings = parallel.param_shardings(params_shape, self.mesh, self.rules)
    self.steps_per_round = config.rounds.images // self.batch_size
    self.schedule = optim.make_schedule(config.optim)
    self.tx = optim.make_optimizer(config.optim)
    self.ema_specs = {k: dict(v) for k, v in config.ema.items()}
    ema_lib.validate(self.ema_specs)
    init = functools.partial(step_lib.init_state, tx=self.tx, ema_specs=self.ema_specs)
    self.abstract_state = jax.eval_shape(init, params_shape, jax.random.key(0))
    self.state_shardings = parallel.param_shardings(self.abstract_state, self.mesh, self.rules)
    self.init_state = jax.jit(init, in_shardings=(self.param_shardings, parallel.replicated(self.mesh)),
                              out_shardings=self.state_shardings)
    self.step_fn = step_lib.make_ddo_step(
        self.family, self.tx, self.ema_specs, alpha=config.ddo.alpha, beta=config.ddo.beta,
        batch_size=self.batch_size, mesh=self.mesh, shardings=self.state_shardings,
        ref_shardings=self.param_shardings, schedule=self.schedule)
    self.sample_fn = seeded.make_seeded_sampler(self.family.sample, self.mesh, self.param_shardings)
    self.real, self.num_real = self.family.real_source(config.seed)

  # --- helpers ------------------------------------------------------------------------------------
  def abstract_params(self):
    return checkpoint.abstract_like(jax.eval_shape(self.family.init_params, jax.random.key(0)),
                                    self.param_shardings)

  def load_chosen(self, r: int):
    path = _round_dir(self.workdir, r) / "chosen"
    return checkpoint.load_tree(path, {"params": self.abstract_params()})["params"]

  def sample(self, params, num: int, seed: int, start: int = 0) -> dict:
    """Samples for seeds [start, start + num) (keys fold_in(key(seed), s)), in sampler batches, on host."""
    bs = self.config.sampling.batch_size
    base = jax.random.key(seed)
    sharding = parallel.batch_sharding(self.mesh)
    out = []
    for first in range(start, start + num, bs):
      ids = jax.device_put(np.arange(first, first + bs, dtype=np.int32), sharding)
      out.append(parallel.to_host(self.sample_fn(params, base, ids)))
    return {k: np.concatenate([o[k] for o in out])[:num] for k in out[0]}

  def evaluate(self, params) -> dict:
    seed = self.config.seed + 10_000
    return self.family.evaluate(params, lambda num, start=0: self.sample(params, num, seed, start),
                                seed=self.config.seed)

  def write_model_json(self, r: int) -> None:
    """round_r/model.json next to chosen/, so launch.sample and launch.convert can rebuild the net."""
    if hasattr(self.family, "model_json") and jax.process_index() == 0:
      utils.atomic_write_json(_round_dir(self.workdir, r) / "model.json", self.family.model_json())

  def selected(self, state):
    name = self.config.selection.params
    return state["params"] if name == "params" else state["ema"][name]

  # --- round 0 --------------------------------------------------------------------------------------
  def ensure_round0(self) -> None:
    path = _round_dir(self.workdir, 0) / "chosen"
    if path.exists():
      return
    c = self.config.init
    if c.kind == "pretrain":
      params = self.pretrain()
    else:
      # A converted model (launch.convert: DIR/params + DIR/model.json) or a round's chosen/ folder.
      src = pathlib.Path(c.checkpoint)
      if hasattr(self.family, "check_converted"):
        self.family.check_converted(src / "model.json")
      tree = src / "params" if (src / "params").exists() else src
      params = checkpoint.load_tree(tree, {"params": self.abstract_params()})["params"]
    checkpoint.save_tree(path, {"params": params})
    self.write_model_json(0)
    metrics = self.evaluate(self.load_chosen(0))
    self.writer.drop(lambda rec: rec.get("round") == 0)
    self.writer.write(round=0, step=0, **metrics)
    if jax.process_index() == 0:
      utils.atomic_write_json(_round_dir(self.workdir, 0) / "summary.json",
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
                                  shardings=shardings)
    data = pipeline.PairedBatches(self.real, self.num_real, c.batch_size, seed=self.config.seed)
    self.writer.drop(lambda rec: rec.get("phase") == "pretrain")   # an interrupted pretraining restarts
    progress = utils.Progress("pretrain", c.steps, unit="steps")
    for i in range(c.steps):
      state, metrics = step(state, None, parallel.global_batch(data.next()["real"], self.mesh))
      if (i + 1) % self.config.log_every == 0 or i + 1 == c.steps:
        loss = float(metrics["loss"])
        self.writer.write(phase="pretrain", step=i + 1, loss=loss)
        progress.update(i + 1, f"loss {loss:.4f}")
    if hasattr(self.family, "finalize_pretrained"):
      return jax.jit(self.family.finalize_pretrained, out_shardings=self.param_shardings)(state["params"])
    return state["params"]

  # --- one round ------------------------------------------------------------------------------------
  def run_round(self, r: int) -> dict:
    cfg = self.config
    rdir = _round_dir(self.workdir, r)
    ref = self.load_chosen(r - 1)
    round_seed = cfg.seed * 1_000 + r

    fake_source, num_fake = None, 0
    if cfg.negatives.mode == "offline":
      negatives_lib.generate(self.sample_fn, ref, num=cfg.negatives.num, chunk_size=cfg.sampling.batch_size,
                             directory=rdir / "negatives", seed=round_seed, mesh=self.mesh)
      fakes = negatives_lib.load(rdir / "negatives")
      fake_source, num_fake = pipeline.array_source(fakes), len(next(iter(fakes.values())))
    data = pipeline.PairedBatches(self.real, self.num_real, self.batch_size,
                                  seed=round_seed, fake=fake_source, num_fake=num_fake)

    ckpts = checkpoint.RoundCheckpoints(rdir / "checkpoints", metric=cfg.selection.metric,
                                        mode=self.family.metric_mode, async_save=cfg.checkpoint.async_save)
    start = ckpts.latest_step()
    abstract_state = checkpoint.abstract_like(self.abstract_state, self.state_shardings)
    # Records of this round past the restored step are logged again below; drop the stale ones.
    self.writer.drop(lambda rec: rec.get("round") == r and rec.get("step", 0) > (start or -1))
    if start is None:
      start = 0
      state = self.init_state(ref, jax.random.key(round_seed))
      ref_metrics = self.evaluate(ref)
      history = [{"step": 0, **ref_metrics}]
      self.writer.write(round=r, step=0, eval=True, **ref_metrics)
    else:
      log.info("round %d: resuming from step %d", r, start)
      state, data_state, history = ckpts.restore(start, abstract_state)
      data.set_state(data_state)

    steps = self.steps_per_round
    online_base = jax.random.key(round_seed + 500_000)
    progress = utils.Progress(f"round {r}", steps, unit="steps", start=start)
    for i in range(start, steps):
      batch = data.next()
      if cfg.negatives.mode == "online":
        ids = np.arange(i * self.batch_size, (i + 1) * self.batch_size, dtype=np.int32)
        fake = self.sample_fn(ref, online_base, jax.device_put(ids, parallel.batch_sharding(self.mesh)))
        batch = parallel.global_batch(batch, self.mesh)
        batch["fake"] = fake
      else:
        batch = parallel.global_batch(batch, self.mesh)
      state, metrics = self.step_fn(state, ref, batch)
      s = i + 1
      if s % cfg.log_every == 0 or s == steps:
        m = {k: float(v) for k, v in metrics.items()}
        self.writer.write(round=r, step=s, **m)
        progress.update(s, f"loss {m['loss']:.4f} d_real {m['d_real']:.3f} d_fake {m['d_fake']:.3f}")
      is_eval = s % cfg.selection.eval_every == 0 or s == steps
      eval_metrics = None
      if is_eval:
        eval_metrics = self.evaluate(self.selected(state))
        history.append({"step": s, **eval_metrics})
        self.writer.write(round=r, step=s, eval=True, **eval_metrics)
        log.info("round %d step %d: %s", r, s, " ".join(f"{k}={v:.5g}" for k, v in eval_metrics.items()))
      if is_eval or s % cfg.checkpoint.every == 0:
        ckpts.save(s, state, data.get_state(), history, metrics=eval_metrics)
    ckpts.wait()

    # Choose the round's checkpoint among the evaluated trained ones (step 0 is the reference itself).
    candidates = [h for h in history if h["step"] > 0]
    metric = cfg.selection.metric
    if cfg.selection.choose == "best":
      better = min if self.family.metric_mode == "min" else max
      chosen = better(candidates, key=lambda h: h[metric])
    else:
      chosen = candidates[-1]
    state, _, _ = ckpts.restore(chosen["step"], abstract_state)
    ckpts.close()
    summary = {"round": r, "chosen_step": chosen["step"], "metrics": {k: v for k, v in chosen.items() if k != "step"},
               "reference_metrics": {k: v for k, v in history[0].items() if k != "step"}, "history": history,
               "step_compilations": self.step_fn.num_traces()}
    if jax.process_index() == 0:
      utils.atomic_write_json(rdir / "summary.json", summary)
      plots.round_curve(rdir / "metrics.png", history, metric, r)
    self.write_model_json(r)
    parallel.barrier(f"round-{r}-summary")
    checkpoint.save_tree(rdir / "chosen", {"params": self.selected(state)})
    log.info("round %d: chose step %d (%s=%.5g)", r, chosen["step"], metric, chosen[metric])
    return summary

  # --- the run --------------------------------------------------------------------------------------
  def run(self) -> list:
    t0 = time.time()
    self.ensure_round0()
    summaries = [json.loads((_round_dir(self.workdir, 0) / "summary.json").read_text())]
    for r in range(1, self.config.rounds.num + 1):
      rdir = _round_dir(self.workdir, r)
      if (rdir / "chosen").exists():
        summaries.append(json.loads((rdir / "summary.json").read_text()))
        continue
      summaries.append(self.run_round(r))
    self.finish(summaries)
    log.info("done in %.0f s; step compiled %d time(s)", time.time() - t0, self.step_fn.num_traces())
    return summaries

  def finish(self, summaries: list) -> None:
    metric = self.config.selection.metric
    keys = list(summaries[0]["metrics"].keys())
    lines = ["round  " + "  ".join(f"{k:>10s}" for k in keys)]
    for s in summaries:
      lines.append(f"{s['round']:5d}  " + "  ".join(f"{s['metrics'][k]:10.5f}" for k in keys))
    floor = self.family.reference_metrics(self.config.seed)
    if floor:
      lines.append("data   " + "  ".join(f"{floor.get(k, float('nan')):10.5f}" for k in keys))
    table = "\n".join(lines)
    note = "; 'data' = fresh ground-truth samples" if floor else ""
    print(f"\nmetrics of each round's chosen model ({metric} selects{note}):\n" + table, flush=True)
    if jax.process_index() != 0:
      return
    utils.atomic_write_json(self.workdir / "summary.json", {
        "metric": metric, "rounds": [{"round": s["round"], "chosen_step": s["chosen_step"], **s["metrics"]}
                                     for s in summaries], "data_floor": floor})
    plots.metrics_per_round(self.workdir / "metrics_per_round.png", summaries, floor)
    samples = [self.sample(self.load_chosen(s["round"]), self.config.plot_samples, seed=self.config.seed + 20_000)["x"]
               for s in summaries]
    plots.samples_per_round(self.workdir / "samples_per_round.png", self.family, samples,
                            [f"round {s['round']}: {metric}={s['metrics'][metric]:.4f}" for s in summaries])


def check_workdir_config(config: ml_collections.ConfigDict, workdir) -> None:
  """Write config.json on first start; refuse to resume a workdir with a different config."""
  path = pathlib.Path(workdir) / "config.json"
  text = config.to_json_best_effort(indent=1, sort_keys=True)
  if path.exists():
    old = json.loads(path.read_text())
    new = json.loads(text)
    if old != new:
      diff = sorted(k for k in set(utils.flatten_dict(old)) | set(utils.flatten_dict(new))
                    if utils.flatten_dict(old).get(k) != utils.flatten_dict(new).get(k))
      raise ValueError(f"{workdir} holds a run with a different config (keys differ: {', '.join(diff)}). "
                       "Resume with the same config, or use a new --workdir.")
    return
  if jax.process_index() == 0:
    utils.atomic_write_text(path, text + "\n")


def train(config: ml_collections.ConfigDict, workdir) -> list:
  """Run (or resume) the whole self-play schedule in `workdir`; returns the per-round summaries."""
  utils.setup_logging()
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  check_workdir_config(config, workdir)
  with jax.set_mesh(parallel.make_mesh(config.mesh.data, config.mesh.fsdp)):
    return Driver(config, workdir).run()

