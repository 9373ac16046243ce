"""SongUNet (DDPM++ options) of NVlabs/edm as a flax.linen module, NHWC.

This is the U-Net that the EDM CIFAR-10 checkpoints use (docs/ARCHITECTURES.md §2.2-§2.3): positional
noise embedding (endpoint=True, halves swapped to [sin, cos]), 'standard' encoder and decoder, one
attention head, skip scale sqrt(0.5), GroupNorm eps 1e-6 with min(32, C // 4) groups, 1x1 resampling
skips, optional class-label and augmentation-label conditioning.

Parameter names follow the PyTorch module names so that the name map in
`ddo_jax.convert.edm_names` stays mechanical: `map_label`, `map_augment`, `map_layer0/1`,
`enc_<R>x<R>_<name>` and `dec_<R>x<R>_<name>` for the entries of the upstream `enc`/`dec` ModuleDicts,
and `norm0/conv0/affine/norm1/conv1/skip/norm2/qkv/proj` inside a block. Leaves are `kernel`
(HWIO for convolutions, [in, out] for dense layers), `bias` and, for GroupNorm, `scale`.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any

SKIP_SCALE = float(np.sqrt(0.5))  # UNetBlock skip_scale in DDPM++.
NORM_EPS = 1e-6  # GroupNorm eps of every SongUNet norm.


def xavier_uniform(fan_in: int, fan_out: int, gain: float = 1.0):
  """Upstream `weight_init(mode='xavier_uniform') * init_weight` for any parameter shape."""
  bound = gain * float(np.sqrt(6.0 / (fan_in + fan_out)))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def resample_filter_2d(resample_filter: Sequence[float]) -> np.ndarray:
  """The [k, k] float32 resampling filter outer(f, f) / sum(f)^2 (upstream Conv2d buffer, squeezed)."""
  f = np.asarray(resample_filter, dtype=np.float32)
  return np.outer(f, f).astype(np.float32) / np.float32(f.sum()) ** 2


def downsample(x: Array, resample_filter: Sequence[float]) -> Array:
  """Depthwise filter with stride 2 and padding (k-1)//2 (upstream `down=True`, non-fused), NHWC."""
  f = resample_filter_2d(resample_filter)
  k, c = f.shape[0], x.shape[-1]
  pad = (k - 1) // 2
  w = jnp.broadcast_to(jnp.asarray(f)[:, :, None, None], (k, k, 1, c))
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(2, 2), padding=((pad, pad), (pad, pad)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)


def upsample(x: Array, resample_filter: Sequence[float]) -> Array:
  """Transposed depthwise conv with 4*filter, stride 2, padding (k-1)//2 (upstream `up=True`), NHWC.

  For the filter [1, 1] this is nearest-neighbour 2x upsampling.
  """
  f = resample_filter_2d(resample_filter) * np.float32(4)
  k, c = f.shape[0], x.shape[-1]
  pad = k - 1 - (k - 1) // 2  # conv_transpose2d(padding=p) == dilated conv with padding k-1-p.
  w = jnp.broadcast_to(jnp.asarray(f[::-1, ::-1].copy())[:, :, None, None], (k, k, 1, c))
  return jax.lax.conv_general_dilated(
      x, w, window_strides=(1, 1), padding=((pad, pad), (pad, pad)), lhs_dilation=(2, 2),
      dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
      precision=jax.lax.Precision.HIGHEST)


def positional_embedding(x: Array, num_channels: int, max_positions: int = 10000,
                         endpoint: bool = True) -> Array:
  """Upstream PositionalEmbedding: [B] -> [B, num_channels] laid out as [cos, sin]."""
  half = num_channels // 2
  exponents = np.arange(half, dtype=np.float32) / np.float32(half - (1 if endpoint else 0))
  base = np.float32(1.0 / max_positions)
  # float32 pow, evaluated once here in float64 and rounded (same value as torch's float32 pow).
  freqs = np.power(np.float64(base), exponents.astype(np.float64)).astype(np.float32)
  x = x.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
  return jnp.concatenate([jnp.cos(x), jnp.sin(x)], axis=1)


class Linear(nn.Module):
  """Upstream Linear: y = x @ kernel (+ bias); kernel is [in, out] (the transpose of torch's weight)."""
  features: int
  use_bias: bool = True
  init_weight: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    kernel = self.param("kernel", xavier_uniform(fan_in, self.features, self.init_weight),
                        (fan_in, self.features))
    y = jnp.matmul(x, kernel)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,))
    return y


class Conv2d(nn.Module):
  """Upstream Conv2d (non-fused path), NHWC: optional 2x up/down resampling, then a k x k conv, then bias.

  `kernel_size` 0 means a pure resampling layer without weights.
  """
  features: int
  kernel_size: int
  use_bias: bool = True
  up: bool = False
  down: bool = False
  resample_filter: Sequence[float] = (1, 1)
  init_weight: float = 1.0

  @nn.compact
  def __call__(self, x: Array) -> Array:
    assert not (self.up and self.down)
    cin, k = x.shape[-1], self.kernel_size
    if self.up:
      x = upsample(x, self.resample_filter)
    if self.down:
      x = downsample(x, self.resample_filter)
    if k:
      kernel = self.param(
          "kernel", xavier_uniform(cin * k * k, self.features * k * k, self.init_weight),
          (k, k, cin, self.features))
      x = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(1, 1), padding=((k // 2, k // 2), (k // 2, k // 2)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"))
      if self.use_bias:
        x = x + self.param("bias", nn.initializers.zeros, (self.features,))
    return x


class GroupNorm(nn.Module):
  """torch group_norm with min(32, C // 4) groups: biased two-pass variance, eps inside the sqrt."""
  eps: float = NORM_EPS
  num_groups: int = 32
  min_channels_per_group: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    g = min(self.num_groups, c // self.min_channels_per_group)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    xg = x.reshape(x.shape[:-1] + (g, c // g))
    axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
    mean = jnp.mean(xg, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
    y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
    return y * scale + bias


class UNetBlock(nn.Module):
  """Upstream UNetBlock with the DDPM++ settings (adaptive_scale=False, resample_proj=True)."""
  out_channels: int
  up: bool = False
  down: bool = False
  attention: bool = False
  num_heads: int = 1
  dropout: float = 0.0
  skip_scale: float = SKIP_SCALE
  eps: float = NORM_EPS
  resample_filter: Sequence[float] = (1, 1)

  @nn.compact
  def __call__(self, x: Array, emb: Array, deterministic: bool = True) -> Array:
    cin, cout = x.shape[-1], self.out_channels
    skip_scale = np.float32(self.skip_scale)
    orig = x
    x = Conv2d(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter,
               name="conv0")(nn.silu(GroupNorm(self.eps, name="norm0")(x)))
    params = Linear(cout, name="affine")(emb)[:, None, None, :]
    x = nn.silu(GroupNorm(self.eps, name="norm1")(x + params))
    if self.dropout:
      x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    x = Conv2d(cout, 3, init_weight=1e-5, name="conv1")(x)
    if cout != cin or self.up or self.down:
      orig = Conv2d(cout, 1, up=self.up, down=self.down, resample_filter=self.resample_filter,
                    name="skip")(orig)
    x = (x + orig) * skip_scale

    if self.attention:
      n, h, w, _ = x.shape
      heads = self.num_heads
      ch = cout // heads
      qkv = Conv2d(3 * cout, 1, init_weight=float(np.sqrt(0.2)), name="qkv")(
          GroupNorm(self.eps, name="norm2")(x))
      # Output channel index is (head, c, {q, k, v}) in C order, as upstream's reshape.
      qkv = qkv.reshape(n, h * w, heads, ch, 3)
      q, k, v = qkv[..., 0], qkv[..., 1], qkv[..., 2]
      k = k / np.float32(np.sqrt(ch))
      logits = jnp.einsum("nqhc,nkhc->nhqk", q.astype(jnp.float32), k.astype(jnp.float32))
      weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
      a = jnp.einsum("nhqk,nkhc->nqhc", weights, v).reshape(n, h, w, cout)
      x = (Conv2d(cout, 1, init_weight=1e-5, name="proj")(a) + x) * skip_scale
    return x


def _level_resolutions(img_resolution: int, channel_mult: Sequence[int]):
  """(level, mult, resolution) for each U-Net level, top level first."""
  return [(level, mult, img_resolution >> level) for level, mult in enumerate(channel_mult)]


class SongUNet(nn.Module):
  """DDPM++ SongUNet: F = net(x, noise_labels, class_labels, augment_labels), x and F in NHWC.

  Constructor arguments mirror the upstream keyword arguments and defaults. Only the DDPM++ choices are
  implemented: embedding_type 'positional', encoder_type and decoder_type 'standard'.
  """
  img_resolution: int
  in_channels: int
  out_channels: int
  label_dim: int = 0
  augment_dim: int = 0
  model_channels: int = 128
  channel_mult: Sequence[int] = (1, 2, 2, 2)
  channel_mult_emb: int = 4
  num_blocks: int = 4
  attn_resolutions: Sequence[int] = (16,)
  dropout: float = 0.10
  label_dropout: float = 0.0
  embedding_type: str = "positional"
  channel_mult_noise: int = 1
  encoder_type: str = "standard"
  decoder_type: str = "standard"
  resample_filter: Sequence[float] = (1, 1)

  def _check_options(self):
    if self.embedding_type != "positional":
      raise ValueError(f"SongUNet: embedding_type {self.embedding_type!r} is not supported "
                       "(only 'positional', the DDPM++ choice)")
    if self.encoder_type != "standard" or self.decoder_type != "standard":
      raise ValueError(f"SongUNet: encoder_type {self.encoder_type!r} / decoder_type "
                       f"{self.decoder_type!r} not supported (only 'standard', the DDPM++ choice)")

  def _block(self, name: str, cout: int, **kwargs) -> UNetBlock:
    return UNetBlock(cout, num_heads=1, dropout=self.dropout, skip_scale=SKIP_SCALE, eps=NORM_EPS,
                     resample_filter=tuple(self.resample_filter), name=name, **kwargs)

  def _embedding(self, noise_labels, class_labels, augment_labels, batch, deterministic):
    """The [B, emb_channels] conditioning vector (mapping network)."""
    noise_channels = self.model_channels * self.channel_mult_noise
    emb_channels = self.model_channels * self.channel_mult_emb
    emb = positional_embedding(noise_labels, noise_channels, endpoint=True)
    half = noise_channels // 2
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=1)  # swap to [sin, cos]
    if self.label_dim:
      labels = class_labels
      if labels is None:
        labels = jnp.zeros((batch, self.label_dim), jnp.float32)
      labels = labels.astype(jnp.float32)
      if not deterministic and self.label_dropout:
        keep = jax.random.uniform(self.make_rng("dropout"), (labels.shape[0], 1)) >= self.label_dropout
        labels = labels * keep.astype(labels.dtype)
      emb = emb + Linear(noise_channels, name="map_label")(
          labels * np.float32(np.sqrt(self.label_dim)))
    if self.augment_dim:
      if augment_labels is None and self.is_initializing():
        augment_labels = jnp.zeros((batch, self.augment_dim), jnp.float32)  # create the params
      if augment_labels is not None:
        emb = emb + Linear(noise_channels, use_bias=False, name="map_augment")(
            augment_labels.astype(jnp.float32))
    emb = nn.silu(Linear(emb_channels, name="map_layer0")(emb))
    emb = nn.silu(Linear(emb_channels, name="map_layer1")(emb))
    return emb

  @nn.compact
  def __call__(self, x: Array, noise_labels: Array, class_labels: Optional[Array] = None,
               augment_labels: Optional[Array] = None, deterministic: bool = True) -> Array:
    """x: [B, H, W, in_channels]; noise_labels: [B]; class_labels: [B, label_dim] or None."""
    self._check_options()
    emb = self._embedding(noise_labels, class_labels, augment_labels, x.shape[0], deterministic)
    mc = self.model_channels
    levels = _level_resolutions(self.img_resolution, self.channel_mult)
    attn = tuple(self.attn_resolutions)

    # Encoder: every output goes on the skip stack.
    skips = []
    for level, mult, res in levels:
      if level == 0:
        x = Conv2d(mc, 3, name=f"enc_{res}x{res}_conv")(x)
      else:
        x = self._block(f"enc_{res}x{res}_down", x.shape[-1], down=True)(x, emb, deterministic)
      skips.append(x)
      for idx in range(self.num_blocks):
        x = self._block(f"enc_{res}x{res}_block{idx}", mc * mult, attention=res in attn)(
            x, emb, deterministic)
        skips.append(x)

    # Decoder: the blockN entries take [x, skip] concatenated on channels.
    out = None
    for level, mult, res in reversed(levels):
      if level == len(levels) - 1:
        x = self._block(f"dec_{res}x{res}_in0", x.shape[-1], attention=True)(x, emb, deterministic)
        x = self._block(f"dec_{res}x{res}_in1", x.shape[-1])(x, emb, deterministic)
      else:
        x = self._block(f"dec_{res}x{res}_up", x.shape[-1], up=True)(x, emb, deterministic)
      for idx in range(self.num_blocks + 1):
        x = jnp.concatenate([x, skips.pop()], axis=-1)
        x = self._block(f"dec_{res}x{res}_block{idx}", mc * mult,
                        attention=(idx == self.num_blocks and res in attn))(x, emb, deterministic)
      if level == 0:
        h = GroupNorm(NORM_EPS, name=f"dec_{res}x{res}_aux_norm")(x)
        out = Conv2d(self.out_channels, 3, init_weight=1e-5, name=f"dec_{res}x{res}_aux_conv")(
            nn.silu(h))
    return out
