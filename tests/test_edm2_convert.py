"""EDM2 conversion tool: the tiny EDM2 pickles (goldens/formats) -> variables -> the goldens' D / logvar, the
report, model.json, export back to a Precond state dict (read by real torch), wrong families, mismatches listed,
full-size key manifests through the converter's key check, and the sd-vae / edm2 / export-edm2 command line."""
import collections
import copy
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax import tree_io
from ddo_jax.convert import edm, edm2, edm2_names, sd_vae, torch_pickle
from ddo_jax.nets import edm2_encoders, edm2_unet
from tests.goldens import golden_path, load_json, load_npz

_REPO = pathlib.Path(__file__).resolve().parents[1]
ATOL = 1e-5  # the goldens' float32 re-run spread of EDM2 D is 1e-6 - 5e-6 at magnitudes 1-5 (goldens/README.md)
FIXTURES = ("edm2_tiny_img_guide", "edm2_tiny_latent")
MANIFESTS = ("edm2-img64-s", "edm2-img512-l", "edm2-img512-xs")


def _fixture_dir(name):
  """The edm2/<net> folder a formats pickle holds (its json's equals_fixture)."""
  io = load_json("formats", f"{name}.json")["equals_fixture"]["io"]  # '../edm2/precond_guide/io.npz'
  return pathlib.PurePosixPath(io).parts[-2]


_CONVERTED = {}


def _converted(name):
  """(variables, config, encoder, report) of one formats pickle, converted once per session."""
  if name not in _CONVERTED:
    _CONVERTED[name] = edm2.convert_edm2_pickle(golden_path("formats", f"{name}.pkl"))
  return _CONVERTED[name]


def _pickle_state(name):
  """The pickle's ema state dict as the restricted reader flattens it (float16, state_dict order)."""
  data = torch_pickle.load_persistence_pickle(golden_path("formats", f"{name}.pkl"))
  return torch_pickle.module_state_dict(data["ema"]), data


def _golden_state(name):
  """The fixture's torch state dict from edm2/<net>/ (shared tensors and overrides as its config.json says)."""
  net = _fixture_dir(name)
  weights = load_json("edm2", net, "config.json")["weights"]
  state = load_npz("edm2", net, *weights["file"].split("/"))
  if "override_file" in weights:
    state.update(load_npz("edm2", net, weights["override_file"]))
  return state


def _cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "launch.convert", *map(str, args)], cwd=_REPO, env=env,
                        capture_output=True, text=True, timeout=180)


def _one_error_line(proc) -> str:
  assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
  return errors[0]


def _assert_same_state(got, want):
  """Same keys in the same order, same dtypes, shapes and bytes."""
  assert list(got) == list(want)
  for k in want:
    g, w = np.asarray(got[k]), np.asarray(want[k])
    assert (g.dtype, g.shape) == (w.dtype, w.shape), k
    assert g.tobytes() == w.tobytes(), k


def _assert_same_tree(got, want):
  flat_g = jax.tree_util.tree_flatten_with_path(got)[0]
  flat_w = jax.tree_util.tree_flatten_with_path(want)[0]
  assert [p for p, _ in flat_g] == [p for p, _ in flat_w]
  for (path, g), (_, w) in zip(flat_g, flat_w):
    g, w = np.asarray(g), np.asarray(w)
    assert (g.dtype, g.shape) == (w.dtype, w.shape) and g.tobytes() == w.tobytes(), path


# ---------------------------------------------------------------------------------------------------------------------
# Conversion and the goldens.


@pytest.mark.parametrize("name", FIXTURES)
def test_reader_equals_fixture_state(name):
  """The restricted reader gives the fixture's state (cast to float16) exactly, keys in state_dict order."""
  state, data = _pickle_state(name)
  assert type(data).__name__ == "EasyDict" and list(data) == ["encoder", "dataset_kwargs", "loss_fn", "ema"]
  _assert_same_state(state, collections.OrderedDict((k, v.astype(np.float16)) for k, v in _golden_state(name).items()))


@pytest.mark.parametrize("name", FIXTURES)
def test_converted_forward_matches_goldens(name):
  """The converted variables through edm2_unet give the fixture's outputs: with model.json's gain_dtype (float16
  gains, the pickle's own forward) D_fp16w / logvar_fp16w, and as a plain float32 net D / logvar (the
  values lie on the float16 grid, so float32 gains are the fixture's float32 net)."""
  variables, config, _, report = _converted(name)
  io = load_npz("edm2", _fixture_dir(name), "io.npz")
  x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))
  sigma, labels = jnp.asarray(io["sigma"]), jnp.asarray(io["class_labels"])
  meta = {"net": config, "gain_dtype": report["gain_dtype"]}
  assert report["gain_dtype"] == "float16"
  errs = {}
  for net, suffix in ((edm2.build_net(meta), "_fp16w"), (edm2_unet.build_precond(config), "")):
    fwd = jax.jit(lambda v, x, s, c, net=net: net.apply(v, x, s, c, return_logvar=True))
    d, logvar = jax.device_get(fwd(variables, x, sigma, labels))
    errs["D" + suffix] = float(np.max(np.abs(d.transpose(0, 3, 1, 2) - io["D" + suffix])))
    errs["logvar" + suffix] = float(np.max(np.abs(logvar - io["logvar" + suffix])))
  print(name, "max abs errors:", errs)
  for k, e in errs.items():
    assert e <= ATOL, (name, k, e)
  # The two nets really differ (the fp16 gain rounding moves D by ~3e-4 to 6e-4): the right one was used for each.
  assert float(np.max(np.abs(io["D"] - io["D_fp16w"]))) > 20 * ATOL


@pytest.mark.parametrize("name", FIXTURES)
def test_report(name):
  variables, config, encoder, report = _converted(name)
  fixture = load_json("formats", f"{name}.json")
  pkl = golden_path("formats", f"{name}.pkl")
  json.dumps(report, allow_nan=False)
  assert pathlib.Path(report["source_path"]).resolve() == pkl.resolve()
  assert report["file_sha256"] == edm.file_sha256(pkl) and report["file_bytes"] == fixture["inventory"]["bytes"]
  assert report["top_level_keys"] == fixture["inventory"]["top_level_keys"]
  assert (report["precond_class"], report["model_class"]) == ("Precond", "UNet")
  objects = fixture["inventory"]["persistent_objects"]
  assert report["classes"] == sorted({o["class_name"] for o in objects})
  assert report["encoder_class"] == encoder["class_name"] == objects[0]["class_name"]
  # Parameter count: the torch Parameters of the fixture state (every entry but the 4 Fourier buffers).
  state = _golden_state(name)
  n_params = sum(v.size for k, v in state.items() if not k.endswith((".freqs", ".phases")))
  assert report["param_count"] == n_params == edm2_names.num_parameters(config)
  assert report["param_count"] == sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(variables["params"]))
  assert report["state_dict_entries"] == len(state) and report["buffers"] == 4
  assert report["stored_dtypes"] == ["float16"]
  assert report["key_check"] == {"expected": len(state), "missing": 0, "unexpected": 0, "mismatched": 0}
  assert report["init_kwargs"] == fixture["construction"]["ema_init_kwargs"]
  assert report["loss_fn"]["class_name"] == "EDM2Loss"
  # Embedded sources: hashed as stored (placeholders here), each flagged as not upstream.
  stored = {o["class_name"]: o["module_src_sha256"] for o in objects}
  assert {k: s["sha256"] for k, s in report["module_sources"].items()} == stored
  assert report["sources_match_upstream"] is False
  assert all(s["status"] == edm.SOURCE_DIFFERS for s in report["module_sources"].values())
  # ... while the real upstream sources of these classes are known (what a release pickle reports).
  for cls, sha in fixture["real_module_src_sha256"].items():
    assert edm.source_status(sha)["upstream"].startswith("NVlabs/edm2@4bf8162 training/"), cls


def test_encoder_descriptions():
  _, _, rgb, _ = _converted("edm2_tiny_img_guide")
  assert rgb == {"class_name": "StandardRGBEncoder", "init_kwargs": {}}
  _, config, vae_enc, _ = _converted("edm2_tiny_latent")
  _, data = _pickle_state("edm2_tiny_latent")
  state = data["encoder"].state
  assert vae_enc["class_name"] == "StabilityVAEEncoder" and vae_enc["vae_name"] == state["vae_name"]
  assert vae_enc["batch_size"] == state["batch_size"] == 8
  for key in ("scale", "bias"):  # the float32 values survive JSON exactly
    back = np.asarray(json.loads(json.dumps(vae_enc[key])), np.float32)
    assert back.tobytes() == state[key].astype(np.float32).tobytes(), key
  # The same constants as edm2_encoders computes from upstream's defaults, and they rebuild the encoder.
  scale, bias = edm2_encoders.stability_constants(**{k: edm2_encoders.STABILITY_DEFAULTS[k] for k in (
      "raw_mean", "raw_std", "final_mean", "final_std")})
  np.testing.assert_array_equal(np.asarray(vae_enc["scale"], np.float32), scale)
  np.testing.assert_array_equal(np.asarray(vae_enc["bias"], np.float32), bias)
  vae_config = sd_vae.read_diffusers_config(golden_path("sd_vae", "diffusers_tiny"))
  from ddo_jax.nets import sd_vae as sd_vae_net  # pylint: disable=import-outside-toplevel
  rebuilt = edm2_encoders.StabilityVAEEncoder.from_state(sd_vae_net.build_autoencoder_kl(vae_config), vae_enc)
  assert rebuilt.num_latent_channels == config["img_channels"] == 4
  np.testing.assert_array_equal(rebuilt.scale, scale)


def test_pickle_without_encoder_and_encoder_that_does_not_fit():
  """No 'encoder' (upstream's loaders then use StandardRGBEncoder): RGB nets get it; latent nets get the
  StabilityVAEEncoder defaults, with a note. An encoder whose channels differ from the net's is refused."""
  rgb_path = golden_path("formats", "edm2_tiny_img_guide.pkl")
  lat_path = golden_path("formats", "edm2_tiny_latent.pkl")
  rgb = dict(torch_pickle.load_persistence_pickle(rgb_path))
  lat = dict(torch_pickle.load_persistence_pickle(lat_path))
  lat_encoder, rgb_encoder = lat.pop("encoder"), rgb.pop("encoder")
  variables, _, encoder, report = edm2.convert_edm2_data(rgb, str(rgb_path))
  assert encoder["class_name"] == "StandardRGBEncoder" and "has no 'encoder'" in encoder["note"]
  assert report["top_level_keys"] == ["dataset_kwargs", "loss_fn", "ema"]
  _assert_same_tree(variables, _converted("edm2_tiny_img_guide")[0])
  _, _, encoder, _ = edm2.convert_edm2_data(lat, str(lat_path))
  want = _converted("edm2_tiny_latent")[2]
  assert encoder["class_name"] == "StabilityVAEEncoder" and "assumed StabilityVAEEncoder" in encoder["note"]
  assert (encoder["scale"], encoder["bias"]) == (want["scale"], want["bias"])  # the fixture used the defaults
  rgb["encoder"], lat["encoder"] = lat_encoder, rgb_encoder
  with pytest.raises(edm.CheckpointFormatError, match="4 latent channels .* img_channels=3"):
    edm2.convert_edm2_data(rgb, str(rgb_path))
  with pytest.raises(edm.CheckpointFormatError, match="StandardRGBEncoder gives 3 channels .* img_channels=4"):
    edm2.convert_edm2_data(lat, str(lat_path))


def test_save_and_load_converted(tmp_path):
  variables, config, encoder, report = _converted("edm2_tiny_latent")
  out = edm2.save_converted(tmp_path / "lat", variables, config, encoder, report)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["lat"]  # nothing left beside it
  loaded, config2, meta = edm2.load_converted(out)
  _assert_same_tree(loaded, variables)
  assert config2 == config and meta["family"] == "edm2" and meta["gain_dtype"] == "float16"
  assert meta["encoder"]["class_name"] == "StabilityVAEEncoder" and meta["source"]["param_count"] == 724_267
  assert edm2.variables_of(dict(variables)) == variables  # bare variables are accepted too
  with pytest.raises(edm.CheckpointFormatError, match="expected an Orbax tree"):
    edm2.variables_of({"params": variables["params"]})
  with pytest.raises(FileExistsError, match="not empty"):
    edm2.save_converted(out, variables, config, encoder, report)
  edm2.save_converted(out, variables, config, encoder, report, overwrite=True)
  # An EDM model.json is refused by the EDM2 loader (and the other way round).
  meta["family"] = "edm"
  (out / "model.json").write_text(json.dumps(meta))
  with pytest.raises(edm.UnsupportedCheckpointError, match="family 'edm', expected 'edm2'"):
    edm2.load_converted(out)


# ---------------------------------------------------------------------------------------------------------------------
# Export round trip.


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("fmt,dtype", [("pt", "float16"), ("safetensors", "float32")])
def test_export_round_trip(tmp_path, name, fmt, dtype):
  """convert -> export -> (our reader and real torch) equals the pickle's tensors; exported -> converter equals
  the converted variables."""
  variables, config, _, _ = _converted(name)
  state, data = _pickle_state(name)
  want = collections.OrderedDict((k, v.astype(dtype)) for k, v in state.items())  # float16 -> float32 is exact
  path = tmp_path / f"ddo.{fmt}"
  exported = edm2.export_edm2(variables, config, path, dtype=dtype)
  _assert_same_state(exported, want)
  back = torch_pickle.load_torch_state_dict(path)
  _assert_same_state(back, want)
  again, config2 = edm2.convert_edm2_state_dict(back, torch_pickle.init_kwargs(data["ema"]))
  assert config2 == config
  _assert_same_tree(again, variables)

  torch = pytest.importorskip("torch")
  if fmt == "pt":
    sd = torch.load(path, weights_only=True)
  else:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    sd = safetensors_torch.load_file(str(path))
  assert list(sd) == list(want)
  for k, w in want.items():
    t = sd[k]
    assert str(t.dtype) == f"torch.{dtype}" and tuple(t.shape) == w.shape, k
    assert t.numpy().tobytes() == w.tobytes(), k


def test_export_refuses_bad_dtype_and_wrong_tree(tmp_path):
  variables, config, _, _ = _converted("edm2_tiny_img_guide")
  with pytest.raises(ValueError, match="unknown export dtype 'bfloat16'"):
    edm2.export_edm2(variables, config, tmp_path / "x.pt", dtype="bfloat16")
  broken = copy.deepcopy(variables)
  del broken["params"]["unet"]["out_gain"]
  with pytest.raises(ValueError, match="missing leaves.*params/unet/out_gain"):
    edm2.export_edm2(broken, config, tmp_path / "x.pt")
  assert not (tmp_path / "x.pt").exists()


# ---------------------------------------------------------------------------------------------------------------------
# Mismatches and wrong families.


def test_mismatch_lists_missing_unexpected_and_shape():
  state, data = _pickle_state("edm2_tiny_img_guide")
  kwargs = torch_pickle.init_kwargs(data["ema"])
  bad = collections.OrderedDict(state)
  del bad["unet.enc.8x8_block0.attn_qkv.weight"]
  del bad["logvar_fourier.phases"]
  bad["unet.enc.8x8_block0.bias"] = np.zeros(3, np.float16)
  bad["unet.out_conv.weight"] = np.zeros((3, 17, 3, 3), np.float16)
  with pytest.raises(ValueError) as info:
    edm2.convert_edm2_state_dict(bad, kwargs)
  msg = str(info.value)
  for needle in ("missing keys (2)", "unet.enc.8x8_block0.attn_qkv.weight", "logvar_fourier.phases",
                 "unexpected keys (1)", "unet.enc.8x8_block0.bias", "shape mismatches (torch layout) (1)",
                 "unet.out_conv.weight: got [3, 17, 3, 3] vs expected [3, 16, 3, 3]"):
    assert needle in msg, (needle, msg)
  problems = edm2.state_dict_problems({k: np.shape(v) for k, v in bad.items()},
                                      edm2_names.config_from_init_kwargs(kwargs))
  assert problems == {"missing": ["unet.enc.8x8_block0.attn_qkv.weight", "logvar_fourier.phases"],
                      "unexpected": ["unet.enc.8x8_block0.bias"],
                      "mismatched": ["unet.out_conv.weight: got [3, 17, 3, 3] vs expected [3, 16, 3, 3]"]}


def test_wrong_family_refused_in_library():
  with pytest.raises(edm.UnsupportedCheckpointError, match=r"EDM network pickle \(data\['ema'\] is a EDMPrecond"):
    edm2.convert_edm2_pickle(golden_path("formats", "edm_tiny_cond.pkl"))
  with pytest.raises(edm.UnsupportedCheckpointError, match="torch.save zip archive"):
    edm2.convert_edm2_pickle(golden_path("formats", "var_tiny.pth"))
  with pytest.raises(edm.CheckpointFormatError, match="no 'ema_x' entry"):
    edm2.convert_edm2_pickle(golden_path("formats", "edm2_tiny_latent.pkl"), which="ema_x")


@pytest.mark.parametrize("model", MANIFESTS)
def test_full_size_manifests_pass_the_key_check(model):
  """The released checkpoints' keys and shapes (goldens/keys) against the converter's check: nothing missing,
  unexpected or mismatched; their parameter counts; a changed manifest is listed."""
  manifest = load_json("keys", f"{model}.json")
  config = edm2_names.config_from_init_kwargs(manifest["init_kwargs"], manifest["class_name"])
  shapes = collections.OrderedDict((k, tuple(s)) for k, s, _, _ in manifest["entries"])
  assert edm2.state_dict_problems(shapes, config) == {"missing": [], "unexpected": [], "mismatched": []}
  assert edm2_names.num_parameters(config) == manifest["num_parameters"]
  first, last = manifest["entries"][3][0], manifest["entries"][-1][0]
  changed = collections.OrderedDict(shapes)
  changed.pop(last)
  changed[first] = tuple(n + 1 for n in changed[first])
  problems = edm2.state_dict_problems(changed, config)
  assert problems["missing"] == [last] and problems["unexpected"] == []
  assert len(problems["mismatched"]) == 1 and problems["mismatched"][0].startswith(first + ": got")


# ---------------------------------------------------------------------------------------------------------------------
# The command line (subprocesses).


def test_cli_edm2_then_export(tmp_path):
  pkl = golden_path("formats", "edm2_tiny_img_guide.pkl")
  out = tmp_path / "guide"
  proc = _cli("edm2", "--src", pkl, "--out", out, "--dump_sources")
  assert proc.returncode == 0, proc.stderr
  dumped = sorted(p.read_text() for p in (out / "module_src").iterdir())  # the placeholders, as text
  assert len(dumped) == 3 and all(t.startswith("# source of training/") for t in dumped), dumped
  for needle in ("Precond + UNet", "181,691 parameters", "63 state_dict entries", "63 of 63 expected state_dict entries: 0 missing, 0 unexpected, 0 shape mismatches",
                 "StandardRGBEncoder",
                 "Block, EDM2Loss, MPConv, MPFourier, Precond, StandardRGBEncoder, UNet", "differs from upstream",
                 f"wrote       {out}/params"):
    assert needle in proc.stdout, (needle, proc.stdout)
  meta = json.loads((out / "model.json").read_text())
  assert meta["family"] == "edm2" and meta["encoder"]["class_name"] == "StandardRGBEncoder"
  assert meta["gain_dtype"] == "float16" and meta["net"]["unet_kwargs"]["model_channels"] == 16

  state, _ = _pickle_state("edm2_tiny_img_guide")
  proc = _cli("export-edm2", "--src", out, "--out", tmp_path / "ddo.safetensors", "--dtype", "float16")
  assert proc.returncode == 0, proc.stderr
  _assert_same_state(torch_pickle.load_torch_state_dict(tmp_path / "ddo.safetensors"), state)

  # The driver's view of DIR/params: load_tree(..., {'params': <the family's whole variable tree>})['params'].
  variables, config, _ = edm2.load_converted(out)
  abstract = edm2_unet.abstract_variables(edm2_unet.build_precond(config))
  loaded = tree_io.load_tree(out / "params", {"params": tree_io.abstract_like(abstract)})["params"]
  _assert_same_tree(jax.device_get(loaded), variables)
  # A round's chosen/ ({'params': variables}, as the driver saves it) with --model.
  tree_io.save_tree(tmp_path / "round_001" / "chosen", {"params": variables})
  proc = _cli("export-edm2", "--src", tmp_path / "round_001" / "chosen", "--model", out / "model.json",
              "--out", tmp_path / "ddo.pt")
  assert proc.returncode == 0, proc.stderr
  _assert_same_state(torch_pickle.load_torch_state_dict(tmp_path / "ddo.pt"),
                     collections.OrderedDict((k, v.astype(np.float32)) for k, v in state.items()))

  # The same params against another net: every missing / unexpected / mismatched leaf on one error line.
  other = copy.deepcopy(meta)
  other["net"]["label_dim"] = 0
  other["net"]["unet_kwargs"]["attn_resolutions"] = [8, 16]
  other["net"]["logvar_channels"] = 64
  (tmp_path / "other.json").write_text(json.dumps(other))
  proc = _cli("export-edm2", "--src", tmp_path / "round_001" / "chosen", "--model", tmp_path / "other.json",
              "--out", tmp_path / "x.pt")
  line = _one_error_line(proc)
  for needle in ("missing leaves", "params/unet/enc_16x16_block0/attn_qkv/kernel", "unexpected leaves",
                 "params/unet/emb_label/kernel", "shape mismatches",
                 "buffers/logvar_fourier/freqs: got [128] vs expected [64]"):
    assert needle in line, (needle, line)
  assert not (tmp_path / "x.pt").exists()


def test_cli_wrong_families_and_errors(tmp_path):
  line = _one_error_line(_cli("edm2", "--src", golden_path("formats", "edm_tiny_cond.pkl"), "--out", tmp_path / "a"))
  assert "this is an EDM network pickle" in line and "launch.convert edm`" in line, line
  line = _one_error_line(_cli("edm", "--src", golden_path("formats", "edm2_tiny_latent.pkl"), "--out", tmp_path / "b"))
  assert "this is an EDM2 network pickle" in line and line.endswith("python -m launch.convert edm2"), line
  line = _one_error_line(_cli("sd-vae", "--src", tmp_path / "nope", "--out", tmp_path / "c"))
  assert "not a folder (--src)" in line, line
  assert not any(p.name in ("a", "b", "c") for p in tmp_path.iterdir())


def test_cli_sd_vae(tmp_path):
  folder = golden_path("sd_vae", "diffusers_tiny")
  out = tmp_path / "vae"
  proc = _cli("sd-vae", "--src", folder, "--out", out)
  assert proc.returncode == 0, proc.stderr
  config, params = sd_vae.load_diffusers_folder(folder)
  n = sd_vae.num_parameters(config)
  for needle in ("AutoencoderKL (diffusers 0.42.1)", f"{n:,} parameters", "156 state_dict entries"):
    assert needle in proc.stdout, (needle, proc.stdout)
  meta = json.loads((out / "model.json").read_text())
  assert meta["family"] == "sd-vae" and meta["source"]["param_count"] == n
  assert sd_vae.config_from_diffusers(meta["vae"]) == config
  _assert_same_tree(tree_io.load_params_dir(out / "params")["params"], params)
