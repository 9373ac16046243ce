"""FID, Inception Score and k-NN precision/recall.

* `frechet_distance`: `|mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))` on the host in float64 with
  `scipy.linalg.sqrtm`, as EDM `fid.py` / EDM2 `calculate_metrics.py` / pytorch-fid. Like
  pytorch-fid (and TTUR), a non-finite square root is retried with `eps * I` added to both
  covariances, a complex result is accepted only when the imaginary part of its diagonal is
  within 1e-3 (its real part is then used), and a larger imaginary part raises.
* `inception_score`: improved-gan / OpenAI evaluator / torch-fidelity convention: softmax over
  ALL 1008 outputs of the TF graph's fc WITHOUT its bias (`pool3 @ W`, i.e. `logits_unbiased` of
  `ddo_jax.nets.inception.InceptionV3`), `exp(mean_i KL(p(y|x_i) || p(y)))` per split,
  reported as mean and std over 10 contiguous splits. The OpenAI evaluator (guided-diffusion
  `evaluator.py`) takes `softmax/logits/MatMul`'s weight and applies `tf.matmul` without bias,
  then splits into chunks of 5000 (= 10 splits for 50k samples) and reports the mean; torch-fidelity
  uses `logits_unbiased` and 10 splits. Computed here in float64 from log-softmax, so classes with
  underflowing probability give 0 instead of NaN.
* `precision_recall`: k-NN manifolds of Kynkaanniemi et al. as in the OpenAI evaluator's
  `ManifoldEstimator` (k = 3): the radius of each point is its squared Euclidean distance to
  its k-th nearest neighbour within its own set (self excluded; the evaluator takes column k of the
  sorted row, whose column 0 is the zero self-distance). A sample is "precise" if it lies within
  (<=) the radius of at least one reference point; a reference point is "recalled" if it lies
  within the radius of at least one sample. Distances are computed in JAX in blocks as
  `|u|^2 - 2 u.v + |v|^2` clamped at 0, in float32 at HIGHEST precision by default. The OpenAI
  evaluator computes them in float16 (falling back to float32 when non-finite);
  `distance_dtype=jnp.float16` imitates that (inputs rounded to float16, float32 accumulation,
  each term rounded to float16), which is close to but not guaranteed bit-equal to TF's kernels.
"""
import functools
import warnings
from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (float64, host).

  Args:
    mu1, sigma1: [D] mean and [D, D] covariance of the first set.
    mu2, sigma2: the same for the second set (the reference).
    eps: diagonal offset used when `sqrtm(sigma1 @ sigma2)` is not finite.

  Returns:
    FID as a python float.

  Raises:
    ValueError: on shape mismatch, or when the square root has a significant imaginary part.
  """
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                     f"{sigma2.shape}")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: sqrtm(sigma1 @ sigma2) is not finite (singular product); adding {eps} "
                  "to the covariance diagonals")
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError(f"FID: imaginary component {np.max(np.abs(covmean.imag))} in sqrtm")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_stats(stats, ref_stats, eps: float = 1e-6) -> float:
  """FID of two `(mu, sigma)` pairs (e.g. from `ddo_jax.metrics.stats.mean_cov`)."""
  (mu1, sigma1), (mu2, sigma2) = stats, ref_stats
  return frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)


def inception_score(logits, num_splits: int = 10) -> Tuple[float, float]:
  """Inception Score (mean, std over splits) from fc outputs [N, C].

  Pass the unbiased 1008-way logits (`InceptionV3(...)['logits_unbiased']`) to follow the
  improved-gan / OpenAI / torch-fidelity convention; see the module docstring.
  Split k is rows `[k N // num_splits, (k + 1) N // num_splits)` (improved-gan's slicing).

  Args:
    logits: [N, C] array (any float dtype; computed in float64).
    num_splits: number of contiguous splits.

  Returns:
    (mean, std) of `exp(E_x KL(p(y|x) || p(y)))` over the splits; std is the population std.
  """
  logits = np.asarray(logits, np.float64)
  n = logits.shape[0]
  if logits.ndim != 2 or n < num_splits:
    raise ValueError(f"need [N, C] logits with N >= num_splits={num_splits}, got {logits.shape}")
  shifted = logits - logits.max(axis=1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
  p = np.exp(log_p)
  scores = []
  for k in range(num_splits):
    part_p = p[k * n // num_splits:(k + 1) * n // num_splits]
    part_log_p = log_p[k * n // num_splits:(k + 1) * n // num_splits]
    with np.errstate(divide="ignore", invalid="ignore"):
      log_marginal = np.log(part_p.mean(axis=0))
      # p log(p / m) -> 0 where p underflows to 0 (also where m = 0, which implies p = 0).
      terms = np.where(part_p > 0, part_p * (part_log_p - log_marginal[None, :]), 0.0)
    kl = np.sum(terms, axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores)), float(np.std(scores))


# ---------------------------------------------------------------------------------------------
# Precision / recall (k-NN manifolds).


@functools.partial(jax.jit, static_argnames=("dtype",))
def _sq_dists(u, v, dtype=jnp.float32):
  """[len(u), len(v)] squared distances, clamped at 0 (see module docstring for float16)."""
  if dtype == jnp.float16:
    u16, v16 = u.astype(jnp.float16), v.astype(jnp.float16)
    nu = jnp.sum(jnp.square(u16.astype(jnp.float32)), axis=1).astype(jnp.float16)
    nv = jnp.sum(jnp.square(v16.astype(jnp.float32)), axis=1).astype(jnp.float16)
    uv = jnp.matmul(u16.astype(jnp.float32), v16.astype(jnp.float32).T,
                    precision=jax.lax.Precision.HIGHEST).astype(jnp.float16)
    d = (nu[:, None] - 2 * uv) + nv[None, :]
    d16 = jnp.maximum(d, jnp.float16(0))
    d32 = _sq_dists(u, v, jnp.float32)
    return jnp.where(jnp.all(jnp.isfinite(d16)), d16.astype(jnp.float32), d32)
  u, v = u.astype(jnp.float32), v.astype(jnp.float32)
  nu = jnp.sum(jnp.square(u), axis=1)
  nv = jnp.sum(jnp.square(v), axis=1)
  uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu[:, None] - 2 * uv + nv[None, :], 0.0)


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _merge_smallest(best, u, v, k, dtype):
  """Running (k+1) smallest distances per row of u after seeing the columns v."""
  d = _sq_dists(u, v, dtype)
  both = jnp.concatenate([best, d], axis=1)
  neg, _ = jax.lax.top_k(-both, k + 1)
  return -neg


def manifold_radii(features, k: int = 3, row_batch_size: int = 4096,
                   col_batch_size: int = 4096, distance_dtype=jnp.float32) -> np.ndarray:
  """Squared distance of every point to its k-th nearest neighbour in the same set [N].

  As the OpenAI evaluator: the (k+1)-th smallest entry of the point's distance row, whose smallest
  entry is its zero distance to itself.
  """
  features = np.asarray(features, np.float32)
  n = features.shape[0]
  if n <= k:
    raise ValueError(f"need more than k={k} points, got {n}")
  radii = np.empty((n,), np.float32)
  for r0 in range(0, n, row_batch_size):
    rows = jnp.asarray(features[r0:r0 + row_batch_size])
    best = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)
    for c0 in range(0, n, col_batch_size):
      best = _merge_smallest(best, rows, jnp.asarray(features[c0:c0 + col_batch_size]), k,
                             distance_dtype)
    radii[r0:r0 + rows.shape[0]] = np.asarray(best[:, k])
  return radii


@functools.partial(jax.jit, static_argnames=("dtype",))
def _within(a, radii_a, b, radii_b, dtype):
  """(a_in [len(a)]: a within some b radius, b_in [len(b)]: b within some a radius)."""
  d = _sq_dists(a, b, dtype)
  a_in = jnp.any(d <= radii_b[None, :], axis=1)
  b_in = jnp.any(d <= radii_a[:, None], axis=0)
  return a_in, b_in


def precision_recall(ref_features, sample_features, k: int = 3, row_batch_size: int = 4096,
                     col_batch_size: int = 4096, distance_dtype=jnp.float32) -> Tuple[float, float]:
  """Improved precision and recall (OpenAI evaluator `compute_prec_recall`, k = 3).

  Args:
    ref_features: [N_ref, D] reference (real) features, e.g. pool3.
    sample_features: [N_gen, D] generated features.
    k: neighbourhood size.
    row_batch_size, col_batch_size: block sizes of the distance computation.
    distance_dtype: `jnp.float32` (default) or `jnp.float16` (OpenAI-like; see module docstring).

  Returns:
    (precision, recall): fraction of samples inside the reference manifold, fraction of
    reference points inside the sample manifold.
  """
  ref = np.asarray(ref_features, np.float32)
  gen = np.asarray(sample_features, np.float32)
  radii_ref = manifold_radii(ref, k, row_batch_size, col_batch_size, distance_dtype)
  radii_gen = manifold_radii(gen, k, row_batch_size, col_batch_size, distance_dtype)
  gen_in = np.zeros((gen.shape[0],), bool)
  ref_in = np.zeros((ref.shape[0],), bool)
  for r0 in range(0, gen.shape[0], row_batch_size):
    g = jnp.asarray(gen[r0:r0 + row_batch_size])
    rg = jnp.asarray(radii_gen[r0:r0 + row_batch_size])
    for c0 in range(0, ref.shape[0], col_batch_size):
      g_in, r_in = _within(g, rg, jnp.asarray(ref[c0:c0 + col_batch_size]),
                           jnp.asarray(radii_ref[c0:c0 + col_batch_size]), distance_dtype)
      gen_in[r0:r0 + g.shape[0]] |= np.asarray(g_in)
      ref_in[c0:c0 + col_batch_size] |= np.asarray(r_in)
  return float(gen_in.mean()), float(ref_in.mean())
