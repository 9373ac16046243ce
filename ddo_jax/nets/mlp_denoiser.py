"""A small MLP denoiser with EDM preconditioning, for low-dimensional toy data."""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


class FourierNoiseEmbedding(nn.Module):
  """sin/cos features of c_noise = ln(sigma)/4 at fixed log-spaced frequencies."""
  num_freqs: int = 8

  @nn.compact
  def __call__(self, c_noise):
    freqs = 2.0 ** jnp.arange(self.num_freqs, dtype=jnp.float32)
    angles = c_noise[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class MLPDenoiser(nn.Module):
  """D(x; sigma) = c_skip x + c_out F([c_in x, emb(c_noise)]) with EDM's c_* (Karras et al. 2022, Table 1)."""
  features: Sequence[int] = (64, 64)
  sigma_data: float = 0.5
  num_freqs: int = 8

  @nn.compact
  def __call__(self, x, sigma, labels: Optional[jax.Array] = None):
    del labels  # unconditional
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32), x.shape[:1])
    s = sigma[:, None]
    sd = self.sigma_data
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / jnp.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / jnp.sqrt(s ** 2 + sd ** 2)
    c_noise = jnp.log(sigma) / 4
    h = jnp.concatenate([c_in * x, FourierNoiseEmbedding(self.num_freqs)(c_noise)], axis=-1)
    for i, width in enumerate(self.features):
      h = nn.silu(nn.Dense(width, name=f"dense{i}")(h))
    f = nn.Dense(x.shape[-1], name="out")(h)
    return c_skip * x + c_out * f
