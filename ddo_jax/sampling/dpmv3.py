"""Training-free DPM-Solver-v3 of NVlabs/DDO's `EDM2_sample.py --dpmv3`, as one jitted `lax.scan`.

Upstream (Zheng et al., DPM-Solver-v3) builds `DPM_Solver_v3(250, NoiseScheduleEDM(), steps=N,
t_start=sigma_max, t_end=sigma_min, skip_type="edm")` and calls `sample(order=2, p_pseudo=False,
use_corrector=True, c_pseudo=False, lower_order_final=True)`. With the "training-free" statistics
(l = 1, s = b = 0, so S = B = C = 0) and the EDM schedule (alpha = 1, sigma = t, lambda = -log t) the
solver reduces to, for a step from s to t with f = t eps - x (= -D up to rounding):

    x_t = exp(L_s - L_t) x_s - exp(-L_t) (I_t - I_s) f_s
          - exp(L_s - L_t) c2(s, t) (f_1 - f_s) / (lambda_1 - lambda_s)        (order 2 only)

where L, I are trapezoid cumulative integrals on a 251-point logSNR grid and c2 the trapezoid integral
of exp(L - L_s) (lambda - lambda_s) from s to t (`dpmv3_tables`). The time steps are EDM's rho-7 sigmas
snapped to that grid (`dpmv3_timesteps`). Step k = 1..N calls the network once at timesteps[k-1]; from
k = 3 on, the order-2 corrector first rewrites the state at timesteps[k-1] (no new network call: the
stored eps is adjusted so that the denoised value stays the same); then the multistep predictor goes to
timesteps[k] with order min(k, 2, N + 1 - k). The result is the state at timesteps[N] = sigma_min, with
no final denoising.

Everything that depends only on the step count (the grid, the snapped time steps, every coefficient) is
computed once on the host in numpy, reproducing upstream's float32/float64 mix where it matters: the
time steps are float32 values (the network sees them exactly), and the lambdas of the order-2 divided
differences are -log of the float32 times computed in float32. The per-sample arithmetic runs in the
dtype of `noise`'s state (see `dpmv3_sample`); upstream keeps float64 states around the float32 net.
"""
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.sampling.heun import guided_denoiser

STATISTICS_STEPS = 250   # upstream's grid: 250 intervals, 251 logSNR points


def _exp_f32(x) -> np.ndarray:
  """float32 exp, correctly rounded (via float64): what torch's float32 exp gives almost everywhere."""
  return np.exp(np.asarray(x, np.float64)).astype(np.float32)


def _log_f32(x) -> np.ndarray:
  """float32 log, correctly rounded (via float64)."""
  return np.log(np.asarray(x, np.float64)).astype(np.float32)


def _torch_linspace_f32(start: np.float32, end: np.float32, steps: int) -> np.ndarray:
  """torch.linspace(start, end, steps) in float32 as its scalar CPU loop computes it: start + step*i in
  the first half, end - step*(steps-1-i) in the second, step = (end - start) / (steps - 1) in float32.

  torch's vectorized loop forms some interior points as base + k*step instead, which CPU builds round
  differently: interior points can differ from torch's by a float32 ulp (the end points are exact).
  """
  start, end = np.float32(start), np.float32(end)
  step = (end - start) / np.float32(steps - 1)
  i = np.arange(steps)
  first = start + step * i.astype(np.float32)
  second = end - step * (steps - 1 - i).astype(np.float32)
  return np.where(i < steps // 2, first, second).astype(np.float32)


def _trapezoid_cumsum_exp(a: np.ndarray, x: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Upstream's weighted_cumsumexp_trapezoid (float64): y_0 = 0,
  y_n = sum_{i<=n} (x_i - x_{i-1}) (b_i e^a_i + b_{i-1} e^a_{i-1}) / 2, with the max of a factored out."""
  a_max = np.max(a)
  tmp = b * np.exp(a - a_max)
  out = np.cumsum(0.5 * (x[1:] - x[:-1]) * (tmp[1:] + tmp[:-1]))
  out = out * np.exp(a_max)
  return np.concatenate([np.zeros([1]), out])


class DPMv3Tables(NamedTuple):
  """The solver's statistics on its logSNR grid (float64 numpy, [statistics_steps + 1] each).

  ts: lambda_i = -log t_i; L, I: the trapezoid integrals of l = 1 and exp(L) (training-free statistics);
  lambda_T = ts[0] (at sigma_max), lambda_0 = ts[-1] (at sigma_min).
  """
  ts: np.ndarray
  L: np.ndarray
  I: np.ndarray
  lambda_T: float
  lambda_0: float


def dpmv3_tables(sigma_min: float = 0.002, sigma_max: float = 80.0,
                 statistics_steps: int = STATISTICS_STEPS) -> DPMv3Tables:
  """The statistics upstream computes in `DPM_Solver_v3.__init__` (l = 1, s = b = 0).

  The grid is upstream's: lambda endpoints -log(float32 t) in float32, a float32 linspace, t = exp(-lambda)
  in float32, then ts = -log(t) in float64.
  """
  lam_T = -_log_f32(np.float32(sigma_max))
  lam_0 = -_log_f32(np.float32(sigma_min))
  grid_t = _exp_f32(-_torch_linspace_f32(lam_T, lam_0, statistics_steps + 1)).astype(np.float64)
  ts = -np.log(grid_t)
  L = _trapezoid_cumsum_exp(np.zeros_like(ts), ts, np.ones_like(ts))
  I = _trapezoid_cumsum_exp(L, ts, np.ones_like(ts))
  return DPMv3Tables(ts=ts, L=L, I=I, lambda_T=float(ts[0]), lambda_0=float(ts[-1]))


def dpmv3_timesteps(num_steps: int, tables: DPMv3Tables, statistics_steps: int = STATISTICS_STEPS,
                    rho: float = 7.0):
  """(indexes int64 [N+1], timesteps float64 [N+1], t_unsnapped float64 [N+1]) as upstream's skip_type='edm'.

  Karras rho-7 sigmas between exp(-lambda_0) and exp(-lambda_T) (float64), their lambdas rounded to float32,
  grid indexes round(n (lambda - lambda_T) / (lambda_0 - lambda_T)) in float32 (half to even), and the
  snapped times exp(-(lambda_T + (lambda_0 - lambda_T) idx / n)) in float32, widened.
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  lam_T, lam_0 = tables.lambda_T, tables.lambda_0
  sigma_min, sigma_max = np.exp(-lam_0), np.exp(-lam_T)
  ramp = np.linspace(0, 1, num_steps + 1)
  sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  lambdas = (-np.log(sigmas)).astype(np.float32)
  t_unsnapped = _exp_f32(-lambdas).astype(np.float64)
  n = np.float32(statistics_steps)
  idx = np.rint(n * (lambdas - np.float32(lam_T)) / np.float32(lam_0 - lam_T)).astype(np.int64)
  snapped = np.float32(lam_T) + np.float32(lam_0 - lam_T) * idx.astype(np.float32) / n
  timesteps = _exp_f32(-snapped.astype(np.float32)).astype(np.float64)
  return idx, timesteps, t_unsnapped


def exp_coefficient_order2(tables: DPMv3Tables, i_s: int, i_t: int) -> float:
  """c2(s, t): trapezoid integral of exp(L - L_s) (lambda - lambda_s) over grid points i_s..i_t (float64)."""
  a = tables.L[i_s:i_t + 1] - tables.L[i_s]
  x = tables.ts[i_s:i_t + 1]
  b = x - tables.ts[i_s]
  a_max = np.max(a)
  tmp = b * np.exp(a - a_max)
  return float(np.sum(0.5 * (x[1:] - x[:-1]) * (tmp[1:] + tmp[:-1])) * np.exp(a_max))


def _lambda_f32(t: float) -> float:
  """Upstream's marginal_lambda of a time held in a float32 tensor: -log computed in float32, widened."""
  return float(-_log_f32(np.float32(t)))


def dpmv3_plan(num_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0,
               statistics_steps: int = STATISTICS_STEPS) -> dict:
  """Every per-step constant of the solver (float64 numpy arrays [N], flags bool [N]) and the schedule.

  Keys: indexes, timesteps, t_unsnapped ([N+1]); t (time of step k's network call), t_prev (the previous
  call's); corrector (bool) and c_a, c_c, c_k2, c_inv (its coefficients, state at t_prev -> t);
  order2 (bool) and p_a, p_c, p_k2, p_inv (the predictor's, t -> timesteps[k]);
  exp_coeffs {(i_s, i_t, 2): c2}.
  """
  tables = dpmv3_tables(sigma_min, sigma_max, statistics_steps)
  idx, times, t_unsnapped = dpmv3_timesteps(num_steps, tables, statistics_steps)
  L, I = tables.L, tables.I
  n = num_steps
  plan = {k: np.zeros([n]) for k in ("t", "t_prev", "c_a", "c_c", "c_k2", "c_inv",
                                     "p_a", "p_c", "p_k2", "p_inv")}
  plan["corrector"] = np.zeros([n], bool)
  plan["order2"] = np.zeros([n], bool)
  exp_coeffs = {}

  def coeffs(i_s, i_t, t_s, t_1, order):
    """(a, c, k2, inv_dl) of the update from grid point i_s to i_t; point 1 at time t_1 (order 2)."""
    a = float(np.exp(L[i_s] - L[i_t]))
    c = float(np.exp(-L[i_t]) * (I[i_t] - I[i_s]))
    if order < 2:
      return a, c, 0.0, 0.0
    key = (int(i_s), int(i_t), 2)
    if key not in exp_coeffs:
      exp_coeffs[key] = exp_coefficient_order2(tables, i_s, i_t)
    k2 = float(np.exp(L[i_s] - L[i_t]) * exp_coeffs[key])
    inv_dl = float(1.0 / (_lambda_f32(t_1) - _lambda_f32(t_s)))   # torch.linalg.inv of the 1x1 system
    return a, c, k2, inv_dl

  prev_order = 0
  for step in range(1, n + 1):
    k = step - 1
    plan["t"][k] = times[k]
    plan["t_prev"][k] = times[k - 1] if k > 0 else 1.0
    if prev_order > 1:   # corrector of the state at times[k] from times[k-1], point 1 = the new state
      plan["corrector"][k] = True
      (plan["c_a"][k], plan["c_c"][k], plan["c_k2"][k], plan["c_inv"][k]) = coeffs(
          idx[k - 1], idx[k], times[k - 1], times[k], 2)
    order = min(step, 2, n + 1 - step)
    plan["order2"][k] = order == 2
    (plan["p_a"][k], plan["p_c"][k], plan["p_k2"][k], plan["p_inv"][k]) = coeffs(
        idx[k], idx[k + 1], times[k], times[k - 1] if k > 0 else times[k], order)
    prev_order = order
  plan.update(indexes=idx, timesteps=times, t_unsnapped=t_unsnapped, exp_coeffs=exp_coeffs)
  return plan


def dpmv3_sample(denoise: Callable, noise: jax.Array, labels: Optional[jax.Array] = None, *,
                 guide: Optional[Callable] = None, guidance: float = 1.0, num_steps: int = 25,
                 sigma_min: float = 0.002, sigma_max: float = 80.0,
                 statistics_steps: int = STATISTICS_STEPS, return_trajectory: bool = False):
  """DPM-Solver-v3 (order 2, corrector, lower order final, training-free statistics) from `noise`.

  Signature: dpmv3_sample(denoise, noise, labels=None, *, guide=None, guidance=1.0, num_steps=25,
                          sigma_min=0.002, sigma_max=80.0, statistics_steps=250, return_trajectory=False)

  Args:
    denoise: (x float32 [B, ...], sigma float32 [B], labels) -> D float32 [B, ...] (an EDM2 Precond
      closed over its parameters, say). Called num_steps times.
    noise: standard normal [B, ...]. The first network input is float32(noise) * float32(sigma_max) as
      upstream; the solver's state then runs in noise's dtype: float64 noise (inside
      `jax.enable_x64(True)`) gives upstream's float64 solver, float32 a float32 one.
    labels: passed to `denoise` (and `guide`) unchanged, e.g. one-hot [B, label_dim] or None.
    guide, guidance: autoguidance, D = lerp(guide(x), denoise(x), guidance) in float32 as upstream's
      `D_gnet.lerp(D, g)`; guidance == 1 never calls `guide` (a Python float, static).
    num_steps, sigma_min, sigma_max, statistics_steps: upstream's `--steps` (its README uses 25),
      the time range and the 250-interval logSNR grid the time steps are snapped to.
    return_trajectory: also return {'timesteps', 'model_x' [N, B, ...], 'D' [N, B, ...] (float32),
      'x_cached' [N, B, ...]} (state at each call, denoiser output, state after the corrector).

  Returns:
    The state at timesteps[N] (= sigma_min, not denoised), in the state dtype; the trajectory if asked.

  Pure and traceable: jit it (the plan is built on the host at trace time), and shard the batch freely.
  """
  dtype = noise.dtype
  batch = noise.shape[0]
  plan = dpmv3_plan(num_steps, sigma_min, sigma_max, statistics_steps)
  den = guided_denoiser(denoise, guide, guidance)
  per_step = {k: jnp.asarray(plan[k], dtype) for k in ("t", "t_prev", "c_a", "c_c", "c_k2", "c_inv",
                                                        "p_a", "p_c", "p_k2", "p_inv")}
  per_step["corrector"] = jnp.asarray(plan["corrector"])
  per_step["order2"] = jnp.asarray(plan["order2"])
  bshape = (batch,) + (1,) * (noise.ndim - 1)

  def step(carry, s):
    x, x_prev, eps_prev = carry
    t = s["t"]
    d = den(x.astype(jnp.float32), jnp.full([batch], t, jnp.float32), labels)
    eps = (x - d.astype(dtype)) / jnp.broadcast_to(t, bshape)
    f_prev = s["t_prev"] * eps_prev - x_prev
    # Corrector: the state at t from the one at t_prev, with both model outputs; eps keeps D unchanged.
    f_cur = t * eps - x
    x_c = s["c_a"] * x_prev - s["c_c"] * f_prev
    x_c = x_c - s["c_k2"] * (s["c_inv"] * (f_cur - f_prev))
    eps_c = (f_cur + x_c) / jnp.broadcast_to(t, bshape)
    x_kept = jnp.where(s["corrector"], x_c, x)
    eps = jnp.where(s["corrector"], eps_c, eps)
    # Multistep predictor to the next time step (order 2 uses the previous state as point 1).
    f_cur = t * eps - x_kept
    x_next = s["p_a"] * x_kept - s["p_c"] * f_cur
    x_next = jnp.where(s["order2"], x_next - s["p_k2"] * (s["p_inv"] * (f_prev - f_cur)), x_next)
    out = (x, d, x_kept) if return_trajectory else None
    return (x_next, x_kept, eps), out

  x0 = (noise.astype(jnp.float32) * np.float32(sigma_max)).astype(dtype)
  zeros = jnp.zeros_like(x0)
  x_final, traj = jax.lax.scan(step, (x0, zeros, zeros), per_step)
  x_final = x_final[0]
  if not return_trajectory:
    return x_final
  model_x, d, x_cached = traj
  return x_final, {"timesteps": jnp.asarray(plan["timesteps"], dtype), "model_x": model_x, "D": d,
                   "x_cached": x_cached}
