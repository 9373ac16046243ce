"""optax optimizer from the config: Adam or AdamW, warm-up and decay schedules, gradient clipping, gradient
accumulation.

Config keys (`config.optim`; every key past the first five is optional, and its default keeps the behaviour
the EDM and toy configs had before it existed):

  name          'adam' | 'adamw' (decoupled weight decay, as torch.optim.AdamW and optax.adamw)
  lr, b1, b2, eps
  warmup_steps  linear warm-up length in driver steps (0: none)
  warmup_from   0.0   the warm-up starts at warmup_from * lr (VAR's wp0 = 0.005; 0: EDM's ramp from 0)
  decay         'none' constant after the warm-up | 'rsqrt' EDM2's lr / sqrt(max(step / ref_steps, 1)) |
                'lin0' VAR's schedule (see `lin0_factor`)
  ref_steps     'rsqrt' only
  total_steps   'lin0' only: the length of VAR's schedule in driver steps (VAR: its epochs * iterations per
                epoch, max_it, not the length of a DDO round)
  end_ratio     0.0   'lin0' only: the factor reached at total_steps - 1 (VAR's wpe)
  weight_decay  0.0   AdamW's decoupled decay (its update is -lr * weight_decay * param)
  no_decay_keys ()    substrings of a parameter's path that exclude it from weight decay (see `decay_mask`)
  clip_norm     0.0   clip the gradient to this global L2 norm (0: no clipping)
  clip_eps      0.0   torch's clip_grad_norm_ scales by clip_norm / (norm + clip_eps) (torch uses 1e-6);
                      0 keeps optax's clip_by_global_norm
  accumulate    1     gradient accumulation: the optimizer steps once every `accumulate` driver steps on the
                      mean of their gradients (optax.MultiSteps)

Step counting with accumulation. The driver's step counter (`state['step']`, `rounds.images //
rounds.batch_size` per round, `checkpoint.every`, `selection.eval_every`, `warmup_steps`, `total_steps`)
counts driver steps, i.e. micro-steps of `rounds.batch_size` examples each; the optimizer updates the
parameters at driver steps accumulate, 2 * accumulate, ... and leaves them unchanged at the others. The
schedule is a function of the driver step, as VAR's lr_wd_annealing is of its micro-step `g_it`; the update
made at the end of an accumulation uses the schedule's value at that accumulation's last micro-step (VAR sets
the lr every micro-step and steps at (g_it + 1) % ac == 0). `make_schedule` returns that function of the driver
step (the driver logs it); the optimizer's own count (optimizer steps k = 0, 1, ...) maps to driver step
k * accumulate + accumulate - 1. With accumulate = 1 both are the same.
"""
from typing import Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import optax

DECAYS = ("none", "rsqrt", "lin0")
NAMES = ("adam", "adamw")
LIN0_FLAT = 0.05     # VAR's 'lin0': the factor stays 1 for the first 5% of the post-warm-up part


def _get(cfg, key, default):
  return cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)


def lin0_factor(step, *, warmup_steps: int, total_steps: int, warmup_from: float, end_ratio: float):
  """VAR's `lr_wd_annealing(sche_type='lin0')` factor of the peak lr at (micro-)step `step`:

    step < wp:  wp0 + (1 - wp0) * step / wp
    else:       p = (step - wp) / (max_it - 1 - wp); 1 if p < 0.05 else wpe + (1 - wpe) * (1 - p) / 0.95

  with wp = warmup_steps, max_it = total_steps, wp0 = warmup_from, wpe = end_ratio (float32 here; upstream
  evaluates it in Python floats).
  """
  step = jnp.asarray(step, jnp.float32)
  wp, last = float(warmup_steps), float(total_steps - 1 - warmup_steps)
  ramp = warmup_from + (1.0 - warmup_from) * step / max(wp, 1.0)
  passed = (step - wp) / last
  decay = end_ratio + (1.0 - end_ratio) * (1.0 - passed) / (1.0 - LIN0_FLAT)
  after = jnp.where(passed < LIN0_FLAT, 1.0, decay)
  return jnp.where(step < wp, ramp, after) if warmup_steps > 0 else after


def make_schedule(cfg) -> optax.Schedule:
  """The learning rate as a function of the driver step.

  'none': linear warm-up from warmup_from * lr to lr over `warmup_steps`, then constant (EDM's ramp-up from
  0 by default); 'rsqrt': the same warm-up, then EDM2's 1/sqrt(step / ref_steps) decay after `ref_steps`;
  'lin0': VAR's warm-up, flat part and linear decay to end_ratio * lr (`lin0_factor`).
  """
  warm = int(cfg.warmup_steps)
  if warm < 0:
    raise ValueError(f"optim.warmup_steps must be >= 0, got {warm}")
  decay = _get(cfg, "decay", "none")
  if decay not in DECAYS:
    raise ValueError(f"optim.decay={decay!r} must be one of {DECAYS}")
  start = float(_get(cfg, "warmup_from", 0.0))
  lr = cfg.lr

  if decay == "lin0":
    total, end = int(_get(cfg, "total_steps", 0)), float(_get(cfg, "end_ratio", 0.0))
    if total - 1 - warm <= 0:
      raise ValueError(f"optim.total_steps ({total}) must exceed optim.warmup_steps + 1 ({warm + 1}) for 'lin0'")
    return lambda step: lr * lin0_factor(step, warmup_steps=warm, total_steps=total, warmup_from=start,
                                         end_ratio=end)

  def schedule(step):
    if warm > 0 and start:
      s = jnp.asarray(step, jnp.float32)
      ramp = lr * jnp.where(s < warm, start + (1.0 - start) * s / warm, 1.0)
    else:
      ramp = optax.linear_schedule(0.0, lr, warm)(step) if warm > 0 else lr
    if decay == "rsqrt":
      ref = max(int(_get(cfg, "ref_steps", 1)), 1)
      ramp = ramp / jnp.sqrt(jnp.maximum(step / ref, 1.0))
    return ramp

  return schedule


def optimizer_schedule(cfg) -> optax.Schedule:
  """The schedule as a function of the optimizer's own count k: make_schedule at driver step
  k * accumulate + accumulate - 1 (the last micro-step of the k-th accumulation)."""
  schedule, k = make_schedule(cfg), int(_get(cfg, "accumulate", 1))
  if k == 1:
    return schedule
  return lambda count: schedule(count * k + (k - 1))


# --- weight decay mask ---------------------------------------------------------------------------------------

def path_name(path) -> str:
  """A jax key path as 'a/b/0/c' (dict keys, attribute names and sequence indices)."""
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def decays(name: str, shape: Sequence[int], no_decay_keys: Sequence[str] = ()) -> bool:
  """VAR's rule (utils/lr_control.py `filter_params`): a parameter is decayed unless it has fewer than 2
  dimensions, its name ends with 'bias', or one of `no_decay_keys` is a substring of its name."""
  if len(shape) < 2 or name.endswith("bias"):
    return False
  return not any(k in name for k in no_decay_keys)


def decay_mask(params, no_decay_keys: Sequence[str] = (),
               predicate: Optional[Callable[[str, Tuple[int, ...]], bool]] = None):
  """A pytree of bools like `params`: True where weight decay applies. `predicate(path, shape)` (path as
  'a/b/c') replaces the name rule `decays` when given (a family's own rule)."""
  rule = predicate or (lambda name, shape: decays(name, shape, no_decay_keys))
  return jax.tree_util.tree_map_with_path(lambda path, x: bool(rule(path_name(path), tuple(x.shape))), params)


# --- clipping --------------------------------------------------------------------------------------------------

def clip_by_global_norm_torch(max_norm: float, eps: float = 1e-6) -> optax.GradientTransformation:
  """torch.nn.utils.clip_grad_norm_'s rule: grads * min(1, max_norm / (global_norm + eps))."""

  def update(updates, state, params=None):
    del params
    norm = optax.tree.norm(updates)
    scale = jnp.minimum(1.0, max_norm / (norm + eps))
    return jax.tree.map(lambda g: (g * scale).astype(g.dtype), updates), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


# --- the optimizer ---------------------------------------------------------------------------------------------

def make_optimizer(cfg, decay_predicate: Optional[Callable[[str, Tuple[int, ...]], bool]] = None
                   ) -> optax.GradientTransformation:
  """The optimizer of `config.optim` (keys in the module docstring). `decay_predicate(path, shape)` replaces
  the `no_decay_keys` name rule for which parameters AdamW decays."""
  name = cfg.name
  if name not in NAMES:
    raise ValueError(f"optim.name={name!r}: only {NAMES} are supported")
  if not cfg.lr > 0:
    raise ValueError(f"optim.lr must be > 0, got {cfg.lr}")
  wd = float(_get(cfg, "weight_decay", 0.0))
  if wd < 0 or (wd and name != "adamw"):
    raise ValueError(f"optim.weight_decay={wd} needs optim.name='adamw' and a value >= 0")
  accumulate = int(_get(cfg, "accumulate", 1))
  if accumulate < 1:
    raise ValueError(f"optim.accumulate must be >= 1, got {accumulate}")
  schedule = optimizer_schedule(cfg)
  parts = []
  clip, clip_eps = float(_get(cfg, "clip_norm", 0.0) or 0.0), float(_get(cfg, "clip_eps", 0.0) or 0.0)
  if clip:
    parts.append(clip_by_global_norm_torch(clip, clip_eps) if clip_eps else optax.clip_by_global_norm(clip))
  if name == "adam":
    parts.append(optax.adam(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps))
  else:
    keys = tuple(_get(cfg, "no_decay_keys", ()) or ())
    parts.append(optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd,
                             mask=lambda params: decay_mask(params, keys, decay_predicate)))
  tx = optax.chain(*parts)
  if accumulate > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=accumulate).gradient_transformation()
  return tx
