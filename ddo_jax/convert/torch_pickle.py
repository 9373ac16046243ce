"""Torch-free, code-execution-free reading of PyTorch checkpoints (numpy only).

Three container families are read here without importing torch and without running any code from the file:

* EDM / EDM2 network pickles written with ``torch_utils.persistence`` (ARCHITECTURES.md §6.1). A plain ``pickle.load``
  would ``exec`` the module source embedded in the file. Here each persistent object becomes an inert
  :class:`PersistentRecord` holding ``class_name``, ``module_src`` (text only, never executed), ``version`` and
  ``state`` (the module ``__dict__``).
* ``torch.save`` files: the zip layout (torch >= 1.6) and the legacy non-zip layout (magic number, protocol 1001, sys
  info, object pickle, storage keys, raw storages), see ARCHITECTURES.md §6.2.
* ``.safetensors`` files (delegated to :mod:`ddo_jax.convert.torch_write`).

Every pickle goes through :class:`RestrictedUnpickler`, whose ``find_class`` knows a fixed allowlist of globals. Each
allowed global maps to a local, inert replacement (a numpy rebuild, a record, a stub). Any other global raises
:class:`ForbiddenGlobalError` before anything is called.
"""
import _compat_pickle
import collections
import functools
import hashlib
import io
import os
import pickle
import re
import struct
import zipfile
from typing import Any, Dict, Iterator, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = [
    "CheckpointFormatError",
    "EasyDict",
    "ForbiddenGlobalError",
    "PersistentRecord",
    "RestrictedUnpickler",
    "TorchModuleStub",
    "class_name",
    "init_args",
    "init_kwargs",
    "iter_records",
    "load_persistence_pickle",
    "load_torch_state_dict",
    "module_sources",
    "module_state_dict",
    "restricted_loads",
]

LEGACY_MAGIC_NUMBER = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL_VERSION = 1001
_LEGACY_PREFIX = b"\x80\x02\x8a\x0a" + LEGACY_MAGIC_NUMBER.to_bytes(10, "little")
_ZIP_MAGIC = b"PK\x03\x04"

PathLike = Union[str, "os.PathLike[str]"]


# ---------------------------------------------------------------------------------------------------------------------
# Errors.


class ForbiddenGlobalError(pickle.UnpicklingError):
  """A pickle names a global that is not on the allowlist; the file is refused, nothing was called."""

  def __init__(self, module: str, name: str, source: str = "<pickle>", hint: str = "", written_as: str = ""):
    self.global_name = f"{module}.{name}"
    self.source = source
    spelled = f" (spelled '{written_as}' in the file)" if written_as and written_as != self.global_name else ""
    msg = (f"{source}: refused: the pickle references the global '{self.global_name}'{spelled}, which is not on the "
           f"allowlist of inert torch/numpy types; loading this file would run code (the global could be called "
           f"while unpickling), so it was not loaded and nothing was executed.")
    if hint:
      msg += " " + hint
    super().__init__(msg)


class CheckpointFormatError(ValueError):
  """A checkpoint file is truncated, corrupt, or not in the expected layout; the message names the file."""


# ---------------------------------------------------------------------------------------------------------------------
# Inert replacement objects.


class _FrozenClass(type):
  """Metaclass that forbids setting class attributes, so a crafted BUILD cannot patch our classes."""

  def __setattr__(cls, key, value):
    raise AttributeError(f"class {cls.__name__} is read-only")

  def __delattr__(cls, key):
    raise AttributeError(f"class {cls.__name__} is read-only")


class _Inert(metaclass=_FrozenClass):
  """Base for local objects created while unpickling; BUILD on them is refused unless a subclass allows it."""

  def __setstate__(self, state):
    raise pickle.UnpicklingError(f"BUILD is not allowed on {type(self).__name__}")


class PersistentRecord(_Inert):
  """Inert stand-in for a ``torch_utils.persistence`` object; ``module_src`` is kept as text and never executed.

  Attributes:
    class_name: name of the class in the defining module (e.g. ``'EDMPrecond'``).
    module_src: full source text of the defining module, as stored in the file.
    version: persistence format version (6 for EDM/EDM2).
    type: the meta ``type`` field (``'class'``).
    state: the object's ``__dict__`` (for an ``nn.Module``: ``_parameters``, ``_buffers``, ``_modules``, ...).
  """

  _FIELDS = ("class_name", "module_src", "version", "type", "state")

  def __init__(self, class_name, module_src, version, type_, state):
    self.class_name = class_name
    self.module_src = module_src
    self.version = version
    self.type = type_
    self.state = state

  def __getitem__(self, key):
    if key not in self._FIELDS:
      raise KeyError(key)
    return getattr(self, key)

  def keys(self):
    """The record fields, so ``dict(record)`` works."""
    return list(self._FIELDS)

  def __repr__(self):
    return f"PersistentRecord(class_name={self.class_name!r}, version={self.version!r})"


class TorchModuleStub(_Inert):
  """Inert stand-in for a stock ``torch.nn`` module (e.g. ``ModuleDict``); BUILD stores the ``__dict__``."""

  torch_class = "torch.nn.Module"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    obj = object.__new__(cls)
    obj.state = {}
    return obj

  def __init__(self, *args, **kwargs):
    del args, kwargs

  def __setstate__(self, state):
    if not isinstance(state, dict):
      raise pickle.UnpicklingError(f"unexpected state of type {type(state).__name__} for {self.torch_class}")
    self.state = state

  @property
  def class_name(self) -> str:
    """Short class name, e.g. ``'ModuleDict'``."""
    return self.torch_class.rsplit(".", 1)[-1]

  def __repr__(self):
    return f"TorchModuleStub({self.torch_class})"


class EasyDict(dict, metaclass=_FrozenClass):
  """Local replacement for ``dnnlib.util.EasyDict``: a dict with attribute access."""

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None

  def __setstate__(self, state):
    if state:
      if not isinstance(state, dict):
        raise pickle.UnpicklingError("unexpected EasyDict state")
      self.update(state)


class _StorageType(_Inert):
  """A ``torch.<T>Storage`` class reference: the numpy dtype of its elements."""

  def __init__(self, name: str, dtype: str, bfloat16: bool = False):
    self.name = name
    self.dtype = np.dtype(dtype)
    self.bfloat16 = bfloat16


class _LazyStorage(_Inert):
  """A storage of a legacy file whose bytes follow the object pickle; filled in after the keys are read."""

  def __init__(self, key, storage_type: _StorageType, numel: int, base=None, offset: int = 0):
    self.key = key
    self.storage_type = storage_type
    self.numel = numel
    self.base = base
    self.offset = offset
    self.array = None

  def resolve(self) -> np.ndarray:
    """The filled 1-D numpy array of this storage (a slice of its base for old view storages)."""
    if self.base is not None:
      base = self.base.resolve()
      if self.offset + self.numel > base.size:
        raise pickle.UnpicklingError(f"storage view {self.key!r} exceeds its base storage")
      return base[self.offset:self.offset + self.numel]
    if self.array is None:
      raise pickle.UnpicklingError(f"storage {self.key!r} has no data in the file")
    return self.array


class _LazyTensor(_Inert):
  """A tensor over a not-yet-filled legacy storage; materialized when the load finishes."""

  def __init__(self, storage: _LazyStorage, offset, size, stride):
    self.storage = storage
    self.args = (offset, size, stride)

  def resolve(self) -> np.ndarray:
    """The tensor copied out of its (now filled) storage."""
    return _tensor_from_storage(self.storage.resolve(), *self.args)


class _DtypeProxy(_Inert):
  """Inert result of ``numpy.dtype(spec, align, copy)``; BUILD records the byte order only."""

  def __init__(self, spec, align=False, copy=False):
    del align, copy
    if not isinstance(spec, str):
      raise pickle.UnpicklingError(f"numpy.dtype spec must be a string, got {type(spec).__name__}")
    self.dtype = _check_dtype(np.dtype(spec))

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) < 2:
      raise pickle.UnpicklingError("unexpected numpy.dtype state")
    endian = state[1]
    if len(state) >= 5 and (state[3] is not None or state[4] is not None):
      raise pickle.UnpicklingError("structured numpy dtypes are not supported")
    if endian in ("<", ">"):
      self.dtype = self.dtype.newbyteorder(endian)
    elif endian not in ("|", "="):
      raise pickle.UnpicklingError(f"unexpected numpy byte order {endian!r}")


class _ArrayProxy(_Inert):
  """Inert result of ``numpy.core.multiarray._reconstruct``; BUILD rebuilds the array with ``np.frombuffer``."""

  def __init__(self):
    self.array = None

  def __setstate__(self, state):
    if not isinstance(state, tuple) or len(state) not in (4, 5):
      raise pickle.UnpicklingError("unexpected numpy.ndarray state")
    _, shape, dtype, fortran, raw = state if len(state) == 5 else (1,) + state
    self.array = _array_from_bytes(raw, _as_dtype(dtype), shape, "F" if fortran else "C")


# ---------------------------------------------------------------------------------------------------------------------
# Allowed globals: the replacement functions.


def _check_dtype(dtype: np.dtype) -> np.dtype:
  """Rejects dtypes that could hold python objects."""
  if dtype.hasobject or dtype.kind in "OV":
    raise pickle.UnpicklingError(f"numpy dtype {dtype} is not allowed (object or structured)")
  return dtype


def _as_dtype(obj) -> np.dtype:
  """The checked numpy dtype behind a dtype proxy (or a dtype)."""
  if isinstance(obj, _DtypeProxy):
    return obj.dtype
  if isinstance(obj, np.dtype):
    return _check_dtype(obj)
  raise pickle.UnpicklingError(f"expected a numpy dtype, got {type(obj).__name__}")


def _check_shape(shape) -> Tuple[int, ...]:
  """A shape or stride as a tuple of non-negative ints."""
  if not isinstance(shape, (tuple, list)) or not all(isinstance(s, int) and s >= 0 for s in shape):
    raise pickle.UnpicklingError(f"invalid shape {shape!r}")
  return tuple(shape)


def _array_from_bytes(raw, dtype: np.dtype, shape, order: str = "C") -> np.ndarray:
  """``np.frombuffer`` with a size check, reshaped, copied and converted to native byte order."""
  if not isinstance(raw, (bytes, bytearray)):
    raise pickle.UnpicklingError(f"array data must be bytes, got {type(raw).__name__}")
  shape = _check_shape(shape)
  count = int(np.prod(shape, dtype=np.int64))
  if len(raw) != count * dtype.itemsize:
    raise pickle.UnpicklingError(f"array data has {len(raw)} bytes, expected {count * dtype.itemsize}")
  arr = np.frombuffer(raw, dtype=dtype, count=count).reshape(shape, order=order)
  return arr.astype(dtype.newbyteorder("="), copy=True)


def _np_scalar(dtype, data):
  """``numpy.core.multiarray.scalar(dtype, bytes)`` rebuilt with ``np.frombuffer``."""
  arr = _array_from_bytes(data, _as_dtype(dtype), ())
  return arr[()]


class _NdarrayName(_Inert):
  """What the global ``numpy.ndarray`` resolves to: a marker for ``_reconstruct``, not callable."""


_NDARRAY = _NdarrayName()


def _np_reconstruct(subtype, shape, typecode):
  """``numpy.core.multiarray._reconstruct(ndarray, ...)``: an empty proxy that the following BUILD fills."""
  del shape, typecode
  if subtype is not _NDARRAY:
    raise pickle.UnpicklingError("only numpy.ndarray can be reconstructed")
  return _ArrayProxy()


def _np_frombuffer(buf, dtype, shape, order):
  """``numpy.core.numeric._frombuffer`` (protocol-5 numpy pickles)."""
  return _array_from_bytes(bytes(buf) if isinstance(buf, memoryview) else buf, _as_dtype(dtype), shape, order)


def _reconstruct_persistent_obj(meta):
  """``torch_utils.persistence._reconstruct_persistent_obj``: returns a record, never executes ``module_src``."""
  if not isinstance(meta, dict):
    raise pickle.UnpicklingError("persistence meta must be a dict")
  if meta.get("type") != "class":
    raise pickle.UnpicklingError(f"unsupported persistent object type {meta.get('type')!r}")
  name, src = meta.get("class_name"), meta.get("module_src")
  if not isinstance(name, str) or not isinstance(src, str):
    raise pickle.UnpicklingError("persistence meta lacks class_name/module_src strings")
  return PersistentRecord(name, src, meta.get("version"), meta.get("type"), meta.get("state"))


def _tensor_from_storage(storage: np.ndarray, offset, size, stride) -> np.ndarray:
  """Copies a strided view out of a 1-D storage after checking that it stays inside the storage."""
  size, stride = _check_shape(size), _check_shape(stride)
  if not isinstance(offset, int) or offset < 0 or len(size) != len(stride):
    raise pickle.UnpicklingError(f"invalid tensor geometry offset={offset!r} size={size!r} stride={stride!r}")
  numel = int(np.prod(size, dtype=np.int64))
  if numel == 0:
    return np.zeros(size, dtype=storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise pickle.UnpicklingError(f"tensor of size {size} reaches element {last} of a storage of {storage.size}")
  contiguous = tuple(int(np.prod(size[i + 1:], dtype=np.int64)) for i in range(len(size)))
  if all(s == c or n == 1 for n, s, c in zip(size, stride, contiguous)):
    return storage[offset:offset + numel].reshape(size).copy()
  view = np.lib.stride_tricks.as_strided(storage[offset:], size, tuple(s * storage.itemsize for s in stride),
                                         writeable=False)
  return np.array(view, copy=True)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
  """``torch._utils._rebuild_tensor_v2`` (and v1) as a numpy copy; lazy over legacy storages."""
  del requires_grad, backward_hooks, metadata
  if isinstance(storage, _LazyStorage):
    return _LazyTensor(storage, storage_offset, size, stride)
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise pickle.UnpicklingError(f"tensor storage must be a storage, got {type(storage).__name__}")
  return _tensor_from_storage(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, state=None):
  """``torch._utils._rebuild_parameter[_with_state]``: the parameter is its data."""
  del requires_grad, backward_hooks, state
  return data


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
  """``_codecs.encode(str, 'latin1')``: how protocol-2 pickles spell ``bytes``."""
  if not isinstance(obj, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
    raise pickle.UnpicklingError("only _codecs.encode(str, 'latin1') is allowed")
  return obj.encode("latin1")


def _builtin_bytes(*args):
  """``builtins.bytes`` restricted to ``bytes()`` and ``bytes(str, encoding)``."""
  if not args:
    return b""
  if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
    return args[0].encode("latin1")
  raise pickle.UnpicklingError("only bytes() and bytes(str, 'latin1') are allowed")


def _load_from_bytes(blob, source: str = "<pickle>"):
  """``torch.storage._load_from_bytes``: parse a legacy ``torch.save`` of one storage with a storage-only unpickler."""
  if not isinstance(blob, (bytes, bytearray)):
    raise pickle.UnpicklingError("_load_from_bytes expects bytes")
  return _read_legacy(io.BytesIO(blob), source=f"{source} (inside a storage blob)", storages_only=True)


# Storage class names -> (numpy dtype, is_bfloat16).
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "BFloat16Storage": "<u2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
    "ComplexFloatStorage": "<c8",
    "ComplexDoubleStorage": "<c16",
}

_NUMPY_MULTIARRAY = {
    "scalar": _np_scalar,
    "_reconstruct": _np_reconstruct,
}

_FUNCTIONS = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_from_bytes,
    ("_codecs", "encode"): _codecs_encode,
    ("builtins", "bytes"): _builtin_bytes,
    ("numpy", "dtype"): _DtypeProxy,
    ("numpy.core.numeric", "_frombuffer"): _np_frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _np_frombuffer,
}
for _mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
  for _name, _fn in _NUMPY_MULTIARRAY.items():
    _FUNCTIONS[(_mod, _name)] = _fn

# Immutable classes returned as themselves (builtin types cannot be patched).
_CLASSES = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "ndarray"): _NDARRAY,
    ("dnnlib.util", "EasyDict"): EasyDict,
    ("dnnlib", "EasyDict"): EasyDict,
}

_TORCH_NN_MODULE = re.compile(r"^torch\.nn\.modules\.[A-Za-z_][A-Za-z0-9_]*$")
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_STUB_CLASSES: Dict[str, type] = {}


def _py3_name(module: str, name: str) -> Tuple[str, str]:
  """Python 2 spellings in protocol < 3 pickles (``__builtin__.set``, ``commands.check_output``) as python 3 names."""
  if (module, name) in _compat_pickle.NAME_MAPPING:
    return _compat_pickle.NAME_MAPPING[(module, name)]
  return _compat_pickle.IMPORT_MAPPING.get(module, module), name


def _storage_type(module: str, name: str) -> Optional[_StorageType]:
  """A fresh ``_StorageType`` for ``torch[.cuda].<T>Storage``, or None if not a storage name."""
  if module in ("torch", "torch.cuda") and name in _STORAGE_DTYPES:
    return _StorageType(name, _STORAGE_DTYPES[name], bfloat16=(name == "BFloat16Storage"))
  return None


def _module_stub_class(module: str, name: str) -> type:
  """The (cached, read-only) stub class standing in for ``torch.nn.modules.<sub>.<name>``."""
  qualified = f"{module}.{name}"
  if qualified not in _STUB_CLASSES:
    _STUB_CLASSES[qualified] = _FrozenClass(name, (TorchModuleStub,), {"torch_class": qualified})
  return _STUB_CLASSES[qualified]


# ---------------------------------------------------------------------------------------------------------------------
# The unpickler.


class RestrictedUnpickler(pickle.Unpickler):
  """``pickle.Unpickler`` whose ``find_class`` returns inert replacements for an allowlist and refuses the rest.

  Args:
    file: binary file object to read from.
    source: name used in error messages (usually the path).
    storages_only: allow only ``torch.<T>Storage`` globals (used inside storage blobs).
    persistent_load: callable for BINPERSID ids (torch files); without it persistent ids are an error.
    hint: extra sentence appended to ``ForbiddenGlobalError`` messages.
  """

  def __init__(self, file, source: str = "<pickle>", storages_only: bool = False, persistent_load=None,
               hint: str = ""):
    super().__init__(file)
    self._source = source
    self._storages_only = storages_only
    self._persistent_load_fn = persistent_load
    self._hint = hint

  def find_class(self, module: str, name: str):
    """The inert replacement of an allowlisted global; anything else raises ``ForbiddenGlobalError``."""
    written_as = f"{module}.{name}"
    module, name = _py3_name(module, name)
    storage = _storage_type(module, name)
    if storage is not None:
      return storage
    if not self._storages_only:
      if (module, name) in _FUNCTIONS:
        # A fresh partial per lookup: a crafted BUILD can only ever touch this throwaway object.
        fn = _FUNCTIONS[(module, name)]
        if fn is _load_from_bytes:
          return functools.partial(fn, source=self._source)
        return functools.partial(fn)
      if (module, name) in _CLASSES:
        return _CLASSES[(module, name)]
      if _TORCH_NN_MODULE.match(module) and _IDENTIFIER.match(name):
        return _module_stub_class(module, name)
    raise ForbiddenGlobalError(module, name, self._source, self._hint, written_as)

  def persistent_load(self, pid):
    """Delegates storage ids to the container reader; a plain pickle has none."""
    if self._persistent_load_fn is None:
      raise pickle.UnpicklingError(f"{self._source}: unexpected persistent id {pid!r} in a plain pickle")
    return self._persistent_load_fn(pid)


def _parse_storage_pid(pid, source: str):
  """Splits a torch storage persistent id into (storage_type, key, numel, view_metadata)."""
  if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
    kind = pid[0] if isinstance(pid, tuple) and pid else type(pid).__name__
    raise pickle.UnpicklingError(f"{source}: unsupported persistent id of kind {kind!r} (only storages are read)")
  storage_type, key, _, numel = pid[1:5]
  if not isinstance(storage_type, _StorageType):
    raise pickle.UnpicklingError(f"{source}: persistent id names {storage_type!r}, not a torch storage type")
  if not isinstance(numel, int) or numel < 0:
    raise pickle.UnpicklingError(f"{source}: invalid storage size {numel!r}")
  view = pid[5] if len(pid) > 5 else None
  return storage_type, str(key), numel, view


def _widen(raw: np.ndarray, storage_type: _StorageType) -> np.ndarray:
  """Native-endian copy of a storage; BFloat16 (read as uint16) is widened exactly to float32."""
  if storage_type.bfloat16:
    return (raw.astype(np.uint32) << 16).view(np.float32)
  return raw.astype(raw.dtype.newbyteorder("="), copy=True)


# ---------------------------------------------------------------------------------------------------------------------
# Finishing a load: replace proxies by arrays.


def _finalize(obj, memo: Optional[dict] = None):
  """Replaces array/dtype proxies and lazy tensors by numpy objects, in place for dicts, lists and records."""
  memo = {} if memo is None else memo
  if id(obj) in memo:
    return memo[id(obj)]
  if isinstance(obj, _ArrayProxy):
    if obj.array is None:
      raise pickle.UnpicklingError("numpy array was reconstructed without data")
    result = obj.array
  elif isinstance(obj, (_LazyTensor, _LazyStorage)):
    result = obj.resolve()
  elif isinstance(obj, _DtypeProxy):
    result = obj.dtype
  elif isinstance(obj, dict):
    memo[id(obj)] = obj
    for k in list(obj.keys()):
      obj[k] = _finalize(obj[k], memo)
    return obj
  elif isinstance(obj, list):
    memo[id(obj)] = obj
    obj[:] = [_finalize(v, memo) for v in obj]
    return obj
  elif isinstance(obj, (PersistentRecord, TorchModuleStub)):
    memo[id(obj)] = obj
    obj.state = _finalize(obj.state, memo)
    return obj
  elif isinstance(obj, tuple):
    result = tuple(_finalize(v, memo) for v in obj)
  elif isinstance(obj, (set, frozenset)):
    result = type(obj)(_finalize(v, memo) for v in obj)
  else:
    result = obj
  memo[id(obj)] = result
  return result


def restricted_loads(data: bytes, source: str = "<bytes>"):
  """Unpickles ``data`` with the allowlist (no persistent ids) and returns the finalized object."""
  return _finalize(RestrictedUnpickler(io.BytesIO(data), source=source).load())


# ---------------------------------------------------------------------------------------------------------------------
# Legacy (non-zip) torch.save layout.


def _read_legacy(f, source: str, storages_only: bool = False, hint: str = ""):
  """Reads a legacy ``torch.save`` stream: magic, protocol, sys_info, object, keys, then each storage's bytes."""

  def small_pickle():
    return RestrictedUnpickler(f, source=source, storages_only=True).load()

  magic = small_pickle()
  if magic != LEGACY_MAGIC_NUMBER:
    raise pickle.UnpicklingError(f"{source}: not a legacy torch.save stream (bad magic number)")
  protocol = small_pickle()
  if protocol != LEGACY_PROTOCOL_VERSION:
    raise pickle.UnpicklingError(f"{source}: unsupported legacy protocol version {protocol!r}")
  sys_info = small_pickle()
  little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
  storages: Dict[str, _LazyStorage] = {}

  def persistent_load(pid):
    storage_type, key, numel, view = _parse_storage_pid(pid, source)
    if key not in storages:
      storages[key] = _LazyStorage(key, storage_type, numel)
    if view is None:
      return storages[key]
    view_key, offset, view_size = view
    view_key = str(view_key)
    if view_key not in storages:
      storages[view_key] = _LazyStorage(view_key, storage_type, view_size, base=storages[key], offset=offset)
    return storages[view_key]

  obj = RestrictedUnpickler(f, source=source, storages_only=storages_only, persistent_load=persistent_load,
                            hint=hint).load()
  keys = small_pickle()
  if not isinstance(keys, list):
    raise pickle.UnpicklingError(f"{source}: storage key list is missing")
  for key in keys:
    _read_legacy_storage(f, storages, str(key), little, source)
  return _finalize(obj)


def _read_legacy_storage(f, storages: Dict[str, "_LazyStorage"], key: str, little: bool, source: str):
  """Reads one ``int64 count + raw bytes`` record into ``storages[key]``."""
  if key not in storages or storages[key].base is not None:
    raise pickle.UnpicklingError(f"{source}: storage key {key!r} is not referenced by the object pickle")
  storage = storages[key]
  header = f.read(8)
  if len(header) != 8:
    raise EOFError(f"{source}: truncated: the size of storage {key!r} is missing")
  count = struct.unpack("<q" if little else ">q", header)[0]
  if count != storage.numel:
    raise pickle.UnpicklingError(f"{source}: storage {key!r} holds {count} elements, the pickle says {storage.numel}")
  dtype = storage.storage_type.dtype.newbyteorder("<" if little else ">")
  nbytes = count * dtype.itemsize
  raw = f.read(nbytes)
  if len(raw) != nbytes:
    raise EOFError(f"{source}: truncated: storage {key!r} needs {nbytes} bytes, only {len(raw)} are left")
  storage.array = _widen(np.frombuffer(raw, dtype=dtype), storage.storage_type)


# ---------------------------------------------------------------------------------------------------------------------
# Zip torch.save layout.


def _zip_archive_prefix(zf: zipfile.ZipFile, source: str) -> str:
  """The ``<archive>`` folder that holds ``data.pkl``."""
  prefixes = [n[:-len("/data.pkl")] for n in zf.namelist() if re.fullmatch(r"[^/]+/data\.pkl", n)]
  if len(prefixes) != 1:
    raise CheckpointFormatError(f"{source}: zip file is not a torch.save archive "
                                f"(expected exactly one '<archive>/data.pkl', found {len(prefixes)})")
  return prefixes[0]


def _read_torch_zip(path: str, hint: str = ""):
  """Reads a zip-layout ``torch.save`` file; storages come from ``<archive>/data/<key>``."""
  with zipfile.ZipFile(path) as zf:
    prefix = _zip_archive_prefix(zf, path)
    names = set(zf.namelist())
    byteorder = "little"
    if f"{prefix}/byteorder" in names:
      byteorder = zf.read(f"{prefix}/byteorder").decode("ascii", "replace").strip()
    if byteorder not in ("little", "big"):
      raise CheckpointFormatError(f"{path}: unknown byteorder record {byteorder!r}")
    cache: Dict[str, np.ndarray] = {}

    def persistent_load(pid):
      storage_type, key, numel, _ = _parse_storage_pid(pid, path)
      if key not in cache:
        member = f"{prefix}/data/{key}"
        if member not in names:
          raise CheckpointFormatError(f"{path}: storage record '{member}' is missing")
        raw = zf.read(member)
        dtype = storage_type.dtype.newbyteorder("<" if byteorder == "little" else ">")
        if len(raw) != numel * dtype.itemsize:
          raise CheckpointFormatError(f"{path}: storage record '{member}' has {len(raw)} bytes, "
                                      f"expected {numel} x {dtype.itemsize}")
        cache[key] = _widen(np.frombuffer(raw, dtype=dtype), storage_type)
      return cache[key]

    with zf.open(f"{prefix}/data.pkl") as f:
      obj = RestrictedUnpickler(io.BytesIO(f.read()), source=path, persistent_load=persistent_load,
                                hint=hint).load()
  return _finalize(obj)


# ---------------------------------------------------------------------------------------------------------------------
# Public API.

_CORRUPT_ERRORS = (EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, TypeError, KeyError,
                   IndexError, AttributeError, struct.error, OverflowError, UnicodeDecodeError, RecursionError)


def _wrap_errors(path: str, what: str, fn, *args, **kwargs):
  """Runs ``fn``; corrupt-input exceptions become ``CheckpointFormatError`` naming ``path``."""
  try:
    return fn(*args, **kwargs)
  except (ForbiddenGlobalError, CheckpointFormatError):
    raise
  except _CORRUPT_ERRORS as e:
    raise CheckpointFormatError(f"{path}: cannot read this {what}; the file is truncated or corrupt "
                                f"({type(e).__name__}: {e})") from e


def _read_head(path: str, n: int = 64) -> bytes:
  """The first ``n`` bytes of ``path``; an empty file is an error."""
  with open(path, "rb") as f:
    head = f.read(n)
  if not head:
    raise CheckpointFormatError(f"{path}: the file is empty")
  return head


def load_persistence_pickle(path: PathLike) -> dict:
  """Reads an EDM/EDM2 network pickle; persistent objects come back as :class:`PersistentRecord`.

  Returns:
    The top-level mapping (``dict`` or :class:`EasyDict`) with keys such as ``ema``, ``encoder``, ``loss_fn``,
    ``augment_pipe``, ``dataset_kwargs``. Tensors are numpy arrays; nothing from the file is executed.
  """
  path = os.fspath(path)
  head = _read_head(path)
  if head.startswith(_ZIP_MAGIC):
    raise CheckpointFormatError(f"{path}: this is a torch.save zip archive, not a network pickle; "
                                f"use load_torch_state_dict")
  if head.startswith(_LEGACY_PREFIX):
    raise CheckpointFormatError(f"{path}: this is a legacy torch.save file, not a network pickle; "
                                f"use load_torch_state_dict")

  def load():
    with open(path, "rb") as f:
      return _finalize(RestrictedUnpickler(f, source=path).load())

  data = _wrap_errors(path, "network pickle", load)
  if not isinstance(data, dict):
    raise CheckpointFormatError(f"{path}: the top level is a {type(data).__name__}, expected a dict with 'ema'")
  return data


def _module_state(module) -> dict:
  """The ``__dict__`` of a module record or stub."""
  if isinstance(module, (PersistentRecord, TorchModuleStub)) and isinstance(module.state, dict):
    return module.state
  raise TypeError(f"expected a module record, got {type(module).__name__}")


def _flatten_module(module, prefix: str, out: "collections.OrderedDict[str, np.ndarray]"):
  """Appends ``_parameters``, persistent ``_buffers``, then each child of ``_modules`` (torch order)."""
  state = _module_state(module)
  for name, value in (state.get("_parameters") or {}).items():
    if value is not None:
      out[prefix + name] = value
  non_persistent = state.get("_non_persistent_buffers_set") or set()
  for name, value in (state.get("_buffers") or {}).items():
    if value is not None and name not in non_persistent:
      out[prefix + name] = value
  for name, child in (state.get("_modules") or {}).items():
    if child is not None:
      _flatten_module(child, prefix + name + ".", out)


def module_state_dict(record) -> "collections.OrderedDict[str, np.ndarray]":
  """The torch ``state_dict()`` of a module record: same keys, same order, numpy arrays."""
  out: "collections.OrderedDict[str, np.ndarray]" = collections.OrderedDict()
  _flatten_module(record, "", out)
  return out


def _to_python(obj):
  """Numpy scalars to python scalars, recursively through lists, tuples and dicts."""
  if isinstance(obj, np.generic):
    return obj.item()
  if isinstance(obj, dict):
    return {k: _to_python(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_python(v) for v in obj)
  return obj


def init_kwargs(record) -> dict:
  """The constructor kwargs (``_init_kwargs``) of a persistent module, numpy scalars as python; ``{}`` if absent."""
  return dict(_to_python(_module_state(record).get("_init_kwargs") or {}))


def init_args(record) -> tuple:
  """The positional constructor args (``_init_args``) of a persistent module; ``()`` if absent."""
  return tuple(_to_python(_module_state(record).get("_init_args") or ()))


def class_name(record) -> str:
  """The class name of a record (e.g. ``'EDMPrecond'``) or of a stock torch module stub (e.g. ``'ModuleDict'``)."""
  if isinstance(record, (PersistentRecord, TorchModuleStub)):
    return record.class_name
  raise TypeError(f"expected a module record, got {type(record).__name__}")


def iter_records(obj) -> Iterator[PersistentRecord]:
  """Every :class:`PersistentRecord` reachable from ``obj`` (depth first, each once)."""
  return _iter_records(obj, set())


def _iter_records(obj, seen: set) -> Iterator[PersistentRecord]:
  """Depth-first walk behind :func:`iter_records`; ``seen`` holds visited object ids."""
  if id(obj) in seen:
    return
  seen.add(id(obj))
  if isinstance(obj, PersistentRecord):
    yield obj
    yield from _iter_records(obj.state, seen)
  elif isinstance(obj, TorchModuleStub):
    yield from _iter_records(obj.state, seen)
  elif isinstance(obj, dict):
    for v in obj.values():
      yield from _iter_records(v, seen)
  elif isinstance(obj, (list, tuple, set, frozenset)):
    for v in obj:
      yield from _iter_records(v, seen)


def module_sources(obj) -> Dict[str, str]:
  """``{class_name: sha256 hex of its embedded module_src}`` for every persistent object under ``obj``.

  A class name seen with two different sources gets a second entry ``'<name>@<sha256[:12]>'``.
  """
  out: Dict[str, str] = {}
  for record in _iter_records(obj, set()):
    digest = hashlib.sha256(record.module_src.encode("utf-8")).hexdigest()
    name = record.class_name
    if out.get(name, digest) != digest:
      name = f"{name}@{digest[:12]}"
    out[name] = digest
  return out


def _is_state_dict(obj) -> bool:
  """True for a mapping whose values are all numpy arrays."""
  return isinstance(obj, Mapping) and all(isinstance(v, np.ndarray) for v in obj.values())


def _state_dict_candidates(obj, path: Tuple[str, ...] = (), depth: int = 3) -> Iterator[Tuple[str, int]]:
  """``('a/b', n_tensors)`` for nested mappings that look like state dicts."""
  if not isinstance(obj, Mapping) or depth < 0:
    return
  if path and obj and _is_state_dict(obj):
    yield "/".join(path), len(obj)
    return
  for k, v in obj.items():
    if isinstance(k, str):
      yield from _state_dict_candidates(v, path + (k,), depth - 1)


def _select(obj, key: Union[str, Sequence[str]], path: str):
  """Follows ``key`` ('a/b' or ['a', 'b']) into nested mappings."""
  parts = key.split("/") if isinstance(key, str) else list(key)
  for i, part in enumerate(parts):
    if not isinstance(obj, Mapping) or part not in obj:
      found = list(obj.keys()) if isinstance(obj, Mapping) else type(obj).__name__
      raise CheckpointFormatError(f"{path}: key {'/'.join(parts[:i + 1])!r} not found; keys at this level: {found}")
    obj = obj[part]
  return obj


def _as_state_dict(obj, path: str, key) -> "collections.OrderedDict[str, np.ndarray]":
  """Checks that ``obj`` (after ``key``) is a flat mapping of arrays; otherwise explains which key to pass."""
  if key is not None:
    obj = _select(obj, key, path)
  if _is_state_dict(obj):
    return collections.OrderedDict((str(k), v) for k, v in obj.items())
  if not isinstance(obj, Mapping):
    raise CheckpointFormatError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  candidates = list(_state_dict_candidates(obj))
  top = list(obj.keys())
  if candidates:
    listing = ", ".join(f"key={c!r} ({n} tensors)" for c, n in candidates)
    raise CheckpointFormatError(f"{path}: this is a nested checkpoint with top-level keys {top}, not a flat state "
                                f"dict; pass one of: {listing} (e.g. a VAR training checkpoint needs "
                                f"key='trainer/var_wo_ddp')")
  bad = [k for k, v in obj.items() if not isinstance(v, np.ndarray)][:8]
  raise CheckpointFormatError(f"{path}: not a state dict: entries {bad} are not tensors (top-level keys {top})")


_PTH_HINT = ("If this is a whole-model torch.save, re-save model.state_dict() instead; a state dict needs no code "
             "to load.")


StateDict = "collections.OrderedDict[str, np.ndarray]"


def load_torch_state_dict(path: PathLike, key: Optional[Union[str, Sequence[str]]] = None) -> StateDict:
  """Reads a ``torch.save`` state dict (zip or legacy layout) or a ``.safetensors`` file, without torch.

  Args:
    path: the checkpoint.
    key: for nested training checkpoints, the sub-dict to return, as ``'trainer/var_wo_ddp'`` or a sequence of keys.

  Returns:
    ``OrderedDict[name, np.ndarray]`` in file order (for safetensors: data-offset order). BFloat16 is widened to
    float32 exactly.
  """
  path = os.fspath(path)
  head = _read_head(path)
  if head.startswith(_ZIP_MAGIC):
    obj = _wrap_errors(path, "torch zip checkpoint", _read_torch_zip, path, hint=_PTH_HINT)
  elif head.startswith(_LEGACY_PREFIX):
    def load():
      with open(path, "rb") as f:
        return _read_legacy(f, source=path, hint=_PTH_HINT)
    obj = _wrap_errors(path, "legacy torch checkpoint", load)
  elif head[:1] == b"\x80":
    raise CheckpointFormatError(f"{path}: a plain pickle, not a torch.save file; for EDM/EDM2 network pickles use "
                                f"load_persistence_pickle")
  elif len(head) >= 9 and head[8:9] == b"{":
    from ddo_jax.convert import torch_write  # pylint: disable=import-outside-toplevel
    obj = torch_write.load_safetensors(path)
  else:
    raise CheckpointFormatError(f"{path}: unrecognized format (not a torch zip, legacy torch.save or safetensors file)")
  return _as_state_dict(obj, path, key)
