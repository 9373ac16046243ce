"""diffusers AutoencoderKL folders (`stabilityai/sd-vae-ft-mse` and its family) -> `ddo_jax.nets.sd_vae`, no torch.

A diffusers model folder holds `config.json` (the constructor kwargs plus `_class_name` /
`_diffusers_version`) and `diffusion_pytorch_model.safetensors` (or the older pickled
`diffusion_pytorch_model.bin`). Both are read with numpy alone: safetensors through
`ddo_jax.convert.torch_write.load_safetensors`, pickles through the restricted reader of
`ddo_jax.convert.torch_pickle`; no code stored in a file is run.

Torch side: the `AutoencoderKL.state_dict()` names, e.g. `encoder.down_blocks.0.resnets.1.conv1.weight`
(conv weights [out, in, kh, kw], linear weights [out, in], GroupNorm `weight` / `bias`). Checkpoints saved
before diffusers renamed its attention layers spell the mid blocks' attention `query` / `key` / `value` /
`proj_attn`; diffusers renames them on load to `to_q` / `to_k` / `to_v` / `to_out.0`, and so does
`canonical_key` here.

Flax side: {'params': ...} of `ddo_jax.nets.sd_vae.AutoencoderKL`. The rule is mechanical: a numeric path
component is joined to the one before it (`down_blocks.0` -> `down_blocks_0`, `to_out.0` -> `to_out_0`),
a GroupNorm `weight` becomes `scale`, any other `weight` becomes `kernel` (convolutions transposed with
(2, 3, 1, 0) to HWIO, linear weights with `.T`), `bias` stays:

  encoder.down_blocks.0.resnets.1.conv1.weight     <->  encoder/down_blocks_0/resnets_1/conv1/kernel
  decoder.mid_block.attentions.0.to_out.0.bias     <->  decoder/mid_block/attentions_0/to_out_0/bias
  encoder.conv_norm_out.weight                     <->  encoder/conv_norm_out/scale

Public API (pure functions; only the *_folder / read_* functions touch files):
  config_from_diffusers(diffusers_config) -> dict
  canonical_key(torch_key) -> str
  torch_to_flax_path(torch_key) -> flax path tuple
  expected_entries(config) -> list of Entry (torch key, torch shape, kind, flax path), state_dict order
  torch_to_flax(state_dict, config, dtype=np.float32) -> params
  flax_to_torch(params, config, dtype=np.float32) -> OrderedDict[str, np.ndarray]
  num_parameters(config) -> int
  read_diffusers_config(folder) / read_state_dict(folder) / load_diffusers_folder(folder) -> (config, params)
  load_stability_vae_encoder(folder, **encoder_kwargs) -> (StabilityVAEEncoder, params)
"""
import collections
import functools
import json
import os
import pathlib
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple, Union

import jax
import numpy as np

from ddo_jax.convert import torch_pickle, torch_write
from ddo_jax.nets import edm2_encoders, sd_vae

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
CLASS_NAME = "AutoencoderKL"
# Older diffusers attention names (AttentionBlock) -> current ones, inside an attention module.
LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_NORMS = ("norm1", "norm2", "group_norm", "conv_norm_out")
_TUPLE_KEYS = ("down_block_types", "up_block_types", "block_out_channels")


# ---------------------------------------------------------------------------------------------------
# Config.


def config_from_diffusers(diffusers_config: Mapping[str, Any]) -> dict:
  """The ddo-jax config of a diffusers AutoencoderKL: every constructor kwarg, defaults filled in.

  diffusers_config: the folder's config.json (entries starting with '_' are metadata: `_class_name` must
  be AutoencoderKL when present) or the key manifests' `init_kwargs`. Lists become tuples. Unknown kwargs
  and architectures this port lacks raise ValueError.
  """
  given = dict(diffusers_config)
  cls = given.get("_class_name", CLASS_NAME)
  if cls != CLASS_NAME:
    raise ValueError(f"SD-VAE config: _class_name {cls!r} is not {CLASS_NAME!r}; this reader converts diffusers "
                     "AutoencoderKL folders (e.g. stabilityai/sd-vae-ft-mse)")
  kw = {k: v for k, v in given.items() if not k.startswith("_")}
  unknown = sorted(k for k in kw if k not in sd_vae.DEFAULTS)
  if unknown:
    raise ValueError(f"SD-VAE config: unknown AutoencoderKL kwargs {unknown}; known are {sorted(sd_vae.DEFAULTS)}")
  config = dict(sd_vae.DEFAULTS)
  config.update(kw)
  for k in _TUPLE_KEYS:
    config[k] = tuple(config[k])
  config["block_out_channels"] = tuple(int(v) for v in config["block_out_channels"])
  for k in ("latents_mean", "latents_std"):
    if config[k] is not None:
      config[k] = tuple(float(v) for v in config[k])
  sd_vae.build_autoencoder_kl(config)  # raises for unsupported block types / activations
  return config


def _arch_key(config: Mapping[str, Any]) -> str:
  c = dict(sd_vae.DEFAULTS)
  c.update(dict(config))
  return json.dumps({k: (list(c[k]) if isinstance(c[k], tuple) else c[k]) for k in sd_vae.ARCH_KEYS},
                    sort_keys=True)


# ---------------------------------------------------------------------------------------------------
# The name rule.


def canonical_key(torch_key: str) -> str:
  """The current diffusers name of a state_dict key (legacy attention names renamed, others unchanged)."""
  parts = torch_key.split(".")
  # <...>.attentions.<i>.<legacy>.<weight|bias>
  if len(parts) >= 4 and parts[-4] == "attentions" and parts[-2] in LEGACY_ATTENTION:
    return ".".join(parts[:-2] + [LEGACY_ATTENTION[parts[-2]], parts[-1]])
  return torch_key


def torch_to_flax_path(torch_key: str) -> Tuple[str, ...]:
  """The Flax parameter path of a (current-name) torch key."""
  out: List[str] = []
  for part in torch_key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  if out[-1] == "weight":
    out[-1] = "scale" if len(out) >= 2 and out[-2] in _NORMS else "kernel"
  return tuple(out)


def _torch_layout(config) -> List[str]:
  """Every state_dict key of the AutoencoderKL, in `state_dict()` order (the diffusers constructors register
  `conv_in`, the block list, `mid_block` (attentions before resnets), `conv_norm_out`, `conv_out`)."""
  c = dict(sd_vae.DEFAULTS)
  c.update(dict(config))
  chans, layers = list(c["block_out_channels"]), int(c["layers_per_block"])
  keys: List[str] = []

  def wb(prefix):
    keys.extend([prefix + ".weight", prefix + ".bias"])

  def resnet(prefix, cin, cout):
    for name in ("norm1", "conv1", "norm2", "conv2"):
      wb(f"{prefix}.{name}")
    if cin != cout:
      wb(f"{prefix}.conv_shortcut")

  def mid(prefix, ch):
    if c["mid_block_add_attention"]:
      for name in ("group_norm", "to_q", "to_k", "to_v", "to_out.0"):
        wb(f"{prefix}.attentions.0.{name}")
    resnet(f"{prefix}.resnets.0", ch, ch)
    resnet(f"{prefix}.resnets.1", ch, ch)

  wb("encoder.conv_in")
  cout = chans[0]
  for i, ch in enumerate(chans):
    for j in range(layers):
      cin, cout = cout, ch
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", cin, cout)
    if i != len(chans) - 1:
      wb(f"encoder.down_blocks.{i}.downsamplers.0.conv")
  mid("encoder.mid_block", chans[-1])
  wb("encoder.conv_norm_out")
  wb("encoder.conv_out")

  rev = chans[::-1]
  wb("decoder.conv_in")
  cout = rev[0]
  for i, ch in enumerate(rev):
    for j in range(layers + 1):
      cin, cout = cout, ch
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", cin, cout)
    if i != len(rev) - 1:
      wb(f"decoder.up_blocks.{i}.upsamplers.0.conv")
  mid("decoder.mid_block", rev[0])
  wb("decoder.conv_norm_out")
  wb("decoder.conv_out")
  if c["use_quant_conv"]:
    wb("quant_conv")
  if c["use_post_quant_conv"]:
    wb("post_quant_conv")
  return keys


class Entry(NamedTuple):
  """One state_dict entry and where it lives in the Flax parameters."""
  torch_key: str
  torch_shape: Tuple[int, ...]
  kind: str  # 'conv', 'dense', 'scale' or 'bias'
  flax_path: Tuple[str, ...]


def _flatten(tree, prefix=()) -> Dict[Tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


@functools.lru_cache(maxsize=8)
def _abstract_cached(key: str) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  vae = sd_vae.build_autoencoder_kl(json.loads(key))
  return {p: tuple(s.shape) for p, s in _flatten(sd_vae.abstract_params(vae)).items()}


def abstract_shapes(config) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{flax path: shape} of the Flax AutoencoderKL of `config` (jax.eval_shape of its init)."""
  return _abstract_cached(_arch_key(config))


def num_parameters(config) -> int:
  return int(sum(int(np.prod(s)) for s in abstract_shapes(config).values()))


def _kind(path: Tuple[str, ...], flax_shape) -> str:
  if path[-1] == "kernel":
    return "conv" if len(flax_shape) == 4 else "dense"
  return path[-1]


def _torch_shape(kind: str, flax_shape) -> Tuple[int, ...]:
  flax_shape = tuple(flax_shape)
  if kind == "conv":
    return tuple(flax_shape[i] for i in (3, 2, 0, 1))
  if kind == "dense":
    return flax_shape[::-1]
  return flax_shape


def _to_flax_layout(kind: str, arr: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return arr.transpose(2, 3, 1, 0)
  if kind == "dense":
    return arr.T
  return arr


def _to_torch_layout(kind: str, arr: np.ndarray) -> np.ndarray:
  if kind == "conv":
    return arr.transpose(3, 2, 0, 1)
  if kind == "dense":
    return arr.T
  return arr


def expected_entries(config) -> List[Entry]:
  """Every state_dict entry of the AutoencoderKL `config` describes, in `state_dict()` order.

  Shapes come from jax.eval_shape of the Flax init through the name rule; the layout must cover the Flax
  parameters exactly (a RuntimeError says which leaves do not match).
  """
  shapes = abstract_shapes(config)
  entries, covered = [], set()
  for key in _torch_layout(config):
    path = torch_to_flax_path(key)
    if path not in shapes:
      raise RuntimeError(f"SD-VAE name map: {key} maps to {'/'.join(path)}, which the Flax model lacks")
    kind = _kind(path, shapes[path])
    entries.append(Entry(key, _torch_shape(kind, shapes[path]), kind, path))
    covered.add(path)
  leftover = sorted("/".join(p) for p in shapes if p not in covered)
  if leftover:
    raise RuntimeError(f"SD-VAE name map: Flax leaves not covered by the layout: {leftover}")
  return entries


def _summary(config) -> str:
  c = dict(sd_vae.DEFAULTS)
  c.update(dict(config))
  return (f"AutoencoderKL(block_out_channels={list(c['block_out_channels'])}, "
          f"layers_per_block={c['layers_per_block']}, latent_channels={c['latent_channels']}, "
          f"norm_num_groups={c['norm_num_groups']}, mid_block_add_attention={c['mid_block_add_attention']})")


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
  """Flax params (numpy) of an AutoencoderKL state_dict, current or legacy attention names.

  Every key and shape is compared with what the Flax model of `config` expects; all problems are reported
  together in one ValueError. dtype: float32 by default (the VAE runs in float32, diffusers'
  force_upcast); None keeps the stored dtype.
  """
  entries = expected_entries(config)
  expected = {e.torch_key: e for e in entries}
  given: Dict[str, np.ndarray] = {}
  duplicates = []
  for k, v in state_dict.items():
    name = canonical_key(k)
    if name in given:
      duplicates.append(f"{k} (also given as {name})")
    given[name] = np.asarray(v)
  missing = [k for k in expected if k not in given]
  unexpected = [k for k in given if k not in expected]
  mismatched = [f"{k}: got {list(given[k].shape)} vs expected {list(expected[k].torch_shape)}"
                for k in given if k in expected and tuple(given[k].shape) != expected[k].torch_shape]
  _raise_if_mismatched(
      f"SD-VAE state_dict does not match the Flax model of {_summary(config)}:",
      [("missing keys", missing), ("unexpected keys", unexpected),
       ("keys given twice (current and legacy attention names)", duplicates),
       ("shape mismatches (torch layout)", mismatched)],
      "Build the config from the folder's own config.json (config_from_diffusers), and pass the "
      "AutoencoderKL's own state_dict (keys start with 'encoder.', 'decoder.', 'quant_conv' or "
      "'post_quant_conv').")
  out: dict = {}
  for e in entries:
    arr = given[e.torch_key]
    if dtype is not None:
      arr = arr.astype(dtype)
    node = out
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[e.flax_path[-1]] = np.ascontiguousarray(_to_flax_layout(e.kind, arr))
  return out


def flax_to_torch(params: Mapping[str, Any], config,
                  dtype: Optional[Any] = np.float32) -> "collections.OrderedDict[str, np.ndarray]":
  """The AutoencoderKL state_dict (numpy, current names, `state_dict()` order) of Flax params."""
  entries = expected_entries(config)
  flat = _flatten(dict(params))
  wanted = {e.flax_path for e in entries}
  missing = sorted("/".join(p) for p in wanted - set(flat))
  extra = sorted("/".join(p) for p in set(flat) - wanted)
  bad = [f"{'/'.join(e.flax_path)}: got torch {list(_torch_shape(e.kind, np.shape(flat[e.flax_path])))} vs "
         f"expected {list(e.torch_shape)}"
         for e in entries if e.flax_path in flat and _torch_shape(e.kind, np.shape(flat[e.flax_path])) != e.torch_shape]
  _raise_if_mismatched(f"Flax params do not match {_summary(config)}:",
                       [("missing leaves", missing), ("unexpected leaves", extra), ("shape mismatches", bad)],
                       "Pass the 'params' of build_autoencoder_kl(config).")
  out = collections.OrderedDict()
  for e in entries:
    arr = np.asarray(jax.device_get(flat[e.flax_path]))
    if dtype is not None:
      arr = arr.astype(dtype)
    out[e.torch_key] = np.ascontiguousarray(_to_torch_layout(e.kind, arr))
  return out


# ---------------------------------------------------------------------------------------------------
# Files.


def read_diffusers_config(folder: PathLike) -> dict:
  """The folder's config.json through `config_from_diffusers`."""
  path = pathlib.Path(folder) / CONFIG_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no diffusers config; pass the folder that holds config.json and "
                            f"{WEIGHT_FILES[0]} (e.g. a download of stabilityai/sd-vae-ft-mse)")
  return config_from_diffusers(json.loads(path.read_text()))


def weight_file(folder: PathLike) -> pathlib.Path:
  """The folder's weight file: safetensors if present, else the pickled .bin."""
  for name in WEIGHT_FILES:
    path = pathlib.Path(folder) / name
    if path.is_file():
      return path
  raise FileNotFoundError(f"{folder}: none of {list(WEIGHT_FILES)} found")


def read_state_dict(folder_or_file: PathLike) -> "collections.OrderedDict[str, np.ndarray]":
  """The stored tensors (numpy, stored dtypes) of a diffusers folder or of one weight file."""
  path = pathlib.Path(folder_or_file)
  if path.is_dir():
    path = weight_file(path)
  if path.suffix == ".safetensors":
    return torch_write.load_safetensors(path)
  return torch_pickle.load_torch_state_dict(path)


def load_diffusers_folder(folder: PathLike, dtype: Optional[Any] = np.float32) -> Tuple[dict, dict]:
  """(config, params) of a diffusers AutoencoderKL folder; params are numpy, float32 by default."""
  config = read_diffusers_config(folder)
  return config, torch_to_flax(read_state_dict(folder), config, dtype=dtype)


def load_stability_vae_encoder(folder: PathLike, precision: Any = "highest",
                               **encoder_kwargs) -> Tuple["edm2_encoders.StabilityVAEEncoder", dict]:
  """EDM2's StabilityVAEEncoder on the VAE of a diffusers folder, and the VAE's params (numpy float32).

  encoder_kwargs: StabilityVAEEncoder's (raw_mean, raw_std, final_mean, final_std, batch_size, vae_name, or
  the scale / bias an EDM2 pickle stores); upstream's defaults otherwise.
  """
  config, params = load_diffusers_folder(folder)
  vae = sd_vae.build_autoencoder_kl(config, precision=precision)
  return edm2_encoders.StabilityVAEEncoder(vae, **encoder_kwargs), params
