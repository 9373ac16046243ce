"""Tests for ddo_jax.convert.torch_pickle: torch-free, code-execution-free checkpoint reading."""
import collections
import hashlib
import io
import os
import pickle
import struct
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from ddo_jax.convert import torch_pickle as tp
from tests.goldens import golden_path, load_json, load_npz

_PKL_FIXTURES = ["edm_tiny_cond", "edm2_tiny_latent", "edm2_tiny_img_guide"]
_VAR_FILES = ["var_tiny.pth", "var_tiny_legacy.pth", "var_tiny.safetensors"]
_MAGIC = 0x1950A86A20F9469CFC6C


# ---------------------------------------------------------------------------------------------------------------------
# Helpers.


def _expected_pkl_state(fixture: str) -> "dict[str, np.ndarray]":
  """The state each formats/*.pkl must hold (goldens README, section formats/), in state_dict order."""
  if fixture == "edm_tiny_cond":
    return load_npz("edm", "ddpmpp_cond", "state.npz")
  if fixture == "edm2_tiny_latent":
    state = load_npz("edm2", "precond_img", "state.npz")
    override = load_npz("edm2", "precond_latent", "state_override.npz")
    assert set(override) <= set(state)
    state.update(override)  # Same keys, so the order is kept.
  else:
    state = load_npz("edm2", "precond_guide", "state.npz")
  return {k: v.astype(np.float16) for k, v in state.items()}


def _assert_same_state(got, expected, ordered=True):
  """Keys (and their order), dtypes, shapes and bytes all equal."""
  if ordered:
    assert list(got) == list(expected)
  else:
    assert sorted(got) == sorted(expected)
  for k, ref in expected.items():
    assert got[k].dtype == ref.dtype, k
    assert got[k].shape == ref.shape, k
    assert got[k].tobytes() == ref.tobytes(), k


def _sha(text: str) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _placeholder(module_path: str) -> str:
  """The placeholder that replaced each module source in the fixtures (goldens README, formats/)."""
  return f"# source of {module_path} removed for the test fixture\n"


def _rename_globals(data: bytes, renames: dict, strict: bool = True) -> bytes:
  """Rewrites protocol-2 GLOBAL opcodes ('c<module>\\n<name>\\n') naming local stand-ins to torch/numpy names."""
  for obj, target in renames.items():
    source = f"c{obj.__module__}\n{obj.__qualname__}\n".encode()
    assert source in data or not strict, source
    data = data.replace(source, f"c{target[0]}\n{target[1]}\n".encode())
  return data


# Stand-ins pickled under their own names, then renamed with _rename_globals.
def _fake_reconstruct(meta):
  return meta


def _fake_rebuild_tensor_v2(*args):
  return args


def _fake_rebuild_parameter(*args):
  return args


def _fake_load_from_bytes(blob):
  return blob


class _FakeFloatStorage:
  pass


class _FakeLongStorage:
  pass


class _FakeModuleDict:
  pass


class _Call:
  """Pickles as fn(*args) (REDUCE)."""

  def __init__(self, fn, *args):
    self.fn, self.args = fn, args

  def __reduce__(self):
    return self.fn, self.args


_RENAMES = {
    _fake_reconstruct: ("torch_utils.persistence", "_reconstruct_persistent_obj"),
    _fake_rebuild_tensor_v2: ("torch._utils", "_rebuild_tensor_v2"),
    _fake_rebuild_parameter: ("torch._utils", "_rebuild_parameter"),
    _fake_load_from_bytes: ("torch.storage", "_load_from_bytes"),
    _FakeModuleDict: ("torch.nn.modules.container", "ModuleDict"),
}


def _legacy_header() -> bytes:
  sys_info = {"protocol_version": 1001, "little_endian": True, "type_sizes": {"short": 2, "int": 4, "long": 4}}
  return b"".join(pickle.dumps(x, protocol=2) for x in (_MAGIC, 1001, sys_info))


class _StoragePickler(pickle.Pickler):
  """Pickles numpy arrays as torch legacy storage persistent ids."""

  def __init__(self, file, storages):
    super().__init__(file, protocol=2)
    self.storages = storages

  def persistent_id(self, obj):
    if isinstance(obj, np.ndarray):
      key = str(len(self.storages))
      self.storages.append((key, obj))
      cls = _FakeLongStorage if obj.dtype == np.int64 else _FakeFloatStorage
      return ("storage", cls, key, "cpu", obj.size, None)
    return None


def _legacy_save(obj) -> bytes:
  """A legacy (non-zip) torch.save of ``obj``, whose numpy arrays become float32/int64 storages."""
  storages = []
  buf = io.BytesIO()
  _StoragePickler(buf, storages).dump(obj)
  body = _rename_globals(buf.getvalue(), _RENAMES, strict=False)
  body = _rename_globals(body, {_FakeFloatStorage: ("torch", "FloatStorage"),
                                _FakeLongStorage: ("torch", "LongStorage")}, strict=False)
  out = [_legacy_header(), body, pickle.dumps([k for k, _ in storages], protocol=2)]
  for _, arr in storages:
    out += [struct.pack("<q", arr.size), arr.astype(arr.dtype.newbyteorder("<")).tobytes()]
  return b"".join(out)


def _tensor(arr: np.ndarray, parameter: bool = False) -> _Call:
  """A tensor as in a plain (persistence) pickle: _rebuild_tensor_v2(_load_from_bytes(blob), ...)."""
  blob = _legacy_save(arr.ravel(order="K"))  # Memory order, to go with the strides below.
  strides = tuple(s // arr.itemsize for s in arr.strides)
  t = _Call(_fake_rebuild_tensor_v2, _Call(_fake_load_from_bytes, blob), 0, arr.shape, strides, False,
            collections.OrderedDict())
  return _Call(_fake_rebuild_parameter, t, True, collections.OrderedDict()) if parameter else t


def _record(name: str, state: dict, src: str = "# tiny module\n") -> _Call:
  meta = dict(type="class", version=6, module_src=src, class_name=name, state=state)
  return _Call(_fake_reconstruct, meta)


def _module_state(params=(), buffers=(), modules=(), non_persistent=(), **attrs) -> dict:
  """A torch-1.x style Module __dict__: OrderedDict containers, few hook attributes."""
  state = {"training": False, "_parameters": collections.OrderedDict(params),
           "_buffers": collections.OrderedDict(buffers), "_non_persistent_buffers_set": set(non_persistent),
           "_backward_hooks": collections.OrderedDict(), "_forward_hooks": collections.OrderedDict(),
           "_modules": collections.OrderedDict(modules)}
  state.update(attrs)
  return state


def _module_dict(modules) -> _FakeModuleDict:
  container = _FakeModuleDict()
  container.__dict__.update(_module_state(modules=modules))
  return container


def _write_zip(path, prefix: str, members: dict):
  with zipfile.ZipFile(path, "w") as zf:
    for name, data in members.items():
      zf.writestr(f"{prefix}/{name}", data)


class _Shell:
  """Pickles as a call that runs a shell command (os.system) creating ``marker``."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return os.system, (f"touch '{self.marker}'",)


class _CheckOutput:
  """Pickles as subprocess.check_output(['touch', marker])."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return subprocess.check_output, (["touch", self.marker],)


_SYSTEM = f"{os.system.__module__}.system"


# ---------------------------------------------------------------------------------------------------------------------
# EDM / EDM2 persistence pickles.


@pytest.mark.parametrize("fixture", _PKL_FIXTURES)
def test_pickle_state_matches_golden_bit_for_bit(fixture):
  data = tp.load_persistence_pickle(golden_path("formats", f"{fixture}.pkl"))
  state = tp.module_state_dict(data["ema"])
  _assert_same_state(state, _expected_pkl_state(fixture))


@pytest.mark.parametrize("fixture", _PKL_FIXTURES)
def test_pickle_top_level_and_records(fixture):
  desc = load_json("formats", f"{fixture}.json")
  data = tp.load_persistence_pickle(golden_path("formats", f"{fixture}.pkl"))
  assert list(data) == desc["inventory"]["top_level_keys"]
  is_edm2 = fixture.startswith("edm2")
  assert isinstance(data, tp.EasyDict) == is_edm2
  if is_edm2:
    assert isinstance(data["dataset_kwargs"], tp.EasyDict)
    assert data.ema is data["ema"]
  assert isinstance(data["dataset_kwargs"], dict)
  by_path = {p["path"]: p for p in desc["inventory"]["persistent_objects"]}
  for key in data:
    path = f"root[{key!r}]"
    if path in by_path:
      record = data[key]
      assert isinstance(record, tp.PersistentRecord)
      assert tp.class_name(record) == by_path[path]["class_name"]
      assert record.version == 6 and record.type == "class"
      assert record.module_src == by_path[path]["module_src"]
  records = list(tp.iter_records(data))
  assert len(records) == len(by_path)


def test_edm_init_kwargs_and_numpy_scalars():
  data = tp.load_persistence_pickle(golden_path("formats", "edm_tiny_cond.pkl"))
  cfg = load_json("edm", "ddpmpp_cond", "config.json")
  assert tp.class_name(data["ema"]) == cfg["class_name"].rsplit(".", 1)[-1] == "EDMPrecond"
  assert tp.init_kwargs(data["ema"]) == cfg["init_kwargs"]
  assert tp.init_args(data["ema"]) == ()
  # numpy.float64 scalars (protocol-4 numpy._core.multiarray.scalar) are rebuilt, then converted to python.
  model = data["ema"].state["_modules"]["model"]
  assert tp.class_name(model) == "SongUNet"
  enc = model.state["_modules"]["enc"]
  assert isinstance(enc, tp.TorchModuleStub) and tp.class_name(enc) == "ModuleDict"
  block = enc.state["_modules"]["16x16_block0"]
  raw = block.state["_init_kwargs"]["skip_scale"]
  assert isinstance(raw, np.float64) and raw == np.sqrt(0.5)
  kwargs = tp.init_kwargs(block)
  assert type(kwargs["skip_scale"]) is float and kwargs["skip_scale"] == float(np.sqrt(0.5))
  assert tp.init_kwargs(data["loss_fn"]) == {}
  assert tp.class_name(data["augment_pipe"]) == "AugmentPipe"


@pytest.mark.parametrize("fixture", ["edm2_tiny_latent", "edm2_tiny_img_guide"])
def test_edm2_init_kwargs_and_encoder(fixture):
  desc = load_json("formats", f"{fixture}.json")
  data = tp.load_persistence_pickle(golden_path("formats", f"{fixture}.pkl"))
  assert tp.class_name(data["ema"]) == "Precond"
  assert tp.init_kwargs(data["ema"]) == desc["construction"]["ema_init_kwargs"]
  assert tp.class_name(data["loss_fn"]) == "EDM2Loss"
  encoder = data["encoder"]
  if fixture == "edm2_tiny_latent":
    assert tp.class_name(encoder) == "StabilityVAEEncoder"
    # numpy.ndarray attributes (numpy._core.multiarray._reconstruct + BUILD) come back as float32 arrays.
    for name in ("scale", "bias"):
      arr = encoder.state[name]
      assert isinstance(arr, np.ndarray) and arr.dtype == np.float32 and arr.shape == (4,)
    assert encoder.state["_vae"] is None
  else:
    assert tp.class_name(encoder) == "StandardRGBEncoder"


_MODULE_OF = {
    "edm_tiny_cond": {"EDMLoss": "training/loss.py", "AugmentPipe": "training/augment.py",
                      "*": "training/networks.py"},
    "edm2_tiny_latent": {"EDM2Loss": "training/training_loop.py", "StabilityVAEEncoder": "training/encoders.py",
                         "*": "training/networks_edm2.py"},
    "edm2_tiny_img_guide": {"EDM2Loss": "training/training_loop.py", "StandardRGBEncoder": "training/encoders.py",
                            "*": "training/networks_edm2.py"},
}


@pytest.mark.parametrize("fixture", _PKL_FIXTURES)
def test_module_sources_sha256_of_placeholders(fixture):
  desc = load_json("formats", f"{fixture}.json")
  data = tp.load_persistence_pickle(golden_path("formats", f"{fixture}.pkl"))
  sources = tp.module_sources(data)
  assert set(sources) == set(desc["real_module_src_sha256"])
  modules = _MODULE_OF[fixture]
  for name, digest in sources.items():
    assert digest == _sha(_placeholder(modules.get(name, modules["*"]))), name
    assert digest != desc["real_module_src_sha256"][name]  # The real sources were replaced.
  for po in desc["inventory"]["persistent_objects"]:
    assert sources[po["class_name"]] == po["module_src_sha256"] == _sha(po["module_src"])


def test_library_never_imports_torch():
  code = ("import sys; from ddo_jax.convert import torch_pickle as tp, torch_write; "
          f"d = tp.load_persistence_pickle({str(golden_path('formats', 'edm_tiny_cond.pkl'))!r}); "
          f"tp.load_torch_state_dict({str(golden_path('formats', 'var_tiny.pth'))!r}); "
          "assert 'torch' not in sys.modules, 'torch was imported'")
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_torch1x_style_pickle(tmp_path):
  """Protocol 2, OrderedDict containers, numpy.core.* spelling, __builtin__.set, _codecs.encode, LongStorage."""
  rng = np.random.default_rng(0)
  w_lin = rng.standard_normal((3, 4)).astype(np.float32)
  w_top = rng.standard_normal((2, 5)).astype(np.float32)
  steps = np.arange(6, dtype=np.int64).reshape(2, 3)
  transposed = np.asfortranarray(rng.standard_normal((3, 2)).astype(np.float32))  # Non-contiguous strides.
  lin = _record("Linear", _module_state(params=[("weight", _tensor(w_lin, True)), ("bias", None)],
                                        _init_args=(), _init_kwargs={"in_features": 4, "out_features": 3,
                                                                     "init_weight": np.float64(0.25)}))
  top_state = _module_state(
      params=[("weight", _tensor(w_top, True))],
      buffers=[("steps", _tensor(steps)), ("scratch", _tensor(w_lin)), ("empty", None), ("t", _tensor(transposed))],
      non_persistent=["scratch"],
      modules=[("blocks", _module_dict([("lin", lin)])), ("missing", None)],
      skip_scale=np.float64(np.sqrt(0.5)),
      _init_args=(), _init_kwargs={"channels": 5, "skip_scale": np.float64(np.sqrt(0.5)), "mult": [1, 2]})
  data = pickle.dumps({"ema": _record("Top", top_state, "# networks\n"), "augment_pipe": None,
                       "dataset_kwargs": {"xflip": False}}, protocol=2)
  data = _rename_globals(data, _RENAMES)
  assert b"cnumpy._core.multiarray\nscalar\n" in data and b"c__builtin__\nset\n" in data
  data = data.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
  path = tmp_path / "torch1x.pkl"
  path.write_bytes(data)
  loaded = tp.load_persistence_pickle(path)
  state = tp.module_state_dict(loaded["ema"])
  assert list(state) == ["weight", "steps", "t", "blocks.lin.weight"]
  _assert_same_state(state, {"weight": w_top, "steps": steps, "t": np.ascontiguousarray(transposed),
                             "blocks.lin.weight": w_lin})
  assert tp.init_kwargs(loaded["ema"]) == {"channels": 5, "skip_scale": float(np.sqrt(0.5)), "mult": [1, 2]}
  lin_rec = loaded["ema"].state["_modules"]["blocks"].state["_modules"]["lin"]
  assert tp.init_kwargs(lin_rec)["init_weight"] == 0.25
  assert tp.module_sources(loaded) == {"Top": _sha("# networks\n"), "Linear": _sha("# tiny module\n")}


# ---------------------------------------------------------------------------------------------------------------------
# VAR state-dict files.


@pytest.mark.parametrize("name", _VAR_FILES)
def test_var_files_match_state_bit_for_bit(name):
  expected = load_npz("var", "var", "state.npz")
  got = tp.load_torch_state_dict(golden_path("formats", name))
  assert isinstance(got, collections.OrderedDict)
  # safetensors orders by dtype then name; the torch files keep the state_dict order.
  _assert_same_state(got, expected, ordered=not name.endswith(".safetensors"))
  assert got["lvl_1L"].dtype == np.int64
  assert np.isneginf(got["attn_bias_for_masking"]).any()


def _nested_checkpoint(tmp_path) -> str:
  """var_tiny.pth rewrapped as {'epoch': 3, 'trainer': {'var_wo_ddp': <state>, 'config': {}}} (VAR ar-ckpt)."""
  src = golden_path("formats", "var_tiny.pth")
  with zipfile.ZipFile(src) as zf:
    members = {n.split("/", 1)[1]: zf.read(n) for n in zf.namelist()}
  body = members["data.pkl"][2:-1]  # Strip PROTO 2 and STOP; the memo indices stay unique.
  s = lambda text: b"X" + struct.pack("<I", len(text)) + text.encode()  # pylint: disable=unnecessary-lambda-assignment
  members["data.pkl"] = (b"\x80\x02}(" + s("epoch") + b"K\x03" + s("trainer") + b"}(" + s("var_wo_ddp") + body +
                         s("config") + b"}uu.")
  path = tmp_path / "ar-ckpt-last.pth"
  _write_zip(path, "archive", members)
  return str(path)


def test_nested_checkpoint_needs_key(tmp_path):
  path = _nested_checkpoint(tmp_path)
  with pytest.raises(tp.CheckpointFormatError) as err:
    tp.load_torch_state_dict(path)
  msg = str(err.value)
  assert path in msg and "'epoch'" in msg and "'trainer'" in msg and "key='trainer/var_wo_ddp'" in msg
  expected = load_npz("var", "var", "state.npz")
  _assert_same_state(tp.load_torch_state_dict(path, key="trainer/var_wo_ddp"), expected)
  _assert_same_state(tp.load_torch_state_dict(path, key=("trainer", "var_wo_ddp")), expected)
  with pytest.raises(tp.CheckpointFormatError, match="'trainer/model' not found"):
    tp.load_torch_state_dict(path, key="trainer/model")


def test_persistence_pickle_and_state_dict_loaders_redirect():
  with pytest.raises(tp.CheckpointFormatError, match="load_torch_state_dict"):
    tp.load_persistence_pickle(golden_path("formats", "var_tiny.pth"))
  with pytest.raises(tp.CheckpointFormatError, match="load_torch_state_dict"):
    tp.load_persistence_pickle(golden_path("formats", "var_tiny_legacy.pth"))
  with pytest.raises(tp.CheckpointFormatError, match="load_persistence_pickle"):
    tp.load_torch_state_dict(golden_path("formats", "edm_tiny_cond.pkl"))


# ---------------------------------------------------------------------------------------------------------------------
# Refusal of code-running pickles.


def test_payload_really_runs_under_plain_pickle(tmp_path):
  """Control: the payload used below does run a shell command under plain pickle.loads."""
  marker = tmp_path / "ran"
  pickle.loads(pickle.dumps(_Shell(marker)))
  assert marker.exists()


@pytest.mark.parametrize("payload,global_name", [(_Shell, _SYSTEM), (_CheckOutput, "subprocess.check_output")])
@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_plain_pickle(tmp_path, payload, global_name, protocol):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps({"ema": payload(marker)}, protocol=protocol))
  with pytest.raises(tp.ForbiddenGlobalError) as err:
    tp.load_persistence_pickle(path)
  assert isinstance(err.value, pickle.UnpicklingError)
  assert err.value.global_name == global_name
  msg = str(err.value)
  assert f"'{global_name}'" in msg and str(path) in msg and "would run code" in msg and "refused" in msg
  with pytest.raises(tp.ForbiddenGlobalError):
    tp.restricted_loads(path.read_bytes())
  assert not marker.exists()


def test_refuses_payload_inside_pth_zip(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil.pth"
  _write_zip(path, "evil", {"data.pkl": pickle.dumps(_Shell(marker), protocol=2), "version": b"3\n",
                            "byteorder": b"little"})
  with pytest.raises(tp.ForbiddenGlobalError, match=f"'{_SYSTEM}'") as err:
    tp.load_torch_state_dict(path)
  assert str(path) in str(err.value)
  assert not marker.exists()


def test_refuses_payload_inside_legacy_pth(tmp_path):
  marker = tmp_path / "ran"
  path = tmp_path / "evil_legacy.pth"
  path.write_bytes(_legacy_header() + pickle.dumps(_CheckOutput(marker), protocol=2) + pickle.dumps([], protocol=2))
  with pytest.raises(tp.ForbiddenGlobalError, match="'subprocess.check_output'"):
    tp.load_torch_state_dict(path)
  assert not marker.exists()


@pytest.mark.parametrize("where", ["sys_info", "storage_object"])
def test_refuses_payload_inside_storage_blob(tmp_path, where):
  marker = tmp_path / "ran"
  header = b"".join(pickle.dumps(x, protocol=2) for x in (_MAGIC, 1001))
  if where == "sys_info":
    blob = header + pickle.dumps(_Shell(marker), protocol=2)
  else:  # The storage "type" in the persistent id is os.system itself.
    blob = _legacy_save(np.zeros(3, np.float32)).replace(b"ctorch\nFloatStorage\n",
                                                         f"c{os.system.__module__}\nsystem\n".encode())
  data = pickle.dumps({"ema": _record("Net", _module_state(params=[("w", _Call(
      _fake_rebuild_tensor_v2, _Call(_fake_load_from_bytes, blob), 0, (3,), (1,), False,
      collections.OrderedDict()))]))}, protocol=2)
  path = tmp_path / "evil_blob.pkl"
  path.write_bytes(_rename_globals(data, _RENAMES, strict=False))
  with pytest.raises(tp.ForbiddenGlobalError) as err:
    tp.load_persistence_pickle(path)
  assert err.value.global_name == _SYSTEM
  assert "storage blob" in str(err.value) and str(path) in str(err.value)
  assert not marker.exists()


def test_allowlisted_names_cannot_be_reached_through_attributes():
  # Protocol 4 STACK_GLOBAL allows dotted names; only exact allowlisted names resolve.
  short = lambda text: b"\x8c" + bytes([len(text)]) + text.encode()  # pylint: disable=unnecessary-lambda-assignment
  data = b"\x80\x04" + short("collections") + short("OrderedDict.__init__.__code__") + b"\x93."
  with pytest.raises(tp.ForbiddenGlobalError, match="collections.OrderedDict.__init__.__code__"):
    tp.restricted_loads(data)
  with pytest.raises(tp.ForbiddenGlobalError, match="builtins.eval"):
    tp.restricted_loads(b"\x80\x02c__builtin__\neval\nX\x03\x00\x00\x001+1\x85R.")
  # Allowed names resolve to inert markers, not callables: numpy.ndarray(5) cannot be called.
  with pytest.raises(TypeError, match="not callable"):
    tp.restricted_loads(b"\x80\x02cnumpy\nndarray\nK\x05\x85R.")


def test_object_dtype_arrays_are_refused():
  arr = np.array([1, "x"], dtype=object)
  with pytest.raises(pickle.UnpicklingError):
    tp.restricted_loads(pickle.dumps(arr, protocol=2))


# ---------------------------------------------------------------------------------------------------------------------
# Truncated and corrupt files.


def _copy_cut(tmp_path, name: str, keep: float) -> str:
  data = golden_path("formats", name).read_bytes()
  path = tmp_path / f"cut_{name}"
  path.write_bytes(data[:int(len(data) * keep)])
  return str(path)


@pytest.mark.parametrize("name", _VAR_FILES)
@pytest.mark.parametrize("keep", [0.0005, 0.3, 0.999])
def test_truncated_state_dict_files(tmp_path, name, keep):
  path = _copy_cut(tmp_path, name, keep)
  with pytest.raises(tp.CheckpointFormatError) as err:
    tp.load_torch_state_dict(path)
  msg = str(err.value)
  assert path in msg and ("truncated" in msg or "corrupt" in msg or "unrecognized" in msg), msg


@pytest.mark.parametrize("keep", [0.001, 0.5, 0.999])
def test_truncated_persistence_pickle(tmp_path, keep):
  path = _copy_cut(tmp_path, "edm2_tiny_img_guide.pkl", keep)
  with pytest.raises(tp.CheckpointFormatError, match="truncated or corrupt") as err:
    tp.load_persistence_pickle(path)
  assert path in str(err.value)


def test_corrupt_zip_member_crc(tmp_path):
  src = golden_path("formats", "var_tiny.pth")
  data = bytearray(src.read_bytes())
  with zipfile.ZipFile(src) as zf:
    info = zf.getinfo("var_tiny/data/1")
  name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
  data[info.header_offset + 30 + name_len + extra_len + 5] ^= 0xFF
  path = tmp_path / "crc.pth"
  path.write_bytes(bytes(data))
  with pytest.raises(tp.CheckpointFormatError, match="CRC") as err:
    tp.load_torch_state_dict(path)
  assert str(path) in str(err.value)


def test_empty_and_garbage_files(tmp_path):
  empty = tmp_path / "empty.pth"
  empty.write_bytes(b"")
  with pytest.raises(tp.CheckpointFormatError, match="empty"):
    tp.load_torch_state_dict(empty)
  with pytest.raises(tp.CheckpointFormatError, match="empty"):
    tp.load_persistence_pickle(empty)
  garbage = tmp_path / "garbage.pth"
  garbage.write_bytes(b"this is not a checkpoint at all" * 4)
  with pytest.raises(tp.CheckpointFormatError, match="unrecognized format") as err:
    tp.load_torch_state_dict(garbage)
  assert str(garbage) in str(err.value)
  with pytest.raises(tp.CheckpointFormatError, match="truncated or corrupt"):
    tp.load_persistence_pickle(garbage)


def test_legacy_storage_size_mismatch(tmp_path):
  w = np.arange(4, dtype=np.float32)
  data = _legacy_save(collections.OrderedDict(w=_Call(_fake_rebuild_tensor_v2, w, 0, (2, 2), (2, 1), False,
                                                      collections.OrderedDict())))
  good = tmp_path / "good.pth"
  good.write_bytes(data)
  _assert_same_state(tp.load_torch_state_dict(good), {"w": w.reshape(2, 2)})
  assert data[-24:-16] == struct.pack("<q", 4)
  bad = tmp_path / "bad.pth"
  bad.write_bytes(data[:-24] + struct.pack("<q", 5) + data[-16:])
  with pytest.raises(tp.CheckpointFormatError, match="holds 5 elements") as err:
    tp.load_torch_state_dict(bad)
  assert str(bad) in str(err.value)


# ---------------------------------------------------------------------------------------------------------------------
# Sanity checks against real PyTorch (skipped when torch is not installed).


@pytest.mark.parametrize("name", ["var_tiny.pth", "var_tiny_legacy.pth"])
def test_reader_agrees_with_real_torch_load(name):
  torch = pytest.importorskip("torch")
  path = golden_path("formats", name)
  ref = torch.load(path, map_location="cpu", weights_only=True)
  got = tp.load_torch_state_dict(path)
  assert list(got) == list(ref)
  for k, t in ref.items():
    assert got[k].dtype == t.numpy().dtype and got[k].tobytes() == t.numpy().tobytes(), k


@pytest.mark.parametrize("zip_layout", [True, False])
def test_reader_on_torch_written_views_and_dtypes(tmp_path, zip_layout):
  torch = pytest.importorskip("torch")
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  sd = collections.OrderedDict(
      transposed=base.t(),                       # Non-contiguous, shares the storage of `base`.
      sliced=base[1:3, 2:5],                     # Storage offset + strides.
      base=base,
      bf16=torch.linspace(-3, 3, 7, dtype=torch.bfloat16),
      half=torch.linspace(-1, 1, 5, dtype=torch.float16),
      i8=torch.arange(-4, 4, dtype=torch.int8), u8=torch.arange(5, dtype=torch.uint8),
      flags=torch.tensor([True, False, True]), f64=torch.rand(2, 3, dtype=torch.float64),
      i32=torch.arange(3, dtype=torch.int32), scalar=torch.tensor(2.5), empty=torch.zeros(0, 3))
  path = tmp_path / "torch_written.pth"
  torch.save(sd, path, _use_new_zipfile_serialization=zip_layout)
  got = tp.load_torch_state_dict(path)
  assert list(got) == list(sd)
  for k, t in sd.items():
    ref = t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
    assert got[k].dtype == ref.dtype and got[k].shape == ref.shape and np.array_equal(got[k], ref), k
