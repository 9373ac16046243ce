"""Sample images from a converted or DDO-trained EDM model with EDM's Heun sampler.

  python -m launch.sample --model ckpt/edm-cifar10-cond --seeds 0-49999 --outdir samples/cond --npz
  python -m launch.sample --model runs/edm_cond/round_016 --seeds 0-63 --outdir grid --labels balanced

--model is a folder written by `launch.convert edm` (params/ + model.json) or a round folder of a DDO run
(chosen/ + model.json). Seed s draws its latents (and its random label) from
fold_in(jax.random.key(0), s) (`ddo_jax.sampling.seeded`), so an
image depends only on its seed, not on the batch size or the number of devices (up to the float32
rounding of the network, which XLA may order differently for another batch shape: a rare uint8 pixel
can differ by one). PNGs go to
OUTDIR/<first seed of its thousand>/<seed>.png (EDM's layout); seeds whose PNG exists are skipped, so
an interrupted run resumes. --npz also writes OUTDIR/samples.npz (uint8 NHWC `arr_0`, int `labels`).
"""
import pathlib

from absl import app, flags

_MODEL = flags.DEFINE_string("model", None, "converted model folder or a DDO round folder")
_SEEDS = flags.DEFINE_string("seeds", "0-63", "seed range 'a-b' (inclusive) or comma list")
_OUTDIR = flags.DEFINE_string("outdir", None, "output folder")
_BATCH = flags.DEFINE_integer("batch_size", 256, "images per sampler call (global, over all devices)")
_STEPS = flags.DEFINE_integer("steps", 18, "Heun steps (18 = EDM's 35 NFE for CIFAR-10)")
_LABELS = flags.DEFINE_enum("labels", "random", ["random", "balanced"],
                            "random labels (EDM's generate.py) or strict balance: seed mod label_dim")
_FLOAT64 = flags.DEFINE_bool("float64", False, "float64 sampler arithmetic (EDM's protocol); net stays float32")
_CHURN = flags.DEFINE_float("S_churn", 0.0, "stochasticity of the Heun sampler")
_NPZ = flags.DEFINE_bool("npz", False, "also write OUTDIR/samples.npz with all requested seeds")
flags.mark_flags_as_required(["model", "outdir"])


def parse_seeds(text: str) -> list:
  seeds = []
  for part in text.split(","):
    part = part.strip()
    if "-" in part:
      a, b = part.split("-")
      seeds.extend(range(int(a), int(b) + 1))
    elif part:
      seeds.append(int(part))
  if not seeds:
    raise ValueError(f"--seeds={text!r} names no seed")
  return seeds


def png_path(outdir: pathlib.Path, seed: int) -> pathlib.Path:
  return outdir / f"{seed - seed % 1000:06d}" / f"{seed:06d}.png"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from ddo_jax.parallel import maybe_initialize_distributed
  maybe_initialize_distributed()
  import jax
  import numpy as np
  from PIL import Image

  from ddo_jax import parallel, utils
  from ddo_jax.families.edm import load_model_dir, to_uint8
  from ddo_jax.sampling import seeded

  utils.setup_logging()
  seeds = parse_seeds(_SEEDS.value)
  outdir = pathlib.Path(_OUTDIR.value)
  family, params = load_model_dir(_MODEL.value, labels=_LABELS.value, num_steps=_STEPS.value,
                                  S_churn=_CHURN.value)
  mesh = parallel.make_mesh()
  bs = _BATCH.value
  parallel.check_batch_divisible(bs, mesh, "--batch_size")
  sharding = parallel.batch_sharding(mesh)
  params = jax.device_put(params, parallel.replicated(mesh))

  sample_fn = seeded.make_seeded_sampler(family.sample_float64 if _FLOAT64.value else family.sample, mesh,
                                         parallel.replicated(mesh))
  base = jax.random.key(seeded.CLI_BASE_SEED)
  todo = [s for s in seeds if not png_path(outdir, s).exists()]
  utils.log.info("%d seeds requested, %d already written, %d to generate", len(seeds), len(seeds) - len(todo),
                 len(todo))
  progress = utils.Progress("sample", len(todo), unit="images")
  for start in range(0, len(todo), bs):
    chunk = todo[start:start + bs]
    ids = np.asarray(chunk + [chunk[-1]] * (bs - len(chunk)), np.int32)   # pad the last batch
    with jax.enable_x64(_FLOAT64.value):
      out = parallel.to_host(sample_fn(params, base, jax.device_put(ids, sharding)))
    images = to_uint8(out["x"])[:len(chunk)]
    if jax.process_index() == 0:
      for seed, img in zip(chunk, images):
        path = png_path(outdir, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(img.squeeze() if img.shape[-1] == 1 else img).save(tmp, format="PNG")
        tmp.replace(path)
    progress.update(start + len(chunk))
  if _NPZ.value and jax.process_index() == 0:
    arr = np.stack([np.asarray(Image.open(png_path(outdir, s))) for s in seeds])
    if arr.ndim == 3:
      arr = arr[..., None]
    labels = seed_labels(family, np.asarray(seeds, np.int32))
    utils.atomic_savez(outdir / "samples.npz", arr_0=arr, labels=labels, seeds=np.asarray(seeds))
    utils.log.info("wrote %s (%s)", outdir / "samples.npz", arr.shape)


def seed_labels(family, seeds):
  """The class each seed was sampled with (-1 for unconditional models), in one jitted call."""
  import jax
  import numpy as np
  from ddo_jax.sampling import seeded
  if not family.label_dim:
    return np.full(len(seeds), -1, np.int64)
  fn = jax.jit(lambda base, s: jax.numpy.argmax(family.labels_for(seeded.seed_keys(base, s), s), axis=-1))
  return np.asarray(fn(jax.random.key(seeded.CLI_BASE_SEED), seeds), np.int64)


if __name__ == "__main__":
  app.run(main)
