"""CIFAR-10 as a Source for the training loop: from tfds (ArrayRecord, no TensorFlow) or EDM's zip.

Every loader returns `(source, num_examples)`, where `source(indices) -> dict of numpy arrays` is the
random-access contract of `ddo_jax.data.pipeline` (shuffling, per-process rows and checkpoint state live
there). A batch of B indices gives

  'x':     float32 [B, 32, 32, 3], pixels scaled as EDM does: uint8 / 127.5 - 1, so in [-1, 1];
  'label': float32 [B, 10] one-hot class labels (omitted for an EDM zip without labels, see below).

The output for an index never changes: no augmentation here (EDM's CIFAR-10 runs use x-flips through
its augmentation pipe, which belongs to the model family, not to the data).

Two backends:

* `load_tfds`: `tfds.data_source('cifar10')` read through grain; the dataset must have been prepared
  once as ArrayRecord (that step needs TensorFlow, see `TFDS_PREPARE`). By default (`cache=True`) the
  split is decoded into memory once at start (150 MB and about 10 s for the train split on one slow
  core), after which a batch of 512 costs about 1 ms. `cache=False` streams: one batched ArrayRecord read
  per batch, decoded by tfds example by example (tf.Example parse + PIL PNG decode, about 0.2 ms per
  image, so about 100 ms per batch of 512 on the same core; threads do not help, it is GIL-bound).
* `load_edm_zip`: EDM's `cifar10-32x32.zip` made by its `dataset_tool.py` (PNG files plus `dataset.json`
  holding `{"labels": [[file name, class], ...]}`); all images are decoded into memory once. Examples
  are ordered by sorted file name, as EDM's `ImageFolderDataset` orders them. A zip whose `dataset.json`
  is missing or has `"labels": null` is unconditional: its batches have no 'label' key, so a conditional
  model fails loudly instead of training on made-up labels.

`load(config.data)` picks the backend from `config.data.source` ('tfds' or 'edm_zip'). A dataset that
is not there raises `DatasetNotFoundError` whose message says how to prepare it.
"""
import io
import json
import os
import zipfile
from typing import Any, Callable, Mapping, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from ddo_jax import cli, utils
from ddo_jax.data.pipeline import Source

NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)
TFDS_NAME = "cifar10"

# One-line fixes (every user error is one line: `error: <what> (<key>): <fix>`).
TFDS_PREPARE = ("on a machine with internet run `pip install tensorflow tensorflow-datasets==4.9.10 && "
                "tfds build cifar10 --file_format=array_record --data_dir={data_dir}` and copy "
                "{data_dir}/cifar10 here (or set TFDS_DATA_DIR), or train from EDM's zip instead: "
                "--config.model.data.source=edm_zip --config.model.data.path=cifar10-32x32.zip "
                "(README, 'Preparing data')")
EDM_PREPARE = ("make it with EDM's dataset tool (https://github.com/NVlabs/edm): "
               "`python dataset_tool.py --source=cifar-10-python.tar.gz --dest=datasets/cifar10-32x32.zip` "
               "and pass --config.model.data.path=datasets/cifar10-32x32.zip, or use "
               "--config.model.data.source=tfds (README, 'Preparing data')")
DATA_DIR_KEY = "config.model.data.data_dir"
ZIP_KEY = "config.model.data.path"


class DatasetNotFoundError(cli.UserError, FileNotFoundError):
  """The dataset is missing or not in a readable format; the one-line message says how to prepare it."""


# ------------------------------------------------------------------------------------------------
# Shared: uint8 images and integer labels -> model inputs.


def to_model_inputs(images: np.ndarray, labels: Optional[np.ndarray]) -> dict:
  """uint8 [B,H,W,C] images and int [B] (or float [B,K]) labels -> {'x', 'label'} float32 arrays."""
  x = images.astype(np.float32)
  x /= np.float32(127.5)  # a division, not a multiply by 1/127.5: bit-equal to EDM's `x / 127.5 - 1`
  x -= np.float32(1)
  out = {"x": x}
  if labels is not None:
    out["label"] = labels_to_onehot(labels)
  return out


def labels_to_onehot(labels: np.ndarray, num_classes: int = NUM_CLASSES) -> np.ndarray:
  """Integer class ids [B] -> float32 one-hot [B, num_classes]; float label vectors pass through."""
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.dtype.kind == "f":
    return labels.astype(np.float32)
  if labels.ndim != 1 or labels.dtype.kind not in "iu":
    raise ValueError(f"labels must be integer class ids [B], got {labels.dtype}{list(labels.shape)}")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"class ids must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
  return np.eye(num_classes, dtype=np.float32)[labels]


def _check_indices(indices, num_examples: int) -> np.ndarray:
  idx = np.asarray(indices, dtype=np.int64).reshape(-1)
  if idx.size and (idx.min() < 0 or idx.max() >= num_examples):
    raise IndexError(f"indices must lie in [0, {num_examples}), got [{idx.min()}, {idx.max()}]")
  return idx


def _in_memory(images: np.ndarray, labels: Optional[np.ndarray]) -> Source:
  """A Source over decoded uint8 images: indexing, then one vectorised conversion per batch."""
  n = len(images)

  def source(indices):
    idx = _check_indices(indices, n)
    return to_model_inputs(images[idx], None if labels is None else labels[idx])

  return source


# ------------------------------------------------------------------------------------------------
# tfds.data_source + grain.


class _BatchedReads:
  """tfds's data source with its batched `__getitems__` offered to grain as `_getitems`.

  grain's `SourceMapDataset` reads a batch of indices with one `_getitems` call when the source has one
  (one parallel ArrayRecord read) and falls back to one `__getitem__` per index otherwise. The data
  source of `tfds.testing.mock_data` (tfds 4.9.10) has a `__getitems__` that cannot be called (an
  unbound function set on a MagicMock); it is detected once here and read element by element.
  """

  def __init__(self, data_source):
    self._ds = data_source
    self._batched = True
    if len(data_source):
      try:
        data_source.__getitems__([0])
      except TypeError:
        self._batched = False

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int):
    return self._ds[index]

  def _getitems(self, indices: Sequence[int]):
    if self._batched:
      return self._ds.__getitems__(list(indices))
    return [self._ds[i] for i in indices]

  def __repr__(self) -> str:
    return f"_BatchedReads({self._ds!r})"


def _image_and_label(example: Mapping[str, Any]) -> Tuple[np.ndarray, int]:
  """A decoded tfds example -> (uint8 [32,32,3] image, class id); the per-element grain map."""
  return example["image"], example["label"]


def _read_batch(dataset, idx: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """uint8 images [B,32,32,3] and int64 labels [B] for `idx`, one batched read through grain."""
  getitems = getattr(dataset, "_getitems", None)
  items = getitems(idx.tolist()) if getitems else [dataset[int(i)] for i in idx]
  images = np.empty((len(items),) + IMAGE_SHAPE, np.uint8)
  for row, (image, _) in enumerate(items):
    images[row] = image
  labels = np.fromiter((label for _, label in items), np.int64, count=len(items))
  return images, labels


def _open_tfds(split: str, data_dir: Optional[str]):
  """`tfds.data_source('cifar10')` without downloading; a clear error if it is not prepared."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    data_source = tfds.data_source(TFDS_NAME, split=split, data_dir=data_dir, download=False)
    len(data_source)
  except Exception as e:  # pylint: disable=broad-except
    raise _tfds_error(split, data_dir, e) from e
  return data_source


def _tfds_error(split: str, data_dir: Optional[str], cause: Exception) -> Exception:
  """Says why `tfds.data_source` failed (missing, or tfrecord only) and how to fix it."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  shown_dir = data_dir or tfds.core.constants.get_default_data_dir()
  prepare = TFDS_PREPARE.format(data_dir=shown_dir)
  try:
    builder = tfds.builder(TFDS_NAME, data_dir=data_dir)
    prepared = builder.is_prepared()
    formats = {f.value for f in builder.info.available_file_formats()} if prepared else set()
  except Exception:  # pylint: disable=broad-except
    return DatasetNotFoundError(f"CIFAR-10 could not be opened with tfds in {shown_dir} ({cause!r})",
                                DATA_DIR_KEY, prepare)
  if not prepared:
    return DatasetNotFoundError(f"CIFAR-10 is not prepared for tfds in {shown_dir} (no {builder.data_dir})",
                                DATA_DIR_KEY, prepare)
  if "array_record" not in formats:
    return DatasetNotFoundError(
        f"CIFAR-10 is prepared in {builder.data_dir} as {sorted(formats)} only, but training reads "
        "ArrayRecord (random access, no TensorFlow)", DATA_DIR_KEY,
        f"convert it once, with TensorFlow installed: `tfds convert_format --dataset_version_dir="
        f"{builder.data_dir} --out_file_format=array_record`, or delete {builder.data_dir} and rebuild it "
        f"(`tfds build cifar10 --file_format=array_record --data_dir={shown_dir}`)")
  return DatasetNotFoundError(f"CIFAR-10 split {split!r} could not be opened from {builder.data_dir} "
                              f"({cause!r})", DATA_DIR_KEY, prepare)


def load_tfds(split: str = "train", data_dir: Optional[str] = None,
              cache: bool = True) -> Tuple[Source, int]:
  """CIFAR-10 from a tfds ArrayRecord build, read by index through grain.

  Args:
    split: a tfds split ('train', 'test', 'train[:1000]', ...).
    data_dir: the tfds data folder (holding cifar10/3.0.2/); None: TFDS_DATA_DIR or
      ~/tensorflow_datasets.
    cache: decode the whole split into memory once (3 KB per image), then only index (about 1 ms
      per batch of 512); False: read and decode each batch from the ArrayRecord files (about 100 ms).

  Returns:
    (source, num_examples): `source(indices)` -> {'x': float32 [B,32,32,3] in [-1,1],
    'label': float32 one-hot [B,10]}.
  """
  import grain  # pylint: disable=g-import-not-at-top
  data_source = _open_tfds(split, data_dir)
  dataset = grain.MapDataset.source(_BatchedReads(data_source)).map(_image_and_label)
  n = len(dataset)
  if cache:
    return _in_memory(*_decode_all(dataset, n, f"cifar10[{split}]")), n

  def source(indices):
    return to_model_inputs(*_read_batch(dataset, _check_indices(indices, n)))

  return source, n


def _decode_all(dataset, n: int, what: str, chunk: int = 1024) -> Tuple[np.ndarray, np.ndarray]:
  """Reads the whole of `dataset` into uint8 images [n,32,32,3] and int64 labels [n]."""
  utils.log.info("%s: decoding %d images into memory", what, n)
  images, labels = np.empty((n,) + IMAGE_SHAPE, np.uint8), np.empty((n,), np.int64)
  progress = utils.Progress(f"{what} decode", n, unit="images")
  for start in range(0, n, chunk):
    stop = min(start + chunk, n)
    images[start:stop], labels[start:stop] = _read_batch(dataset, np.arange(start, stop))
    progress.update(stop)
  return images, labels


# ------------------------------------------------------------------------------------------------
# EDM's dataset zip.


def _image_names(names: Sequence[str]) -> list:
  """Image members of the zip, in EDM's order (sorted names with an image extension PIL knows)."""
  Image.init()
  return sorted(n for n in names if os.path.splitext(n)[1].lower() in Image.EXTENSION)


def _zip_labels(zf: zipfile.ZipFile, image_names: Sequence[str]) -> Optional[np.ndarray]:
  """Labels from dataset.json in image order: int64 [N], float32 [N,K], or None when absent."""
  if "dataset.json" not in zf.namelist():
    return None
  labels = json.loads(zf.read("dataset.json")).get("labels")
  if labels is None:
    return None
  by_name = {name.replace("\\", "/"): label for name, label in labels}
  missing = [n for n in image_names if n not in by_name]
  if missing:
    raise ValueError(f"dataset.json has no label for {len(missing)} images, e.g. {missing[:3]}")
  labels = np.array([by_name[n] for n in image_names])
  return labels.astype(np.int64) if labels.ndim == 1 else labels.astype(np.float32)


def _decode_png(data: bytes) -> np.ndarray:
  with Image.open(io.BytesIO(data)) as im:
    image = np.asarray(im)
  return image[:, :, None] if image.ndim == 2 else image


def _zip_images(zf: zipfile.ZipFile, names: Sequence[str], what: str) -> np.ndarray:
  """Decodes every image once into one uint8 [N,H,W,C] array, with a progress log line."""
  first = _decode_png(zf.read(names[0]))
  images = np.empty((len(names),) + first.shape, np.uint8)
  utils.log.info("%s: decoding %d images of %s into memory (%.0f MB)", what, len(names),
                 list(first.shape), images.nbytes / 2**20)
  progress = utils.Progress(f"{what} decode", len(names), unit="images")
  for i, name in enumerate(names):
    image = first if i == 0 else _decode_png(zf.read(name))
    if image.shape != first.shape or image.dtype != np.uint8:
      raise ValueError(f"{name}: {image.dtype}{list(image.shape)}, expected uint8{list(first.shape)}")
    images[i] = image
    progress.update(i + 1)
  return images


def load_edm_zip(path: str) -> Tuple[Source, int]:
  """EDM's dataset zip (e.g. cifar10-32x32.zip), decoded into memory once.

  Returns:
    (source, num_examples): `source(indices)` -> {'x': float32 [B,H,W,C] in [-1,1],
    'label': float32 [B,10] one-hot} ('label' absent when the zip has no labels).
  """
  if not path or not os.path.isfile(path):
    raise DatasetNotFoundError(f"EDM dataset zip not found: {path!r}", ZIP_KEY, EDM_PREPARE)
  what = os.path.basename(path)
  with zipfile.ZipFile(path) as zf:
    names = _image_names(zf.namelist())
    if not names:
      raise DatasetNotFoundError(f"{path} holds no images", ZIP_KEY, EDM_PREPARE)
    labels = _zip_labels(zf, names)
    images = _zip_images(zf, names, what)
  if labels is not None:
    labels_to_onehot(labels)  # validate the class ids once, not per batch
  utils.log.info("%s: %d images, %s", what, len(names),
                 "unconditional (no labels)" if labels is None else "with labels")
  return _in_memory(images, labels), len(names)


# ------------------------------------------------------------------------------------------------
# Config dispatch.


def _get(config, key: str, default=None):
  """`config.key` for a ConfigDict, dict or plain object, `default` when absent."""
  if isinstance(config, Mapping) or hasattr(config, "get"):
    return config.get(key, default)
  return getattr(config, key, default)


def load_synthetic(num: int = 512, resolution: int = 32, seed: int = 0) -> Tuple[Source, int]:
  """SYNTHETIC stand-in data (not CIFAR-10): `num` uint8 images of one soft coloured disc each, whose colour
  and position depend on the class (10 classes), with pixel noise. For runs that must work with no dataset
  prepared (configs/edm_cifar10.py:tiny); nothing learned on it says anything about CIFAR-10."""
  images, labels = synthetic_images(num, resolution, seed)
  utils.log.info("SYNTHETIC data (not CIFAR-10): %d images %dx%d, 10 classes", num, resolution, resolution)
  return _in_memory(images, labels), num


def synthetic_images(num: int, resolution: int, seed: int = 0) -> Tuple[np.ndarray, np.ndarray]:
  """The images of `load_synthetic`: (uint8 [num, resolution, resolution, 3], int labels arange(num) % 10)."""
  rng = np.random.default_rng([seed, 7])
  labels = np.arange(num) % NUM_CLASSES
  hues = rng.uniform(40, 215, size=(NUM_CLASSES, 3))
  centers = rng.uniform(0.3, 0.7, size=(NUM_CLASSES, 2)) * resolution
  yy, xx = np.mgrid[0:resolution, 0:resolution]
  images = np.empty((num, resolution, resolution, 3), np.uint8)
  for i, k in enumerate(labels):
    d2 = (yy - centers[k, 0]) ** 2 + (xx - centers[k, 1]) ** 2
    disc = np.exp(-d2 / (2 * (0.18 * resolution) ** 2))[..., None]
    img = 30 + disc * hues[k] + rng.normal(0, 8, size=(resolution, resolution, 3))
    images[i] = np.clip(img, 0, 255).astype(np.uint8)
  return images, labels


LOADERS: Mapping[str, Callable[..., Tuple[Source, int]]] = {
    "tfds": lambda c: load_tfds(split=_get(c, "split", "train") or "train",
                                data_dir=_get(c, "data_dir") or None,
                                cache=bool(_get(c, "cache", True))),
    "edm_zip": lambda c: load_edm_zip(_get(c, "path", "")),
    "synthetic": lambda c: load_synthetic(int(_get(c, "num", 512) or 512), int(_get(c, "resolution", 32) or 32)),
}


def load(config_data) -> Tuple[Source, int]:
  """CIFAR-10 per `config.data`: source='tfds' (split, data_dir, cache) or 'edm_zip' (path); 'synthetic'
  (num, resolution) is labelled stand-in data for self-contained smoke runs."""
  kind = _get(config_data, "source")
  if kind not in LOADERS:
    raise cli.ConfigError(f"unknown data source {kind!r}", "config.model.data.source",
                        f"use one of {sorted(LOADERS)}")
  return LOADERS[kind](config_data)


__all__ = ["DatasetNotFoundError", "load", "load_tfds", "load_edm_zip", "to_model_inputs",
           "labels_to_onehot"]
