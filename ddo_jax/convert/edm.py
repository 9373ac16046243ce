"""EDM network pickles -> ddo-jax params (and DDO-tuned params -> EDM state dicts), without torch or exec.

An EDM snapshot (``network-snapshot-*.pkl``, NVlabs/edm) is a pickle whose persistent objects embed the source
code of their classes; ``pickle.load`` would ``exec`` it (docs/ARCHITECTURES.md §6.1). Here it is read with the
allowlist unpickler of :mod:`ddo_jax.convert.torch_pickle`: nothing from the file is executed. The embedded
sources are hashed and compared with the upstream files (DDO caveat §6.1.7: DDO's own pickles may carry modified
sources; a hash that differs is reported, the text can be inspected, it is never run).

Public API:
  convert_edm_pickle(path, which='ema') -> (params, net_config, report)
  convert_edm_state_dict(state_dict, init_kwargs, class_name='EDMPrecond') -> (params, net_config)
  save_converted(out_dir, params, net_config, report, overwrite=False)
  load_converted(out_dir) -> (params, net_config)
  load_params_dir(path) -> the ``{'params': ...}`` tree of an Orbax dir (e.g. a round's ``chosen/``)
  export_edm(params, net_config, path, fmt=None) -> the exported state dict
  write_dir_atomically(out_dir, trees, meta, overwrite=False)

Output layout of :func:`save_converted`::

  out_dir/params/      Orbax StandardCheckpointer tree {'params': {'model': {...}}} (what launch/train.py loads
                       as init.checkpoint, and what every round's chosen/ holds)
  out_dir/model.json   {'family': 'edm', 'net': <config for build_precond>, 'source': <report>}
"""
import collections
import hashlib
import json
import os
import pathlib
import zipfile
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ddo_jax.convert import edm_names
from ddo_jax.convert import torch_pickle
from ddo_jax.convert import torch_write
from ddo_jax.convert.torch_pickle import CheckpointFormatError, ForbiddenGlobalError  # noqa: F401 (re-export)
from ddo_jax.tree_io import MODEL_JSON, load_params_dir, write_dir_atomically  # noqa: F401 (re-export)

__all__ = [
    "KNOWN_SOURCES",
    "UnsupportedCheckpointError",
    "check_params",
    "convert_edm_pickle",
    "convert_edm_state_dict",
    "export_edm",
    "export_format",
    "file_sha256",
    "load_converted",
    "load_params_dir",
    "module_source_texts",
    "normalize_config",
    "read_model_json",
    "save_converted",
    "source_status",
    "write_dir_atomically",
]

# sha256 of the real upstream module sources, from shared/goldens/formats/*.json ('real_module_src_sha256').
KNOWN_SOURCES = {
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284": "NVlabs/edm@008a4e5 training/networks.py",
    "b26f0937bc72b18cc5f9869c86035ca9b872138cdfae7994237e9733951e4415": "NVlabs/edm@008a4e5 training/loss.py",
    "fd411af7c2d74489ce11a245293047369fc044d00a9aeed1c0bd46b322c8a8b5": "NVlabs/edm@008a4e5 training/augment.py",
    "7298880db4bf955d2941496cce3a554a970867b3eae4d22276cb1c293c131fa2":
        "NVlabs/edm2@4bf8162 training/networks_edm2.py",
    "889cd0f7f0c59beaa373f928f5aa5e83c1865595e330a32eca8daa810afba50c": "NVlabs/edm2@4bf8162 training/encoders.py",
    "eb070f85cb46012bbe549402d8721f5997bbd73c23a2db157eaf88de1b1b95e2":
        "NVlabs/edm2@4bf8162 training/training_loop.py",
}
SOURCE_DIFFERS = "differs from upstream: inspect module_src as text, it was not executed"

EDM_PRECONDS = ("EDMPrecond", "VPPrecond", "VEPrecond")
EDM_MODELS = ("SongUNet",)
EDM2_CLASSES = ("Precond", "UNet", "MPConv", "MPFourier", "Block")
FAMILY = "edm"
PARAMS_DIR = "params"

# Byte strings whose presence in a torch.save object pickle identifies the family of a state dict.
_VAR_MARKERS = (b"lvl_1L", b"attn_bias_for_masking", b"word_embed", b"pos_start")
_VQVAE_MARKERS = (b"quantize.embedding", b"ema_vocab_hit_SV", b"quant_conv")
_SNIFF_BYTES = 16 << 20


class UnsupportedCheckpointError(ValueError):
  """The file is a checkpoint of another family (EDM2, VAR, ...) or of an EDM variant this port lacks."""


# ---------------------------------------------------------------------------------------------------------------------
# Small helpers.


def file_sha256(path) -> str:
  """Hex sha256 of a file, read in 1 MiB chunks."""
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _jsonable(obj):
  """A JSON-friendly copy of plain pickle data (numpy scalars/arrays, tuples, sets); other objects by name."""
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, np.ndarray):
    return obj.tolist() if obj.size <= 64 else f"<array {obj.dtype}{list(obj.shape)}>"
  if isinstance(obj, Mapping):
    return {str(k): _jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple, set, frozenset)):
    return [_jsonable(v) for v in obj]
  if obj is None or isinstance(obj, (bool, int, float, str)):
    return obj
  if isinstance(obj, torch_pickle.PersistentRecord):
    return f"<persistent object {obj.class_name}>"
  return f"<{type(obj).__name__}>"


def _child(record, name: str):
  """The submodule ``name`` of a module record, or None."""
  state = record.state if isinstance(record.state, dict) else {}
  return (state.get("_modules") or {}).get(name)


def _count(tree) -> int:
  """Number of elements in a nested dict of arrays."""
  if isinstance(tree, Mapping):
    return sum(_count(v) for v in tree.values())
  return int(np.prod(np.shape(tree), dtype=np.int64))


def normalize_config(net_config: Mapping[str, Any]) -> dict:
  """A config read back from JSON with the tuple fields of ``config_from_init_kwargs`` restored."""
  config = json.loads(json.dumps(dict(net_config)))
  mk = config.get("model_kwargs", {})
  for key in ("channel_mult", "attn_resolutions", "resample_filter"):
    if key in mk:
      mk[key] = tuple(mk[key])
  return config


# ---------------------------------------------------------------------------------------------------------------------
# Recognizing what the file is.


def _describe_torch_save(path: str, head: bytes) -> str:
  """Why a ``torch.save``/safetensors file is not an EDM network pickle (names VAR/VQVAE state dicts)."""
  if head.startswith(b"PK\x03\x04"):
    with zipfile.ZipFile(path) as zf:
      pkls = [n for n in zf.namelist() if n.endswith("/data.pkl")]
      blob = zf.read(pkls[0]) if pkls else b""
    kind = "a torch.save zip archive"
  elif len(head) >= 9 and head[8:9] == b"{":
    with open(path, "rb") as f:
      blob = f.read(_SNIFF_BYTES)
    kind = "a safetensors file"
  else:
    with open(path, "rb") as f:
      blob = f.read(_SNIFF_BYTES)
    kind = "a legacy torch.save file"
  if any(m in blob for m in _VAR_MARKERS):
    return (f"{path}: this is a VAR state dict ({kind}, e.g. var_d16.pth / var_d*-ddo.pth), not an EDM network "
            f"pickle; VAR checkpoints are a different family and are not converted by the 'edm' converter.")
  if any(m in blob for m in _VQVAE_MARKERS):
    return (f"{path}: this is a VAR VQVAE state dict ({kind}), not an EDM network pickle; it is not converted by "
            f"the 'edm' converter.")
  if b"model.enc." in blob:
    return (f"{path}: this is {kind} holding an EDM precond state dict (keys 'model.*'), not an EDM network pickle; "
            f"it lacks the constructor kwargs. Convert it with ddo_jax.convert.edm.convert_edm_state_dict("
            f"state_dict, init_kwargs, class_name) using the released pickle's kwargs.")
  return (f"{path}: this is {kind}, not an EDM network pickle (network-snapshot-*.pkl written by "
          f"torch_utils.persistence).")


def _check_not_state_dict_file(path: str) -> None:
  """Refuses torch.save / safetensors files before the pickle reader would."""
  with open(path, "rb") as f:
    head = f.read(64)
  is_zip = head.startswith(b"PK\x03\x04")
  is_legacy = head.startswith(torch_pickle._LEGACY_PREFIX)  # pylint: disable=protected-access
  is_safetensors = len(head) >= 9 and head[8:9] == b"{" and head[:1] != b"\x80"
  if is_zip or is_legacy or is_safetensors:
    raise UnsupportedCheckpointError(_describe_torch_save(path, head))


def _edm2_message(path: str, why: str) -> str:
  """The refusal message for an EDM2 pickle; ``why`` says how it was recognized."""
  return (f"{path}: this is an EDM2 network pickle ({why}; NVlabs/edm2 networks_edm2.py). EDM2 is a different "
          f"family (magnitude-preserving UNet, Precond/UNet/MPConv classes, fp16, optional VAE encoder), not "
          f"supported by the EDM converter, which reads EDM (NVlabs/edm) EDMPrecond/VPPrecond/VEPrecond + SongUNet "
          f"pickles; convert it with `python -m launch.convert edm2`.")


def _select_record(data: Mapping, path: str, which: str):
  """``data[which]`` after checking that the pickle is an EDM (not EDM2) snapshot of a supported class."""
  if "encoder" in data:
    raise UnsupportedCheckpointError(_edm2_message(path, "its top level has an 'encoder' entry"))
  if which not in data:
    raise CheckpointFormatError(f"{path}: no {which!r} entry; the top-level keys are {list(data)}")
  record = data[which]
  if not isinstance(record, torch_pickle.PersistentRecord):
    raise CheckpointFormatError(f"{path}: {which!r} is a {type(record).__name__}, not a persistent network object")
  name = torch_pickle.class_name(record)
  if name in EDM2_CLASSES:
    raise UnsupportedCheckpointError(_edm2_message(path, f"data[{which!r}] is a {name}"))
  if name not in EDM_PRECONDS:
    raise UnsupportedCheckpointError(f"{path}: data[{which!r}] is a {name}; this converter supports "
                                     f"{list(EDM_PRECONDS)} (iDDPMPrecond/ADM is not implemented)")
  model = _child(record, "model")
  model_name = torch_pickle.class_name(model) if model is not None else None
  if model_name not in EDM_MODELS:
    raise UnsupportedCheckpointError(f"{path}: {name}.model is a {model_name}; only SongUNet (DDPM++) is "
                                     f"implemented (DhariwalUNet/ADM is not)")
  return record


# ---------------------------------------------------------------------------------------------------------------------
# Report.


def source_status(sha: str) -> Dict[str, Any]:
  """``{'sha256', 'upstream', 'matches_upstream', 'status'}`` of one embedded module source."""
  upstream = KNOWN_SOURCES.get(sha)
  status = f"matches upstream {upstream}" if upstream else SOURCE_DIFFERS
  return dict(sha256=sha, upstream=upstream, matches_upstream=upstream is not None, status=status)


def module_source_texts(data) -> Dict[str, Tuple[str, str]]:
  """``{sha256: (first class name, module_src text)}`` of every distinct embedded source (for inspection only)."""
  out: Dict[str, Tuple[str, str]] = {}
  for record in torch_pickle.iter_records(data):
    sha = hashlib.sha256(record.module_src.encode("utf-8")).hexdigest()
    out.setdefault(sha, (record.class_name, record.module_src))
  return out


def _report(path: str, data: Mapping, which: str, record, state_dict: Mapping, params) -> dict:
  """What was read and how it compares with upstream (JSON-serializable)."""
  sources = {name: source_status(sha) for name, sha in torch_pickle.module_sources(data).items()}
  buffers = [k for k in state_dict if k.endswith(".resample_filter")]
  report = dict(
      source_path=os.path.abspath(path),
      file_sha256=file_sha256(path),
      file_bytes=os.path.getsize(path),
      top_level_keys=[str(k) for k in data],
      which=which,
      precond_class=torch_pickle.class_name(record),
      model_class=torch_pickle.class_name(_child(record, "model")),
      classes=sorted({r.class_name for r in torch_pickle.iter_records(data)}),
      init_kwargs=_jsonable(torch_pickle.init_kwargs(record)),
      module_sources=sources,
      sources_match_upstream=all(s["matches_upstream"] for s in sources.values()),
      param_count=_count(params),
      state_dict_entries=len(state_dict),
      buffers=len(buffers),
  )
  if "dataset_kwargs" in data:
    report["dataset_kwargs"] = _jsonable(data["dataset_kwargs"])
  return report


# ---------------------------------------------------------------------------------------------------------------------
# Conversion.


def convert_edm_state_dict(state_dict: Mapping[str, Any], init_kwargs: Mapping[str, Any],
                           class_name: str = "EDMPrecond") -> Tuple[dict, dict]:
  """Flax params and config from an EDMPrecond/VPPrecond/VEPrecond state dict and its constructor kwargs.

  Raises ValueError for unsupported kwargs, and one ValueError listing every missing key, unexpected key and shape
  mismatch (``edm_names.torch_to_flax``).
  """
  config = edm_names.config_from_init_kwargs(init_kwargs, class_name)
  params = edm_names.torch_to_flax(state_dict, config)
  return params, config


def convert_edm_pickle(path, which: str = "ema") -> Tuple[dict, dict, dict]:
  """Reads an EDM network pickle without executing anything and converts ``data[which]``.

  Args:
    path: an NVlabs/edm ``network-snapshot-*.pkl`` (or a DDO EDM pickle in the same format).
    which: the top-level entry holding the network (``'ema'`` in every EDM snapshot).

  Returns:
    ``(params, net_config, report)``: Flax params ``{'model': {...}}`` (numpy float32) for
    ``build_precond(net_config)``, and a JSON-serializable report (file sha256, top-level keys, class names,
    per-class sha256 of the embedded sources and whether each equals a known upstream file, param count,
    dataset_kwargs).

  Raises:
    FileNotFoundError: no such file.
    ForbiddenGlobalError: the pickle names a global outside the allowlist (nothing was executed).
    UnsupportedCheckpointError: EDM2 pickle, VAR/VQVAE state dict, another torch.save file, unsupported classes.
    CheckpointFormatError: truncated/corrupt file, or no ``which`` entry.
    ValueError: the state dict does not match the net its kwargs describe (lists every problem).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  _check_not_state_dict_file(path)
  data = torch_pickle.load_persistence_pickle(path)
  record = _select_record(data, path, which)
  state_dict = torch_pickle.module_state_dict(record)
  params, config = convert_edm_state_dict(state_dict, torch_pickle.init_kwargs(record),
                                          torch_pickle.class_name(record))
  return params, config, _report(path, data, which, record, state_dict, params)


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading converted models.


def save_converted(out_dir, params, net_config: Mapping[str, Any], report: Mapping[str, Any],
                   overwrite: bool = False) -> pathlib.Path:
  """Writes ``out_dir/params`` (Orbax ``{'params': params}``) and ``out_dir/model.json`` atomically."""
  meta = {"family": FAMILY, "net": json.loads(json.dumps(dict(net_config))), "source": dict(report)}
  return write_dir_atomically(out_dir, {PARAMS_DIR: {"params": params}}, meta, overwrite=overwrite)


def read_model_json(path) -> dict:
  """The ``{'family', 'net', 'source'}`` record of a converted model (``path``: the file or its folder)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / MODEL_JSON
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (expected the model.json written by launch/convert.py edm)")
  meta = json.loads(path.read_text())
  if meta.get("family") != FAMILY or "net" not in meta:
    raise UnsupportedCheckpointError(f"{path}: family {meta.get('family')!r}, expected {FAMILY!r} with a 'net' config")
  return meta


def check_params(params, net_config, where: str = "params") -> None:
  """Raises ValueError listing every leaf whose path or shape differs from ``build_precond(net_config)``."""
  want = _flat_shapes(edm_names.abstract_params(net_config))
  got = _flat_shapes(params)
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  bad = sorted(f"{k}: got {list(got[k])} vs expected {list(want[k])}" for k in set(want) & set(got)
               if tuple(got[k]) != tuple(want[k]))
  if missing or extra or bad:
    lines = [f"{where} do not match the net in model.json:"]
    for title, items in (("missing leaves", missing), ("unexpected leaves", extra), ("shape mismatches", bad)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    raise ValueError("\n".join(lines))


def _flat_shapes(tree, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
  """``{'a/b/c': shape}`` of a nested dict whose leaves are arrays or shape tuples."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_shapes(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, tuple) else tuple(np.shape(v))
  return out


def load_converted(out_dir) -> Tuple[dict, dict]:
  """``(params, net_config)`` from a folder written by :func:`save_converted` (params as numpy arrays)."""
  out = pathlib.Path(out_dir)
  meta = read_model_json(out)
  config = normalize_config(meta["net"])
  tree = load_params_dir(out / PARAMS_DIR)
  if not isinstance(tree, Mapping) or "params" not in tree:
    raise CheckpointFormatError(f"{out / PARAMS_DIR}: expected an Orbax tree {{'params': ...}}")
  check_params(tree["params"], config, where=str(out / PARAMS_DIR))
  return tree["params"], config


# ---------------------------------------------------------------------------------------------------------------------
# Export back to EDM.

EXPORT_FORMATS = ("safetensors", "torch")


def export_format(path, fmt: Optional[str] = None) -> str:
  """``fmt`` checked, or inferred from the extension (``.safetensors`` -> safetensors, ``.pt``/``.pth`` -> torch)."""
  if fmt:
    if fmt not in EXPORT_FORMATS:
      raise ValueError(f"unknown export format {fmt!r}; use one of {list(EXPORT_FORMATS)}")
    return fmt
  suffix = pathlib.Path(path).suffix.lower()
  if suffix == ".safetensors":
    return "safetensors"
  if suffix in (".pt", ".pth", ".bin"):
    return "torch"
  raise ValueError(f"{path}: cannot infer the format from the extension; name it .safetensors or .pt, or pass fmt")


def export_edm(params, net_config: Mapping[str, Any], path, fmt: Optional[str] = None
               ) -> "collections.OrderedDict[str, np.ndarray]":
  """Writes the EDMPrecond ``state_dict`` of ``params`` (keys ``model.…``, buffers included, float32) to ``path``.

  ``fmt``: ``'torch'`` (a ``torch.save``-compatible zip, read by ``torch.load(path, weights_only=True)``) or
  ``'safetensors'``; inferred from the extension when None. Keys, order, shapes and dtypes are those of
  ``net.state_dict()`` in NVlabs/edm, so DDO-tuned weights go back into the original code::

    # in the NVlabs/edm repo (this runs the pickle's code: do it only for a pickle you trust, e.g. the release)
    import pickle, torch, dnnlib
    with dnnlib.util.open_url('edm-cifar10-32x32-cond-vp.pkl') as f:
      net = pickle.load(f)['ema']
    net.load_state_dict(torch.load('ddo.pt', weights_only=True))          # or:
    # from safetensors.torch import load_file; net.load_state_dict(load_file('ddo.safetensors'))
    with open('ddo-edm.pkl', 'wb') as f:                                  # optional: a snapshot for generate.py
      pickle.dump(dict(ema=net), f)

  Returns the exported state dict (``OrderedDict[str, np.ndarray]``).
  """
  fmt = export_format(path, fmt)
  state_dict = edm_names.flax_to_torch(params, net_config)
  parent = pathlib.Path(path).absolute().parent
  parent.mkdir(parents=True, exist_ok=True)
  if fmt == "safetensors":
    torch_write.save_safetensors(state_dict, path, metadata={"format": "pt", "family": "edm"})
  else:
    torch_write.save_torch_zip(state_dict, path)
  return state_dict

