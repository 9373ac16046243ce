"""EDM2 network pickles -> ddo-jax variables (and back to EDM2 Precond state dicts), without torch or exec.

An EDM2 snapshot or post-hoc EMA reconstruction (NVlabs/edm2 training_loop.py, reconstruct_phema.py) is a pickle
whose top level is a ``dnnlib.util.EasyDict`` with ``encoder`` (StandardRGBEncoder / StabilityVAEEncoder),
``dataset_kwargs``, ``loss_fn`` and ``ema`` (the Precond, every tensor float16); docs/ARCHITECTURES.md §6.1.1. DDO's
released ``edm2-img64-s-ddo.pkl`` / ``edm2-img512-l-ddo.pkl`` are read by upstream's loader in the same way
(``pickle.load(f)['ema']``), so they take the same path; their embedded sources may differ from upstream, which the
report says (§6.1.7). The file is read with the allowlist unpickler of :mod:`ddo_jax.convert.torch_pickle`: nothing
from it is executed, the embedded sources are only hashed.

Public API:
  convert_edm2_pickle(path, which='ema') -> (variables, net_config, encoder, report)
  convert_edm2_data(data, path, which='ema') -> the same from an already read pickle top level
  convert_edm2_state_dict(state_dict, init_kwargs, class_name='Precond') -> (variables, net_config)
  encoder_description(record) -> the JSON description of a pickled encoder
  save_converted(out_dir, variables, net_config, encoder, report, overwrite=False, gain_dtype=None)
  load_converted(out_dir) -> (variables, net_config, meta)
  variables_of(orbax_tree) -> the {'params', 'buffers'} variables of {'params': variables} or of bare variables
  build_net(meta, precision='highest') -> the edm2_unet.Precond that model.json describes
  check_variables(variables, net_config, where)
  state_dict_problems({key: shape}, net_config) -> {'missing', 'unexpected', 'mismatched'}
  export_edm2(variables, net_config, path, fmt=None, dtype='float32') -> the exported state dict

Output layout of :func:`save_converted`::

  out_dir/params/      Orbax tree {'params': {'params': {...}, 'buffers': {...}}}: the Flax variables of
                       edm2_unet.Precond (numpy float32; the pickle's float16 values widened exactly), wrapped as every
                       round's chosen/ is (what launch/train.py loads as init.checkpoint for the EDM2 family, whose
                       parameters are the whole variable tree)
  out_dir/model.json   {'family': 'edm2', 'net': <config for edm2_unet.build_precond>, 'gain_dtype': 'float16' or
                        null, 'encoder': <encoder description>, 'source': <report>}

``gain_dtype`` is 'float16' when the pickle stored float16 gains: upstream then rounds ``gain / sqrt(fan_in)`` to
float16 in every MPConv, so ``build_net(meta)`` reproduces the pickle's own forward (upstream on CPU) exactly;
``build_precond(meta['net'])`` is the plain float32 net that fine-tuning uses.
"""
import collections
import json
import os
import pathlib
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np

from ddo_jax.convert import edm
from ddo_jax.convert import edm2_names
from ddo_jax.convert import torch_pickle
from ddo_jax.convert import torch_write
from ddo_jax.convert.edm import CheckpointFormatError, UnsupportedCheckpointError  # noqa: F401 (re-export)
from ddo_jax.nets import edm2_encoders, edm2_unet
from ddo_jax.tree_io import MODEL_JSON, load_params_dir, write_dir_atomically

__all__ = [
    "ENCODER_CLASSES",
    "FAMILY",
    "build_net",
    "check_variables",
    "convert_edm2_data",
    "convert_edm2_pickle",
    "convert_edm2_state_dict",
    "encoder_description",
    "export_edm2",
    "load_converted",
    "normalize_config",
    "read_model_json",
    "save_converted",
    "state_dict_problems",
    "variables_of",
]

FAMILY = "edm2"
PARAMS_DIR = "params"
EDM2_PRECONDS = ("Precond",)
EDM2_MODELS = ("UNet",)
ENCODER_CLASSES = ("StandardRGBEncoder", "StabilityVAEEncoder")
EXPORT_DTYPES = ("float32", "float16")
_TUPLE_KEYS = ("channel_mult", "attn_resolutions", "resample_filter")


# ---------------------------------------------------------------------------------------------------------------------
# Recognizing what the file is.


def _select_record(data: Mapping, path: str, which: str):
  """``data[which]`` after checking that the pickle is an EDM2 snapshot holding a Precond + UNet."""
  if which not in data:
    raise CheckpointFormatError(f"{path}: no {which!r} entry; the top-level keys are {list(data)}")
  record = data[which]
  if not isinstance(record, torch_pickle.PersistentRecord):
    raise CheckpointFormatError(f"{path}: {which!r} is a {type(record).__name__}, not a persistent network object")
  name = torch_pickle.class_name(record)
  if name in edm.EDM_PRECONDS:
    raise UnsupportedCheckpointError(
        f"{path}: this is an EDM network pickle (data[{which!r}] is a {name}; NVlabs/edm networks.py), not an "
        f"EDM2 one; convert it with `python -m launch.convert edm`")
  if name not in EDM2_PRECONDS:
    raise UnsupportedCheckpointError(f"{path}: data[{which!r}] is a {name}; the EDM2 converter supports "
                                     f"{list(EDM2_PRECONDS)} (training.networks_edm2.Precond)")
  unet = edm._child(record, "unet")  # pylint: disable=protected-access
  unet_name = torch_pickle.class_name(unet) if unet is not None else None
  if unet_name not in EDM2_MODELS:
    raise UnsupportedCheckpointError(f"{path}: Precond.unet is a {unet_name}; the EDM2 converter supports "
                                     f"{list(EDM2_MODELS)}")
  return record


def encoder_description(record) -> Dict[str, Any]:
  """The JSON description of a pickled EDM2 encoder (what ``edm2_encoders`` needs to rebuild it).

  StandardRGBEncoder has no state. StabilityVAEEncoder carries ``scale`` / ``bias`` (float32, one per latent
  channel; final = raw * scale + bias), ``vae_name`` and ``batch_size``; its VAE is not in the pickle (upstream
  pickles ``_vae=None`` and downloads the VAE at init): convert it apart with ``launch.convert sd-vae``.
  """
  name = torch_pickle.class_name(record)
  if name not in ENCODER_CLASSES:
    raise UnsupportedCheckpointError(f"encoder is a {name}; known EDM2 encoders are {list(ENCODER_CLASSES)}")
  state = record.state if isinstance(record.state, dict) else {}
  out: Dict[str, Any] = {"class_name": name, "init_kwargs": edm._jsonable(torch_pickle.init_kwargs(record))}  # pylint: disable=protected-access
  if name == "StabilityVAEEncoder":
    for key in ("scale", "bias"):
      value = state.get(key)
      if not isinstance(value, np.ndarray) or value.ndim != 1 or not value.size or value.dtype.kind != "f":
        raise CheckpointFormatError(f"StabilityVAEEncoder state lacks a 1-d float {key!r} array (got "
                                    f"{type(value).__name__})")
      # The stored float32 values, exactly (float32 -> float64 -> JSON -> float32 round-trips).
      out[key] = [float(v) for v in np.asarray(state[key], np.float32).reshape(-1)]
    out["vae_name"] = str(state.get("vae_name", "stabilityai/sd-vae-ft-mse"))
    out["batch_size"] = int(state.get("batch_size", 8))
  return out


def _default_encoder(img_channels: int) -> Dict[str, Any]:
  """The encoder of a pickle without one. Upstream's generate_images.py then uses StandardRGBEncoder, which fits
  3-channel nets only; for a latent net the StabilityVAEEncoder with upstream's default statistics is assumed (and
  the note says so)."""
  missing = "the pickle has no 'encoder'; "
  if img_channels == 3:
    return {"class_name": "StandardRGBEncoder", "init_kwargs": {},
            "note": missing + "upstream's generate_images.py then uses StandardRGBEncoder"}
  d = edm2_encoders.STABILITY_DEFAULTS
  scale, bias = edm2_encoders.stability_constants(d["raw_mean"], d["raw_std"], d["final_mean"], d["final_std"])
  return {"class_name": "StabilityVAEEncoder", "init_kwargs": {}, "scale": [float(v) for v in scale],
          "bias": [float(v) for v in bias], "vae_name": d["vae_name"], "batch_size": d["batch_size"],
          "note": missing + f"a {img_channels}-channel latent net: assumed StabilityVAEEncoder with upstream's default "
                  "raw_mean/raw_std/final_std (upstream's generate_images.py would fall back to StandardRGBEncoder, "
                  "which cannot decode latents); check these against how the net was trained"}


def _check_encoder(encoder: Mapping[str, Any], config: Mapping[str, Any], path: str) -> None:
  """The encoder's latent channel count against the net's img_channels."""
  channels = config["img_channels"]
  if encoder["class_name"] == "StabilityVAEEncoder" and len(encoder["scale"]) != channels:
    raise CheckpointFormatError(f"{path}: the StabilityVAEEncoder has {len(encoder['scale'])} latent channels "
                                f"(scale/bias) but the Precond has img_channels={channels}")
  if encoder["class_name"] == "StandardRGBEncoder" and channels != 3:
    raise CheckpointFormatError(f"{path}: a StandardRGBEncoder gives 3 channels but the Precond has "
                                f"img_channels={channels}")


# ---------------------------------------------------------------------------------------------------------------------
# Conversion.


def normalize_config(net_config: Mapping[str, Any]) -> dict:
  """A config read back from JSON with the tuple fields of ``edm2_names.config_from_init_kwargs`` restored."""
  config = json.loads(json.dumps(dict(net_config)))
  uk = config.get("unet_kwargs", {})
  for key in _TUPLE_KEYS:
    if key in uk:
      uk[key] = tuple(uk[key])
  return config


def convert_edm2_state_dict(state_dict: Mapping[str, Any], init_kwargs: Mapping[str, Any],
                            class_name: str = "Precond") -> Tuple[dict, dict]:
  """Flax variables ``{'params', 'buffers'}`` (numpy float32) and config from a Precond state dict + its kwargs.

  Raises ValueError for unknown kwargs, and one ValueError listing every missing key, unexpected key and shape
  mismatch (``edm2_names.torch_to_flax``).
  """
  config = edm2_names.config_from_init_kwargs(init_kwargs, class_name)
  return edm2_names.torch_to_flax(state_dict, config), config


def state_dict_problems(shapes: Mapping[str, Any], net_config) -> Dict[str, list]:
  """``{'missing', 'unexpected', 'mismatched'}`` of a state dict given by its key -> shape map (nothing allocated).

  The same check ``convert_edm2_state_dict`` makes before converting; this form takes shapes only, so that full-size
  key manifests (goldens/keys/edm2-*.json) can be checked without their 0.3 to 0.8 G values.
  """
  expected = {e.torch_key: e.torch_shape for e in edm2_names.expected_entries(net_config)}
  given = {k: tuple(int(n) for n in v) for k, v in shapes.items()}
  return {"missing": [k for k in expected if k not in given],
          "unexpected": [k for k in given if k not in expected],
          "mismatched": [f"{k}: got {list(given[k])} vs expected {list(expected[k])}"
                         for k in given if k in expected and given[k] != expected[k]]}


def _count(tree) -> int:
  if isinstance(tree, Mapping):
    return sum(_count(v) for v in tree.values())
  return int(np.prod(np.shape(tree), dtype=np.int64))


def _stored_gain_dtype(state_dict: Mapping[str, np.ndarray]) -> Optional[str]:
  """'float16' when the pickle's 0-dim gains are float16 (upstream then rounds gain / sqrt(fan_in) to float16)."""
  dtypes = {np.asarray(v).dtype.name for k, v in state_dict.items() if k.endswith("_gain")}
  return "float16" if dtypes == {"float16"} else None


def _report(path: str, data: Mapping, which: str, record, state_dict: Mapping, variables, encoder) -> dict:
  """What was read and how it compares with upstream (JSON-serializable)."""
  sources = {name: edm.source_status(sha) for name, sha in torch_pickle.module_sources(data).items()}
  buffers = [k for k in state_dict if k.endswith((".freqs", ".phases"))]
  report = dict(
      source_path=os.path.abspath(path),
      file_sha256=edm.file_sha256(path),
      file_bytes=os.path.getsize(path),
      top_level_keys=[str(k) for k in data],
      which=which,
      precond_class=torch_pickle.class_name(record),
      model_class=torch_pickle.class_name(edm._child(record, "unet")),  # pylint: disable=protected-access
      encoder_class=encoder["class_name"],
      classes=sorted({r.class_name for r in torch_pickle.iter_records(data)}),
      init_kwargs=edm._jsonable(torch_pickle.init_kwargs(record)),  # pylint: disable=protected-access
      module_sources=sources,
      sources_match_upstream=all(s["matches_upstream"] for s in sources.values()),
      param_count=_count(variables["params"]),
      buffer_count=_count(variables[edm2_unet.BUFFERS]),
      state_dict_entries=len(state_dict),
      buffers=len(buffers),
      stored_dtypes=sorted({np.asarray(v).dtype.name for v in state_dict.values()}),
  )
  for key in ("dataset_kwargs",):
    if key in data:
      report[key] = edm._jsonable(data[key])  # pylint: disable=protected-access
  if isinstance(data.get("loss_fn"), torch_pickle.PersistentRecord):
    report["loss_fn"] = {"class_name": data["loss_fn"].class_name,
                         "init_kwargs": edm._jsonable(torch_pickle.init_kwargs(data["loss_fn"]))}  # pylint: disable=protected-access
  return report


def convert_edm2_pickle(path, which: str = "ema") -> Tuple[dict, dict, dict, dict]:
  """Reads an EDM2 network pickle without executing anything and converts ``data[which]``.

  Returns:
    ``(variables, net_config, encoder, report)``: Flax variables ``{'params', 'buffers'}`` (numpy float32) for
    ``edm2_unet.build_precond(net_config)``, the encoder description (:func:`encoder_description`), and a
    JSON-serializable report (file sha256, top-level keys, classes, per-class sha256 of the embedded sources against
    the upstream files, parameter count, stored dtypes, dataset_kwargs, loss_fn).

  Raises:
    FileNotFoundError: no such file.
    ForbiddenGlobalError: the pickle names a global outside the allowlist (nothing was executed).
    UnsupportedCheckpointError: an EDM pickle, a torch.save / safetensors file, another class.
    CheckpointFormatError: truncated/corrupt file, no ``which`` entry, an encoder that does not fit the net.
    ValueError: the state dict does not match the net its kwargs describe (lists every problem).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  edm._check_not_state_dict_file(path)  # pylint: disable=protected-access
  return convert_edm2_data(torch_pickle.load_persistence_pickle(path), path, which)


def convert_edm2_data(data: Mapping, path: str, which: str = "ema") -> Tuple[dict, dict, dict, dict]:
  """:func:`convert_edm2_pickle` on the already read top level of a pickle (``path`` names it in messages)."""
  record = _select_record(data, path, which)
  state_dict = torch_pickle.module_state_dict(record)
  variables, config = convert_edm2_state_dict(state_dict, torch_pickle.init_kwargs(record),
                                              torch_pickle.class_name(record))
  enc = data.get("encoder")
  if enc is None:
    encoder = _default_encoder(config["img_channels"])
  elif isinstance(enc, torch_pickle.PersistentRecord):
    encoder = encoder_description(enc)
  else:
    raise CheckpointFormatError(f"{path}: 'encoder' is a {type(enc).__name__}, not a persistent encoder object")
  _check_encoder(encoder, config, path)
  report = _report(path, data, which, record, state_dict, variables, encoder)
  report["gain_dtype"] = _stored_gain_dtype(state_dict)
  # Conversion got here, so these are empty; recorded so that model.json says what was checked.
  report["key_check"] = dict(expected=len(edm2_names.expected_entries(config)), **{
      k: len(v) for k, v in state_dict_problems({k: np.shape(v) for k, v in state_dict.items()}, config).items()})
  return variables, config, encoder, report


# ---------------------------------------------------------------------------------------------------------------------
# Saving and loading converted models.


def save_converted(out_dir, variables, net_config: Mapping[str, Any], encoder: Mapping[str, Any],
                   report: Mapping[str, Any], overwrite: bool = False,
                   gain_dtype: Optional[str] = "from_report") -> pathlib.Path:
  """Writes ``out_dir/params`` (Orbax ``{'params': variables}``) and ``out_dir/model.json`` atomically."""
  if gain_dtype == "from_report":
    gain_dtype = report.get("gain_dtype")
  check_variables(variables, net_config)
  meta = {"family": FAMILY, "net": json.loads(json.dumps(dict(net_config))), "gain_dtype": gain_dtype,
          "encoder": json.loads(json.dumps(dict(encoder))), "source": dict(report)}
  trees = {PARAMS_DIR: {"params": {"params": variables["params"],
                                   edm2_unet.BUFFERS: variables[edm2_unet.BUFFERS]}}}
  return write_dir_atomically(out_dir, trees, meta, overwrite=overwrite)


def read_model_json(path) -> dict:
  """The ``{'family': 'edm2', 'net', 'gain_dtype', 'encoder', 'source'}`` record (``path``: the file or its folder)."""
  path = pathlib.Path(path)
  if path.is_dir():
    path = path / MODEL_JSON
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no such file (expected the model.json written by launch/convert.py edm2)")
  meta = json.loads(path.read_text())
  if meta.get("family") != FAMILY or "net" not in meta:
    raise UnsupportedCheckpointError(f"{path}: family {meta.get('family')!r}, expected {FAMILY!r} with a 'net' "
                                     f"config")
  meta["net"] = normalize_config(meta["net"])
  return meta


def build_net(meta: Mapping[str, Any], precision: Any = "highest") -> "edm2_unet.Precond":
  """The Precond of a model.json record, with its ``gain_dtype`` (the pickle's own forward)."""
  return edm2_unet.build_precond(normalize_config(meta["net"]), gain_dtype=meta.get("gain_dtype"),
                                 precision=precision)


def _flat_shapes(tree, prefix: str = "") -> Dict[str, Tuple[int, ...]]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flat_shapes(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = tuple(np.shape(v))
  return out


def check_variables(variables, net_config, where: str = "variables") -> None:
  """Raises ValueError listing every leaf whose path or shape differs from ``build_precond(net_config)``."""
  want = {f"{col}/{'/'.join(p)}": tuple(s)
          for col, tree in edm2_names.abstract_shapes(net_config).items() for p, s in tree.items()}
  got = _flat_shapes(variables) if isinstance(variables, Mapping) else {}
  missing = sorted(set(want) - set(got))
  extra = sorted(set(got) - set(want))
  bad = sorted(f"{k}: got {list(got[k])} vs expected {list(want[k])}" for k in set(want) & set(got)
               if got[k] != want[k])
  if missing or extra or bad:
    lines = [f"{where} do not match the EDM2 net in model.json:"]
    for title, items in (("missing leaves", missing), ("unexpected leaves", extra), ("shape mismatches", bad)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
    raise ValueError("\n".join(lines))


def variables_of(tree, where: str = "tree") -> dict:
  """The ``{'params', 'buffers'}`` variables in an Orbax tree: ``{'params': variables}`` (a converted folder's
  params/, a round's chosen/) or the bare variables."""
  if isinstance(tree, Mapping) and isinstance(tree.get("params"), Mapping):
    inner = tree["params"]
    if edm2_unet.BUFFERS in inner and "params" in inner:
      return dict(inner)
    if edm2_unet.BUFFERS in tree:
      return dict(tree)
  raise CheckpointFormatError(f"{where}: expected an Orbax tree {{'params': {{'params': ..., 'buffers': ...}}}} "
                              f"(EDM2 variables)")


def load_converted(out_dir) -> Tuple[dict, dict, dict]:
  """``(variables, net_config, meta)`` from a folder written by :func:`save_converted` (numpy arrays)."""
  out = pathlib.Path(out_dir)
  meta = read_model_json(out)
  variables = variables_of(load_params_dir(out / PARAMS_DIR), str(out / PARAMS_DIR))
  check_variables(variables, meta["net"], where=str(out / PARAMS_DIR))
  return variables, meta["net"], meta


# ---------------------------------------------------------------------------------------------------------------------
# Export back to EDM2.


def export_edm2(variables, net_config: Mapping[str, Any], path, fmt: Optional[str] = None,
                dtype: str = "float32") -> "collections.OrderedDict[str, np.ndarray]":
  """Writes the EDM2 Precond ``state_dict`` of ``variables`` (keys ``unet.…`` / ``logvar_…``, Fourier buffers
  included) to ``path``; returns it.

  ``fmt``: ``'torch'`` (``torch.load(path, weights_only=True)`` reads it) or ``'safetensors'``, inferred from the
  extension when None. ``dtype``: ``'float32'`` (lossless for fine-tuned weights) or ``'float16'`` (the released
  pickles' storage). Keys, order and shapes are those of ``net.state_dict()`` in NVlabs/edm2, so::

    # in the NVlabs/edm2 repo (this runs the pickle's code: only for a pickle you trust, e.g. the release)
    net = pickle.load(open('edm2-img64-s-1073741-0.075.pkl', 'rb'))['ema']
    net.load_state_dict(torch.load('ddo.pt', weights_only=True))   # float32 values are cast into its fp16 tensors
  """
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"unknown export dtype {dtype!r}; use one of {list(EXPORT_DTYPES)}")
  fmt = edm.export_format(path, fmt)
  check_variables(variables, net_config)
  state_dict = edm2_names.flax_to_torch(variables, net_config, dtype=np.dtype(dtype))
  pathlib.Path(path).absolute().parent.mkdir(parents=True, exist_ok=True)
  if fmt == "safetensors":
    torch_write.save_safetensors(state_dict, path, metadata={"format": "pt", "family": FAMILY})
  else:
    torch_write.save_torch_zip(state_dict, path)
  return state_dict
