"""The Stable Diffusion VAE (diffusers `AutoencoderKL`, e.g. `stabilityai/sd-vae-ft-mse`) as flax.linen, NHWC.

EDM2's 512x512 models work in the latent space of this VAE (docs/ARCHITECTURES.md §3.7). The network is the
diffusers one with `DownEncoderBlock2D` / `UpDecoderBlock2D` blocks:

  encoder: conv_in 3x3 -> per level: `layers_per_block` ResNet blocks, then (except at the last level) a
           3x3 stride-2 conv after zero-padding one row / column at the bottom / right -> mid block
           (ResNet, single-head self-attention with GroupNorm and a residual, ResNet) -> GroupNorm + SiLU
           -> conv_out 3x3 to 2 * latent_channels (mean and log-variance)
  quant_conv 1x1 (2 * latent_channels), post_quant_conv 1x1 (latent_channels)
  decoder: conv_in 3x3 -> mid block -> per level (channels reversed): `layers_per_block + 1` ResNet
           blocks, then (except at the last level) nearest 2x upsampling and a 3x3 conv -> GroupNorm + SiLU
           -> conv_out 3x3

A ResNet block is GroupNorm + SiLU, conv 3x3, GroupNorm + SiLU, conv 3x3, plus the input (through a 1x1
`conv_shortcut` when the channel count changes). Every GroupNorm has `norm_num_groups` groups and eps 1e-6.
There is no time embedding, dropout is 0 and every output scale factor is 1, so none of them appear.

Names follow the PyTorch modules so that the name map in `ddo_jax.convert.sd_vae` stays mechanical: a
ModuleList entry `down_blocks.0` becomes the module `down_blocks_0` (likewise `resnets_<i>`,
`attentions_0`, `downsamplers_0`, `upsamplers_0` and the attention's output projection `to_out_0`).
Leaves are `kernel` (HWIO for convolutions, [in, out] for the attention's dense layers), `bias` and, for
GroupNorm, `scale`. Everything is float32; matmuls and convolutions run at `precision` ('highest' by
default).

Use: `vae = build_autoencoder_kl(config)`; `moments = vae.apply({'params': p}, x, method='encode')` for x in
[B, H, W, in_channels] ([-1, 1] in the generic diffusers convention; EDM2 feeds [0, 1]);
`posterior(moments)` gives mean, logvar (clamped to [-30, 20]) and std = exp(logvar / 2);
`vae.apply({'params': p}, z, method='decode')` maps [B, h, w, latent_channels] back to pixels.
"""
from typing import Any, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.nets.songunet import group_norm

Array = Any

NORM_EPS = 1e-6          # eps of every GroupNorm in the VAE (resnets, attention, conv_norm_out)
LOGVAR_CLAMP = (-30.0, 20.0)  # DiagonalGaussianDistribution clamps the log-variance to this range

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"

# diffusers AutoencoderKL constructor defaults (models/autoencoders/autoencoder_kl.py).
DEFAULTS = dict(
    in_channels=3, out_channels=3, down_block_types=(DOWN_BLOCK,), up_block_types=(UP_BLOCK,),
    block_out_channels=(64,), layers_per_block=1, act_fn="silu", latent_channels=4, norm_num_groups=32,
    sample_size=32, scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True, mid_block_add_attention=True)
# The entries that shape the network (the rest only describe how pipelines use the latents).
ARCH_KEYS = ("in_channels", "out_channels", "down_block_types", "up_block_types", "block_out_channels",
             "layers_per_block", "act_fn", "latent_channels", "norm_num_groups", "use_quant_conv",
             "use_post_quant_conv", "mid_block_add_attention")


def _precision(name):
  return jax.lax.Precision(name) if isinstance(name, str) else name


def _torch_uniform(fan_in: int):
  """torch's default Conv2d / Linear init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weight and bias."""
  bound = float(1.0 / np.sqrt(fan_in))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class Conv(nn.Module):
  """torch Conv2d with bias, NHWC x HWIO; `padding` is ((top, bottom), (left, right)), None for k // 2."""
  features: int
  kernel_size: int = 3
  stride: int = 1
  padding: Optional[Tuple[Tuple[int, int], Tuple[int, int]]] = None
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cin, k = x.shape[-1], self.kernel_size
    init = _torch_uniform(cin * k * k)
    kernel = self.param("kernel", init, (k, k, cin, self.features))
    bias = self.param("bias", init, (self.features,))
    prec = _precision(self.precision)
    if k == 1 and self.stride == 1:
      # A 1x1 convolution is a matmul over the channels.
      y = jax.lax.dot_general(x, kernel[0, 0], (((x.ndim - 1,), (0,)), ((), ())), precision=prec)
    else:
      pad = self.padding if self.padding is not None else ((k // 2, k // 2), (k // 2, k // 2))
      y = jax.lax.conv_general_dilated(
          x, kernel, window_strides=(self.stride, self.stride), padding=pad,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=prec)
    return y + bias


class Dense(nn.Module):
  """torch Linear with bias: y = x @ kernel + bias, kernel [in, out] (the transpose of torch's weight)."""
  features: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cin = x.shape[-1]
    init = _torch_uniform(cin)
    kernel = self.param("kernel", init, (cin, self.features))
    bias = self.param("bias", init, (self.features,))
    return jnp.matmul(x, kernel, precision=_precision(self.precision)) + bias


class GroupNorm(nn.Module):
  """torch GroupNorm (biased two-pass variance, eps inside the sqrt), optionally followed by SiLU."""
  num_groups: int = 32
  eps: float = NORM_EPS
  silu: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"SD-VAE GroupNorm: {c} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,))
    bias = self.param("bias", nn.initializers.zeros, (c,))
    return group_norm(x, scale, bias, int(self.num_groups), float(self.eps), bool(self.silu))


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: x + conv2(silu(norm2(conv1(silu(norm1(x))))))."""
  features: int
  num_groups: int = 32
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = GroupNorm(self.num_groups, silu=True, name="norm1")(x)
    h = Conv(self.features, 3, precision=self.precision, name="conv1")(h)
    h = GroupNorm(self.num_groups, silu=True, name="norm2")(h)
    h = Conv(self.features, 3, precision=self.precision, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, precision=self.precision, name="conv_shortcut")(x)
    return x + h


class Attention(nn.Module):
  """The mid block's self-attention: one head over all C channels, GroupNorm in front, residual added.

  diffusers `Attention(heads=C // C, dim_head=C, norm_num_groups, residual_connection=True)` with
  scaled dot-product attention: softmax(q k^T / sqrt(C)) v over the H * W positions, then `to_out.0`.
  """
  num_groups: int = 32
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    prec = _precision(self.precision)
    y = GroupNorm(self.num_groups, name="group_norm")(x).reshape(n, h * w, c)
    q = Dense(c, self.precision, name="to_q")(y)
    k = Dense(c, self.precision, name="to_k")(y)
    v = Dense(c, self.precision, name="to_v")(y)
    logits = jnp.einsum("nqc,nkc->nqk", q, k, precision=prec) * np.float32(1.0 / np.sqrt(c))
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("nqk,nkc->nqc", weights, v, precision=prec)
    y = Dense(c, self.precision, name="to_out_0")(y)
    return y.reshape(n, h, w, c) + x


class MidBlock(nn.Module):
  """UNetMidBlock2D: ResNet, (attention), ResNet at constant width."""
  num_groups: int = 32
  add_attention: bool = True
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.num_groups, self.precision, name="resnets_0")(x)
    if self.add_attention:
      x = Attention(self.num_groups, self.precision, name="attentions_0")(x)
    return ResnetBlock(c, self.num_groups, self.precision, name="resnets_1")(x)


class Downsample(nn.Module):
  """diffusers Downsample2D(use_conv=True, padding=0): pad one zero row / column at the bottom / right,
  then a 3x3 convolution with stride 2 and no further padding."""
  features: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv(self.features, 3, stride=2, padding=((0, 1), (0, 1)), precision=self.precision,
                name="conv")(x)


class Upsample(nn.Module):
  """diffusers Upsample2D(use_conv=True): nearest-neighbour 2x, then a 3x3 convolution."""
  features: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
    return Conv(self.features, 3, precision=self.precision, name="conv")(x)


class Encoder(nn.Module):
  """diffusers vae.Encoder with double_z: [B, H, W, in] -> [B, H / 2^(L-1), W / 2^(L-1), 2 * latent]."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  latent_channels: int
  num_groups: int = 32
  mid_block_add_attention: bool = True
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    chans, prec, g = tuple(self.block_out_channels), self.precision, self.num_groups
    x = Conv(chans[0], 3, precision=prec, name="conv_in")(x)
    for i, c in enumerate(chans):
      x = _DownBlock(c, self.layers_per_block, g, i != len(chans) - 1, prec, name=f"down_blocks_{i}")(x)
    x = MidBlock(g, self.mid_block_add_attention, prec, name="mid_block")(x)
    x = GroupNorm(g, silu=True, name="conv_norm_out")(x)
    return Conv(2 * self.latent_channels, 3, precision=prec, name="conv_out")(x)


class _DownBlock(nn.Module):
  """DownEncoderBlock2D: `num_layers` ResNet blocks, then an optional Downsample."""
  features: int
  num_layers: int
  num_groups: int
  add_downsample: bool
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.num_groups, self.precision, name=f"resnets_{j}")(x)
    if self.add_downsample:
      x = Downsample(self.features, self.precision, name="downsamplers_0")(x)
    return x


class _UpBlock(nn.Module):
  """UpDecoderBlock2D: `num_layers` ResNet blocks, then an optional Upsample."""
  features: int
  num_layers: int
  num_groups: int
  add_upsample: bool
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_layers):
      x = ResnetBlock(self.features, self.num_groups, self.precision, name=f"resnets_{j}")(x)
    if self.add_upsample:
      x = Upsample(self.features, self.precision, name="upsamplers_0")(x)
    return x


class Decoder(nn.Module):
  """diffusers vae.Decoder (GroupNorm flavour): [B, h, w, latent] -> [B, h * 2^(L-1), w * 2^(L-1), out]."""
  block_out_channels: Sequence[int]
  layers_per_block: int
  out_channels: int
  num_groups: int = 32
  mid_block_add_attention: bool = True
  precision: Any = "highest"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    chans, prec, g = tuple(reversed(tuple(self.block_out_channels))), self.precision, self.num_groups
    x = Conv(chans[0], 3, precision=prec, name="conv_in")(z)
    x = MidBlock(g, self.mid_block_add_attention, prec, name="mid_block")(x)
    for i, c in enumerate(chans):
      x = _UpBlock(c, self.layers_per_block + 1, g, i != len(chans) - 1, prec, name=f"up_blocks_{i}")(x)
    x = GroupNorm(g, silu=True, name="conv_norm_out")(x)
    return Conv(self.out_channels, 3, precision=prec, name="conv_out")(x)


class AutoencoderKL(nn.Module):
  """diffusers AutoencoderKL (Down/UpDecoderBlock2D, SiLU, GroupNorm decoder), NHWC.

  `encode(x)` returns the moments quant_conv(encoder(x)) [B, h, w, 2 * latent_channels] (mean, then
  log-variance, on the channel axis); `decode(z)` returns decoder(post_quant_conv(z)); `__call__(x)`
  decodes the posterior mean of x (diffusers' forward with sample_posterior=False).
  """
  block_out_channels: Sequence[int] = (64,)
  layers_per_block: int = 1
  in_channels: int = 3
  out_channels: int = 3
  latent_channels: int = 4
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True
  precision: Any = "highest"

  def setup(self):
    kw = dict(block_out_channels=tuple(self.block_out_channels), layers_per_block=self.layers_per_block,
              num_groups=self.norm_num_groups, mid_block_add_attention=self.mid_block_add_attention,
              precision=self.precision)
    self.encoder = Encoder(latent_channels=self.latent_channels, **kw)
    self.decoder = Decoder(out_channels=self.out_channels, **kw)
    if self.use_quant_conv:
      self.quant_conv = Conv(2 * self.latent_channels, 1, precision=self.precision)
    if self.use_post_quant_conv:
      self.post_quant_conv = Conv(self.latent_channels, 1, precision=self.precision)

  def encode(self, x: Array) -> Array:
    """x [B, H, W, in_channels] (float) -> moments [B, h, w, 2 * latent_channels]."""
    moments = self.encoder(x.astype(jnp.float32))
    return self.quant_conv(moments) if self.use_quant_conv else moments

  def decode(self, z: Array) -> Array:
    """z [B, h, w, latent_channels] -> [B, H, W, out_channels] (not clamped)."""
    z = z.astype(jnp.float32)
    if self.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def __call__(self, x: Array) -> Array:
    mean, _, _ = posterior(self.encode(x))
    return self.decode(mean)


def posterior(moments: Array) -> Tuple[Array, Array, Array]:
  """diffusers DiagonalGaussianDistribution: (mean, logvar clamped to [-30, 20], std = exp(logvar / 2))."""
  mean, logvar = jnp.split(moments, 2, axis=-1)
  logvar = jnp.clip(logvar, np.float32(LOGVAR_CLAMP[0]), np.float32(LOGVAR_CLAMP[1]))
  return mean, logvar, jnp.exp(np.float32(0.5) * logvar)


def _plain(config: Mapping[str, Any]) -> dict:
  return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items()}


def build_autoencoder_kl(config: Mapping[str, Any], precision: Any = "highest") -> AutoencoderKL:
  """The module of a config from `ddo_jax.convert.sd_vae.config_from_diffusers` (the diffusers kwargs).

  Only the architecture entries (ARCH_KEYS) matter; a ValueError names what this port does not support.
  """
  c = dict(DEFAULTS)
  c.update(dict(config))
  bad = [t for t in c["down_block_types"] if t != DOWN_BLOCK] + [t for t in c["up_block_types"] if t != UP_BLOCK]
  if bad:
    raise ValueError(f"SD-VAE: block types {sorted(set(bad))} are not supported; this port has {DOWN_BLOCK} "
                     f"and {UP_BLOCK}")
  nlev = len(c["block_out_channels"])
  if len(c["down_block_types"]) != nlev or len(c["up_block_types"]) != nlev:
    raise ValueError(f"SD-VAE: {len(c['down_block_types'])} down and {len(c['up_block_types'])} up blocks "
                     f"for {nlev} block_out_channels; the counts must agree")
  if c["act_fn"] not in ("silu", "swish"):
    raise ValueError(f"SD-VAE: act_fn {c['act_fn']!r} is not supported (only 'silu')")
  return AutoencoderKL(
      block_out_channels=tuple(int(v) for v in c["block_out_channels"]),
      layers_per_block=int(c["layers_per_block"]), in_channels=int(c["in_channels"]),
      out_channels=int(c["out_channels"]), latent_channels=int(c["latent_channels"]),
      norm_num_groups=int(c["norm_num_groups"]), use_quant_conv=bool(c["use_quant_conv"]),
      use_post_quant_conv=bool(c["use_post_quant_conv"]),
      mid_block_add_attention=bool(c["mid_block_add_attention"]), precision=precision)


def _dummy_input(vae: AutoencoderKL) -> jax.ShapeDtypeStruct:
  side = 2 ** (len(vae.block_out_channels) - 1)
  return jax.ShapeDtypeStruct((1, side, side, vae.in_channels), jnp.float32)


def init_params(vae: AutoencoderKL, rng: jax.Array) -> dict:
  """Freshly initialised parameters (torch's default init); the smallest image the net accepts."""
  x = jnp.zeros(_dummy_input(vae).shape, jnp.float32)
  return vae.init(rng, x)["params"]


def abstract_params(vae: AutoencoderKL) -> dict:
  """jax.eval_shape of the parameters: shapes and dtypes without computing anything."""
  return jax.eval_shape(lambda k: vae.init(k, jnp.zeros(_dummy_input(vae).shape, jnp.float32)),
                        jax.random.key(0))["params"]
