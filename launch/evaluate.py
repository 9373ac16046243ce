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

Checkpoint mode (instead of `--images`): sample a model folder (EDM, EDM2 or VAR: `launch.convert edm` / `edm2`
/ `var`, or a DDO round folder) and evaluate the samples without writing them: `--model DIR --num N` with the
sampling flags of launch.sample (its docstring lists each family's): EDM `[--steps 18] [--S_churn]
[--float64]`; EDM2 `[--sampler heun|dpmv3] [--steps] [--guide DIR --guidance G] [--vae DIR (latent models)]
[--float64]`; VAR `[--cfg 1.0] [--cfg_convention one_plus_w|var] [--top_k] [--top_p] [--more_smooth] --vae DIR`
(the VQVAE; DDO's protocol: 50k balanced seeds, --cfg 1.0 guidance-free, 1.4 guided, against
VIRTUAL_imagenet256_labeled.npz). --labels defaults to balanced here (strict class balance, the FID protocol of EDM2 and the
tool's default before; EDM: seed mod classes; EDM2: position mod classes, the same for seeds 0..N-1).
Seeds 0..N-1 draw the images launch.sample draws for them. `build_sampler` turns the folder
(`ddo_jax.families.load_model_dir`) into a callable `sampler(num_images)` yielding uint8 NHWC batches
(never more images than asked, up to a multiple of the device count) and
`ddo_jax.metrics.evaluate.evaluate_sampler` feeds it to the evaluator. EDM2 on ImageNet:
`--ref img64.pkl` / `img512.pkl` (EDM2's dataset-refs) with the same Inception network as EDM.

The work itself is in the library: image sources in `ddo_jax.data.images`, reference files in
`ddo_jax.metrics.reference`, the procedures in `ddo_jax.metrics.evaluate`. FID needs more images than
feature dimensions (2048): with fewer, the result carries `fid_warning` (a singular covariance).
A mistake (a missing file, a bad flag value) is one line `error: ...` with exit code 2; --debug shows the
traceback.
"""
import json
import os
import time
from typing import Callable, Iterable

from absl import flags
import numpy as np

from ddo_jax import cli, compile_cache
from ddo_jax.data.images import open_images
from ddo_jax.metrics.reference import parse_metrics

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
_MODEL = flags.DEFINE_string("model", None, "checkpoint mode, instead of --images: a converted EDM or EDM2 "
                             "folder or a DDO round folder; --num samples (seeds 0..num-1) go straight into the "
                             "feature accumulator, no image is written")
_STEPS = flags.DEFINE_integer("steps", None, "checkpoint mode: sampler steps; default: the family's (EDM 18 = 35 "
                              "NFE; EDM2 heun 32, dpmv3 25)")
_LABELS = flags.DEFINE_enum("labels", "balanced", ["random", "balanced"],
                            "checkpoint mode: strict class balance (EDM: seed mod classes; EDM2: position mod "
                            "classes) or random labels")
_FLOAT64 = flags.DEFINE_bool("float64", None, "checkpoint mode: float64 sampler arithmetic (default: the family's)")
_CHURN = flags.DEFINE_float("S_churn", None, "checkpoint mode: Heun stochasticity (default 0)")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["heun", "dpmv3"], "checkpoint mode, EDM2: Heun (default) or "
                             "DPM-Solver-v3")
_GUIDANCE = flags.DEFINE_float("guidance", None, "checkpoint mode, EDM2: autoguidance weight (1 = none); needs --guide")
_GUIDE = flags.DEFINE_string("guide", None, "checkpoint mode, EDM2: guide net folder (launch.convert edm2)")
_VAE = flags.DEFINE_string("vae", None, "checkpoint mode, EDM2 latent models: SD-VAE folder (launch.convert sd-vae)")
_CFG = flags.DEFINE_float("cfg", None, "checkpoint mode, VAR only: classifier-free guidance scale")
_CFG_CONVENTION = flags.DEFINE_string("cfg_convention", None, "checkpoint mode, VAR only: cfg convention")
_TOP_K = flags.DEFINE_integer("top_k", None, "checkpoint mode, VAR only: top-k sampling (0 = off)")
_TOP_P = flags.DEFINE_float("top_p", None, "checkpoint mode, VAR only: top-p sampling (0 = off)")
_MORE_SMOOTH = flags.DEFINE_bool("more_smooth", None, "checkpoint mode, VAR only: Gumbel-softmax smoothing")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", None, compile_cache.FLAG_HELP)


def build_sampler(checkpoint: str, batch_size: int, mesh, *, labels: str = "balanced",
                  **options) -> Callable[[int], Iterable[np.ndarray]]:
  """A model folder + sampling options -> `sampler(num)` yielding uint8 batches for seeds 0..num-1.

  The folder is opened by `ddo_jax.families.load_model_dir(checkpoint, labels=labels, **options)` (options:
  num_steps, S_churn, float64, sampler, guidance, guide, vae, ...; None = the family's default). Seed s is
  sampled at list position s, with the same key as in launch.sample. Calls hold `batch_size` seeds; the last
  holds what is left, padded only to a multiple of the device count (`ddo_jax.data.images.sample_batches`).
  """
  from ddo_jax import families, utils  # pylint: disable=import-outside-toplevel
  from ddo_jax.data import images  # pylint: disable=import-outside-toplevel
  family, params = families.load_model_dir(checkpoint, labels=labels, **options)
  run = family.image_sampler(params, mesh)
  multiple = images.device_multiple(mesh)

  def sampler(num: int):
    shapes = set()
    for chunk, ids in images.sample_batches(range(num), batch_size, multiple):
      if len(ids) not in shapes:
        utils.log.info("compiling the sampler (%s)...", "first batch" if not shapes else f"batch of {len(ids)}")
        shapes.add(len(ids))
      made, _ = run(ids, ids)   # seeds 0..num-1: each seed's position is the seed itself
      yield made[:len(chunk)]

  return sampler


def sampling_options() -> dict:
  """The checkpoint-mode sampling flags, as `build_sampler` takes them (None: not given)."""
  return dict(labels=_LABELS.value, num_steps=_STEPS.value, S_churn=_CHURN.value, float64=_FLOAT64.value,
              guidance=_GUIDANCE.value, guide=_GUIDE.value, sampler=_SAMPLER.value, vae=_VAE.value,
              cfg=_CFG.value, cfg_convention=_CFG_CONVENTION.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
              more_smooth=_MORE_SMOOTH.value)


def _check_flags() -> None:
  """The one-line errors that need no JAX: flags that contradict each other, paths that do not exist."""
  if bool(_IMAGES.value) == bool(_MODEL.value):
    raise cli.UserError("give exactly one of --images and --model", "--images/--model",
                        "--images a folder, .zip, .npz or .npy; or --model a checkpoint folder with --num N")
  if _MODEL.value and _MAKE_REF.value:
    raise cli.UserError("--make_ref takes --images, not --model", "--make_ref", "pass --images DATASET")
  if _MAKE_REF.value and not _OUT.value:
    raise cli.UserError("--make_ref needs an output file", "--out", "pass --out REF.npz")
  if _MODEL.value:
    if not os.path.isfile(os.path.join(_MODEL.value, "model.json")):
      raise cli.UserError(f"{_MODEL.value} has no model.json", "--model",
                          "give a folder written by `python -m launch.convert edm` (or edm2) or a round folder of "
                          "a DDO run")
    if _NUM.value <= 0:
      raise cli.UserError("--model needs the number of samples to generate", "--num", "pass --num N, e.g. 50000")
  if _NUM.value < 0:
    raise cli.UserError(f"negative --num {_NUM.value}", "--num", "pass a count, or 0 for all images")
  if _BATCH.value < 0:
    raise cli.UserError(f"negative batch size {_BATCH.value}", "--batch_size",
                        "pass a multiple of the device count, or 0 for 32 per device")
  if _IS_SPLITS.value < 1:
    raise cli.UserError(f"--is_splits {_IS_SPLITS.value} is not positive", "--is_splits", "pass e.g. 10")
  if _STEPS.value is not None and _STEPS.value < 1:
    raise cli.UserError(f"--steps {_STEPS.value} is not positive", "--steps", "pass e.g. 18 (35 NFE)")
  if not _MODEL.value:
    for flag in (_STEPS, _FLOAT64, _CHURN, _SAMPLER, _GUIDANCE, _GUIDE, _VAE, _CFG, _CFG_CONVENTION, _TOP_K, _TOP_P,
                 _MORE_SMOOTH):
      if flag.value is not None:
        raise cli.UserError(f"--{flag.name} is a checkpoint-mode flag", f"--{flag.name}",
                            "use it with --model DIR, or drop it")
  if _OUT.value and os.path.isdir(_OUT.value):
    raise cli.UserError(f"{_OUT.value} is a folder", "--out", "give a file name")
  if _IMAGES.value and not _IMAGES.value.startswith("tfds:") and not os.path.exists(_IMAGES.value):
    raise cli.UserError(f"{_IMAGES.value} does not exist", "--images",
                        "give a folder of images, an EDM dataset .zip, an .npz/.npy of uint8 images, or tfds:cifar10")
  if _REF.value and not os.path.isfile(_REF.value):
    raise cli.UserError(f"{_REF.value} does not exist" if not os.path.exists(_REF.value) else
                        f"{_REF.value} is not a file", "--ref",
                        "give EDM's or OpenAI's reference .npz or an EDM2 .pkl, or make one with --make_ref")


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}", "command line", "flags are --name=value; see --help")
  _check_flags()
  from ddo_jax import parallel, utils  # pylint: disable=import-outside-toplevel
  parallel.maybe_initialize_distributed()
  compile_cache.enable(_COMPILE_CACHE.value)
  import jax  # pylint: disable=import-outside-toplevel
  from ddo_jax.data import images  # pylint: disable=import-outside-toplevel
  from ddo_jax.metrics import evaluate, evaluator  # pylint: disable=import-outside-toplevel
  utils.setup_logging()
  t0 = time.time()
  names = [] if _MAKE_REF.value else parse_metrics(_METRICS.value, _REF.value)
  variables = evaluator.load_inception(_INCEPTION.value)
  mesh = parallel.make_mesh()
  multiple = images.device_multiple(mesh)
  batch_size = _BATCH.value or 32 * multiple
  images.check_batch_size(batch_size, multiple)
  if _MAKE_REF.value:
    source = open_images(_IMAGES.value, _IMAGES_KEY.value, _WORKERS.value)
    record = evaluate.make_reference(source, variables, mesh, batch_size, _OUT.value, num=_NUM.value,
                                     keep_features=_REF_FEATURES.value)
  else:
    source = None if _MODEL.value else open_images(_IMAGES.value, _IMAGES_KEY.value, _WORKERS.value)
    if source is not None:
      images.count_images(source, _NUM.value)   # fail now, before the reference is read
    ev = evaluate.make_evaluator(variables, mesh, batch_size, names, _REF.value, is_splits=_IS_SPLITS.value,
                                 pr_distance=_PR_DISTANCE.value)
    if _MODEL.value:
      sampler = build_sampler(_MODEL.value, batch_size, mesh, **sampling_options())
      record = evaluate.evaluate_sampler(sampler, _NUM.value, ev)
    else:
      record = evaluate.evaluate_source(ev, source, _NUM.value)
  record.update(images=_IMAGES.value, model=_MODEL.value, ref=_REF.value, inception=_INCEPTION.value,
                batch_size=batch_size, num_devices=mesh.size, seconds=round(time.time() - t0, 1))
  for key in evaluator.METRIC_KEYS:
    if key in record:
      utils.log.info("%s %.6g", key, record[key])
  print(json.dumps(record, sort_keys=True, default=float))
  if _OUT.value and not _MAKE_REF.value and jax.process_index() == 0:
    utils.atomic_write_json(_OUT.value, record)


if __name__ == "__main__":
  cli.run(main, doc=__doc__)
