"""VAR checkpoint reading and export (ddo_jax.convert.var, var_names) on the goldens' formats/ and keys/.

* formats/var_tiny.pth (torch zip), var_tiny_legacy.pth and var_tiny.safetensors all load to exactly
  var/var/state.npz, with the config read off the shapes;
* keys/var_d16.json and var_d30.json (the released files' manifests) map exactly to jax.eval_shape of
  VAR(d16 / d30): every key, shape, dtype and the state_dict order, and the parameter counts;
* export writes upstream's state dict (keys, order, dtypes, values, the -inf mask) and reads back equal; with
  torch installed, torch.load(weights_only=True) of the export equals that of the golden .pth;
* other families and damaged state dicts are refused with one line.
"""
import collections
import importlib.util

import numpy as np
import pytest

from ddo_jax import cli
from ddo_jax.convert import torch_write
from ddo_jax.convert import var as var_convert
from ddo_jax.convert import var_names
from ddo_jax.nets import var as var_net
from tests.goldens import golden_path, load_json, load_npz

FORMATS = ("var_tiny.pth", "var_tiny_legacy.pth", "var_tiny.safetensors")


def _flat(tree, prefix=()):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = np.asarray(v)
  return out


@pytest.mark.parametrize("name", FORMATS)
def test_every_container_loads_to_the_golden_state(name):
  state = load_npz("var", "var", "state.npz")
  init = load_json("var", "var", "config.json")["init_kwargs"]
  config, params, report = var_convert.load_var_file(golden_path("formats", name))
  assert config["depth"] == init["depth"] and config["num_heads"] == init["num_heads"]
  assert config["patch_nums"] == list(init["patch_nums"]) and config["attn_l2_norm"] == init["attn_l2_norm"]
  assert report["key_check"] == {"expected": len(state), "missing": 0, "unexpected": 0, "mismatched": 0}
  assert report["container"] == {"var_tiny.pth": "torch zip", "var_tiny_legacy.pth": "torch legacy",
                                 "var_tiny.safetensors": "safetensors"}[name]
  want = _flat(var_names.torch_to_flax(state, config))
  got = _flat(params)
  assert set(got) == set(want)
  for k in want:
    assert got[k].dtype == np.float32
    np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))  # bit for bit


@pytest.mark.parametrize("model, depth", [("var_d16", 16), ("var_d30", 30)])
def test_full_size_manifests_map_exactly_to_eval_shape(model, depth):
  manifest = load_json("keys", f"{model}.json")
  entries = manifest["entries"]
  shapes = {k: tuple(s) for k, s, *_ in entries}
  config = var_names.config_from_shapes(shapes)
  assert config["depth"] == depth == manifest["init_kwargs"]["depth"]
  assert config["embed_dim"] == 64 * depth and config["num_heads"] == depth
  assert config["patch_nums"] == manifest["init_kwargs"]["patch_nums"]
  assert config["vocab_size"] == manifest["init_kwargs"]["V"] and config["cvae"] == manifest["init_kwargs"]["Cvae"]
  mine = var_names.expected_entries(config)   # shapes from jax.eval_shape of VAR(config).init
  assert [(e.torch_key, list(e.torch_shape), e.dtype) for e in mine] == [(k, list(s), d) for k, s, d, *_ in entries]
  kinds = {k: kind for k, _, _, kind in entries}
  assert {e.torch_key for e in mine if e.kind == "buffer"} == {k for k, v in kinds.items() if v == "buffer"}
  # upstream's count (sum of p.numel() over parameters(): buffers excluded) = the Flax 'params' leaves
  count = var_names.num_parameters(config)
  print(f"{model}: {len(mine)} entries, {count:,} parameters")
  assert count == manifest["num_parameters"] == sum(int(np.prod(s)) for k, s, d, kind in entries if kind == "param")
  assert count == var_net.num_parameters(var_net.build_var(config))


@pytest.mark.parametrize("ext", ["pth", "safetensors"])
def test_export_round_trip(tmp_path, ext):
  state = load_npz("var", "var", "state.npz")
  config, params, _ = var_convert.load_var_file(golden_path("formats", "var_tiny.pth"))
  out = tmp_path / f"exported.{ext}"
  written = var_convert.export_var(params, config, out)
  assert list(written) == list(state)  # upstream's keys in state_dict() order, buffers included
  for k, v in state.items():
    assert written[k].dtype == v.dtype and written[k].shape == v.shape, k
    np.testing.assert_array_equal(written[k], v, err_msg=k)  # -inf mask, int64 lvl_1L, zero k bias
  config2, params2, report = var_convert.load_var_file(out)
  assert config2 == config
  a, b = _flat(params), _flat(params2)
  assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
  if ext == "pth":
    assert report["container"] == "torch zip"


def test_export_is_what_torch_loads(tmp_path):
  if importlib.util.find_spec("torch") is None:
    pytest.skip("torch is not installed: the torch.load check of the export is skipped")
  import torch  # pylint: disable=import-outside-toplevel
  config, params, _ = var_convert.load_var_file(golden_path("formats", "var_tiny.pth"))
  out = tmp_path / "exported.pth"
  var_convert.export_var(params, config, out)
  mine = torch.load(out, map_location="cpu", weights_only=True)
  golden = torch.load(golden_path("formats", "var_tiny.pth"), map_location="cpu", weights_only=True)
  assert isinstance(mine, collections.OrderedDict)
  assert list(mine) == list(golden)
  for k in golden:
    assert mine[k].dtype == golden[k].dtype and mine[k].shape == golden[k].shape, k
    assert torch.equal(mine[k], golden[k]), k


def _write(tmp_path, name, state):
  path = tmp_path / name
  torch_write.save_torch_zip(state, path)
  return path


def _one_line_error(path, match):
  with pytest.raises(cli.UserError) as info:
    var_convert.load_var_file(path)
  msg = str(info.value)
  assert msg.startswith("error: ") and "\n" not in msg and "(--src): " in msg, msg
  for m in match:
    assert m in msg, msg
  return msg


def test_refuses_other_families(tmp_path):
  vq = collections.OrderedDict([("encoder.conv_in.weight", np.zeros((4, 3, 3, 3), np.float32)),
                                ("quantize.embedding.weight", np.zeros((8, 4), np.float32))])
  _one_line_error(_write(tmp_path, "vae.pth", vq), ["VQVAE", "launch.convert vqvae"])
  _one_line_error(golden_path("formats", "edm_tiny_cond.pkl"), ["EDM network pickle", "launch.convert edm"])
  _one_line_error(golden_path("formats", "edm2_tiny_latent.pkl"), ["EDM2", "launch.convert edm2"])
  _one_line_error(tmp_path / "nope.pth", ["no such file"])
  (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
  _one_line_error(tmp_path / "junk.pth", ["cannot read"])


def test_lists_missing_unexpected_and_mismatched_keys(tmp_path):
  state = collections.OrderedDict(load_npz("var", "var", "state.npz"))
  bad = collections.OrderedDict(state)
  del bad["blocks.1.attn.q_bias"]
  bad["blocks.0.attn.extra"] = np.zeros(3, np.float32)
  bad["head.bias"] = np.zeros(5, np.float32)
  msg = _one_line_error(_write(tmp_path, "bad.pth", bad),
                        ["1 missing (blocks.1.attn.q_bias)", "1 unexpected (blocks.0.attn.extra)",
                         "head.bias [5] vs [64]", "VAR(depth=2"])
  print(msg)
  # a mask buffer with the wrong values (another patch_nums layout) is refused too
  bad = collections.OrderedDict(state)
  bad["attn_bias_for_masking"] = np.zeros_like(state["attn_bias_for_masking"])
  _one_line_error(_write(tmp_path, "mask.pth", bad), ["attn_bias_for_masking values differ"])
  # an old (pre-April 2024) checkpoint without scale_mul_1H11 reads as attn_l2_norm=False
  old = collections.OrderedDict((k, v) for k, v in state.items() if "scale_mul" not in k)
  config, _, _ = var_convert.load_var_file(_write(tmp_path, "old.pth", old))
  assert config["attn_l2_norm"] is False


def test_convert_folder_round_trip(tmp_path):
  report = var_convert.convert_var_file(golden_path("formats", "var_tiny.safetensors"), tmp_path / "out")
  variables, config, meta = var_convert.load_converted(tmp_path / "out")
  assert meta["family"] == "var" and meta["source"]["file_sha256"] == report["file_sha256"]
  state = load_npz("var", "var", "state.npz")
  want = _flat(var_names.torch_to_flax(state, config))
  got = _flat(variables)
  assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
