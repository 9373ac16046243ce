"""Name map between the PyTorch state_dict of a VAR transformer (FoundationVision/VAR models/var.py) and the Flax
parameters of `ddo_jax.nets.var.VAR`.

Torch side (docs/ARCHITECTURES.md §5, in `state_dict()` order): `pos_start`, `pos_1LC`, the buffers `lvl_1L`
(int64 [1, L]) and `attn_bias_for_masking` (float32 [1, 1, L, L], 0 / -inf), `word_embed.{weight,bias}`,
`class_emb.weight`, `lvl_embed.weight`, per block `blocks.<i>.attn.{scale_mul_1H11, q_bias, v_bias, zero_k_bias
(buffer, zeros), mat_qkv.weight, proj.weight, proj.bias}`, `blocks.<i>.ffn.fc{1,2}.{weight,bias}`,
`blocks.<i>.ada_lin.1.{weight,bias}`, then `head_nm.ada_lin.1.{weight,bias}` and `head.{weight,bias}`.
Linear weights are [out, in]. Checkpoints without attn_l2_norm (VAR before mid-April 2024) lack `scale_mul_1H11`.

Flax side: {'params': {...}}. Linear weights become `kernel` ([in, out], transposed), embedding tables
`embedding`, the `blocks.<i>` entries modules `blocks_<i>`, and the `.1` of the `ada_lin` Sequential is dropped:

  blocks.3.attn.mat_qkv.weight  <->  params/blocks_3/attn/mat_qkv/kernel   (transposed)
  blocks.3.ada_lin.1.bias       <->  params/blocks_3/ada_lin/bias
  class_emb.weight              <->  params/class_emb/embedding

The three buffers are structural (functions of patch_nums and embed_dim): reading checks that they hold exactly
the constructor values; writing recreates them, so upstream's `load_state_dict(strict=True)` accepts the export.

Public API (pure functions on arrays and shapes; no file reading here):
  config_from_shapes({key: shape}, lvl_1L=None) -> VAR config (fields of nets.var.VAR)
  expected_entries(config) -> [Entry(torch_key, torch_shape, dtype, kind, flax_path)] in state_dict() order
  structural_buffers(config) -> {key: array}
  state_dict_problems({key: (shape, dtype)}, config) -> {'missing', 'unexpected', 'mismatched'}
  torch_to_flax(state_dict, config) -> {'params': ...}  (numpy float32)
  flax_to_torch(variables, config) -> OrderedDict[str, np.ndarray]  (buffers included)
  num_parameters(config) -> int
"""
import collections
import functools
import json
import re
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import numpy as np

from ddo_jax.nets import var as var_net

_BLOCK = re.compile(r"^blocks\.(\d+)\.")
STRUCTURAL = ("lvl_1L", "attn_bias_for_masking", "zero_k_bias")


class Entry(NamedTuple):
  torch_key: str
  torch_shape: Tuple[int, ...]
  dtype: str            # 'float32' or 'int64'
  kind: str             # 'linear' (transposed), 'raw' (same layout) or 'buffer' (structural, no Flax leaf)
  flax_path: Optional[Tuple[str, ...]]


def _torch_layout(config) -> List[str]:
  keys = ["pos_start", "pos_1LC", "lvl_1L", "attn_bias_for_masking", "word_embed.weight", "word_embed.bias",
          "class_emb.weight", "lvl_embed.weight"]
  for i in range(int(config["depth"])):
    p = f"blocks.{i}."
    if config.get("attn_l2_norm", True):
      keys.append(p + "attn.scale_mul_1H11")
    keys += [p + "attn.q_bias", p + "attn.v_bias", p + "attn.zero_k_bias", p + "attn.mat_qkv.weight",
             p + "attn.proj.weight", p + "attn.proj.bias", p + "ffn.fc1.weight", p + "ffn.fc1.bias",
             p + "ffn.fc2.weight", p + "ffn.fc2.bias", p + "ada_lin.1.weight", p + "ada_lin.1.bias"]
  keys += ["head_nm.ada_lin.1.weight", "head_nm.ada_lin.1.bias", "head.weight", "head.bias"]
  return keys


def _kind(key: str) -> str:
  if key.rsplit(".", 1)[-1] in STRUCTURAL:
    return "buffer"
  if key.endswith(".weight") and not key.startswith(("class_emb.", "lvl_embed.")):
    return "linear"
  return "raw"


def torch_to_flax_path(key: str) -> Optional[Tuple[str, ...]]:
  """The Flax path under 'params' of a torch key (None for the structural buffers)."""
  if _kind(key) == "buffer":
    return None
  key = _BLOCK.sub(lambda m: f"blocks_{m.group(1)}.", key).replace("ada_lin.1.", "ada_lin.")
  parts = key.split(".")
  if parts[-1] == "weight":
    parts[-1] = "embedding" if parts[0] in ("class_emb", "lvl_embed") else "kernel"
  return tuple(parts)


def _plain(config) -> dict:
  c = dict(config)
  c["patch_nums"] = [int(p) for p in c["patch_nums"]]
  return c


@functools.lru_cache(maxsize=16)
def _abstract_cached(key: str) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  tree = var_net.abstract_params(var_net.build_var(json.loads(key)))["params"]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def abstract_shapes(config) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{flax path under 'params': shape} of VAR(config), from jax.eval_shape of its init."""
  return _abstract_cached(json.dumps(_plain(config), sort_keys=True))


def num_parameters(config) -> int:
  """Trainable parameters (torch Parameters; the buffers are not counted, as upstream does not)."""
  return int(sum(int(np.prod(s)) for s in abstract_shapes(config).values()))


def _torch_shape(kind: str, flax_shape) -> Tuple[int, ...]:
  return tuple(flax_shape)[::-1] if kind == "linear" else tuple(flax_shape)


def structural_buffers(config) -> "collections.OrderedDict[str, np.ndarray]":
  """The constructor values of the buffers: lvl_1L, attn_bias_for_masking, blocks.<i>.attn.zero_k_bias."""
  pn = tuple(config["patch_nums"])
  big_l = var_net.seq_len(pn)
  out = collections.OrderedDict()
  out["lvl_1L"] = var_net.level_of_tokens(pn).reshape(1, big_l).astype(np.int64)
  out["attn_bias_for_masking"] = np.where(var_net.block_causal_mask(pn), np.float32(0.0),
                                          np.float32(-np.inf)).reshape(1, 1, big_l, big_l).astype(np.float32)
  for i in range(int(config["depth"])):
    out[f"blocks.{i}.attn.zero_k_bias"] = np.zeros((int(config["embed_dim"]),), np.float32)
  return out


def expected_entries(config) -> List[Entry]:
  """Every state_dict entry of VAR(config), in state_dict() order; the layout must cover the Flax tree exactly."""
  shapes = abstract_shapes(config)
  buffers = structural_buffers(config)
  entries, covered = [], set()
  for key in _torch_layout(config):
    kind = _kind(key)
    if kind == "buffer":
      entries.append(Entry(key, tuple(buffers[key].shape), buffers[key].dtype.name, kind, None))
      continue
    path = torch_to_flax_path(key)
    if path not in shapes:
      raise RuntimeError(f"VAR name map: {key} maps to params/{'/'.join(path)}, which the Flax model lacks")
    entries.append(Entry(key, _torch_shape(kind, shapes[path]), "float32", kind, path))
    covered.add(path)
  leftover = sorted("/".join(p) for p in shapes if p not in covered)
  if leftover:
    raise RuntimeError(f"VAR name map: Flax leaves not covered by the layout: {leftover}")
  return entries


def config_from_shapes(shapes: Mapping[str, Tuple[int, ...]], lvl_1L: Optional[np.ndarray] = None) -> dict:
  """The VAR config a state dict describes, from its shapes (and its lvl_1L buffer, which gives patch_nums).

  depth = number of `blocks.<i>`, embed_dim from pos_start, vocab_size / cvae from head / word_embed,
  num_classes = class_emb rows - 1, num_heads from scale_mul_1H11 (else upstream's default heads = depth),
  mlp_ratio from fc1, patch_nums from lvl_1L (else the released (1, 2, ..., 16) when L = 680). Raises KeyError
  naming the first entry it needs and lacks.
  """
  def shape(k):
    if k not in shapes:
      raise KeyError(k)
    return tuple(int(s) for s in shapes[k])
  depth = 1 + max([int(m.group(1)) for m in map(_BLOCK.match, shapes) if m] or [-1])
  c = shape("pos_start")[-1]
  vocab, _ = shape("head.weight")
  _, cvae = shape("word_embed.weight")
  num_classes = shape("class_emb.weight")[0] - 1
  n_levels = shape("lvl_embed.weight")[0]
  big_l = shape("pos_1LC")[1]
  l2 = "blocks.0.attn.scale_mul_1H11" in shapes
  heads = shape("blocks.0.attn.scale_mul_1H11")[1] if l2 else depth
  hidden = shape("blocks.0.ffn.fc1.weight")[0] if depth else 4 * c
  if lvl_1L is not None:
    counts = np.bincount(np.asarray(lvl_1L).reshape(-1), minlength=n_levels)
    patch_nums = [int(round(np.sqrt(n))) for n in counts]
  elif big_l == var_net.seq_len(var_net.RELEASED["patch_nums"]):
    patch_nums = list(var_net.RELEASED["patch_nums"])
  else:
    raise KeyError("lvl_1L")
  return dict(vocab_size=int(vocab), cvae=int(cvae), depth=int(depth), embed_dim=int(c), num_heads=int(heads),
              num_classes=int(num_classes), patch_nums=patch_nums, mlp_ratio=float(hidden) / c,
              norm_eps=1e-6, attn_l2_norm=bool(l2), shared_aln=False)


def state_dict_problems(given: Mapping[str, Tuple[Tuple[int, ...], str]], config) -> Dict[str, list]:
  """{'missing', 'unexpected', 'mismatched'} lists for {key: (shape, dtype name)} against VAR(config)."""
  expected = {e.torch_key: e for e in expected_entries(config)}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = []
  for k, (shape, dtype) in given.items():
    if k not in expected:
      continue
    e = expected[k]
    if tuple(shape) != e.torch_shape:
      mismatched.append(f"{k} {list(shape)} vs {list(e.torch_shape)}")
    elif e.kind == "buffer" and dtype != e.dtype:
      mismatched.append(f"{k} dtype {dtype} vs {e.dtype}")
    elif e.kind != "buffer" and not dtype.startswith(("float", "bfloat")):
      mismatched.append(f"{k} dtype {dtype} vs a float type")
  return {"missing": missing, "unexpected": unexpected, "mismatched": mismatched}


def buffer_problems(state_dict: Mapping[str, Any], config) -> List[str]:
  """Keys of the structural buffers whose values differ from the constructor's (a file from another config)."""
  bad = []
  for k, want in structural_buffers(config).items():
    if k in state_dict and not np.array_equal(np.asarray(state_dict[k]), want):
      bad.append(k)
  return bad


def torch_to_flax(state_dict: Mapping[str, Any], config) -> dict:
  """{'params': ...} (numpy float32, Flax layouts) from a VAR state dict whose keys and shapes match
  (check with `state_dict_problems` first; a KeyError / ValueError otherwise). Buffers are skipped."""
  out: dict = {}
  for e in expected_entries(config):
    if e.kind == "buffer":
      continue
    arr = np.asarray(state_dict[e.torch_key])
    if tuple(arr.shape) != e.torch_shape:
      raise ValueError(f"{e.torch_key}: shape {list(arr.shape)} vs {list(e.torch_shape)}")
    arr = arr.astype(np.float32)
    if e.kind == "linear":
      arr = arr.T
    node = out
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[e.flax_path[-1]] = np.array(arr, order="C", copy=True)
  return {"params": out}


def _get(tree, path):
  for name in path:
    tree = tree[name]
  return tree


def flax_to_torch(variables: Mapping[str, Any], config) -> "collections.OrderedDict[str, np.ndarray]":
  """The upstream state_dict (exact keys, order, shapes; float32 and int64 lvl_1L) of {'params': ...}."""
  params = variables["params"] if "params" in variables else variables
  buffers = structural_buffers(config)
  out = collections.OrderedDict()
  for e in expected_entries(config):
    if e.kind == "buffer":
      out[e.torch_key] = buffers[e.torch_key]
      continue
    arr = np.asarray(jax.device_get(_get(params, e.flax_path)), dtype=np.float32)
    if e.kind == "linear":
      arr = arr.T
    if tuple(arr.shape) != e.torch_shape:
      raise ValueError(f"params/{'/'.join(e.flax_path)}: torch shape {list(arr.shape)} vs {list(e.torch_shape)}")
    out[e.torch_key] = np.array(arr, order="C", copy=True)
  return out
