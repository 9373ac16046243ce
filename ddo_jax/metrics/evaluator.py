"""Reusable FID / IS / precision-recall evaluator over a device mesh.

`Evaluator` owns the FID Inception variables (replicated over the mesh) and one jitted feature
function whose batch is split over the mesh's batch axes `('data', 'fsdp')`
(`ddo_jax.parallel.batch_sharding`). Images are fed as uint8 NHWC batches (what the samplers produce
after EDM's `clip(x * 127.5 + 128, 0, 255).astype(uint8)`); any H and W work, the Inception resizes
to 299 itself.

Per batch it

* accumulates pool3 statistics in float64 (`ddo_jax.metrics.stats`): on the devices with
  `sharded_update` by default (features never leave the devices for this), or on the host with
  `stats.update` (`stats_on_device=False`; the default on TPU, which has no float64);
* keeps the unbiased 1008-way logits on the host for the Inception Score (4 KiB per image);
* keeps up to `keep_features` pool3 vectors on the host for precision/recall (8 KiB per image).

`add_uint8` takes any number of images. Full batches run at once; the rest waits in a host
buffer for the next call, and `flush` / `result` run the last partial batch padded with zeros
and masked out of every statistic. One batch is in flight while the previous one's logits are
copied to the host; the host waits for each batch before taking the next, so a progress line never
runs ahead of the devices.

`result()` returns `{'num_images', 'fid', 'is_mean', 'is_std', 'precision', 'recall'}`; a metric
is present only when it can be computed: FID with `ref_stats`, IS when `compute_is`, P/R with
`ref_features`. With no more images than feature dimensions (2048) the FID is not meaningful (a
rank-deficient covariance): `fid_warning()` says so, `result()` logs it and reports a value that rounding
made negative as 0. FID takes seconds, precision/recall
O(N^2 D) (minutes for 50k on a CPU); each logs a line first, P/R a progress line.

Multiple processes: every process calls `add_uint8` with its own share of the images, the same
number of times with the same counts (batch_size is global; each process supplies
`batch_size / process_count` rows per batch); or every process calls `add_global_uint8` with the
same full batch (samples fetched to every host) and each feeds its part. Tested on 2 processes
(tests/test_multiprocess.py).

Weights: `load_inception(path)` reads pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
(torch-free), an `.npz` (written by `save_inception_npz`, or torch state-dict names), or an Orbax
directory of `{'params', 'batch_stats'}`.
"""
import functools
import os
import time
from typing import Any, Dict, Iterable, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from ddo_jax import cli, parallel, utils, xla_options
from ddo_jax.metrics import fid as fid_lib
from ddo_jax.metrics import stats as stats_lib
from ddo_jax.nets import inception

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 + INCEPTION_FILENAME)
INCEPTION_ENV = "DDO_JAX_INCEPTION"
FEATURE_DIM = inception.POOL3_DIM
METRIC_KEYS = ("fid", "is_mean", "is_std", "precision", "recall")


# ---------------------------------------------------------------------------------------------
# Weights.


class InceptionWeightsNotFoundError(cli.UserError, FileNotFoundError):
  """The FID Inception weight file is missing; the one-line message says where to get it and how to pass it."""

  def __init__(self, path):
    where = f"at {os.fspath(path)!r}" if path else "(no path given)"
    super().__init__(
        f"FID Inception weights not found {where}", f"--inception or ${INCEPTION_ENV}",
        f"download pytorch-fid's {INCEPTION_FILENAME} from its GitHub release ({INCEPTION_URL}) and pass "
        f"--inception /path/to/{INCEPTION_FILENAME} (launch.evaluate), set {INCEPTION_ENV}, or call "
        f"load_inception('/path/to/{INCEPTION_FILENAME}'); an .npz written by save_inception_npz or an Orbax "
        "folder of {'params', 'batch_stats'} works too, and torch is not needed")


def _nest(flat: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  out: Dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = np.asarray(value)
  return out


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Dict[str, np.ndarray]:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "/"))
    else:
      out[name] = value
  return out


@functools.lru_cache(maxsize=None)
def _expected_shapes() -> Dict[str, Tuple[int, ...]]:
  shapes = jax.eval_shape(inception.InceptionV3().init, jax.random.PRNGKey(0),
                          jnp.zeros((1, inception.FID_INPUT_SIZE, inception.FID_INPUT_SIZE, 3)))
  return {k: tuple(v.shape) for k, v in _flatten(shapes).items()}


def check_inception_variables(variables: Mapping[str, Any], source: str = "variables") -> None:
  """Raises ValueError listing every missing, unexpected or mis-shaped FID Inception variable."""
  given = {k: tuple(np.shape(v)) for k, v in _flatten(variables).items()}
  expected = _expected_shapes()
  missing = [k for k in expected if k not in given]
  unexpected = sorted(k for k in given if k not in expected)
  mismatched = [f"{k}: expected {s}, got {given[k]}" for k, s in expected.items()
                if k in given and given[k] != s]
  if missing or unexpected or mismatched:
    lines = [f"{source}: not the FID InceptionV3 variables:"]
    if missing:
      lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20])
                   + (" ..." if len(missing) > 20 else ""))
    if unexpected:
      lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20])
                   + (" ..." if len(unexpected) > 20 else ""))
    if mismatched:
      lines.append(f"  shape mismatch ({len(mismatched)}): " + "; ".join(mismatched[:20]))
    raise ValueError("\n".join(lines))


def _load_npz_variables(path: str) -> Dict[str, Any]:
  from ddo_jax.convert import inception_names  # pylint: disable=import-outside-toplevel
  with np.load(path, allow_pickle=False) as f:
    flat = {k: f[k] for k in f.files}
  if flat and all("/" not in k for k in flat):  # torch state-dict names ('fc.weight', ...)
    return inception_names.inception_variables_from_state_dict(flat)
  return _nest(flat)


def load_inception(path=None) -> Dict[str, Any]:
  """FID Inception variables `{'params', 'batch_stats'}` (numpy float32) from a file or directory.

  Args:
    path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or any `torch.save` /
      `.safetensors` of that state dict), an `.npz` (flax paths joined by '/' as written by
      `save_inception_npz`, or torch state-dict names), or an Orbax checkpoint directory. None
      reads the environment variable `DDO_JAX_INCEPTION`.

  Returns:
    Variables for `ddo_jax.nets.inception.InceptionV3`.

  Raises:
    InceptionWeightsNotFoundError: the path is missing (the message says where to download the
      file and how to pass it).
    ValueError: the file does not hold the FID Inception (every problem listed).
  """
  if path is None:
    path = os.environ.get(INCEPTION_ENV)
  if not path or not os.path.exists(path):
    raise InceptionWeightsNotFoundError(path)
  path = os.fspath(path)
  if os.path.isdir(path):
    from ddo_jax import tree_io  # pylint: disable=import-outside-toplevel
    variables = jax.tree_util.tree_map(np.asarray, tree_io.load_tree(path))
  elif path.lower().endswith(".npz"):
    variables = _load_npz_variables(path)
  else:
    from ddo_jax.convert import inception_names  # pylint: disable=import-outside-toplevel
    variables = inception_names.load_pytorch_fid_weights(path)
  variables = {k: variables[k] for k in variables}
  check_inception_variables(variables, source=path)
  return jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), variables)


def save_inception_npz(variables: Mapping[str, Any], path) -> None:
  """Writes the variables as an `.npz` of '/'-joined flax paths (atomic), for `load_inception`."""
  check_inception_variables(variables)
  utils.atomic_savez(path, **{k: np.asarray(v) for k, v in _flatten(variables).items()})


# ---------------------------------------------------------------------------------------------
# The sharded feature function.


@functools.lru_cache(maxsize=None)
def _feature_fn(model: inception.InceptionV3, mesh: Mesh):
  """Jitted `(variables, uint8 images) -> {'pool3', 'logits_unbiased'}`, batch over the mesh."""

  def fn(variables, images):
    out = model.apply(variables, inception.uint8_to_unit(images))
    return {"pool3": out["pool3"], "logits_unbiased": out["logits_unbiased"]}

  return jax.jit(fn, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.batch_sharding(mesh), compiler_options=xla_options.compiler_options(mesh))


@functools.lru_cache(maxsize=None)
def _flat_mesh(mesh: Mesh) -> Mesh:
  """The mesh's devices as one axis 'batch', in the order `P(('data', 'fsdp'))` splits a batch."""
  return Mesh(np.asarray(mesh.devices).reshape(-1), ("batch",))


def _default_stats_on_device() -> bool:
  return jax.default_backend() != "tpu"  # TPUs have no float64


def _check_images(images) -> np.ndarray:
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"expected uint8 NHWC images with 3 channels, got shape {images.shape}")
  if images.dtype != np.uint8:
    raise ValueError(f"expected uint8 images (EDM: clip(x * 127.5 + 128, 0, 255).astype(uint8)), "
                     f"got {images.dtype}")
  return images


class Evaluator:
  """Streaming FID / IS / precision-recall over a device mesh (see the module docstring).

  Attributes:
    mesh: the device mesh; the batch is split over its axes `('data', 'fsdp')`.
    batch_size: global batch size of one Inception call (divisible by the number of devices).
    ref_stats: reference `(mu, sigma)` for FID, or None.
    ref_features: reference pool3 features [K, 2048] for precision/recall, or None.
  """

  def __init__(self, inception_variables: Mapping[str, Any], mesh: Optional[Mesh] = None,
               batch_size: int = 64, *, ref_stats: Optional[Tuple[Any, Any]] = None,
               ref_features: Optional[Any] = None, compute_is: bool = True,
               num_is_splits: int = 10, keep_features: Optional[int] = None,
               stats_on_device: Optional[bool] = None,
               model: Optional[inception.InceptionV3] = None,
               pr_kwargs: Optional[Mapping[str, Any]] = None):
    """Places the variables on the mesh and prepares empty accumulators.

    Args:
      inception_variables: `{'params', 'batch_stats'}` of `InceptionV3` (`load_inception`).
      mesh: device mesh; default `parallel.make_mesh()` (all devices on 'data').
      batch_size: global images per Inception call; must be divisible by the mesh's batch shards
        (and the process count).
      ref_stats: `(mu [2048], sigma [2048, 2048])` of the reference set, for FID.
      ref_features: [K, 2048] reference pool3 features, for precision/recall.
      compute_is: keep logits and report the Inception Score.
      num_is_splits: IS splits (10 as improved-gan / OpenAI / torch-fidelity).
      keep_features: how many generated pool3 vectors (the first ones) to keep on the host;
        default all when `ref_features` is given, else none.
      stats_on_device: accumulate the float64 statistics on the devices (default: yes unless
        the backend is TPU).
      model: the Inception module; default `InceptionV3()` (pytorch-fid resize).
      pr_kwargs: extra arguments of `fid.precision_recall` (`k`, `distance_dtype`, ...).
    """
    self.mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_batch_divisible(batch_size, self.mesh, "evaluator batch_size")
    self.batch_size = int(batch_size)
    self.local_batch = self.batch_size // jax.process_count()
    self.model = inception.InceptionV3() if model is None else model
    self.ref_stats = None if ref_stats is None else tuple(np.asarray(a, np.float64)
                                                          for a in ref_stats)
    self.ref_features = None if ref_features is None else np.asarray(ref_features, np.float32)
    if self.ref_features is not None and (self.ref_features.ndim != 2
                                          or self.ref_features.shape[1] != FEATURE_DIM):
      raise ValueError(f"ref_features must be [K, {FEATURE_DIM}], got {self.ref_features.shape}")
    self.compute_is = compute_is
    self.num_is_splits = num_is_splits
    if keep_features is None:
      keep_features = -1 if self.ref_features is not None else 0
    self.keep_features = keep_features  # -1 = all
    self.stats_on_device = (_default_stats_on_device() if stats_on_device is None
                            else stats_on_device)
    self.pr_kwargs = dict(pr_kwargs or {})
    self._fn = _feature_fn(self.model, self.mesh)
    self._variables = jax.device_put(inception_variables, parallel.replicated(self.mesh))
    self.reset()

  # -- state ----------------------------------------------------------------------------------

  def reset(self) -> None:
    """Forgets every image seen (keeps the weights, the compiled function and the references)."""
    if self.stats_on_device:
      self._stats = stats_lib.init_sharded(FEATURE_DIM, _flat_mesh(self.mesh))
    else:
      self._stats = stats_lib.init_stats(FEATURE_DIM)
    self._buffer = []  # host images waiting for a full batch
    self._buffered = 0
    self._pending = None  # (outputs, global mask) of the batch in flight
    self._logits = []
    self._features = []
    self._num_features = 0
    self.num_added = 0  # images this process passed to add_uint8

  @property
  def _features_wanted(self) -> int:
    if self.keep_features < 0:
      return np.iinfo(np.int64).max
    return self.keep_features - self._num_features

  # -- feeding --------------------------------------------------------------------------------

  def add_uint8(self, images) -> None:
    """Adds uint8 NHWC images [N, H, W, 3] (numpy or jax; this process's share).

    Full batches are computed now; the remainder is buffered until the next call, `flush` or
    `result`. A batch of a different H x W first flushes the buffer (padded).
    """
    images = _check_images(images)
    if self._buffer and self._buffer[0].shape[1:] != images.shape[1:]:
      self.flush()
    self.num_added += images.shape[0]
    start = 0
    if self._buffered:
      take = min(self.local_batch - self._buffered, images.shape[0])
      self._buffer.append(images[:take])
      self._buffered += take
      start = take
      if self._buffered == self.local_batch:
        self._run(np.concatenate(self._buffer))
        self._buffer, self._buffered = [], 0
    while images.shape[0] - start >= self.local_batch:
      self._run(images[start:start + self.local_batch])
      start += self.local_batch
    if start < images.shape[0]:
      self._buffer.append(images[start:])
      self._buffered += images.shape[0] - start

  def add_global_uint8(self, images) -> None:
    """Adds uint8 NHWC images that every process holds in full (the same rows everywhere, e.g. samples
    fetched with `parallel.to_host`): each process feeds only its part of each global batch, so every
    image counts once whatever the process count. With one process this is `add_uint8`.

    Every process must call this with the same images at the same time.
    """
    images = _check_images(images)
    if jax.process_count() == 1:
      self.add_uint8(images)
      return
    if self._buffered:   # a partial local buffer would put the processes' batches out of step
      self.flush()
    p = jax.process_index()
    for start in range(0, images.shape[0], self.batch_size):
      mine = images[start:start + self.batch_size][p * self.local_batch:(p + 1) * self.local_batch]
      self.num_added += mine.shape[0]
      self._run(mine)

  def flush(self) -> None:
    """Runs the buffered partial batch (zero-padded, masked) and drains the batch in flight."""
    if self._buffered:
      self._run(np.concatenate(self._buffer))
      self._buffer, self._buffered = [], 0
    self._drain()

  def _run(self, local_images: np.ndarray) -> None:
    """Launches one global batch; this process supplies `local_images` (<= local_batch rows)."""
    n = local_images.shape[0]
    mask = np.zeros((self.local_batch,), np.float32)
    mask[:n] = 1.0
    if n < self.local_batch:
      pad = np.zeros((self.local_batch - n,) + local_images.shape[1:], np.uint8)
      local_images = np.concatenate([local_images, pad])
    images, mask = parallel.global_batch((local_images, mask), self.mesh)
    out = self._fn(self._variables, images)
    if self.stats_on_device:
      self._stats = stats_lib.sharded_update(self._stats, out["pool3"], _flat_mesh(self.mesh),
                                             "batch", mask)
    self._drain()  # the previous batch's host work overlaps this batch's compute
    self._pending = (out, mask)

  def _drain(self) -> None:
    """Host side of the batch in flight: host statistics, logits, kept features."""
    if self._pending is None:
      return
    out, mask = self._pending
    self._pending = None
    # Wait for this batch even when nothing of it is fetched (FID-only on the devices): dispatch is
    # asynchronous, so otherwise a feeding loop runs ahead of the devices and its progress line says
    # 100% while minutes of queued work remain.
    jax.block_until_ready(out["pool3"])
    need_pool3 = not self.stats_on_device or self._features_wanted > 0
    fetch = {"mask": mask}
    if need_pool3:
      fetch["pool3"] = out["pool3"]
    if self.compute_is:
      fetch["logits"] = out["logits_unbiased"]
    host = parallel.to_host(fetch)
    valid = host["mask"] > 0
    if need_pool3:
      pool3 = host["pool3"][valid]
      if not self.stats_on_device:
        self._stats = stats_lib.update(self._stats, pool3)
      keep = pool3[:self._features_wanted]
      if keep.shape[0]:
        self._features.append(np.asarray(keep, np.float32))
        self._num_features += keep.shape[0]
    if self.compute_is:
      self._logits.append(np.asarray(host["logits"][valid], np.float32))

  # -- results --------------------------------------------------------------------------------

  def feature_stats(self) -> stats_lib.FeatureStats:
    """Host float64 `FeatureStats` of every image added so far (flushes first)."""
    self.flush()
    return stats_lib.to_host(self._stats)

  @property
  def num_images(self) -> int:
    """Images whose features are in the statistics (all processes; flushes first)."""
    return int(self.feature_stats().count)

  def statistics(self) -> Tuple[np.ndarray, np.ndarray]:
    """(mu [2048], sigma [2048, 2048]) float64 of the pool3 features (EDM's formula)."""
    return stats_lib.mean_cov(self.feature_stats())

  def logits(self) -> np.ndarray:
    """Unbiased 1008-way logits [N, 1008] (float32) of every image, in order."""
    self.flush()
    if not self._logits:
      return np.zeros((0, inception.NUM_CLASSES), np.float32)
    return np.concatenate(self._logits)

  def features(self) -> np.ndarray:
    """The kept pool3 features [M, 2048] (float32), the first M images in order."""
    self.flush()
    if not self._features:
      return np.zeros((0, FEATURE_DIM), np.float32)
    return np.concatenate(self._features)

  def fid_warning(self) -> Optional[str]:
    """Why the FID of the images added so far is not meaningful (too few images), or None."""
    if self.ref_stats is None:
      return None
    return fid_lib.fid_warning(self.num_images, FEATURE_DIM)

  def result(self) -> Dict[str, Any]:
    """`{'num_images', 'fid', 'is_mean', 'is_std', 'precision', 'recall'}` (computable ones).

    FID needs `ref_stats`, IS `compute_is` and at least `num_is_splits` images, P/R
    `ref_features` and kept features. Python numbers only. FID (`fid.frechet_distance`: a float64
    Cholesky factorization and eigenvalues of 2048 x 2048 matrices, seconds on a CPU) is not meaningful
    with no more images than feature dimensions (a singular covariance): then `fid_warning()` says so,
    the warning is logged, and a value that rounding made negative is reported as 0. Each step that may
    take more than a few seconds logs a line first.
    """
    stats = self.feature_stats()
    out: Dict[str, Any] = {"num_images": int(stats.count)}
    if self.ref_stats is not None:
      t0 = time.time()
      utils.log.info("computing FID (%d images, %d-d features)...", out["num_images"], FEATURE_DIM)
      record = fid_lib.fid_record(stats_lib.mean_cov(stats), self.ref_stats, out["num_images"])
      out["fid"] = record["fid"]
      utils.log.info("FID %.6g (%.1f s)", out["fid"], time.time() - t0)
      if "fid_warning" in record:
        utils.log.warning("%s", record["fid_warning"])
    if self.compute_is:
      logits = self.logits()
      if logits.shape[0] < self.num_is_splits:
        raise ValueError(f"Inception Score with {self.num_is_splits} splits needs at least "
                         f"{self.num_is_splits} images, got {logits.shape[0]} (lower num_is_splits)")
      out["is_mean"], out["is_std"] = fid_lib.inception_score(logits, self.num_is_splits)
    if self.ref_features is not None:
      out["precision"], out["recall"] = fid_lib.precision_recall(
          self.ref_features, self.features(), **{"log_progress": True, **self.pr_kwargs})
    return out


# ---------------------------------------------------------------------------------------------
# Driving an evaluator from an iterator of batches.


def feed(evaluator: Evaluator, batches: Iterable[Any], total: Optional[int] = None,
         max_images: Optional[int] = None, what: str = "inception", every: float = 10.0,
         replicated: bool = False) -> int:
  """Adds uint8 batches to `evaluator` until the iterator ends or `max_images` were added.

  Logs a progress line (count, rate, ETA) at most every `every` seconds (process 0 only).

  Args:
    evaluator: the `Evaluator`.
    batches: iterable of uint8 NHWC arrays (any sizes).
    total: expected number of images for the ETA (default `max_images`).
    max_images: stop after this many images (the last batch is cut).
    what: label of the progress line.
    every: seconds between progress lines.
    replicated: every process holds the same full batches (samples fetched to every host): each
      feeds only its part (`Evaluator.add_global_uint8`); otherwise each holds its own share.

  Returns:
    The number of images added.
  """
  total = total if total is not None else max_images
  progress = utils.Progress(what, total or 0, unit="img", every=every)
  done = 0
  for batch in batches:
    if max_images is not None:
      batch = batch[:max_images - done]
    (evaluator.add_global_uint8 if replicated else evaluator.add_uint8)(batch)
    done += int(np.shape(batch)[0])
    if jax.process_index() == 0 and total and done < total:
      progress.update(done)
    if max_images is not None and done >= max_images:
      break
  evaluator.flush()
  if jax.process_index() == 0 and total:
    progress.update(done, force=True)
  return done


def evaluate_images(images_iter: Iterable[Any], inception_variables: Mapping[str, Any],
                    mesh: Optional[Mesh] = None, batch_size: int = 64, *,
                    ref_stats: Optional[Tuple[Any, Any]] = None,
                    ref_features: Optional[Any] = None, total: Optional[int] = None,
                    max_images: Optional[int] = None, **evaluator_kwargs) -> Dict[str, Any]:
  """One-shot metrics of uint8 image batches; see `Evaluator` for the arguments and result."""
  evaluator = Evaluator(inception_variables, mesh, batch_size, ref_stats=ref_stats,
                        ref_features=ref_features, **evaluator_kwargs)
  feed(evaluator, images_iter, total=total, max_images=max_images)
  return evaluator.result()
