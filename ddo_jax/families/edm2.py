"""EDM2 family (Karras et al. 2024): the magnitude-preserving U-Net with EDM2's Precond, on pixels (img64)
or on Stable Diffusion VAE latents (img512).

DDO's log-ratio is the EDM-form surrogate of METHOD.md §2.2 (`ddo_jax.families.diffusion`) on the Precond
output D: one log-normal sigma and one noise tensor per index, shared by real i, fake i, target and
reference; lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2; the squared error summed over
H, W, C; float32; no dropout; EDM2's learned log-variance is not used (no logvar weighting, and
`logvar_linear` gets no gradient).

Parameters are the whole variable tree of the Precond, {'params': ..., 'buffers': ...}: the MPFourier
buffers ride along (the forward reads them under stop_gradient, so Adam's update of them is exactly zero
and they never change).

Forced weight normalization: upstream's MPConv overwrites its weight with normalize(weight) at every
train-mode forward, outside autograd, and normalizes again inside the forward. Here `project_params`
applies `forced_weight_normalization` after every optimizer update (not differentiated) and the forward
keeps its own normalize, so from the second step on the stored weights, the forward and the gradient are
upstream's (goldens ddo/edm2_loss: `state_after`, `grads`). `logvar_linear` is left alone, as upstream
leaves it when the forward does not ask for logvar. One difference: at a round's first step the target
equals the reference as stored (not normalized), so the first gradient is taken at theta_ref instead of
normalize(theta_ref) and the loss at that step is exactly (1 + alpha) log 2 (upstream: 3.4446 on the
goldens' net), see the report of issue 13.

Latents (space='latent', img512): the data holds EDM2's raw VAE moments, mean and std concatenated on the
channel axis (8 channels for the SD VAE). A fresh posterior sample, (mean + std * n) * scale + bias with
EDM2's StabilityVAEEncoder scale and bias, is drawn inside every training step from the step's key.
Negatives are latents from the sampler, used as they are.

Negatives and evaluation samples come from the Heun sampler of `ddo_jax.sampling.heun` (EDM2's unguided
edm_sampler is the same algorithm; 32 steps = 63 NFE by default). Labels are class-balanced (label =
seed mod label_dim, DDO's EDM2_sample.py protocol) unless model.labels='random'.
"""
import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax import cli, xla_options
from ddo_jax.families import diffusion
from ddo_jax.families.edm import EDM, to_uint8
from ddo_jax.families.base import Family, load_replicated, make_position_sampler, refuse_options
from ddo_jax.nets import edm2_encoders, edm2_unet
from ddo_jax.nets.edm2_encoders import stability_constants
from ddo_jax.sampling import dpmv3, heun, labels as labels_lib
from ddo_jax.sampling.heun import heun_sample
from ddo_jax.utils import flatten_dict, log

SPACES = ("pixel", "latent")
# launch.sample / launch.evaluate --model: DDO's EDM2_sample.py samplers and their default step counts (Heun:
# EDM2's 32 steps = 63 NFE; DPM-Solver-v3: the 25 steps of DDO's README).
SAMPLERS = ("heun", "dpmv3")
DEFAULT_STEPS = {"heun": 32, "dpmv3": 25}
# EDM2_sample.py decodes through the VAE encoder_batch_size = 4 images at a time (memory only).
VAE_DECODE_BATCH = 4
VAE_FIX = ("download the diffusers folder stabilityai/sd-vae-ft-mse (config.json + diffusion_pytorch_model"
           ".safetensors), convert it with `python -m launch.convert sd-vae --src <folder> --out <dir>` and "
           "pass --vae <dir>")
# model.data.source: EDM2's dataset zips, ImageNet read and center-cropped on the fly (tfds or a folder; latents
# encoded by model.vae), or SYNTHETIC stand-ins (latents drawn directly, or disc images through model.vae).
DATA_SOURCES = ("edm2_zip", "tfds", "folder", "synthetic", "synthetic_images")
# EDM2's StabilityVAEEncoder.encode_pixels batch (8 images at a time; memory only).
VAE_ENCODE_BATCH = 8
VAE_FIX_CONFIG = VAE_FIX.replace("pass --vae <dir>", "pass --config.model.vae=<dir>")   # training configs
# EDM2's StabilityVAEEncoder statistics of sd-vae-ft-mse latents on ImageNet (METHOD.md §2.5).
STABILITY_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
STABILITY_RAW_STD = (4.17, 4.62, 3.71, 3.28)


def _plain(config) -> dict:
  d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.loads(json.dumps(d, default=list))


def _comparable(net: dict) -> dict:
  """A net config without what DDO may change (dropout) or what this port ignores (use_fp16)."""
  net = json.loads(json.dumps(net, default=list))
  net.pop("use_fp16", None)
  net.get("unet_kwargs", {}).pop("dropout", None)
  return net


def synthetic_latents(num: int, resolution: int, channels: int, label_dim: int, seed: int = 0):
  """SYNTHETIC stand-in raw VAE moments (not ImageNet): per class a smooth random mean field around EDM2's
  raw latent statistics, per example a perturbation of it, and a constant std; labels seed mod label_dim.
  Returns (moments [num, r, r, 2 * channels] float32, labels [num] int)."""
  rng = np.random.default_rng([seed, 11])
  mean0 = np.resize(np.asarray(STABILITY_RAW_MEAN, np.float32), channels)
  std0 = np.resize(np.asarray(STABILITY_RAW_STD, np.float32), channels)
  yy, xx = np.mgrid[0:resolution, 0:resolution] / max(resolution - 1, 1)
  fx, fy, ph = (rng.uniform(0.5, 2.0, (label_dim, channels)), rng.uniform(0.5, 2.0, (label_dim, channels)),
                rng.uniform(0, 2 * np.pi, (label_dim, channels)))
  labels = np.arange(num) % label_dim
  field = np.sin(2 * np.pi * (fx[labels, None, None, :] * xx[None, :, :, None]
                              + fy[labels, None, None, :] * yy[None, :, :, None]) + ph[labels, None, None, :])
  mean = mean0 + std0 * (field + 0.2 * rng.standard_normal(field.shape))
  std = np.broadcast_to(0.1 * std0, mean.shape)
  return np.concatenate([mean, std], axis=-1).astype(np.float32), labels


class EDM2(EDM):
  """The family object; `config` is the run config's `model` block (see configs/edm2_img64.py).

  Shares EDM's host side (FID through the Inception evaluator, the denoise-loss metric, the image grid,
  label sampling); the network, the parameter tree, the latent space and the data differ.
  """
  name = "edm2"
  metric_mode = "min"

  def __init__(self, config):
    Family.__init__(self, config)
    self._source = self._val_fn = self._evaluator = None
    self.net_config = _plain(config.net)
    if self.net_config.get("class_name", "Precond") != "Precond":
      raise cli.ConfigError(f"model.net.class_name={self.net_config.get('class_name')!r} is not EDM2's Precond",
                            "config.model.net", "build it with ddo_jax.convert.edm2_names.config_from_init_kwargs")
    if self.net_config.get("unet_kwargs", {}).get("dropout", 0.0):
      raise cli.ConfigError("DDO runs EDM2 without dropout (METHOD.md §2.2 item 7)",
                            "config.model.net.unet_kwargs.dropout", "set it to 0.0")
    compute_dtype = config.get("compute_dtype", "float32") or "float32"
    if compute_dtype not in ("float32", "bfloat16"):
      raise cli.ConfigError(f"model.compute_dtype={compute_dtype!r} is not 'float32' or 'bfloat16'",
                            "config.model.compute_dtype", "use float32 (default, the parity path) or bfloat16")
    # Execution options of the net (off by default): bfloat16 Blocks, rematerialized Blocks in the backward.
    self.net = edm2_unet.build_precond(self.net_config, compute_dtype=compute_dtype,
                                       remat=bool(config.get("remat", False)))
    self.label_dim = int(self.net_config["label_dim"])
    r, c = self.net_config["img_resolution"], self.net_config["img_channels"]
    self.sample_shape = (r, r, c)
    self.sigma_data = float(self.net_config.get("sigma_data", 0.5))
    self.space = config.get("space", "pixel")
    if self.space not in SPACES:
      raise cli.ConfigError(f"model.space={self.space!r} is not one of {SPACES}", "config.model.space",
                            "use 'pixel' (img64) or 'latent' (img512)")
    if self.space == "latent":
      lat = config.latent
      if lat.get("scale") is not None:   # the constants themselves (a converted model's encoder, a round)
        self.latent_scale = np.asarray(lat.scale, np.float32).reshape(-1)
        self.latent_bias = np.asarray(lat.bias, np.float32).reshape(-1)
      else:
        self.latent_scale, self.latent_bias = stability_constants(
            list(lat.raw_mean), list(lat.raw_std), float(lat.final_mean), float(lat.final_std))
      if self.latent_scale.shape != (c,):
        raise cli.ConfigError(f"model.latent has {self.latent_scale.shape[0]} channels, the net {c}",
                              "config.model.latent.raw_mean", "give one raw_mean / raw_std per latent channel")
    if config.labels not in ("random", "balanced"):
      raise cli.ConfigError(f"model.labels={config.labels!r} is not a labelling", "config.model.labels",
                            "use 'balanced' (label = seed mod label_dim, DDO's EDM2 protocol) or 'random'")
    # Sampling for evaluation (and launch.sample, which replaces these in from_model_dir): EDM2's Heun in
    # float32, the net as trained, optionally autoguided by model.eval.guide; latents decode through model.vae.
    self.sampler_name, self.float64, self.gain_dtype = "heun", False, None
    self.guide_net = self.guide_params = self.guide_gain_dtype = None
    self.vae = self.vae_params = None
    self.decoder = edm2_encoders.StandardRGBEncoder()
    self.decoded_shape = tuple(self.sample_shape)
    self._programs = {}
    e = config.get("eval") or {}
    self.guidance = float(e.get("guidance", 1.0))
    self._vae_dir = config.get("vae", "") or ""
    self._check_data()
    if config.metric == "fid":
      self._check_fid_config(e)

  def _check_fid_config(self, e) -> None:
    """One-line errors, before anything is written, for a FID metric that could not run."""
    import os  # pylint: disable=import-outside-toplevel
    if not e.get("ref_stats"):
      res = "img512" if self.space == "latent" else "img64"
      raise cli.ConfigError("model.metric='fid' needs model.eval.ref_stats", "config.model.eval.ref_stats",
                            f"pass EDM2's https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/{res}.pkl, or make "
                            "statistics with `python -m launch.evaluate --make_ref --images <dataset> --out ref.npz`")
    if not os.path.isfile(e.ref_stats):
      raise cli.ConfigError(f"reference statistics {e.ref_stats} not found", "config.model.eval.ref_stats",
                            "give EDM2's img64.pkl / img512.pkl (dataset-refs) or an .npz of mu and sigma")
    if not (e.get("inception") or os.environ.get("DDO_JAX_INCEPTION")):
      raise cli.ConfigError("model.metric='fid' needs model.eval.inception", "config.model.eval.inception",
                            "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth or set $DDO_JAX_INCEPTION")
    if self.space == "latent" and not self._vae_dir:
      raise cli.ConfigError("model.metric='fid' on latents decodes the samples with the SD VAE", "config.model.vae",
                            VAE_FIX_CONFIG)
    if self.space == "latent":
      _check_vae_dir(self._vae_dir, "config.model.vae")
    guide = e.get("guide", "") or ""
    if (self.guidance != 1.0) != bool(guide):
      raise cli.ConfigError(f"model.eval.guidance={self.guidance:g} with model.eval.guide={guide!r}: autoguidance "
                            "needs both", "config.model.eval.guide",
                            "set both (DDO's img512 protocol: the converted edm2-img512-xs-0134217-0.165.pkl with "
                            "guidance 1.1) or neither (guidance 1.0, no guide)")
    if guide and not os.path.isfile(os.path.join(guide, "model.json")):
      raise cli.ConfigError(f"no converted EDM2 guide network at {guide} (no model.json)", "config.model.eval.guide",
                            "convert it with `python -m launch.convert edm2 --src edm2-img512-xs-0134217-0.165.pkl "
                            "--out <dir>` and pass that folder")

  def _check_data(self) -> None:
    """Fail at start, in one line, for a dataset that is not there."""
    d = self.config.data
    if d.source not in DATA_SOURCES:
      raise cli.ConfigError(f"model.data.source={d.source!r} is not an EDM2 data source",
                            "config.model.data.source", f"use one of {', '.join(DATA_SOURCES)}")
    if d.source == "edm2_zip":
      from ddo_jax.data import edm2_zip  # pylint: disable=import-outside-toplevel
      edm2_zip.check(d.path, self.space)
      return
    if d.source == "synthetic":
      return
    if self.space == "latent":   # pixels encoded on the fly need the VAE
      if not self._vae_dir:
        raise cli.ConfigError(f"model.data.source={d.source!r} on latents encodes the images with the SD VAE",
                              "config.model.vae", VAE_FIX_CONFIG)
      _check_vae_dir(self._vae_dir, "config.model.vae")
    if d.source == "folder":
      from ddo_jax.data import imagenet  # pylint: disable=import-outside-toplevel
      imagenet.folder_index(d.path)
    elif d.source == "tfds":
      from ddo_jax.data import imagenet  # pylint: disable=import-outside-toplevel
      imagenet.open_tfds(d.get("split", "train") or "train", d.get("data_dir") or None)

  # --- pure functions -------------------------------------------------------------------------------
  def init_params(self, rng):
    return edm2_unet.init_variables(self.net, rng)

  def denoise(self, params, x, sigma, labels=None):
    return self.net.apply(params, x, sigma, labels)

  def project_params(self, params):
    """EDM2's forced weight normalization of every MPConv weight but logvar_linear's (unused by DDO)."""
    out = dict(params)
    out["params"] = edm2_unet.forced_weight_normalization(params["params"], exclude=("logvar_linear",))
    return out

  def encode_latents(self, moments, key):
    """Raw VAE moments cat[mean, std] [B, h, w, 2C] -> a posterior sample, scaled as EDM2's encoder."""
    mean, std = jnp.split(jnp.asarray(moments, jnp.float32), 2, axis=-1)
    x = mean + jax.random.normal(key, mean.shape, jnp.float32) * std
    return x * jnp.asarray(self.latent_scale) + jnp.asarray(self.latent_bias)

  def real_x(self, real, key):
    return self.encode_latents(real["x"], key) if self.space == "latent" else real["x"]

  def log_ratio_given_noise(self, params, ref_params, x_real, x_fake, sigma, noise, labels_real=None,
                            labels_fake=None):
    """(gap_real, gap_fake) for given sigma [N] and noise = sigma * eps [N, ...] (shared by all four terms),
    and the four log-likelihoods (for tests): logp_theta, logp_ref over [real; fake]."""
    n = x_real.shape[0]
    x = jnp.concatenate([x_real, x_fake])
    noise2, sigma2 = jnp.concatenate([noise, noise]), jnp.concatenate([sigma, sigma])
    labels = None if labels_real is None else jnp.concatenate([labels_real, labels_fake])
    logp_theta = diffusion.weighted_logp(self.denoise, params, x, noise2, sigma2, labels, self.sigma_data)
    logp_ref = jax.lax.stop_gradient(
        diffusion.weighted_logp(self.denoise, ref_params, x, noise2, sigma2, labels, self.sigma_data))
    gap = logp_theta - logp_ref
    return (gap[:n], gap[n:]), (logp_theta, logp_ref)

  def log_ratio(self, params, ref_params, batch, rng):
    c = self.config
    real, fake = batch["real"], batch["fake"]
    lr, lf = (real.get("label"), fake.get("label")) if self.label_dim else (None, None)
    if self.label_dim and (lr is None or lf is None):
      raise ValueError("a class-conditional EDM2 needs labels on real and fake batches; the dataset has none")
    k_post, k_noise = jax.random.split(rng)
    x_real, x_fake = self.real_x(real, k_post), fake["x"]
    sigma, eps = diffusion.draw_sigma_and_noise(k_noise, x_real.shape, P_mean=c.P_mean, P_std=c.P_std)
    noise = sigma.reshape((-1,) + (1,) * (x_real.ndim - 1)) * eps
    gaps, _ = self.log_ratio_given_noise(params, ref_params, x_real, x_fake, sigma, noise, lr, lf)
    return gaps

  pretrain_loss = Family.pretrain_loss   # no pretraining: EDM2 starts from a converted checkpoint

  def sample(self, params, keys, seeds, dtype=jnp.float32):
    """Heun samples (pixels in [-1, 1] or latents), one per (key, seed); labels balanced or random."""
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

  def model_json(self) -> dict:
    meta = {"family": "edm2", "net": self.net_config, "space": self.space}
    if self.space == "latent":
      meta["latent"] = {"scale": self.latent_scale.tolist(), "bias": self.latent_bias.tolist()}
    return meta

  def check_converted(self, model_json_path) -> None:
    path = pathlib.Path(model_json_path)
    if not path.exists():
      return
    meta = json.loads(path.read_text())
    if meta.get("family") != "edm2":
      raise ValueError(f"{path} describes a {meta.get('family')!r} checkpoint, not an EDM2 one")
    a, b = _comparable(self.net_config), _comparable(meta["net"])
    if a != b:
      fa, fb = flatten_dict(a), flatten_dict(b)
      diff = [f"{k}: config {fa.get(k)!r} vs checkpoint {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
              if fa.get(k) != fb.get(k)]
      raise ValueError(f"the network in {path} differs from config.model.net:\n  " + "\n  ".join(diff))

  # --- sampling a saved model (launch.sample, launch.evaluate --model) ------------------------------
  SAMPLING_OPTIONS = ("labels", "num_steps", "S_churn", "float64", "guidance", "guide", "sampler", "vae")

  @classmethod
  def from_model_dir(cls, path, meta, options):
    """An EDM2 folder (`launch.convert edm2`: params/ + model.json, or a round folder of an EDM2 DDO run:
    chosen/ + model.json) sampled as DDO's EDM2_sample.py does.

    Options (None = default): --sampler heun (EDM2's edm_sampler, default) or dpmv3 (DDO's training-free
    DPM-Solver-v3); --steps (32 for heun, 25 for dpmv3); --labels balanced (default: the class of the seed at
    position p of the seed list is p mod label_dim, EDM2_sample.py's rule, `sampling.labels`) or random (a
    class drawn from the seed's key); --guidance G with --guide DIR (autoguidance by a converted EDM2 guide
    net, D = lerp(D_guide, D, G); each needs the other); --float64 (default: off for heun, as upstream's
    float32 edm_sampler, on for dpmv3, as upstream's float64 solver state; --nofloat64 turns it off);
    --S_churn (heun only, default 0); --vae DIR, required by latent (img512) models and refused for pixel
    ones: the SD-VAE folder of `launch.convert sd-vae`, decoding with the model's StabilityVAEEncoder
    scale and bias. A seed's noise is float32 normal from its key whatever the precision, as upstream's
    float32 torch noise. A converted folder's net runs with its model.json gain_dtype (the pickle's own
    forward); a round folder's is the plain float32 net that DDO trained.
    """
    import ml_collections  # pylint: disable=import-outside-toplevel
    refuse_options(options, cls.SAMPLING_OPTIONS, "an EDM2 model")
    sampler = options["sampler"] or "heun"
    if sampler not in SAMPLERS:
      raise cli.UserError(f"--sampler {sampler!r} is not an EDM2 sampler", "--sampler", "use heun or dpmv3")
    if sampler == "dpmv3":
      refuse_options(options, [k for k in cls.SAMPLING_OPTIONS if k != "S_churn"], "EDM2's --sampler dpmv3")
    guidance = 1.0 if options["guidance"] is None else float(options["guidance"])
    guide = options["guide"]
    if guidance != 1.0 and not guide:
      raise cli.UserError(f"--guidance {guidance:g} needs a guide network", "--guide",
                          "pass --guide <folder of a guide net converted with `python -m launch.convert edm2`> "
                          "(DDO's img512 protocol: edm2-img512-xs-0134217-0.165.pkl with --guidance 1.1), or drop "
                          "--guidance")
    if guide and guidance == 1.0:
      raise cli.UserError("--guide without --guidance: guidance 1 never calls the guide", "--guidance",
                          "pass the guidance weight, e.g. --guidance 1.1, or drop --guide")
    labels = options["labels"] or "balanced"
    num_steps = DEFAULT_STEPS[sampler] if options["num_steps"] is None else int(options["num_steps"])
    if num_steps < 1:
      raise cli.UserError(f"--steps {num_steps} is not positive", "--steps",
                          f"pass e.g. {DEFAULT_STEPS[sampler]} (the default of --sampler {sampler})")
    S_churn = 0.0 if options["S_churn"] is None else float(options["S_churn"])
    if S_churn < 0:
      raise cli.UserError(f"--S_churn {S_churn} is negative", "--S_churn", "pass 0 (deterministic) or more")
    float64 = (sampler == "dpmv3") if options["float64"] is None else bool(options["float64"])

    net_config, space, scale_bias = _model_dir_net(path, meta)
    if space == "pixel" and options["vae"]:
      raise cli.UserError(f"--vae means nothing for {path}, a pixel-space EDM2 model (its images are the "
                          "samples)", "--vae", "drop --vae")
    if space == "latent" and not options["vae"]:
      raise cli.UserError(f"{path} is a latent-space EDM2 model: its samples are SD-VAE latents", "--vae", VAE_FIX)
    config = dict(net=net_config, space=space, labels=labels, metric="denoise_loss", P_mean=-0.4, P_std=1.0,
                  data=dict(source="synthetic", num=0),
                  sampler=dict(num_steps=num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=S_churn))
    if space == "latent":
      config["latent"] = dict(scale=scale_bias[0], bias=scale_bias[1])
    family = cls(ml_collections.ConfigDict(config))
    family.net = edm2_unet.build_precond(net_config, gain_dtype=meta.get("gain_dtype"))
    family.sampler_name, family.guidance, family.float64 = sampler, guidance, float64
    family.gain_dtype = meta.get("gain_dtype")
    if guide:
      family._load_guide(pathlib.Path(guide))
    if space == "latent":
      family._load_vae(pathlib.Path(options["vae"]))
    return family, _load_variables(path, net_config)

  def _load_guide(self, guide: pathlib.Path, where: str = "--guide") -> None:
    from ddo_jax import families  # pylint: disable=import-outside-toplevel
    meta = families.read_model_json(guide)
    if meta.get("family", "edm") != "edm2":
      raise cli.UserError(f"{guide} holds a model of the family {meta.get('family', 'edm')!r}, not an EDM2 guide "
                          "network",
                          where, "give a folder written by `python -m launch.convert edm2` (e.g. of "
                          "edm2-img512-xs-0134217-0.165.pkl)")
    config, _, _ = _model_dir_net(guide, meta)
    mine = (self.net_config["img_resolution"], self.net_config["img_channels"], self.label_dim)
    theirs = (config["img_resolution"], config["img_channels"], int(config["label_dim"]))
    if mine != theirs:
      raise cli.UserError(f"the guide {guide} makes {theirs[0]}x{theirs[0]}x{theirs[1]} samples with "
                          f"{theirs[2]} classes, the model {mine[0]}x{mine[0]}x{mine[1]} with {mine[2]}",
                          where, "give a guide trained on the same data (resolution, channels, classes)")
    self.guide_net = edm2_unet.build_precond(config, gain_dtype=meta.get("gain_dtype"))
    self.guide_gain_dtype = meta.get("gain_dtype")
    self.guide_params = _load_variables(guide, config, where)

  def _load_vae(self, vae_dir: pathlib.Path, where: str = "--vae") -> None:
    """The SD VAE of a `launch.convert sd-vae` folder (model.json + params/) or of a diffusers folder
    (config.json + diffusion_pytorch_model.safetensors, converted in memory), as the latents' decoder."""
    if self.vae is not None:
      return
    from ddo_jax import families  # pylint: disable=import-outside-toplevel
    from ddo_jax.convert import sd_vae as sd_vae_convert  # pylint: disable=import-outside-toplevel
    from ddo_jax.nets import sd_vae  # pylint: disable=import-outside-toplevel
    _check_vae_dir(vae_dir, where)
    diffusers = not (vae_dir / "model.json").is_file()
    if diffusers:
      diffusers_config = json.loads((vae_dir / "config.json").read_text())
    else:
      meta = families.read_model_json(vae_dir)
      if meta.get("family") != "sd-vae" or "vae" not in meta:
        raise cli.UserError(f"{vae_dir} holds a model of the family {meta.get('family')!r}, not an SD-VAE", where,
                            VAE_FIX)
      diffusers_config = meta["vae"]
    try:
      config = sd_vae_convert.config_from_diffusers(diffusers_config)
    except ValueError as e:
      raise cli.UserError(f"{vae_dir}: {e}", where, VAE_FIX) from e
    vae = sd_vae.build_autoencoder_kl(config)
    c = self.sample_shape[2]
    if int(config["latent_channels"]) != c:
      raise cli.UserError(f"the VAE in {vae_dir} has {config['latent_channels']} latent channels, the model {c}",
                          where, "give the VAE the model was trained with (stabilityai/sd-vae-ft-mse)")
    if diffusers:
      from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
      try:
        _, host = sd_vae_convert.load_diffusers_folder(vae_dir)
      except (KeyError, ValueError) as e:
        raise cli.UserError(f"{vae_dir}: {str(e).splitlines()[0]}", where, VAE_FIX) from e
      params = jax.device_put(host, parallel.replicated(parallel.make_mesh()))
    else:
      params = load_replicated(vae_dir / "params", sd_vae.abstract_params(vae), where)
    self.vae = vae
    self.decoder = edm2_encoders.StabilityVAEEncoder(vae, scale=self.latent_scale, bias=self.latent_bias,
                                                     batch_size=VAE_DECODE_BATCH)
    self.vae_params = params
    out = jax.eval_shape(lambda p, z: vae.apply({"params": p}, z, method="decode"), params,
                         jax.ShapeDtypeStruct((1,) + tuple(self.sample_shape), jnp.float32))
    self.decoded_shape = tuple(int(d) for d in out.shape[1:])

  @property
  def image_shape(self):
    return tuple(getattr(self, "decoded_shape", None) or self.sample_shape)

  positions_matter = property(lambda self: bool(self.label_dim) and self.config.labels == "balanced")

  def sample_settings(self) -> dict:
    import hashlib  # pylint: disable=import-outside-toplevel
    from ddo_jax import tree_io  # pylint: disable=import-outside-toplevel
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel

    def checksum(tree):
      if tree is None:
        return None
      return hashlib.sha256(json.dumps(tree_io.tree_checksum(tree), sort_keys=True).encode()).hexdigest()

    s = self.config.sampler
    settings = {
        "family": "edm2", "image_shape": list(self.image_shape), "space": self.space,
        "sample_shape": list(self.sample_shape), "label_dim": self.label_dim,
        "labels": self.config.labels if self.label_dim else None,
        "float64": self.float64, "base_seed": seeded.CLI_BASE_SEED, "gain_dtype": self.gain_dtype,
        "sampler": self.sampler_name, "sampler.num_steps": s.num_steps, "sampler.sigma_min": s.sigma_min,
        "sampler.sigma_max": s.sigma_max, "guidance": self.guidance,
        "guide_params_checksum": checksum(self.guide_params), "guide_gain_dtype": self.guide_gain_dtype,
    }
    if self.sampler_name == "heun":
      settings.update({"sampler.rho": s.rho, "sampler.S_churn": s.S_churn})
    if self.space == "latent":
      settings.update({"latent_scale": self.latent_scale.tolist(), "latent_bias": self.latent_bias.tolist(),
                       "vae_params_checksum": checksum(self.vae_params)})
    return settings

  def _classes(self, keys, positions):
    """int32 classes [B]: position mod label_dim ('balanced') or drawn from each seed's key ('random')."""
    if self.config.labels == "balanced":
      return labels_lib.balanced_classes(jnp.asarray(positions, jnp.int32), self.label_dim)
    return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), [], 0, self.label_dim,
                                                 dtype=jnp.int32))(keys)

  def seed_classes(self, seeds, positions):
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    if not self.label_dim:
      return np.full(len(seeds), -1, np.int64)
    if self.config.labels == "balanced":
      return np.asarray(labels_lib.balanced_classes(np.asarray(positions, np.int64), self.label_dim), np.int64)
    keys = seeded.seed_keys(jax.random.key(seeded.CLI_BASE_SEED), jnp.asarray(np.asarray(seeds, np.int32)))
    return np.asarray(jax.jit(self._classes)(keys, np.asarray(positions, np.int32)), np.int64)

  def sample_latents(self, params, guide_params, keys, positions):
    """The sampler's output for per-seed keys and list positions: EDM2's Heun (autoguided) or DPM-Solver-v3,
    from float32 noise, in the float64 or float32 state `self.float64` chooses (traced under enable_x64 for
    float64). Returns (samples [B, h, w, C] float32, classes int32 [B] or None)."""
    s = self.config.sampler
    dtype = jnp.float64 if self.float64 else jnp.float32
    noise = jax.vmap(lambda k: jax.random.normal(k, self.sample_shape, jnp.float32))(keys).astype(dtype)
    classes = self._classes(keys, positions) if self.label_dim else None
    labels = labels_lib.one_hot_labels(classes, self.label_dim) if self.label_dim else None
    den = lambda x, sigma, l: self.net.apply(params, x, sigma, l)
    gden = None
    if self.guide_net is not None:
      gden = lambda x, sigma, l: self.guide_net.apply(guide_params, x, sigma, l)
    if self.sampler_name == "dpmv3":
      x = dpmv3.dpmv3_sample(den, noise, labels, guide=gden, guidance=self.guidance, num_steps=s.num_steps,
                             sigma_min=s.sigma_min, sigma_max=s.sigma_max)
    else:
      x = heun.edm2_heun_sample(den, noise, labels, guide=gden, guidance=self.guidance, num_steps=s.num_steps,
                                sigma_min=s.sigma_min, sigma_max=s.sigma_max, rho=s.rho, S_churn=s.S_churn,
                                keys=keys)
    return x.astype(jnp.float32), classes

  def _image_program(self, mesh):
    """jit of (bundle {'net', 'guide', 'vae'}, base_key, seeds, positions) -> {'images' uint8, 'classes'}, one
    per mesh: the sampler, then the VAE decoding each device's own rows (VAE_DECODE_BATCH at a time, never
    gathering the batch) or EDM2's StandardRGB decoding."""
    if mesh in self._programs:
      return self._programs[mesh]
    from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
    from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
    decode = jax.shard_map(lambda vae_params, x: self.decoder.decode(vae_params, x), mesh=mesh,
                           in_specs=(P(), P(parallel.BATCH_AXES)), out_specs=P(parallel.BATCH_AXES))

    def fn(p, keys, seeds, positions):
      del seeds
      x, classes = self.sample_latents(p["net"], p["guide"], keys, positions)
      images = decode(p["vae"], x) if self.space == "latent" else self.decoder.decode(None, x)
      out = {"images": images}
      if classes is not None:
        out["classes"] = classes
      return out

    program = make_position_sampler(fn, mesh, parallel.replicated(mesh))
    self._programs[mesh] = program
    return program

  def image_sampler(self, params, mesh):
    from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    program = self._image_program(mesh)
    bundle = jax.device_put({"net": params, "guide": self.guide_params, "vae": self.vae_params},
                            parallel.replicated(mesh))
    batch = parallel.batch_sharding(mesh)
    base = jax.random.key(seeded.CLI_BASE_SEED)

    def run(seeds, positions):
      with jax.enable_x64(self.float64):
        out = parallel.to_host(program(bundle, base, jax.device_put(np.asarray(seeds, np.int32), batch),
                                       jax.device_put(np.asarray(positions, np.int32), batch)))
      classes = (np.asarray(out["classes"], np.int64) if "classes" in out else np.full(len(seeds), -1, np.int64))
      return np.asarray(out["images"], np.uint8), classes

    return run

  # --- the round metric -----------------------------------------------------------------------------
  def evaluate(self, params, sample: Callable, seed: int) -> dict:
    """'denoise_loss' as EDM's, or 'fid': EDM2's FID protocol on model.eval.num_samples images of seeds 0..N-1
    with strict class balance (seed i has class i mod label_dim), EDM2's Heun (model.sampler) in float32,
    autoguided by model.eval.guide at model.eval.guidance when given, latents decoded by model.vae; each image
    is the one `launch.sample --seeds 0-<N-1>` makes from the saved round. Against model.eval.ref_stats: EDM2's
    dataset-refs .pkl (its 'fid' statistics) or an .npz."""
    if self.config.metric != "fid":
      return EDM.evaluate(self, params, sample, seed)
    from ddo_jax import parallel, utils  # pylint: disable=import-outside-toplevel
    from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
    from ddo_jax.metrics import reference_stats  # pylint: disable=import-outside-toplevel
    e = self.config.eval
    if self.space == "latent":
      self._load_vae(pathlib.Path(self._vae_dir), "config.model.vae")
    if e.get("guide") and self.guide_net is None:
      self._load_guide(pathlib.Path(e.guide), "config.model.eval.guide")
    if self._evaluator is None:
      self._evaluator = evaluator_lib.Evaluator(
          evaluator_lib.load_inception(e.inception or None), batch_size=e.batch_size,
          ref_stats=reference_stats.load_reference_stats(e.ref_stats), compute_is=e.num_samples >= 10)
    ev = self._evaluator
    ev.reset()
    sharding = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or "data" not in mesh.shape:
      mesh = parallel.make_mesh()
    shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
    run = self.image_sampler(params, mesh)
    n, bs = int(e.num_samples), int(e.batch_size)
    bs = -(-bs // shards) * shards
    progress = utils.Progress("fid samples" + (f" (guidance {self.guidance:g})" if self.guide_net else ""), n,
                              unit="images")
    for start in range(0, n, bs):
      stop = min(start + bs, n)
      ids = np.arange(start, start + -(-(stop - start) // shards) * shards, dtype=np.int32)
      images, _ = run(ids, ids)
      ev.add_global_uint8(images[:stop - start])
      progress.update(stop)
    return ev.result()

  # --- data and evaluation (host side) --------------------------------------------------------------
  def real_source(self, seed: int):
    """Training examples {'x', 'label'}: images in [-1, 1] (pixel) or raw VAE moments (latent)."""
    del seed
    if self._source is None:
      d = self.config.data
      r, c = self.sample_shape[0], self.sample_shape[2]
      if d.source == "edm2_zip":
        from ddo_jax.data import edm2_zip  # pylint: disable=import-outside-toplevel
        self._source = edm2_zip.load(d.path, self.space, self.label_dim)
      elif d.source in ("tfds", "folder", "synthetic_images"):
        self._source = self._pixel_source(d)
      elif self.space == "pixel":
        from ddo_jax.data import cifar10  # pylint: disable=import-outside-toplevel
        if self.label_dim not in (0, cifar10.NUM_CLASSES):
          raise cli.ConfigError("synthetic pixel data has 10 classes", "config.model.net.label_dim", "use 10 or 0")
        self._source = cifar10.load_synthetic(int(d.num), r)
        log.warning("EDM2 training data is SYNTHETIC (class-coloured discs, not ImageNet)")
      else:
        moments, labels = synthetic_latents(int(d.num), r, c, max(self.label_dim, 1))
        onehot = np.eye(max(self.label_dim, 1), dtype=np.float32)[labels]

        def source(indices):
          idx = np.asarray(indices, np.int64).reshape(-1)
          out = {"x": moments[idx]}
          if self.label_dim:
            out["label"] = onehot[idx]
          return out

        self._source = (source, len(moments))
        log.warning("EDM2 training data is SYNTHETIC latents (%d, %dx%dx%d moments), not ImageNet VAE latents",
                    len(moments), r, r, 2 * c)
    return self._source

  def _pixel_source(self, d):
    """ImageNet (tfds or folder, EDM2's center crop) or SYNTHETIC disc images, as pixels or, for latent models,
    encoded on the fly into raw VAE moments by model.vae (`ddo_jax.data.edm2_imagenet`)."""
    from ddo_jax.data import cifar10, edm2_imagenet  # pylint: disable=import-outside-toplevel
    encode = None
    if self.space == "latent":
      self._load_vae(pathlib.Path(self._vae_dir), "config.model.vae")
      encode = self.pixel_encoder()
    res = self.image_shape[0]
    if d.source == "synthetic_images":
      if self.label_dim not in (0, cifar10.NUM_CLASSES):
        raise cli.ConfigError("synthetic images have 10 classes", "config.model.net.label_dim", "use 10 or 0")
      images, ids = cifar10.synthetic_images(int(d.num), res)
      log.warning("EDM2 training data is SYNTHETIC (%d class-coloured disc images %dx%d, not ImageNet)%s",
                  len(images), res, res, ", encoded by the VAE of model.vae" if encode else "")
      read, n = (lambda idx: (images[idx], ids[idx])), len(images)
    else:
      base, n = edm2_imagenet.open_source(d, res, self.label_dim)
      read = base.uint8_batch
    return edm2_imagenet.model_source(read, n, self.label_dim, encode)

  def pixel_encoder(self):
    """uint8 images [B, H, W, 3] -> raw moments cat[mean, std] [B, h, w, 2C] (numpy), EDM2's
    StabilityVAEEncoder.encode_pixels (VAE_ENCODE_BATCH images at a time), one jitted program per batch size."""
    enc = edm2_encoders.StabilityVAEEncoder(self.vae, scale=self.latent_scale, bias=self.latent_bias,
                                            batch_size=VAE_ENCODE_BATCH)
    fn = jax.jit(enc.encode_pixels, compiler_options=xla_options.compiler_options())
    params = self.vae_params
    return lambda pixels: np.asarray(fn(params, jnp.asarray(pixels, jnp.uint8)))

  def ground_truth(self, seed: int, num: int) -> np.ndarray:
    source, n = self.real_source(seed)
    idx = np.sort(np.random.default_rng([seed, 4]).choice(n, size=min(num, n), replace=False))
    x = source(idx)["x"]
    if self.space == "latent":
      x = np.asarray(self.encode_latents(x, jax.random.key(seed)))
    return np.asarray(x)

  def _denoise_loss(self, params, seed: int) -> float:
    """EDM's weighted denoising loss on a fixed held-out batch at fixed noise levels (latents: a fixed
    posterior sample)."""
    source, n = self.real_source(seed)
    idx = np.random.default_rng([seed, 9]).permutation(n)[:min(n, self.config.eval_batch)]
    batch = source(idx)
    fn = self._val_fn
    if fn is None:
      def loss(p, x, labels):
        if self.space == "latent":
          x = self.encode_latents(x, jax.random.key(seed + 1))
        sigma = jnp.exp(jnp.linspace(-3.0, 2.0, x.shape[0]))
        eps = jax.random.normal(jax.random.key(seed), x.shape, jnp.float32)
        noise = sigma.reshape(-1, 1, 1, 1) * eps
        return -jnp.mean(diffusion.weighted_logp(self.denoise, p, x, noise, sigma, labels, self.sigma_data))
      fn = self._val_fn = jax.jit(loss)
    labels = jnp.asarray(batch["label"]) if self.label_dim and "label" in batch else None
    return float(fn(params, jnp.asarray(batch["x"]), labels))

  def plot_samples(self, ax, x, title):
    if self.space == "latent":
      # Latents shown as they are (channels 0-2 mapped from EDM2's +-2 range), not decoded by the VAE.
      x = np.asarray(x)[..., :3] / 2.0
    EDM.plot_samples(self, ax, x, title)


def _check_vae_dir(vae_dir, where: str) -> None:
  """One line unless vae_dir is a `launch.convert sd-vae` folder (model.json) or a diffusers AutoencoderKL folder
  (config.json and its weights)."""
  d = pathlib.Path(vae_dir)
  if (d / "model.json").is_file():
    return
  if (d / "config.json").is_file():
    from ddo_jax.convert import sd_vae as sd_vae_convert  # pylint: disable=import-outside-toplevel
    try:
      sd_vae_convert.weight_file(d)
      return
    except (FileNotFoundError, ValueError) as e:
      raise cli.UserError(f"{d}: {str(e).splitlines()[0]}", where, VAE_FIX) from e
  raise cli.UserError(f"no SD VAE at {d} (neither model.json nor a diffusers config.json)", where, VAE_FIX)


def _model_dir_net(path, meta):
  """(net config without dropout, space, (scale, bias) or None) of an EDM2 model folder's model.json: a
  converted folder describes its space by its encoder, a round folder by 'space' and 'latent'."""
  from ddo_jax.convert import edm2 as edm2_convert  # pylint: disable=import-outside-toplevel
  if "net" not in meta:
    raise cli.UserError(f"{path}/model.json has no 'net'", "--model",
                        "give a folder written by `python -m launch.convert edm2` or a round folder of an EDM2 run")
  net = edm2_convert.normalize_config(meta["net"])
  net.setdefault("unet_kwargs", {})["dropout"] = 0.0   # sampling runs the net in eval mode (no dropout)
  encoder = meta.get("encoder")
  if encoder is not None:
    latent = encoder.get("class_name") == "StabilityVAEEncoder"
    scale_bias = (list(encoder["scale"]), list(encoder["bias"])) if latent else None
  else:
    latent = meta.get("space", "pixel") == "latent"
    scale_bias = (list(meta["latent"]["scale"]), list(meta["latent"]["bias"])) if latent else None
  return net, ("latent" if latent else "pixel"), scale_bias


def _load_variables(path, net_config, where: str = "--model") -> dict:
  """The {'params', 'buffers'} variables of an EDM2 folder, params/ (converted) or chosen/ (round), replicated."""
  path = pathlib.Path(path)
  tree = path / "params" if (path / "params").exists() else path / "chosen"
  if not tree.is_dir():
    raise cli.UserError(f"{path} has neither params/ nor chosen/", where,
                        "give a folder written by `python -m launch.convert edm2` or a round folder of an EDM2 run")
  abstract = edm2_unet.abstract_variables(edm2_unet.build_precond(net_config))
  return load_replicated(tree, abstract, where)


__all__ = ["EDM2", "synthetic_latents", "to_uint8"]
