"""The diffusion log-likelihood-ratio surrogate of DDO (METHOD.md §2.1-2.2), for any EDM-style denoiser.

For a batch of N real images x and N reference samples x~ (paired by index), draw one noise level per
index, ln sigma_i ~ N(P_mean, P_std^2), and one noise tensor n_i = sigma_i * eps_i, shared by the real and
the fake sample of index i and by the target and the reference network. With the EDM weighting
lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2,

    log p(x) ~= -sum_{all dims} lambda(sigma) * (D(x + n; sigma) - x)^2      (no per-dimension averaging)
    gap(x)    = log p_theta(x) - stop_gradient(log p_ref(x)).

Both networks run in float32 on one concatenated batch [real; fake] each.
"""
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp


def edm_weight(sigma: jax.Array, sigma_data: float) -> jax.Array:
  """EDM's loss weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2."""
  return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def draw_sigma_and_noise(rng: jax.Array, shape, *, P_mean: float, P_std: float):
  """One log-normal sigma per index ([N]) and one standard-normal eps tensor per index ([N, ...])."""
  k_sigma, k_eps = jax.random.split(rng)
  sigma = jnp.exp(P_mean + P_std * jax.random.normal(k_sigma, shape[:1], jnp.float32))
  eps = jax.random.normal(k_eps, shape, jnp.float32)
  return sigma, eps


def weighted_logp(denoise: Callable, params: Any, x: jax.Array, noise: jax.Array, sigma: jax.Array,
                  labels: Optional[jax.Array], sigma_data: float) -> jax.Array:
  """-sum over non-batch dims of lambda(sigma) * (D(x + noise; sigma) - x)^2, shape [N]."""
  d = denoise(params, x + noise, sigma, labels)
  w = edm_weight(sigma, sigma_data).reshape((-1,) + (1,) * (x.ndim - 1))
  return -jnp.sum(w * (d - x) ** 2, axis=tuple(range(1, x.ndim)))


def edm_log_ratio_given_noise(denoise: Callable, params: Any, ref_params: Any, x_real: jax.Array,
                              x_fake: jax.Array, sigma: jax.Array, eps: jax.Array, *,
                              labels_real: Optional[jax.Array] = None,
                              labels_fake: Optional[jax.Array] = None, sigma_data: float = 0.5):
  """Gaps (gap_real [N], gap_fake [N]) for a given sigma [N] and eps [N, ...] (shared by all four terms)."""
  if x_real.shape != x_fake.shape:
    raise ValueError(f"real and fake batches must be paired 1:1, got {x_real.shape} and {x_fake.shape}")
  n = x_real.shape[0]
  noise = sigma.reshape((-1,) + (1,) * (x_real.ndim - 1)) * eps
  x = jnp.concatenate([x_real, x_fake], axis=0)
  noise2 = jnp.concatenate([noise, noise], axis=0)
  sigma2 = jnp.concatenate([sigma, sigma], axis=0)
  if labels_real is None and labels_fake is None:
    labels = None
  else:
    labels = jnp.concatenate([labels_real, labels_fake], axis=0)
  logp_theta = weighted_logp(denoise, params, x, noise2, sigma2, labels, sigma_data)
  logp_ref = jax.lax.stop_gradient(weighted_logp(denoise, ref_params, x, noise2, sigma2, labels, sigma_data))
  gap = logp_theta - logp_ref
  return gap[:n], gap[n:]


def edm_log_ratio(denoise: Callable, params: Any, ref_params: Any, x_real: jax.Array, x_fake: jax.Array,
                  rng: jax.Array, *, P_mean: float, P_std: float, sigma_data: float,
                  labels_real: Optional[jax.Array] = None, labels_fake: Optional[jax.Array] = None):
  """Gaps for one fresh (sigma, eps) draw from `rng`; see the module docstring."""
  sigma, eps = draw_sigma_and_noise(rng, x_real.shape, P_mean=P_mean, P_std=P_std)
  return edm_log_ratio_given_noise(denoise, params, ref_params, x_real, x_fake, sigma, eps,
                                   labels_real=labels_real, labels_fake=labels_fake, sigma_data=sigma_data)


def edm_denoising_loss(denoise: Callable, params: Any, x: jax.Array, rng: jax.Array, *, P_mean: float,
                       P_std: float, sigma_data: float, labels: Optional[jax.Array] = None) -> jax.Array:
  """EDM's maximum-likelihood (pretraining) loss: mean over the batch of the weighted squared error."""
  sigma, eps = draw_sigma_and_noise(rng, x.shape, P_mean=P_mean, P_std=P_std)
  noise = sigma.reshape((-1,) + (1,) * (x.ndim - 1)) * eps
  return -jnp.mean(weighted_logp(denoise, params, x, noise, sigma, labels, sigma_data))
