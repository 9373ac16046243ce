"""The family contract: what a model family gives the model-agnostic DDO step and the round driver.

A family is the one place where a model type meets DDO. It is built from the run config's `model` block
and has two parts.

Pure functions, traced inside `jax.jit` by the train step and the samplers (no host side effects):

  init_params(rng) -> params                         parameter pytree (plain nested dicts)
  log_ratio(params, ref_params, batch, rng)          per-sample gaps log p_theta(x) - log p_ref(x) on
      -> (gap_real [N], gap_fake [M])                batch['real'] and batch['fake']; the reference enters
                                                     only under `jax.lax.stop_gradient`
  ddo_weights(batch, alpha)                          optional row weights (VAR's label dropout):
      -> None | (w_real, w_fake, normalizer)         None = the plain mean (default)
  sample(params, keys [B], seeds [B]) -> dict        one sample per key ({'x': ..., optional 'label'})
  sample_paired(params, keys, seeds, real) -> dict   online negatives for a real batch (real =
                                                     batch['real'], row i pairs with key i); default
                                                     `sample` (VAR: the fakes take the real rows' classes)
  project_params(params) -> params                   applied after every optimizer update (EDM2's forced
                                                     weight normalization); default identity
  pretrain_loss(params, batch, rng) -> scalar        maximum-likelihood loss (toy families pretrain with it);
                                                     default: this family has no pretraining
  finalize_pretrained(params) -> params              applied once to the pretrained parameters; identity

Host-side hooks, called by the driver outside jit:

  real_source(seed) -> (source, num)                 the training data: source(indices) -> dict of arrays
  evaluate(params, sample, seed) -> {metric: value}  the selection metric(s); `sample(num, start=0)`
                                                     draws samples of `params` through the driver's
                                                     sharded sampler
  metric_mode                                        'min' or 'max': which direction of the metric is better
  reference_metrics(seed) -> dict                    the metrics of fresh data (a floor), {} if unknown
  ground_truth(seed, num) -> array | None            data samples for the ground-truth plot panel
  plot_samples(ax, x, title)                         draw samples on a matplotlib axis
  model_json() -> dict                               written as round_r/model.json next to chosen/, so
                                                     launch tools can rebuild the network
  check_converted(model_json_path)                   refuse a converted checkpoint that does not match the
                                                     config (default: accept)

Sampling a saved model (launch.sample, launch.evaluate --model; optional, see `from_model_dir`):

  from_model_dir(path, meta, options) (classmethod)  -> (family, params) ready to sample; default refuses
  image_shape                                        (H, W, C) of the uint8 images it makes
  sample_settings() -> dict                          what makes its images, recorded by launch.sample
  seed_classes(seeds, positions) -> int64 [N]        the class each seed is sampled with (-1: none)
  positions_matter                                   whether an image depends on its seed's list position
  image_sampler(params, mesh) -> fn(seeds, positions) -> (uint8 images [B, H, W, C], classes [B])

Required parts are abstract (a family missing one cannot be built); optional parts have defaults here, so
nothing probes with `hasattr`. A new family subclasses `Family` and is registered by name in
`ddo_jax/families/__init__.py` (see README.md beside this file).
"""
import abc
from typing import Any, Callable, Iterable, Mapping, Optional, Tuple

import jax
import ml_collections
import numpy as np

from ddo_jax import cli

# The sampling options of launch.sample / launch.evaluate --model, as `from_model_dir` receives them: every key
# is present, None when its flag was not given. key -> the flag that sets it.
OPTION_FLAGS = {
    "labels": "--labels",                   # 'random' | 'balanced'
    "num_steps": "--steps",                 # int >= 1
    "S_churn": "--S_churn",                 # float >= 0
    "float64": "--float64",                 # bool: float64 sampler arithmetic
    "guidance": "--guidance",               # float: autoguidance weight (1 = none)
    "guide": "--guide",                     # str: folder of a guide network (EDM2 autoguidance)
    "sampler": "--sampler",                 # str: 'heun' | 'dpmv3' (EDM2)
    "vae": "--vae",                         # str: folder of the SD-VAE (`launch.convert sd-vae`)
    "cfg": "--cfg",                         # float: VAR classifier-free guidance
    "cfg_convention": "--cfg_convention",   # str: VAR's cfg convention
    "top_k": "--top_k",                     # int: VAR top-k sampling (0 = off)
    "top_p": "--top_p",                     # float: VAR top-p sampling (0 = off)
    "more_smooth": "--more_smooth",         # bool: VAR's Gumbel-softmax smoothing
}


def sampling_options(**given) -> dict:
  """Every key of OPTION_FLAGS, None unless given; an unknown key is a bug (ValueError)."""
  unknown = sorted(set(given) - set(OPTION_FLAGS))
  if unknown:
    raise ValueError(f"unknown sampling options {unknown}; known are {sorted(OPTION_FLAGS)}")
  return {k: given.get(k) for k in OPTION_FLAGS}


def refuse_options(options: Mapping[str, Any], accepted: Iterable[str], what: str) -> None:
  """One-line UserError naming the first option that is set (not None) but not in `accepted`;
  `what` says whose options these are ('an EDM model', "EDM2's --sampler dpmv3", ...)."""
  accepted = list(accepted)
  for key, flag in OPTION_FLAGS.items():
    if options.get(key) is not None and key not in accepted:
      takes = ", ".join(OPTION_FLAGS[k] for k in accepted) or "no sampling flags"
      raise cli.UserError(f"{flag} means nothing for {what}", flag, f"drop it ({what} takes {takes})")


def load_replicated(tree_dir, abstract, what: str):
  """The Orbax tree {'params': <abstract>} at tree_dir, replicated over every device of every process (Orbax
  reads it on any topology); a tree that does not match is a one-line UserError."""
  from ddo_jax import parallel, tree_io  # pylint: disable=import-outside-toplevel
  sharding = parallel.replicated(parallel.make_mesh())
  abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), abstract)
  try:
    return tree_io.load_tree(tree_dir, {"params": abstract})["params"]
  except tree_io.CorruptCheckpointError as e:
    raise cli.UserError(str(e).splitlines()[0], what,
                        "the parameters do not belong to the net its model.json describes (or the folder is "
                        "damaged): convert the model again") from e


def make_position_sampler(fn: Callable, mesh, param_shardings) -> Callable:
  """jit of (params, base_key, seeds, positions) -> fn(params, seed_keys(base_key, seeds), seeds, positions).

  `fn` is pure: per-seed keys [B] (fold_in(base_key, seed), as `ddo_jax.sampling.seeded`), the seeds and their
  positions in the seed list (int32 [B], batch-sharded) -> a dict of [B, ...] arrays, kept batch-sharded.
  """
  from ddo_jax import parallel, xla_options  # pylint: disable=import-outside-toplevel
  from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
  batch = parallel.batch_sharding(mesh)

  def run(params, base_key, seeds, positions):
    return fn(params, seeded.seed_keys(base_key, seeds), seeds, positions)

  return jax.jit(run, in_shardings=(param_shardings, parallel.replicated(mesh), batch, batch), out_shardings=batch,
                 compiler_options=xla_options.compiler_options(mesh))


class Family(abc.ABC):
  """Base class of every model family; `config` is the run config's `model` block."""

  name: str = ""
  metric_mode: str = "min"

  def __init__(self, config):
    self.config = config

  # --- pure functions (inside jit) ------------------------------------------------------------------
  @abc.abstractmethod
  def init_params(self, rng: jax.Array) -> Any:
    """A parameter pytree for `rng` (used for shapes by `jax.eval_shape`, and to initialise toys)."""

  @abc.abstractmethod
  def log_ratio(self, params, ref_params, batch: dict, rng: jax.Array) -> Tuple[jax.Array, jax.Array]:
    """(gap_real, gap_fake): log p_theta - stop_gradient(log p_ref) per real and per fake sample."""

  def ddo_weights(self, batch: dict, alpha: float) -> Optional[Tuple[jax.Array, jax.Array, jax.Array]]:
    """Per-row weights and normalizer of the DDO loss, or None for the plain mean over rows."""
    del batch, alpha
    return None

  @abc.abstractmethod
  def sample(self, params, keys: jax.Array, seeds: jax.Array) -> dict:
    """One sample per key: a dict of [B, ...] arrays with at least 'x'."""

  def sample_paired(self, params, keys: jax.Array, seeds: jax.Array, real: dict) -> dict:
    """Online negatives for the real batch `real` (row i of the fakes pairs with row i of the reals), as
    the driver draws them inside the loop. Default: `sample`, which ignores the reals."""
    del real
    return self.sample(params, keys, seeds)

  def project_params(self, params) -> Any:
    """Applied to the parameters after every optimizer update (e.g. forced weight normalization)."""
    return params

  def pretrain_loss(self, params, batch: dict, rng: jax.Array) -> jax.Array:
    """Maximum-likelihood training loss for `init.kind='pretrain'`."""
    raise NotImplementedError(f"family {self.name!r} has no pretraining loss: start from a converted "
                              "checkpoint (init.kind='checkpoint')")

  def finalize_pretrained(self, params) -> Any:
    """Applied once to the parameters that pretraining ends with."""
    return params

  # --- host side (the driver) -----------------------------------------------------------------------
  @property
  def has_pretraining(self) -> bool:
    return type(self).pretrain_loss is not Family.pretrain_loss

  @abc.abstractmethod
  def real_source(self, seed: int) -> Tuple[Callable, int]:
    """(source, num): `source(indices)` returns a dict of host arrays for those training examples."""

  @abc.abstractmethod
  def evaluate(self, params, sample: Callable, seed: int) -> dict:
    """The selection metric(s) of `params`; `sample(num, start=0)` draws samples of them."""

  def reference_metrics(self, seed: int) -> dict:
    """The metrics of fresh data (the floor a perfect model reaches), or {} when unknown."""
    del seed
    return {}

  def ground_truth(self, seed: int, num: int) -> Optional[np.ndarray]:
    """Data samples in the form of sample()['x'] for the ground-truth plot panel (None: no panel)."""
    del seed, num
    return None

  @abc.abstractmethod
  def plot_samples(self, ax, x: np.ndarray, title: str) -> None:
    """Draws samples `x` (host array, as sample()['x']) on a matplotlib axis."""

  def model_json(self) -> dict:
    """What is written next to each round's chosen/ parameters to rebuild the model."""
    return {"family": self.name, "config": ml_collections.ConfigDict(self.config).to_dict()}

  def check_converted(self, model_json_path) -> None:
    """Refuse a converted checkpoint (its model.json) that does not match this family's config."""
    del model_json_path

  # --- sampling a saved model (launch.sample, launch.evaluate --model) ------------------------------
  image_shape: Tuple[int, int, int] = ()
  # True when an image depends on its seed's position in the seed list (class balance by position, as
  # DDO's EDM2_sample.py): launch.sample then records the seed list with the settings, so that a rerun into
  # the same folder with another list (which would label the seeds differently) is refused.
  positions_matter: bool = False

  @classmethod
  def from_model_dir(cls, path, meta: dict, options: dict) -> Tuple["Family", Any]:
    """(family, params) ready to sample, from a saved model folder; called by `families.load_model_dir`.

    Args:
      path: the folder (pathlib.Path): one written by `launch.convert <family>` (params/ + model.json) or a
        DDO round folder round_r/ (chosen/ + model.json, written by the driver from `model_json()`).
      meta: its model.json, already read; `meta['family']` is this family's registered name ('edm' is
        assumed for old folders without the key).
      options: the sampling flags of launch.sample / launch.evaluate --model, every key of
        `OPTION_FLAGS` present and None when the flag was not given:
          labels ('random' | 'balanced'), num_steps (int, --steps), S_churn (float), float64 (bool),
          guidance (float), guide (str: a folder), sampler (str), vae (str: a folder);
          VAR only: cfg (float), cfg_convention (str), top_k (int), top_p (float), more_smooth (bool).
        None means "this family's default"; launch.evaluate --model always sets labels ('balanced' unless
        --labels random: the FID protocol), so a class-conditional family should accept it. A family must refuse, with a one-line `cli.UserError` whose
        `where` is the flag (`refuse_options` does it), every option that is set but means nothing for it
        (e.g. --guide for EDM), and any value it cannot honour.

    Returns:
      (family, params): `params` are the model's parameters as `image_sampler` takes them (host or device
      arrays); the family is set up for sampling with these options: `image_shape`, `sample_settings()`,
      `seed_classes()` and `image_sampler()` work. Auxiliary networks the options name (a guide, a decoder)
      are held by the family, and their parameter checksums belong in `sample_settings()`.

    Mistakes the user can fix (a missing or mismatched file, a contradicting flag) are one-line
    `cli.UserError`s. The default refuses: this family cannot be sampled from a model folder.
    """
    del meta, options
    raise cli.UserError(f"{path} holds a model of the family {cls.name!r}, which launch.sample and "
                        "launch.evaluate --model cannot sample", "--model",
                        "give an EDM or EDM2 model folder (launch.convert edm / edm2, or a DDO round folder)")

  def sample_settings(self) -> dict:
    """JSON-able record of what makes this family's images with the options of `from_model_dir` (the
    sampler and its settings, labels, precision, image shape, checksums of auxiliary networks).
    launch.sample adds the model's path and hashes and refuses a rerun into the same folder whose
    settings differ, so it must hold everything a seed's image depends on besides `params`."""
    raise NotImplementedError(f"family {self.name!r} was not set up by from_model_dir")

  def seed_classes(self, seeds: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """int64 [N]: the class each seed is sampled with (-1 for an unconditional model), without sampling;
    `positions` are the seeds' indices in the seed list (class-balanced rules may use them)."""
    raise NotImplementedError(f"family {self.name!r} was not set up by from_model_dir")

  def image_sampler(self, params, mesh) -> Callable[[np.ndarray, np.ndarray], Tuple[np.ndarray, np.ndarray]]:
    """`fn(seeds, positions)` -> (uint8 images [B, H, W, C], int64 classes [B], -1 when unconditional),
    host numpy arrays, for int32 seeds and positions [B] (B a multiple of the mesh's batch shards and
    process count). Seed s draws its noise from fold_in(jax.random.key(sampling.seeded.CLI_BASE_SEED), s)
    (`make_position_sampler`), so an image depends on its seed (and position), not on the batching.
    With several processes every process gets every image."""
    raise NotImplementedError(f"family {self.name!r} was not set up by from_model_dir")
