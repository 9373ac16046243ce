"""ImageNet as EDM2 prepares it, read on the fly: `tfds.data_source('imagenet2012')` or an image-folder tree,
with the transform of EDM2's `dataset_tool.py convert --transform=center-crop-dhariwal` (ADM's center crop).

The transform (`center_crop_dhariwal`), as NVlabs/edm2's dataset_tool applies it to every training image:

  1. decode with PIL and convert to RGB;
  2. while the shorter side is at least twice the target size, halve both sides (integer division) with PIL's
     BOX filter;
  3. resize so that the shorter side becomes the target: each side round(side * size / short) (Python's round),
     with PIL's BICUBIC filter;
  4. crop the centre: top (h - size) // 2, left (w - size) // 2.

Pixels then become float32 x / 127.5 - 1 (EDM2's StandardRGBEncoder) for pixel models (img64). For latent
models (img512) a caller-supplied `encode(uint8 images) -> raw moments` (the SD VAE's mean and std, EDM2's
StabilityVAEEncoder.encode_pixels, jitted by the family) turns each batch into what EDM2's
`dataset_tool.py encode` would have stored in its latent zip, so a run needs no pre-encoded zip. Encoding on the
fly costs one VAE encoder pass per real image per step (on the first local device); a pre-encoded latent zip
(`ddo_jax.data.edm2_zip`) avoids it.

Examples are {'x': float32 [S, S, 3] pixels or [h, w, 2C] moments, 'label': one-hot float32 [label_dim]}; the
class ids are tfds's (the sorted WordNet ids), which equal the ids dataset_tool gives an ImageNet train folder
(the sorted top-level folder names). The transform has no randomness: an example is a pure function of its
index.
"""
from typing import Callable, Optional, Tuple

import numpy as np
from PIL import Image

from ddo_jax import cli, utils
from ddo_jax.data import edm2_zip, imagenet


def center_crop_dhariwal(image: Image.Image, size: int) -> np.ndarray:
  """PIL image -> uint8 [size, size, 3], EDM2's `center-crop-dhariwal` (ADM's center crop), see the module doc."""
  image = image.convert("RGB")
  while min(image.size) >= 2 * size:
    image = image.resize(tuple(d // 2 for d in image.size), resample=Image.BOX)
  scale = size / min(image.size)
  image = image.resize(tuple(round(d * scale) for d in image.size), resample=Image.BICUBIC)
  arr = np.asarray(image, np.uint8)
  top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
  return arr[top:top + size, left:left + size]


class CenterCropSource(imagenet.ImageNetSource):
  """ImageNet examples through `center_crop_dhariwal` (decoding in a thread pool, as `imagenet.ImageNetSource`)."""

  def __init__(self, read, num_examples: int, *, resolution: int, num_workers: int = 0):
    super().__init__(read, num_examples, seed=0, resolution=resolution, num_workers=num_workers)

  def example(self, index: int, data: bytes) -> np.ndarray:
    del index
    return center_crop_dhariwal(imagenet.decode(data), self.resolution)


def _get(config, key: str, default=None):
  return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def open_source(config_data, resolution: int, label_dim: int, data_source=None) -> Tuple[CenterCropSource, int]:
  """The center-cropped uint8 source of `config.model.data` (source 'tfds': split, data_dir; 'folder': path).
  `data_source` replaces tfds's (a sequence of {'image': encoded bytes, 'label': int}; for tests)."""
  kind = _get(config_data, "source")
  workers = int(_get(config_data, "num_workers", 0) or 0)
  if kind == "tfds":
    split = _get(config_data, "split", "train") or "train"
    ds = imagenet.open_tfds(split, _get(config_data, "data_dir") or None) if data_source is None else data_source
    n = len(ds)
    if not n:
      raise imagenet.DatasetNotFoundError(f"ImageNet split {split!r} is empty", "config.model.data.split",
                                          "use 'train'")
    read, where = imagenet.tfds_reader(ds), f"tfds {imagenet.TFDS_NAME}[{split}]"
  elif kind == "folder":
    root = _get(config_data, "path", "")
    classes, paths, labels = imagenet.folder_index(root)
    if label_dim and len(classes) > label_dim:
      raise imagenet.DatasetNotFoundError(f"{root} has {len(classes)} classes, more than the model's {label_dim}",
                                          imagenet.PATH_KEY, "point it at a folder with at most that many classes")
    read, n, where = imagenet.read_files(paths, labels), len(paths), root
  else:
    raise cli.ConfigError(f"unknown ImageNet source {kind!r}", "config.model.data.source", "use 'tfds' or 'folder'")
  utils.log.info("%s: %d images (EDM2 transform: center-crop-dhariwal to %d)", where, n, resolution)
  return CenterCropSource(read, n, resolution=resolution, num_workers=workers), n


def model_source(images: Callable[[np.ndarray], Tuple[np.ndarray, np.ndarray]], num: int, label_dim: int,
                 encode: Optional[Callable[[np.ndarray], np.ndarray]] = None) -> Tuple[Callable, int]:
  """(source, num): `images(indices)` -> (uint8 [B, S, S, 3], int class ids [B]) made into the family's
  examples: {'x': StandardRGB pixels, or `encode(uint8)` (raw VAE moments) when given, 'label': one-hot}."""
  eye = np.eye(max(label_dim, 1), dtype=np.float32)

  def source(indices):
    idx = np.asarray(indices, np.int64).reshape(-1)
    pixels, ids = images(idx)
    ids = np.asarray(ids, np.int64)
    if label_dim and ids.size and (ids.min() < 0 or ids.max() >= label_dim):
      raise ValueError(f"class ids in [{ids.min()}, {ids.max()}] do not fit label_dim {label_dim}")
    out = {"x": np.asarray(encode(pixels), np.float32) if encode is not None else edm2_zip.standard_rgb(pixels)}
    if label_dim:
      out["label"] = eye[ids]
    return out

  return source, int(num)


__all__ = ["center_crop_dhariwal", "CenterCropSource", "open_source", "model_source"]
