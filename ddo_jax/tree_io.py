"""Checkpoint tree I/O below both `train/` and `convert/`: Orbax trees saved once and loaded anywhere, and
model folders (`DIR/<tree>/` + `DIR/model.json`) written all or nothing.

`save_tree` / `load_tree`: one pytree of arrays (chosen parameters, converted weights), written atomically
by Orbax. `load_params_dir`: any such tree as host numpy arrays whatever topology wrote it.
`write_dir_atomically`: a model folder from a temporary sibling renamed into place.
"""
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from typing import Any, Mapping

import jax
import numpy as np

MODEL_JSON = "model.json"


def _ocp():
  import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel (slow to import)
  return ocp


def save_tree(path, tree: Any) -> None:
  """Save a pytree of arrays (e.g. chosen parameters) once, atomically, with Orbax."""
  path = pathlib.Path(path).absolute()
  with _ocp().StandardCheckpointer() as ckptr:
    ckptr.save(path, tree)
    ckptr.wait_until_finished()


def load_tree(path, abstract_tree: Any = None) -> Any:
  """Load a pytree saved by `save_tree`; `abstract_tree` (ShapeDtypeStructs with shardings) places it."""
  path = pathlib.Path(path).absolute()
  if not path.exists():
    raise FileNotFoundError(f"no Orbax checkpoint at {path}")
  with _ocp().StandardCheckpointer() as ckptr:
    if abstract_tree is None:
      return ckptr.restore(path)
    return ckptr.restore(path, abstract_tree)


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
    tree = ckptr.restore(path, target)
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
    os.chmod(tmp, 0o755)
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
