"""Name map between the PyTorch state_dict of an EDM2 Precond (NVlabs/edm2 training/networks_edm2.py) and the
Flax variables of `ddo_jax.nets.edm2_unet`.

Torch side: keys such as `unet.enc.16x16_block0.conv_res0.weight`, in `state_dict()` order
(docs/ARCHITECTURES.md §5): MPConv weights [out, in, kh, kw] or [out, in], 0-dim gains `unet.out_gain`
and `unet.*.emb_gain`, and the MPFourier buffers `unet.emb_fourier.{freqs,phases}` and
`logvar_fourier.{freqs,phases}`. No biases. Released pickles store everything as float16.

Flax side: {'params': {...}, 'buffers': {...}}. The map is mechanical: the entries of the `enc` / `dec`
ModuleDicts become modules `enc_<name>` / `dec_<name>`, a `weight` becomes `kernel` (convolutions
transposed with (2, 3, 1, 0) to HWIO, dense weights with `.T`), gains keep their names, and the buffers go to
the 'buffers' collection under the same path:

  unet.enc.16x16_block0.conv_res0.weight  <->  params/unet/enc_16x16_block0/conv_res0/kernel
  unet.dec.8x8_in0.emb_gain               <->  params/unet/dec_8x8_in0/emb_gain
  logvar_fourier.freqs                    <->  buffers/logvar_fourier/freqs

Public API (pure functions on arrays; no file reading here):
  config_from_init_kwargs(init_kwargs, class_name='Precond') -> dict
  torch_to_flax_path(torch_key) -> (collection, flax_path)
  expected_entries(config) -> list of Entry (torch key, torch shape, kind, collection, flax path)
  torch_to_flax(state_dict, config, dtype=np.float32) -> {'params': ..., 'buffers': ...}
  flax_to_torch(variables, config, dtype=np.float32) -> OrderedDict[str, np.ndarray]
  num_parameters(config) -> int  (the 'params' collection only, as upstream counts parameters)
"""
import collections
import functools
import json
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import numpy as np

from ddo_jax.nets import edm2_unet

_PRECOND_KEYS = ("img_resolution", "img_channels", "label_dim") + tuple(edm2_unet.PRECOND_DEFAULTS)
_TUPLE_KEYS = ("channel_mult", "attn_resolutions", "resample_filter")
_INT_KEYS = ("model_channels", "num_blocks", "channels_per_head")
_OPTIONAL_INT_KEYS = ("channel_mult_noise", "channel_mult_emb")
_FLOAT_KEYS = ("label_balance", "concat_balance", "dropout", "res_balance", "attn_balance")


def _scalar(v):
  """A python value from a numpy scalar (pickles hold numpy scalars)."""
  if isinstance(v, np.generic):
    return v.item()
  return v


def _normalize_class_name(class_name: str) -> str:
  """'training.networks_edm2.Precond (NVlabs/edm2)' -> 'Precond'."""
  return str(class_name).split()[0].rsplit(".", 1)[-1]


def config_from_init_kwargs(init_kwargs: Mapping[str, Any], class_name: str = "Precond") -> dict:
  """The ddo-jax config of an EDM2 net from its upstream Precond constructor kwargs.

  init_kwargs: the goldens' / key manifests' `init_kwargs`, or the `_init_kwargs` of an EDM2 pickle's
    `ema` object. Missing entries take the upstream defaults (Precond and UNet / Block).
  Returns {'class_name': 'Precond', 'img_resolution', 'img_channels', 'label_dim', 'use_fp16',
  'sigma_data', 'logvar_channels', 'unet_kwargs': {every UNet / Block kwarg}}. Raises ValueError for
  another class or unknown kwargs.
  """
  cls = _normalize_class_name(class_name)
  if cls != "Precond":
    raise ValueError(f"EDM2 config: class {class_name!r} is not supported; the EDM2 port has 'Precond' "
                     "(training.networks_edm2.Precond)")
  kw = {k: _scalar(v) for k, v in dict(init_kwargs).items()}
  for required in ("img_resolution", "img_channels", "label_dim"):
    if required not in kw:
      raise ValueError(f"EDM2 config: init_kwargs lack {required!r}; got keys {sorted(kw)}")
  config = dict(class_name=cls, img_resolution=int(kw.pop("img_resolution")),
                img_channels=int(kw.pop("img_channels")), label_dim=int(kw.pop("label_dim")))
  for k, default in edm2_unet.PRECOND_DEFAULTS.items():
    config[k] = type(default)(kw.pop(k, default))
  unknown = sorted(k for k in kw if k not in edm2_unet.UNET_DEFAULTS)
  if unknown:
    raise ValueError(f"EDM2 config: unknown constructor kwargs {unknown}; known are "
                     f"{sorted(_PRECOND_KEYS + tuple(edm2_unet.UNET_DEFAULTS))}")
  uk = dict(edm2_unet.UNET_DEFAULTS)
  uk.update(kw)
  uk["channel_mult"] = tuple(int(v) for v in uk["channel_mult"])
  uk["attn_resolutions"] = tuple(int(v) for v in uk["attn_resolutions"])
  uk["resample_filter"] = tuple(int(v) if float(v).is_integer() else float(v)
                                for v in (_scalar(v) for v in uk["resample_filter"]))
  for k in _INT_KEYS:
    uk[k] = int(uk[k])
  for k in _OPTIONAL_INT_KEYS:
    uk[k] = None if uk[k] is None else int(uk[k])
  for k in _FLOAT_KEYS:
    uk[k] = float(uk[k])
  uk["clip_act"] = None if uk["clip_act"] is None else float(uk["clip_act"])
  config["unet_kwargs"] = uk
  return config


# ---------------------------------------------------------------------------------------------------
# The mechanical name rule.


def torch_to_flax_path(torch_key: str) -> Tuple[str, Tuple[str, ...]]:
  """(collection, flax path) of a torch state_dict key."""
  parts = torch_key.split(".")
  if len(parts) >= 3 and parts[0] == "unet" and parts[1] in ("enc", "dec"):
    parts = [parts[0], f"{parts[1]}_{parts[2]}"] + parts[3:]
  leaf = parts[-1]
  if leaf in ("freqs", "phases"):
    return edm2_unet.BUFFERS, tuple(parts)
  if leaf == "weight":
    return "params", tuple(parts[:-1]) + ("kernel",)
  return "params", tuple(parts)


def _leaf_kind(torch_key: str, collection: str) -> str:
  if collection == edm2_unet.BUFFERS:
    return "buffer"
  if torch_key.endswith(".weight"):
    return "kernel"
  return "gain"


def _torch_layout(config) -> List[str]:
  """Every state_dict key of the Precond, in `state_dict()` order (mirrors the upstream constructors:
  a module's parameters, then its buffers, then its children in registration order)."""
  c = edm2_unet.plain_dict(config)
  uk = dict(edm2_unet.UNET_DEFAULTS)
  uk.update(edm2_unet.plain_dict(c["unet_kwargs"]))
  mc = uk["model_channels"]
  cblock = [mc * m for m in uk["channel_mult"]]
  keys = ["unet.out_gain", "unet.emb_fourier.freqs", "unet.emb_fourier.phases", "unet.emb_noise.weight"]
  if c["label_dim"]:
    keys.append("unet.emb_label.weight")

  def block(name, cin, cout, attention):
    p = f"unet.{name}."
    keys.extend([p + "emb_gain", p + "conv_res0.weight", p + "emb_linear.weight", p + "conv_res1.weight"])
    if cin != cout:
      keys.append(p + "conv_skip.weight")
    if attention:
      keys.extend([p + "attn_qkv.weight", p + "attn_proj.weight"])

  res0, attn = c["img_resolution"], tuple(uk["attn_resolutions"])
  cout, skips = c["img_channels"] + 1, []
  for level, channels in enumerate(cblock):
    res = res0 >> level
    if level == 0:
      cout = channels
      keys.append(f"unet.enc.{res}x{res}_conv.weight")
    else:
      block(f"enc.{res}x{res}_down", cout, cout, False)
    skips.append(cout)
    for idx in range(uk["num_blocks"]):
      cin, cout = cout, channels
      block(f"enc.{res}x{res}_block{idx}", cin, cout, res in attn)
      skips.append(cout)
  for level, channels in reversed(list(enumerate(cblock))):
    res = res0 >> level
    if level == len(cblock) - 1:
      block(f"dec.{res}x{res}_in0", cout, cout, True)
      block(f"dec.{res}x{res}_in1", cout, cout, False)
    else:
      block(f"dec.{res}x{res}_up", cout, cout, False)
    for idx in range(uk["num_blocks"] + 1):
      cin, cout = cout + skips.pop(), channels
      block(f"dec.{res}x{res}_block{idx}", cin, cout, res in attn)
  keys.extend(["unet.out_conv.weight", "logvar_fourier.freqs", "logvar_fourier.phases",
               "logvar_linear.weight"])
  return keys


class Entry(NamedTuple):
  """One state_dict entry and where it lives in the Flax variables."""
  torch_key: str
  torch_shape: Tuple[int, ...]
  kind: str  # 'kernel', 'gain' or 'buffer'
  collection: str  # 'params' or 'buffers'
  flax_path: Tuple[str, ...]


def _to_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


@functools.lru_cache(maxsize=16)
def _abstract_cached(key: str):
  net = edm2_unet.build_precond(json.loads(key))
  variables = edm2_unet.abstract_variables(net)
  return {col: {p: tuple(s.shape) for p, s in _flatten(_to_dict(tree)).items()}
          for col, tree in variables.items()}


def abstract_shapes(config) -> Dict[str, Dict[Tuple[str, ...], Tuple[int, ...]]]:
  """{collection: {flax path: shape}} of the Flax model of `config` (jax.eval_shape of init)."""
  return _abstract_cached(json.dumps(edm2_unet.plain_dict(config), sort_keys=True, default=list))


def num_parameters(config) -> int:
  """Number of trainable parameters (the 'params' collection; torch's Parameters, buffers excluded)."""
  return int(sum(int(np.prod(s)) for s in abstract_shapes(config)["params"].values()))


def _torch_shape(kind: str, flax_shape) -> Tuple[int, ...]:
  flax_shape = tuple(flax_shape)
  if kind == "kernel" and len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  if kind == "kernel":
    return flax_shape[::-1]
  return flax_shape


def _to_flax_layout(kind: str, arr: np.ndarray) -> np.ndarray:
  if kind == "kernel" and arr.ndim == 4:
    return arr.transpose(2, 3, 1, 0)
  if kind == "kernel":
    return arr.T
  return arr


def _to_torch_layout(kind: str, arr: np.ndarray) -> np.ndarray:
  if kind == "kernel" and arr.ndim == 4:
    return arr.transpose(3, 2, 0, 1)
  if kind == "kernel":
    return arr.T
  return arr


def _contiguous(arr: np.ndarray) -> np.ndarray:
  """A C-contiguous copy that keeps 0-dim arrays 0-dim (np.ascontiguousarray makes them 1-d)."""
  return np.array(arr, order="C", copy=True)


def expected_entries(config) -> List[Entry]:
  """Every state_dict entry of the Precond `config` describes, in `state_dict()` order.

  Shapes come from jax.eval_shape of the Flax init through the name rule; the layout must cover the Flax
  variables exactly (a RuntimeError says which leaves do not match).
  """
  shapes = abstract_shapes(config)
  entries, covered = [], set()
  for key in _torch_layout(config):
    col, path = torch_to_flax_path(key)
    if path not in shapes.get(col, {}):
      raise RuntimeError(f"EDM2 name map: {key} maps to {col}/{'/'.join(path)}, which the Flax model lacks")
    kind = _leaf_kind(key, col)
    entries.append(Entry(key, _torch_shape(kind, shapes[col][path]), kind, col, path))
    covered.add((col, path))
  leftover = sorted(f"{col}/{'/'.join(p)}" for col, tree in shapes.items() for p in tree
                    if (col, p) not in covered)
  if leftover:
    raise RuntimeError(f"EDM2 name map: Flax leaves not covered by the layout: {leftover}")
  return entries


def _summary(config) -> str:
  c = edm2_unet.plain_dict(config)
  uk = c["unet_kwargs"]
  return (f"EDM2 Precond(img_resolution={c['img_resolution']}, img_channels={c['img_channels']}, "
          f"label_dim={c['label_dim']}, model_channels={uk['model_channels']}, "
          f"channel_mult={list(uk['channel_mult'])}, num_blocks={uk['num_blocks']}, "
          f"attn_resolutions={list(uk['attn_resolutions'])}, channels_per_head={uk['channels_per_head']}, "
          f"logvar_channels={c['logvar_channels']})")


def _raise_if_mismatched(title: str, sections, advice: str) -> None:
  parts = []
  for label, items in sections:
    if items:
      lines = [f"  {label} ({len(items)}):"] + [f"    {s}" for s in items[:40]]
      if len(items) > 40:
        lines.append(f"    ... and {len(items) - 40} more")
      parts.append("\n".join(lines))
  if parts:
    raise ValueError("\n".join([title, *parts, advice]))


def torch_to_flax(state_dict: Mapping[str, Any], config, dtype: Optional[Any] = np.float32) -> dict:
  """{'params': ..., 'buffers': ...} (numpy) from an EDM2 Precond state_dict with torch names.

  Every key and shape is compared with what the Flax model of `config` expects; all problems are reported
  together in one ValueError. dtype: the arrays' dtype (float32 by default); None keeps the stored dtype
  (float16 for the released pickles: the forward then rounds gain / sqrt(fan_in) to float16 as upstream).
  """
  entries = expected_entries(config)
  expected = {e.torch_key: e for e in entries}
  given = {k: np.asarray(v) for k, v in state_dict.items()}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = [f"{k}: got {list(given[k].shape)} vs expected {list(expected[k].torch_shape)}"
                for k in given if k in expected and tuple(given[k].shape) != expected[k].torch_shape]
  _raise_if_mismatched(
      f"EDM2 state_dict does not match the Flax model of {_summary(config)}:",
      [("missing keys", missing), ("unexpected keys", unexpected),
       ("shape mismatches (torch layout)", mismatched)],
      "Build the config from this checkpoint's own constructor kwargs (config_from_init_kwargs(<the "
      "pickle's ema _init_kwargs>)), and pass the state_dict of the Precond itself (keys start with "
      "'unet.' or 'logvar_').")
  out = {"params": {}, edm2_unet.BUFFERS: {}}
  for e in entries:
    arr = given[e.torch_key]
    if dtype is not None:
      arr = arr.astype(dtype)
    node = out[e.collection]
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[e.flax_path[-1]] = _contiguous(_to_flax_layout(e.kind, arr))
  return out


def flax_to_torch(variables: Mapping[str, Any], config,
                  dtype: Optional[Any] = np.float32) -> "collections.OrderedDict[str, np.ndarray]":
  """The Precond state_dict (numpy, `state_dict()` order, buffers included) of Flax variables.

  dtype: float32 by default; np.float16 gives the released pickles' storage; None keeps each leaf's dtype.
  """
  entries = expected_entries(config)
  flat = {(col, p): v for col in variables for p, v in _flatten(_to_dict(variables[col])).items()}
  wanted = {(e.collection, e.flax_path) for e in entries}
  fmt = lambda cp: f"{cp[0]}/{'/'.join(cp[1])}"
  missing = sorted(fmt(cp) for cp in wanted - set(flat))
  extra = sorted(fmt(cp) for cp in set(flat) - wanted)
  bad = [f"{fmt((e.collection, e.flax_path))}: got {list(np.shape(flat[(e.collection, e.flax_path)]))} "
         f"(torch {list(_torch_shape(e.kind, np.shape(flat[(e.collection, e.flax_path)])))}) vs expected "
         f"torch {list(e.torch_shape)}"
         for e in entries if (e.collection, e.flax_path) in flat
         and _torch_shape(e.kind, np.shape(flat[(e.collection, e.flax_path)])) != e.torch_shape]
  _raise_if_mismatched(
      f"Flax variables do not match {_summary(config)}:",
      [("missing leaves", missing), ("unexpected leaves", extra), ("shape mismatches", bad)],
      "Pass {'params': ..., 'buffers': ...} of build_precond(config).")
  out = collections.OrderedDict()
  for e in entries:
    arr = np.asarray(jax.device_get(flat[(e.collection, e.flax_path)]))
    if dtype is not None:
      arr = arr.astype(dtype)
    out[e.torch_key] = _contiguous(_to_torch_layout(e.kind, arr))
  return out
