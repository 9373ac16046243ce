"""Sample images from a converted or DDO-trained EDM model with EDM's Heun sampler.

  python -m launch.sample --model ckpt/edm-cifar10-cond --seeds 0-49999 --outdir samples/cond --npz
  python -m launch.sample --model runs/edm_cond/round_016 --seeds 0-63 --outdir grid --labels balanced

--model is a folder written by `launch.convert edm` (params/ + model.json) or a round folder of a DDO run
(chosen/ + model.json). Seed s draws its latents (and its random label) from
fold_in(jax.random.key(0), s) (`ddo_jax.sampling.seeded`), so an
image depends only on its seed, not on the batch size or the number of devices (up to the float32
rounding of the network, which XLA may order differently for another batch shape: a rare uint8 pixel
can differ by one). PNGs go to
OUTDIR/<first seed of its thousand>/<seed>.png (EDM's layout); seeds whose PNG exists and decodes are
skipped, so an interrupted run resumes (a PNG truncated by a kill is made again). --npz also writes
OUTDIR/samples.npz (uint8 NHWC `arr_0`, int `labels`: the class each image was sampled with, -1 when
unconditional, `seeds`).

Each sampler call holds --batch_size seeds, except the last, which holds what is left: no call makes more
images than asked, beyond rounding up to a multiple of the device count. A progress line (rate, ETA)
follows every call; the first call includes compiling the sampler.

OUTDIR/sample_settings.json records what made the images (the model's path, the sha256 of its model.json
and of its parameters' checksums, labels, float64, the sampler's settings such as its steps, the seed
lists); it is written before the first image, and a rerun whose settings would make other images is
refused (use another --outdir or delete it). Mistakes are one line `error: ...` with exit code 2; --debug
shows the traceback.
"""
import hashlib
import json
import pathlib
import re

from absl import flags

from ddo_jax import cli, compile_cache

_MODEL = flags.DEFINE_string("model", None, "converted model folder or a DDO round folder")
_SEEDS = flags.DEFINE_string("seeds", "0-63", "seeds: an inclusive range 'a-b' (0-49999) or a comma list (1,2,5-9)")
_OUTDIR = flags.DEFINE_string("outdir", None, "output folder")
_BATCH = flags.DEFINE_integer("batch_size", 256, "images per sampler call (global, over all devices; the last "
                              "call makes only what is left)")
_STEPS = flags.DEFINE_integer("steps", 18, "Heun steps (18 = EDM's 35 NFE for CIFAR-10)")
_LABELS = flags.DEFINE_enum("labels", "random", ["random", "balanced"],
                            "random labels (EDM's generate.py) or strict balance: seed mod label_dim")
_FLOAT64 = flags.DEFINE_bool("float64", False, "float64 sampler arithmetic (EDM's protocol); net stays float32")
_CHURN = flags.DEFINE_float("S_churn", 0.0, "stochasticity of the Heun sampler")
_NPZ = flags.DEFINE_bool("npz", False, "also write OUTDIR/samples.npz with all requested seeds")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", None, compile_cache.FLAG_HELP)
flags.mark_flags_as_required(["model", "outdir"])

SEEDS_FORM = "use an inclusive range such as 0-49999, or a comma list such as 1,2,5-9"


def parse_seeds(text: str) -> list:
  """'0-49999' or '1,2,5-9' -> the list of seeds (a range is inclusive); a one-line error otherwise."""
  seeds = []
  for part in text.split(","):
    part = part.strip()
    m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if m is None:
      raise cli.UserError(f"cannot read {part!r} in {text!r} as a seed or a range", "--seeds", SEEDS_FORM)
    a, b = int(m.group(1)), int(m.group(2) if m.group(2) is not None else m.group(1))
    if b < a:
      raise cli.UserError(f"the range {part!r} ends before it starts", "--seeds", SEEDS_FORM)
    if b >= 2 ** 31:
      raise cli.UserError(f"seed {b} does not fit in int32", "--seeds", "use seeds below 2147483648")
    seeds.extend(range(a, b + 1))
  return seeds


def _check_flags() -> list:
  """The one-line errors that need no JAX; returns the seeds."""
  seeds = parse_seeds(_SEEDS.value)
  if _BATCH.value <= 0:
    raise cli.UserError(f"batch size {_BATCH.value} is not positive", "--batch_size",
                        "give a positive multiple of the device count, e.g. 256")
  if _STEPS.value < 1:
    raise cli.UserError(f"--steps {_STEPS.value} is not positive", "--steps", "pass e.g. 18 (35 NFE)")
  if _CHURN.value < 0:
    raise cli.UserError(f"--S_churn {_CHURN.value} is negative", "--S_churn", "pass 0 (deterministic) or more")
  outdir = pathlib.Path(_OUTDIR.value)
  if outdir.exists() and not outdir.is_dir():
    raise cli.UserError(f"{outdir} exists and is not a folder", "--outdir", "give a folder path (created if new)")
  if not (pathlib.Path(_MODEL.value) / "model.json").is_file():
    raise cli.UserError(f"{_MODEL.value} has no model.json", "--model",
                        "give a folder written by `python -m launch.convert edm` or a round folder of a DDO run")
  return seeds


def settings_of(family, params, model_dir) -> dict:
  """What makes the images of this run (see the module docstring); all but 'model' must match on a rerun."""
  from ddo_jax import tree_io  # pylint: disable=import-outside-toplevel
  from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
  model_dir = pathlib.Path(model_dir)
  return {
      "model": str(model_dir.absolute()),
      "model_json_sha256": hashlib.sha256((model_dir / "model.json").read_bytes()).hexdigest(),
      # sha256 of the per-leaf checksums (tree_io.tree_checksum: dtype, shape, crc32 of the bytes).
      "params_checksum": hashlib.sha256(json.dumps(tree_io.tree_checksum(params), sort_keys=True).encode()
                                        ).hexdigest(),
      "image_shape": list(family.sample_shape),
      "label_dim": family.label_dim,
      "labels": _LABELS.value if family.label_dim else None,
      "float64": _FLOAT64.value,
      "base_seed": seeded.CLI_BASE_SEED,
      **{f"sampler.{k}": v for k, v in family.config.sampler.to_dict().items()},   # num_steps, S_churn, ...
  }


def seed_label_fn(family, float64: bool):
  """`labels(seeds)`: the class each seed is sampled with (-1 for unconditional models), the sampler's own
  function of the seed's key, run in the sampler's precision mode (under float64 the random labels are
  drawn as int64, and differ from those of float32 mode)."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
  if not family.label_dim:
    return lambda seeds: np.full(len(seeds), -1, np.int64)
  fn = jax.jit(lambda base, s: jax.numpy.argmax(family.labels_for(seeded.seed_keys(base, s), s), axis=-1))

  def labels(seeds):
    with jax.enable_x64(float64):
      return np.asarray(fn(jax.random.key(seeded.CLI_BASE_SEED), np.asarray(seeds, np.int32)), np.int64)

  return labels


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}", "command line", "flags are --name=value; see --help")
  seeds = _check_flags()
  from ddo_jax.parallel import maybe_initialize_distributed  # pylint: disable=import-outside-toplevel
  maybe_initialize_distributed()
  compile_cache.enable(_COMPILE_CACHE.value)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ddo_jax import parallel, utils  # pylint: disable=import-outside-toplevel
  from ddo_jax.data import images  # pylint: disable=import-outside-toplevel
  from ddo_jax.families.edm import load_model_dir, to_uint8  # pylint: disable=import-outside-toplevel
  from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel

  utils.setup_logging()
  outdir = pathlib.Path(_OUTDIR.value)
  mesh = parallel.make_mesh()
  multiple = images.device_multiple(mesh)
  images.check_batch_size(_BATCH.value, multiple)
  family, params = load_model_dir(_MODEL.value, labels=_LABELS.value, num_steps=_STEPS.value,
                                  S_churn=_CHURN.value)
  writer = jax.process_index() == 0
  images.check_settings(outdir, settings_of(family, params, _MODEL.value), _SEEDS.value, write=writer)
  todo = images.pending_seeds(outdir, seeds, family.sample_shape)
  broken = sum(images.png_path(outdir, s).exists() for s in todo)
  parallel.barrier("sample-start")
  unique = len(set(seeds))
  utils.log.info("%d seeds requested, %d already written, %d to generate", unique, unique - len(todo), len(todo))
  if broken:
    utils.log.warning("%d existing PNGs do not decode (truncated by a killed run?): making them again", broken)

  sharding = parallel.batch_sharding(mesh)
  params = jax.device_put(params, parallel.replicated(mesh))
  sample_fn = seeded.make_seeded_sampler(family.sample_float64 if _FLOAT64.value else family.sample, mesh,
                                         parallel.replicated(mesh))
  base = jax.random.key(seeded.CLI_BASE_SEED)
  seed_labels = seed_label_fn(family, _FLOAT64.value)
  plan = list(images.sample_batches(todo, _BATCH.value, multiple))
  if plan:
    utils.log.info("sampler calls: %s images (--batch_size %d, batches are multiples of the %d devices)",
                   images.describe_batches([len(ids) for _, ids in plan]), _BATCH.value, multiple)
  progress = utils.Progress("sample", len(todo), unit="images", every=0.0)
  done, shapes = 0, set()
  for chunk, ids in plan:
    if len(ids) not in shapes:
      utils.log.info("compiling the sampler (%s)...", "first batch" if not shapes else f"batch of {len(ids)}")
      shapes.add(len(ids))
    with jax.enable_x64(_FLOAT64.value):
      out = parallel.to_host(sample_fn(params, base, jax.device_put(ids, sharding)))
    if _NPZ.value and "label" in out:   # the npz labels (seed_labels) must be those the images were made with
      made = np.argmax(out["label"], axis=-1)[:len(chunk)]
      if not np.array_equal(made, seed_labels(ids)[:len(chunk)]):
        raise RuntimeError(f"labels of seeds {chunk[0]}..{chunk[-1]} differ from seed_labels (a bug)")
    if writer:
      for seed, img in zip(chunk, to_uint8(out["x"])[:len(chunk)]):
        images.write_png(images.png_path(outdir, seed), img)
    done += len(chunk)
    progress.update(done)
  parallel.barrier("sample-done")
  if _NPZ.value and writer:
    arr = images.read_pngs(outdir, seeds)
    labels = seed_labels(seeds)
    utils.atomic_savez(outdir / "samples.npz", arr_0=arr, labels=labels, seeds=np.asarray(seeds))
    utils.log.info("wrote %s (%s)", outdir / "samples.npz", arr.shape)


if __name__ == "__main__":
  cli.run(main, doc=__doc__)
