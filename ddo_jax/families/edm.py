"""EDM family (Karras et al. 2022): SongUNet/DDPM++ with EDM (or VP/VE) preconditioning.

DDO's log-ratio is the EDM-form surrogate of METHOD.md §2.2 (`ddo_jax.families.diffusion`): one
log-normal sigma per index (P_mean, P_std from the config), one noise tensor shared by real i, fake i,
target and reference, lambda(sigma)-weighted squared error summed over C, H, W, float32, no dropout,
no augmentation (augment labels are not passed, so `map_augment` gets no gradient).

Negatives and evaluation samples come from EDM's Heun sampler (default 18 steps = 35 NFE), with either
random labels (EDM's generate.py) or strict class balance (label = seed mod label_dim).
"""
import json
import os
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax import cli
from ddo_jax.families import diffusion
from ddo_jax.families.base import Family, make_position_sampler, refuse_options
from ddo_jax.utils import flatten_dict
from ddo_jax.nets.edm_precond import build_precond, plain_dict
from ddo_jax.sampling.heun import heun_sample


def to_uint8(x) -> np.ndarray:
  """[-1, 1] float NHWC -> uint8 as EDM's generate.py: clip(x * 127.5 + 128, 0, 255)."""
  return np.clip(np.asarray(x, np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)


def _compare_nets(ours: dict, theirs: dict, source: str) -> None:
  """Refuse a converted checkpoint whose network differs from the config (dropout may differ)."""
  a, b = json.loads(json.dumps(ours)), json.loads(json.dumps(theirs))
  for d in (a, b):
    d.get("model_kwargs", {}).pop("dropout", None)
    d.pop("use_fp16", None)
  if a != b:
    keys = sorted(set(flatten_dict(a)) | set(flatten_dict(b)))
    diff = [f"{k}: config {flatten_dict(a).get(k)!r} vs checkpoint {flatten_dict(b).get(k)!r}" for k in keys
            if flatten_dict(a).get(k) != flatten_dict(b).get(k)]
    raise ValueError(f"the network in {source} differs from config.model.net:\n  " + "\n  ".join(diff)
                     + "\nUse the config variant that matches the checkpoint, or fix config.model.net.")


class EDM(Family):
  """The family object; `config` is the run config's `model` (see configs/edm_cifar10.py)."""
  name = "edm"
  metric_mode = "min"

  def __init__(self, config):
    super().__init__(config)
    self._source = self._val_fn = self._evaluator = None
    self.net_config = plain_dict(config.net)
    self.net = build_precond(self.net_config)
    self.label_dim = int(self.net_config["label_dim"])
    r, c = self.net_config["img_resolution"], self.net_config["img_channels"]
    self.sample_shape = (r, r, c)
    self.sigma_data = float(self.net_config["precond_kwargs"].get("sigma_data", 0.5))
    if config.labels not in ("random", "balanced"):
      raise cli.ConfigError(f"model.labels={config.labels!r} is not a labelling", "config.model.labels",
                            "use 'random' or 'balanced'")
    if config.metric == "fid":
      e = config.eval
      if not e.ref_stats:
        raise cli.ConfigError("model.metric='fid' needs model.eval.ref_stats", "config.model.eval.ref_stats",
                              "pass EDM's cifar10-32x32.npz (EDM fid-refs), or make them with `python -m "
                              "launch.evaluate --make_ref --images <dataset> --out ref.npz`")
      if not (e.inception or os.environ.get("DDO_JAX_INCEPTION")):
        raise cli.ConfigError("model.metric='fid' needs model.eval.inception", "config.model.eval.inception",
                              "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth (pytorch-fid's GitHub "
                              "releases) or set $DDO_JAX_INCEPTION")

  # --- pure functions -------------------------------------------------------------------------------
  def init_params(self, rng):
    x = jnp.zeros((1,) + self.sample_shape, jnp.float32)
    labels = jnp.zeros((1, self.label_dim), jnp.float32) if self.label_dim else None
    return self.net.init(rng, x, jnp.ones([1]), labels)["params"]

  def denoise(self, params, x, sigma, labels=None):
    return self.net.apply({"params": params}, x, sigma, labels)

  def pretrain_loss(self, params, batch, rng):
    c = self.config
    labels = batch.get("label") if self.label_dim else None
    return diffusion.edm_denoising_loss(self.denoise, params, batch["x"], rng, P_mean=c.P_mean, P_std=c.P_std,
                                        sigma_data=self.sigma_data, labels=labels)

  def log_ratio(self, params, ref_params, batch, rng):
    c = self.config
    real, fake = batch["real"], batch["fake"]
    # An unconditional net ignores labels even if the dataset has them (tfds CIFAR-10 always does).
    lr, lf = (real.get("label"), fake.get("label")) if self.label_dim else (None, None)
    if self.label_dim and (lr is None or lf is None):
      raise ValueError("a class-conditional EDM needs labels on real and fake batches; the dataset has none "
                       "(an EDM zip without dataset.json labels?)")
    return diffusion.edm_log_ratio(self.denoise, params, ref_params, real["x"], fake["x"], rng,
                                   P_mean=c.P_mean, P_std=c.P_std, sigma_data=self.sigma_data,
                                   labels_real=lr, labels_fake=lf)

  def labels_for(self, keys, seeds):
    if not self.label_dim:
      return None
    if self.config.labels == "balanced":
      cls = seeds % self.label_dim
    else:
      # int32 always: a seed's label must not depend on the sampler's precision mode (x64 for float64).
      cls = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), [], 0, self.label_dim,
                                                  dtype=jnp.int32))(keys)
    return jax.nn.one_hot(cls, self.label_dim, dtype=jnp.float32)

  def sample(self, params, keys, seeds, dtype=jnp.float32):
    """Heun samples, one per (key, seed): latents from the key, labels random or seed mod label_dim.

    dtype sets the sampler's arithmetic; float64 (EDM's protocol, `sample_float64`) must be traced
    inside `jax.enable_x64(True)`. The network always runs in float32.
    """
    s = self.config.sampler
    latents = jax.vmap(lambda k: jax.random.normal(k, self.sample_shape, dtype))(keys)
    labels = self.labels_for(keys, seeds)
    x = heun_sample(lambda x, sigma, l: self.denoise(params, x, sigma, l), latents, labels,
                    num_steps=s.num_steps, sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho,
                    S_churn=s.S_churn, keys=keys)
    out = {"x": x.astype(jnp.float32)}
    if labels is not None:
      out["label"] = labels
    return out

  def sample_float64(self, params, keys, seeds):
    return self.sample(params, keys, seeds, dtype=jnp.float64)

  def model_json(self) -> dict:
    """What launch.sample / launch.convert need to rebuild the network from a saved parameter tree."""
    return {"family": "edm", "net": self.net_config}

  # --- sampling a saved model (launch.sample, launch.evaluate --model) ------------------------------
  SAMPLING_OPTIONS = ("labels", "num_steps", "S_churn", "float64")
  float64 = False

  @classmethod
  def from_model_dir(cls, path, meta, options):
    """An EDM folder (`launch.convert edm`: params/ + model.json, or a round folder: chosen/ + model.json)
    with EDM's Heun sampler: --labels (default random, EDM's generate.py; balanced = seed mod label_dim),
    --steps (18), --S_churn (0), --float64 (off). Other options are refused."""
    import ml_collections  # pylint: disable=import-outside-toplevel
    from ddo_jax import parallel, tree_io  # pylint: disable=import-outside-toplevel
    from ddo_jax.convert import edm_names  # pylint: disable=import-outside-toplevel
    refuse_options(options, cls.SAMPLING_OPTIONS, "an EDM model")
    labels = options["labels"] or "random"
    num_steps = 18 if options["num_steps"] is None else int(options["num_steps"])
    S_churn = 0.0 if options["S_churn"] is None else float(options["S_churn"])
    if num_steps < 1:
      raise cli.UserError(f"--steps {num_steps} is not positive", "--steps", "pass e.g. 18 (35 NFE)")
    if S_churn < 0:
      raise cli.UserError(f"--S_churn {S_churn} is negative", "--S_churn", "pass 0 (deterministic) or more")
    family = cls(ml_collections.ConfigDict(dict(
        net=meta["net"], P_mean=-1.2, P_std=1.2, labels=labels, metric="denoise_loss",
        sampler=dict(num_steps=num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=S_churn))))
    family.float64 = bool(options["float64"])
    shapes = edm_names.abstract_params(meta["net"])   # nested dicts of shape tuples
    tree = path / "params" if (path / "params").exists() else path / "chosen"
    # Replicated over every device of every process: Orbax reads the folder on any topology (a tree saved
    # by one process restores on several and the other way round).
    sharding = parallel.replicated(parallel.make_mesh())
    abstract = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s, np.float32, sharding=sharding), shapes,
                                      is_leaf=lambda s: isinstance(s, tuple))
    params = tree_io.load_tree(tree, {"params": abstract})["params"]
    return family, params

  @property
  def image_shape(self):
    return tuple(self.sample_shape)

  def sample_settings(self) -> dict:
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    return {
        "image_shape": list(self.sample_shape),
        "label_dim": self.label_dim,
        "labels": self.config.labels if self.label_dim else None,
        "float64": self.float64,
        "base_seed": seeded.CLI_BASE_SEED,
        **{f"sampler.{k}": v for k, v in self.config.sampler.to_dict().items()},   # num_steps, S_churn, ...
    }

  def seed_classes(self, seeds, positions):
    """EDM's labels depend on the seed only: random (from the seed's key, int32 draws in either precision
    mode) or seed mod label_dim; `positions` are not used."""
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    del positions
    if not self.label_dim:
      return np.full(len(seeds), -1, np.int64)
    fn = jax.jit(lambda base, s: jnp.argmax(self.labels_for(seeded.seed_keys(base, s), s), axis=-1))
    with jax.enable_x64(self.float64):
      return np.asarray(fn(jax.random.key(seeded.CLI_BASE_SEED), np.asarray(seeds, np.int32)), np.int64)

  def image_sampler(self, params, mesh):
    from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    sample = self.sample_float64 if self.float64 else self.sample
    program = make_position_sampler(lambda p, keys, seeds, positions: sample(p, keys, seeds), mesh,
                                    parallel.replicated(mesh))
    params = jax.device_put(params, parallel.replicated(mesh))
    batch = parallel.batch_sharding(mesh)
    base = jax.random.key(seeded.CLI_BASE_SEED)

    def run(seeds, positions):
      with jax.enable_x64(self.float64):
        out = parallel.to_host(program(params, base, jax.device_put(np.asarray(seeds, np.int32), batch),
                                       jax.device_put(np.asarray(positions, np.int32), batch)))
      classes = (np.argmax(out["label"], axis=-1).astype(np.int64) if "label" in out
                 else np.full(len(seeds), -1, np.int64))
      return to_uint8(out["x"]), classes

    return run

  # --- data and evaluation (host side) --------------------------------------------------------------
  def real_source(self, seed: int):
    """The training images (loaded once): CIFAR-10 from tfds or EDM's dataset zip."""
    from ddo_jax.data import cifar10
    del seed
    if self._source is None:
      self._source = cifar10.load(self.config.data)
    return self._source

  def ground_truth(self, seed: int, num: int) -> np.ndarray:
    """`num` training images (a fixed random subset) for the plots' ground-truth panel."""
    source, n = self.real_source(seed)
    idx = np.sort(np.random.default_rng([seed, 4]).choice(n, size=min(num, n), replace=False))
    return np.asarray(source(idx)["x"])

  def check_converted(self, model_json_path) -> None:
    path = pathlib.Path(model_json_path)
    if not path.exists():
      return
    meta = json.loads(path.read_text())
    if meta.get("family") not in (None, "edm"):
      raise ValueError(f"{path} describes a {meta.get('family')!r} checkpoint, not an EDM one")
    _compare_nets(self.net_config, meta["net"], str(path))

  def evaluate(self, params, sample: Callable, seed: int) -> dict:
    """The selection metric: 'fid' (Inception statistics of generated samples against reference
    statistics) or 'denoise_loss' (EDM's weighted denoising loss on a fixed held-out real batch at
    fixed noise levels; cheap, deterministic, for tests and debugging)."""
    metric = self.config.metric
    if metric == "denoise_loss":
      return {"denoise_loss": self._denoise_loss(params, seed)}
    if metric == "fid":
      return self._fid(params, sample)
    raise ValueError(f"model.metric={metric!r} must be 'fid' or 'denoise_loss'")

  def _denoise_loss(self, params, seed: int) -> float:
    source, n = self.real_source(seed)
    idx = np.random.default_rng([seed, 9]).permutation(n)[:min(n, self.config.eval_batch)]
    batch = source(idx)
    fn = self._val_fn
    if fn is None:
      def loss(p, x, labels):
        sigma = jnp.exp(jnp.linspace(-3.0, 2.0, x.shape[0]))   # fixed grid of noise levels
        eps = jax.random.normal(jax.random.key(seed), x.shape, jnp.float32)
        noise = sigma.reshape(-1, 1, 1, 1) * eps
        return -jnp.mean(diffusion.weighted_logp(self.denoise, p, x, noise, sigma, labels, self.sigma_data))
      fn = self._val_fn = jax.jit(loss)
    labels = jnp.asarray(batch["label"]) if self.label_dim and "label" in batch else None
    return float(fn(params, jnp.asarray(batch["x"]), labels))

  def _fid(self, params, sample: Callable) -> dict:
    from ddo_jax.metrics import evaluator as evaluator_lib
    from ddo_jax.metrics import reference_stats
    ev = self._evaluator
    if ev is None:
      e = self.config.eval
      ev = self._evaluator = evaluator_lib.Evaluator(
          evaluator_lib.load_inception(e.inception or None), batch_size=e.batch_size,
          ref_stats=reference_stats.load_reference_stats(e.ref_stats), compute_is=e.num_samples >= 10)
    ev.reset()
    from ddo_jax import utils
    n, bs = self.config.eval.num_samples, self.config.eval.batch_size
    progress = utils.Progress("fid samples", n, unit="images")
    for start in range(0, n, bs):
      x = sample(min(bs, n - start), start)["x"]
      ev.add_global_uint8(to_uint8(x))   # every process holds all the samples; each feeds its part
      progress.update(min(start + bs, n))
    return ev.result()

  def plot_samples(self, ax, x, title):
    x = to_uint8(x[:64])
    k = int(np.ceil(np.sqrt(len(x))))
    h, w, c = x.shape[1:]
    grid = np.full((k * h, k * w, c), 255, np.uint8)
    for i, img in enumerate(x):
      grid[(i // k) * h:(i // k + 1) * h, (i % k) * w:(i % k + 1) * w] = img
    ax.imshow(grid.squeeze())
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def load_model_dir(path, *, labels: str = "random", num_steps: int = 18, S_churn: float = 0.0):
  """EDM.from_model_dir through `ddo_jax.families.load_model_dir` (kept for callers of the EDM-only API)."""
  from ddo_jax import families  # pylint: disable=import-outside-toplevel
  return families.load_model_dir(path, labels=labels, num_steps=num_steps, S_churn=S_churn)
