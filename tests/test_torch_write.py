"""Tests for ddo_jax.convert.torch_write: safetensors and torch.save (zip) writers without torch."""
import collections
import json
import os
import pickletools
import struct
import zipfile

import numpy as np
import pytest

from ddo_jax.convert import torch_pickle as tp
from ddo_jax.convert import torch_write as tw
from tests.goldens import golden_path, load_npz


def _sample_state() -> "collections.OrderedDict[str, np.ndarray]":
  """Several dtypes, a 0-dim tensor, an empty tensor, a non-contiguous and a big-endian input, -inf and NaN."""
  rng = np.random.default_rng(1)
  base = rng.standard_normal((4, 6)).astype(np.float32)
  return collections.OrderedDict([
      ("w.f32", base),
      ("w.f16", rng.standard_normal((3, 5)).astype(np.float16)),
      ("w.f64", rng.standard_normal((2, 2, 3))),
      ("steps.i64", np.array([0, -1, 2 ** 40, -2 ** 62], dtype=np.int64)),
      ("i32", np.arange(-3, 3, dtype=np.int32)),
      ("i16", np.arange(4, dtype=np.int16)),
      ("i8", np.arange(-4, 4, dtype=np.int8)),
      ("u8", np.arange(250, 256, dtype=np.uint8)),
      ("flags", np.array([True, False, True])),
      ("gain", np.array(0.375, dtype=np.float16)),
      ("count", np.array(7, dtype=np.int64)),
      ("empty", np.zeros((0, 3), np.float32)),
      ("transposed", base.T),
      ("big_endian", np.arange(5, dtype=">f4")),
      ("mask", np.array([0.0, -np.inf, np.nan], dtype=np.float32)),
  ])


def _assert_round_trip(got, sent, ordered=True):
  if ordered:
    assert list(got) == list(sent)
  for k, value in sent.items():
    ref = np.asarray(value)
    assert got[k].dtype == ref.dtype.newbyteorder("="), k
    assert got[k].shape == ref.shape, k
    assert got[k].tobytes() == ref.astype(ref.dtype.newbyteorder("=")).tobytes(order="C"), k


def _no_temp_files(folder) -> bool:
  return not [n for n in os.listdir(folder) if n.endswith(".tmp")]


# ---------------------------------------------------------------------------------------------------------------------
# safetensors.


def test_safetensors_round_trip(tmp_path):
  state = _sample_state()
  path = tmp_path / "state.safetensors"
  tw.save_safetensors(state, path, metadata={"format": "pt", "note": "ddo"})
  got, metadata = tw.load_safetensors(path, return_metadata=True)
  _assert_round_trip(got, state)
  assert metadata == {"format": "pt", "note": "ddo"}
  _assert_round_trip(tp.load_torch_state_dict(path), state)
  assert _no_temp_files(tmp_path)


def test_safetensors_layout_follows_spec(tmp_path):
  state = _sample_state()
  path = tmp_path / "state.safetensors"
  tw.save_safetensors(state, path, metadata={"format": "pt"})
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  assert n % 8 == 0
  header = json.loads(raw[8:8 + n])
  assert header.pop("__metadata__") == {"format": "pt"}
  assert list(header) == list(state)
  position = 0
  for name, info in header.items():
    begin, end = info["data_offsets"]
    assert begin == position and info["shape"] == list(state[name].shape)
    assert raw[8 + n + begin:8 + n + end] == np.asarray(state[name]).astype(
        state[name].dtype.newbyteorder("<")).tobytes()
    position = end
  assert 8 + n + position == len(raw)
  assert header["w.f16"]["dtype"] == "F16" and header["steps.i64"]["dtype"] == "I64"
  assert header["flags"]["dtype"] == "BOOL" and header["gain"]["shape"] == []


def test_safetensors_bfloat16_is_widened(tmp_path):
  ml_dtypes = pytest.importorskip("ml_dtypes")
  values = np.array([-2.5, 0.0, 1.0, 3.140625], dtype=ml_dtypes.bfloat16)
  path = tmp_path / "bf16.safetensors"
  tw.save_safetensors({"x": values}, path)
  got = tw.load_safetensors(path)["x"]
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, values.astype(np.float32))


def test_safetensors_reads_golden():
  expected = load_npz("var", "var", "state.npz")
  got, metadata = tw.load_safetensors(golden_path("formats", "var_tiny.safetensors"), return_metadata=True)
  assert metadata == {"format": "pt"}
  _assert_round_trip(got, expected, ordered=False)
  assert list(got)[0] == "lvl_1L"  # The writer put int64 first.


@pytest.mark.parametrize("damage", ["cut_header", "cut_data", "extra_bytes", "bad_json", "bad_offsets", "bad_dtype"])
def test_safetensors_corrupt(tmp_path, damage):
  path = tmp_path / "x.safetensors"
  tw.save_safetensors({"a": np.arange(6, dtype=np.float32), "b": np.ones(3, np.int64)}, path)
  raw = path.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  header = json.loads(raw[8:8 + n])
  if damage == "cut_header":
    raw = raw[:8 + n // 2]
  elif damage == "cut_data":
    raw = raw[:-5]
  elif damage == "extra_bytes":
    raw = raw + b"\0" * 8
  elif damage == "bad_json":
    raw = raw[:8] + b"{" * n + raw[8 + n:]
  else:
    if damage == "bad_offsets":
      header["b"]["data_offsets"] = [0, 24]
    else:
      header["b"]["dtype"] = "F8_E9M9"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    raw = struct.pack("<Q", len(text)) + text + raw[8 + n:]
  path.write_bytes(raw)
  with pytest.raises(tp.CheckpointFormatError) as err:
    tw.load_safetensors(path)
  assert str(path) in str(err.value)
  with pytest.raises(tp.CheckpointFormatError):
    tp.load_torch_state_dict(path)


# ---------------------------------------------------------------------------------------------------------------------
# torch.save zip layout.


def test_torch_zip_round_trip(tmp_path):
  state = _sample_state()
  path = tmp_path / "state.pth"
  tw.save_torch_zip(state, path)
  _assert_round_trip(tp.load_torch_state_dict(path), state)
  assert _no_temp_files(tmp_path)


def test_torch_zip_round_trip_golden_var_state(tmp_path):
  expected = load_npz("var", "var", "state.npz")
  path = tmp_path / "var.pth"
  tw.save_torch_zip(expected, path)
  _assert_round_trip(tp.load_torch_state_dict(path), expected)


def test_torch_zip_layout(tmp_path):
  state = load_npz("var", "var", "state.npz")
  path = tmp_path / "var_copy.pth"
  tw.save_torch_zip(state, path)
  raw = path.read_bytes()
  with zipfile.ZipFile(path) as zf:
    infos = zf.infolist()
    names = [i.filename for i in infos]
    assert names[0] == "var_copy/data.pkl"
    assert set(names) == {"var_copy/" + n for n in ["data.pkl", ".format_version", ".storage_alignment", "byteorder",
                                                    "version"] + [f"data/{i}" for i in range(len(state))]}
    assert zf.read("var_copy/version") == b"3\n" and zf.read("var_copy/byteorder") == b"little"
    assert zf.read("var_copy/.storage_alignment") == b"64" and zf.read("var_copy/.format_version") == b"1"
    for info in infos:
      assert info.compress_type == zipfile.ZIP_STORED
      name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
      assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    pkl = zf.read("var_copy/data.pkl")
  ops = list(pickletools.genops(pkl))
  assert ops[0][0].name == "PROTO" and ops[0][1] == 2
  globals_used = {arg.replace(" ", ".") for op, arg, _ in ops if op.name == "GLOBAL"}
  assert globals_used == {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage",
                          "torch.LongStorage"}
  persids = [op for op, _, _ in ops if op.name == "BINPERSID"]
  assert len(persids) == len(state)


def test_writers_are_atomic(tmp_path, monkeypatch):
  path = tmp_path / "model.pth"
  tw.save_torch_zip({"a": np.ones(3, np.float32)}, path)
  before = path.read_bytes()
  with pytest.raises(TypeError):
    tw.save_torch_zip({"a": np.ones(3, np.float32), "bad": np.array([object()], dtype=object)}, path)
  with pytest.raises(TypeError):
    tw.save_safetensors({"bad": np.array([1 + 2j])}, path)  # complex has no safetensors code
  assert path.read_bytes() == before
  assert _no_temp_files(tmp_path)
  original = tw._write_aligned  # pylint: disable=protected-access

  def failing(zf, name, data):
    if name.endswith("/version"):
      raise OSError("disk full")
    original(zf, name, data)

  monkeypatch.setattr(tw, "_write_aligned", failing)
  with pytest.raises(OSError, match="disk full"):
    tw.save_torch_zip({"c": np.ones(5, np.float32)}, path)  # Fails after most of the file was written.
  assert path.read_bytes() == before
  assert _no_temp_files(tmp_path)
  monkeypatch.undo()
  tw.save_torch_zip({"b": np.zeros(2, np.int64)}, path)  # Overwrite in place.
  assert list(tp.load_torch_state_dict(path)) == ["b"]
  assert _no_temp_files(tmp_path)


def test_real_torch_loads_written_zip_weights_only(tmp_path):
  torch = pytest.importorskip("torch")
  state = _sample_state()
  path = tmp_path / "for_torch.pth"
  tw.save_torch_zip(state, path)
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  assert isinstance(loaded, collections.OrderedDict) and list(loaded) == list(state)
  for k, value in state.items():
    ref = np.asarray(value).astype(value.dtype.newbyteorder("="))
    t = loaded[k]
    assert t.is_contiguous() and tuple(t.shape) == ref.shape, k
    got = t.numpy()
    assert got.dtype == ref.dtype and got.tobytes() == ref.tobytes(order="C"), k


def test_real_torch_loads_written_var_state(tmp_path):
  torch = pytest.importorskip("torch")
  state = load_npz("var", "var", "state.npz")
  path = tmp_path / "var.pth"
  tw.save_torch_zip(state, path)
  loaded = torch.load(path, map_location="cpu", weights_only=True)
  reference = torch.load(golden_path("formats", "var_tiny.pth"), map_location="cpu", weights_only=True)
  assert list(loaded) == list(reference)
  for k in reference:
    assert loaded[k].dtype == reference[k].dtype and loaded[k].shape == reference[k].shape, k
    assert loaded[k].numpy().tobytes() == reference[k].numpy().tobytes(), k
