"""EDM2's pixel <-> latent encoders (NVlabs/edm2 training/encoders.py), NHWC, as pure JAX functions.

EDM2 distinguishes raw pixels (uint8, 3 channels), raw latents (what a dataset stores) and final latents
(what the network sees); decoding goes from final latents straight back to uint8 pixels
(docs/ARCHITECTURES.md §3.7):

* `StandardRGBEncoder` (img64): raw latents are the pixels; final latents are `x / 127.5 - 1`; decoding is
  `clip(x * 127.5 + 128, 0, 255)` converted to uint8 by truncation.
* `StabilityVAEEncoder` (img512, the SD VAE `stabilityai/sd-vae-ft-mse`): pixels / 255 (so the VAE sees
  [0, 1], not [-1, 1]) go through the VAE encoder; raw latents are cat[mean, std] (2 * 4 channels); final
  latents are `(mean + noise * std) * scale + bias` per channel, with `scale = f32(final_std) /
  f32(raw_std)` and `bias = f32(final_mean) - f32(raw_mean) * scale` computed in numpy float32 as upstream;
  decoding is `(x - bias) / scale` -> VAE decoder -> `clamp(0, 1) * 255` -> uint8 (truncation).

Arrays are NHWC: pixels [B, H, W, 3] uint8, latents [B, h, w, C] float32. The VAE is the Flax module of
`ddo_jax.nets.sd_vae`; its parameters are passed to each call (`ddo_jax.convert.sd_vae` reads them from a
diffusers folder). Upstream runs the VAE `batch_size` images at a time to bound memory; here the batch is
split the same way with `jax.lax.map` (each image's result does not depend on the others).
"""
from typing import Any, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.nets import sd_vae

Array = Any

# StabilityVAEEncoder constructor defaults (NVlabs/edm2 training/encoders.py).
STABILITY_DEFAULTS = dict(vae_name="stabilityai/sd-vae-ft-mse", raw_mean=(5.81, 3.25, 0.12, -2.15),
                          raw_std=(4.17, 4.62, 3.71, 3.28), final_mean=0, final_std=0.5, batch_size=8)


def true_divide(x: Array, divisor) -> Array:
  """x / divisor rounded as IEEE division (as torch does on CPU), for a divisor that broadcasts against x.

  XLA rewrites a division by a broadcast value into a multiplication by its reciprocal, which is off by one
  ulp for about half of all inputs (e.g. pixels / 127.5). Adding x * 0 (which XLA does not fold for floats)
  makes the divisor a full array, so a true elementwise division remains. Non-finite x gives NaN.
  """
  x = jnp.asarray(x)
  return x / (jnp.asarray(divisor, x.dtype) + x * 0)


def _to_uint8(x: Array) -> Array:
  """float -> uint8 as torch's .to(torch.uint8) for values already in [0, 255]: truncation toward zero."""
  return jnp.trunc(x).astype(jnp.uint8)


class StandardRGBEncoder:
  """Pixels in [0, 255] <-> latents in [-1, 1]; no parameters (the `params` arguments are ignored)."""
  num_latent_channels = 3

  def encode_pixels(self, params, pixels: Array) -> Array:
    del params
    return pixels

  def encode_latents(self, raw: Array, key: Optional[jax.Array] = None, noise: Optional[Array] = None) -> Array:
    del key, noise
    return true_divide(raw.astype(jnp.float32), np.float32(127.5)) - np.float32(1)

  def encode(self, params, pixels: Array, key: Optional[jax.Array] = None) -> Array:
    return self.encode_latents(self.encode_pixels(params, pixels), key)

  def decode_float(self, params, latents: Array) -> Array:
    del params
    return latents.astype(jnp.float32) * np.float32(127.5) + np.float32(128)

  def decode(self, params, latents: Array) -> Array:
    return _to_uint8(jnp.clip(self.decode_float(params, latents), 0, 255))


def stability_constants(raw_mean: Sequence[float], raw_std: Sequence[float], final_mean: float = 0,
                        final_std: float = 0.5):
  """(scale, bias) float32 [C] exactly as upstream's numpy float32 arithmetic gives them."""
  scale = np.float32(final_std) / np.asarray(raw_std, dtype=np.float32)
  bias = np.float32(final_mean) - np.asarray(raw_mean, dtype=np.float32) * scale
  return scale.astype(np.float32), bias.astype(np.float32)


class StabilityVAEEncoder:
  """EDM2's StabilityVAEEncoder on the Flax SD VAE; `params` below is the VAE's 'params' collection.

  Build with `StabilityVAEEncoder(vae)` (upstream's default statistics), `StabilityVAEEncoder(vae,
  raw_mean=..., raw_std=..., final_mean=..., final_std=...)`, or from the scale / bias an EDM2 pickle
  stores: `StabilityVAEEncoder.from_state(vae, encoder_state)`.
  """

  def __init__(self, vae: sd_vae.AutoencoderKL, raw_mean=STABILITY_DEFAULTS["raw_mean"],
               raw_std=STABILITY_DEFAULTS["raw_std"], final_mean=STABILITY_DEFAULTS["final_mean"],
               final_std=STABILITY_DEFAULTS["final_std"], batch_size: int = STABILITY_DEFAULTS["batch_size"],
               vae_name: str = STABILITY_DEFAULTS["vae_name"], scale=None, bias=None):
    self.vae = vae
    self.vae_name = vae_name
    self.batch_size = int(batch_size)
    if (scale is None) != (bias is None):
      raise ValueError("StabilityVAEEncoder: give both scale and bias, or neither")
    if scale is None:
      scale, bias = stability_constants(raw_mean, raw_std, final_mean, final_std)
    self.scale = np.asarray(scale, np.float32).reshape(-1)
    self.bias = np.asarray(bias, np.float32).reshape(-1)
    if self.scale.shape != (vae.latent_channels,) or self.bias.shape != (vae.latent_channels,):
      raise ValueError(f"StabilityVAEEncoder: scale {self.scale.shape} and bias {self.bias.shape} must have "
                       f"one entry per latent channel ({vae.latent_channels})")

  @classmethod
  def from_state(cls, vae: sd_vae.AutoencoderKL, state: Mapping[str, Any]) -> "StabilityVAEEncoder":
    """From the attributes an EDM2 pickle stores for its encoder: `scale`, `bias`, `batch_size`, `vae_name`."""
    return cls(vae, scale=state["scale"], bias=state["bias"],
               batch_size=int(state.get("batch_size", STABILITY_DEFAULTS["batch_size"])),
               vae_name=str(state.get("vae_name", STABILITY_DEFAULTS["vae_name"])))

  @property
  def num_latent_channels(self) -> int:
    return int(self.vae.latent_channels)

  def _batched(self, fn, x: Array) -> Array:
    """fn over `batch_size` images at a time (the last chunk zero-padded; padding rows are dropped)."""
    n, bs = x.shape[0], self.batch_size
    if bs <= 0 or n <= bs:
      return fn(x)
    chunks = -(-n // bs)
    pad = chunks * bs - n
    xp = jnp.concatenate([x, jnp.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    y = jax.lax.map(fn, xp.reshape((chunks, bs) + x.shape[1:]))
    return y.reshape((chunks * bs,) + y.shape[2:])[:n]

  def encode_pixels(self, params, pixels: Array) -> Array:
    """uint8 pixels [B, H, W, 3] -> raw latents cat[mean, std] [B, h, w, 2 * latent_channels]."""
    def run(x):
      x = true_divide(x.astype(jnp.float32), np.float32(255))
      moments = self.vae.apply({"params": params}, x, method="encode")
      mean, _, std = sd_vae.posterior(moments)
      return jnp.concatenate([mean, std], axis=-1)
    return self._batched(run, pixels)

  def encode_latents(self, raw: Array, key: Optional[jax.Array] = None, noise: Optional[Array] = None) -> Array:
    """Raw latents -> final latents (mean + noise * std) * scale + bias; noise ~ N(0, 1) from `key` unless given."""
    mean, std = jnp.split(raw.astype(jnp.float32), 2, axis=-1)
    if noise is None:
      if key is None:
        raise ValueError("StabilityVAEEncoder.encode_latents: pass a PRNG key or the noise")
      noise = jax.random.normal(key, mean.shape, jnp.float32)
    x = mean + noise.astype(jnp.float32) * std
    return x * jnp.asarray(self.scale) + jnp.asarray(self.bias)

  def encode(self, params, pixels: Array, key: Optional[jax.Array] = None,
             noise: Optional[Array] = None) -> Array:
    return self.encode_latents(self.encode_pixels(params, pixels), key, noise)

  def decoder_input(self, latents: Array) -> Array:
    """(x - bias) / scale: final latents back to the VAE's latent scale."""
    return true_divide(latents.astype(jnp.float32) - jnp.asarray(self.bias), self.scale)

  def decode_float(self, params, latents: Array) -> Array:
    """Final latents -> the VAE decoder's float output [B, H, W, 3] (before clamping)."""
    def run(z):
      return self.vae.apply({"params": params}, z, method="decode")
    return self._batched(run, self.decoder_input(latents))

  def decode(self, params, latents: Array) -> Array:
    """Final latents -> uint8 pixels: clamp(0, 1) * 255, truncated."""
    return _to_uint8(jnp.clip(self.decode_float(params, latents), 0, 1) * np.float32(255))
