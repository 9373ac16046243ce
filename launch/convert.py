"""Convert checkpoints between PyTorch releases and ddo-jax, without torch and without running code from the file.

  python -m launch.convert edm --src edm-cifar10-32x32-cond-vp.pkl --out ckpt/edm-cifar10-cond [--which ema]
      [--overwrite] [--dump_sources]
  python -m launch.convert inception --src pt_inception-2015-12-05-6726825d.pth --out ckpt/inception
  python -m launch.convert export-edm --src ckpt/edm-cifar10-cond --out ddo.safetensors
  python -m launch.convert export-edm --src WORKDIR/round_003 --out ddo.pt     (a round: chosen/ + model.json)
  python -m launch.convert export-edm --src WORKDIR/round_003/chosen --model ckpt/edm-cifar10-cond/model.json \
      --out ddo.pt [--format torch]

The subcommand is the first positional argument or --kind. `edm` reads an NVlabs/edm network pickle with an
allowlist unpickler (the embedded module sources are hashed and compared with upstream, never executed) and writes
DIR/params (Orbax {'params': ...}) and DIR/model.json. `export-edm` writes the EDMPrecond state dict of converted or
DDO-tuned params, loadable in NVlabs/edm with `net.load_state_dict(...)`. Exit status 1 on any refusal or error, with
the reason on stderr.
"""
import json
import os
import pathlib
import pickle
import re
import sys

from absl import app, flags
from absl import logging as absl_logging

KINDS = ("edm", "inception", "export-edm")

_KIND = flags.DEFINE_enum("kind", None, KINDS, "what to convert (or give it as the first positional argument)")
_SRC = flags.DEFINE_string("src", None, "input: .pkl (edm), .pth (inception), converted dir or Orbax dir (export-edm)")
_OUT = flags.DEFINE_string("out", None, "output folder (edm, inception) or file (export-edm)")
_WHICH = flags.DEFINE_string("which", "ema", "edm: the top-level entry of the pickle holding the network")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing non-empty output folder or file")
_MODEL = flags.DEFINE_string("model", None, "export-edm: model.json (or its folder) when --src is a bare Orbax dir")
_FORMAT = flags.DEFINE_enum("format", None, ["safetensors", "torch"],
                            "export-edm: output format (default: from the extension, .safetensors or .pt/.pth)")
_DUMP_SOURCES = flags.DEFINE_bool("dump_sources", False,
                                  "edm: also write every embedded module source as text to OUT/module_src/ "
                                  "(for diffing against upstream; never executed)")


class _CliError(Exception):
  """A user-facing error: printed without a traceback."""


def _kind(argv) -> str:
  """The subcommand from the positional argument or --kind (they must agree)."""
  rest = argv[1:]
  if len(rest) > 1:
    raise app.UsageError(f"unexpected arguments: {rest[1:]}")
  positional = rest[0] if rest else None
  if positional is not None and positional not in KINDS:
    raise app.UsageError(f"unknown subcommand {positional!r}; use one of {list(KINDS)}")
  if positional and _KIND.value and positional != _KIND.value:
    raise app.UsageError(f"subcommand {positional!r} contradicts --kind={_KIND.value}")
  kind = positional or _KIND.value
  if kind is None:
    raise app.UsageError(f"say what to convert: one of {list(KINDS)} (positional or --kind)")
  return kind


def _require(**values):
  """Usage error naming every required flag that is empty."""
  missing = [f"--{k}" for k, v in values.items() if not v]
  if missing:
    raise app.UsageError(f"missing {', '.join(missing)}")


def _src_file(path: str) -> str:
  """``path`` if it is an existing file, else a user-facing error."""
  if not os.path.exists(path):
    raise _CliError(f"{path}: no such file")
  if not os.path.isfile(path):
    raise _CliError(f"{path}: not a file")
  return path


# ---------------------------------------------------------------------------------------------------------------------
# edm


def _print_edm_report(report: dict, out: pathlib.Path) -> None:
  """Prints the conversion report: classes, sizes, source hashes vs upstream, output."""
  print(f"source      {report['source_path']}")
  print(f"sha256      {report['file_sha256']}  ({report['file_bytes']} bytes)")
  print(f"top level   {report['top_level_keys']}  (converted: {report['which']!r})")
  print(f"net         {report['precond_class']} + {report['model_class']}")
  print(f"classes     {', '.join(report['classes'])}")
  print(f"params      {report['param_count']:,} parameters; {report['state_dict_entries']} state_dict entries "
        f"({report['buffers']} buffers, checked and dropped)")
  if "dataset_kwargs" in report:
    print(f"dataset     {json.dumps(report['dataset_kwargs'], sort_keys=True)}")
  print("embedded module sources (sha256; never executed):")
  for name, s in sorted(report["module_sources"].items()):
    print(f"  {name:22s} {s['sha256'][:16]}  {s['status']}")
  if not report["sources_match_upstream"]:
    print("  note: some sources differ from upstream (a DDO pickle may carry modified code); rerun with "
          "--dump_sources to diff them as text against the upstream files")
  print(f"wrote       {out}/params (Orbax {{'params': ...}}) and {out}/model.json")
  print(f"use it as   init.checkpoint={out}/params ; export back with: python -m launch.convert export-edm "
        f"--src {out} --out X.safetensors")


def _dump_sources(src: str, out: pathlib.Path) -> None:
  """Writes each distinct embedded module source as text (for diffing; never executed)."""
  from ddo_jax.convert import edm, torch_pickle  # pylint: disable=import-outside-toplevel
  folder = out / "module_src"
  folder.mkdir(exist_ok=True)
  for sha, (name, text) in edm.module_source_texts(torch_pickle.load_persistence_pickle(src)).items():
    (folder / f"{sha[:16]}-{name}.py.txt").write_text(text)
  print(f"sources     written as text to {folder}/")


def run_edm(src: str, out: str, which: str, overwrite: bool, dump_sources: bool) -> None:
  """EDM .pkl -> OUT/params + OUT/model.json, then the report on stdout."""
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  params, config, report = edm.convert_edm_pickle(_src_file(src), which=which)
  written = edm.save_converted(out, params, config, report, overwrite=overwrite)
  if dump_sources:
    _dump_sources(src, written)
  _print_edm_report(report, written)


# ---------------------------------------------------------------------------------------------------------------------
# inception


def run_inception(src: str, out: str, overwrite: bool) -> None:
  """pytorch-fid weights -> OUT/variables (Orbax {'params', 'batch_stats'}) + OUT/model.json."""
  from ddo_jax.convert import edm, inception_names  # pylint: disable=import-outside-toplevel
  src = _src_file(src)
  variables = inception_names.load_pytorch_fid_weights(src)
  sha = edm.file_sha256(src)
  name = os.path.basename(src)
  hub_hash = re.search(r"-([0-9a-f]{8,})\.", name)  # torch.hub convention: a sha256 prefix in the file name
  matches = sha.startswith(hub_hash.group(1)) if hub_hash else None
  meta = {"family": "inception-fid", "variables": "variables",
          "source": {"source_path": os.path.abspath(src), "file_sha256": sha, "sha256_matches_file_name": matches,
                     "param_count": sum(int(v.size) for v in _leaves(variables["params"])),
                     "batch_stats_count": sum(int(v.size) for v in _leaves(variables["batch_stats"]))}}
  written = edm.write_dir_atomically(out, {"variables": variables}, meta, overwrite=overwrite)
  print(f"source      {meta['source']['source_path']}")
  note = {True: "  (matches the hash in the file name)", None: "",
          False: "  (does NOT match the hash in the file name: not the released pytorch-fid weights)"}[matches]
  print(f"sha256      {sha}{note}")
  print(f"params      {meta['source']['param_count']:,} (+ {meta['source']['batch_stats_count']:,} batch stats)")
  print(f"wrote       {written}/variables (Orbax {{'params', 'batch_stats'}}) and {written}/model.json")


def _leaves(tree):
  """The leaves of a pytree."""
  import jax  # pylint: disable=import-outside-toplevel
  return jax.tree_util.tree_leaves(tree)


# ---------------------------------------------------------------------------------------------------------------------
# export-edm


def _load_for_export(src: str, model):
  """(params, net_config) from a converted dir (params/ + model.json), a DDO round dir (chosen/ + model.json), or
  any Orbax dir ({'params': ...}, e.g. ROUND_DIR/chosen) together with --model."""
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  src_path = pathlib.Path(src)
  if not src_path.is_dir():
    raise _CliError(f"{src}: no such folder")
  if model is None:
    if not (src_path / edm.MODEL_JSON).is_file():
      raise _CliError(f"{src}: has no model.json; pass --model <converted dir or its model.json> to say which net "
                      f"these params belong to")
    model = src_path
  config = edm.normalize_config(edm.read_model_json(model)["net"])
  orbax_dir = next((d for d in (src_path / edm.PARAMS_DIR, src_path / "chosen") if d.is_dir()), src_path)
  tree = edm.load_params_dir(orbax_dir)
  params = tree["params"] if "params" in tree else tree
  edm.check_params(params, config, where=str(orbax_dir))
  return params, config


def run_export(src: str, out: str, model, fmt, overwrite: bool) -> None:
  """Converted or DDO-tuned params -> EDMPrecond state dict file (torch zip or safetensors)."""
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  fmt = edm.export_format(out, fmt)
  if os.path.exists(out) and not overwrite:
    raise _CliError(f"{out} exists; pass --overwrite to replace it")
  params, config = _load_for_export(src, model)
  state_dict = edm.export_edm(params, config, out, fmt)
  print(f"wrote       {os.path.abspath(out)} ({fmt}; {len(state_dict)} tensors, EDMPrecond state_dict, "
        f"keys 'model.*', buffers included)")
  print("load it in NVlabs/edm: net = pickle.load(open(<released .pkl>, 'rb'))['ema']; "
        + ("net.load_state_dict(torch.load(PATH, weights_only=True))" if fmt == "torch"
           else "net.load_state_dict(safetensors.torch.load_file(PATH))"))


# ---------------------------------------------------------------------------------------------------------------------


def _dispatch(kind: str) -> None:
  """Runs one subcommand with the parsed flags."""
  if kind == "edm":
    _require(src=_SRC.value, out=_OUT.value)
    run_edm(_SRC.value, _OUT.value, _WHICH.value, _OVERWRITE.value, _DUMP_SOURCES.value)
  elif kind == "inception":
    _require(src=_SRC.value, out=_OUT.value)
    run_inception(_SRC.value, _OUT.value, _OVERWRITE.value)
  else:
    _require(src=_SRC.value, out=_OUT.value)
    run_export(_SRC.value, _OUT.value, _MODEL.value, _FORMAT.value, _OVERWRITE.value)


def main(argv):
  """Entry point: returns 0, or 1 with the reason on stderr."""
  kind = _kind(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  try:
    _dispatch(kind)
  except edm.ForbiddenGlobalError as e:
    print(f"error: refused: forbidden global '{e.global_name}'. {e}", file=sys.stderr)
    return 1
  except edm.UnsupportedCheckpointError as e:
    print(f"error: wrong family or unsupported net: {e}", file=sys.stderr)
    return 1
  except (_CliError, FileNotFoundError, FileExistsError, edm.CheckpointFormatError, pickle.UnpicklingError,
          ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  app.run(main)
