"""pytorch-fid FID Inception weights (torch state-dict names) -> Flax variables of `InceptionV3`.

The pytorch-fid weight file `pt_inception-2015-12-05-6726825d.pth` is the state dict of
torchvision's `Inception3(num_classes=1008, aux_logits=False)` with the FID blocks swapped in,
keyed like `Conv2d_1a_3x3.conv.weight`, `Mixed_5b.branch1x1.bn.running_mean`, `fc.weight`.

Name and layout map (torch -> flax):

| torch name                    | flax collection / path                 | transform            |
|-------------------------------|----------------------------------------|----------------------|
| `<m>.conv.weight` [O,I,kh,kw] | `params/<m as path>/conv/kernel`       | transpose (2,3,1,0)  |
| `<m>.bn.weight`               | `params/<m>/bn/scale`                  |                      |
| `<m>.bn.bias`                 | `params/<m>/bn/bias`                   |                      |
| `<m>.bn.running_mean`         | `batch_stats/<m>/bn/mean`              |                      |
| `<m>.bn.running_var`          | `batch_stats/<m>/bn/var`               |                      |
| `<m>.bn.num_batches_tracked`  | (dropped; optional in the input)       |                      |
| `fc.weight` [1008, 2048]      | `params/fc/kernel` [2048, 1008]        | transpose            |
| `fc.bias`                     | `params/fc/bias`                       |                      |

`<m>` is e.g. `Mixed_5b.branch5x5_1`, i.e. the flax path `Mixed_5b/branch5x5_1`.

To read the `.pth` file without torch, `load_pytorch_fid_weights(path)` combines this map with
`ddo_jax.convert.torch_pickle.load_torch_state_dict`.
"""
from typing import Any, Dict, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.nets.inception import BasicConv2d, FCLayer, InceptionV3

_PARAM_LEAVES = {"kernel": None, "scale": "weight", "bias": "bias"}
_STAT_LEAVES = {"mean": "running_mean", "var": "running_var"}
_IGNORED_SUFFIXES = (".num_batches_tracked",)


def _flax_to_torch_name(collection: str, path: Tuple[str, ...]) -> str:
  """Torch state-dict name of the flax leaf `collection/path`."""
  *mods, leaf = path
  prefix = ".".join(mods)
  if collection == "batch_stats":
    return f"{prefix}.{_STAT_LEAVES[leaf]}"
  if mods and mods[-1] == "conv" and leaf == "kernel":
    return f"{prefix}.weight"
  if mods == ["fc"]:
    return "fc.weight" if leaf == "kernel" else "fc.bias"
  if mods and mods[-1] == "bn":
    return f"{prefix}.{_PARAM_LEAVES[leaf]}"
  raise KeyError(f"no torch name for flax leaf {collection}/{'/'.join(path)}")


def _needs_transpose(torch_name: str, ndim: int) -> Optional[Tuple[int, ...]]:
  if torch_name.endswith(".conv.weight") and ndim == 4:
    return (2, 3, 1, 0)
  if torch_name == "fc.weight":
    return (1, 0)
  return None


def _torch_shape(flax_shape: Tuple[int, ...], torch_name: str) -> Tuple[int, ...]:
  perm = _needs_transpose(torch_name, len(flax_shape))
  if perm is None:
    return tuple(flax_shape)
  # perm maps torch -> flax (flax_axis i = torch axis perm[i]); invert it.
  torch_shape = [0] * len(flax_shape)
  for flax_axis, torch_axis in enumerate(perm):
    torch_shape[torch_axis] = flax_shape[flax_axis]
  return tuple(torch_shape)


def expected_layout(model: Optional[InceptionV3] = None) -> Dict[str, Tuple[str, Tuple[str, ...],
                                                                          Tuple[int, ...]]]:
  """`{torch_name: (collection, flax_path, torch_shape)}` for every tensor the module needs.

  Shapes come from `jax.eval_shape(model.init, ...)`, so they cannot drift from the module. The
  order is torch's `state_dict()` order: the layers in call order (recorded with
  `nn.intercept_methods` while tracing; the module calls them in torchvision's definition
  order), and per BasicConv2d `conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var`.
  """
  model = InceptionV3() if model is None else model
  calls = []

  def record(next_fun, args, kwargs, context):
    if context.method_name == "__call__" and isinstance(context.module, (BasicConv2d, FCLayer)):
      calls.append((type(context.module), tuple(context.module.path)))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 299, 299, 3), jnp.float32))

  def leaf(collection, path):
    node = shapes[collection]
    for key in path:
      node = node[key]
    return node

  layout = {}
  for kind, mod in calls:
    if kind is BasicConv2d:
      leaves = [("params", mod + ("conv", "kernel")), ("params", mod + ("bn", "scale")),
                ("params", mod + ("bn", "bias")), ("batch_stats", mod + ("bn", "mean")),
                ("batch_stats", mod + ("bn", "var"))]
    else:
      leaves = [("params", mod + ("kernel",)), ("params", mod + ("bias",))]
    for collection, path in leaves:
      name = _flax_to_torch_name(collection, path)
      layout[name] = (collection, path, _torch_shape(tuple(leaf(collection, path).shape), name))
  n_leaves = len(jax.tree_util.tree_leaves(shapes))
  if n_leaves != len(layout):
    raise AssertionError(f"layout covers {len(layout)} of the module's {n_leaves} variables")
  return layout


def inception_variables_from_state_dict(state_dict: Mapping[str, Any],
                                        model: Optional[InceptionV3] = None,
                                        dtype: Any = np.float32) -> Dict[str, Any]:
  """Converts a pytorch-fid Inception state dict into `{'params': ..., 'batch_stats': ...}`.

  Args:
    state_dict: torch name -> array (numpy or anything `np.asarray` accepts), e.g. the output of
      `ddo_jax.convert.torch_pickle.load_torch_state_dict`. `*.num_batches_tracked` entries are
      accepted and dropped.
    model: the module whose layout is expected; default `InceptionV3()`.
    dtype: dtype of the output arrays (numpy).

  Returns:
    Nested dicts of numpy arrays, ready for `InceptionV3().apply(variables, x)`.

  Raises:
    ValueError: listing, in one message, every missing key, every unexpected key and every shape
      mismatch (expected torch shape vs given).
  """
  layout = expected_layout(model)
  given = {k: v for k, v in state_dict.items() if not k.endswith(_IGNORED_SUFFIXES)}
  missing = [k for k in layout if k not in given]
  unexpected = sorted(k for k in given if k not in layout)
  mismatched = []
  for name, (_, _, shape) in layout.items():
    if name in given:
      got = tuple(np.shape(given[name]))
      if got != shape:
        mismatched.append(f"{name}: expected {shape}, got {got}")
  if missing or unexpected or mismatched:
    lines = ["Inception state dict does not match the FID InceptionV3 layout:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected))
    if mismatched:
      lines.append(f"  shape mismatch ({len(mismatched)}): " + "; ".join(mismatched))
    raise ValueError("\n".join(lines))

  out: Dict[str, Any] = {"params": {}, "batch_stats": {}}
  for name, (collection, path, _) in layout.items():
    arr = np.asarray(given[name])
    if not np.issubdtype(arr.dtype, np.floating):
      raise ValueError(f"{name}: expected a floating-point tensor, got {arr.dtype}")
    perm = _needs_transpose(name, arr.ndim)
    if perm is not None:
      arr = np.transpose(arr, perm)
    node = out[collection]
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(arr, dtype=dtype)
  return out


def state_dict_from_inception_variables(variables: Mapping[str, Any],
                                        model: Optional[InceptionV3] = None) -> Dict[str, np.ndarray]:
  """Inverse of `inception_variables_from_state_dict` (torch names and layouts, no
  `num_batches_tracked`), in the module's definition order."""
  layout = expected_layout(model)
  out = {}
  for name, (collection, path, _) in layout.items():
    node = variables[collection]
    for key in path:
      node = node[key]
    arr = np.asarray(node)
    perm = _needs_transpose(name, arr.ndim)
    if perm is not None:
      arr = np.transpose(arr, np.argsort(perm))
    out[name] = np.ascontiguousarray(arr)
  return out


def load_pytorch_fid_weights(path, model: Optional[InceptionV3] = None) -> Dict[str, Any]:
  """Flax variables from pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (no torch needed).

  Reads the file with `ddo_jax.convert.torch_pickle.load_torch_state_dict` (zip or legacy
  `torch.save`, or `.safetensors`) and converts it with `inception_variables_from_state_dict`.
  """
  from ddo_jax.convert import torch_pickle  # pylint: disable=import-outside-toplevel
  return inception_variables_from_state_dict(torch_pickle.load_torch_state_dict(path), model)
