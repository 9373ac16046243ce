"""VAR family (Tian et al. 2024): next-scale prediction over the token maps of VAR's multi-scale VQVAE.

Likelihood (METHOD.md §3.1): an image is tokenized by the frozen VQVAE (`img_to_idx`, then
`idx_to_var_input` for teacher forcing) and log p(x | class) is the exact sum over all L tokens of the
VAR's log-softmax (`nets.var.seq_logp`). gap = seq_logp(theta) - stop_gradient(seq_logp(ref)) on the same
tokens and labels. Tokenization runs inside the jitted step, on pixels in [-1, 1], for reals and fakes.

Label dropout (METHOD.md §3.2): one Bernoulli(model.uncond_ratio) per (real i, fake i) pair; a dropped pair
uses the null class (`num_classes`) for both, and the row weights are `objective.var_weights` (real
max(alpha, 1), fake 0 on dropped pairs; 1, alpha otherwise; normalizer max(alpha, 1)). The mask is drawn by
`sample` from each negative's own key and travels with the fake batch as batch['fake']['uncond'], so
`log_ratio` and `ddo_weights` read the same mask (ddo_weights gets no key) and a resumed run redraws it
identically.

Negatives (METHOD.md §3.3): the reference's samples with model.negatives' guidance (DDO: cfg 1.0 read as
w = cfg - 1 = 0, guidance-free; no top-k / top-p)
decoded to pixels, x = 2 image - 1, and re-encoded by `log_ratio` (the pixel round trip). Online
(`sample_paired`, upstream's protocol) fake i is sampled with the class of real i; offline negatives
(`sample`, drawn before the round without the real batch) take a uniform class from their key.

The VQVAE is frozen and held by the family (not in the trained parameters): converted from
model.vae_checkpoint (`launch.convert vqvae`), or, for the `tiny` config, initialized from a fixed seed with
the architecture of model.vae. Its parameters enter the jitted programs as constants.

Selection metrics: 'nll' (mean negative log-likelihood per token of a fixed held-out batch of real data,
conditional; cheap, for tests) or 'fid_cfg<c>' (FID of model.eval.per_class class-balanced samples per class at
guidance c, for every c of model.eval.cfg, with 'is_cfg<c>', against model.eval.ref_stats: OpenAI's
VIRTUAL_imagenet256_labeled.npz for ImageNet-256; `evaluate`).
"""
import json
import pathlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax import cli, objective, xla_options
from ddo_jax.families.base import Family, load_replicated, make_position_sampler, refuse_options
from ddo_jax.nets import var as var_net
from ddo_jax.nets import var_vqvae
from ddo_jax.sampling import labels as labels_lib
from ddo_jax.sampling import var_sample
from ddo_jax.utils import log

VAE_SEED = 20240517   # the fixed seed of a randomly initialized (tiny) VQVAE
VAE_FIX = "convert vae_ch160v4096z32.pth with `python -m launch.convert vqvae` and pass its --out"


def _get(c, key, default=None):
  try:
    v = c.get(key, default)
  except AttributeError:
    v = getattr(c, key, default)
  return default if v is None else v


class VAR(Family):
  """The family object; `config` is the run config's `model` block (configs/var_imagenet256.py)."""
  name = "var"
  metric_mode = "min"

  def __init__(self, config, vae=None):
    """`vae`: an already loaded (VQVAE module, {'params': tree}) to use instead of the config's."""
    super().__init__(config)
    self._source = self._val_fn = self._evaluator = None
    self._eval_fns = {}
    self.num_classes = int(config.num_classes)
    self.uncond_ratio = float(config.uncond_ratio)
    if not 0.0 <= self.uncond_ratio <= 1.0:
      raise cli.ConfigError(f"model.uncond_ratio={self.uncond_ratio} is not a probability",
                            "config.model.uncond_ratio", "use a value in [0, 1] (DDO: 0.5)")
    self.metric = str(config.metric)
    self.fid_cfgs = {}
    if self.metric != "nll":
      self._check_fid_config(config)
    patch_nums = tuple(int(p) for p in config.patch_nums)
    self.vae, self.vae_params = vae if vae is not None else self._load_vae(config, patch_nums)
    depth = int(config.depth)
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}.get(str(_get(config, "compute_dtype", "float32")))
    if dtype is None:
      raise cli.ConfigError(f"model.compute_dtype={config.compute_dtype!r} is not supported",
                            "config.model.compute_dtype", "use 'float32' or 'bfloat16'")
    self.net_config = dict(
        vocab_size=int(self.vae.vocab_size), cvae=int(self.vae.z_channels), depth=depth,
        embed_dim=int(_get(config, "embed_dim", 64 * depth)), num_heads=int(_get(config, "num_heads", depth)),
        num_classes=self.num_classes, patch_nums=list(patch_nums), mlp_ratio=4.0, norm_eps=1e-6,
        attn_l2_norm=True, shared_aln=False)
    self.net = var_net.build_var(dict(self.net_config, dtype=dtype))
    self.image_size = int(self.vae.img_size)
    neg = config.negatives
    self.neg = dict(cfg=float(neg.cfg), guidance=str(_get(neg, "cfg_convention", var_sample.GUIDANCE_VAR)),
                    top_k=int(neg.top_k), top_p=float(neg.top_p), more_smooth=bool(neg.more_smooth))
    if self.neg["guidance"] not in var_sample.GUIDANCE_CONVENTIONS:
      raise cli.ConfigError(f"model.negatives.cfg_convention={self.neg['guidance']!r} is not a CFG convention",
                            "config.model.negatives.cfg_convention",
                            f"use one of {list(var_sample.GUIDANCE_CONVENTIONS)} (DDO: one_plus_w with cfg 1.0)")
    d = config.data
    if _get(d, "source") == "synthetic" and int(_get(d, "resolution", self.image_size)) != self.image_size:
      raise cli.ConfigError(f"model.data.resolution={d.resolution} but the VQVAE makes {self.image_size}px images",
                            "config.model.data.resolution", f"use {self.image_size}")

  @staticmethod
  def _load_vae(config, patch_nums):
    path = str(_get(config, "vae_checkpoint", ""))
    if path:
      from ddo_jax.convert import vqvae as vqvae_convert  # pylint: disable=import-outside-toplevel
      if not pathlib.Path(path).is_dir():
        raise cli.ConfigError(f"no converted VQVAE at {path}", "config.model.vae_checkpoint", VAE_FIX)
      vae, variables = vqvae_convert.load_converted(path)
      if tuple(int(p) for p in vae.patch_nums) != patch_nums:
        raise cli.ConfigError(f"the VQVAE in {path} has patch_nums {tuple(vae.patch_nums)}, the config "
                              f"{patch_nums}", "config.model.vae_checkpoint",
                              "convert it again with --patch_nums matching config.model.patch_nums")
      return vae, jax.tree_util.tree_map(jnp.asarray, variables)
    arch = _get(config, "vae")
    if not arch:
      raise cli.ConfigError("model.vae_checkpoint is empty", "config.model.vae_checkpoint", VAE_FIX)
    vae = var_vqvae.VQVAE(vocab_size=int(arch.vocab_size), z_channels=int(arch.z_channels), ch=int(arch.ch),
                          share_quant_resi=int(arch.share_quant_resi), patch_nums=patch_nums)
    log.warning("the VQVAE is RANDOMLY INITIALISED (seed %d; model.vae_checkpoint empty): smoke runs only", VAE_SEED)
    return vae, random_vae_params(vae, VAE_SEED)

  def _check_fid_config(self, config) -> None:
    """model.metric 'fid_cfg<c>' for a c of model.eval.cfg; the Inception weights and reference statistics given."""
    import os  # pylint: disable=import-outside-toplevel
    e = _get(config, "eval")
    cfgs = [float(c) for c in (_get(e, "cfg", ()) if e is not None else ())]
    self.fid_cfgs = {f"fid_cfg{c}": c for c in cfgs}
    if self.metric not in self.fid_cfgs:
      raise cli.ConfigError(f"model.metric={self.metric!r} is not 'nll' or one of {sorted(self.fid_cfgs)}",
                            "config.model.metric", "use 'nll' or fid_cfg<c> for a c of model.eval.cfg, e.g. fid_cfg1.0")
    convention = str(_get(e, "cfg_convention", var_sample.GUIDANCE_ONE_PLUS_W))
    if convention not in var_sample.GUIDANCE_CONVENTIONS:
      raise cli.ConfigError(f"model.eval.cfg_convention={convention!r} is not a CFG convention",
                            "config.model.eval.cfg_convention", f"use one of {list(var_sample.GUIDANCE_CONVENTIONS)}")
    if int(_get(e, "per_class", 0)) < 1:
      raise cli.ConfigError(f"model.eval.per_class={_get(e, 'per_class')!r} is not a positive count",
                            "config.model.eval.per_class", "use 50 (DDO's 50k FID samples)")
    if not _get(e, "ref_stats", ""):
      raise cli.ConfigError(f"model.metric={self.metric!r} needs model.eval.ref_stats", "config.model.eval.ref_stats",
                            "pass OpenAI's VIRTUAL_imagenet256_labeled.npz (guided-diffusion's evaluation suite)")
    if not (_get(e, "inception", "") or os.environ.get("DDO_JAX_INCEPTION")):
      raise cli.ConfigError(f"model.metric={self.metric!r} needs model.eval.inception", "config.model.eval.inception",
                            "pass pytorch-fid's pt_inception-2015-12-05-6726825d.pth or set $DDO_JAX_INCEPTION")

  # --- pure functions -------------------------------------------------------------------------------
  def init_params(self, rng):
    b = 1
    x = jnp.zeros((b, var_net.seq_len(self.net.patch_nums) - self.net.patch_nums[0] ** 2, self.net.cvae))
    return {"params": self.net.init(rng, jnp.zeros((b,), jnp.int32), x)["params"]}

  def tokenize(self, x):
    """Pixels [B, H, W, 3] in [-1, 1] -> (tokens [B, L] int32, teacher-forcing input [B, L - pn0^2, Cvae])."""
    idx = var_vqvae.img_to_idx(self.vae, self.vae_params, jnp.asarray(x, jnp.float32))
    x_in = var_vqvae.idx_to_var_input(self.vae, self.vae_params, idx)
    return jnp.concatenate(idx, axis=1), x_in

  def seq_logp(self, params, labels, tokens, x_in):
    return var_net.seq_logp(self.net.apply(params, labels, x_in), tokens)

  @staticmethod
  def _class(label):
    label = jnp.asarray(label)
    return jnp.argmax(label, -1).astype(jnp.int32) if label.ndim == 2 else label.astype(jnp.int32)

  def pair_labels(self, batch):
    """(labels_real, labels_fake) int32 [B] with the null class on the pairs of batch['fake']['uncond']."""
    mask = jnp.asarray(batch["fake"]["uncond"], bool)
    null = jnp.int32(self.num_classes)
    return (jnp.where(mask, null, self._class(batch["real"]["label"])),
            jnp.where(mask, null, self._class(batch["fake"]["label"])))

  def log_ratio(self, params, ref_params, batch, rng):
    del rng   # the mask comes with the fakes; tokenization and the likelihood are deterministic
    lr, lf = self.pair_labels(batch)
    n = lr.shape[0]
    x = jnp.concatenate([jnp.asarray(batch["real"]["x"], jnp.float32), jnp.asarray(batch["fake"]["x"], jnp.float32)])
    tokens, x_in = jax.lax.stop_gradient(self.tokenize(x))
    gap = self.token_gaps(params, ref_params, tokens, x_in, jnp.concatenate([lr, lf]))
    return gap[:n], gap[n:]

  def token_gaps(self, params, ref_params, tokens, x_in, labels):
    """seq_logp(theta) - stop_gradient(seq_logp(ref)) [N] of token sequences [N, L] with their teacher-forcing
    input [N, L - pn0^2, Cvae] and labels [N] (the null class already applied)."""
    return self.seq_logp(params, labels, tokens, x_in) - jax.lax.stop_gradient(
        self.seq_logp(ref_params, labels, tokens, x_in))

  def ddo_weights(self, batch, alpha):
    return objective.var_weights(alpha, batch["fake"]["uncond"])

  def sample(self, params, keys, seeds):
    """Guidance-free reference samples {'x' [B, H, W, 3] in [-1, 1], 'label' int32, 'uncond' bool}: per key a
    uniform class, the pair's label-dropout draw, and one VAR sample (offline negatives)."""
    del seeds
    labels = jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), [], 0, self.num_classes,
                                                   dtype=jnp.int32))(keys)
    return self._negatives(params, keys, labels)

  def sample_paired(self, params, keys, seeds, real):
    """Online negatives as upstream draws them: fake i has the class of real i (METHOD.md §3.3)."""
    del seeds
    return self._negatives(params, keys, self._class(real["label"]))

  def _negatives(self, params, keys, labels):
    uncond = jax.vmap(lambda k: jax.random.bernoulli(jax.random.fold_in(k, 2), self.uncond_ratio))(keys)
    return {"x": self._images(params, keys, labels) * 2.0 - 1.0, "label": labels, "uncond": uncond}

  def _images(self, params, keys, labels, opts=None):
    """One image [H, W, 3] in [0, 1] per key and class, with the guidance and sampling options `opts`
    (default model.negatives')."""
    opts = self.neg if opts is None else opts

    def one(k, label):
      out = var_sample.autoregressive_infer_cfg(self.net, params, self.vae, self.vae_params, var_vqvae,
                                                label[None], jax.random.fold_in(k, 3), **opts)
      return out["image"][0]

    return jax.vmap(one)(keys, labels)

  # --- host side ------------------------------------------------------------------------------------
  def real_source(self, seed: int):
    """Training examples {'x': [B, H, W, 3] in [-1, 1], 'label': int32 [B]}."""
    if self._source is None:
      d = self.config.data
      if _get(d, "source") == "synthetic":
        from ddo_jax.data import cifar10  # pylint: disable=import-outside-toplevel
        if self.num_classes != cifar10.NUM_CLASSES:
          raise cli.ConfigError("synthetic VAR data has 10 classes", "config.model.num_classes", "use 10")
        src, n = cifar10.load_synthetic(int(_get(d, "num", 64)), self.image_size)

        def source(indices):
          out = dict(src(indices))
          label = np.asarray(out["label"])
          out["label"] = (np.argmax(label, -1) if label.ndim == 2 else label).astype(np.int32)
          return out

        self._source = (source, n)
        log.warning("VAR training data is SYNTHETIC (%d class-coloured discs %dx%d), not ImageNet", n,
                    self.image_size, self.image_size)
      else:
        from ddo_jax.data import imagenet  # pylint: disable=import-outside-toplevel
        self._source = imagenet.load(d, seed, self.num_classes)
    return self._source

  def ground_truth(self, seed: int, num: int):
    source, n = self.real_source(seed)
    idx = np.sort(np.random.default_rng([seed, 4]).choice(n, size=min(num, n), replace=False))
    return np.asarray(source(idx)["x"])

  def evaluate(self, params, sample: Callable, seed: int) -> dict:
    """'nll': mean negative log-likelihood per token (nats) of a fixed held-out batch of real images with
    their classes; always computed (cheap). With a 'fid_cfg<c>' metric also, for every c of model.eval.cfg,
    'fid_cfg<c>' and 'is_cfg<c>' of model.eval.per_class samples per class (sample i has class i mod classes
    and the key fold_in(key(seed + 30000), i); guidance c under model.eval.cfg_convention, eval top_k / top_p)
    against model.eval.ref_stats, as DDO_trainer.py scores every checkpoint at cfg 1.0 and 1.5."""
    del sample
    out = {"nll": self._nll(params, seed)}
    for name, c in self.fid_cfgs.items():
      out.update(self._fid(params, seed, name, c))
    return out

  def _fid(self, params, seed: int, name: str, cfg: float) -> dict:
    from ddo_jax import utils  # pylint: disable=import-outside-toplevel
    from ddo_jax.metrics import evaluator as evaluator_lib  # pylint: disable=import-outside-toplevel
    from ddo_jax.metrics import reference_stats  # pylint: disable=import-outside-toplevel
    e = self.config.eval
    if self._evaluator is None:
      self._evaluator = evaluator_lib.Evaluator(
          evaluator_lib.load_inception(_get(e, "inception", "") or None), batch_size=int(_get(e, "batch_size", 200)),
          ref_stats=reference_stats.load_reference_stats(e.ref_stats), compute_is=True, num_is_splits=10)
    ev = self._evaluator
    ev.reset()
    n = int(e.per_class) * self.num_classes
    bs = int(_get(e, "sample_batch", 0)) or n
    run = self._eval_sampler(params, cfg)
    base = jax.random.key(seed + 30_000)
    progress = utils.Progress(f"FID samples (cfg {cfg})", n, unit="images")
    for start in range(0, n, bs):
      ids = np.arange(start, min(start + bs, n), dtype=np.int32)
      ev.add_global_uint8(run(params, base, ids))
      progress.update(int(ids[-1]) + 1)
    r = ev.result()
    suffix = name[len("fid_"):]
    return {name: float(r["fid"]), f"is_{suffix}": float(r.get("is_mean", float("nan")))}

  def _eval_sampler(self, params, cfg: float):
    """fn(params, base_key, ids [B] int32) -> host uint8 images [B, H, W, 3] (class ids mod classes, one compile
    per cfg value), batch-sharded over the parameters' mesh when they live on one."""
    from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
    cache = self._eval_fns
    if cfg not in cache:
      e = self.config.eval
      opts = dict(cfg=float(cfg), guidance=str(_get(e, "cfg_convention", var_sample.GUIDANCE_ONE_PLUS_W)),
                  top_k=int(_get(e, "top_k", 0)), top_p=float(_get(e, "top_p", 0.0)), more_smooth=False)

      def fn(p, keys, seeds, positions):
        del seeds
        x = self._images(p, keys, labels_lib.balanced_classes(positions, self.num_classes), opts)
        return jnp.floor(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)

      leaf_sharding = getattr(jax.tree_util.tree_leaves(params)[0], "sharding", None)
      mesh = getattr(leaf_sharding, "mesh", None)
      if mesh is not None and "data" in mesh.shape:
        program = make_position_sampler(fn, mesh, jax.tree_util.tree_map(lambda a: a.sharding, params))
        shards = mesh.shape["data"] * mesh.shape.get("fsdp", 1)
        batch = parallel.batch_sharding(mesh)
      else:
        from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
        program = jax.jit(lambda p, base, seeds, pos: fn(p, seeded.seed_keys(base, seeds), seeds, pos),
                          compiler_options=xla_options.compiler_options())
        shards, batch = 1, None

      def run(p, base, ids):
        pad = (-len(ids)) % shards
        full = np.concatenate([ids, np.full(pad, ids[-1], np.int32)])
        put = (lambda a: jax.device_put(a, batch)) if batch is not None else jnp.asarray
        return np.asarray(parallel.to_host(program(p, base, put(full), put(full))))[:len(ids)]

      cache[cfg] = run
    return cache[cfg]

  def _nll(self, params, seed: int) -> float:
    source, n = self.real_source(seed)
    idx = np.sort(np.random.default_rng([seed, 9]).permutation(n)[:min(n, int(_get(self.config, "eval_batch", 16)))])
    batch = source(idx)
    if self._val_fn is None:
      big_l = var_net.seq_len(self.net.patch_nums)

      def nll(p, x, labels):
        tokens, x_in = self.tokenize(x)
        return -jnp.mean(self.seq_logp(p, labels, tokens, x_in)) / big_l

      self._val_fn = jax.jit(nll)
    return float(self._val_fn(params, jnp.asarray(batch["x"]), jnp.asarray(batch["label"], jnp.int32)))

  def plot_samples(self, ax, x, title):
    from ddo_jax.families.edm import EDM  # pylint: disable=import-outside-toplevel
    EDM.plot_samples(self, ax, x, title)

  def model_json(self) -> dict:
    return {"family": "var", "net": self.net_config, "vae": var_vqvae_kwargs(self.vae),
            "vae_checkpoint": str(_get(self.config, "vae_checkpoint", ""))}

  def check_converted(self, model_json_path) -> None:
    path = pathlib.Path(model_json_path)
    if not path.exists():
      return
    meta = json.loads(path.read_text())
    if meta.get("family") != "var":
      raise cli.UserError(f"{path} describes a {meta.get('family', 'edm')!r} checkpoint, not a VAR one",
                          "config.init.checkpoint", "give a folder written by `python -m launch.convert var`")
    net = meta.get("net", {})
    mine = {k: self.net_config[k] for k in ("vocab_size", "cvae", "depth", "embed_dim", "num_heads", "num_classes",
                                           "patch_nums")}
    theirs = {k: (list(net[k]) if k == "patch_nums" else net[k]) for k in mine if k in net}
    diff = [f"{k}: config {mine[k]!r} vs checkpoint {theirs.get(k)!r}" for k in mine if theirs.get(k) != mine[k]]
    if diff:
      raise cli.UserError(f"the VAR in {path.parent} differs from the config ({'; '.join(diff)})",
                          "config.init.checkpoint", "set config.model.depth / patch_nums to the checkpoint's")


  # --- sampling a saved model (launch.sample, launch.evaluate --model) ------------------------------
  SAMPLING_OPTIONS = ("labels", "cfg", "cfg_convention", "top_k", "top_p", "more_smooth", "vae")

  @classmethod
  def from_model_dir(cls, path, meta, options):
    """A VAR folder (`launch.convert var`: params/ + model.json, or a round folder of a VAR DDO run: chosen/ +
    model.json) sampled with the protocol of DDO's VAR_sample.py.

    Options (None = default): --cfg (1.0) and --cfg_convention (one_plus_w: w = cfg - 1, so DDO's `--cfg 1.0`
    is guidance-free and 1.4 / 1.5 guided, METHOD.md §3.3; var: public VAR's w = cfg), --top_k (0 = off),
    --top_p (0 = off; both off is DDO's "w/o sampling tricks" FID protocol; its --trick is 900 / 0.96),
    --more_smooth (off), --labels balanced (default: the seed at position p of the seed list gets class
    p mod classes, so 50k seeds give DDO's 50 per class) or random (a class drawn from the seed's key),
    --vae DIR (the VQVAE converted with `launch.convert vqvae`; a round folder defaults to its run's
    model.vae_checkpoint, or to the run's fixed-seed random VQVAE when it had none). Each seed samples one
    image with its own key (upstream draws 25 per torch generator, g_seed = 1 + 2 cls + i, so its noise cannot
    be reproduced; the class balance is the same). Images are uint8 as VAR's sample code makes them:
    truncate(clip(x, 0, 1) * 255).
    """
    import ml_collections  # pylint: disable=import-outside-toplevel
    refuse_options(options, cls.SAMPLING_OPTIONS, "a VAR model")
    convention = options["cfg_convention"] or var_sample.GUIDANCE_ONE_PLUS_W
    if convention not in var_sample.GUIDANCE_CONVENTIONS:
      raise cli.UserError(f"--cfg_convention {convention!r} is not a CFG convention", "--cfg_convention",
                          f"use one of {', '.join(var_sample.GUIDANCE_CONVENTIONS)} (one_plus_w: DDO's --cfg values)")
    cfg = 1.0 if options["cfg"] is None else float(options["cfg"])
    if not np.isfinite(cfg):
      raise cli.UserError(f"--cfg {cfg} is not finite", "--cfg", "pass e.g. 1.0 (guidance-free) or 1.4")
    top_k = 0 if options["top_k"] is None else int(options["top_k"])
    if top_k < 0:
      raise cli.UserError(f"--top_k {top_k} is negative", "--top_k", "pass 0 (off) or a number of tokens, e.g. 900")
    top_p = 0.0 if options["top_p"] is None else float(options["top_p"])
    if not 0.0 <= top_p <= 1.0:
      raise cli.UserError(f"--top_p {top_p} is not in [0, 1]", "--top_p", "pass 0 (off) or e.g. 0.96")
    net = meta.get("net")
    if not isinstance(net, dict) or "patch_nums" not in net:
      raise cli.UserError(f"{path}/model.json has no VAR 'net' config", "--model",
                          "give a folder written by `python -m launch.convert var` or a round folder of a VAR run")
    vae, vae_params, vae_source = cls._model_dir_vae(path, meta, options["vae"], net)
    config = ml_collections.ConfigDict(dict(
        depth=int(net["depth"]), embed_dim=int(net["embed_dim"]), num_heads=int(net["num_heads"]),
        num_classes=int(net["num_classes"]), patch_nums=tuple(net["patch_nums"]), uncond_ratio=0.0, metric="nll",
        negatives=dict(cfg=cfg, cfg_convention=convention, top_k=top_k, top_p=top_p,
                       more_smooth=bool(options["more_smooth"])),
        data=dict(source="synthetic", num=0, resolution=int(vae.img_size)), labels=options["labels"] or "balanced"))
    family = cls(config, vae=(vae, vae_params))
    family.net_config = dict(net)
    family.net = var_net.build_var(net)
    family.vae_source = vae_source
    tree = path / "params" if (path / "params").is_dir() else path / "chosen"
    if not tree.is_dir():
      raise cli.UserError(f"{path} has neither params/ nor chosen/", "--model",
                          "give a folder written by `python -m launch.convert var` or a round folder of a VAR run")
    params = load_replicated(tree, jax.eval_shape(family.init_params, jax.random.key(0)), "--model")
    return family, params

  @staticmethod
  def _model_dir_vae(path, meta, vae_dir, net):
    from ddo_jax.convert import vqvae as vqvae_convert  # pylint: disable=import-outside-toplevel
    vae_dir = vae_dir or meta.get("vae_checkpoint") or ""
    if vae_dir:
      if not (pathlib.Path(vae_dir) / "model.json").is_file():
        raise cli.UserError(f"{vae_dir} has no model.json", "--vae", VAE_FIX)
      try:
        vae, variables = vqvae_convert.load_converted(vae_dir)
      except cli.UserError as e:
        raise cli.UserError(e.what, "--vae", VAE_FIX) from e
      source = "converted"
    elif isinstance(meta.get("vae"), dict):   # a round folder of a run whose VQVAE was random (tiny config)
      vae = vqvae_convert.vae_from_kwargs(meta["vae"])
      variables = random_vae_params(vae, VAE_SEED)
      source = f"random, seed {VAE_SEED}"
      log.warning("the VQVAE of %s is RANDOMLY INITIALISED (seed %d), as in its run: smoke runs only", path, VAE_SEED)
    else:
      raise cli.UserError(f"{path} is a VAR model: its tokens need the VQVAE to become images", "--vae", VAE_FIX)
    mine = (list(net["patch_nums"]), int(net["vocab_size"]), int(net["cvae"]))
    theirs = ([int(p) for p in vae.patch_nums], int(vae.vocab_size), int(vae.z_channels))
    if mine != theirs:
      raise cli.UserError(f"the VQVAE (patch_nums, vocab, channels) {theirs} does not fit the VAR's {mine}", "--vae",
                          "give the VQVAE the VAR was trained with (vae_ch160v4096z32.pth, converted with the "
                          "VAR's --patch_nums)")
    return vae, jax.tree_util.tree_map(jnp.asarray, variables), source

  @property
  def image_shape(self):
    return (self.image_size, self.image_size, 3)

  positions_matter = property(lambda self: self.config.get("labels", "balanced") == "balanced")

  def sample_settings(self) -> dict:
    import hashlib  # pylint: disable=import-outside-toplevel
    from ddo_jax import tree_io  # pylint: disable=import-outside-toplevel
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    vae_sum = hashlib.sha256(json.dumps(tree_io.tree_checksum(self.vae_params), sort_keys=True).encode()).hexdigest()
    return {"family": "var", "image_shape": list(self.image_shape), "num_classes": self.num_classes,
            "labels": self.config.labels, "base_seed": seeded.CLI_BASE_SEED, "cfg": self.neg["cfg"],
            "cfg_convention": self.neg["guidance"],
            "guidance_weight_w": var_sample.guidance_weight(self.neg["cfg"], self.neg["guidance"]),
            "top_k": self.neg["top_k"], "top_p": self.neg["top_p"], "more_smooth": self.neg["more_smooth"],
            "uint8": "truncate(clip(x, 0, 1) * 255)", "vae": self.vae_source, "vae_params_checksum": vae_sum}

  def _cli_classes(self, keys, positions):
    if self.config.labels == "balanced":
      return labels_lib.balanced_classes(jnp.asarray(positions, jnp.int32), self.num_classes)
    return jax.vmap(lambda k: jax.random.randint(jax.random.fold_in(k, 1), [], 0, self.num_classes,
                                                 dtype=jnp.int32))(keys)

  def seed_classes(self, seeds, positions):
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    if self.config.labels == "balanced":
      return np.asarray(labels_lib.balanced_classes(np.asarray(positions, np.int64), self.num_classes), np.int64)
    keys = seeded.seed_keys(jax.random.key(seeded.CLI_BASE_SEED), jnp.asarray(np.asarray(seeds, np.int32)))
    return np.asarray(jax.jit(self._cli_classes)(keys, np.asarray(positions, np.int32)), np.int64)

  def image_sampler(self, params, mesh):
    from ddo_jax import parallel  # pylint: disable=import-outside-toplevel
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel

    def fn(p, keys, seeds, positions):
      del seeds
      classes = self._cli_classes(keys, positions)
      x = self._images(p["net"], keys, classes)   # one image per key, with the options' guidance
      images = jnp.floor(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)
      return {"images": images, "classes": classes}

    replicated = parallel.replicated(mesh)
    program = make_position_sampler(fn, mesh, replicated)
    bundle = jax.device_put({"net": params}, replicated)
    batch = parallel.batch_sharding(mesh)
    base = jax.random.key(seeded.CLI_BASE_SEED)

    def run(seeds, positions):
      out = parallel.to_host(program(bundle, base, jax.device_put(np.asarray(seeds, np.int32), batch),
                                     jax.device_put(np.asarray(positions, np.int32), batch)))
      return np.asarray(out["images"], np.uint8), np.asarray(out["classes"], np.int64)

    return run


def random_vae_params(vae, seed: int) -> dict:
  """{'params': tree} of `vae` drawn on the host with numpy from `seed`, in the distributions of
  `var_vqvae.init_params` (torch's defaults: conv weight and bias U(+-1/sqrt(fan_in)), GroupNorm 1 and 0,
  codebook N(0, 1)) without tracing the network (init_params runs a whole forward: ~20 s on CPU)."""
  rng = np.random.default_rng(seed)

  def fill(node):
    out = {}
    fan_in = int(np.prod(node["kernel"].shape[:-1])) if "kernel" in node else None
    for k in sorted(node):
      a = node[k]
      if isinstance(a, dict):
        out[k] = fill(a)
      elif k == "embedding":
        out[k] = rng.standard_normal(a.shape).astype(np.float32)
      elif k == "scale":
        out[k] = np.ones(a.shape, np.float32)
      elif fan_in is None:   # a GroupNorm bias
        out[k] = np.zeros(a.shape, np.float32)
      else:
        bound = 1.0 / np.sqrt(fan_in)
        out[k] = rng.uniform(-bound, bound, a.shape).astype(np.float32)
    return out

  abstract = jax.tree_util.tree_map(lambda a: a, var_vqvae.abstract_params(vae))
  return {"params": jax.tree_util.tree_map(jnp.asarray, fill(abstract))}


def var_vqvae_kwargs(vae) -> dict:
  return dict(vocab_size=int(vae.vocab_size), z_channels=int(vae.z_channels), ch=int(vae.ch),
              share_quant_resi=int(vae.share_quant_resi), patch_nums=[int(p) for p in vae.patch_nums])


__all__ = ["VAR"]
