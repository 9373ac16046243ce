"""Batches of real data paired 1:1 with reference samples, deterministic and checkpointable.

Index order comes from grain: `grain.MapDataset.range(n).shuffle(seed).repeat().batch(B)` is a
random-access dataset of index batches, reshuffled every epoch. Batch `i` of a run is a pure function of
(seed, i), so the iterator's whole state is the position `i`; it is saved in every checkpoint and a
restored run continues with exactly the batches an uninterrupted run would have seen.

Each process reads only its rows of the global batch (rows [p*b, (p+1)*b) for process p with b = B / P),
so the global batch does not depend on the number of processes.
"""
from typing import Any, Callable, Mapping, Optional

import grain
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
    ds = grain.MapDataset.range(num_examples)
    if shuffle:
      ds = ds.shuffle(seed=seed)
    self._ds = ds.repeat(None).batch(global_batch, drop_remainder=True)
    self.num_examples = num_examples
    self.global_batch = global_batch
    self.local_batch = global_batch // jax.process_count()

  def __getitem__(self, position: int) -> np.ndarray:
    idx = np.asarray(self._ds[int(position)])
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
