"""VAR's VQVAE state dicts (`vae_ch160v4096z32.pth`) <-> `ddo_jax.nets.var_vqvae.VQVAE` variables, without torch.

The released VQVAE is a `torch.save(vae.state_dict())` file (zip layout; docs/ARCHITECTURES.md §6.2). It is read
with the allowlisted, exec-free reader of `ddo_jax.convert.torch_pickle` (torch zip, legacy non-zip torch.save and
.safetensors).

Torch side: the `VQVAE.state_dict()` names, e.g. `encoder.down.4.attn.1.qkv.weight` (conv weights [out, in, kh, kw],
GroupNorm `weight` / `bias`, the codebook `quantize.embedding.weight` [V, Cvae]) plus the training buffer
`quantize.ema_vocab_hit_SV` [S, V]. That buffer is unused at inference, and upstream's `VQVAE.load_state_dict`
replaces it when its first dimension differs, so reading ignores it whatever its shape (or absence); export writes
zeros of shape [len(patch_nums), V] so that upstream's strict load accepts the file.

Flax side: `{'params': tree}` of VQVAE. The rule is mechanical: a numeric path component is joined to the one
before it (`down.0` -> `down_0`, `qresi_ls.3` -> `qresi_ls_3`), a GroupNorm `weight` (norm1, norm2, norm, norm_out)
becomes `scale`, the codebook weight becomes the leaf `quantize/embedding`, any other `weight` becomes `kernel`
(transposed (2, 3, 1, 0) to HWIO), `bias` stays:

  encoder.down.4.attn.1.qkv.weight              <->  encoder/down_4/attn_1/qkv/kernel
  decoder.up.1.upsample.conv.bias               <->  decoder/up_1/upsample/conv/bias
  quantize.quant_resi.qresi_ls.2.weight         <->  quantize/quant_resi/qresi_ls_2/kernel
  quantize.embedding.weight                     <->  quantize/embedding

Public API:
  vqvae_config_full() -> the released kwargs (re-exported from the net)
  expected_entries(vae) -> list of Entry (torch key, torch shape, kind, flax path), state_dict order, no buffer
  vqvae_state_dict_problems({key: shape}, vae) -> {'missing', 'unexpected', 'mismatched'}
  vqvae_params_from_torch(state_dict, vae, dtype=np.float32) -> {'params': tree}
  vqvae_params_to_torch(params, vae, dtype=np.float32) -> OrderedDict (state_dict order, buffer included)
  config_from_state_dict(shapes, patch_nums=None) -> VQVAE kwargs read off the shapes
  load_vqvae_file(path, vae=None, where='--src') -> (vae, variables); cli.UserError on any problem
  convert_vqvae_file(path, patch_nums=None) -> (vae, variables, report)
  save_converted(out_dir, vae, variables, report, overwrite=False) / load_converted(out_dir) -> (vae, variables)
  vqvae_kwargs(vae) -> the JSON-able constructor kwargs;  export_vqvae(params, vae, path) -> .pth or .safetensors

Converted folder (what `launch.convert vqvae` is meant to write): `out_dir/params` (Orbax `{'params': tree}`, float32)
and `out_dir/model.json` = {'family': 'vqvae', 'vae': vqvae_kwargs(vae), 'source': report}.
"""
import collections
import functools
import hashlib
import json
import os
import pathlib
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import jax
import numpy as np

from ddo_jax import cli, tree_io
from ddo_jax.convert import torch_pickle, torch_write
from ddo_jax.nets import var_vqvae
from ddo_jax.nets.var_vqvae import VQVAE, vqvae_config_full  # noqa: F401 (re-export)

FAMILY = "vqvae"
PARAMS_DIR = "params"
MODEL_JSON = tree_io.MODEL_JSON
BUFFER_KEY = "quantize.ema_vocab_hit_SV"
CODEBOOK_KEY = "quantize.embedding.weight"
_NORMS = ("norm1", "norm2", "norm", "norm_out")

# Key prefixes of other families' state dicts, to name them when one is given instead of a VQVAE.
_OTHER_FAMILIES = (
    ("a VAR transformer state dict (var_d*.pth; convert it with `launch.convert var`)",
     ("class_emb.weight", "word_embed.weight", "pos_start", "lvl_1L", "head.weight", "blocks.0.attn.mat_qkv.weight")),
    ("an EDM network state dict (EDMPrecond; `launch.convert edm`)", ("model.enc.", "model.dec.", "model.map_")),
    ("an EDM2 network state dict (Precond; `launch.convert edm2`)", ("unet.enc.", "unet.dec.", "unet.emb_")),
    ("a diffusers AutoencoderKL (SD VAE; `launch.convert sd-vae`)", ("encoder.down_blocks.", "decoder.up_blocks.")),
)


# ---------------------------------------------------------------------------------------------------------------------
# Names.


def torch_to_flax_path(torch_key: str) -> Tuple[str, ...]:
  """The Flax parameter path of a VQVAE state_dict key (not the buffer)."""
  if torch_key == CODEBOOK_KEY:
    return ("quantize", "embedding")
  out: List[str] = []
  for part in torch_key.split("."):
    if part.isdigit() and out:
      out[-1] = f"{out[-1]}_{part}"
    else:
      out.append(part)
  if out[-1] == "weight":
    out[-1] = "scale" if len(out) >= 2 and out[-2] in _NORMS else "kernel"
  return tuple(out)


def _torch_layout(vae: VQVAE) -> List[str]:
  """Every VQVAE state_dict key in `state_dict()` order (own params and buffers, then children in registration
  order), the buffer included."""
  mult, nres = tuple(vae.ch_mult), int(vae.num_res_blocks)
  keys: List[str] = []

  def wb(prefix):
    keys.extend([prefix + ".weight", prefix + ".bias"])

  def resnet(prefix, cin, cout):
    for name in ("norm1", "conv1", "norm2", "conv2"):
      wb(f"{prefix}.{name}")
    if cin != cout:
      wb(f"{prefix}.nin_shortcut")

  def attn(prefix):
    for name in ("norm", "qkv", "proj_out"):
      wb(f"{prefix}.{name}")

  def mid(prefix, c):
    resnet(f"{prefix}.block_1", c, c)
    attn(f"{prefix}.attn_1")
    resnet(f"{prefix}.block_2", c, c)

  ch, nlev = int(vae.ch), len(mult)
  wb("encoder.conv_in")
  cin = ch
  for i, m in enumerate(mult):
    for j in range(nres):
      resnet(f"encoder.down.{i}.block.{j}", cin, ch * m)
      cin = ch * m
    if i == nlev - 1:
      for j in range(nres):
        attn(f"encoder.down.{i}.attn.{j}")
    else:
      wb(f"encoder.down.{i}.downsample.conv")
  mid("encoder.mid", cin)
  wb("encoder.norm_out")
  wb("encoder.conv_out")

  wb("decoder.conv_in")
  mid("decoder.mid", ch * mult[-1])
  # up is a ModuleList filled with insert(0, ...): index i is level i; in_channels follow the reversed build.
  cin_of = {}
  cin = ch * mult[-1]
  for i in reversed(range(nlev)):
    cin_of[i] = cin
    cin = ch * mult[i]
  for i in range(nlev):
    c = cin_of[i]
    for j in range(nres + 1):
      resnet(f"decoder.up.{i}.block.{j}", c, ch * mult[i])
      c = ch * mult[i]
    if i == nlev - 1:
      for j in range(nres + 1):
        attn(f"decoder.up.{i}.attn.{j}")
    if i != 0:
      wb(f"decoder.up.{i}.upsample.conv")
  wb("decoder.norm_out")
  wb("decoder.conv_out")

  keys.append(BUFFER_KEY)
  if abs(float(vae.quant_resi)) > 1e-6:
    share = int(vae.share_quant_resi)
    n = var_vqvae._num_phis(share, vae.default_qresi_counts, len(vae.patch_nums))  # pylint: disable=protected-access
    if share == 1:
      wb("quantize.quant_resi.qresi")
    elif share == 0:
      for k in range(n):
        wb(f"quantize.quant_resi.{k}")
    else:
      for k in range(n):
        wb(f"quantize.quant_resi.qresi_ls.{k}")
  keys.append(CODEBOOK_KEY)
  wb("quant_conv")
  wb("post_quant_conv")
  return keys


class Entry(NamedTuple):
  torch_key: str
  torch_shape: Tuple[int, ...]
  kind: str  # 'conv', 'scale', 'bias' or 'embedding'
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
def abstract_shapes(vae: VQVAE) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{flax path: shape} of the VQVAE's parameters (jax.eval_shape)."""
  return {p: tuple(s.shape) for p, s in _flatten(var_vqvae.abstract_params(vae)).items()}


def num_parameters(vae: VQVAE) -> int:
  return int(sum(int(np.prod(s)) for s in abstract_shapes(vae).values()))


def _kind(path, shape) -> str:
  if path == ("quantize", "embedding"):
    return "embedding"
  if path[-1] == "kernel":
    return "conv"
  return path[-1]


def _torch_shape(kind: str, shape) -> Tuple[int, ...]:
  shape = tuple(shape)
  return tuple(shape[i] for i in (3, 2, 0, 1)) if kind == "conv" else shape


@functools.lru_cache(maxsize=8)
def _entries(vae: VQVAE) -> Tuple[Entry, ...]:
  shapes = abstract_shapes(vae)
  out, covered = [], set()
  for key in _torch_layout(vae):
    if key == BUFFER_KEY:
      continue
    path = torch_to_flax_path(key)
    if path not in shapes:
      raise RuntimeError(f"VQVAE name map: {key} maps to {'/'.join(path)}, which the Flax model lacks")
    kind = _kind(path, shapes[path])
    out.append(Entry(key, _torch_shape(kind, shapes[path]), kind, path))
    covered.add(path)
  leftover = sorted("/".join(p) for p in shapes if p not in covered)
  if leftover:
    raise RuntimeError(f"VQVAE name map: Flax leaves not covered by the layout: {leftover}")
  return tuple(out)


def expected_entries(vae: VQVAE) -> List[Entry]:
  """Every parameter entry of the VQVAE's state_dict in `state_dict()` order (the buffer is not a parameter)."""
  return list(_entries(vae))


def buffer_shape(vae: VQVAE) -> Tuple[int, int]:
  return (len(tuple(vae.patch_nums)), int(vae.vocab_size))


# ---------------------------------------------------------------------------------------------------------------------
# Checking and converting.


def other_family(keys) -> Optional[str]:
  """A description of the family a state dict belongs to when it is not a VQVAE (None when it may be one)."""
  keys = list(keys)
  if any(k.startswith(("encoder.down.", "decoder.up.")) or k == CODEBOOK_KEY for k in keys):
    return None
  for name, markers in _OTHER_FAMILIES:
    if any(k == m or k.startswith(m) for k in keys for m in markers):
      return name
  return None


def vqvae_state_dict_problems(shapes: Mapping[str, Any], vae: VQVAE) -> Dict[str, list]:
  """`{'missing', 'unexpected', 'mismatched'}` of a state dict given as key -> shape (nothing allocated).

  `quantize.ema_vocab_hit_SV` is ignored whatever its shape (upstream replaces it); 'mismatched' entries read
  `key: got [..] vs expected [..]` in torch layout.
  """
  expected = {e.torch_key: e.torch_shape for e in _entries(vae)}
  given = {k: tuple(int(n) for n in v) for k, v in shapes.items() if k != BUFFER_KEY}
  return {"missing": [k for k in expected if k not in given],
          "unexpected": [k for k in given if k not in expected],
          "mismatched": [f"{k}: got {list(given[k])} vs expected {list(expected[k])}"
                         for k in given if k in expected and given[k] != expected[k]]}


def _summary(vae: VQVAE) -> str:
  return (f"VQVAE(vocab_size={vae.vocab_size}, z_channels={vae.z_channels}, ch={vae.ch}, "
          f"ch_mult={list(vae.ch_mult)}, num_res_blocks={vae.num_res_blocks}, "
          f"share_quant_resi={vae.share_quant_resi}, patch_nums={list(vae.patch_nums)})")


_LABELS = {"missing": "missing keys", "unexpected": "unexpected keys", "mismatched": "shape mismatches"}


def _problem_text(problems: Mapping[str, list], limit: int = 40) -> str:
  parts = []
  for label, items in problems.items():
    label = _LABELS.get(label, label)
    if items:
      shown = "; ".join(items[:limit]) + (f"; ... and {len(items) - limit} more" if len(items) > limit else "")
      parts.append(f"{len(items)} {label} ({shown})")
  return ", ".join(parts)


def vqvae_params_from_torch(state_dict: Mapping[str, Any], vae: VQVAE, dtype: Optional[Any] = np.float32) -> dict:
  """`{'params': tree}` (numpy) of a VQVAE state_dict. Every key and shape is checked first; all problems are
  reported in one ValueError. dtype float32 by default (None keeps the stored dtype)."""
  problems = vqvae_state_dict_problems({k: np.shape(v) for k, v in state_dict.items()}, vae)
  if any(problems.values()):
    fam = other_family(state_dict)
    head = f"this is {fam}, not a VQVAE; " if fam else ""
    raise ValueError(f"VQVAE state_dict does not match {_summary(vae)}: {head}{_problem_text(problems)}")
  out: dict = {}
  for e in _entries(vae):
    arr = np.asarray(state_dict[e.torch_key])
    if dtype is not None:
      arr = arr.astype(dtype)
    if e.kind == "conv":
      arr = arr.transpose(2, 3, 1, 0)
    node = out
    for name in e.flax_path[:-1]:
      node = node.setdefault(name, {})
    node[e.flax_path[-1]] = np.ascontiguousarray(arr)
  return {"params": out}


def vqvae_params_to_torch(params: Mapping[str, Any], vae: VQVAE,
                          dtype: Optional[Any] = np.float32) -> "collections.OrderedDict[str, np.ndarray]":
  """The VQVAE state_dict (numpy, `state_dict()` order) of `{'params': tree}` (or the bare tree), with
  `quantize.ema_vocab_hit_SV` as zeros [len(patch_nums), V] so that upstream's strict load accepts it."""
  flat = _flatten(dict(params["params"] if "params" in params else params))
  entries = _entries(vae)
  wanted = {e.flax_path for e in entries}
  missing = sorted("/".join(p) for p in wanted - set(flat))
  extra = sorted("/".join(p) for p in set(flat) - wanted)
  bad = [f"{'/'.join(e.flax_path)}: got {list(np.shape(flat[e.flax_path]))}"
         for e in entries if e.flax_path in flat
         and _torch_shape(e.kind, np.shape(flat[e.flax_path])) != e.torch_shape]
  if missing or extra or bad:
    raise ValueError(f"Flax params do not match {_summary(vae)}: " + _problem_text(
        {"missing leaves": missing, "unexpected leaves": extra, "shape mismatches": bad}))
  by_key = {e.torch_key: e for e in entries}
  out = collections.OrderedDict()
  for key in _torch_layout(vae):
    if key == BUFFER_KEY:
      out[key] = np.zeros(buffer_shape(vae), np.float32 if dtype is None else dtype)
      continue
    e = by_key[key]
    arr = np.asarray(jax.device_get(flat[e.flax_path]))
    if dtype is not None:
      arr = arr.astype(dtype)
    if e.kind == "conv":
      arr = arr.transpose(3, 2, 0, 1)
    out[key] = np.ascontiguousarray(arr)
  return out


def config_from_state_dict(shapes: Mapping[str, Any], patch_nums: Optional[Sequence[int]] = None) -> dict:
  """VQVAE kwargs read off a state dict (arrays, or shapes as tuples / lists) (vocab_size, z_channels, ch, num_res_blocks, the phi sharing);
  `patch_nums` is not stored in the file: the released (1, 2, ..., 16) unless given. KeyError if a needed key is
  absent."""
  shapes = {k: tuple(int(n) for n in (v if isinstance(v, (tuple, list)) else np.shape(v)))
            for k, v in shapes.items()}
  cfg = vqvae_config_full()
  vocab, z = shapes[CODEBOOK_KEY]
  cfg.update(vocab_size=vocab, z_channels=z, ch=shapes["encoder.conv_in.weight"][0])
  nres = 0
  while f"encoder.down.0.block.{nres}.conv1.weight" in shapes:
    nres += 1
  cfg["num_res_blocks"] = nres or cfg["num_res_blocks"]
  if patch_nums is not None:
    cfg["patch_nums"] = tuple(int(p) for p in patch_nums)
  ls = [k for k in shapes if k.startswith("quantize.quant_resi.qresi_ls.") and k.endswith(".weight")]
  if ls:
    cfg["share_quant_resi"] = len(ls)
  elif "quantize.quant_resi.qresi.weight" in shapes:
    cfg["share_quant_resi"] = 1
  else:
    own = [k for k in shapes if k.startswith("quantize.quant_resi.") and k.endswith(".weight")]
    if own:
      cfg["share_quant_resi"] = 0
      if len(own) != len(cfg["patch_nums"]):
        cfg["default_qresi_counts"] = len(own)
    else:
      cfg["quant_resi"] = 0.0
  return cfg


def load_vqvae_file(path, vae: Optional[VQVAE] = None, where: str = "--src",
                    patch_nums: Optional[Sequence[int]] = None) -> Tuple[VQVAE, dict]:
  """Reads a VQVAE `.pth` (torch zip or legacy torch.save) or `.safetensors` file without torch or exec.

  vae: the model to check the file against; None reads the config off the shapes (`config_from_state_dict`).
  Returns (vae, {'params': tree}) with numpy float32 leaves. Every problem (no file, unreadable file, another
  family, missing keys, shape mismatches) raises cli.UserError with its one-line message.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise cli.UserError(f"no such file {path}", where, "pass the VQVAE checkpoint (vae_ch160v4096z32.pth)")
  try:
    state = torch_pickle.load_torch_state_dict(path)
  except (torch_pickle.CheckpointFormatError, torch_pickle.ForbiddenGlobalError) as e:
    raise cli.UserError(f"cannot read {path} as a VQVAE state dict ({e})", where,
                        "pass the torch.save(vae.state_dict()) file as released (vae_ch160v4096z32.pth) or a "
                        ".safetensors copy") from e
  fam = other_family(state)
  if fam is not None:
    raise cli.UserError(f"{path} is {fam}, not a VQVAE", where,
                        "pass the VQVAE checkpoint (vae_ch160v4096z32.pth)")
  if vae is None:
    try:
      vae = VQVAE(**config_from_state_dict(state, patch_nums))
    except (KeyError, ValueError, TypeError) as e:
      raise cli.UserError(f"{path} is not a VAR VQVAE state dict (no {e} entry)", where,
                          "pass the VQVAE checkpoint (vae_ch160v4096z32.pth)") from e
  problems = vqvae_state_dict_problems({k: np.shape(v) for k, v in state.items()}, vae)
  if any(problems.values()):
    raise cli.UserError(f"{path} does not match {_summary(vae)}: {_problem_text(problems, limit=5)}", where,
                        "pass a vae_ch160v4096z32-family VQVAE state dict with matching sizes")
  return vae, vqvae_params_from_torch(state, vae)


# ---------------------------------------------------------------------------------------------------------------------
# Converted folders and export.


def vqvae_kwargs(vae: VQVAE) -> dict:
  """The constructor kwargs of `vae` (precision excluded), JSON-able."""
  return dict(vocab_size=int(vae.vocab_size), z_channels=int(vae.z_channels), ch=int(vae.ch),
              ch_mult=[int(m) for m in vae.ch_mult], num_res_blocks=int(vae.num_res_blocks),
              share_quant_resi=int(vae.share_quant_resi), patch_nums=[int(p) for p in vae.patch_nums],
              quant_resi=float(vae.quant_resi), default_qresi_counts=int(vae.default_qresi_counts),
              using_znorm=bool(vae.using_znorm))


def vae_from_kwargs(kwargs: Mapping[str, Any], precision: Any = "highest") -> VQVAE:
  kw = dict(kwargs)
  kw["patch_nums"] = tuple(kw["patch_nums"])
  kw["ch_mult"] = tuple(kw.get("ch_mult", var_vqvae.CH_MULT))
  return VQVAE(precision=precision, **kw)


def _file_sha256(path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def convert_vqvae_file(path, patch_nums: Optional[Sequence[int]] = None, where: str = "--src"):
  """(vae, {'params': tree}, report) of a VQVAE file; report says what was read (JSON-able)."""
  vae, variables = load_vqvae_file(path, None, where, patch_nums)
  state_shapes = {k: list(v.shape) for k, v in torch_pickle.load_torch_state_dict(path).items()}
  report = dict(source_path=os.path.abspath(os.fspath(path)), file_sha256=_file_sha256(path),
                file_bytes=os.path.getsize(path), state_dict_entries=len(state_shapes),
                param_count=num_parameters(vae), buffer_shape=state_shapes.get(BUFFER_KEY),
                patch_nums_source="given" if patch_nums is not None else "released default (not stored in the file)")
  return vae, variables, report


def save_converted(out_dir, vae: VQVAE, variables, report: Mapping[str, Any], overwrite: bool = False) -> pathlib.Path:
  """Writes `out_dir/params` (Orbax `{'params': tree}`) and `out_dir/model.json`, all or nothing."""
  tree = variables["params"] if "params" in variables else variables
  meta = {"family": FAMILY, "vae": vqvae_kwargs(vae), "source": json.loads(json.dumps(dict(report)))}
  return tree_io.write_dir_atomically(out_dir, {PARAMS_DIR: {"params": tree}}, meta, overwrite=overwrite)


def load_converted(out_dir, precision: Any = "highest") -> Tuple[VQVAE, dict]:
  """(vae, {'params': tree}) of a folder written by `save_converted`; cli.UserError when it is not one."""
  out = pathlib.Path(out_dir)
  meta_path = out / MODEL_JSON
  if not meta_path.is_file():
    raise cli.UserError(f"{out} has no {MODEL_JSON}", str(out),
                        "pass a folder written by `python -m launch.convert vqvae`")
  meta = json.loads(meta_path.read_text())
  if meta.get("family") != FAMILY or "vae" not in meta:
    raise cli.UserError(f"{out} holds family {meta.get('family')!r}, not {FAMILY!r}", str(out),
                        "pass a folder written by `python -m launch.convert vqvae`")
  vae = vae_from_kwargs(meta["vae"], precision)
  tree = tree_io.load_params_dir(out / PARAMS_DIR)
  tree = tree["params"] if "params" in tree else tree
  vqvae_params_to_torch(tree, vae)  # checks every leaf and shape
  return vae, {"params": tree}


def export_vqvae(params, vae: VQVAE, path) -> "collections.OrderedDict[str, np.ndarray]":
  """Writes the upstream state dict (strict-loadable by VAR's VQVAE) as a torch zip `.pth` or `.safetensors`."""
  state = vqvae_params_to_torch(params, vae)
  if str(path).endswith(".safetensors"):
    torch_write.save_safetensors(state, path)
  else:
    torch_write.save_torch_zip(state, path)
  return state
