"""Sets of uint8 images on disk: reading them in batches (for the Inception) and writing sample folders.

Reading (`open_images`): an `ImageSource(count, batches, description)` whose `batches(batch_size)` yields
uint8 NHWC arrays, from

* a folder of images (PNG, JPEG, ...; recursive, sorted by relative path as EDM's dataset loader; any
  size; grayscale/RGBA become RGB). Images of different sizes come in separate batches;
* an EDM dataset `.zip` of images (same rules);
* an `.npz` (or `.npy`) of uint8 images: `arr_0` NHWC as OpenAI's sample batches, or the member named by
  `key` (default: `arr_0`, else `images`, else `samples`, else the only member); NCHW and single-channel
  arrays are recognised. The member is streamed from the zip, not loaded whole;
* `tfds:cifar10[:split][@data_dir]`: a prepared tfds build (ArrayRecord, no TensorFlow).

Writing (a sample folder in EDM's layout, `OUTDIR/<first seed of its thousand>/<seed>.png`):
`sample_batches` plans the sampler calls for a list of seeds (never more images than asked, rounded up
to a multiple of the device count), `check_settings` records what made the images
(`OUTDIR/sample_settings.json`) and refuses to mix images made with other settings, `png_is_complete`
tells a finished PNG from a truncated one, `write_png` writes one atomically.

A path that does not exist or a file in a format we cannot read raises `ddo_jax.cli.UserError` naming
the flag (`where`), printed by the command line tools as one line.
"""
import collections
import concurrent.futures
import json
import math
import os
import pathlib
import threading
import zipfile
from typing import Callable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from ddo_jax import cli, utils

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
NPZ_IMAGE_KEYS = ("arr_0", "images", "samples")
IMAGES_FIX = "give a folder of images, an EDM dataset .zip, an .npz/.npy of uint8 images, or tfds:cifar10"


# ---------------------------------------------------------------------------------------------
# Reading.


class ImageSource(NamedTuple):
  """A set of images: how many, and a function `batches(batch_size)` yielding uint8 NHWC arrays."""
  count: int
  batches: Callable[[int], Iterator[np.ndarray]]
  description: str


def _as_rgb_uint8(image) -> np.ndarray:
  """PIL image -> uint8 [H, W, 3] (grayscale repeated, alpha dropped)."""
  if image.mode != "RGB":
    image = image.convert("RGB")
  return np.asarray(image, np.uint8)


def _stack_runs(images: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
  """Stacks consecutive images of equal shape (one array per run)."""
  run: List[np.ndarray] = []
  for img in images:
    if run and img.shape != run[0].shape:
      yield np.stack(run)
      run = []
    run.append(img)
  if run:
    yield np.stack(run)


def _decoded_batches(names: Sequence[str], load: Callable[[str], np.ndarray], batch_size: int,
                     num_workers: int, prefetch: int = 2) -> Iterator[np.ndarray]:
  """Decodes `names` in a thread pool, `prefetch` batches ahead, yielding them in order."""
  with concurrent.futures.ThreadPoolExecutor(max(num_workers, 1)) as pool:
    queue = collections.deque()
    for i in range(0, len(names), batch_size):
      queue.append([pool.submit(load, n) for n in names[i:i + batch_size]])
      if len(queue) > prefetch:
        yield from _stack_runs([f.result() for f in queue.popleft()])
    while queue:
      yield from _stack_runs([f.result() for f in queue.popleft()])


def _is_image_name(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def folder_source(path: str, num_workers: int = 8) -> ImageSource:
  """Images under `path` (recursive), sorted by relative path."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  names = []
  for root, _, files in os.walk(path):
    for f in files:
      if _is_image_name(f):
        names.append(os.path.relpath(os.path.join(root, f), path).replace(os.sep, "/"))
  names.sort()

  def load(name):
    with Image.open(os.path.join(path, name)) as img:
      return _as_rgb_uint8(img)

  return ImageSource(len(names), lambda b: _decoded_batches(names, load, b, num_workers),
                     f"folder {path}")


def zip_source(path: str, num_workers: int = 8) -> ImageSource:
  """Images in a zip (EDM's dataset format), sorted by name."""
  import io  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  with zipfile.ZipFile(path) as zf:
    names = sorted(n for n in zf.namelist() if _is_image_name(n))

  def batches(batch_size):
    lock = threading.Lock()
    with zipfile.ZipFile(path) as zf:
      def load(name):
        with lock:
          data = zf.read(name)
        with Image.open(io.BytesIO(data)) as img:
          return _as_rgb_uint8(img)
      yield from _decoded_batches(names, load, batch_size, num_workers)

  return ImageSource(len(names), batches, f"zip {path}")


def _layout(shape, where: str = "--images") -> str:
  """'NHWC', 'NCHW' or 'NHW' of a uint8 image array shape."""
  if len(shape) == 3:
    return "NHW"
  if len(shape) == 4 and shape[-1] in (1, 3):
    return "NHWC"
  if len(shape) == 4 and shape[1] in (1, 3):
    return "NCHW"
  raise cli.UserError(f"cannot read images of shape {tuple(shape)}", where,
                      "expected [N, H, W, 3], [N, 3, H, W], [N, H, W, 1], [N, 1, H, W] or [N, H, W]")


def to_nhwc_rgb(chunk: np.ndarray, layout: str) -> np.ndarray:
  """uint8 images in `layout` -> uint8 [N, H, W, 3]."""
  if chunk.dtype != np.uint8:
    raise ValueError(f"expected uint8 images (EDM: clip(x * 127.5 + 128, 0, 255).astype(uint8)), "
                     f"got {chunk.dtype}")
  if layout == "NHW":
    chunk = chunk[..., None]
  elif layout == "NCHW":
    chunk = np.transpose(chunk, (0, 2, 3, 1))
  if chunk.shape[-1] == 1:
    chunk = np.repeat(chunk, 3, axis=-1)
  return np.ascontiguousarray(chunk)


def _npz_member_header(zf: zipfile.ZipFile, member: str):
  """(shape, dtype, file object positioned at the data) of a `.npy` member."""
  f = zf.open(member)
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  else:
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  if fortran or dtype.hasobject:
    f.close()
    raise ValueError(f"{member}: Fortran-ordered or object arrays are not supported")
  return shape, dtype, f


def pick_npz_key(files: Sequence[str], key: Optional[str] = None) -> str:
  """The member of an npz that holds the images (see the module docstring)."""
  if key is not None:
    if key not in files:
      raise cli.UserError(f"no member {key!r} in the npz", "--images_key", f"use one of {list(files)}")
    return key
  for k in NPZ_IMAGE_KEYS:
    if k in files:
      return k
  if len(files) == 1:
    return files[0]
  raise cli.UserError(f"cannot tell which npz member holds the images among {list(files)}", "--images_key",
                      "name the member with --images_key")


def npz_source(path: str, key: Optional[str] = None, where: str = "--images") -> ImageSource:
  """Streams uint8 images from one member of an `.npz`, without loading it whole."""
  try:
    with zipfile.ZipFile(path) as zf:
      members = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
      key = pick_npz_key(members, key)
      shape, dtype, f = _npz_member_header(zf, key + ".npy")
      f.close()
  except (zipfile.BadZipFile, ValueError) as e:
    raise cli.UserError(f"{path} is not a readable .npz ({e})", where, IMAGES_FIX) from e
  layout = _layout(shape, where)
  if dtype != np.uint8:
    raise cli.UserError(f"{path}[{key}] holds {dtype} values, not uint8 images", where,
                        "store images as uint8 (EDM: clip(x * 127.5 + 128, 0, 255).astype(uint8))")
  row_bytes = int(np.prod(shape[1:])) * dtype.itemsize

  def batches(batch_size):
    with zipfile.ZipFile(path) as zf:
      _, _, f = _npz_member_header(zf, key + ".npy")
      with f:
        for start in range(0, shape[0], batch_size):
          n = min(batch_size, shape[0] - start)
          data = f.read(n * row_bytes)
          if len(data) != n * row_bytes:
            raise ValueError(f"{path}[{key}]: truncated at image {start}")
          chunk = np.frombuffer(data, dtype).reshape((n,) + tuple(shape[1:]))
          yield to_nhwc_rgb(chunk, layout)

  return ImageSource(int(shape[0]), batches, f"npz {path}[{key}] {tuple(shape)}")


def npy_source(path: str, where: str = "--images") -> ImageSource:
  """uint8 images from a `.npy` (memory-mapped)."""
  try:
    arr = np.load(path, mmap_mode="r")
  except ValueError as e:
    raise cli.UserError(f"{path} is not a readable .npy ({e})", where, IMAGES_FIX) from e
  layout = _layout(arr.shape, where)
  if arr.dtype != np.uint8:
    raise cli.UserError(f"{path} holds {arr.dtype} values, not uint8 images", where,
                        "store images as uint8 (EDM: clip(x * 127.5 + 128, 0, 255).astype(uint8))")

  def batches(batch_size):
    for start in range(0, arr.shape[0], batch_size):
      yield to_nhwc_rgb(np.asarray(arr[start:start + batch_size]), layout)

  return ImageSource(int(arr.shape[0]), batches, f"npy {path} {arr.shape}")


def tfds_source(spec: str, where: str = "--images") -> ImageSource:
  """`tfds:cifar10[:split][@data_dir]`: a prepared tfds dataset of this project (ArrayRecord, no TF)."""
  from ddo_jax.data import cifar10  # pylint: disable=import-outside-toplevel
  body, _, data_dir = spec[len("tfds:"):].partition("@")
  name, _, split = body.partition(":")
  if name != "cifar10":
    raise cli.UserError(f"unknown tfds dataset {name!r} in {spec!r}", where,
                        "only tfds:cifar10[:split][@data_dir] is supported")
  try:
    source, n = cifar10.load_tfds(split=split or "train", data_dir=data_dir or None)
  except cifar10.DatasetNotFoundError as e:
    raise cli.UserError(e.what, where, e.fix) from e

  def batches(batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
      x = source(np.arange(start, min(start + batch_size, n)))["x"]
      yield np.rint((x + 1.0) * 127.5).astype(np.uint8)    # exact inverse of uint8 / 127.5 - 1

  return ImageSource(n, batches, f"tfds cifar10 {split or 'train'} ({n} images)")


def open_images(path: str, key: Optional[str] = None, num_workers: int = 8,
                where: str = "--images") -> ImageSource:
  """An `ImageSource` for a folder, `.zip`, `.npz`, `.npy` or `tfds:cifar10[:split][@data_dir]`.

  `where` names the flag the path came from, for the one-line error of a path we cannot read.
  """
  if path.startswith("tfds:"):
    return tfds_source(path, where)
  if not os.path.exists(path):
    raise cli.UserError(f"{path} does not exist", where, IMAGES_FIX)
  if os.path.isdir(path):
    return folder_source(path, num_workers)
  lower = path.lower()
  if lower.endswith(".npz"):
    return npz_source(path, key, where)
  if lower.endswith(".npy"):
    return npy_source(path, where)
  if lower.endswith(".zip"):
    return zip_source(path, num_workers)
  raise cli.UserError(f"{path} is not a folder, .zip, .npz or .npy", where, IMAGES_FIX)


def count_images(source: ImageSource, num: int = 0, where: str = "--num") -> int:
  """How many images of `source` to use: `num` (the first ones), or all of them when `num` is 0."""
  if num and num > source.count:
    raise cli.UserError(f"asked for {num} images, found only {source.count} in {source.description}", where,
                        f"use at most --num {source.count}, or 0 for all")
  n = num or source.count
  if n == 0:
    raise cli.UserError(f"no images in {source.description}", "--images", IMAGES_FIX)
  return n


# ---------------------------------------------------------------------------------------------
# Sampler batches.


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def sample_batches(seeds: Sequence[int], batch_size: int, multiple: int = 1
                   ) -> Iterator[Tuple[List[int], np.ndarray]]:
  """Splits `seeds` into sampler calls: (the seeds of the call, the int32 ids to pass).

  Every call holds `batch_size` seeds except the last, which holds what is left; the ids are the seeds
  padded (with the last seed) only up to a multiple of `multiple` (the device count), so a batch larger
  than the seed count, or the last batch, never makes more images than the devices force.
  `batch_size` must be a positive multiple of `multiple`.
  """
  if batch_size <= 0 or batch_size % multiple:
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of {multiple}")
  seeds = list(seeds)
  for start in range(0, len(seeds), batch_size):
    chunk = seeds[start:start + batch_size]
    size = round_up(len(chunk), multiple)
    yield chunk, np.asarray(chunk + [chunk[-1]] * (size - len(chunk)), np.int32)


def describe_batches(sizes: Sequence[int]) -> str:
  """'3 x 256 + 1 x 80' for sampler call sizes [256, 256, 256, 80]."""
  runs: List[List[int]] = []
  for n in sizes:
    if runs and runs[-1][1] == n:
      runs[-1][0] += 1
    else:
      runs.append([1, n])
  return " + ".join(f"{k} x {n}" for k, n in runs) or "none"


def check_batch_size(batch_size: int, multiple: int, where: str = "--batch_size") -> None:
  """One-line error unless `batch_size` is a positive multiple of the device count `multiple`."""
  if batch_size <= 0:
    raise cli.UserError(f"batch size {batch_size} is not positive", where,
                        f"give a positive multiple of the {multiple} devices, e.g. {max(multiple, 64)}")
  if batch_size % multiple:
    lo, hi = max(batch_size // multiple * multiple, multiple), round_up(batch_size, multiple)
    raise cli.UserError(f"batch size {batch_size} is not a multiple of the {multiple} devices", where,
                        f"use {lo} or {hi}")


# ---------------------------------------------------------------------------------------------
# Sample folders (EDM's layout) and their settings.


SETTINGS_JSON = "sample_settings.json"


def png_path(outdir, seed: int) -> pathlib.Path:
  """OUTDIR/<first seed of its thousand, 6 digits>/<seed, 6 digits>.png (EDM's generate.py layout)."""
  return pathlib.Path(outdir) / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def png_is_complete(path, shape: Optional[Sequence[int]] = None) -> bool:
  """Whether `path` exists and decodes fully (and has `shape` [H, W, C] when given)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as img:
      img.load()
      size, channels = img.size, len(img.getbands())
  except (OSError, SyntaxError, ValueError):
    return False
  if shape is not None and (size != (shape[1], shape[0]) or channels != shape[2]):
    return False
  return True


def write_png(path, image: np.ndarray) -> None:
  """uint8 [H, W, C] (C = 1 or 3) -> PNG at `path`, written to a temporary name and renamed."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(tmp, format="PNG")
  os.replace(tmp, path)


def read_pngs(outdir, seeds: Sequence[int]) -> np.ndarray:
  """uint8 [N, H, W, C] of the PNGs of `seeds`, in order."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  arrays = []
  for s in seeds:
    with Image.open(png_path(outdir, s)) as img:
      arrays.append(np.asarray(img))
  arr = np.stack(arrays)
  return arr[..., None] if arr.ndim == 3 else arr


def pending_seeds(outdir, seeds: Sequence[int], shape: Optional[Sequence[int]] = None) -> List[int]:
  """The seeds (each once, in order) whose PNG is missing or does not decode (a truncated file from a
  killed run), so they are generated again."""
  return [s for s in dict.fromkeys(seeds) if not png_is_complete(png_path(outdir, s), shape)]


def check_settings(outdir, settings: Mapping, seeds_spec: str, ignore: Sequence[str] = ("model",),
                   write: bool = True) -> None:
  """Records `settings` in OUTDIR/sample_settings.json, or refuses a folder made with other settings.

  Every key but those in `ignore` (informational, such as the model's path) must equal the recorded one;
  a difference raises a one-line `UserError` naming each differing key. The seed specs of every run are
  kept in `seeds`. A folder with PNGs but no settings file (written by an older version) is accepted with
  a warning. `write=False` only checks (the processes other than 0 of a multi-process run).
  """
  outdir = pathlib.Path(outdir)
  path = outdir / SETTINGS_JSON
  record = json.loads(json.dumps(dict(settings)))   # tuples -> lists, as read back
  if path.exists():
    try:
      old = json.loads(path.read_text())
    except ValueError as e:
      raise cli.UserError(f"{path} is not valid JSON ({e})", "--outdir",
                          "use another --outdir, or delete the file if the images are yours") from e
    keys = sorted((set(old) | set(record)) - set(ignore) - {"seeds"})
    diff = [f"{k}: {old.get(k)!r} there vs {record.get(k)!r} now" for k in keys if old.get(k) != record.get(k)]
    if diff:
      raise cli.UserError(f"{outdir} holds samples made with other settings ({'; '.join(diff)})", "--outdir",
                          "use another --outdir or delete it")
    runs = list(old.get("seeds", []))
  else:
    if write and any(outdir.glob("*/*.png")):
      utils.log.warning("%s holds PNGs but no %s: they are taken as made with these settings", outdir,
                        SETTINGS_JSON)
    runs = []
  if seeds_spec not in runs:
    runs.append(seeds_spec)
  record["seeds"] = runs
  if write and (not path.exists() or json.loads(path.read_text()) != record):
    utils.atomic_write_json(path, record)


def device_multiple(mesh) -> int:
  """The number every global batch must be a multiple of: the mesh's batch shards and process count."""
  import jax  # pylint: disable=import-outside-toplevel
  return math.lcm(int(mesh.shape["data"]) * int(mesh.shape["fsdp"]), jax.process_count())
