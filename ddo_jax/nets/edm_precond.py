"""EDM preconditioning wrappers (EDMPrecond, VPPrecond, VEPrecond) around SongUNet, NHWC.

Each is a flax.linen module used as a pure function:

  D = module.apply({'params': params}, x, sigma, class_labels, augment_labels=None)

with x [B, H, W, C] float32, sigma [B] or a scalar, class_labels [B, label_dim] one-hot or None
(zeros when the net is conditional, as upstream). `raw=True` (or `method='raw'`) returns the U-Net
output F = model(c_in * x, c_noise, class_labels, augment_labels) instead of D. The formulas are those
of docs/ARCHITECTURES.md §2.4 (NVlabs/edm training/networks.py), evaluated in float32.

The params tree is {'model': <SongUNet params>}; `build_precond(config)` makes the module from a
config dict (see `ddo_jax.convert.edm_names.config_from_init_kwargs`).
"""
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from ddo_jax.nets.songunet import SongUNet

Array = Any


def _prepare(x, sigma, class_labels, label_dim):
  """float32 x, sigma as [B, 1, 1, 1], and the labels the model sees (zeros if None and conditional)."""
  x = jnp.asarray(x, jnp.float32)
  batch = x.shape[0]
  sigma = jnp.asarray(sigma, jnp.float32).reshape(-1)
  sigma = jnp.broadcast_to(sigma, (batch,)).reshape(batch, 1, 1, 1)
  if not label_dim:
    class_labels = None
  elif class_labels is None:
    class_labels = jnp.zeros((batch, label_dim), jnp.float32)
  else:
    class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, label_dim)
  return x, sigma, class_labels


class _Precond(nn.Module):
  """Shared forward: D = c_skip * x + c_out * model(c_in * x, c_noise, labels)."""

  def coefficients(self, sigma: Array):
    """(c_skip, c_out, c_in, c_noise) for sigma of shape [B, 1, 1, 1]."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, deterministic: bool = True,
               raw: bool = False) -> Array:
    x, sigma, class_labels = _prepare(x, sigma, class_labels, self.label_dim)
    c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
    f = self.model(c_in * x, c_noise.reshape(-1), class_labels, augment_labels,
                   deterministic=deterministic)
    if raw:
      return f
    return c_skip * x + c_out * f.astype(jnp.float32)

  def raw(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
          augment_labels: Optional[Array] = None, deterministic: bool = True) -> Array:
    """The raw U-Net output F (what the goldens store as `F`)."""
    return self(x, sigma, class_labels, augment_labels, deterministic=deterministic, raw=True)


class EDMPrecond(_Precond):
  """EDM preconditioning (Karras et al. 2022), sigma_data 0.5 by default."""
  model: nn.Module
  label_dim: int = 0
  sigma_min: float = 0.0
  sigma_max: float = float("inf")
  sigma_data: float = 0.5

  def coefficients(self, sigma):
    sd = self.sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / jnp.sqrt(sigma ** 2 + sd ** 2)
    c_in = 1 / jnp.sqrt(sd ** 2 + sigma ** 2)
    c_noise = jnp.log(sigma) / 4
    return c_skip, c_out, c_in, c_noise


class VPPrecond(_Precond):
  """Variance-preserving preconditioning (Song et al. 2021 DDPM++ baseline)."""
  model: nn.Module
  label_dim: int = 0
  beta_d: float = 19.9
  beta_min: float = 0.1
  M: int = 1000
  epsilon_t: float = 1e-5

  def sigma(self, t):
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1), in float32."""
    t = jnp.asarray(t, jnp.float32)
    return jnp.sqrt(jnp.exp(0.5 * self.beta_d * (t ** 2) + self.beta_min * t) - 1)

  def sigma_inv(self, sigma):
    """Inverse of `sigma(t)`, in float32."""
    sigma = jnp.asarray(sigma, jnp.float32)
    return (jnp.sqrt(self.beta_min ** 2 + 2 * self.beta_d * jnp.log(1 + sigma ** 2))
            - self.beta_min) / self.beta_d

  @property
  def sigma_min(self) -> float:
    return vp_sigma(self.epsilon_t, self.beta_d, self.beta_min)

  @property
  def sigma_max(self) -> float:
    return vp_sigma(1.0, self.beta_d, self.beta_min)

  def coefficients(self, sigma):
    c_skip = 1
    c_out = -sigma
    c_in = 1 / jnp.sqrt(sigma ** 2 + 1)
    c_noise = (self.M - 1) * self.sigma_inv(sigma)
    return c_skip, c_out, c_in, c_noise


def vp_sigma(t, beta_d: float = 19.9, beta_min: float = 0.1) -> float:
  """VP sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) as a python float.

  Evaluated in float64 (expm1), so sigma_min = sigma(1e-5) = 1.0005e-3 is accurate; upstream evaluates
  it in float32, where exp(t) - 1 cancels and the value is off in the 2nd digit. The samplers only use
  it as a lower clamp below their own sigma_min (0.002).
  """
  return float(np.sqrt(np.expm1(0.5 * beta_d * t * t + beta_min * t)))


class VEPrecond(_Precond):
  """Variance-exploding preconditioning (NCSN++ baseline); sigma in [0.02, 100]."""
  model: nn.Module
  label_dim: int = 0
  sigma_min: float = 0.02
  sigma_max: float = 100.0

  def coefficients(self, sigma):
    return 1, sigma, 1, jnp.log(0.5 * sigma)


PRECONDS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}


def plain_dict(config) -> dict:
  """A ConfigDict or Mapping as a plain dict."""
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dict(config)


def build_songunet(config: Mapping[str, Any]) -> SongUNet:
  """The SongUNet described by config['model_kwargs']."""
  kw = plain_dict(plain_dict(config)["model_kwargs"])
  for k in ("channel_mult", "attn_resolutions", "resample_filter"):
    kw[k] = tuple(kw[k])
  return SongUNet(**kw)


def build_precond(config: Mapping[str, Any]) -> _Precond:
  """The preconditioned net described by a config from `config_from_init_kwargs`.

  config: {'class_name': 'EDMPrecond' | 'VPPrecond' | 'VEPrecond', 'label_dim': int,
           'precond_kwargs': {...}, 'model_kwargs': {SongUNet kwargs}}.
  """
  config = plain_dict(config)
  cls = PRECONDS.get(config["class_name"])
  if cls is None:
    raise ValueError(f"unknown precond class {config['class_name']!r}; expected one of {list(PRECONDS)}")
  return cls(model=build_songunet(config), label_dim=int(config["label_dim"]),
             **plain_dict(config.get("precond_kwargs", {})))
