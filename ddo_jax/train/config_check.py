"""Checks of a run config at start, so an invalid value fails before any work with a message naming it."""


def _require(cond: bool, msg: str) -> None:
  if not cond:
    raise ValueError(f"invalid config: {msg}")


def validate(config) -> None:
  c = config
  _require(c.ddo.alpha > 0, f"ddo.alpha must be > 0, got {c.ddo.alpha}")
  _require(c.ddo.beta > 0, f"ddo.beta must be > 0, got {c.ddo.beta}")
  _require(c.rounds.num >= 1, f"rounds.num must be >= 1, got {c.rounds.num}")
  _require(c.rounds.batch_size >= 1, f"rounds.batch_size must be >= 1, got {c.rounds.batch_size}")
  _require(c.rounds.images >= c.rounds.batch_size,
           f"rounds.images ({c.rounds.images}) must be at least one batch ({c.rounds.batch_size})")
  _require(c.negatives.mode in ("offline", "online"),
           f"negatives.mode must be 'offline' or 'online', got {c.negatives.mode!r}")
  if c.negatives.mode == "offline":
    _require(c.negatives.num >= c.rounds.batch_size,
             f"negatives.num ({c.negatives.num}) must be at least one batch ({c.rounds.batch_size})")
  _require(c.selection.choose in ("best", "last"), f"selection.choose must be 'best' or 'last', got {c.selection.choose!r}")
  _require(c.selection.params == "params" or c.selection.params in c.ema,
           f"selection.params={c.selection.params!r} must be 'params' or one of the EMAs {list(c.ema.keys())}")
  _require(c.selection.eval_every >= 1, f"selection.eval_every must be >= 1, got {c.selection.eval_every}")
  _require(c.checkpoint.every >= 1, f"checkpoint.every must be >= 1, got {c.checkpoint.every}")
  _require(c.log_every >= 1, f"log_every must be >= 1, got {c.log_every}")
  _require(c.init.kind in ("pretrain", "checkpoint"), f"init.kind must be 'pretrain' or 'checkpoint', got {c.init.kind!r}")
  if c.init.kind == "checkpoint":
    _require(bool(c.init.checkpoint), "init.kind='checkpoint' needs init.checkpoint (a converted Orbax checkpoint)")
  if c.init.kind == "pretrain":
    _require(c.pretrain.steps >= 1, f"pretrain.steps must be >= 1, got {c.pretrain.steps}")
  for r in c.sharding_rules:
    _require(len(r) == 2 and r[1] in ("replicate", "fsdp"),
             f"sharding_rules entries are (regex, 'replicate'|'fsdp'), got {tuple(r)}")
