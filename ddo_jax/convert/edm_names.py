"""Name map between the PyTorch state_dict of an EDM net (EDMPrecond/VPPrecond/VEPrecond + SongUNet)
and the Flax params tree of `ddo_jax.nets.edm_precond`.

Torch side: keys such as `model.enc.32x32_conv.weight`, conv weights [out, in, kh, kw], linear weights
[out, in], GroupNorm weight/bias [C], and the `*.resample_filter` buffers [1, 1, k, k] of resampling
convs, in `state_dict()` order (docs/ARCHITECTURES.md §5).
Flax side: {'model': {'enc_32x32_conv': {'kernel': [kh, kw, in, out], 'bias': ...}, ...}}, conv
kernels transposed with (2, 3, 1, 0), dense kernels with `.T`, GroupNorm `scale`/`bias`; no buffers
(the filter is a constructor constant, so it is checked against the config and dropped).

Public API:
  config_from_init_kwargs(init_kwargs, class_name='EDMPrecond') -> dict
  torch_to_flax(state_dict, config) -> params
  flax_to_torch(params, config) -> OrderedDict[str, np.ndarray]
  expected_entries(config) -> list of (torch_key, torch_shape, kind)
"""
import collections
import functools
import json
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.nets import edm_precond
from ddo_jax.nets.songunet import resample_filter_2d

# Upstream SongUNet constructor defaults (NVlabs/edm training/networks.py).
SONGUNET_DEFAULTS = dict(
    augment_dim=0, model_channels=128, channel_mult=(1, 2, 2, 2), channel_mult_emb=4, num_blocks=4,
    attn_resolutions=(16,), dropout=0.10, label_dropout=0.0, embedding_type="positional",
    channel_mult_noise=1, encoder_type="standard", decoder_type="standard", resample_filter=(1, 1))

# Upstream precond constructor defaults, per class, and each class's default model_type.
PRECOND_DEFAULTS = {
    "EDMPrecond": dict(sigma_min=0.0, sigma_max=float("inf"), sigma_data=0.5),
    "VPPrecond": dict(beta_d=19.9, beta_min=0.1, M=1000, epsilon_t=1e-5),
    "VEPrecond": dict(sigma_min=0.02, sigma_max=100.0),
}
DEFAULT_MODEL_TYPE = {"EDMPrecond": "DhariwalUNet", "VPPrecond": "SongUNet", "VEPrecond": "SongUNet"}

# What this port implements (the DDPM++ options).
SUPPORTED_OPTIONS = dict(embedding_type=("positional",), encoder_type=("standard",),
                         decoder_type=("standard",))

_TUPLE_KEYS = ("channel_mult", "attn_resolutions", "resample_filter")
_INT_KEYS = ("augment_dim", "model_channels", "channel_mult_emb", "num_blocks", "channel_mult_noise")
_FLOAT_KEYS = ("dropout", "label_dropout")


def _scalar(v):
  """A python int/float/bool/str from a numpy scalar or python value (pickles hold numpy scalars)."""
  if isinstance(v, np.generic):
    return v.item()
  return v


def _normalize_class_name(class_name: str) -> str:
  """'training.networks.EDMPrecond (NVlabs/edm)' -> 'EDMPrecond'."""
  name = str(class_name).split()[0]
  return name.rsplit(".", 1)[-1]


def config_from_init_kwargs(init_kwargs: Mapping[str, Any], class_name: str = "EDMPrecond") -> dict:
  """The ddo-jax config of an EDM net from its upstream constructor kwargs.

  init_kwargs: the precond's `init_kwargs` (goldens config.json / key manifests) or the `_init_kwargs`
    stored in an EDM pickle (`data['ema']`). Missing entries take the upstream defaults.
  class_name: the precond class, e.g. 'EDMPrecond' or 'training.networks.VPPrecond'.

  Returns a plain dict {'class_name', 'img_resolution', 'img_channels', 'label_dim', 'use_fp16',
  'precond_kwargs', 'model_kwargs'}; `model_kwargs` are the full SongUNet kwargs. Raises ValueError
  for anything this port does not implement (other model types, NCSN++ options, unknown kwargs).
  """
  cls = _normalize_class_name(class_name)
  if cls not in PRECOND_DEFAULTS:
    raise ValueError(f"EDM config: precond class {class_name!r} is not supported; this port has "
                     f"{sorted(PRECOND_DEFAULTS)} (iDDPMPrecond/ADM is not implemented)")
  kw = {k: _scalar(v) for k, v in dict(init_kwargs).items()}
  for required in ("img_resolution", "img_channels"):
    if required not in kw:
      raise ValueError(f"EDM config: init_kwargs lack {required!r}; got keys {sorted(kw)}")
  model_type = kw.pop("model_type", DEFAULT_MODEL_TYPE[cls])
  if model_type != "SongUNet":
    raise ValueError(
        f"EDM config: model_type {model_type!r} is not supported (only 'SongUNet', the DDPM++/NCSN++ "
        f"U-Net; {cls} defaults to {DEFAULT_MODEL_TYPE[cls]!r} when model_type is absent). "
        "DhariwalUNet (ADM) checkpoints cannot be converted with this name map.")
  img_resolution = int(kw.pop("img_resolution"))
  img_channels = int(kw.pop("img_channels"))
  label_dim = int(kw.pop("label_dim", 0))
  use_fp16 = bool(kw.pop("use_fp16", False))
  precond_kwargs = dict(PRECOND_DEFAULTS[cls])
  for k in list(kw):
    if k in precond_kwargs:
      precond_kwargs[k] = float(kw.pop(k)) if k != "M" else int(kw.pop(k))
  unknown = sorted(k for k in kw if k not in SONGUNET_DEFAULTS)
  if unknown:
    raise ValueError(f"EDM config: unsupported or unknown constructor kwargs {unknown} for {cls} + "
                     f"SongUNet; known SongUNet kwargs are {sorted(SONGUNET_DEFAULTS)}")
  model_kwargs = dict(SONGUNET_DEFAULTS)
  model_kwargs.update(kw)
  for option, allowed in SUPPORTED_OPTIONS.items():
    if model_kwargs[option] not in allowed:
      raise ValueError(
          f"EDM config: {option}={model_kwargs[option]!r} is not supported; this port implements the "
          f"DDPM++ SongUNet only ({option} in {list(allowed)}). NCSN++ ('fourier' embedding, "
          "'residual'/'skip' encoder, 'skip' decoder) would need more layers and buffers.")
  for k in _TUPLE_KEYS:
    model_kwargs[k] = tuple(_scalar(v) for v in model_kwargs[k])
  model_kwargs["channel_mult"] = tuple(int(v) for v in model_kwargs["channel_mult"])
  model_kwargs["attn_resolutions"] = tuple(int(v) for v in model_kwargs["attn_resolutions"])
  model_kwargs["resample_filter"] = tuple(
      int(v) if float(v).is_integer() else float(v) for v in model_kwargs["resample_filter"])
  for k in _INT_KEYS:
    model_kwargs[k] = int(model_kwargs[k])
  for k in _FLOAT_KEYS:
    model_kwargs[k] = float(model_kwargs[k])
  model_kwargs.update(img_resolution=img_resolution, in_channels=img_channels,
                      out_channels=img_channels, label_dim=label_dim)
  return dict(class_name=cls, img_resolution=img_resolution, img_channels=img_channels,
              label_dim=label_dim, use_fp16=use_fp16, precond_kwargs=precond_kwargs,
              model_kwargs=model_kwargs)


# ---------------------------------------------------------------------------------------------------
# Layout: every torch module of the net in state_dict order.


class _Module(NamedTuple):
  """One leaf torch module: its dotted torch name, the Flax path, its kind and resampling flag."""
  torch_name: str
  flax_path: Tuple[str, ...]
  kind: str  # 'linear', 'conv' or 'norm'
  resample: bool  # carries a resample_filter buffer
  has_bias: bool = True


def _block_modules(torch_prefix, flax_prefix, cin, cout, up=False, down=False, attention=False):
  """The leaf modules of one UNetBlock in torch registration order."""
  resample = up or down

  def mod(name, kind, res=False):
    return _Module(f"{torch_prefix}.{name}", flax_prefix + (name,), kind, res)

  out = [mod("norm0", "norm"), mod("conv0", "conv", resample), mod("affine", "linear"),
         mod("norm1", "norm"), mod("conv1", "conv")]
  if cout != cin or resample:
    out.append(mod("skip", "conv", resample))
  if attention:
    out += [mod("norm2", "norm"), mod("qkv", "conv"), mod("proj", "conv")]
  return out


def _layout(config) -> List[_Module]:
  """The leaf modules of the precond's state_dict, in order (mirrors the upstream constructor)."""
  mk = edm_precond.plain_dict(edm_precond.plain_dict(config)["model_kwargs"])
  mc = mk["model_channels"]
  res0 = mk["img_resolution"]
  mods = []

  def top(name, kind, has_bias=True):
    mods.append(_Module(f"model.{name}", ("model", name), kind, False, has_bias))

  if mk["label_dim"]:
    top("map_label", "linear")
  if mk["augment_dim"]:
    top("map_augment", "linear", has_bias=False)
  top("map_layer0", "linear")
  top("map_layer1", "linear")

  def block(part, name, cin, cout, **kw):
    mods.extend(_block_modules(f"model.{part}.{name}", ("model", f"{part}_{name}"), cin, cout, **kw))

  cout = mk["in_channels"]
  skips = []
  for level, mult in enumerate(mk["channel_mult"]):
    res = res0 >> level
    if level == 0:
      cout = mc
      mods.append(_Module(f"model.enc.{res}x{res}_conv", ("model", f"enc_{res}x{res}_conv"), "conv",
                          False))
    else:
      block("enc", f"{res}x{res}_down", cout, cout, down=True)
    skips.append(cout)
    for idx in range(mk["num_blocks"]):
      cin, cout = cout, mc * mult
      block("enc", f"{res}x{res}_block{idx}", cin, cout, attention=res in mk["attn_resolutions"])
      skips.append(cout)
  levels = list(enumerate(mk["channel_mult"]))
  for level, mult in reversed(levels):
    res = res0 >> level
    if level == len(levels) - 1:
      block("dec", f"{res}x{res}_in0", cout, cout, attention=True)
      block("dec", f"{res}x{res}_in1", cout, cout)
    else:
      block("dec", f"{res}x{res}_up", cout, cout, up=True)
    for idx in range(mk["num_blocks"] + 1):
      cin, cout = cout + skips.pop(), mc * mult
      block("dec", f"{res}x{res}_block{idx}", cin, cout,
            attention=idx == mk["num_blocks"] and res in mk["attn_resolutions"])
    if level == 0:
      for name, kind in (("aux_norm", "norm"), ("aux_conv", "conv")):
        mods.append(_Module(f"model.dec.{res}x{res}_{name}", ("model", f"dec_{res}x{res}_{name}"),
                            kind, False))
  return mods


class Entry(NamedTuple):
  """One state_dict entry: torch key and shape, and where it lives in the Flax tree."""
  torch_key: str
  torch_shape: Tuple[int, ...]
  kind: str  # 'conv_kernel', 'dense_kernel', 'vector' or 'buffer'
  flax_path: Optional[Tuple[str, ...]]  # None for buffers


def _config_key(config) -> str:
  return json.dumps(edm_precond.plain_dict(config), sort_keys=True, default=list)


@functools.lru_cache(maxsize=16)
def _abstract_params_cached(key: str):
  config = json.loads(key)
  module = edm_precond.build_precond(config)
  mk = config["model_kwargs"]
  r, c = mk["img_resolution"], mk["in_channels"]
  x = jax.ShapeDtypeStruct((1, r, r, c), jnp.float32)
  sigma = jax.ShapeDtypeStruct((1,), jnp.float32)
  labels = jax.ShapeDtypeStruct((1, mk["label_dim"]), jnp.float32) if mk["label_dim"] else None
  variables = jax.eval_shape(
      lambda *a: module.init(jax.random.PRNGKey(0), *a), x, sigma, labels)
  return jax.tree_util.tree_map(lambda s: tuple(s.shape), _to_dict(variables["params"]),
                                is_leaf=lambda s: isinstance(s, jax.ShapeDtypeStruct))


def abstract_params(config) -> dict:
  """The Flax params tree of `config` as nested dicts of shape tuples (jax.eval_shape of init)."""
  return _abstract_params_cached(_config_key(config))


def _to_dict(tree):
  """Nested Mappings (FrozenDict included) as plain dicts."""
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


def _torch_shape(kind: str, flax_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """Torch shape of a Flax leaf: HWIO -> [out, in, kh, kw], [in, out] -> [out, in]."""
  flax_shape = tuple(flax_shape)
  if kind == "conv_kernel" and len(flax_shape) == 4:
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  if kind == "dense_kernel" and len(flax_shape) == 2:
    return flax_shape[::-1]
  if kind in ("conv_kernel", "dense_kernel"):
    return ("rank",) + flax_shape  # never equal to a valid torch shape
  return flax_shape


def _flax_shape(kind: str, torch_shape: Tuple[int, ...]) -> Tuple[int, ...]:
  """Flax shape of a torch entry (inverse of _torch_shape)."""
  if kind == "conv_kernel":
    return tuple(torch_shape[i] for i in (2, 3, 1, 0))
  if kind == "dense_kernel":
    return tuple(torch_shape)[::-1]
  return tuple(torch_shape)


def expected_entries(config) -> List[Entry]:
  """Every state_dict entry of the net `config` describes, in torch `state_dict()` order.

  Shapes come from jax.eval_shape of the Flax init; the layout is checked to cover that tree exactly.
  """
  shapes = _flatten(abstract_params(config))
  k = len(edm_precond.plain_dict(config)["model_kwargs"]["resample_filter"])
  entries = []
  for m in _layout(config):
    leaves = {"linear": [("weight", "kernel", "dense_kernel")],
              "conv": [("weight", "kernel", "conv_kernel")],
              "norm": [("weight", "scale", "vector")]}[m.kind]
    if m.has_bias:
      leaves = leaves + [("bias", "bias", "vector")]
    for tname, fname, kind in leaves:
      path = m.flax_path + (fname,)
      if path not in shapes:
        raise RuntimeError(f"EDM name map: layout names {path} but the Flax model has no such leaf")
      entries.append(Entry(f"{m.torch_name}.{tname}", _torch_shape(kind, shapes[path]), kind, path))
    if m.resample:
      entries.append(Entry(f"{m.torch_name}.resample_filter", (1, 1, k, k), "buffer", None))
  covered = {e.flax_path for e in entries if e.flax_path is not None}
  leftover = sorted(set(shapes) - covered)
  if leftover:
    raise RuntimeError(f"EDM name map: Flax leaves not covered by the layout: {leftover}")
  return entries


def _config_summary(config) -> str:
  c = edm_precond.plain_dict(config)
  mk = c["model_kwargs"]
  return (f"{c['class_name']} + SongUNet(img_resolution={mk['img_resolution']}, "
          f"label_dim={mk['label_dim']}, augment_dim={mk['augment_dim']}, "
          f"model_channels={mk['model_channels']}, channel_mult={list(mk['channel_mult'])}, "
          f"num_blocks={mk['num_blocks']}, attn_resolutions={list(mk['attn_resolutions'])}, "
          f"resample_filter={list(mk['resample_filter'])})")


def _listing(title: str, items: List[str], limit: int = 40) -> str:
  lines = [f"  {title} ({len(items)}):"] + [f"    {s}" for s in items[:limit]]
  if len(items) > limit:
    lines.append(f"    ... and {len(items) - limit} more")
  return "\n".join(lines)


def _raise_if_mismatched(title: str, sections, advice: str) -> None:
  """One ValueError listing every non-empty (label, items) section, then what to do; nothing if all empty."""
  parts = [_listing(label, items) for label, items in sections if items]
  if parts:
    raise ValueError("\n".join([title, *parts, advice]))


def _filter_buffer(config) -> np.ndarray:
  f = edm_precond.plain_dict(config)["model_kwargs"]["resample_filter"]
  return resample_filter_2d(f)[None, None]


def torch_to_flax(state_dict: Mapping[str, Any], config) -> dict:
  """Flax params {'model': {...}} (numpy float32) from an EDM precond state_dict with torch names.

  Every key and shape is compared with what the Flax model of `config` expects; all problems
  (missing keys, unexpected keys, shape mismatches, resample_filter buffers that differ from the
  config's filter) are reported together in one ValueError. Buffers are checked and dropped.
  """
  entries = expected_entries(config)
  expected = {e.torch_key: e for e in entries}
  given = {k: np.asarray(v) for k, v in state_dict.items()}
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched, bad_filters = [], []
  filt = _filter_buffer(config)
  for key, arr in given.items():
    e = expected.get(key)
    if e is None:
      continue
    if tuple(arr.shape) != e.torch_shape:
      mismatched.append(f"{key}: got {list(arr.shape)} vs expected {list(e.torch_shape)}")
    elif e.kind == "buffer" and not np.allclose(arr.astype(np.float64), filt, rtol=1e-6, atol=1e-7):
      bad_filters.append(f"{key}: got {arr.reshape(-1).tolist()} vs expected {filt.reshape(-1).tolist()}")
  _raise_if_mismatched(
      f"EDM state_dict does not match the Flax model of {_config_summary(config)}:",
      [("missing keys", missing), ("unexpected keys", unexpected),
       ("shape mismatches (torch layout)", mismatched),
       ("resample_filter buffers that differ from the config's filter", bad_filters)],
      "Build the config from this checkpoint's own constructor kwargs "
      "(config_from_init_kwargs(<the pickle's ema _init_kwargs>, <its class name>)), e.g. label_dim 0 vs 10 "
      "adds or removes model.map_label.*, augment_dim adds model.map_augment.weight; and pass the "
      "state_dict of the precond object itself (keys start with 'model.').")

  params = {}
  for e in entries:
    if e.kind == "buffer":
      continue
    arr = given[e.torch_key].astype(np.float32)
    if e.kind == "conv_kernel":
      arr = arr.transpose(2, 3, 1, 0)
    elif e.kind == "dense_kernel":
      arr = arr.T
    node = params
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[e.flax_path[-1]] = np.ascontiguousarray(arr)
  return params


def flax_to_torch(params: Mapping[str, Any], config) -> "collections.OrderedDict[str, np.ndarray]":
  """The torch state_dict (numpy float32, state_dict order, resample_filter buffers included) of params."""
  entries = expected_entries(config)
  flat = _flatten(_to_dict(params))
  wanted = {e.flax_path for e in entries if e.flax_path is not None}
  missing = sorted("/".join(p) for p in wanted - set(flat))
  extra = sorted("/".join(p) for p in set(flat) - wanted)
  bad = []
  for e in entries:
    if e.flax_path in flat:
      got = tuple(np.shape(flat[e.flax_path]))
      if _torch_shape(e.kind, got) != e.torch_shape:
        bad.append(f"{'/'.join(e.flax_path)}: got {list(got)} vs expected "
                   f"{list(_flax_shape(e.kind, e.torch_shape))}")
  _raise_if_mismatched(
      f"Flax params do not match {_config_summary(config)}:",
      [("missing leaves", missing), ("unexpected leaves", extra), ("shape mismatches", bad)],
      "Pass the params of build_precond(config) (the tree under 'params', starting at 'model').")

  filt = _filter_buffer(config)
  out = collections.OrderedDict()
  for e in entries:
    if e.kind == "buffer":
      out[e.torch_key] = filt.copy()
      continue
    arr = np.asarray(jax.device_get(flat[e.flax_path]), dtype=np.float32)
    if e.kind == "conv_kernel":
      arr = arr.transpose(3, 2, 0, 1)
    elif e.kind == "dense_kernel":
      arr = arr.T
    out[e.torch_key] = np.ascontiguousarray(arr)
  return out
