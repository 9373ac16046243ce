"""Toy diffusion family: an MLP denoiser with EDM preconditioning on a 2-D mixture of Gaussians.

The ground truth is known in closed form, so sample quality is measured exactly: sliced Wasserstein
distance to fresh data, and precision/recall of modes. A deliberately small network, pretrained by
maximum likelihood (EDM's denoising loss), spreads mass between the modes; DDO rounds pull it back.
"""
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.data import pipeline
from ddo_jax.families import diffusion
from ddo_jax.families.base import Family
from ddo_jax.nets.mlp_denoiser import MLPDenoiser
from ddo_jax.sampling.heun import heun_sample


@dataclasses.dataclass(frozen=True)
class Mixture:
  """K isotropic Gaussians with equal weights, centres evenly spaced on a circle."""
  num_modes: int = 8
  radius: float = 1.0
  std: float = 0.05

  @property
  def centers(self) -> np.ndarray:
    angle = 2 * np.pi * np.arange(self.num_modes) / self.num_modes
    return self.radius * np.stack([np.cos(angle), np.sin(angle)], axis=-1).astype(np.float32)

  @property
  def sigma_data(self) -> float:
    """Per-coordinate standard deviation of the mixture."""
    return float(math.sqrt(self.radius ** 2 / 2 + self.std ** 2))

  def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
    k = rng.integers(0, self.num_modes, size=n)
    return (self.centers[k] + self.std * rng.standard_normal((n, 2))).astype(np.float32)


def sliced_wasserstein(a: np.ndarray, b: np.ndarray, num_projections: int = 256, seed: int = 0) -> float:
  """Sliced 1-Wasserstein distance between two equal-size point sets (fixed projections)."""
  if a.shape != b.shape:
    raise ValueError(f"sliced_wasserstein needs equal-size sets, got {a.shape} and {b.shape}")
  rng = np.random.default_rng(seed)
  directions = rng.standard_normal((a.shape[1], num_projections))
  directions /= np.linalg.norm(directions, axis=0, keepdims=True)
  pa = np.sort(a.astype(np.float64) @ directions, axis=0)
  pb = np.sort(b.astype(np.float64) @ directions, axis=0)
  return float(np.mean(np.abs(pa - pb)))


def mode_metrics(x: np.ndarray, mixture: Mixture, num_std: float = 3.0) -> dict:
  """Precision: share of samples within num_std std of a centre. Recall: share of modes holding at
  least half of their fair share (1/K) of the samples."""
  d = np.linalg.norm(x[:, None, :] - mixture.centers[None], axis=-1)
  nearest = d.argmin(axis=1)
  close = d.min(axis=1) <= num_std * mixture.std
  precision = float(close.mean())
  counts = np.bincount(nearest[close], minlength=mixture.num_modes) / len(x)
  recall = float(np.mean(counts >= 0.5 / mixture.num_modes))
  return {"precision": precision, "recall": recall}


class ToyDiffusion(Family):
  """The toy diffusion family. See the module docstring; `config` is configs/toy_diffusion.py's `model`."""
  name = "toy_diffusion"
  metric_mode = "min"

  def __init__(self, config):
    super().__init__(config)
    self.mixture = Mixture(config.num_modes, config.radius, config.mode_std)
    self.sigma_data = self.mixture.sigma_data
    self.net = MLPDenoiser(features=tuple(config.features), sigma_data=self.sigma_data,
                           num_freqs=config.num_freqs)
    self.sample_shape = (2,)
    self.metric = "swd"

  # --- pure functions -------------------------------------------------------------------------------
  def init_params(self, rng: jax.Array) -> Any:
    x = jnp.zeros((1, 2), jnp.float32)
    return self.net.init(rng, x, jnp.ones([1]))["params"]

  def denoise(self, params, x, sigma, labels=None):
    return self.net.apply({"params": params}, x, sigma, labels)

  def pretrain_loss(self, params, batch, rng):
    c = self.config
    return diffusion.edm_denoising_loss(self.denoise, params, batch["x"], rng, P_mean=c.P_mean,
                                        P_std=c.P_std, sigma_data=self.sigma_data)

  def log_ratio(self, params, ref_params, batch, rng):
    c = self.config
    return diffusion.edm_log_ratio(self.denoise, params, ref_params, batch["real"]["x"], batch["fake"]["x"],
                                   rng, P_mean=c.P_mean, P_std=c.P_std, sigma_data=self.sigma_data)

  def sample(self, params, keys: jax.Array, seeds: jax.Array = None) -> dict:
    """One sample per key (per-seed noise), with the configured Heun sampler."""
    s = self.config.sampler
    latents = jax.vmap(lambda k: jax.random.normal(k, self.sample_shape, jnp.float32))(keys)
    x = heun_sample(lambda x, sigma, labels: self.denoise(params, x, sigma, labels), latents,
                    num_steps=s.num_steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho)
    return {"x": x}

  # --- data and evaluation (host side) --------------------------------------------------------------
  def real_source(self, seed: int):
    """The finite training set: `num_train` draws from the mixture (source, size)."""
    x = self.mixture.sample(np.random.default_rng([seed, 1]), self.config.num_train)
    return pipeline.array_source({"x": x}), len(x)

  def evaluate(self, params, sample, seed: int) -> dict:
    del params
    return self.evaluate_samples(sample(self.config.eval_samples)["x"], seed)

  def evaluate_samples(self, x: np.ndarray, seed: int) -> dict:
    fresh = self.mixture.sample(np.random.default_rng([seed, 2]), len(x))
    out = {"swd": sliced_wasserstein(x, fresh)}
    out.update(mode_metrics(x, self.mixture))
    return out

  def reference_metrics(self, seed: int) -> dict:
    """The same metrics for a fresh draw of data: the noise floor a perfect model would reach."""
    n = self.config.eval_samples
    return self.evaluate_samples(self.mixture.sample(np.random.default_rng([seed, 3]), n), seed)

  def ground_truth(self, seed: int, num: int) -> np.ndarray:
    return self.mixture.sample(np.random.default_rng([seed, 4]), num)

  def plot_samples(self, ax, x: np.ndarray, title: str) -> None:
    ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.4)
    c = self.mixture.centers
    ax.scatter(c[:, 0], c[:, 1], s=12, c="red", marker="x")
    lim = self.mixture.radius * 1.6
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
