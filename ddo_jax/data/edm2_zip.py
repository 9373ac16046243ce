"""EDM2's dataset zips (NVlabs/edm2 dataset_tool.py), read lazily: only the examples asked for are decoded.

* Image zip (`dataset_tool.py convert ... --resolution=64x64`): PNG files (any PIL format) plus
  `dataset.json` {"labels": [[name, class], ...]}; examples {'x': float32 [H, W, 3] in [-1, 1], 'label'}.
* Latent zip (`dataset_tool.py encode`): `.npy` files of the SD VAE's raw moments, mean and std stacked on the
  channel axis ([8, h, w] as upstream's StabilityVAEEncoder.encode_pixels returns them); examples
  {'x': float32 [h, w, 8] (NHWC), 'label'}. The posterior sample is drawn by the family in each step.

Files are taken in sorted name order, as upstream's ImageFolderDataset does; labels become one-hot float32
of width `label_dim` (none when label_dim is 0).
"""
import io
import json
import pathlib
import threading
import zipfile
from typing import Callable, Tuple

import numpy as np

from ddo_jax import cli

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
PREPARE = {
    "pixel": ("prepare it with EDM2's dataset_tool.py (https://github.com/NVlabs/edm2): `python dataset_tool.py "
              "convert --source=<ImageNet train> --dest=img64.zip --resolution=64x64 "
              "--transform=center-crop-dhariwal` and pass --config.model.data.path=img64.zip"),
    "latent": ("prepare it with EDM2's dataset_tool.py (https://github.com/NVlabs/edm2): `python dataset_tool.py "
               "convert --source=<ImageNet train> --dest=img512.zip --resolution=512x512 "
               "--transform=center-crop-dhariwal`, then `python dataset_tool.py encode --source=img512.zip "
               "--dest=img512-sd.zip`, and pass --config.model.data.path=img512-sd.zip"),
}


class DatasetNotFoundError(cli.UserError, FileNotFoundError):
  """The EDM2 dataset is missing or not of the expected kind; the message says how to prepare it."""


def _error(what: str, space: str) -> DatasetNotFoundError:
  return DatasetNotFoundError(what, "config.model.data.path", PREPARE[space])


def standard_rgb(images: np.ndarray) -> np.ndarray:
  """uint8 pixels -> float32 in [-1, 1] as EDM2's StandardRGBEncoder: x / 127.5 - 1, each in float32."""
  x = np.asarray(images, np.uint8).astype(np.float32)
  x /= np.float32(127.5)
  x -= np.float32(1)
  return x


def check(path: str, space: str) -> None:
  """One-line error unless `path` is a readable zip holding this space's files (images or .npy)."""
  kind = "image zip at 64x64" if space == "pixel" else "latent zip (8-channel mean/std .npy)"
  if not path or not pathlib.Path(path).is_file():
    raise _error(f"EDM2 dataset ({kind}) not found: {path or '<unset>'}", space)
  if not zipfile.is_zipfile(path):
    raise _error(f"{path} is not a zip archive (expected an EDM2 {kind})", space)


def load(path: str, space: str, label_dim: int) -> Tuple[Callable, int]:
  """(source, num) over an EDM2 zip; `source(indices)` returns {'x', 'label'} host arrays."""
  check(path, space)
  z = zipfile.ZipFile(path)
  exts = (".npy",) if space == "latent" else IMAGE_EXTS
  names = sorted(n for n in z.namelist() if n.lower().endswith(exts))
  if not names:
    raise _error(f"{path} holds no {'.npy latents' if space == 'latent' else 'images'}", space)
  onehot = None
  if label_dim:
    if "dataset.json" not in z.namelist():
      raise _error(f"{path} has no dataset.json labels, but the net is class-conditional", space)
    raw = json.loads(z.read("dataset.json"))["labels"]
    if raw is None:
      raise _error(f"{path}: dataset.json has no labels, but the net is class-conditional", space)
    table = dict(raw)
    ids = np.asarray([table[n] for n in names], np.int64)
    if ids.min() < 0 or ids.max() >= label_dim:
      raise _error(f"{path}: class ids in [{ids.min()}, {ids.max()}] do not fit label_dim {label_dim}", space)
    onehot = np.eye(label_dim, dtype=np.float32)[ids]
  lock = threading.Lock()   # one ZipFile handle shared by the data pipeline's threads

  def read(name):
    with lock:
      data = z.read(name)
    if space == "latent":
      a = np.load(io.BytesIO(data))
      a = a.reshape(-1, *a.shape[-2:])
      return np.asarray(a, np.float32).transpose(1, 2, 0)
    from PIL import Image
    return standard_rgb(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.uint8))

  def source(indices):
    idx = np.asarray(indices, np.int64).reshape(-1)
    out = {"x": np.stack([read(names[i]) for i in idx]) if len(idx) else np.zeros((0,), np.float32)}
    if onehot is not None:
      out["label"] = onehot[idx]
    return out

  return source, len(names)
