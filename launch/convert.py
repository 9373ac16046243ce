"""Convert checkpoints between PyTorch releases and ddo-jax, without torch and without running code from the file.

  python -m launch.convert edm --src edm-cifar10-32x32-cond-vp.pkl --out ckpt/edm-cifar10-cond [--which ema]
      [--overwrite] [--dump_sources]
  python -m launch.convert inception --src pt_inception-2015-12-05-6726825d.pth --out ckpt/inception
  python -m launch.convert export-edm --src ckpt/edm-cifar10-cond --out ddo.safetensors
  python -m launch.convert export-edm --src WORKDIR/round_003 --out ddo.pt     (a round: chosen/ + model.json)
  python -m launch.convert export-edm --src WORKDIR/round_003/chosen --model ckpt/edm-cifar10-cond/model.json \
      --out ddo.pt [--format torch]
  python -m launch.convert edm2 --src edm2-img64-s-1073741-0.075.pkl --out ckpt/edm2-img64-s [--which ema]
  python -m launch.convert sd-vae --src sd-vae-ft-mse/ --out ckpt/sd-vae-ft-mse     (a diffusers AutoencoderKL folder)
  python -m launch.convert export-edm2 --src ckpt/edm2-img64-s --out ddo.pt [--dtype float16|float32]
  python -m launch.convert var --src var_d16.pth --out ckpt/var-d16        (.pth zip or legacy, or .safetensors)
  python -m launch.convert var --src ar-ckpt-last.pth --key trainer/var_wo_ddp --out ckpt/var-d16   (training file)
  python -m launch.convert vqvae --src vae_ch160v4096z32.pth --out ckpt/vae-ch160v4096z32 [--patch_nums 1,2,3,4]
  python -m launch.convert export-var --src ckpt/var-d16 --out var_d16-jax.pth     (or .safetensors)
  python -m launch.convert export-vqvae --src ckpt/vae-ch160v4096z32 --out vae.pth

The subcommand is the first positional argument or --kind. `edm` reads an NVlabs/edm network pickle with an
allowlist unpickler (the embedded module sources are hashed and compared with upstream, never executed) and writes
DIR/params (Orbax {'params': ...}) and DIR/model.json. `export-edm` writes the EDMPrecond state dict of converted or
DDO-tuned params, loadable in NVlabs/edm with `net.load_state_dict(...)`. `edm2` and `export-edm2` do the same for
NVlabs/edm2 pickles (EasyDict with a float16 Precond `ema` and its `encoder`, which model.json describes), `sd-vae`
converts the VAE of EDM2's StabilityVAEEncoder from a diffusers folder. `var` and `vqvae` read FoundationVision/VAR
state dicts (`var_d16.pth`, `var_d30.pth`, DDO's `var_d*-ddo.pth`, `vae_ch160v4096z32.pth`) with the same
allowlisted reader; `export-var` / `export-vqvae` write state dicts upstream loads with `load_state_dict(strict=True)`. A refusal or a mistake is one line
`error: ...` on stderr with exit status 2 (--debug shows the traceback).

Outputs are written to a temporary sibling (`.OUT.tmp-XXXXXXXX` folder, `.OUT.XXXXXXXX.tmp` file) and renamed into
place; a kill can leave such siblings (and `.OUT.old-XXXXXXXX`, a replaced folder on its way out) behind. Each run
first removes the ones next to --out that match these names exactly, and says so on stderr.
"""
import json
import os
import pathlib
import pickle
import re
import shutil
import sys

from absl import flags
from absl import logging as absl_logging

from ddo_jax import cli

KINDS = ("edm", "inception", "export-edm", "edm2", "sd-vae", "export-edm2", "var", "vqvae", "export-var",
         "export-vqvae")

_KIND = flags.DEFINE_enum("kind", None, KINDS, "what to convert (or give it as the first positional argument)")
_SRC = flags.DEFINE_string("src", None, "input: .pkl (edm, edm2), .pth (inception), diffusers folder (sd-vae), "
                           ".pth/.safetensors (var, vqvae), converted dir or Orbax dir (export-*)")
_OUT = flags.DEFINE_string("out", None, "output folder (edm, edm2, sd-vae, inception, var, vqvae) or file (export-*)")
_WHICH = flags.DEFINE_string("which", "ema", "edm, edm2: the top-level entry of the pickle holding the network")
_KEY = flags.DEFINE_string("key", None, "var: the state dict's path inside the file's top-level dict, '/'-separated "
                           "(a VAR training checkpoint ar-ckpt*.pth: trainer/var_wo_ddp)")
_PATCH_NUMS = flags.DEFINE_list("patch_nums", None, "vqvae: the token-map sides of the scales, e.g. 1,2,3,4 "
                                "(default: the released 1,2,3,4,5,6,8,10,13,16; the file does not store them)")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "replace an existing non-empty output folder or file")
_MODEL = flags.DEFINE_string("model", None, "export-edm, export-edm2: model.json (or its folder) when --src is a bare Orbax dir")
_FORMAT = flags.DEFINE_enum("format", None, ["safetensors", "torch"],
                            "export-*: output format (default: from the extension, .safetensors "
                            "or .pt/.pth)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "float16"],
                           "export-edm2: tensor dtype of the state dict (float16 is the released pickles' storage)")
_DUMP_SOURCES = flags.DEFINE_bool("dump_sources", False,
                                  "edm, edm2: also write every embedded module source as text to OUT/module_src/ "
                                  "(for diffing against upstream; never executed)")


def _kind(argv) -> str:
  """The subcommand from the positional argument or --kind (they must agree)."""
  rest = argv[1:]
  if len(rest) > 1:
    raise cli.UserError(f"unexpected arguments {rest[1:]}", "command line", "flags are --name=value; see --help")
  positional = rest[0] if rest else None
  if positional is not None and positional not in KINDS:
    raise cli.UserError(f"unknown subcommand {positional!r}", "command line", f"use one of {list(KINDS)}")
  if positional and _KIND.value and positional != _KIND.value:
    raise cli.UserError(f"subcommand {positional!r} contradicts --kind={_KIND.value}", "--kind", "give one of them")
  kind = positional or _KIND.value
  if kind is None:
    raise cli.UserError("say what to convert", "command line", f"one of {list(KINDS)} (positional or --kind)")
  return kind


def _require(**values):
  """Usage error naming every required flag that is empty."""
  missing = [f"--{k}" for k, v in values.items() if not v]
  if missing:
    raise cli.UserError(f"missing {', '.join(missing)}", ", ".join(missing), "see --help")


def _src_file(path: str) -> str:
  """``path`` if it is an existing file, else a user-facing error."""
  if not os.path.exists(path):
    raise cli.UserError(f"{path}: no such file", "--src", "give the path of an existing file")
  if not os.path.isfile(path):
    raise cli.UserError(f"{path}: not a file", "--src", "give the path of a file, not a folder")
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
    raise cli.UserError(f"{src}: no such folder", "--src",
                        "give a converted folder, a DDO round folder or an Orbax folder (with --model)")
  if model is None:
    if not (src_path / edm.MODEL_JSON).is_file():
      raise cli.UserError(f"{src}: has no model.json", "--model",
                          "pass --model <converted dir or its model.json> to say which net these params belong to")
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
    raise cli.UserError(f"{out} exists; pass --overwrite to replace it", "--out")
  params, config = _load_for_export(src, model)
  state_dict = edm.export_edm(params, config, out, fmt)
  print(f"wrote       {os.path.abspath(out)} ({fmt}; {len(state_dict)} tensors, EDMPrecond state_dict, "
        f"keys 'model.*', buffers included)")
  print("load it in NVlabs/edm: net = pickle.load(open(<released .pkl>, 'rb'))['ema']; "
        + ("net.load_state_dict(torch.load(PATH, weights_only=True))" if fmt == "torch"
           else "net.load_state_dict(safetensors.torch.load_file(PATH))"))


# ---------------------------------------------------------------------------------------------------------------------
# edm2, sd-vae, export-edm2


def _print_edm2_report(report: dict, encoder: dict, out: pathlib.Path) -> None:
  """Prints the EDM2 conversion report: classes, sizes, encoder, source hashes vs upstream, output."""
  print(f"source      {report['source_path']}")
  print(f"sha256      {report['file_sha256']}  ({report['file_bytes']} bytes)")
  print(f"top level   {report['top_level_keys']}  (converted: {report['which']!r})")
  print(f"net         {report['precond_class']} + {report['model_class']}  "
        f"{json.dumps(report['init_kwargs'], sort_keys=True)}")
  print(f"classes     {', '.join(report['classes'])}")
  print(f"params      {report['param_count']:,} parameters; {report['state_dict_entries']} state_dict entries "
        f"({report['buffers']} Fourier buffers, {report['buffer_count']:,} values, kept); stored as "
        f"{'/'.join(report['stored_dtypes'])}, converted to float32 exactly")
  kc = report["key_check"]
  print(f"keys        {report['state_dict_entries']} of {kc['expected']} expected state_dict entries: "
        f"{kc['missing']} missing, {kc['unexpected']} unexpected, {kc['mismatched']} shape mismatches")
  if report.get("gain_dtype"):
    print(f"gains       {report['gain_dtype']}: model.json records gain_dtype={report['gain_dtype']!r} so that "
          f"edm2.build_net reproduces the pickle's forward (gain / sqrt(fan_in) rounded as upstream)")
  enc = {k: v for k, v in encoder.items() if k != "class_name"}
  print(f"encoder     {encoder['class_name']} {json.dumps(enc, sort_keys=True)}")
  if encoder["class_name"] == "StabilityVAEEncoder":
    print(f"            its VAE ({encoder['vae_name']}) is not in the pickle: convert a download of it with "
          f"python -m launch.convert sd-vae --src <diffusers folder> --out <dir>")
  if "dataset_kwargs" in report:
    print(f"dataset     {json.dumps(report['dataset_kwargs'], sort_keys=True)}")
  print("embedded module sources (sha256; never executed):")
  for name, s in sorted(report["module_sources"].items()):
    print(f"  {name:22s} {s['sha256'][:16]}  {s['status']}")
  if not report["sources_match_upstream"]:
    print("  note: some sources differ from upstream (a DDO pickle may carry modified code); rerun with "
          "--dump_sources to diff them as text against the upstream files")
  print(f"wrote       {out}/params (Orbax {{'params': {{'params': ..., 'buffers': ...}}}}) and {out}/model.json")
  print(f"use it as   init.checkpoint={out} ; export with python -m launch.convert export-edm2 --src {out} --out X.safetensors [--dtype float16]")


def run_edm2(src: str, out: str, which: str, overwrite: bool, dump_sources: bool) -> None:
  """EDM2 .pkl -> OUT/params + OUT/model.json, then the report on stdout."""
  from ddo_jax.convert import edm2  # pylint: disable=import-outside-toplevel
  variables, config, encoder, report = edm2.convert_edm2_pickle(_src_file(src), which=which)
  written = edm2.save_converted(out, variables, config, encoder, report, overwrite=overwrite)
  if dump_sources:
    _dump_sources(src, written)
  _print_edm2_report(report, encoder, written)


def run_sd_vae(src: str, out: str, overwrite: bool) -> None:
  """diffusers AutoencoderKL folder -> OUT/params (Orbax {'params': ...}) + OUT/model.json."""
  from ddo_jax.convert import edm, sd_vae  # pylint: disable=import-outside-toplevel
  folder = pathlib.Path(src)
  if not folder.is_dir():
    raise cli.UserError(f"{src}: not a folder", "--src",
                        "give a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors)")
  weights = sd_vae.weight_file(folder)
  raw_config = json.loads((folder / sd_vae.CONFIG_FILE).read_text()) if (folder / sd_vae.CONFIG_FILE).is_file() \
      else {}
  config = sd_vae.read_diffusers_config(folder)
  state_dict = sd_vae.read_state_dict(weights)
  params = sd_vae.torch_to_flax(state_dict, config)
  renamed = sorted(k for k in state_dict if sd_vae.canonical_key(k) != k)
  source = {"source_path": str(folder.absolute()), "weight_file": weights.name, "file_sha256": edm.file_sha256(weights),
            "file_bytes": weights.stat().st_size, "class_name": raw_config.get("_class_name", sd_vae.CLASS_NAME),
            "diffusers_version": raw_config.get("_diffusers_version"),
            "param_count": sum(int(v.size) for v in _leaves(params)), "state_dict_entries": len(state_dict),
            "stored_dtypes": sorted({v.dtype.name for v in state_dict.values()}),
            "legacy_attention_names_renamed": len(renamed)}
  meta = {"family": "sd-vae", "vae": json.loads(json.dumps(config)), "source": source}
  written = edm.write_dir_atomically(out, {"params": {"params": params}}, meta, overwrite=overwrite)
  print(f"source      {source['source_path']}/{weights.name}")
  print(f"sha256      {source['file_sha256']}  ({source['file_bytes']} bytes)")
  print(f"net         {source['class_name']} (diffusers {source['diffusers_version']}) "
        f"block_out_channels={list(config['block_out_channels'])} latent_channels={config['latent_channels']}")
  print(f"params      {source['param_count']:,} parameters; {len(state_dict)} state_dict entries stored as "
        f"{'/'.join(source['stored_dtypes'])}, converted to float32" +
        (f"; {len(renamed)} legacy attention names renamed (query/key/value/proj_attn)" if renamed else ""))
  print(f"wrote       {written}/params (Orbax {{'params': ...}}) and {written}/model.json")


def _load_edm2_for_export(src: str, model):
  """(variables, net_config) from a converted EDM2 dir (params/ + model.json), a round dir (chosen/ + model.json),
  or any Orbax dir ({'params': variables} or the bare variables) together with --model."""
  from ddo_jax.convert import edm2  # pylint: disable=import-outside-toplevel
  src_path = pathlib.Path(src)
  if not src_path.is_dir():
    raise cli.UserError(f"{src}: no such folder", "--src",
                        "give a converted EDM2 folder, a DDO round folder or an Orbax folder (with --model)")
  if model is None:
    if not (src_path / edm2.MODEL_JSON).is_file():
      raise cli.UserError(f"{src}: has no model.json", "--model",
                          "pass --model <converted dir or its model.json> to say which net these params belong to")
    model = src_path
  config = edm2.read_model_json(model)["net"]
  orbax_dir = next((d for d in (src_path / edm2.PARAMS_DIR, src_path / "chosen") if d.is_dir()), src_path)
  variables = edm2.variables_of(edm2.load_params_dir(orbax_dir), str(orbax_dir))
  edm2.check_variables(variables, config, where=str(orbax_dir))
  return variables, config


def run_export_edm2(src: str, out: str, model, fmt, dtype: str, overwrite: bool) -> None:
  """Converted or DDO-tuned EDM2 variables -> Precond state dict file (torch zip or safetensors)."""
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  from ddo_jax.convert import edm2  # pylint: disable=import-outside-toplevel
  fmt = edm.export_format(out, fmt)
  if os.path.exists(out) and not overwrite:
    raise cli.UserError(f"{out} exists; pass --overwrite to replace it", "--out")
  variables, config = _load_edm2_for_export(src, model)
  state_dict = edm2.export_edm2(variables, config, out, fmt, dtype=dtype)
  print(f"wrote       {os.path.abspath(out)} ({fmt}, {dtype}; {len(state_dict)} tensors, EDM2 Precond state_dict, "
        f"keys 'unet.*' / 'logvar_*', Fourier buffers included)")
  print("load it in NVlabs/edm2: net = pickle.load(open(<released .pkl>, 'rb'))['ema']; "
        + ("net.load_state_dict(torch.load(PATH, weights_only=True))" if fmt == "torch"
           else "net.load_state_dict(safetensors.torch.load_file(PATH))"))


def run_var(src: str, out: str, key, overwrite: bool) -> None:
  """VAR transformer state dict (.pth zip / legacy, .safetensors) -> OUT/params + OUT/model.json."""
  from ddo_jax.convert import var  # pylint: disable=import-outside-toplevel
  report = var.convert_var_file(_src_file(src), out, overwrite=overwrite, key=key)
  print(f"source      {report['source_path']} ({report['container']}"
        + (f", key {report['nested_key']}" if report["nested_key"] else "") + ")")
  print(f"sha256      {report['file_sha256']}  ({report['file_bytes']} bytes)")
  print(f"net         {var.summary(report['config'])}")
  print(f"params      {report['param_count']:,} parameters; {report['state_dict_entries']} state_dict entries, "
        f"keys checked ({report['key_check']['expected']} expected, none missing, unexpected or mismatched); "
        f"structural buffers equal to the constructor's: {', '.join(report['structural_buffers_checked'])}")
  print(f"wrote       {os.path.abspath(out)}/params (Orbax {{'params': ...}}) and {os.path.abspath(out)}/model.json")


def run_vqvae(src: str, out: str, patch_nums, overwrite: bool) -> None:
  """VAR's multi-scale VQVAE state dict -> OUT/params + OUT/model.json."""
  from ddo_jax.convert import vqvae  # pylint: disable=import-outside-toplevel
  if patch_nums is not None:
    try:
      patch_nums = tuple(int(p) for p in patch_nums)
    except ValueError as e:
      raise cli.UserError(f"--patch_nums={','.join(patch_nums)} is not a list of integers", "--patch_nums",
                          "give the scales' sides, e.g. 1,2,3,4,5,6,8,10,13,16") from e
    if not patch_nums or any(p < 1 for p in patch_nums) or list(patch_nums) != sorted(set(patch_nums)):
      raise cli.UserError(f"--patch_nums={','.join(map(str, patch_nums))} must be increasing positive sides",
                          "--patch_nums", "e.g. 1,2,3,4,5,6,8,10,13,16")
  vae, variables, report = vqvae.convert_vqvae_file(_src_file(src), patch_nums)
  written = vqvae.save_converted(out, vae, variables, report, overwrite=overwrite)
  print(f"source      {report['source_path']}")
  print(f"sha256      {report['file_sha256']}  ({report['file_bytes']} bytes)")
  print(f"net         VQVAE(vocab_size={vae.vocab_size}, z_channels={vae.z_channels}, ch={vae.ch}, "
        f"ch_mult={list(vae.ch_mult)}, share_quant_resi={vae.share_quant_resi}); patch_nums {list(vae.patch_nums)} "
        f"({report['patch_nums_source']})")
  print(f"params      {report['param_count']:,} parameters; {report['state_dict_entries']} state_dict entries "
        f"(quantize.ema_vocab_hit_SV {report['buffer_shape']}: training statistics, not converted)")
  print(f"wrote       {written}/params (Orbax {{'params': ...}}) and {written}/model.json")


def run_export_var(src: str, out: str, fmt, overwrite: bool) -> None:
  """Converted VAR folder -> upstream state dict file."""
  from ddo_jax.convert import var  # pylint: disable=import-outside-toplevel
  if os.path.exists(out) and not overwrite:
    raise cli.UserError(f"{out} exists; pass --overwrite to replace it", "--out")
  variables, config, _ = var.load_converted(src)
  state = var.export_var(variables, config, out, fmt)
  print(f"wrote       {os.path.abspath(out)} ({len(state)} tensors, VAR state_dict with its buffers)")
  print("load it in FoundationVision/VAR: var.load_state_dict(torch.load(PATH, map_location='cpu', "
        "weights_only=True), strict=True)")


def run_export_vqvae(src: str, out: str, fmt, overwrite: bool) -> None:
  """Converted VQVAE folder -> upstream state dict file."""
  from ddo_jax.convert import edm, vqvae  # pylint: disable=import-outside-toplevel
  if os.path.exists(out) and not overwrite:
    raise cli.UserError(f"{out} exists; pass --overwrite to replace it", "--out")
  fmt = edm.export_format(out, fmt)
  vae, variables = vqvae.load_converted(src)
  if (fmt == "safetensors") != str(out).endswith(".safetensors"):
    raise cli.UserError(f"--format {fmt} contradicts the name {out}", "--format", "name the file .pth or .safetensors")
  state = vqvae.export_vqvae(variables, vae, out)
  print(f"wrote       {os.path.abspath(out)} ({len(state)} tensors, VQVAE state_dict)")


# ---------------------------------------------------------------------------------------------------------------------


def _dispatch(kind: str) -> None:
  """Runs one subcommand with the parsed flags."""
  if kind == "edm":
    _require(src=_SRC.value, out=_OUT.value)
    run_edm(_SRC.value, _OUT.value, _WHICH.value, _OVERWRITE.value, _DUMP_SOURCES.value)
  elif kind == "inception":
    _require(src=_SRC.value, out=_OUT.value)
    run_inception(_SRC.value, _OUT.value, _OVERWRITE.value)
  elif kind == "edm2":
    _require(src=_SRC.value, out=_OUT.value)
    run_edm2(_SRC.value, _OUT.value, _WHICH.value, _OVERWRITE.value, _DUMP_SOURCES.value)
  elif kind == "sd-vae":
    _require(src=_SRC.value, out=_OUT.value)
    run_sd_vae(_SRC.value, _OUT.value, _OVERWRITE.value)
  elif kind == "export-edm2":
    _require(src=_SRC.value, out=_OUT.value)
    run_export_edm2(_SRC.value, _OUT.value, _MODEL.value, _FORMAT.value, _DTYPE.value, _OVERWRITE.value)
  elif kind == "var":
    _require(src=_SRC.value, out=_OUT.value)
    run_var(_SRC.value, _OUT.value, _KEY.value, _OVERWRITE.value)
  elif kind == "vqvae":
    _require(src=_SRC.value, out=_OUT.value)
    run_vqvae(_SRC.value, _OUT.value, _PATCH_NUMS.value, _OVERWRITE.value)
  elif kind == "export-var":
    _require(src=_SRC.value, out=_OUT.value)
    run_export_var(_SRC.value, _OUT.value, _FORMAT.value, _OVERWRITE.value)
  elif kind == "export-vqvae":
    _require(src=_SRC.value, out=_OUT.value)
    run_export_vqvae(_SRC.value, _OUT.value, _FORMAT.value, _OVERWRITE.value)
  else:
    _require(src=_SRC.value, out=_OUT.value)
    run_export(_SRC.value, _OUT.value, _MODEL.value, _FORMAT.value, _OVERWRITE.value)


# Names of the temporary siblings our writers leave when killed: ddo_jax.tree_io.write_dir_atomically
# (tempfile.mkdtemp(prefix=".NAME.tmp-") and ".NAME.old-<8 hex>") and ddo_jax.convert.torch_write
# (tempfile.mkstemp(prefix=".NAME.", suffix=".tmp")); tempfile's random part is 8 of [a-z0-9_].
_STALE_PATTERNS = (r"\.{name}\.tmp-[a-z0-9_]{{8}}", r"\.{name}\.old-[0-9a-f]{{8}}", r"\.{name}\.[a-z0-9_]{{8}}\.tmp")


def remove_stale_temporaries(out: str) -> list:
  """Removes the temporary siblings of `out` that an interrupted convert left (only names matching our own
  patterns exactly); says so on stderr and returns their paths."""
  target = pathlib.Path(out).absolute()
  if not target.parent.is_dir():
    return []
  patterns = [re.compile(p.format(name=re.escape(target.name))) for p in _STALE_PATTERNS]
  removed = []
  for entry in sorted(target.parent.iterdir()):
    if not any(p.fullmatch(entry.name) for p in patterns):
      continue
    if entry.is_dir() and not entry.is_symlink():
      shutil.rmtree(entry)
    else:
      entry.unlink()
    print(f"removed {entry} (left by an interrupted convert)", file=sys.stderr)
    removed.append(entry)
  return removed


def _one_line(e: BaseException) -> str:
  """The exception's message on one line (multi-line reports joined with '; ')."""
  return "; ".join(line.strip() for line in str(e).strip().splitlines() if line.strip())


def main(argv):
  """Entry point: a refusal or mistake raises `cli.UserError` (one line on stderr, exit 2)."""
  kind = _kind(argv)
  absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every save step at INFO
  from ddo_jax import tree_io  # pylint: disable=import-outside-toplevel
  from ddo_jax.convert import edm  # pylint: disable=import-outside-toplevel
  if _OUT.value:
    remove_stale_temporaries(_OUT.value)
  try:
    _dispatch(kind)
  except cli.UserError:
    raise
  except edm.ForbiddenGlobalError as e:
    raise cli.UserError(f"refused: forbidden global '{e.global_name}'. {_one_line(e)}", "--src") from e
  except edm.UnsupportedCheckpointError as e:
    fix = ""
    if kind == "edm" and "EDM2 network pickle" in str(e):
      fix = "convert it with python -m launch.convert edm2"
    raise cli.UserError(f"wrong family or unsupported net: {_one_line(e)}", "--src", fix) from e
  except tree_io.CorruptCheckpointError as e:
    raise cli.UserError(f"damaged checkpoint: {_one_line(e)}", "--src",
                        "convert or export from an intact copy (its checksum.json no longer matches)") from e
  except (FileNotFoundError, FileExistsError, edm.CheckpointFormatError, pickle.UnpicklingError,
          ValueError) as e:
    raise cli.UserError(_one_line(e)) from e
  return 0


if __name__ == "__main__":
  cli.run(main, doc=__doc__)
