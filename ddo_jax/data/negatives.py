"""Offline negatives: samples of the frozen reference model, generated before a round into a store.

The store is a folder of chunks `chunk_00000.npz`, ... each holding `chunk_size` samples, plus
`manifest.json` written last. Sample `s` is drawn from the key `fold_in(base_key, s)`, so the store's
content does not depend on batch size, device count or interruptions: a killed generation resumes at the
first missing chunk, and every file is written under a temporary name and renamed, so no half-written
chunk or manifest can look complete.
"""
import json
import pathlib
from typing import Callable

import jax
import numpy as np

from ddo_jax import parallel, utils

MANIFEST = "manifest.json"


def is_complete(directory) -> bool:
  return (pathlib.Path(directory) / MANIFEST).exists()


def generate(sample_fn: Callable, params, *, num: int, chunk_size: int, directory, seed: int, mesh) -> dict:
  """Fill `directory` with `num` samples of `sample_fn(params, base_key, seeds) -> dict of [B, ...] arrays`
  (a `ddo_jax.sampling.seeded.make_seeded_sampler`); `chunk_size` must be divisible by the number of batch
  shards.
  """
  directory = pathlib.Path(directory)
  if is_complete(directory):
    return json.loads((directory / MANIFEST).read_text())
  directory.mkdir(parents=True, exist_ok=True)
  parallel.check_batch_divisible(chunk_size, mesh, "negatives chunk_size")
  num_chunks = -(-num // chunk_size)
  base = jax.random.key(seed)
  done = [i for i in range(num_chunks) if (directory / f"chunk_{i:05d}.npz").exists()]
  first_missing = next((i for i in range(num_chunks) if i not in set(done)), num_chunks)
  if first_missing:
    utils.log.info("negatives: resuming at chunk %d/%d in %s", first_missing, num_chunks, directory)
  progress = utils.Progress("negatives", num_chunks * chunk_size, unit="samples",
                            start=first_missing * chunk_size)
  for i in range(num_chunks):
    path = directory / f"chunk_{i:05d}.npz"
    if path.exists():
      continue
    seeds = jax.device_put(np.arange(i * chunk_size, (i + 1) * chunk_size, dtype=np.int32),
                           parallel.batch_sharding(mesh))
    out = parallel.to_host(sample_fn(params, base, seeds))
    if jax.process_index() == 0:
      utils.atomic_savez(path, **out)
    progress.update((i + 1) * chunk_size)
  manifest = {"num": num, "chunk_size": chunk_size, "num_chunks": num_chunks, "seed": seed}
  if jax.process_index() == 0:
    utils.atomic_write_json(directory / MANIFEST, manifest)
  parallel.barrier("negatives-complete")   # other processes read the store next
  return manifest


def load(directory) -> dict:
  """All samples of a complete store as host arrays (first `num` of them)."""
  directory = pathlib.Path(directory)
  if not is_complete(directory):
    raise FileNotFoundError(f"negative store {directory} is incomplete (no {MANIFEST}); rerun the same "
                            "command to finish generating it")
  manifest = json.loads((directory / MANIFEST).read_text())
  parts = []
  for i in range(manifest["num_chunks"]):
    with np.load(directory / f"chunk_{i:05d}.npz") as f:
      parts.append({k: f[k] for k in f.files})
  return {k: np.concatenate([p[k] for p in parts])[:manifest["num"]] for k in parts[0]}
