"""ImageNet as VAR trains on it, as a random-access Source for the training loop.

The transform is VAR's training transform (FoundationVision/VAR utils/data.py, used unchanged by DDO):

  1. decode with PIL and convert to RGB (VAR's `pil_loader`);
  2. resize the shorter side to `resize` = round(1.125 * resolution) with PIL's LANCZOS filter (288 for 256,
     72 for 64; Python's round, as upstream), the longer side to int(resize * long / short) (truncated, as
     torchvision's Resize computes it); an image whose shorter side already equals `resize` is not resampled
     (torchvision returns it unchanged);
  3. a random `resolution` x `resolution` crop (torchvision's RandomCrop: top in [0, h - resolution], left in
     [0, w - resolution], uniform); no horizontal flip;
  4. uint8 -> float32 as ToTensor then VAR's normalize_01_into_pm1: x = u / 255; x = x + x; x = x - 1, each
     in float32 (so bit-equal to upstream's tensors, in [-1, 1]).

A batch of B indices gives {'x': float32 [B, resolution, resolution, 3] (NHWC), 'label': int32 [B]}.

Determinism: the crop of example i is drawn from numpy's PCG64 seeded with (seed, i), so `source(indices)`
is a pure function of (seed, indices): batches are reproducible, a resumed run reads exactly what an
uninterrupted one read, and no state needs checkpointing (the data position lives in
`ddo_jax.data.pipeline`, which also gives each process only its rows of the global batch). The price: an
image seen twice in one run gets the same crop both times (upstream redraws it). A DDO run on ImageNet reads
about 100k of the 1.28M images per round, so this is rare.

Two backends, with the same classes and order of labels (the sorted WordNet ids, which is both tfds's
`imagenet2012` label order and torchvision ImageFolder's class index):

* `load_tfds`: `tfds.data_source('imagenet2012')` (ArrayRecord, random access, no TensorFlow needed to read).
  The JPEG bytes are read undecoded and decoded by PIL here, like the folder source. ImageNet cannot be
  downloaded by tfds: the two tars go into tfds's manual_dir first (see `TFDS_PREPARE`).
* `load_folder`: an image-folder tree ROOT/<class_dir>/.../<image> (ImageNet's extracted train/ folder,
  which is VAR's `--data_path`/train), ordered as torchvision's DatasetFolder orders it: class dirs sorted
  by name (the class index is the position), within a class `sorted(os.walk(...))` and sorted file names,
  files with one of torchvision's IMG_EXTENSIONS (case-insensitive).

Decoding and resizing run in a thread pool (`num_workers`; PIL releases the GIL while it decodes and
resamples); the result does not depend on the number of threads. Nothing is cached: a batch of 1024 full
ImageNet JPEGs costs roughly 10 ms per image of one core.

`load(config.data, seed)` picks the backend from `config.data.source` ('tfds' or 'folder'). A dataset that is
not there raises `DatasetNotFoundError` (a `cli.UserError`: one line, exit 2) saying how to prepare it.
"""
import concurrent.futures
import io
import os
from typing import Callable, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ddo_jax import cli, utils

NUM_CLASSES = 1000
TFDS_NAME = "imagenet2012"
RESIZE_RATIO = 1.125     # VAR's mid_reso: the shorter side is resized to round(1.125 * final) before the crop
# torchvision.datasets.folder.IMG_EXTENSIONS, matched case-insensitively like its has_file_allowed_extension.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

PATH_KEY = "config.model.data.path"
DATA_DIR_KEY = "config.model.data.data_dir"
TFDS_PREPARE = ("ImageNet cannot be downloaded by tfds: register at https://image-net.org/download-images, put "
                "ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into tfds's manual_dir {manual_dir}, then "
                "(TensorFlow installed) run `tfds build imagenet2012 --file_format=array_record "
                "--data_dir={data_dir} --manual_dir={manual_dir}` and pass --config.model.data.data_dir={data_dir}; "
                "or train from the extracted train/ folder: --config.model.data.source=folder "
                "--config.model.data.path=<ImageNet>/train")
FOLDER_PREPARE = ("give the extracted ImageNet train folder, laid out ROOT/<class_dir>/<image> with one folder per "
                  "class (e.g. ROOT/n01440764/n01440764_10026.JPEG; VAR's --data_path/train): "
                  "--config.model.data.path=ROOT, or use --config.model.data.source=tfds")


class DatasetNotFoundError(cli.UserError, FileNotFoundError):
  """ImageNet is missing or not in a readable form; the one-line message says how to prepare it."""


# ------------------------------------------------------------------------------------------------
# The transform.


def resize_size(resolution: int, ratio: float = RESIZE_RATIO) -> int:
  """VAR's shorter-side size before the crop: round(ratio * resolution) (288 for 256, 72 for 64)."""
  return int(round(ratio * resolution))


def resized_shape(width: int, height: int, short: int) -> Tuple[int, int]:
  """(width, height) after resizing the shorter side to `short`: torchvision's Resize(int) rule, the longer
  side int(short * long / short_side), truncated."""
  if width <= height:
    return short, int(short * height / width)
  return int(short * width / height), short


def crop_offset(seed: int, index: int, height: int, width: int, size: int) -> Tuple[int, int]:
  """(top, left) of example `index`'s crop, uniform as torchvision's RandomCrop, from PCG64((seed, index))."""
  if height < size or width < size:
    raise ValueError(f"image of {height}x{width} is smaller than the {size}x{size} crop")
  rng = np.random.default_rng([int(seed), int(index)])
  top = int(rng.integers(0, height - size + 1))
  left = int(rng.integers(0, width - size + 1))
  return top, left


def transform_image(image: Image.Image, resize: int, size: int, top_left: Callable[[int, int], Tuple[int, int]]
                    ) -> np.ndarray:
  """PIL image -> uint8 [size, size, 3]: RGB, shorter side to `resize` (LANCZOS), crop at top_left(h, w)."""
  image = image.convert("RGB")
  w, h = image.size
  new_w, new_h = resized_shape(w, h, resize)
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), Image.LANCZOS)
  top, left = top_left(new_h, new_w)
  return np.asarray(image, np.uint8)[top:top + size, left:left + size]


def to_model_inputs(images: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 in [-1, 1], bit-equal to torchvision's ToTensor then VAR's x + x - 1."""
  x = images.astype(np.float32)
  x /= np.float32(255)
  x += x
  x -= np.float32(1)
  return x


def decode(data: bytes) -> Image.Image:
  """Encoded image bytes -> PIL image (VAR's pil_loader reads the file the same way)."""
  image = Image.open(io.BytesIO(data))
  image.load()
  return image


# ------------------------------------------------------------------------------------------------
# The source shared by both backends.


class ImageNetSource:
  """`source(indices)` -> {'x': float32 [B, S, S, 3] in [-1, 1], 'label': int32 [B]}.

  `read(indices)` returns the encoded bytes and the class ids of those examples; everything after that
  (decode, resize, crop, scale) runs here, example by example in a thread pool.
  """

  def __init__(self, read: Callable[[np.ndarray], Tuple[List[bytes], np.ndarray]], num_examples: int, *,
               seed: int, resolution: int = 256, resize: int = 0, num_workers: int = 0):
    if resolution < 1:
      raise cli.ConfigError(f"resolution must be >= 1, got {resolution}", "config.model.data.resolution",
                            "use the model's image size, e.g. 256")
    resize = int(resize) or resize_size(resolution)
    if resize < resolution:
      raise cli.ConfigError(f"resize ({resize}) is smaller than the crop ({resolution})", "config.model.data.resize",
                            f"use 0 (VAR's round(1.125 * resolution) = {resize_size(resolution)}) or a value >= "
                            f"{resolution}")
    self._read, self.num_examples = read, int(num_examples)
    self.seed, self.resolution, self.resize = int(seed), int(resolution), resize
    self.num_workers = int(num_workers) or min(16, os.cpu_count() or 1)
    self._pool = None

  def example(self, index: int, data: bytes) -> np.ndarray:
    """uint8 [S, S, 3] of example `index` from its encoded bytes."""
    s = self.resolution
    return transform_image(decode(data), self.resize, s,
                           lambda h, w: crop_offset(self.seed, index, h, w, s))

  def __call__(self, indices) -> dict:
    images, labels = self.uint8_batch(indices)
    return {"x": to_model_inputs(images), "label": labels}

  def uint8_batch(self, indices) -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 [B, S, S, 3] images after `example`'s transform, int32 [B] class ids) of these examples."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= self.num_examples):
      raise IndexError(f"indices must lie in [0, {self.num_examples}), got [{idx.min()}, {idx.max()}]")
    blobs, labels = self._read(idx)
    s = self.resolution
    images = np.empty((len(idx), s, s, 3), np.uint8)
    if len(idx) > 1 and self.num_workers > 1:
      if self._pool is None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self.num_workers, thread_name_prefix="imagenet")
      for row, image in enumerate(self._pool.map(self.example, idx.tolist(), blobs)):
        images[row] = image
    else:
      for row, (i, data) in enumerate(zip(idx.tolist(), blobs)):
        images[row] = self.example(i, data)
    return images, np.asarray(labels, np.int32)


# ------------------------------------------------------------------------------------------------
# Image folder (torchvision ImageFolder / DatasetFolder order).


def _has_image_extension(name: str) -> bool:
  return name.lower().endswith(IMG_EXTENSIONS)


def folder_index(root: str) -> Tuple[List[str], List[str], np.ndarray]:
  """(class names, file paths, int32 labels) of ROOT/<class>/..., in torchvision DatasetFolder's order."""
  if not root or not os.path.isdir(root):
    raise DatasetNotFoundError(f"no image folder at {root or '<unset>'}", PATH_KEY, FOLDER_PREPARE)
  classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
  if not classes:
    raise DatasetNotFoundError(f"{root} has no class subfolders", PATH_KEY, FOLDER_PREPARE)
  paths, labels = [], []
  for k, name in enumerate(classes):
    for dirpath, _, files in sorted(os.walk(os.path.join(root, name), followlinks=True)):
      for f in sorted(files):
        if _has_image_extension(f):
          paths.append(os.path.join(dirpath, f))
          labels.append(k)
  if not paths:
    raise DatasetNotFoundError(f"{root} has {len(classes)} class folders but no images "
                               f"({'/'.join(IMG_EXTENSIONS)})", PATH_KEY, FOLDER_PREPARE)
  return classes, paths, np.asarray(labels, np.int32)


def read_files(paths: Sequence[str], labels: np.ndarray):
  def read(idx):
    blobs = []
    for i in idx.tolist():
      with open(paths[i], "rb") as f:
        blobs.append(f.read())
    return blobs, labels[idx]
  return read


def _check_classes(num: int, num_classes: int, where: str) -> None:
  if num_classes and num > num_classes:
    raise DatasetNotFoundError(f"{where} has {num} classes, more than the model's {num_classes}", PATH_KEY,
                               "point it at a folder with at most that many class subfolders")


def load_folder(root: str, *, seed: int, resolution: int = 256, resize: int = 0, num_workers: int = 0,
                num_classes: int = 0) -> Tuple[ImageNetSource, int]:
  """ImageNet (or any class-folder tree) from ROOT/<class_dir>/<images>; labels are sorted class indices.

  `num_classes` (0: no check) refuses a tree with more classes than the model has.
  """
  classes, paths, labels = folder_index(root)
  _check_classes(len(classes), num_classes, root)
  utils.log.info("%s: %d images in %d classes (VAR transform: shorter side %d, crop %d)", root, len(paths),
                 len(classes), int(resize) or resize_size(resolution), resolution)
  source = ImageNetSource(read_files(paths, labels), len(paths), seed=seed, resolution=resolution,
                          resize=resize, num_workers=num_workers)
  return source, len(paths)


# ------------------------------------------------------------------------------------------------
# tfds.data_source('imagenet2012').


def _tfds_dirs(data_dir: Optional[str]) -> Tuple[str, str]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shown = data_dir or tfds.core.constants.get_default_data_dir()
  return shown, os.path.join(shown, "downloads", "manual")   # tfds's default manual_dir


def _tfds_error(split: str, data_dir: Optional[str], cause: Exception) -> DatasetNotFoundError:
  """Why `tfds.data_source('imagenet2012')` failed (not prepared, or not ArrayRecord) and how to fix it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shown, manual = _tfds_dirs(data_dir)
  prepare = TFDS_PREPARE.format(data_dir=shown, manual_dir=manual)
  try:
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
    prepared = builder.is_prepared()
    formats = {f.value for f in builder.info.available_file_formats()} if prepared else set()
  except Exception:  # pylint: disable=broad-except
    return DatasetNotFoundError(f"ImageNet could not be opened with tfds in {shown} ({cause!r})", DATA_DIR_KEY,
                                prepare)
  if not prepared:
    return DatasetNotFoundError(f"ImageNet (tfds imagenet2012) is not prepared in {shown} (no {builder.data_dir})",
                                DATA_DIR_KEY, prepare)
  if "array_record" not in formats:
    return DatasetNotFoundError(
        f"ImageNet is prepared in {builder.data_dir} as {sorted(formats)} only, but training reads ArrayRecord "
        "(random access)", DATA_DIR_KEY,
        f"convert it once, with TensorFlow installed: `tfds convert_format --dataset_version_dir={builder.data_dir} "
        "--out_file_format=array_record`")
  return DatasetNotFoundError(f"ImageNet split {split!r} could not be opened from {builder.data_dir} ({cause!r})",
                              DATA_DIR_KEY, prepare)


def open_tfds(split: str = "train", data_dir: Optional[str] = None):
  """`tfds.data_source('imagenet2012')` with undecoded images, without downloading; one-line error if absent."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    ds = tfds.data_source(TFDS_NAME, split=split, data_dir=data_dir, download=False,
                          decoders={"image": tfds.decode.SkipDecoding()})
    len(ds)
  except Exception as e:  # pylint: disable=broad-except
    raise _tfds_error(split, data_dir, e) from e
  return ds


def tfds_reader(data_source) -> Callable[[np.ndarray], Tuple[List[bytes], np.ndarray]]:
  """read(indices) -> (encoded image bytes, class ids) over a data source of {'image': bytes, 'label'} dicts,
  with one batched read (`__getitems__`, parallel ArrayRecord lookups) when the source has a working one."""
  batched = callable(getattr(data_source, "__getitems__", None))

  def read(idx):
    items = None
    if batched and len(idx):
      try:
        items = data_source.__getitems__(idx.tolist())
      except TypeError:
        items = None
    if items is None:
      items = [data_source[i] for i in idx.tolist()]
    blobs = [it["image"] for it in items]
    for b in blobs:
      if not isinstance(b, (bytes, bytearray)):
        raise TypeError(f"expected encoded image bytes from the data source, got {type(b).__name__}")
    return blobs, np.fromiter((int(it["label"]) for it in items), np.int32, count=len(items))

  return read


def load_tfds(split: str = "train", data_dir: Optional[str] = None, *, seed: int, resolution: int = 256,
              resize: int = 0, num_workers: int = 0, data_source=None) -> Tuple[ImageNetSource, int]:
  """ImageNet from tfds's ArrayRecord build of imagenet2012 (labels: tfds's, the sorted WordNet ids).

  `data_source` replaces the tfds one (any sequence of {'image': JPEG bytes, 'label': int}; for tests and
  other random-access stores).
  """
  ds = open_tfds(split, data_dir) if data_source is None else data_source
  n = len(ds)
  if not n:
    raise DatasetNotFoundError(f"ImageNet split {split!r} is empty", "config.model.data.split", "use 'train'")
  utils.log.info("tfds %s[%s]: %d images (VAR transform: shorter side %d, crop %d)", TFDS_NAME, split, n,
                 int(resize) or resize_size(resolution), resolution)
  return ImageNetSource(tfds_reader(ds), n, seed=seed, resolution=resolution, resize=resize,
                        num_workers=num_workers), n


# ------------------------------------------------------------------------------------------------
# Config dispatch.


def _get(config, key: str, default=None):
  if isinstance(config, Mapping) or hasattr(config, "get"):
    return config.get(key, default)
  return getattr(config, key, default)


def load(config_data, seed: int, num_classes: int = 0) -> Tuple[ImageNetSource, int]:
  """ImageNet per `config.model.data`: source 'tfds' (split, data_dir) or 'folder' (path); both take
  resolution (crop, default 256), resize (shorter side, 0: round(1.125 * resolution)) and num_workers."""
  kind = _get(config_data, "source")
  common = dict(seed=seed, resolution=int(_get(config_data, "resolution", 256) or 256),
                resize=int(_get(config_data, "resize", 0) or 0),
                num_workers=int(_get(config_data, "num_workers", 0) or 0))
  if kind == "tfds":
    return load_tfds(_get(config_data, "split", "train") or "train", _get(config_data, "data_dir") or None, **common)
  if kind == "folder":
    return load_folder(_get(config_data, "path", ""), num_classes=num_classes, **common)
  raise cli.ConfigError(f"unknown ImageNet source {kind!r}", "config.model.data.source", "use 'tfds' or 'folder'")


__all__ = ["DatasetNotFoundError", "ImageNetSource", "load", "load_tfds", "load_folder", "resize_size",
           "resized_shape", "crop_offset", "to_model_inputs", "folder_index"]
