"""FID / IS / precision-recall of a set of images, or reference statistics of a set (`--make_ref`).

  python -m launch.evaluate --images samples/ --ref cifar10-32x32.npz \\
      --inception pt_inception-2015-12-05-6726825d.pth --num 50000 --out metrics.json
  python -m launch.evaluate --images samples.npz --ref VIRTUAL_imagenet256_labeled.npz \\
      --inception pt_inception-2015-12-05-6726825d.pth --metrics fid,is,pr
  python -m launch.evaluate --make_ref --images cifar10-32x32.zip --ref_features 10000 \\
      --inception pt_inception-2015-12-05-6726825d.pth --out my-ref.npz
  python -m launch.evaluate --make_ref --images tfds:cifar10:train@/data/tfds \\
      --inception pt_inception-2015-12-05-6726825d.pth --out cifar10-train-ref.npz

Inputs (`--images`):
* a folder of images (PNG, JPEG, ...; recursive, sorted by relative path as EDM's dataset loader;
  any size, the Inception resizes to 299 itself; grayscale/RGBA become RGB). Images of different
  sizes are batched separately (one compile per size);
* an EDM dataset `.zip` of images (same rules);
* an `.npz` (or `.npy`) of uint8 images: `arr_0` NHWC as OpenAI's sample batches, or the
  member named by `--images_key` (default: `arr_0`, else `images`, else `samples`, else the
  only member); NCHW and single-channel arrays are recognised. The member is streamed from the
  zip, not loaded whole.

References (`--ref`):
* EDM `.npz` (`mu`, `sigma`), OpenAI reference batch `.npz` (`mu`, `sigma`, `arr_0` images for
  precision/recall), an `.npz` written by `--make_ref` (`mu`, `sigma`, optional `features`),
  or EDM2 `.pkl` (`fid.mu`, `fid.sigma`; no precision/recall).
* Precision/recall use the reference's `features` when present, else the features of its `arr_0`
  images (computed here; 10k images for the ImageNet references). An `.npz` with images but no
  `mu`/`sigma` (e.g. another sample batch) gets its statistics computed too.

`--metrics` (default `auto`): comma list of `fid`, `is`, `pr`; `auto` = fid and is, plus pr when the
reference holds `features` or `arr_0`. The batch is split over every device (`parallel.make_mesh`);
a progress line with rate and ETA is logged; the metrics are printed and written as JSON atomically
(`--out`, process 0).

Checkpoint mode (instead of `--images`): sample an EDM checkpoint with EDM's Heun sampler and
evaluate the samples without writing them: `--model DIR --num N [--steps 18] [--labels balanced]`.
`build_sampler` turns the checkpoint into a callable `sampler(num_images)` yielding uint8 NHWC batches
and `evaluate_sampler` feeds it to the evaluator.
"""
import collections
import concurrent.futures
import json
import os
import sys
import threading
import time
import zipfile
from typing import Callable, Iterable, Iterator, List, NamedTuple, Optional, Sequence

from absl import app, flags
import numpy as np

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
NPZ_IMAGE_KEYS = ("arr_0", "images", "samples")
METRIC_NAMES = ("fid", "is", "pr")

_IMAGES = flags.DEFINE_string("images", None, "folder of images, EDM dataset .zip, or .npz/.npy "
                              "of uint8 images")
_IMAGES_KEY = flags.DEFINE_string("images_key", None, "npz member holding the images (default: "
                                  "arr_0, images, samples, or the only member)")
_REF = flags.DEFINE_string("ref", None, "reference statistics: EDM/OpenAI/--make_ref .npz or EDM2 "
                           ".pkl")
_INCEPTION = flags.DEFINE_string("inception", None, "pytorch-fid pt_inception-2015-12-05-6726825d"
                                 ".pth (or .npz / Orbax export); default $DDO_JAX_INCEPTION")
_NUM = flags.DEFINE_integer("num", 0, "number of images to use (the first ones); 0 = all; fewer "
                            "available is an error")
_BATCH = flags.DEFINE_integer("batch_size", 0, "global Inception batch (divisible by the device "
                              "count); 0 = 32 per device")
_OUT = flags.DEFINE_string("out", None, "metrics .json (evaluate) or statistics .npz (--make_ref)")
_METRICS = flags.DEFINE_string("metrics", "auto", "comma list of fid,is,pr, or auto")
_IS_SPLITS = flags.DEFINE_integer("is_splits", 10, "Inception Score splits")
_PR_DISTANCE = flags.DEFINE_enum("pr_distance", "float32", ["float32", "float16"],
                                 "precision/recall distance dtype (float16 imitates OpenAI's)")
_MAKE_REF = flags.DEFINE_bool("make_ref", False, "write reference statistics of --images to --out")
_REF_FEATURES = flags.DEFINE_integer("ref_features", 0, "--make_ref: also store the pool3 features "
                                     "of the first N images (for precision/recall)")
_WORKERS = flags.DEFINE_integer("num_workers", 8, "image decoding threads")
_MODEL = flags.DEFINE_string("model", None, "checkpoint mode, instead of --images: a converted EDM folder "
                             "or a DDO round folder; --num samples (seeds 0..num-1) go straight into the "
                             "feature accumulator, no image is written")
_STEPS = flags.DEFINE_integer("steps", 18, "checkpoint mode: Heun steps (18 = 35 NFE)")
_LABELS = flags.DEFINE_enum("labels", "balanced", ["random", "balanced"],
                            "checkpoint mode: strict class balance (seed mod classes) or random labels")


# ---------------------------------------------------------------------------------------------
# Image sources.


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


def _layout(shape) -> str:
  """'NHWC', 'NCHW' or 'NHW' of a uint8 image array shape."""
  if len(shape) == 3:
    return "NHW"
  if len(shape) == 4 and shape[-1] in (1, 3):
    return "NHWC"
  if len(shape) == 4 and shape[1] in (1, 3):
    return "NCHW"
  raise ValueError(f"cannot read images of shape {tuple(shape)}: expected [N, H, W, 3], "
                   "[N, 3, H, W], [N, H, W, 1], [N, 1, H, W] or [N, H, W]")


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
      raise KeyError(f"no member {key!r}; the file has {list(files)}")
    return key
  for k in NPZ_IMAGE_KEYS:
    if k in files:
      return k
  if len(files) == 1:
    return files[0]
  raise KeyError(f"cannot tell which member holds the images among {list(files)}; "
                 "pass --images_key")


def npz_source(path: str, key: Optional[str] = None) -> ImageSource:
  """Streams uint8 images from one member of an `.npz`, without loading it whole."""
  with zipfile.ZipFile(path) as zf:
    members = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    key = pick_npz_key(members, key)
    shape, dtype, f = _npz_member_header(zf, key + ".npy")
    f.close()
  layout = _layout(shape)
  if dtype != np.uint8:
    raise ValueError(f"{path}[{key}]: expected uint8 images, got {dtype}")
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


def npy_source(path: str) -> ImageSource:
  """uint8 images from a `.npy` (memory-mapped)."""
  arr = np.load(path, mmap_mode="r")
  layout = _layout(arr.shape)

  def batches(batch_size):
    for start in range(0, arr.shape[0], batch_size):
      yield to_nhwc_rgb(np.asarray(arr[start:start + batch_size]), layout)

  return ImageSource(int(arr.shape[0]), batches, f"npy {path} {arr.shape}")


def tfds_source(spec: str) -> ImageSource:
  """`tfds:cifar10[:split][@data_dir]`: a prepared tfds dataset of this project (ArrayRecord, no TF)."""
  from ddo_jax.data import cifar10  # pylint: disable=import-outside-toplevel
  body, _, data_dir = spec[len("tfds:"):].partition("@")
  name, _, split = body.partition(":")
  if name != "cifar10":
    raise ValueError(f"--images {spec!r}: only tfds:cifar10 is supported")
  source, n = cifar10.load_tfds(split=split or "train", data_dir=data_dir or None)

  def batches(batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, n, batch_size):
      x = source(np.arange(start, min(start + batch_size, n)))["x"]
      yield np.rint((x + 1.0) * 127.5).astype(np.uint8)    # exact inverse of uint8 / 127.5 - 1

  return ImageSource(n, batches, f"tfds cifar10 {split or 'train'} ({n} images)")


def open_images(path: str, key: Optional[str] = None, num_workers: int = 8) -> ImageSource:
  """An `ImageSource` for a folder, `.zip`, `.npz`, `.npy` or `tfds:cifar10[:split][@data_dir]`."""
  if path.startswith("tfds:"):
    return tfds_source(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--images {path!r} does not exist")
  if os.path.isdir(path):
    return folder_source(path, num_workers)
  lower = path.lower()
  if lower.endswith(".npz"):
    return npz_source(path, key)
  if lower.endswith(".npy"):
    return npy_source(path)
  if lower.endswith(".zip"):
    return zip_source(path, num_workers)
  raise ValueError(f"--images {path!r}: expected a folder, .zip, .npz or .npy")


# ---------------------------------------------------------------------------------------------
# References.


class Reference(NamedTuple):
  stats: Optional[tuple]  # (mu, sigma) or None
  features: Optional[np.ndarray]  # [K, 2048] or None
  images: Optional[ImageSource]  # reference images to compute the missing parts from


def read_reference(path: str, want_stats: bool, want_features: bool) -> Reference:
  """Reads what the reference file holds of statistics, features and images."""
  from ddo_jax.metrics import reference_stats  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    raise FileNotFoundError(f"--ref {path!r} does not exist")
  if path.lower().endswith(".pkl"):
    if want_features:
      raise ValueError(f"{path}: an EDM2 .pkl holds no features or images for precision/recall")
    return Reference(reference_stats.load_reference_stats(path, "fid"), None, None)
  with np.load(path, allow_pickle=False) as f:
    files = list(f.files)
  stats = reference_stats.load_edm_npz(path) if {"mu", "sigma"} <= set(files) else None
  features = None
  if want_features and "features" in files:
    with np.load(path, allow_pickle=False) as f:
      features = np.asarray(f["features"], np.float32)
  images = None
  if (want_stats and stats is None) or (want_features and features is None):
    if "arr_0" not in files:
      missing = "mu/sigma" if want_stats and stats is None else "features"
      raise ValueError(f"{path}: has no {missing} and no 'arr_0' images to compute them from "
                       f"(members: {files})")
    images = npz_source(path, "arr_0")
  return Reference(stats, features, images)


def reference_auto_pr(path: Optional[str]) -> bool:
  """Whether `--metrics auto` includes precision/recall for this reference."""
  if path is None or path.lower().endswith(".pkl"):
    return False
  with np.load(path, allow_pickle=False) as f:
    return "features" in f.files or "arr_0" in f.files


def parse_metrics(spec: str, ref: Optional[str]) -> List[str]:
  """The metrics to compute from `--metrics` (see the module docstring)."""
  if spec == "auto":
    names = ["is"] + (["fid"] if ref else []) + (["pr"] if reference_auto_pr(ref) else [])
  else:
    names = [m.strip() for m in spec.split(",") if m.strip()]
  bad = [m for m in names if m not in METRIC_NAMES]
  if bad:
    raise ValueError(f"unknown metrics {bad}; choose from {METRIC_NAMES}")
  if ref is None and ({"fid", "pr"} & set(names)):
    raise ValueError("fid and pr need --ref")
  return names


# ---------------------------------------------------------------------------------------------
# Sampler hook (checkpoint + sampler settings mode).


def evaluate_sampler(sampler: Callable[[int], Iterable[np.ndarray]], num_images: int,
                     evaluator) -> dict:
  """HOOK: metrics of `num_images` samples drawn from `sampler`, without writing images.

  Args:
    sampler: `sampler(num_images)` yields uint8 NHWC batches (EDM convention
      `clip(x * 127.5 + 128, 0, 255)`) totalling at least `num_images`; extra rows are cut.
    num_images: number of samples to evaluate.
    evaluator: a `ddo_jax.metrics.evaluator.Evaluator` with the references set.

  Returns:
    `evaluator.result()`.
  """
  from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  done = evaluator_lib.feed(evaluator, sampler(num_images), total=num_images,
                            max_images=num_images, what="sample+inception")
  if done < num_images:
    raise ValueError(f"the sampler yielded {done} images, fewer than {num_images}")
  return evaluator.result()


def build_sampler(checkpoint: str, batch_size: int, mesh, *, num_steps: int = 18,
                  labels: str = "balanced") -> Callable[[int], Iterable[np.ndarray]]:
  """An EDM model folder + Heun settings -> `sampler(num)` yielding uint8 batches for seeds 0..num-1.

  Seed s uses the same key as in launch.sample; labels are seed mod classes ('balanced') or random.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
  from ddo_jax.families.edm import load_model_dir, to_uint8  # pylint: disable=import-outside-toplevel
  family, params = load_model_dir(checkpoint, labels=labels, num_steps=num_steps)
  from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
  sharding = parallel.batch_sharding(mesh)
  fn = seeded.make_seeded_sampler(family.sample, mesh, parallel.replicated(mesh))
  params = jax.device_put(params, parallel.replicated(mesh))
  base = jax.random.key(seeded.CLI_BASE_SEED)

  def sampler(num: int):
    for start in range(0, num, batch_size):
      ids = jax.device_put(np.arange(start, start + batch_size, dtype=np.int32), sharding)
      out = parallel.to_host(fn(params, base, ids))
      yield to_uint8(out["x"])[:min(batch_size, num - start)]

  return sampler


# ---------------------------------------------------------------------------------------------
# Main.


def _make_evaluator(variables, mesh, batch_size, **kwargs):
  from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  return evaluator_lib.Evaluator(variables, mesh, batch_size, **kwargs)


def _count(source: ImageSource, num: int, what: str) -> int:
  if num and num > source.count:
    raise ValueError(f"{what}: asked for {num} images, found only {source.count} in "
                     f"{source.description}")
  n = num or source.count
  if n == 0:
    raise ValueError(f"{what}: no images in {source.description}")
  return n


def _features_of(source: ImageSource, variables, mesh, batch_size, keep: int, what: str):
  """(stats (mu, sigma), features [<= keep, 2048]) of a whole image source."""
  from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  ev = _make_evaluator(variables, mesh, batch_size, compute_is=False, keep_features=keep)
  evaluator_lib.feed(ev, source.batches(batch_size), total=source.count, what=what)
  return ev.statistics(), ev.features()


def make_ref(variables, mesh, batch_size: int) -> dict:
  """`--make_ref`: writes mu, sigma (and features) of `--images` to `--out` (EDM-compatible)."""
  from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  from ddo_jax.metrics import reference_stats  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  if not _OUT.value:
    raise ValueError("--make_ref needs --out REF.npz")
  source = open_images(_IMAGES.value, _IMAGES_KEY.value, _WORKERS.value)
  n = _count(source, _NUM.value, "--images")
  ev = _make_evaluator(variables, mesh, batch_size, compute_is=False,
                       keep_features=_REF_FEATURES.value)
  evaluator_lib.feed(ev, source.batches(batch_size), total=n, max_images=n, what="reference")
  mu, sigma = ev.statistics()
  extra = {"num_images": np.int64(ev.num_images)}
  if _REF_FEATURES.value:
    extra["features"] = ev.features()
  if jax.process_index() == 0:
    reference_stats.save_stats_npz(_OUT.value, mu, sigma, **extra)
  return {"num_images": ev.num_images, "out": _OUT.value,
          "num_features": int(extra["features"].shape[0]) if "features" in extra else 0}


def evaluate(variables, mesh, batch_size: int) -> dict:
  """Evaluate mode: metrics of `--images` against `--ref`."""
  from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  names = parse_metrics(_METRICS.value, _REF.value)
  ref = None
  if _REF.value:
    ref = read_reference(_REF.value, "fid" in names, "pr" in names)
    if ref.images is not None:
      keep = -1 if "pr" in names and ref.features is None else 0
      stats, features = _features_of(ref.images, variables, mesh, batch_size, keep, "reference")
      if ref.features is None and keep:
        ref = ref._replace(features=features)
      if ref.stats is None:
        ref = ref._replace(stats=stats)
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  pr_kwargs = {"distance_dtype": jnp.float16 if _PR_DISTANCE.value == "float16" else jnp.float32}
  ev = _make_evaluator(
      variables, mesh, batch_size,
      ref_stats=ref.stats if ref is not None and "fid" in names else None,
      ref_features=ref.features if ref is not None and "pr" in names else None,
      compute_is="is" in names, num_is_splits=_IS_SPLITS.value, pr_kwargs=pr_kwargs)
  if _MODEL.value:
    if not _NUM.value:
      raise ValueError("--model needs --num (how many samples to generate)")
    sampler = build_sampler(_MODEL.value, batch_size, mesh, num_steps=_STEPS.value, labels=_LABELS.value)
    return evaluate_sampler(sampler, _NUM.value, ev)
  source = open_images(_IMAGES.value, _IMAGES_KEY.value, _WORKERS.value)
  n = _count(source, _NUM.value, "--images")
  evaluator_lib.feed(ev, source.batches(batch_size), total=n, max_images=n, what="inception")
  return ev.result()


def _write_json(path: str, record: dict) -> None:
  import jax  # pylint: disable=import-outside-toplevel
  from ddo_jax import utils  # pylint: disable=import-outside-toplevel
  if jax.process_index() == 0:
    utils.atomic_write_json(path, record)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if bool(_IMAGES.value) == bool(_MODEL.value):
    raise app.UsageError("give exactly one of --images (a folder or .npz) and --model (a checkpoint)")
  if _MODEL.value and _MAKE_REF.value:
    raise app.UsageError("--make_ref takes --images, not --model")
  from ddo_jax import parallel, utils  # pylint: disable=import-outside-toplevel
  parallel.maybe_initialize_distributed()
  import jax  # pylint: disable=import-outside-toplevel
  from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
  utils.setup_logging()
  t0 = time.time()
  try:
    variables = evaluator_lib.load_inception(_INCEPTION.value)
  except evaluator_lib.InceptionWeightsNotFoundError as e:
    sys.exit(f"error: {e}")
  mesh = parallel.make_mesh()
  batch_size = _BATCH.value or 32 * mesh.size
  if _MAKE_REF.value:
    record = make_ref(variables, mesh, batch_size)
  else:
    record = evaluate(variables, mesh, batch_size)
  record.update(images=_IMAGES.value, ref=_REF.value, inception=_INCEPTION.value,
                batch_size=batch_size, num_devices=mesh.size,
                seconds=round(time.time() - t0, 1))
  for key in evaluator_lib.METRIC_KEYS:
    if key in record:
      utils.log.info("%s %.6g", key, record[key])
  print(json.dumps(record, sort_keys=True, default=float))
  if _OUT.value and not _MAKE_REF.value:
    _write_json(_OUT.value, record)


if __name__ == "__main__":
  app.run(main)
