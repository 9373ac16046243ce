"""Batches of real data paired 1:1 with reference samples, deterministic and checkpointable.

Index order: the example stream is the concatenation of per-epoch permutations of [0, n), epoch e
permuted by numpy's PCG64 seeded with (seed, e); batch i is stream[i*B:(i+1)*B] (batches may straddle
an epoch boundary, nothing is dropped). Batch `i` of a run is a pure function of (seed, i), so the
iterator's whole state is the position `i`; it is saved in every checkpoint and a restored run continues
with exactly the batches an uninterrupted run would have seen. (This is grain's
`MapDataset.range(n).shuffle().repeat().batch()` contract, computed with vectorised numpy: grain's
per-element random access costs ~30 ms per batch of 512, more than a toy train step.)

Each process reads only its rows of the global batch (rows [p*b, (p+1)*b) for process p with b = B / P),
so the global batch does not depend on the number of processes.
"""
from typing import Any, Callable, Mapping, Optional

import jax
import numpy as np

Source = Callable[[np.ndarray], Mapping[str, np.ndarray]]


def array_source(arrays: Mapping[str, np.ndarray]) -> Source:
  """A source over in-memory arrays with equal leading dimension."""
  n = {len(v) for v in arrays.values()}
  if len(n) != 1:
    raise ValueError(f"arrays must share their leading dimension, got {[(k, v.shape) for k, v in arrays.items()]}")
  return lambda idx: {k: v[idx] for k, v in arrays.items()}


class IndexBatches:
  """Global index batches over [0, n): epoch-wise shuffled by grain, this process's slice of each."""

  def __init__(self, num_examples: int, global_batch: int, seed: int, shuffle: bool = True):
    if num_examples < 1:
      raise ValueError("the dataset is empty")
    if global_batch % jax.process_count():
      raise ValueError(f"global batch {global_batch} is not divisible by {jax.process_count()} processes")
    self.seed, self.shuffle = seed, shuffle
    self._perms = {}
    self.num_examples = num_examples
    self.global_batch = global_batch
    self.local_batch = global_batch // jax.process_count()

  def _perm(self, epoch: int) -> np.ndarray:
    if epoch not in self._perms:
      if len(self._perms) > 2:
        self._perms.pop(min(self._perms))
      n = self.num_examples
      self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                            else np.arange(n))
    return self._perms[epoch]

  def __getitem__(self, position: int) -> np.ndarray:
    n, b = self.num_examples, self.global_batch
    start = int(position) * b
    parts, pos = [], start
    while pos < start + b:
      epoch, offset = divmod(pos, n)
      take = min(n - offset, start + b - pos)
      parts.append(self._perm(epoch)[offset:offset + take])
      pos += take
    idx = np.concatenate(parts)
    p = jax.process_index()
    return idx[p * self.local_batch:(p + 1) * self.local_batch]


class PairedBatches:
  """Real batch i paired with fake batch i (offline negatives), or real batches alone.

  State: {'position': i}. `next()` returns {'real': {...}, 'fake': {...}} with this process's rows.
  """

  def __init__(self, real: Source, num_real: int, global_batch: int, seed: int,
               fake: Optional[Source] = None, num_fake: int = 0):
    self.real, self.fake = real, fake
    self.real_idx = IndexBatches(num_real, global_batch, seed=seed)
    self.fake_idx = IndexBatches(num_fake, global_batch, seed=seed + 7919) if fake is not None else None
    self.position = 0

  def get_state(self) -> dict:
    return {"position": int(self.position)}

  def set_state(self, state: Mapping[str, Any]) -> None:
    self.position = int(state["position"])

  def next(self) -> dict:
    i = self.position
    batch = {"real": dict(self.real(self.real_idx[i]))}
    if self.fake is not None:
      batch["fake"] = dict(self.fake(self.fake_idx[i]))
    self.position += 1
    return batch
