"""Checks of a run config at start, so an invalid value fails before any work or any file is written, with
one line naming the key (`error: <what> (config.<key>): <fix>`)."""
from ddo_jax.cli import ConfigError


def _require(cond: bool, key: str, msg: str, fix: str = "") -> None:
  if not cond:
    raise ConfigError(f"invalid config: {msg}", f"config.{key}", fix or f"set --config.{key}=<valid value>")


def validate(config) -> None:
  c = config
  _require(c.ddo.alpha > 0, "ddo.alpha", f"ddo.alpha must be > 0, got {c.ddo.alpha}")
  _require(c.ddo.beta > 0, "ddo.beta", f"ddo.beta must be > 0, got {c.ddo.beta}")
  _require(c.rounds.num >= 1, "rounds.num", f"rounds.num must be >= 1, got {c.rounds.num}")
  _require(c.rounds.batch_size >= 1, "rounds.batch_size", f"rounds.batch_size must be >= 1, got {c.rounds.batch_size}")
  _require(c.rounds.images >= c.rounds.batch_size, "rounds.images",
           f"rounds.images ({c.rounds.images}) must be at least one batch ({c.rounds.batch_size})")
  _require(c.negatives.mode in ("offline", "online"), "negatives.mode",
           f"negatives.mode must be 'offline' or 'online', got {c.negatives.mode!r}")
  if c.negatives.mode == "offline":
    _require(c.negatives.num >= c.rounds.batch_size, "negatives.num",
             f"negatives.num ({c.negatives.num}) must be at least one batch ({c.rounds.batch_size})")
  _require(c.sampling.batch_size >= 1, "sampling.batch_size",
           f"sampling.batch_size must be >= 1, got {c.sampling.batch_size}")
  _require(c.selection.choose in ("best", "last"), "selection.choose",
           f"selection.choose must be 'best' or 'last', got {c.selection.choose!r}")
  _require(c.selection.params == "params" or c.selection.params in c.ema, "selection.params",
           f"selection.params={c.selection.params!r} must be 'params' or one of the EMAs {list(c.ema.keys())}")
  _require(c.selection.eval_every >= 1, "selection.eval_every",
           f"selection.eval_every must be >= 1, got {c.selection.eval_every}")
  _require(c.checkpoint.every >= 1, "checkpoint.every", f"checkpoint.every must be >= 1, got {c.checkpoint.every}")
  _require(c.log_every >= 1, "log_every", f"log_every must be >= 1, got {c.log_every}")
  _require(c.init.kind in ("pretrain", "checkpoint", "random"), "init.kind",
           f"init.kind must be 'pretrain', 'checkpoint' or 'random', got {c.init.kind!r}")
  if c.init.kind == "checkpoint":
    _require(bool(c.init.checkpoint), "init.checkpoint",
             "init.kind='checkpoint' needs init.checkpoint (a converted Orbax checkpoint)",
             f"convert one with `python -m launch.convert {c.get('family', 'edm')} --src X.pkl --out DIR` and pass "
             "--config.init.checkpoint=DIR")
  if c.init.kind == "pretrain":
    _require(c.pretrain.steps >= 1, "pretrain.steps", f"pretrain.steps must be >= 1, got {c.pretrain.steps}")
  for r in c.sharding_rules:
    _require(len(r) == 2 and r[1] in ("replicate", "fsdp"), "sharding_rules",
             f"sharding_rules entries are (regex, 'replicate'|'fsdp'), got {tuple(r)}")
  _validate_optim(c)
  impl = c.get("step_impl", "jit")
  _require(impl in ("jit", "shard_map"), "step_impl",
           f"step_impl must be 'jit' (XLA partitions the global step) or 'shard_map' (explicit per-device "
           f"program), got {impl!r}")


def _validate_optim(c) -> None:
  """config.optim (keys in ddo_jax/train/optim.py's docstring); absent optional keys take their defaults."""
  o = c.optim
  name = o.get("name", "adam")
  _require(name in ("adam", "adamw"), "optim.name", f"optim.name must be 'adam' or 'adamw', got {name!r}")
  _require(o.lr > 0, "optim.lr", f"optim.lr must be > 0, got {o.lr}")
  _require(int(o.warmup_steps) >= 0, "optim.warmup_steps", f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
  start = o.get("warmup_from", 0.0)
  _require(0.0 <= start <= 1.0, "optim.warmup_from",
           f"optim.warmup_from (the warm-up's first factor of lr) must lie in [0, 1], got {start}")
  decay = o.get("decay", "none")
  _require(decay in ("none", "rsqrt", "lin0"), "optim.decay",
           f"optim.decay must be 'none' (warm-up, then constant), 'rsqrt' (EDM2's 1/sqrt(step / ref_steps) "
           f"after ref_steps) or 'lin0' (VAR's warm-up, flat, linear decay to end_ratio), got {decay!r}")
  if decay == "rsqrt":
    _require(int(o.get("ref_steps", 0)) >= 1, "optim.ref_steps",
             f"optim.decay='rsqrt' needs optim.ref_steps >= 1 (EDM2's ref_batches), got {o.get('ref_steps')}")
  if decay == "lin0":
    total = int(o.get("total_steps", 0))
    _require(total > int(o.warmup_steps) + 1, "optim.total_steps",
             f"optim.decay='lin0' needs optim.total_steps (the schedule's length in driver steps, VAR's max_it) > "
             f"warmup_steps + 1 = {int(o.warmup_steps) + 1}, got {total}")
    end = o.get("end_ratio", 0.0)
    _require(0.0 <= end <= 1.0, "optim.end_ratio", f"optim.end_ratio (VAR's wpe) must lie in [0, 1], got {end}")
  wd = o.get("weight_decay", 0.0)
  _require(wd >= 0, "optim.weight_decay", f"optim.weight_decay must be >= 0, got {wd}")
  _require(not wd or name == "adamw", "optim.weight_decay",
           f"optim.weight_decay={wd} needs decoupled weight decay", "set --config.optim.name=adamw")
  keys = o.get("no_decay_keys", ())
  _require(isinstance(keys, (tuple, list)) and all(isinstance(k, str) for k in keys), "optim.no_decay_keys",
           f"optim.no_decay_keys must be a tuple of name substrings, got {keys!r}")
  for key in ("clip_norm", "clip_eps"):
    _require((o.get(key, 0.0) or 0.0) >= 0, f"optim.{key}", f"optim.{key} must be >= 0, got {o.get(key)}")
  k = o.get("accumulate", 1)
  _require(isinstance(k, int) and k >= 1, "optim.accumulate", f"optim.accumulate must be an integer >= 1, got {k!r}")
  if k > 1:
    steps = c.rounds.images // c.rounds.batch_size
    for key, value in (("rounds.images", steps), ("selection.eval_every", c.selection.eval_every),
                       ("checkpoint.every", c.checkpoint.every)):
      what = "the driver steps of a round (rounds.images // rounds.batch_size)" if key == "rounds.images" else key
      _require(value % k == 0, key,
               f"with optim.accumulate={k}, {what} = {value} must be a multiple of {k}, so that rounds end and "
               f"parameters are evaluated and saved on optimizer steps",
               f"set --config.{key} to a multiple of {k * (c.rounds.batch_size if key == 'rounds.images' else 1)}")
