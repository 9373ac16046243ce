"""Checkpoint tree I/O below both `train/` and `convert/`: Orbax trees saved once and loaded anywhere, and
model folders (`DIR/<tree>/` + `DIR/model.json`) written all or nothing.

`save_tree` / `load_tree`: one pytree of arrays (chosen parameters, converted weights). The tree is written
by Orbax into `.NAME.partial`, a checksum of every leaf (`checksum.json`) is added, and the folder is then
renamed to NAME, so a folder that exists is complete. `load_tree` recomputes the checksum and refuses a
tree whose bytes changed (a bit flip, a truncated file) with `CorruptCheckpointError` naming the folder.
`load_params_dir`: any such tree as host numpy arrays whatever topology wrote it.
`write_dir_atomically`: a model folder from a temporary sibling renamed into place.
"""
import json
import os
import pathlib
import shutil
import tempfile
import uuid
import zlib
from typing import Any, Mapping, Optional

import jax
import numpy as np

from ddo_jax import faults, parallel, utils

MODEL_JSON = "model.json"
CHECKSUM_JSON = "checksum.json"


class CorruptCheckpointError(RuntimeError):
  """A checkpoint that cannot be read back as it was written (the message names the folder)."""


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.ascontiguousarray(np.asarray(x))


def tree_checksum(tree: Any) -> dict:
  """{'algorithm': 'crc32', 'leaves': {path: 'dtype shape crc'}} over every leaf's bytes (gathers
  sharded leaves, so every process must call it)."""
  leaves = {}
  for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = _host(x)
    leaves[jax.tree_util.keystr(path)] = f"{a.dtype} {list(a.shape)} {zlib.crc32(memoryview(a).cast('B')):08x}"
  return {"algorithm": "crc32", "leaves": leaves}


def checksum_mismatches(tree: Any, expected: Mapping[str, Any]) -> list:
  """The leaf paths whose checksum differs from `expected` (missing or extra leaves included)."""
  got = tree_checksum(tree)["leaves"]
  want = expected.get("leaves", {})
  return sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel (slow to import)
  return ocp


def save_tree(path, tree: Any) -> None:
  """Save a pytree of arrays (e.g. chosen parameters) once, atomically, with its checksum.

  Every process calls it (Orbax writes the shards each one holds); `path` must not exist yet.
  """
  path = pathlib.Path(path).absolute()
  if path.exists():
    raise FileExistsError(f"{path} exists; a saved tree is never overwritten")
  partial = path.parent / f".{path.name}.partial"
  if jax.process_index() == 0 and partial.exists():
    shutil.rmtree(partial)   # left by a process killed mid-save
  parallel.barrier(f"save-tree-clean-{path.name}")
  with _ocp().StandardCheckpointer() as ckptr:
    ckptr.save(partial, tree)
    ckptr.wait_until_finished()
  checksum = tree_checksum(tree)
  if jax.process_index() == 0:
    utils.atomic_write_json(partial / CHECKSUM_JSON, checksum)
    faults.point("save_tree")
    os.replace(partial, path)
    utils.fsync_dir(path.parent)
  parallel.barrier(f"save-tree-done-{path.name}")


def read_checksum(path) -> Optional[dict]:
  """The checksum written with a tree, or None for a tree written without one."""
  f = pathlib.Path(path) / CHECKSUM_JSON
  if not f.exists():
    return None
  try:
    return json.loads(f.read_text())
  except ValueError as e:
    raise CorruptCheckpointError(f"{f} is not valid JSON ({e})") from e


def verify_tree(path, tree: Any, checksum: Optional[dict]) -> None:
  """Raise CorruptCheckpointError when `tree` (as restored from `path`) does not match `checksum`."""
  if checksum is None:
    utils.log.warning("%s has no %s (written by an older version): not verified", path, CHECKSUM_JSON)
    return
  bad = checksum_mismatches(tree, checksum)
  if bad:
    shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise CorruptCheckpointError(f"{path}: the restored arrays do not match the checksum written with them "
                                 f"({shown})")


def load_tree(path, abstract_tree: Any = None) -> Any:
  """Load and verify a pytree saved by `save_tree`; `abstract_tree` (ShapeDtypeStructs with shardings)
  places it. A missing folder raises FileNotFoundError; a damaged one CorruptCheckpointError."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"no Orbax checkpoint at {path}")
  checksum = read_checksum(path)
  try:
    with _ocp().StandardCheckpointer() as ckptr:
      tree = ckptr.restore(path) if abstract_tree is None else ckptr.restore(path, abstract_tree)
  except Exception as e:  # pylint: disable=broad-except (Orbax/tensorstore raise many kinds on damaged files)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise CorruptCheckpointError(f"{path} cannot be read ({type(e).__name__}: {first[:300]})") from e
  verify_tree(path, tree, checksum)
  return tree


def abstract_like(tree: Any, shardings: Any = None) -> Any:
  """ShapeDtypeStructs of `tree` (with `shardings`, a matching tree, when given)."""
  if shardings is None:
    return jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
  return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _host_device():
  try:
    return jax.devices("cpu")[0]
  except RuntimeError:
    return jax.devices()[0]


def load_params_dir(path) -> Any:
  """The tree of an Orbax StandardCheckpointer folder as numpy arrays, whatever topology it was saved with."""
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"no Orbax checkpoint at {path}")
  device = jax.sharding.SingleDeviceSharding(_host_device())
  with _ocp().StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    meta = getattr(meta, "tree", meta)
    target = jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=device), meta)
  tree = load_tree(path, target)
  return jax.tree_util.tree_map(np.asarray, tree)


def write_dir_atomically(out_dir, trees: Mapping[str, Any], meta: Mapping[str, Any], overwrite: bool = False,
                         meta_name: str = MODEL_JSON) -> pathlib.Path:
  """Writes ``out_dir/<name>`` (Orbax) for each of ``trees`` and ``out_dir/<meta_name>`` (JSON), all or nothing.

  Everything is written into a temporary sibling folder that is then renamed to ``out_dir``. An existing non-empty
  ``out_dir`` is refused unless ``overwrite`` (then it is replaced as a whole).
  """
  out = pathlib.Path(out_dir).absolute()
  if out.exists() and not out.is_dir():
    raise FileExistsError(f"{out} exists and is not a directory")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
  out.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
  try:
    for name, tree in trees.items():
      save_tree(tmp / name, tree)
    (tmp / meta_name).write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    os.chmod(tmp, 0o777 & ~utils.current_umask())   # mkdtemp makes 0700
    if out.is_dir() and any(out.iterdir()):
      trash = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
      os.replace(out, trash)
      os.replace(tmp, out)
      shutil.rmtree(trash, ignore_errors=True)
    else:
      os.replace(tmp, out)  # replaces an empty directory too
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return out
