"""EDM2 U-Net and preconditioning (Karras et al. 2024, NVlabs/edm2) as flax.linen modules, NHWC.

The magnitude-preserving network of docs/ARCHITECTURES.md §3: `normalize`, `MPConv` (weight normalized at
every forward, scaled by gain / sqrt(fan_in), no bias), `mp_silu`, `mp_sum`, `mp_cat`, `MPFourier`,
box-filter resampling, `Block` (encoder / decoder flavours, optional self-attention with pixel-normalized
q, k, v), activation clipping, and `Precond` with its logvar head. Everything is float32; every matmul and
convolution runs at the precision given by `precision` ('highest' by default).

Names follow the PyTorch modules so that the name map in `ddo_jax.convert.edm2_names` stays mechanical:
the precond holds `unet`, `logvar_fourier` and `logvar_linear`; the U-Net holds `out_gain`, `emb_fourier`,
`emb_noise`, `emb_label`, `enc_<R>x<R>_<name>` / `dec_<R>x<R>_<name>` for the entries of the upstream
`enc` / `dec` ModuleDicts, and `out_conv`; a block holds `emb_gain`, `conv_res0`, `emb_linear`,
`conv_res1`, `conv_skip`, `attn_qkv`, `attn_proj`. An MPConv's weight is the leaf `kernel` ([kh, kw, in,
out] for convolutions, [in, out] for dense layers); the gains are 0-dim leaves.

Variables live in two collections:
  'params'   every torch Parameter (what the optimizer trains; its size is the upstream parameter count)
  'buffers'  the MPFourier `freqs` / `phases` (torch buffers: stored in checkpoints, never trained; the
             forward reads them under stop_gradient)

so that D = Precond.apply({'params': p, 'buffers': b}, x, sigma, labels) with x [B, H, W, C].

Forced weight normalization (upstream overwrites each MPConv weight with normalize(weight) at every
train-mode forward) is not a side effect here: `forced_weight_normalization(params)` is the pure projection
to apply after each optimizer update, while the forward keeps its own `normalize` as upstream does.

Released checkpoints store every tensor as float16. The forward upcasts weights and buffers to float32
(as MPConv / MPFourier do), so a float16 tree gives upstream's CPU float32 result, including one rounding
that upstream has: with a float16 gain, gain / sqrt(fan_in) is a float16 scalar. `gain_dtype='float16'`
applies that rounding to a float32 tree (e.g. a converted fp16 checkpoint kept in float32).
"""
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.nets.songunet import downsample, upsample

Array = Any

NORM_EPS = 1e-4          # eps of every normalize() (weights, pixel norm, attention q/k/v)
MP_SILU_DIVISOR = 0.596  # mp_silu(x) = silu(x) / 0.596
BUFFERS = "buffers"      # the collection of the MPFourier buffers

# Upstream UNet / Block constructor defaults (NVlabs/edm2 training/networks_edm2.py).
UNET_DEFAULTS = dict(
    model_channels=192, channel_mult=(1, 2, 3, 4), channel_mult_noise=None, channel_mult_emb=None,
    num_blocks=3, attn_resolutions=(16, 8), label_balance=0.5, concat_balance=0.5,
    resample_filter=(1, 1), channels_per_head=64, dropout=0.0, res_balance=0.3, attn_balance=0.3,
    clip_act=256)
# Upstream Precond constructor defaults (img_resolution, img_channels and label_dim have none).
PRECOND_DEFAULTS = dict(use_fp16=True, sigma_data=0.5, logvar_channels=128)


def _precision(name: str):
  return jax.lax.Precision(name) if isinstance(name, str) else name


# ---------------------------------------------------------------------------------------------------
# Magnitude-preserving primitives.


def true_divide(x: Array, d) -> Array:
  """x / d as an elementwise IEEE division, as torch computes it.

  XLA rewrites a division by a constant or by a broadcast (A / broadcast(B)) into a multiplication by
  the rounded reciprocal. That moves each quotient by up to an ulp, with the same relative bias (the
  reciprocal's rounding error) wherever the divisor is the same, so the error does not average out: on the
  goldens' DDO step (ddo/edm2_loss), the target's logp (sums of 768 squared errors weighted up to 1228)
  computed from this net's D were 1.5e-4 to 4.1e-4 below torch's in all four samples, and are within
  +-1.5e-4 of either sign with true division. Adding x * 0 makes the divisor an elementwise value the
  simplifier cannot see through (it does not fold a float multiply by zero); for finite x the divisor's
  value is unchanged.
  """
  if isinstance(d, (float, np.floating)):
    d = np.asarray(d, x.dtype)    # a constant divisor keeps x's dtype (bfloat16 compute), exact for float32
  return x / (d + x * np.asarray(0, x.dtype))


def normalize(x: Array, axis=None, eps: float = NORM_EPS) -> Array:
  """x / (eps + ||x||_2 / sqrt(n)), the L2 norm over `axis` computed in float32, n = its size.

  axis None: every axis except the first (upstream's default, with torch's first axis); the weight
  normalization of this port's [..., out] kernels passes every axis except the last.
  Upstream: norm = vector_norm(x, dim, float32); norm = eps + norm * sqrt(norm.numel() / x.numel()).
  """
  if axis is None:
    axis = tuple(range(1, x.ndim))
  axis = (axis,) if isinstance(axis, int) else tuple(axis)
  axis = tuple(a % x.ndim for a in axis)
  xf = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(xf * xf, axis=axis, keepdims=True))
  size = int(np.prod([x.shape[a] for a in axis]))
  alpha = np.float32(np.sqrt(1.0 / size))  # numel(norm) / numel(x) = 1 / size, exactly as a double
  norm = np.float32(eps) + norm * alpha
  return true_divide(x, norm.astype(x.dtype))


def mp_silu(x: Array) -> Array:
  """silu(x) / 0.596 (unit magnitude for unit-normal input)."""
  return true_divide(jax.nn.silu(x), np.float32(MP_SILU_DIVISOR))


def _lerp(a: Array, b: Array, t: float) -> Array:
  """torch.lerp with a scalar weight: a + t (b - a) for |t| < 0.5, else b - (b - a)(1 - t)."""
  if abs(t) < 0.5:
    return a + np.asarray(t, a.dtype) * (b - a)
  return b - (b - a) * np.asarray(1 - t, a.dtype)


def mp_sum(a: Array, b: Array, t: float = 0.5) -> Array:
  """lerp(a, b, t) / sqrt((1 - t)^2 + t^2)."""
  return true_divide(_lerp(a, b, float(t)), np.float32(np.sqrt((1 - t) ** 2 + t ** 2)))


def mp_cat(a: Array, b: Array, t: float = 0.5, axis: int = -1) -> Array:
  """Concatenation [a * wa, b * wb] on `axis` (channels), weights keeping unit magnitude."""
  na, nb = a.shape[axis], b.shape[axis]
  c = np.sqrt((na + nb) / ((1 - t) ** 2 + t ** 2))
  wa = np.asarray(np.float32(c / np.sqrt(na) * (1 - t)), a.dtype)
  wb = np.asarray(np.float32(c / np.sqrt(nb) * t), b.dtype)
  return jnp.concatenate([a * wa, b * wb], axis=axis)


def resample(x: Array, resample_filter: Sequence[float] = (1, 1), mode: str = "keep") -> Array:
  """'keep', 'down' (depthwise filter, stride 2) or 'up' (transposed, 4 * filter), NHWC.

  Upstream pads by (len(f) - 1) // 2 in both directions, the same as SongUNet's resampling, whose
  functions are used here ([1, 1]: the 2x2 mean and nearest-neighbour upsampling).
  """
  if mode == "keep":
    return x
  f = np.asarray(resample_filter, np.float32)
  if f.ndim != 1 or len(f) % 2:
    raise ValueError(f"EDM2 resample: the filter must be 1-D of even length, got {list(f)}")
  if mode == "down":
    return downsample(x, tuple(resample_filter))
  if mode == "up":
    return upsample(x, tuple(resample_filter))
  raise ValueError(f"EDM2 resample: mode {mode!r} must be 'keep', 'down' or 'up'")


def _normal_init(scale: float = 1.0):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype) * np.float32(scale)
  return init


class MPFourier(nn.Module):
  """cos(x outer freqs + phases) * sqrt(2), float32; freqs = 2 pi N(0, 1) * bandwidth, phases = 2 pi U(0, 1).

  freqs and phases are torch buffers: they live in the 'buffers' collection and get no gradient.
  """
  num_channels: int
  bandwidth: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = self.num_channels
    freqs = self.variable(BUFFERS, "freqs", lambda: _normal_init(2 * np.pi * self.bandwidth)(
        self.make_rng("params"), (c,))).value
    phases = self.variable(BUFFERS, "phases", lambda: jax.random.uniform(
        self.make_rng("params"), (c,), jnp.float32) * np.float32(2 * np.pi)).value
    freqs = jax.lax.stop_gradient(freqs).astype(jnp.float32)
    phases = jax.lax.stop_gradient(phases).astype(jnp.float32)
    y = x.astype(jnp.float32)[:, None] * freqs[None, :]
    y = jnp.cos(y + phases[None, :]) * np.float32(np.sqrt(2))
    return y.astype(x.dtype)


def gain_factor(gain: Optional[Array], fan_in: int, gain_dtype: Optional[str] = None):
  """gain / sqrt(fan_in) as upstream evaluates it.

  gain None (upstream's python default 1): the double 1 / sqrt(fan_in), rounded to float32 by the multiply.
  A gain tensor: float32 gain / float32(sqrt(fan_in)) in float32, then rounded to the gain's dtype (float16
  for the released checkpoints: a 0-dim float16 tensor op) or to `gain_dtype` when given.
  """
  if gain is None:
    return np.float32(1.0 / np.sqrt(fan_in))
  g = jnp.asarray(gain)
  rounding = jnp.dtype(gain_dtype) if gain_dtype is not None else g.dtype
  f = true_divide(g.astype(jnp.float32), np.float32(np.sqrt(fan_in)))
  return f.astype(rounding).astype(jnp.float32)


class MPConv(nn.Module):
  """Magnitude-preserving convolution (kernel (kh, kw)) or dense layer (kernel ()), no bias.

  w = normalize(kernel) * gain / sqrt(fan_in) at every call, normalized per output channel (the last axis
  of `kernel`: [kh, kw, in, out] or [in, out]), in float32; 'same' padding k // 2.
  """
  features: int
  kernel_size: Sequence[int] = ()
  gain_dtype: Optional[str] = None
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array, gain: Optional[Array] = None) -> Array:
    cin = x.shape[-1]
    shape = tuple(self.kernel_size) + (cin, self.features)
    kernel = self.param("kernel", _normal_init(), shape).astype(jnp.float32)
    fan_in = int(np.prod(shape[:-1]))
    w = normalize(kernel, axis=tuple(range(kernel.ndim - 1)))
    w = (w * gain_factor(gain, fan_in, self.gain_dtype)).astype(x.dtype)
    prec = _precision(self.precision)
    if len(self.kernel_size) == 0 or all(k == 1 for k in self.kernel_size):
      w = w.reshape(cin, self.features)
      return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=prec)
    if len(self.kernel_size) != 2:
      raise ValueError(f"MPConv: kernel_size {tuple(self.kernel_size)} must be () or (kh, kw)")
    pads = tuple((k // 2, k // 2) for k in self.kernel_size)
    return jax.lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        precision=prec)


# ---------------------------------------------------------------------------------------------------
# Block and U-Net.


class Block(nn.Module):
  """Upstream Block: resampling, residual branch with the embedding, optional attention, clipping (NHWC).

  The attention's qkv channels are interleaved as upstream lays them out: channel index
  (head * channels_per_head + c) * 3 + {0: q, 1: k, 2: v}.
  """
  out_channels: int
  flavor: str = "enc"            # 'enc' or 'dec'
  resample_mode: str = "keep"    # 'keep', 'up' or 'down'
  resample_filter: Sequence[float] = (1, 1)
  attention: bool = False
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256
  gain_dtype: Optional[str] = None
  precision: Any = "highest"

  def _conv(self, features, kernel_size, name):
    return MPConv(features, kernel_size, gain_dtype=self.gain_dtype, precision=self.precision, name=name)

  @nn.compact
  def __call__(self, x: Array, emb: Array, deterministic: bool = True) -> Array:
    if self.flavor not in ("enc", "dec"):
      raise ValueError(f"EDM2 Block: flavor {self.flavor!r} must be 'enc' or 'dec'")
    cin, cout = x.shape[-1], self.out_channels
    num_heads = cout // self.channels_per_head if self.attention else 0
    emb_gain = self.param("emb_gain", nn.initializers.zeros, ())
    conv_skip = self._conv(cout, (1, 1), "conv_skip") if cin != cout else None

    # Main branch.
    x = resample(x, self.resample_filter, self.resample_mode)
    if self.flavor == "enc":
      if conv_skip is not None:
        x = conv_skip(x)
      x = normalize(x, axis=-1)  # pixel norm

    # Residual branch.
    y = self._conv(cout, (3, 3), "conv_res0")(mp_silu(x))
    c = self._conv(cout, (), "emb_linear")(emb, gain=emb_gain) + 1
    y = mp_silu(y * c[:, None, None, :].astype(y.dtype))
    if self.dropout:
      y = nn.Dropout(self.dropout)(y, deterministic=deterministic)
    y = self._conv(cout, (3, 3), "conv_res1")(y)

    # Connect the branches.
    if self.flavor == "dec" and conv_skip is not None:
      x = conv_skip(x)
    x = mp_sum(x, y, t=self.res_balance)

    # Self-attention.
    if num_heads:
      n, h, w, _ = x.shape
      ch = cout // num_heads
      qkv = self._conv(cout * 3, (1, 1), "attn_qkv")(x).reshape(n, h * w, num_heads, ch, 3)
      qkv = normalize(qkv, axis=3)  # pixel norm of each of q, k, v over its channels
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]   # [n, positions, heads, ch]
      prec = _precision(self.precision)
      logits = jnp.einsum("nqhc,nkhc->nhqk", q, true_divide(k, np.float32(np.sqrt(ch))), precision=prec,
                          preferred_element_type=jnp.float32)
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)   # float32 softmax also under bfloat16
      y = jnp.einsum("nhqk,nkhc->nqhc", weights, v, precision=prec).reshape(n, h, w, cout)
      x = mp_sum(x, self._conv(cout, (1, 1), "attn_proj")(y), t=self.attn_balance)

    if self.clip_act is not None:
      x = jnp.clip(x, -self.clip_act, self.clip_act)
    return x


class UNet(nn.Module):
  """EDM2 U-Net: F = unet(x, noise_labels, class_labels), x and F in NHWC.

  Fields mirror the upstream UNet and Block keyword arguments and defaults (UNET_DEFAULTS); the last four
  are execution options, not architecture: `gain_dtype`, `precision`, and, off by default,
  `compute_dtype='bfloat16'` (every Block's activations, convolutions and matmuls in bfloat16, like upstream's
  float16 path on CUDA: the embedding, every normalization's statistics, the attention softmax and F's
  conversion back stay float32) and `remat=True` (each Block rematerialized in the backward pass,
  jax.checkpoint: less activation memory for one more forward).
  """
  img_resolution: int
  img_channels: int
  label_dim: int
  model_channels: int = 192
  channel_mult: Sequence[int] = (1, 2, 3, 4)
  channel_mult_noise: Optional[int] = None
  channel_mult_emb: Optional[int] = None
  num_blocks: int = 3
  attn_resolutions: Sequence[int] = (16, 8)
  label_balance: float = 0.5
  concat_balance: float = 0.5
  resample_filter: Sequence[float] = (1, 1)
  channels_per_head: int = 64
  dropout: float = 0.0
  res_balance: float = 0.3
  attn_balance: float = 0.3
  clip_act: Optional[float] = 256
  gain_dtype: Optional[str] = None
  precision: Any = "highest"
  compute_dtype: str = "float32"
  remat: bool = False

  def channels(self):
    """(cblock per level, cnoise, cemb) as upstream derives them."""
    cblock = [self.model_channels * m for m in self.channel_mult]
    cnoise = (self.model_channels * self.channel_mult_noise if self.channel_mult_noise is not None
              else cblock[0])
    cemb = self.model_channels * self.channel_mult_emb if self.channel_mult_emb is not None else max(cblock)
    return cblock, cnoise, cemb

  def _conv(self, features, kernel_size, name):
    return MPConv(features, kernel_size, gain_dtype=self.gain_dtype, precision=self.precision, name=name)

  def _block(self, name, cout, **kw):
    cls = nn.remat(Block, static_argnums=(3,)) if self.remat else Block   # (self, x, emb, deterministic)
    return cls(cout, resample_filter=tuple(self.resample_filter), channels_per_head=self.channels_per_head,
                 dropout=self.dropout, res_balance=self.res_balance, attn_balance=self.attn_balance,
                 clip_act=self.clip_act, gain_dtype=self.gain_dtype, precision=self.precision, name=name, **kw)

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               deterministic: bool = True) -> Array:
    """x: [B, H, W, img_channels]; noise_labels: [B] (or [1]); class_labels: [B, label_dim] or None."""
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"EDM2 UNet: compute_dtype {self.compute_dtype!r} must be 'float32' or 'bfloat16'")
    cblock, cnoise, cemb = self.channels()
    out_gain = self.param("out_gain", nn.initializers.zeros, ())

    # Embedding.
    emb = self._conv(cemb, (), "emb_noise")(MPFourier(cnoise, name="emb_fourier")(noise_labels))
    if self.label_dim:
      if class_labels is None:
        class_labels = jnp.zeros((1, self.label_dim), jnp.float32)
      labels = class_labels.astype(jnp.float32) * np.float32(np.sqrt(class_labels.shape[1]))
      emb = mp_sum(emb, self._conv(cemb, (), "emb_label")(labels), t=self.label_balance)
    emb = mp_silu(emb)

    # Encoder: every output goes on the skip stack.
    x = jnp.concatenate([x, jnp.ones_like(x[..., :1])], axis=-1).astype(self.compute_dtype)
    skips = []
    attn = tuple(self.attn_resolutions)
    for level, channels in enumerate(cblock):
      res = self.img_resolution >> level
      if level == 0:
        x = self._conv(channels, (3, 3), f"enc_{res}x{res}_conv")(x)
      else:
        x = self._block(f"enc_{res}x{res}_down", x.shape[-1], flavor="enc", resample_mode="down")(
            x, emb, deterministic)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = self._block(f"enc_{res}x{res}_block{idx}", channels, flavor="enc", attention=res in attn)(
            x, emb, deterministic)
        skips.append(x)

    # Decoder: each blockN first concatenates the next skip (mp_cat).
    for level, channels in reversed(list(enumerate(cblock))):
      res = self.img_resolution >> level
      if level == len(cblock) - 1:
        x = self._block(f"dec_{res}x{res}_in0", x.shape[-1], flavor="dec", attention=True)(
            x, emb, deterministic)
        x = self._block(f"dec_{res}x{res}_in1", x.shape[-1], flavor="dec")(x, emb, deterministic)
      else:
        x = self._block(f"dec_{res}x{res}_up", x.shape[-1], flavor="dec", resample_mode="up")(
            x, emb, deterministic)
      for idx in range(self.num_blocks + 1):
        x = mp_cat(x, skips.pop(), t=self.concat_balance)
        x = self._block(f"dec_{res}x{res}_block{idx}", channels, flavor="dec", attention=res in attn)(
            x, emb, deterministic)
    return self._conv(self.img_channels, (3, 3), "out_conv")(x, gain=out_gain).astype(jnp.float32)


class Precond(nn.Module):
  """EDM2 preconditioning with the uncertainty (logvar) head:

    D = apply(variables, x, sigma, class_labels)                        # [B, H, W, C]
    D, logvar = apply(variables, x, sigma, class_labels, return_logvar=True)   # logvar [B]

  x float32 NHWC, sigma [B] or a scalar, class_labels [B, label_dim] one-hot or None (zeros, as upstream).
  c_skip, c_out, c_in as EDM with sigma_data; c_noise = ln(sigma) / 4. `raw=True` (or method='raw')
  returns the U-Net output F = unet(c_in x, c_noise, labels). `use_fp16` is recorded, not used: upstream
  runs float16 activations only on CUDA; this port computes in float32 (upstream's force_fp32 / CPU result).
  """
  unet: nn.Module
  label_dim: int = 0
  use_fp16: bool = True
  sigma_data: float = 0.5
  logvar_channels: int = 128
  gain_dtype: Optional[str] = None
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
               return_logvar: bool = False, deterministic: bool = True, raw: bool = False):
    x = jnp.asarray(x, jnp.float32)
    batch = x.shape[0]
    sigma = jnp.broadcast_to(jnp.asarray(sigma, jnp.float32).reshape(-1), (batch,)).reshape(batch, 1, 1, 1)
    if not self.label_dim:
      class_labels = None
    elif class_labels is not None:
      class_labels = jnp.asarray(class_labels, jnp.float32).reshape(-1, self.label_dim)
    sd = self.sigma_data
    c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
    c_out = sigma * sd / jnp.sqrt(sigma ** 2 + sd ** 2)
    c_in = 1 / jnp.sqrt(sd ** 2 + sigma ** 2)
    c_noise = jnp.log(sigma.reshape(-1)) / 4

    f = self.unet(c_in * x, c_noise, class_labels, deterministic=deterministic)
    if raw:
      return f
    d = c_skip * x + c_out * f.astype(jnp.float32)
    if not (return_logvar or self.is_initializing()):
      return d
    emb = MPFourier(self.logvar_channels, name="logvar_fourier")(c_noise)
    logvar = MPConv(1, (), gain_dtype=self.gain_dtype, precision=self.precision,
                    name="logvar_linear")(emb).reshape(-1)
    return (d, logvar) if return_logvar else d

  def raw(self, x: Array, sigma: Array, class_labels: Optional[Array] = None,
          deterministic: bool = True) -> Array:
    """The raw U-Net output F (the goldens' `F`)."""
    return self(x, sigma, class_labels, deterministic=deterministic, raw=True)


# ---------------------------------------------------------------------------------------------------
# Construction and forced weight normalization.


def plain_dict(config) -> dict:
  """A ConfigDict or Mapping as a plain dict."""
  if hasattr(config, "to_dict"):
    return config.to_dict()
  return dict(config)


def build_precond(config: Mapping[str, Any], gain_dtype: Optional[str] = None,
                  precision: Any = "highest", compute_dtype: str = "float32", remat: bool = False) -> Precond:
  """The Precond described by a config from `ddo_jax.convert.edm2_names.config_from_init_kwargs`.

  config: {'class_name': 'Precond', 'img_resolution', 'img_channels', 'label_dim', 'use_fp16',
           'sigma_data', 'logvar_channels', 'unet_kwargs': {UNet kwargs}}. compute_dtype, remat: the UNet's
  execution options (float32 and no remat by default, the parity path).
  """
  config = plain_dict(config)
  kw = dict(UNET_DEFAULTS)
  kw.update(plain_dict(config.get("unet_kwargs", {})))
  for k in ("channel_mult", "attn_resolutions", "resample_filter"):
    kw[k] = tuple(kw[k])
  unet = UNet(img_resolution=int(config["img_resolution"]), img_channels=int(config["img_channels"]),
              label_dim=int(config["label_dim"]), gain_dtype=gain_dtype, precision=precision,
              compute_dtype=compute_dtype, remat=bool(remat), **kw)
  pk = dict(PRECOND_DEFAULTS)
  pk.update({k: config[k] for k in PRECOND_DEFAULTS if k in config})
  return Precond(unet=unet, label_dim=int(config["label_dim"]), use_fp16=bool(pk["use_fp16"]),
                 sigma_data=float(pk["sigma_data"]), logvar_channels=int(pk["logvar_channels"]),
                 gain_dtype=gain_dtype, precision=precision)


def init_variables(net: Precond, rng: jax.Array, batch: int = 1) -> dict:
  """{'params': ..., 'buffers': ...} of `net` at upstream's initial values (gains zero)."""
  r, c = net.unet.img_resolution, net.unet.img_channels
  labels = jnp.zeros((batch, net.label_dim), jnp.float32) if net.label_dim else None
  return net.init(rng, jnp.zeros((batch, r, r, c), jnp.float32), jnp.ones((batch,), jnp.float32), labels)


def abstract_variables(net: Precond) -> dict:
  """jax.eval_shape of `init_variables`: the variable tree as ShapeDtypeStructs (nothing is allocated)."""
  return jax.eval_shape(lambda k: init_variables(net, k), jax.random.PRNGKey(0))


def forced_weight_normalization(params, exclude: Sequence[str] = ()):
  """The params tree with every MPConv weight (each leaf named `kernel`) replaced by normalize(kernel).

  This is upstream's forced weight normalization (MPConv overwrites its weight with normalize(weight)
  in train mode) as a pure function, for the train step to apply after each optimizer update. Each output
  channel (the last axis) is normalized over the other axes in float32, eps 1e-4; the result keeps the
  leaf's dtype. Gains (`out_gain`, `emb_gain`) and anything that is not a `kernel` are returned unchanged,
  as are the kernels under a top-level module named in `exclude`: upstream normalizes only the MPConvs
  that ran in the train-mode forward, so a step that does not ask for logvar leaves `logvar_linear`
  untouched (exclude=('logvar_linear',)).
  """
  exclude = set(exclude)

  def project(path, leaf):
    names = [getattr(p, "key", getattr(p, "name", None)) for p in path]
    if names and names[-1] == "kernel" and names[0] not in exclude:
      return normalize(jnp.asarray(leaf).astype(jnp.float32),
                       axis=tuple(range(jnp.ndim(leaf) - 1))).astype(jnp.asarray(leaf).dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(project, params)
