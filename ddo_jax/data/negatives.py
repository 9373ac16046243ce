"""Offline negatives: samples of the frozen reference model, generated before a round into a store.

The store is a folder of chunks `chunk_00000.npz`, ... each holding `chunk_size` samples, plus
`manifest.json` written last with every chunk's row count and checksum. Sample `s` is drawn from the key
`fold_in(base_key, s)`, so the store's content does not depend on batch size, device count or
interruptions: a killed generation resumes at the first missing chunk, and every file is written under a
temporary name and renamed, so no half-written chunk or manifest can look complete.

Every chunk is checked when read back (it opens, has the manifest's rows and checksum); a damaged chunk
is deleted with a warning naming it and generated again (deterministically, so with the same content).
"""
import json
import pathlib
import zipfile
import zlib
from typing import Callable, Optional

import jax
import numpy as np

from ddo_jax import faults, parallel, utils

MANIFEST = "manifest.json"


def chunk_path(directory, i: int) -> pathlib.Path:
  return pathlib.Path(directory) / f"chunk_{i:05d}.npz"


def _checksum(arrays: dict) -> str:
  crc = 0
  for k in sorted(arrays):
    crc = zlib.crc32(np.ascontiguousarray(arrays[k]).tobytes(), zlib.crc32(k.encode(), crc))
  return f"{crc:08x}"


def read_chunk(path, rows: int, checksum: Optional[str] = None) -> dict:
  """The arrays of one chunk; ValueError naming the file if it does not open or is not as recorded."""
  try:
    with np.load(path) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise ValueError(f"negatives chunk {path} is damaged ({type(e).__name__}: {e})") from e
  if not arrays:
    raise ValueError(f"negatives chunk {path} holds no arrays")
  short = {k: len(v) for k, v in arrays.items() if len(v) != rows}
  if short:
    raise ValueError(f"negatives chunk {path} has {short} rows, expected {rows}")
  if checksum is not None and _checksum(arrays) != checksum:
    raise ValueError(f"negatives chunk {path} does not match its checksum in {MANIFEST}")
  return arrays


def is_complete(directory) -> bool:
  """True once the store's manifest is written (its chunks are verified when read)."""
  return (pathlib.Path(directory) / MANIFEST).exists()


def _read_manifest(directory) -> Optional[dict]:
  path = pathlib.Path(directory) / MANIFEST
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except ValueError:
    utils.log.warning("negatives: %s is damaged; checking the chunks and writing it again", path)
    return None


def _clean_temporaries(directory: pathlib.Path) -> None:
  if jax.process_index() == 0:
    for tmp in directory.glob(".chunk_*.tmp"):
      tmp.unlink(missing_ok=True)
    for tmp in directory.glob(f".{MANIFEST}.*.tmp"):
      tmp.unlink(missing_ok=True)


def generate(sample_fn: Callable, params, *, num: int, chunk_size: int, directory, seed: int, mesh) -> dict:
  """Fill `directory` with `num` samples of `sample_fn(params, base_key, seeds) -> dict of [B, ...] arrays`
  (a `ddo_jax.sampling.seeded.make_seeded_sampler`); `chunk_size` must be divisible by the number of batch
  shards. Returns the manifest.
  """
  directory = pathlib.Path(directory)
  num_chunks = -(-num // chunk_size)
  manifest = _read_manifest(directory)
  if manifest is not None and verify(directory, manifest):
    return manifest
  directory.mkdir(parents=True, exist_ok=True)
  _clean_temporaries(directory)
  parallel.check_batch_divisible(chunk_size, mesh, "negatives chunk_size")
  base = jax.random.key(seed)
  sums = [None] * num_chunks
  for i in range(num_chunks):   # keep the chunks a killed generation finished, if they read back whole
    path = chunk_path(directory, i)
    if path.exists():
      try:
        sums[i] = _checksum(read_chunk(path, chunk_size))
      except ValueError as e:
        utils.log.warning("negatives: %s; generating it again", e)
        if jax.process_index() == 0:
          path.unlink()
  parallel.barrier("negatives-checked")
  todo = [i for i in range(num_chunks) if sums[i] is None]
  if len(todo) < num_chunks:
    utils.log.info("negatives: %d/%d chunks already in %s", num_chunks - len(todo), num_chunks, directory)
  progress = utils.Progress("negatives", len(todo) * chunk_size, unit="samples")
  for n, i in enumerate(todo):
    seeds = jax.device_put(np.arange(i * chunk_size, (i + 1) * chunk_size, dtype=np.int32),
                           parallel.batch_sharding(mesh))
    out = parallel.to_host(sample_fn(params, base, seeds))
    sums[i] = _checksum(out)
    if jax.process_index() == 0:
      utils.atomic_savez(chunk_path(directory, i), **out)
    faults.point("negatives_chunk")
    progress.update((n + 1) * chunk_size)
  manifest = {"num": num, "chunk_size": chunk_size, "num_chunks": num_chunks, "seed": seed, "checksums": sums}
  if jax.process_index() == 0:
    utils.atomic_write_json(directory / MANIFEST, manifest)
  parallel.barrier("negatives-complete")   # other processes read the store next
  return manifest


def verify(directory, manifest: dict) -> bool:
  """True if every chunk of a complete store reads back as recorded; damaged chunks are deleted (with a
  warning) and the manifest removed, so that `generate` makes them again."""
  directory = pathlib.Path(directory)
  sums = manifest.get("checksums") or [None] * manifest["num_chunks"]
  ok = True
  for i in range(manifest["num_chunks"]):
    try:
      read_chunk(chunk_path(directory, i), manifest["chunk_size"], sums[i])
    except (ValueError, FileNotFoundError) as e:
      utils.log.warning("negatives: %s; generating it again", e)
      ok = False
      if jax.process_index() == 0:
        chunk_path(directory, i).unlink(missing_ok=True)
  if not ok and jax.process_index() == 0:
    (directory / MANIFEST).unlink(missing_ok=True)
  parallel.barrier("negatives-verified")
  return ok


def load(directory) -> dict:
  """All samples of a complete store as host arrays (first `num` of them), each chunk verified."""
  directory = pathlib.Path(directory)
  manifest = _read_manifest(directory)
  if manifest is None:
    raise FileNotFoundError(f"negative store {directory} is incomplete (no {MANIFEST}); rerun the same "
                            "command to finish generating it")
  sums = manifest.get("checksums") or [None] * manifest["num_chunks"]
  parts = [read_chunk(chunk_path(directory, i), manifest["chunk_size"], sums[i])
           for i in range(manifest["num_chunks"])]
  return {k: np.concatenate([p[k] for p in parts])[:manifest["num"]] for k in parts[0]}
