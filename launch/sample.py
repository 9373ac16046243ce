"""Sample images from a converted or DDO-trained model: EDM (EDM's Heun sampler) or EDM2 (DDO's EDM2_sample.py:
EDM2's Heun sampler or DPM-Solver-v3, autoguidance, class balance, the SD-VAE for latent models).

  python -m launch.sample --model ckpt/edm-cifar10-cond --seeds 0-49999 --outdir samples/cond --npz
  python -m launch.sample --model runs/edm_cond/round_016 --seeds 0-63 --outdir grid --labels balanced
  python -m launch.sample --model ckpt/edm2-img64-s-ddo --seeds 0-49999 --outdir samples/img64
  python -m launch.sample --model ckpt/edm2-img512-l-ddo --vae ckpt/sd-vae-ft-mse --seeds 0-49999 \
      --outdir samples/img512 --guide ckpt/edm2-img512-xs-0134217-0.165 --guidance 1.1 [--sampler dpmv3]
  python -m launch.sample --model ckpt/var-d16-ddo --vae ckpt/vae-ch160v4096z32 --seeds 0-49999 \
      --outdir samples/var_d16 --cfg 1.4 --npz

--model is a folder written by `launch.convert edm` / `launch.convert edm2` (params/ + model.json) or a round
folder of a DDO run (chosen/ + model.json); its model.json names the family (`ddo_jax.families.load_model_dir`).
The sampling flags are the family's (a flag that means nothing for it is refused); unset, each takes the
family's default:
  EDM:  --labels random|balanced (random, EDM's generate.py; balanced = seed mod classes), --steps (18),
        --S_churn (0), --float64 (off).
  EDM2: --sampler heun|dpmv3 (heun), --steps (heun 32 = 63 NFE, dpmv3 25), --labels balanced|random
        (balanced: the seed at position p of the --seeds list gets class p mod classes, DDO's EDM2_sample.py),
        --guidance G with --guide DIR (autoguidance by an EDM2 guide net converted with launch.convert edm2),
        --float64 (off for heun, on for dpmv3, as upstream; --nofloat64 turns it off), --S_churn (heun, 0),
        --vae DIR (latent models only, required there: the SD-VAE converted with launch.convert sd-vae).
  VAR:  --cfg (1.0) with --cfg_convention one_plus_w (default: w = cfg - 1, so DDO's --cfg 1.0 is guidance-free
        and 1.4 guided) or var (public VAR: w = cfg), --top_k / --top_p (0 = off: DDO's FID protocol; its --trick
        is 900 / 0.96), --more_smooth (off), --labels balanced|random (balanced: 50k seeds give 50 per class),
        --vae DIR (the VQVAE converted with launch.convert vqvae; a DDO round folder defaults to its run's).

Seed s draws its noise (and a random label) from fold_in(jax.random.key(0), s) (`ddo_jax.sampling.seeded`), so an
image depends only on its seed (and, for position-balanced labels, its position in the seed list), not on the
batch size or the number of devices (up to the float32 rounding of the network, which XLA may order differently
for another batch shape: a rare uint8 pixel can differ by one). Upstream draws its noise with torch generators,
so the images of a seed differ from upstream's; the label rule is upstream's. PNGs go to
OUTDIR/<first seed of its thousand>/<seed>.png (EDM's layout); seeds whose PNG exists and decodes are
skipped, so an interrupted run resumes (a PNG truncated by a kill is made again). A seed listed twice is made
once, with the label of its first position. --npz also writes OUTDIR/samples.npz (uint8 NHWC `arr_0`, int
`labels`: the class each image was sampled with, -1 when unconditional, `seeds`).

Each sampler call holds --batch_size seeds, except the last, which holds what is left: no call makes more
images than asked, beyond rounding up to a multiple of the device count. A progress line (rate, ETA)
follows every call; the first call includes compiling the sampler.

OUTDIR/sample_settings.json records what made the images (the model's path, the sha256 of its model.json
and of its parameters' checksums, and the family's `sample_settings()`: labels, precision, the sampler and its
steps, guidance and the guide's and VAE's checksums, ...; with position-balanced labels also the seed list); it
is written before the first image, and a rerun whose settings would make other images is refused (use another
--outdir or delete it). Mistakes are one line `error: ...` with exit code 2; --debug shows the traceback.
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
_STEPS = flags.DEFINE_integer("steps", None, "sampler steps; default: the family's (EDM 18 = 35 NFE; EDM2 heun 32 = "
                              "63 NFE, dpmv3 25)")
_LABELS = flags.DEFINE_enum("labels", None, ["random", "balanced"],
                            "class labels; default: the family's (EDM random, as EDM's generate.py; EDM2 balanced: "
                            "position in the seed list mod classes, as DDO's EDM2_sample.py; EDM's balanced is seed "
                            "mod classes)")
_FLOAT64 = flags.DEFINE_bool("float64", None, "float64 sampler arithmetic; the net stays float32; default: EDM off, "
                             "EDM2 heun off, EDM2 dpmv3 on (upstream's protocols)")
_CHURN = flags.DEFINE_float("S_churn", None, "stochasticity of the Heun sampler (default 0)")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["heun", "dpmv3"], "EDM2: Heun (default) or DPM-Solver-v3")
_GUIDANCE = flags.DEFINE_float("guidance", None, "EDM2: autoguidance weight (default 1 = none); needs --guide")
_GUIDE = flags.DEFINE_string("guide", None, "EDM2: folder of the guide net (launch.convert edm2); needs --guidance")
_VAE = flags.DEFINE_string("vae", None, "EDM2 latent models: the SD-VAE (launch.convert sd-vae); VAR: the VQVAE "
                            "(launch.convert vqvae)")
_CFG = flags.DEFINE_float("cfg", None, "VAR only: classifier-free guidance scale")
_CFG_CONVENTION = flags.DEFINE_string("cfg_convention", None, "VAR only: one_plus_w (w = cfg - 1, DDO's values; "
                                       "default) or var (w = cfg, public VAR)")
_TOP_K = flags.DEFINE_integer("top_k", None, "VAR only: top-k sampling (0 = off)")
_TOP_P = flags.DEFINE_float("top_p", None, "VAR only: top-p sampling (0 = off)")
_MORE_SMOOTH = flags.DEFINE_bool("more_smooth", None, "VAR only: Gumbel-softmax smoothing")
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
  if _STEPS.value is not None and _STEPS.value < 1:
    raise cli.UserError(f"--steps {_STEPS.value} is not positive", "--steps", "pass e.g. 18 (35 NFE)")
  if _CHURN.value is not None and _CHURN.value < 0:
    raise cli.UserError(f"--S_churn {_CHURN.value} is negative", "--S_churn", "pass 0 (deterministic) or more")
  outdir = pathlib.Path(_OUTDIR.value)
  if outdir.exists() and not outdir.is_dir():
    raise cli.UserError(f"{outdir} exists and is not a folder", "--outdir", "give a folder path (created if new)")
  if not (pathlib.Path(_MODEL.value) / "model.json").is_file():
    raise cli.UserError(f"{_MODEL.value} has no model.json", "--model",
                        "give a folder written by `python -m launch.convert edm` (or edm2) or a round folder of a "
                        "DDO run")
  for flag in (_GUIDE, _VAE):
    if flag.value is not None and not pathlib.Path(flag.value).is_dir():
      raise cli.UserError(f"{flag.value} is not a folder", f"--{flag.name}",
                          "give a folder written by `python -m launch.convert edm2` (--guide) or `sd-vae` / `vqvae` "
                          "(--vae)")
  return seeds


def sampling_options() -> dict:
  """The sampling flags as `ddo_jax.families.load_model_dir` takes them (None: not given)."""
  return dict(labels=_LABELS.value, num_steps=_STEPS.value, S_churn=_CHURN.value, float64=_FLOAT64.value,
              guidance=_GUIDANCE.value, guide=_GUIDE.value, sampler=_SAMPLER.value, vae=_VAE.value,
              cfg=_CFG.value, cfg_convention=_CFG_CONVENTION.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
              more_smooth=_MORE_SMOOTH.value)


def first_positions(seeds) -> dict:
  """seed -> its first index in the seed list."""
  out = {}
  for i, s in enumerate(seeds):
    out.setdefault(s, i)
  return out


def settings_of(family, params, model_dir) -> dict:
  """What makes the images of this run (see the module docstring); all but 'model' must match on a rerun."""
  from ddo_jax import tree_io  # pylint: disable=import-outside-toplevel
  model_dir = pathlib.Path(model_dir)
  settings = {
      "model": str(model_dir.absolute()),
      "model_json_sha256": hashlib.sha256((model_dir / "model.json").read_bytes()).hexdigest(),
      # sha256 of the per-leaf checksums (tree_io.tree_checksum: dtype, shape, crc32 of the bytes).
      "params_checksum": hashlib.sha256(json.dumps(tree_io.tree_checksum(params), sort_keys=True).encode()
                                        ).hexdigest(),
      **family.sample_settings(),
  }
  if family.positions_matter:   # labels by position: another seed list labels the seeds differently
    settings["seed_list"] = _SEEDS.value
  return settings


def main(argv):
  if len(argv) > 1:
    raise cli.UserError(f"unexpected arguments {argv[1:]}", "command line", "flags are --name=value; see --help")
  seeds = _check_flags()
  from ddo_jax.parallel import maybe_initialize_distributed  # pylint: disable=import-outside-toplevel
  maybe_initialize_distributed()
  compile_cache.enable(_COMPILE_CACHE.value)
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ddo_jax import families, parallel, utils  # pylint: disable=import-outside-toplevel
  from ddo_jax.data import images  # pylint: disable=import-outside-toplevel

  utils.setup_logging()
  outdir = pathlib.Path(_OUTDIR.value)
  mesh = parallel.make_mesh()
  multiple = images.device_multiple(mesh)
  images.check_batch_size(_BATCH.value, multiple)
  family, params = families.load_model_dir(_MODEL.value, **sampling_options())
  writer = jax.process_index() == 0
  images.check_settings(outdir, settings_of(family, params, _MODEL.value), _SEEDS.value, write=writer)
  todo = images.pending_seeds(outdir, seeds, family.image_shape)
  broken = sum(images.png_path(outdir, s).exists() for s in todo)
  parallel.barrier("sample-start")
  unique = len(set(seeds))
  utils.log.info("%d seeds requested, %d already written, %d to generate", unique, unique - len(todo), len(todo))
  if broken:
    utils.log.warning("%d existing PNGs do not decode (truncated by a killed run?): making them again", broken)

  position = first_positions(seeds)
  sampler = family.image_sampler(params, mesh)
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
    positions = np.asarray([position[int(s)] for s in ids], np.int32)
    made, classes = sampler(ids, positions)
    if _NPZ.value:   # the npz labels (seed_classes) must be those the images were made with
      n = len(chunk)
      if not np.array_equal(classes[:n], family.seed_classes(np.asarray(chunk), positions[:n])):
        raise RuntimeError(f"labels of seeds {chunk[0]}..{chunk[-1]} differ from seed_classes (a bug)")
    if writer:
      for seed, img in zip(chunk, made[:len(chunk)]):
        images.write_png(images.png_path(outdir, seed), img)
    done += len(chunk)
    progress.update(done)
  parallel.barrier("sample-done")
  if _NPZ.value and writer:
    arr = images.read_pngs(outdir, seeds)
    labels = family.seed_classes(np.asarray(seeds), np.asarray([position[s] for s in seeds]))
    utils.atomic_savez(outdir / "samples.npz", arr_0=arr, labels=labels, seeds=np.asarray(seeds))
    utils.log.info("wrote %s (%s)", outdir / "samples.npz", arr.shape)


if __name__ == "__main__":
  cli.run(main, doc=__doc__)
