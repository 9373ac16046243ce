"""Torch-free checkpoint writers (and the safetensors reader), numpy only.

* :func:`save_safetensors` / :func:`load_safetensors` follow the safetensors format: an 8-byte little-endian header
  length N, N bytes of JSON (``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
  padded with spaces to a multiple of 8), then the raw little-endian tensor bytes, without holes.
* :func:`save_torch_zip` writes what ``torch.save(state_dict)`` writes (zip layout, torch >= 1.6): ``data.pkl`` (pickle
  protocol 2: ``collections.OrderedDict`` of ``torch._utils._rebuild_tensor_v2`` calls over persistent storage ids),
  ``data/<key>`` records stored uncompressed and 64-byte aligned, ``version``, ``byteorder``, ``.format_version`` and
  ``.storage_alignment``. ``torch.load(path, weights_only=True)`` reads it.

Every writer is atomic: it writes a temporary file in the destination folder, then ``os.replace``s it.
"""
import collections
import json
import os
import re
import struct
import zipfile
from typing import Callable, Dict, Mapping, Optional, Tuple, Union

import numpy as np

from ddo_jax import utils
from ddo_jax.convert.torch_pickle import CheckpointFormatError

__all__ = ["load_safetensors", "save_safetensors", "save_torch_zip"]

PathLike = Union[str, "os.PathLike[str]"]

_ALIGNMENT = 64
_MAX_HEADER = 100 * 1024 * 1024

# numpy dtype name -> safetensors dtype code.
_SAFETENSORS_CODES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8",
    "uint64": "U64", "uint32": "U32", "uint16": "U16", "uint8": "U8", "bool": "BOOL",
}
# safetensors dtype code -> numpy dtype to read it as (BF16 is read as uint16 and widened to float32).
_SAFETENSORS_READ = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2",
    "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
# numpy dtype name -> torch storage class used in data.pkl.
_TORCH_STORAGES = {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage", "bfloat16": "BFloat16Storage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage", "complex64": "ComplexFloatStorage",
    "complex128": "ComplexDoubleStorage",
}


# ---------------------------------------------------------------------------------------------------------------------
# Helpers.


def _atomic_write(path: PathLike, write: Callable) -> None:
  """Calls ``write(fileobj)`` on a temporary file next to ``path``, then renames it over ``path`` (with the
  permissions a plain open() would give under the current umask)."""
  with utils.atomic_open(os.path.abspath(os.fspath(path)), "wb") as f:
    write(f)


def _little_endian(value, name: str) -> np.ndarray:
  """C-contiguous little-endian copy (or view) of an array-like; rejects object dtypes."""
  arr = np.asarray(value)
  if arr.dtype.hasobject or (arr.dtype.kind in "OVUS" and arr.dtype.name != "bfloat16"):
    raise TypeError(f"tensor {name!r} has unsupported dtype {arr.dtype}")
  if arr.dtype.byteorder == ">" or (arr.dtype.byteorder == "=" and not np.little_endian):
    arr = arr.astype(arr.dtype.newbyteorder("<"))
  return arr if arr.flags.c_contiguous else arr.copy(order="C")  # (np.ascontiguousarray turns 0-dim into 1-dim)


def _byte_view(arr: np.ndarray) -> memoryview:
  """The raw bytes of a contiguous array, without copying."""
  return memoryview(arr.reshape(-1).view(np.uint8))


def _dtype_name(arr: np.ndarray) -> str:
  """numpy dtype name, with ml_dtypes' bfloat16 recognized."""
  return "bfloat16" if arr.dtype.name == "bfloat16" else arr.dtype.name


# ---------------------------------------------------------------------------------------------------------------------
# safetensors.


def _safetensors_header(arrays: Mapping[str, np.ndarray], metadata: Optional[Mapping[str, str]]) -> bytes:
  """The padded JSON header for ``arrays`` laid out back to back in order."""
  header: Dict[str, object] = {}
  if metadata:
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
      raise TypeError("safetensors metadata must map str to str")
    header["__metadata__"] = dict(metadata)
  offset = 0
  for name, arr in arrays.items():
    code = _SAFETENSORS_CODES.get(_dtype_name(arr))
    if code is None:
      raise TypeError(f"tensor {name!r}: dtype {arr.dtype} has no safetensors code")
    header[name] = {"dtype": code, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
    offset += arr.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
  return raw + b" " * (-len(raw) % 8)


def save_safetensors(state_dict: Mapping[str, object], path: PathLike,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
  """Writes ``state_dict`` (name -> array) as a safetensors file, in the given order, atomically."""
  arrays = collections.OrderedDict()
  for name, value in state_dict.items():
    if not isinstance(name, str) or name == "__metadata__":
      raise ValueError(f"invalid tensor name {name!r}")
    arrays[name] = _little_endian(value, name)
  header = _safetensors_header(arrays, metadata)

  def write(f):
    f.write(struct.pack("<Q", len(header)))
    f.write(header)
    for arr in arrays.values():
      f.write(_byte_view(arr))

  _atomic_write(path, write)


def _parse_safetensors_header(path: str, f, size: int) -> Tuple[dict, int]:
  """Reads and validates the header; returns (header dict, data start offset)."""
  if size < 8:
    raise CheckpointFormatError(f"{path}: truncated safetensors file ({size} bytes, no header length)")
  (n,) = struct.unpack("<Q", f.read(8))
  if n > min(size - 8, _MAX_HEADER):
    raise CheckpointFormatError(f"{path}: truncated or corrupt safetensors file: header length {n} exceeds "
                                f"the {size - 8} bytes that follow")
  try:
    header = json.loads(f.read(n).decode("utf-8"))
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointFormatError(f"{path}: corrupt safetensors header ({e})") from e
  if not isinstance(header, dict):
    raise CheckpointFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
  return header, 8 + n


def _check_entries(path: str, header: dict, data_size: int) -> list:
  """Validated ``(begin, end, name, dtype, shape)`` entries sorted by offset; the buffer must have no holes."""
  entries = []
  for name, info in header.items():
    if name == "__metadata__":
      continue
    try:
      code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointFormatError(f"{path}: corrupt safetensors entry {name!r}: {info!r}") from e
    if code not in _SAFETENSORS_READ:
      raise CheckpointFormatError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
    dtype = np.dtype(_SAFETENSORS_READ[code])
    if not all(isinstance(s, int) and s >= 0 for s in shape):
      raise CheckpointFormatError(f"{path}: tensor {name!r} has invalid shape {shape!r}")
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin and end - begin == nbytes):
      raise CheckpointFormatError(f"{path}: tensor {name!r}: data_offsets {[begin, end]} do not match "
                                  f"{code}{list(shape)} ({nbytes} bytes)")
    entries.append((begin, end, name, code, shape))
  entries.sort(key=lambda e: (e[0], e[1]))
  position = 0
  for begin, end, name, _, _ in entries:
    if begin != position:
      raise CheckpointFormatError(f"{path}: tensor {name!r} starts at byte {begin}, expected {position} "
                                  f"(overlapping or missing data)")
    position = end
  if position != data_size:
    problem = "truncated" if position > data_size else "corrupt (trailing bytes)"
    raise CheckpointFormatError(f"{path}: {problem} safetensors file: the header describes {position} data bytes, "
                                f"the file holds {data_size}")
  return entries


def _read_tensor(f, path: str, name: str, code: str, shape: tuple, nbytes: int) -> np.ndarray:
  """Reads one tensor at the current file position into a fresh array."""
  arr = np.empty(shape, dtype=np.dtype(_SAFETENSORS_READ[code]).newbyteorder("="))
  if nbytes:
    got = f.readinto(_byte_view(arr))
    if got != nbytes:
      raise CheckpointFormatError(f"{path}: truncated: tensor {name!r} needs {nbytes} bytes, got {got}")
  if not np.little_endian:
    arr = arr.byteswap()
  if code == "BF16":
    arr = (arr.astype(np.uint32) << 16).view(np.float32)
  return arr


def load_safetensors(path: PathLike, return_metadata: bool = False):
  """Reads a safetensors file into ``OrderedDict[name, np.ndarray]`` in data-offset order.

  BF16 tensors are widened exactly to float32. With ``return_metadata=True`` returns ``(tensors, metadata)``.
  """
  path = os.fspath(path)
  size = os.path.getsize(path)
  out = collections.OrderedDict()
  with open(path, "rb") as f:
    header, start = _parse_safetensors_header(path, f, size)
    entries = _check_entries(path, header, size - start)
    for begin, end, name, code, shape in entries:
      f.seek(start + begin)
      out[name] = _read_tensor(f, path, name, code, shape, end - begin)
  metadata = header.get("__metadata__") or {}
  return (out, metadata) if return_metadata else out


# ---------------------------------------------------------------------------------------------------------------------
# torch.save zip layout.


class _Protocol2Writer:
  """Minimal pickle (protocol 2) opcode writer for the ``data.pkl`` of a state dict."""

  def __init__(self):
    self.parts = [b"\x80\x02"]

  def raw(self, opcodes: bytes) -> None:
    """Appends opcodes verbatim."""
    self.parts.append(opcodes)

  def global_(self, module: str, name: str) -> None:
    """GLOBAL module.name."""
    self.raw(b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n")

  def string(self, value: str) -> None:
    """BINUNICODE."""
    data = value.encode("utf-8")
    self.raw(b"X" + struct.pack("<I", len(data)) + data)

  def integer(self, value: int) -> None:
    """The shortest of BININT1, BININT2, BININT and LONG1."""
    if 0 <= value < 256:
      self.raw(b"K" + bytes([value]))
    elif 0 <= value < 65536:
      self.raw(b"M" + struct.pack("<H", value))
    elif -2 ** 31 <= value < 2 ** 31:
      self.raw(b"J" + struct.pack("<i", value))
    else:
      data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
      self.raw(b"\x8a" + bytes([len(data)]) + data)

  def int_tuple(self, values) -> None:
    """MARK ints TUPLE."""
    self.raw(b"(")
    for v in values:
      self.integer(int(v))
    self.raw(b"t")

  def empty_ordered_dict(self) -> None:
    """collections.OrderedDict()."""
    self.global_("collections", "OrderedDict")
    self.raw(b")R")

  def getvalue(self) -> bytes:
    """The pickle, terminated by STOP."""
    return b"".join(self.parts + [b"."])


def _contiguous_strides(shape) -> Tuple[int, ...]:
  """torch's contiguous strides, in elements (a size-0 dimension counts as 1)."""
  strides, step = [], 1
  for n in reversed(shape):
    strides.append(step)
    step *= max(int(n), 1)
  return tuple(reversed(strides))


def _tensor_record(w: _Protocol2Writer, arr: np.ndarray, storage_class: str, key: str) -> None:
  """``_rebuild_tensor_v2(BINPERSID(('storage', torch.<T>Storage, key, 'cpu', numel)), 0, size, stride, False,
  OrderedDict())``."""
  w.global_("torch._utils", "_rebuild_tensor_v2")
  w.raw(b"((")
  w.string("storage")
  w.global_("torch", storage_class)
  w.string(key)
  w.string("cpu")
  w.integer(arr.size)
  w.raw(b"tQ")
  w.integer(0)
  w.int_tuple(arr.shape)
  w.int_tuple(_contiguous_strides(arr.shape))
  w.raw(b"\x89")
  w.empty_ordered_dict()
  w.raw(b"tR")


def _data_pkl(arrays: "collections.OrderedDict[str, np.ndarray]") -> Tuple[bytes, list]:
  """The ``data.pkl`` bytes and the storage list ``[(key, array)]`` in first-use order."""
  w = _Protocol2Writer()
  w.empty_ordered_dict()
  storages = []
  if arrays:
    w.raw(b"(")
    for name, arr in arrays.items():
      storage_class = _TORCH_STORAGES.get(_dtype_name(arr))
      if storage_class is None:
        raise TypeError(f"tensor {name!r}: dtype {arr.dtype} has no torch storage type")
      key = str(len(storages))
      storages.append((key, arr))
      w.string(name)
      _tensor_record(w, arr, storage_class, key)
    w.raw(b"u")
  return w.getvalue(), storages


def _archive_name(path: PathLike) -> str:
  """torch's archive folder name: the file name up to its first dot, restricted to safe characters."""
  base = os.path.basename(os.fspath(path)).split(".")[0]
  base = re.sub(r"[^A-Za-z0-9_-]", "_", base)
  return base or "archive"


def _write_aligned(zf: zipfile.ZipFile, name: str, data) -> None:
  """Adds an uncompressed member whose data starts at a multiple of 64 bytes (padding in an 'FB' extra field)."""
  info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
  info.compress_type = zipfile.ZIP_STORED
  info.external_attr = 0o644 << 16
  nbytes = len(data)
  zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT
  header_offset = zf.fp.tell()
  unpadded = header_offset + 30 + len(name.encode("ascii")) + (20 if zip64 else 0)
  pad = -(unpadded + 4) % _ALIGNMENT
  info.extra = struct.pack("<HH", 0x4246, pad) + b"Z" * pad
  info.file_size = nbytes
  with zf.open(info, "w", force_zip64=zip64) as out:
    out.write(data)
  start = info.header_offset + 30 + len(name.encode("ascii")) + len(info.extra) + (20 if zip64 else 0)
  if start % _ALIGNMENT:
    raise AssertionError(f"zip member {name} is not {_ALIGNMENT}-byte aligned")


def save_torch_zip(state_dict: Mapping[str, object], path: PathLike) -> None:
  """Writes ``state_dict`` (name -> array) like ``torch.save(state_dict, path)`` does, without torch, atomically.

  Each tensor gets its own storage. ``torch.load(path, weights_only=True)`` returns an ``OrderedDict`` of tensors
  with the same names, dtypes, shapes and bytes.
  """
  arrays = collections.OrderedDict((str(k), _little_endian(v, str(k))) for k, v in state_dict.items())
  pkl, storages = _data_pkl(arrays)
  prefix = _archive_name(path)

  def write(f):
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
      _write_aligned(zf, f"{prefix}/data.pkl", pkl)
      _write_aligned(zf, f"{prefix}/.format_version", b"1")
      _write_aligned(zf, f"{prefix}/.storage_alignment", str(_ALIGNMENT).encode("ascii"))
      _write_aligned(zf, f"{prefix}/byteorder", b"little")
      for key, arr in storages:
        _write_aligned(zf, f"{prefix}/data/{key}", _byte_view(arr))
      _write_aligned(zf, f"{prefix}/version", b"3\n")

  _atomic_write(path, write)
