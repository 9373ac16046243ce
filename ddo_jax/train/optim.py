"""optax optimizer from the config: Adam with linear warm-up, optional gradient clipping."""
import optax


def make_schedule(cfg) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then constant (EDM's ramp-up, no decay) or,
  with `decay='rsqrt'`, EDM2's 1/sqrt(step / ref_steps) decay after `ref_steps`."""
  warm = int(cfg.warmup_steps)
  if warm < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warm}")
  decay = cfg.get("decay", "none")
  if decay not in ("none", "rsqrt"):
    raise ValueError(f"optim.decay={decay!r} must be 'none' or 'rsqrt'")

  def schedule(step):
    ramp = optax.linear_schedule(0.0, cfg.lr, warm)(step) if warm > 0 else cfg.lr
    if decay == "rsqrt":
      import jax.numpy as jnp
      ref = max(int(cfg.get("ref_steps", 1)), 1)
      ramp = ramp / jnp.sqrt(jnp.maximum(step / ref, 1.0))
    return ramp

  return schedule


def make_optimizer(cfg) -> optax.GradientTransformation:
  if cfg.name != "adam":
    raise ValueError(f"optim.name={cfg.name!r}: only 'adam' is supported")
  if not cfg.lr > 0:
    raise ValueError(f"optim.lr must be > 0, got {cfg.lr}")
  parts = []
  if cfg.get("clip_norm", 0):
    parts.append(optax.clip_by_global_norm(cfg.clip_norm))
  parts.append(optax.adam(make_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  return optax.chain(*parts)
