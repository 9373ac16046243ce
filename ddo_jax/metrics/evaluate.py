"""The procedures of `launch.evaluate`, with plain arguments: metrics of an image set or of a sampler
against a reference, and reference statistics of an image set.

* `make_evaluator`: an `Evaluator` for the metrics asked (`reference.parse_metrics`), with the reference's
  statistics and features read from its file or computed from its images.
* `evaluate_source`: metrics of the first `num` images of an `ImageSource` (`ddo_jax.data.images`).
* `evaluate_sampler`: metrics of `num` samples drawn from a callable `sampler(num)` yielding uint8 batches
  (a checkpoint's sampler, without writing images).
* `make_reference`: mu, sigma (and optionally the first features) of an image set, written as an
  EDM-compatible `.npz`.

Metrics take images, not models: a sampler is any callable, built by the caller (launch.evaluate --model builds
it from any model family through `ddo_jax.families.load_model_dir`; this layer does not import families/).
"""
from typing import Callable, Iterable, Optional, Sequence

import jax
import numpy as np

from ddo_jax.data import images as images_lib
from ddo_jax.metrics import evaluator as evaluator_lib
from ddo_jax.metrics import reference as reference_lib
from ddo_jax.metrics import reference_stats


def features_of(source: images_lib.ImageSource, variables, mesh, batch_size: int, keep: int, what: str):
  """(stats (mu, sigma), features [<= keep, 2048]; keep=-1: all) of a whole image source."""
  ev = evaluator_lib.Evaluator(variables, mesh, batch_size, compute_is=False, keep_features=keep)
  evaluator_lib.feed(ev, source.batches(batch_size), total=source.count, what=what)
  return ev.statistics(), ev.features()


def make_evaluator(variables, mesh, batch_size: int, names: Sequence[str], ref_path: Optional[str], *,
                   is_splits: int = 10, pr_distance: str = "float32") -> evaluator_lib.Evaluator:
  """An `Evaluator` computing `names` (from 'fid', 'is', 'pr') against the reference file `ref_path`.

  A reference without statistics or features gets them from its `arr_0` images (a progress line).
  """
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  ref = None
  if ref_path:
    ref = reference_lib.read_reference(ref_path, "fid" in names, "pr" in names)
    if ref.images is not None:
      keep = -1 if "pr" in names and ref.features is None else 0
      stats, features = features_of(ref.images, variables, mesh, batch_size, keep, "reference")
      if ref.features is None and keep:
        ref = ref._replace(features=features)
      if ref.stats is None:
        ref = ref._replace(stats=stats)
  pr_kwargs = {"distance_dtype": jnp.float16 if pr_distance == "float16" else jnp.float32}
  return evaluator_lib.Evaluator(
      variables, mesh, batch_size,
      ref_stats=ref.stats if ref is not None and "fid" in names else None,
      ref_features=ref.features if ref is not None and "pr" in names else None,
      compute_is="is" in names, num_is_splits=is_splits, pr_kwargs=pr_kwargs)


def _result(evaluator: evaluator_lib.Evaluator) -> dict:
  """`evaluator.result()`, plus `fid_warning` when the FID is not meaningful (too few images)."""
  record = evaluator.result()
  warning = evaluator.fid_warning()
  if warning and "fid" in record:
    record["fid_warning"] = warning
  return record


def evaluate_source(evaluator: evaluator_lib.Evaluator, source: images_lib.ImageSource, num: int = 0) -> dict:
  """Metrics of the first `num` images of `source` (all when 0): `evaluator.result()`, plus `fid_warning`
  (a string) when there are too few images for a meaningful FID."""
  n = images_lib.count_images(source, num)
  evaluator_lib.feed(evaluator, source.batches(evaluator.batch_size), total=n, max_images=n, what="inception")
  return _result(evaluator)


def evaluate_sampler(sampler: Callable[[int], Iterable[np.ndarray]], num_images: int,
                     evaluator: evaluator_lib.Evaluator) -> dict:
  """Metrics of `num_images` samples drawn from `sampler`, without writing images.

  Args:
    sampler: `sampler(num_images)` yields uint8 NHWC batches (the images as a family decodes them, e.g.
      EDM's `clip(x * 127.5 + 128, 0, 255)`, or an EDM2 latent model's SD-VAE output) totalling at least
      `num_images`; extra rows are cut. With several processes every process yields the same full batches
      (each feeds its part).
    num_images: number of samples to evaluate.
    evaluator: an `Evaluator` with the references set.

  Returns:
    `evaluator.result()`, plus `fid_warning` (a string) when there are too few images for a meaningful FID.
  """
  done = evaluator_lib.feed(evaluator, sampler(num_images), total=num_images, max_images=num_images,
                            what="sample+inception", replicated=True)
  if done < num_images:
    raise ValueError(f"the sampler yielded {done} images, fewer than {num_images}")
  return _result(evaluator)


def make_reference(source: images_lib.ImageSource, variables, mesh, batch_size: int, out: str, *,
                   num: int = 0, keep_features: int = 0) -> dict:
  """Writes mu, sigma (float64, EDM-compatible), `num_images` and the first `keep_features` pool3
  features of the first `num` images of `source` (all when 0) to the `.npz` `out` (process 0)."""
  n = images_lib.count_images(source, num)
  ev = evaluator_lib.Evaluator(variables, mesh, batch_size, compute_is=False, keep_features=keep_features)
  evaluator_lib.feed(ev, source.batches(batch_size), total=n, max_images=n, what="reference")
  mu, sigma = ev.statistics()
  extra = {"num_images": np.int64(ev.num_images)}
  if keep_features:
    extra["features"] = ev.features()
  if jax.process_index() == 0:
    reference_stats.save_stats_npz(out, mu, sigma, **extra)
  return {"num_images": ev.num_images, "out": out,
          "num_features": int(extra["features"].shape[0]) if "features" in extra else 0}
