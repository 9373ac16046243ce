"""EDM conversion tool: pickle -> params (golden D), full-size manifest, refusals, export round trip, CLI."""
import collections
import copy
import json
import os
import pathlib
import pickle
import subprocess
import sys

import jax
import numpy as np
import pytest

from ddo_jax.convert import edm, edm_names, torch_pickle
from ddo_jax.nets import edm_precond
from ddo_jax import tree_io
from tests.goldens import golden_path, load_json, load_npz
from tests.hashweights import regenerate_state_dict

_REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pkl_path():
  return golden_path("formats", "edm_tiny_cond.pkl")


@pytest.fixture(scope="module")
def converted(pkl_path):
  """(params, net_config, report) of the tiny EDM pickle."""
  return edm.convert_edm_pickle(pkl_path)


@pytest.fixture(scope="module")
def pickle_state(pkl_path):
  """The pickle's ema state dict, flattened by the restricted reader."""
  return torch_pickle.module_state_dict(torch_pickle.load_persistence_pickle(pkl_path)["ema"])


def _cli(*args, cwd=None, umask=-1):
  """Runs ``python -m launch.convert ARGS`` in a subprocess on CPU; returns the CompletedProcess."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(_REPO))
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "launch.convert", *map(str, args)], cwd=cwd or _REPO, env=env,
                        capture_output=True, text=True, timeout=120, umask=umask)


def _one_error_line(proc) -> str:
  """A refusal: exit 2, a single `error:` line (the last on stderr), no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
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


# ---------------------------------------------------------------------------------------------------------------------
# Conversion.


def test_pickle_converts_to_golden_D(converted):
  params, config, _ = converted
  io = load_npz("edm", "ddpmpp_cond", "io.npz")
  i = 2  # sigma = 2.5
  net = edm_precond.build_precond(config)
  x = np.transpose(io["x"][i:i + 1], (0, 2, 3, 1))  # NCHW -> NHWC
  d = jax.jit(lambda p, x, s, c: net.apply({"params": p}, x, s, c))(
      params, x, io["sigma"][i:i + 1], io["class_labels"][i:i + 1])
  np.testing.assert_allclose(np.transpose(np.asarray(d), (0, 3, 1, 2)), io["D"][i:i + 1], rtol=1e-5, atol=1e-5)


def test_report(converted, pkl_path):
  params, config, report = converted
  json.dumps(report, allow_nan=False)  # serializable as strict JSON
  assert pathlib.Path(report["source_path"]).resolve() == pkl_path.resolve()
  assert report["file_sha256"] == edm.file_sha256(pkl_path) and len(report["file_sha256"]) == 64
  assert report["top_level_keys"] == ["ema", "loss_fn", "augment_pipe", "dataset_kwargs"]
  assert (report["precond_class"], report["model_class"]) == ("EDMPrecond", "SongUNet")
  assert {"EDMPrecond", "SongUNet", "UNetBlock", "EDMLoss", "AugmentPipe"} <= set(report["classes"])
  assert report["param_count"] == sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params))
  assert report["state_dict_entries"] == 149 and report["buffers"] == 4
  assert report["dataset_kwargs"]["resolution"] == 16
  assert report["init_kwargs"]["model_channels"] == 32 and config["model_kwargs"]["model_channels"] == 32
  # The fixture carries placeholder sources: every one must be flagged, none may claim upstream.
  assert report["sources_match_upstream"] is False
  for name, s in report["module_sources"].items():
    assert s["matches_upstream"] is False and s["upstream"] is None, name
    assert s["status"] == edm.SOURCE_DIFFERS
  assert set(report["module_sources"]) >= {"EDMPrecond", "SongUNet", "EDMLoss", "AugmentPipe"}


@pytest.mark.parametrize("fixture", ["edm_tiny_cond", "edm2_tiny_latent", "edm2_tiny_img_guide"])
def test_known_sources_table_holds_the_real_upstream_hashes(fixture):
  real = load_json("formats", f"{fixture}.json")["real_module_src_sha256"]
  for name, sha in real.items():
    status = edm.source_status(sha)
    assert status["matches_upstream"] and status["upstream"] in edm.KNOWN_SOURCES.values(), name
    assert status["status"].startswith("matches upstream NVlabs/edm")
  assert edm.KNOWN_SOURCES[real.get("EDMPrecond", real.get("Precond"))].endswith(
      "networks.py" if fixture == "edm_tiny_cond" else "networks_edm2.py")


def test_full_size_manifest_through_converter_entry_point():
  manifest = load_json("keys", "edm-cifar10-32x32-cond-vp.json")
  state = collections.OrderedDict(
      (key, np.full(shape, 0.25 if kind == "buffer" else 0.0, np.dtype(dtype)))
      for key, shape, dtype, kind in manifest["entries"])
  params, config = edm.convert_edm_state_dict(state, manifest["init_kwargs"], manifest["class_name"])
  shapes = jax.tree_util.tree_map(lambda a: tuple(np.shape(a)), params)
  assert shapes == edm_names.abstract_params(config)  # same tree, nothing left over
  assert sum(int(np.size(a)) for a in jax.tree_util.tree_leaves(params)) == manifest["num_parameters"]


def test_mismatch_lists_missing_extra_and_shape(pickle_state, converted):
  _, _, report = converted
  bad = collections.OrderedDict(pickle_state)
  del bad["model.dec.16x16_aux_conv.bias"]
  bad["model.enc.16x16_block0.extra.weight"] = np.zeros((3,), np.float32)
  bad["model.map_layer1.weight"] = np.zeros((128, 64), np.float32)
  with pytest.raises(ValueError) as info:
    edm.convert_edm_state_dict(bad, report["init_kwargs"], report["precond_class"])
  msg = str(info.value)
  assert "missing keys (1)" in msg and "model.dec.16x16_aux_conv.bias" in msg
  assert "unexpected keys (1)" in msg and "model.enc.16x16_block0.extra.weight" in msg
  assert "model.map_layer1.weight: got [128, 64] vs expected [128, 128]" in msg


# ---------------------------------------------------------------------------------------------------------------------
# Refusals.


def _os_system_pickle(marker) -> bytes:
  """An 'EDM pickle' {'ema': os.system('touch MARKER')}: plain pickle.load would run the shell command."""
  cmd = f"touch '{marker}'"
  return b"(dp0\nVema\np1\ncos\nsystem\np2\n(V" + cmd.encode() + b"\np3\ntp4\nRp5\ns."


def test_os_system_payload_is_live_under_plain_pickle(tmp_path):
  marker = tmp_path / "ran"
  pickle.loads(_os_system_pickle(marker))  # proves the payload below is real
  assert marker.exists()


def test_os_system_pickle_refused(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pkl"
  path.write_bytes(_os_system_pickle(marker))
  with pytest.raises(torch_pickle.ForbiddenGlobalError) as info:
    edm.convert_edm_pickle(path)
  assert info.value.global_name == "os.system"
  proc = _cli("edm", "--src", path, "--out", tmp_path / "out")
  line = _one_error_line(proc)
  assert "refused: forbidden global 'os.system'" in line, line
  assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("fixture", ["edm2_tiny_latent.pkl", "edm2_tiny_img_guide.pkl"])
def test_edm2_refused(fixture):
  with pytest.raises(edm.UnsupportedCheckpointError, match="EDM2 network pickle.*not supported by the EDM converter.*launch.convert edm2"):
    edm.convert_edm_pickle(golden_path("formats", fixture))


def test_edm2_precond_refused_without_encoder():
  data = dict(torch_pickle.load_persistence_pickle(golden_path("formats", "edm2_tiny_latent.pkl")))
  del data["encoder"]
  with pytest.raises(edm.UnsupportedCheckpointError, match=r"EDM2 .*data\['ema'\] is a Precond"):
    edm._select_record(data, "x.pkl", "ema")  # pylint: disable=protected-access


@pytest.mark.parametrize("fixture", ["var_tiny.pth", "var_tiny_legacy.pth", "var_tiny.safetensors"])
def test_var_state_dict_refused(fixture):
  with pytest.raises(edm.UnsupportedCheckpointError, match="this is a VAR state dict"):
    edm.convert_edm_pickle(golden_path("formats", fixture))


def test_missing_file_and_missing_entry(tmp_path, pkl_path):
  with pytest.raises(FileNotFoundError, match="no such file"):
    edm.convert_edm_pickle(tmp_path / "nope.pkl")
  with pytest.raises(torch_pickle.CheckpointFormatError, match="no 'ema_rampup' entry"):
    edm.convert_edm_pickle(pkl_path, which="ema_rampup")


# ---------------------------------------------------------------------------------------------------------------------
# Saving, loading and exporting.


def test_save_and_load_converted(tmp_path, converted):
  params, config, report = converted
  out = tmp_path / "conv"
  out.mkdir()  # an existing empty folder is fine
  edm.save_converted(out, params, config, report)
  meta = json.loads((out / "model.json").read_text())
  assert meta["family"] == "edm" and meta["source"]["file_sha256"] == report["file_sha256"]
  got_params, got_config = edm.load_converted(out)
  assert got_config == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, got_params, params)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]  # no temporary folders left
  with pytest.raises(FileExistsError, match="not empty"):
    edm.save_converted(out, params, config, report)
  zero = jax.tree_util.tree_map(np.zeros_like, params)
  edm.save_converted(out, zero, config, report, overwrite=True)
  assert not np.any(edm.load_converted(out)[0]["model"]["map_layer0"]["kernel"])
  assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]


@pytest.mark.parametrize("fmt,name", [("torch", "ddo.pt"), ("safetensors", "ddo.safetensors")])
def test_export_round_trip_bit_exact(tmp_path, converted, pickle_state, fmt, name):
  params, config, _ = converted
  path = tmp_path / name
  exported = edm.export_edm(params, config, path, fmt)
  _assert_same_state(exported, pickle_state)
  _assert_same_state(torch_pickle.load_torch_state_dict(path), pickle_state)


def test_export_loads_with_real_torch(tmp_path, converted, pickle_state):
  torch = pytest.importorskip("torch")
  params, config, _ = converted
  edm.export_edm(params, config, tmp_path / "ddo.pt")
  sd = torch.load(tmp_path / "ddo.pt", weights_only=True)
  _assert_same_state(collections.OrderedDict((k, v.numpy()) for k, v in sd.items()), pickle_state)


def test_export_loads_with_real_safetensors(tmp_path, converted, pickle_state):
  safetensors_torch = pytest.importorskip("safetensors.torch")
  params, config, _ = converted
  edm.export_edm(params, config, tmp_path / "ddo.safetensors")
  sd = safetensors_torch.load_file(tmp_path / "ddo.safetensors")
  for k, v in pickle_state.items():
    assert sd[k].numpy().tobytes() == v.tobytes(), k


def test_export_format_inference():
  assert edm.export_format("a.safetensors") == "safetensors" and edm.export_format("a.pt") == "torch"
  with pytest.raises(ValueError, match="cannot infer"):
    edm.export_format("a.bin2")
  with pytest.raises(ValueError, match="unknown export format"):
    edm.export_format("a.pt", "onnx")


# ---------------------------------------------------------------------------------------------------------------------
# The command line (subprocesses).


def test_cli_edm_then_export(tmp_path, pkl_path, pickle_state):
  out = tmp_path / "edm-tiny"
  proc = _cli("edm", "--src", pkl_path, "--out", out)
  assert proc.returncode == 0, proc.stderr
  for needle in ("EDMPrecond + SongUNet", "750,531 parameters", "differs from upstream", f"wrote       {out}"):
    assert needle in proc.stdout, (needle, proc.stdout)
  assert (out / "params").is_dir() and (out / "model.json").is_file()

  proc = _cli("export-edm", "--src", out, "--out", tmp_path / "ddo.safetensors")
  assert proc.returncode == 0, proc.stderr
  _assert_same_state(torch_pickle.load_torch_state_dict(tmp_path / "ddo.safetensors"), pickle_state)

  # A round's chosen/ dir (bare Orbax {'params': ...}) plus the model.json of the conversion.
  params, _ = edm.load_converted(out)
  tree_io.save_tree(tmp_path / "round_001" / "chosen", {"params": params})
  proc = _cli("--kind=export-edm", "--src", tmp_path / "round_001" / "chosen", "--model", out / "model.json",
              "--out", tmp_path / "ddo.bin", "--format", "torch")
  assert proc.returncode == 0, proc.stderr
  _assert_same_state(torch_pickle.load_torch_state_dict(tmp_path / "ddo.bin"), pickle_state)

  # A DDO round folder: chosen/ + model.json (as the training driver writes it).
  (tmp_path / "round_001" / "model.json").write_text((out / "model.json").read_text())
  proc = _cli("export-edm", "--src", tmp_path / "round_001", "--out", tmp_path / "round.pt")
  assert proc.returncode == 0, proc.stderr
  _assert_same_state(torch_pickle.load_torch_state_dict(tmp_path / "round.pt"), pickle_state)


def test_cli_errors(tmp_path, converted):
  params, config, report = converted
  proc = _cli("edm", "--src", tmp_path / "nope.pkl", "--out", tmp_path / "o")
  assert "no such file" in _one_error_line(proc)

  # Params against a net that differs: label_dim 0 (unexpected leaves), augment_dim 8 (shape), attention at 16x16
  # (missing leaves): the error names all three kinds.
  chosen = tmp_path / "chosen"
  tree_io.save_tree(chosen, {"params": params})
  other = copy.deepcopy(config)
  other["label_dim"] = other["model_kwargs"]["label_dim"] = 0
  other["model_kwargs"]["augment_dim"] = 8
  other["model_kwargs"]["attn_resolutions"] = (8, 16)
  (tmp_path / "model.json").write_text(json.dumps({"family": "edm", "net": other, "source": report}))
  proc = _cli("export-edm", "--src", chosen, "--model", tmp_path / "model.json", "--out", tmp_path / "x.pt")
  line = _one_error_line(proc)
  for needle in ("missing leaves", "model/enc_16x16_block0/qkv/kernel", "unexpected leaves", "model/map_label/kernel",
                 "shape mismatches", "model/map_augment/kernel: got [9, 32] vs expected [8, 32]"):
    assert needle in line, (needle, line)
  assert not (tmp_path / "x.pt").exists()

  (tmp_path / "model.json").write_text(json.dumps({"family": "inception-fid", "source": {}}))
  proc = _cli("export-edm", "--src", chosen, "--model", tmp_path / "model.json", "--out", tmp_path / "x.pt")
  assert "family 'inception-fid'" in _one_error_line(proc)

  assert "say what to convert" in _one_error_line(_cli("--src", chosen))
  assert "(--out)" in _one_error_line(_cli("edm", "--src", tmp_path / "nope.pkl"))
  proc = _cli("--help")
  assert proc.returncode == 0 and "export-edm" in proc.stdout, proc.stderr


def test_cli_removes_stale_temporaries_and_writes_plain_permissions(tmp_path, pkl_path):
  """A killed convert leaves `.OUT.tmp-XXXXXXXX` / `.OUT.old-XXXXXXXX` folders and `.OUT.XXXXXXXX.tmp` files; the
  next run removes exactly those (saying so) and leaves every other name alone. What it writes has the
  permissions a plain open() / mkdir() gives under the umask (mkstemp/mkdtemp alone would give 0600 / 0700)."""
  stale = [tmp_path / ".edm.tmp-ab_c1234", tmp_path / ".edm.old-0123abcd"]
  for d in stale:
    (d / "params").mkdir(parents=True)
  stale.append(tmp_path / ".edm.x1y2z3w4.tmp")
  stale[-1].write_bytes(b"half a file")
  keep = [tmp_path / ".edm.tmp-mine", tmp_path / ".edmx.tmp-abcd1234", tmp_path / "edm.tmp-abcd1234",
          tmp_path / ".edm.old-notahexx"]
  for d in keep:
    d.mkdir()
  proc = _cli("edm", "--src", pkl_path, "--out", tmp_path / "edm", umask=0o022)
  assert proc.returncode == 0, proc.stderr
  for path in stale:
    assert not path.exists() and f"removed {path} (left by an interrupted convert)" in proc.stderr, proc.stderr
  assert all(p.exists() for p in keep)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["edm"] + [p.name for p in keep])

  proc = _cli("export-edm", "--src", tmp_path / "edm", "--out", tmp_path / "ddo.pt", umask=0o022)
  assert proc.returncode == 0, proc.stderr
  modes = {p: p.stat().st_mode & 0o777 for p in [tmp_path / "edm", tmp_path / "ddo.pt", *(tmp_path / "edm").rglob("*")]}
  bad = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)}
  assert not bad, bad


def test_cli_inception(tmp_path):
  inception_names = pytest.importorskip("ddo_jax.convert.inception_names")
  torch_write = pytest.importorskip("ddo_jax.convert.torch_write")
  state = regenerate_state_dict(load_json("inception", "config.json")["weights"]["tensors"])
  src = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
  torch_write.save_torch_zip(state, src)
  proc = _cli("inception", "--src", src, "--out", tmp_path / "inception")
  assert proc.returncode == 0, proc.stderr
  assert "does NOT match the hash in the file name" in proc.stdout  # regenerated weights, not the release
  meta = json.loads((tmp_path / "inception" / "model.json").read_text())
  assert meta["family"] == "inception-fid" and meta["source"]["sha256_matches_file_name"] is False
  got = edm.load_params_dir(tmp_path / "inception" / "variables")
  want = inception_names.inception_variables_from_state_dict(state)
  assert set(got) == {"params", "batch_stats"}
  jax.tree_util.tree_map(np.testing.assert_array_equal, got, want)
