"""Strictly class-balanced labels as NVlabs/DDO's `EDM2_sample.py` assigns them.

Upstream makes the label list `arange(label_dim).repeat(n // label_dim)` for a seed list of length n and
splits it into the same batches as the seeds, so when n is a multiple of label_dim the seed at position p
of the seed list gets class p mod label_dim, whatever the seed's value, the batch size or the number of
processes. Every class then gets exactly n / label_dim samples, which is what its FID evaluation relies on.

When n is not a multiple of label_dim upstream breaks: there are only label_dim * (n // label_dim)
labels, a batch can get fewer label rows than seeds, and the network call then fails or silently
broadcasts one row (its CLI default seeds 16-19 get no labels at all). Here every position gets a label
by the same rule, p mod label_dim: the labels are upstream's label list, extended cyclically to cover
every seed, so the classes stay as balanced as n allows (the first n mod label_dim classes get one sample
more) and each seed's label still depends only on its position, never on the batching or device layout.
`class_idx` gives every sample that class (upstream's `--class`).
"""
from typing import Optional

import jax.numpy as jnp
import numpy as np


def balanced_classes(positions, label_dim: int, class_idx: Optional[int] = None):
  """Class index of the seed at each position of the seed list: position mod label_dim (or class_idx).

  positions: int array (numpy or jax, any shape), the index of each sample in the seed list (0, 1, ...);
  works inside jit, so a sharded sampler can compute a sample's label from its position.
  """
  if label_dim < 1:
    raise ValueError(f"label_dim must be >= 1 for class labels, got {label_dim}")
  if class_idx is not None:
    if not 0 <= class_idx < label_dim:
      raise ValueError(f"class_idx {class_idx} is not in [0, {label_dim})")
    return positions * 0 + class_idx
  return positions % label_dim


def balanced_labels(num_seeds: int, label_dim: int, class_idx: Optional[int] = None) -> np.ndarray:
  """Class of every seed of a seed list of length num_seeds (int64 numpy [num_seeds])."""
  return np.asarray(balanced_classes(np.arange(num_seeds, dtype=np.int64), label_dim, class_idx))


def one_hot_labels(classes, label_dim: int):
  """float32 one-hot [..., label_dim] (upstream's eye(label_dim)[classes]); jax or numpy input -> jax."""
  return jnp.eye(label_dim, dtype=jnp.float32)[classes]
