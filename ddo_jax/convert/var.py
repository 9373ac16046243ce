"""VAR transformer checkpoints (var_d16.pth, var_d30.pth, DDO's var_d*-ddo.pth) -> ddo-jax parameters, and back.

The released files are `torch.save(var.state_dict())` (docs/ARCHITECTURES.md §6.2): a torch zip, or the legacy
non-zip layout for files written with `_use_new_zipfile_serialization=False`; `.safetensors` copies are read too.
All three go through the allowlist reader of `ddo_jax.convert.torch_pickle` (nothing in the file is executed).
The architecture is read off the shapes (depth = number of blocks, embed_dim, heads from `scale_mul_1H11`,
vocabulary, Cvae, classes, mlp ratio, and patch_nums from the `lvl_1L` buffer), then every key, shape and dtype is
checked against `jax.eval_shape` of that VAR and the structural buffers (`lvl_1L`, `attn_bias_for_masking`,
`zero_k_bias`) against their constructor values. Every problem is one line, `cli.UserError`:

    error: <file> does not match VAR(depth=16, ...): 2 missing (blocks.0.attn.scale_mul_1H11, ...) (--src): <fix>

A VQVAE state dict, an EDM / EDM2 network pickle or another family's state dict is refused with a message that
names it and the converter to use.

Public API:
  load_var_file(path, where='--src', key=None) -> (config, {'params': tree}, report)
  convert_var_file(path, out_dir, overwrite=False, where='--src', key=None) -> report   (writes out_dir)
  load_converted(out_dir) -> ({'params': tree}, config, meta)
  export_var(params, config, path, fmt=None) -> the state dict written (upstream keys, order, dtypes)

Output layout of `convert_var_file` (as the EDM2 converter's):
  out_dir/params/     Orbax tree {'params': {'params': {...}}} (the VAR variables, numpy float32)
  out_dir/model.json  {'family': 'var', 'net': <config: nets.var.build_var(net)>, 'source': <report>}
"""
import collections
import json
import os
import pathlib
from typing import Any, Mapping, Optional, Tuple

import numpy as np

from ddo_jax import cli
from ddo_jax.convert import edm
from ddo_jax.convert import torch_pickle
from ddo_jax.convert import torch_write
from ddo_jax.convert import var_names
from ddo_jax.nets import var as var_net
from ddo_jax.tree_io import MODEL_JSON, load_params_dir, write_dir_atomically

__all__ = ["FAMILY", "convert_var_file", "export_var", "load_converted", "load_var_file", "summary"]

FAMILY = "var"
PARAMS_DIR = "params"
_FIX = "pass a VAR transformer state dict as released (var_d16.pth / var_d30.pth / var_d*-ddo.pth) or its .safetensors copy"
_VQVAE_MARKERS = ("encoder.conv_in.", "decoder.conv_in.", "quantize.embedding.weight", "quant_conv.",
                  "post_quant_conv.")
_OTHER_STATE_DICTS = (
    ("an EDM network state dict (EDMPrecond)", ("model.enc.", "model.dec.", "model.map_"), "launch.convert edm"),
    ("an EDM2 network state dict (Precond)", ("unet.enc.", "unet.dec.", "unet.emb_"), "launch.convert edm2"),
    ("a diffusers AutoencoderKL (SD VAE)", ("encoder.down_blocks.", "decoder.up_blocks."), "launch.convert sd-vae"),
)


def summary(config: Mapping[str, Any]) -> str:
  c = dict(config)
  return (f"VAR(depth={c['depth']}, embed_dim={c['embed_dim']}, num_heads={c['num_heads']}, "
          f"vocab_size={c['vocab_size']}, cvae={c['cvae']}, num_classes={c['num_classes']}, "
          f"patch_nums={list(c['patch_nums'])}, attn_l2_norm={c['attn_l2_norm']})")


def _container(path: str) -> str:
  with open(path, "rb") as f:
    head = f.read(64)
  if head.startswith(torch_pickle._ZIP_MAGIC):  # pylint: disable=protected-access
    return "torch zip"
  if head.startswith(torch_pickle._LEGACY_PREFIX):  # pylint: disable=protected-access
    return "torch legacy"
  if len(head) >= 9 and head[8:9] == b"{" and head[:1] != b"\x80":
    return "safetensors"
  if head[:1] == b"\x80":
    return "pickle"
  return "unknown"


def _describe_pickle(path: str) -> str:
  """What a plain (persistence) pickle holds, for the refusal message."""
  try:
    data = torch_pickle.load_persistence_pickle(path)
    classes = sorted({r.class_name for r in torch_pickle.iter_records(data)})
  except Exception:  # pylint: disable=broad-except (any unreadable pickle is refused the same way)
    classes = []
  names = {c.rsplit(".", 1)[-1] for c in classes}
  if names & {"MPConv", "MPFourier"} or "Precond" in names:
    return "an EDM2 network pickle (NVlabs/edm2 Precond)", "launch.convert edm2"
  if names & {"EDMPrecond", "VPPrecond", "VEPrecond", "iDDPMPrecond", "SongUNet", "DhariwalUNet"}:
    return "an EDM network pickle (NVlabs/edm)", "launch.convert edm"
  return "a plain pickle, not a torch.save state dict", ""


def _other_family(keys) -> Optional[Tuple[str, str]]:
  keys = list(keys)
  if any(k.startswith(_VQVAE_MARKERS) for k in keys):
    return "a VQVAE state dict (vae_ch160v4096z32 family), not the VAR transformer", "launch.convert vqvae"
  for name, markers, tool in _OTHER_STATE_DICTS:
    if any(k.startswith(markers) for k in keys):
      return name, tool
  return None


def _problem_text(problems: Mapping[str, list], limit: int = 6) -> str:
  parts = []
  for label in ("missing", "unexpected", "mismatched"):
    items = problems.get(label) or []
    if items:
      shown = ", ".join(items[:limit]) + (f", ... {len(items) - limit} more" if len(items) > limit else "")
      parts.append(f"{len(items)} {label} ({shown})")
  return "; ".join(parts)


def load_var_file(path, where: str = "--src", key: Optional[str] = None) -> Tuple[dict, dict, dict]:
  """Reads a VAR state dict file (torch zip, legacy torch.save or safetensors) without torch or exec.

  key: for a VAR training checkpoint (ar-ckpt*.pth), the nested state dict, 'trainer/var_wo_ddp'.
  Returns (config, {'params': tree}, report): the VAR config (fields of nets.var.VAR), numpy float32 leaves in
  Flax layouts, and a JSON-serializable report. Raises cli.UserError (one line) on every problem.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise cli.UserError(f"no such file {path}", where, _FIX)
  container = _container(path)
  if container == "pickle":
    what, tool = _describe_pickle(path)
    raise cli.UserError(f"{path} is {what}, not a VAR state dict", where,
                        f"convert it with `{tool}`" if tool else _FIX)
  try:
    state = torch_pickle.load_torch_state_dict(path, key=key)
  except (torch_pickle.CheckpointFormatError, torch_pickle.ForbiddenGlobalError) as e:
    msg = " ".join(str(e).split())
    raise cli.UserError(f"cannot read {path} as a VAR state dict ({msg})", where, _FIX) from e
  other = _other_family(state)
  if other is not None:
    raise cli.UserError(f"{path} is {other[0]}", where, f"convert it with `{other[1]}`")
  shapes = {k: tuple(np.shape(v)) for k, v in state.items()}
  try:
    config = var_names.config_from_shapes(shapes, state.get("lvl_1L"))
  except (KeyError, ValueError, IndexError) as e:
    raise cli.UserError(f"{path} is not a VAR transformer state dict (no usable {e} entry)", where, _FIX) from e
  problems = var_names.state_dict_problems({k: (np.shape(v), np.asarray(v).dtype.name) for k, v in state.items()},
                                           config)
  bad_buffers = var_names.buffer_problems(state, config)
  if bad_buffers:
    problems["mismatched"] = problems["mismatched"] + [f"{k} values differ from the constructor's" for k in bad_buffers]
  if any(problems.values()):
    raise cli.UserError(f"{path} does not match {summary(config)}: {_problem_text(problems)}", where,
                        "pass the state dict of a VAR built with shared_aln=False (the released d16/d30 files); "
                        "files from before April 2024 lack scale_mul_1H11 and need attn_l2_norm=False")
  params = var_names.torch_to_flax(state, config)
  report = dict(
      source_path=os.path.abspath(path),
      file_sha256=edm.file_sha256(path),
      file_bytes=os.path.getsize(path),
      container=container,
      nested_key=key,
      state_dict_entries=len(state),
      stored_dtypes={k: np.asarray(v).dtype.name for k, v in state.items() if np.asarray(v).dtype != np.float32},
      param_count=var_names.num_parameters(config),
      key_check=dict(expected=len(var_names.expected_entries(config)),
                     **{k: len(v) for k, v in problems.items()}),
      structural_buffers_checked=list(var_names.structural_buffers(config)),
      config=config,
  )
  return config, params, report


def convert_var_file(path, out_dir, overwrite: bool = False, where: str = "--src",
                     key: Optional[str] = None) -> dict:
  """load_var_file, then writes out_dir/params (Orbax {'params': variables}) and out_dir/model.json atomically.

  Returns the report (also in model.json 'source'); an existing non-empty out_dir needs overwrite=True.
  """
  config, variables, report = load_var_file(path, where, key)
  meta = {"family": FAMILY, "net": json.loads(json.dumps(config)), "source": json.loads(json.dumps(report))}
  write_dir_atomically(out_dir, {PARAMS_DIR: {"params": variables}}, meta, overwrite=overwrite)
  return report


def load_converted(out_dir) -> Tuple[dict, dict, dict]:
  """({'params': tree}, config, meta) from a folder written by convert_var_file (numpy arrays)."""
  out = pathlib.Path(out_dir)
  meta_path = out / MODEL_JSON
  if not meta_path.is_file():
    raise cli.UserError(f"no {MODEL_JSON} in {out}", str(out), "convert the checkpoint with `launch.convert var`")
  meta = json.loads(meta_path.read_text())
  if meta.get("family") != FAMILY:
    raise cli.UserError(f"{out} holds family {meta.get('family')!r}, not {FAMILY!r}", str(out),
                        "pass a folder written by `launch.convert var`")
  tree = load_params_dir(out / PARAMS_DIR)
  variables = tree["params"] if "params" in tree.get("params", {}) else tree
  _check_tree(variables, meta["net"], str(out / PARAMS_DIR))
  return variables, meta["net"], meta


def _check_tree(variables, config, where: str) -> None:
  want = {"/".join(p): s for p, s in var_names.abstract_shapes(config).items()}
  got = {}

  def walk(node, prefix):
    for k, v in node.items():
      if isinstance(v, Mapping):
        walk(v, f"{prefix}{k}/")
      else:
        got[f"{prefix}{k}"] = tuple(np.shape(v))
  walk(variables.get("params", {}) if isinstance(variables, Mapping) else {}, "")
  problems = {"missing": sorted(set(want) - set(got)), "unexpected": sorted(set(got) - set(want)),
              "mismatched": sorted(f"{k} {list(got[k])} vs {list(want[k])}" for k in set(want) & set(got)
                                   if got[k] != want[k])}
  if any(problems.values()):
    raise cli.UserError(f"parameters do not match {summary(config)}: {_problem_text(problems)}", where,
                        "pass the {'params': ...} tree of nets.var.build_var(config)")


def export_var(params, config: Mapping[str, Any], path, fmt: Optional[str] = None
               ) -> "collections.OrderedDict[str, np.ndarray]":
  """Writes the upstream VAR state_dict of {'params': ...} to `path` and returns it.

  Keys, order, shapes and dtypes are exactly `VAR.state_dict()`'s (float32, lvl_1L int64, the buffers recreated),
  so upstream loads it with::

    var.load_state_dict(torch.load('var_d16-ddo-jax.pth', map_location='cpu', weights_only=True), strict=True)

  fmt: 'torch' (zip torch.save layout) or 'safetensors'; inferred from the extension when None.
  """
  try:
    fmt = edm.export_format(path, fmt)
  except ValueError as e:
    raise cli.UserError(str(e), "--dst", "name the file .pth / .pt or .safetensors") from e
  _check_tree(params if "params" in params else {"params": params}, config, "params")
  state = var_names.flax_to_torch(params, config)
  pathlib.Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
  if fmt == "safetensors":
    torch_write.save_safetensors(state, path, metadata={"format": "pt", "family": FAMILY})
  else:
    torch_write.save_torch_zip(state, path)
  return state
