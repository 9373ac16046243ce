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
import functools
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


def _is_box(resample_filter: Sequence[float]) -> bool:
  """True for a 2-tap filter with equal taps ([1, 1], the DDPM++ choice): its 2-D filter is 0.25 * ones."""
  f = np.asarray(resample_filter, dtype=np.float64)
  return f.shape == (2,) and f[0] == f[1] and f[0] != 0


def downsample(x: Array, resample_filter: Sequence[float]) -> Array:
  """Depthwise filter with stride 2 and padding (k-1)//2 (upstream `down=True`, non-fused), NHWC.

  For the box filter [1, 1] (and even H, W) this is the mean of each 2x2 block, computed as a reshape and
  a sum times 0.25: the same value as the convolution's sum of x * 0.25 (a power of two scales exactly),
  up to the order of the four additions. Other filters go through the depthwise convolution.
  """
  n, h, w, c = x.shape
  if _is_box(resample_filter) and h % 2 == 0 and w % 2 == 0:
    s = x.reshape(n, h // 2, 2, w // 2, 2, c)
    return (s[:, :, 0, :, 0] + s[:, :, 0, :, 1] + s[:, :, 1, :, 0] + s[:, :, 1, :, 1]) * 0.25
  return _downsample_conv(x, resample_filter)


def _downsample_conv(x: Array, resample_filter: Sequence[float]) -> Array:
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

  For the box filter [1, 1] this is nearest-neighbour 2x upsampling (4 * 0.25 = 1 exactly), computed as a
  broadcast; other filters go through the dilated depthwise convolution.
  """
  if _is_box(resample_filter):
    n, h, w, c = x.shape
    return jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
  return _upsample_conv(x, resample_filter)


def _upsample_conv(x: Array, resample_filter: Sequence[float]) -> Array:
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


def _conv_nhwc_plain(x: Array, kernel: Array) -> Array:
  k = kernel.shape[0]
  if k == 1:
    # A 1x1 conv is a matmul over the channels: a dot (no convolution layouts).
    return jax.lax.dot_general(x, kernel.reshape(kernel.shape[2:]), (((x.ndim - 1,), (0,)), ((), ())))
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=(1, 1), padding=((k // 2, k // 2), (k // 2, k // 2)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@jax.custom_vjp
def conv_nhwc(x: Array, kernel: Array) -> Array:
  """Stride-1 'same' convolution NHWC x HWIO (a dot for 1x1), differentiated as usual except for *when*.

  On CPU, XLA computes the kernel gradient from transposed copies of the saved input, and the input
  gradient from a re-laid-out copy of the kernel; left alone, its scheduler makes those copies as soon as
  the forward values exist, so all of them are live at the start of the backward pass (0.67 GiB of the
  2.41 GiB of temporaries of the full-size DDO step at batch 8 + 8). Here the saved input and kernel enter
  the backward as x + 0 * g[0, ..., 0], which ties them to the incoming gradient (XLA does not fold a float
  multiply by zero): each copy is made only when its gradient is computed. The values are those of the
  plain convolution's VJP (x + 0 * finite = x). On other backends (no such copies) the tie is left out.
  (jax.checkpoint-style optimization barriers would say the same, but XLA's CPU pipeline drops them.)
  """
  return _conv_nhwc_plain(x, kernel)


def _conv_nhwc_fwd(x, kernel):
  return _conv_nhwc_plain(x, kernel), (x, kernel)


def _tie_to(tree, g):
  """tree + 0 * g[0, ..., 0] on CPU (the same values, computed only once g exists); tree elsewhere."""
  if jax.default_backend() != "cpu":
    return tree
  zero = g[(0,) * g.ndim] * 0
  return jax.tree_util.tree_map(lambda a: a + zero.astype(a.dtype), tree)


def _conv_nhwc_bwd(res, g):
  _, vjp = jax.vjp(_conv_nhwc_plain, *_tie_to(res, g))
  return vjp(g)


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


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
  dtype: Any = None  # compute dtype (None: the input's); parameters stay float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    assert not (self.up and self.down)
    cin, k = x.shape[-1], self.kernel_size
    if self.dtype is not None:
      x = x.astype(self.dtype)
    kernel = None
    if k:
      kernel = self.param(
          "kernel", xavier_uniform(cin * k * k, self.features * k * k, self.init_weight),
          (k, k, cin, self.features)).astype(x.dtype)
    # A 1x1 conv commutes with nearest-neighbour upsampling (each output pixel is the same dot product of
    # the same input pixel), so the box-filter upsampling skip runs at the low resolution: same values.
    up_after = self.up and k == 1 and _is_box(self.resample_filter)
    if self.up and not up_after:
      x = upsample(x, self.resample_filter)
    if self.down:
      x = downsample(x, self.resample_filter)
    if k:
      x = conv_nhwc(x, kernel)
    if k and self.use_bias:
      x = x + self.param("bias", nn.initializers.zeros, (self.features,)).astype(x.dtype)
    if up_after:
      x = upsample(x, self.resample_filter)
    return x


def _gn_groups(x: Array, g: int) -> Array:
  """[N, ..., C] -> [N, S, G, C // G] (S = the spatial positions), a free reshape in NHWC."""
  return x.reshape(x.shape[0], -1, g, x.shape[-1] // g)


def _gn_stats(xg: Array, eps: float):
  """Per (sample, group) mean and 1 / sqrt(biased variance + eps), two-pass, float32, shape [N, 1, G, 1]."""
  mean = jnp.mean(xg, axis=(1, 3), keepdims=True)
  var = jnp.mean(jnp.square(xg - mean), axis=(1, 3), keepdims=True)
  return mean, jax.lax.rsqrt(var + np.float32(eps))


def _gn_affine(mean: Array, rstd: Array, scale: Array, bias: Array, g: int):
  """y = x * a + b with a = rstd * scale, b = bias - mean * a: torch's CPU group_norm arithmetic."""
  cg = scale.shape[0] // g
  a = rstd * scale.reshape(1, 1, g, cg)
  return a, bias.reshape(1, 1, g, cg) - mean * a


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x: Array, scale: Array, bias: Array, groups: int, eps: float, silu: bool = False) -> Array:
  """GroupNorm over [N, H, W, C] (float32 arithmetic), optionally followed by SiLU, as one fused op.

  Forward: two reductions for the statistics (the mean, then the centred sum of squares, as torch's
  two-pass), then one elementwise pass writing the output. Backward: recomputes the normalised input from x
  and the saved per-group statistics (nothing of the size of x is saved besides x itself), reduces
  sum(dy) and sum(dy * x) per (sample, channel) in one pass and writes dx in one more:
  dx = rstd * (dy * scale - mean_g(dy * scale) - xhat * mean_g(dy * scale * xhat)).
  """
  return _group_norm_fwd(x, scale, bias, groups, eps, silu)[0]


def _group_norm_fwd(x, scale, bias, groups, eps, silu):
  dtype = x.dtype
  xg = _gn_groups(x.astype(jnp.float32), groups)
  mean, rstd = _gn_stats(xg, eps)
  a, b = _gn_affine(mean, rstd, scale.astype(jnp.float32), bias.astype(jnp.float32), groups)
  y = xg * a + b
  if silu:
    y = y * jax.nn.sigmoid(y)
  return y.reshape(x.shape).astype(dtype), (x, scale, bias, mean, rstd)


def _group_norm_bwd(groups, eps, silu, res, ct):
  del eps
  x, scale, bias, mean, rstd = res
  f32 = jnp.float32
  xg = _gn_groups(x.astype(f32), groups)
  ctg = _gn_groups(ct.astype(f32), groups)
  sc = scale.astype(f32)
  a, b = _gn_affine(mean, rstd, sc, bias.astype(f32), groups)

  def dy():  # the cotangent at the affine output (through the SiLU, recomputed)
    if not silu:
      return ctg
    y = xg * a + b
    s = jax.nn.sigmoid(y)
    return ctg * (s * (1 + y * (1 - s)))

  d = dy()
  s1 = jnp.sum(d, axis=1, keepdims=True)                    # sum over positions of dy, [N, 1, G, Cg]
  s2 = jnp.sum(d * xg, axis=1, keepdims=True)               # ... of dy * x
  sxhat = rstd * (s2 - mean * s1)                           # ... of dy * xhat
  cg = sc.shape[0] // groups
  n = xg.shape[1] * cg
  scg = sc.reshape(1, 1, groups, cg)
  m1 = jnp.sum(scg * s1, axis=3, keepdims=True) / np.float32(n)     # group mean of dy * scale
  m2 = jnp.sum(scg * sxhat, axis=3, keepdims=True) / np.float32(n)  # group mean of dy * scale * xhat
  p = -rstd * rstd * m2
  q = rstd * (rstd * m2 * mean - m1)
  dx = dy() * a + xg * p + q
  dscale = jnp.sum(sxhat, axis=(0, 1)).reshape(-1).astype(scale.dtype)
  dbias = jnp.sum(s1, axis=(0, 1)).reshape(-1).astype(bias.dtype)
  return dx.reshape(x.shape).astype(x.dtype), dscale, dbias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """torch group_norm with min(32, C // 4) groups: biased two-pass variance, eps inside the sqrt.

  `silu=True` applies SiLU to the output inside the same fused op (`group_norm`).
  """
  eps: float = NORM_EPS
  num_groups: int = 32
  min_channels_per_group: int = 4
  silu: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    g = min(self.num_groups, c // self.min_channels_per_group)
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return group_norm(x, scale, bias, g, float(self.eps), bool(self.silu))


class QKV(nn.Module):
  """Upstream's `qkv` 1x1 Conv2d (parameters `kernel` [1, 1, C, 3C] and `bias` [3C]), returning q, k, v.

  Upstream splits the output channels as (head, c, {q, k, v}) in C order; here the kernel's columns are
  split that way instead and q, k, v come out of three matmuls already contiguous (the same dot products,
  no strided copies of the activations).
  """
  channels: int
  num_heads: int = 1
  init_weight: float = float(np.sqrt(0.2))

  @nn.compact
  def __call__(self, x: Array):
    cin, c = x.shape[-1], self.channels
    kernel = self.param("kernel", xavier_uniform(cin, 3 * c, self.init_weight), (1, 1, cin, 3 * c))
    bias = self.param("bias", nn.initializers.zeros, (3 * c,))
    kernel, bias = kernel.astype(x.dtype), bias.astype(x.dtype)
    w = kernel.reshape(cin, self.num_heads, c // self.num_heads, 3)
    b = bias.reshape(self.num_heads, c // self.num_heads, 3)
    dims = (((x.ndim - 1,), (0,)), ((), ()))
    return tuple(jax.lax.dot_general(x, w[..., i].reshape(cin, c), dims) + b[..., i].reshape(c)
                 for i in range(3))


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
    skip_scale = float(np.float32(self.skip_scale))  # a weak-typed scalar: the float32 value, any dtype
    orig = x
    x = Conv2d(cout, 3, up=self.up, down=self.down, resample_filter=self.resample_filter,
               name="conv0")(GroupNorm(self.eps, silu=True, name="norm0")(x))
    params = Linear(cout, name="affine")(emb)[:, None, None, :].astype(x.dtype)
    x = GroupNorm(self.eps, silu=True, name="norm1")(x + params)
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
      q, k, v = QKV(cout, heads, name="qkv")(GroupNorm(self.eps, name="norm2")(x))   # [n, h, w, cout]
      q, k, v = (t.reshape(n, h * w, heads, ch) for t in (q, k, v))
      k = k / np.float32(np.sqrt(ch))
      hi = jax.lax.Precision.HIGHEST
      logits = jnp.einsum("nqhc,nkhc->nhqk", q.astype(jnp.float32), k.astype(jnp.float32), precision=hi)
      weights = jax.nn.softmax(logits, axis=-1)
      a = jnp.einsum("nhqk,nkhc->nqhc", weights, v.astype(jnp.float32), precision=hi)
      a = a.astype(x.dtype).reshape(n, h, w, cout)
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
  # Execution options (not architecture; absent from upstream's kwargs), off by default:
  compute_dtype: str = "float32"  # 'bfloat16': convs, matmuls and activations in bf16 (GroupNorm statistics,
                                  # attention softmax, the embedding and the output stay float32)
  remat: bool = False             # rematerialise each UNetBlock in the backward pass (jax.checkpoint)

  def _check_options(self):
    if self.embedding_type != "positional":
      raise ValueError(f"SongUNet: embedding_type {self.embedding_type!r} is not supported "
                       "(only 'positional', the DDPM++ choice)")
    if self.encoder_type != "standard" or self.decoder_type != "standard":
      raise ValueError(f"SongUNet: encoder_type {self.encoder_type!r} / decoder_type "
                       f"{self.decoder_type!r} not supported (only 'standard', the DDPM++ choice)")
    if self.compute_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"SongUNet: compute_dtype {self.compute_dtype!r} must be 'float32' or 'bfloat16'")

  def _block(self, name: str, cout: int, **kwargs) -> UNetBlock:
    cls = nn.remat(UNetBlock, static_argnums=(3,)) if self.remat else UNetBlock
    return cls(cout, num_heads=1, dropout=self.dropout, skip_scale=SKIP_SCALE, eps=NORM_EPS,
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
        x = Conv2d(mc, 3, dtype=jnp.dtype(self.compute_dtype), name=f"enc_{res}x{res}_conv")(x)
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
        h = GroupNorm(NORM_EPS, silu=True, name=f"dec_{res}x{res}_aux_norm")(x)
        out = Conv2d(self.out_channels, 3, init_weight=1e-5, name=f"dec_{res}x{res}_aux_conv")(h)
    out = out.astype(jnp.float32)
    return out
