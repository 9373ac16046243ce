"""The multi-scale VQVAE of VAR (FoundationVision/VAR `models/vqvae.py`, `vae_ch160v4096z32`) as flax.linen, NHWC.

docs/ARCHITECTURES.md §4.3. The network is the VQGAN (vq-f16) encoder / decoder with VAR's residual multi-scale
quantizer:

  encoder: conv_in 3x3 -> per level i: `num_res_blocks` ResNet blocks (single-head attention after each at the
           last level), then (except at the last level) zero-pad one row / column at the bottom / right and a
           3x3 stride-2 conv -> mid (ResNet, attention, ResNet) -> GroupNorm + SiLU -> conv_out 3x3 to z_channels
  quant_conv / post_quant_conv: 3x3 convs, z_channels -> z_channels
  decoder: conv_in 3x3 -> mid -> levels reversed, `num_res_blocks + 1` ResNet blocks each (attention after each
           at the last level), nearest 2x + 3x3 conv after every level but level 0 -> GroupNorm + SiLU ->
           conv_out 3x3 -> clamp to [-1, 1]

GroupNorm has 32 groups and eps 1e-6 everywhere. A ResNet block is x' + conv2(silu(norm2(conv1(silu(norm1(x)))))),
with x' the input through a 1x1 `nin_shortcut` when the width changes. The attention block computes one 1x1
`qkv` conv whose output channels are blocked [q | k | v], softmax(q k^T / sqrt(C)) v over positions, then
`proj_out` 1x1, plus the input.

Quantizer (VectorQuantizer2, test mode): a codebook `embedding` [V, Cvae] and phi layers
`phi(h) = (1 - r) h + r conv3x3(h)` with r = |quant_resi|. Scale si of S uses phi number
`argmin_k |ticks_k - si / (S - 1)|` (float64 numpy, as upstream), ticks = linspace(1/(3K), 1 - 1/(3K), K) for K = 4
phis and linspace(1/(2K), 1 - 1/(2K), K) otherwise (`phi_index`); for the released config (S = 10, K = 4) that is
[0, 0, 1, 1, 1, 2, 2, 3, 3, 3].

Resampling is upstream's F.interpolate exactly (not jax.image.resize):
  * `upsample_bicubic(x, n)`: bicubic, align_corners=False, A = -0.75, source coordinate (i + 0.5) * in / n - 0.5
    not clamped, the four taps clamped to the edge; separable, no antialiasing.
  * `area_downsample(x, n)`: adaptive average pooling, window [floor(i * in / n), ceil((i + 1) * in / n)).
Both are matrices built in numpy (float32 coefficients computed as torch does) applied with `highest` precision.

Names follow the PyTorch modules so the converter (ddo_jax.convert.vqvae) stays mechanical: a ModuleList entry
`down.0` becomes `down_0` (likewise `block_<j>`, `attn_<j>`, `up_<i>`, `qresi_ls_<k>`), GroupNorm `weight` is
`scale`, other weights are `kernel` (HWIO), and the codebook is the leaf `quantize/embedding` [V, Cvae] (torch
`quantize.embedding.weight`). The training buffer `quantize.ema_vocab_hit_SV` has no Flax counterpart.

Parameters are the variables dict `{'params': tree}`: `vae.apply(variables, img, method='encode')`. The pure
functions below take `(vae, variables, ...)`; they also accept the bare tree. Everything is float32, every array
NHWC, token indices int32 in row-major (h, w) order, images in [-1, 1]. All functions are jit-compatible; the
scale structure (`patch_nums`) is static through the module.

Use:
  vae = VQVAE(**vqvae_config_full())
  idx = img_to_idx(vae, variables, img)                      # list of [B, pn * pn] int32
  x_in = idx_to_var_input(vae, variables, idx)               # [B, L - pn_0^2, Cvae], VAR teacher forcing
  img = fhat_to_img(vae, variables, idx_to_fhat(vae, variables, idx))
"""
import functools
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ddo_jax.nets.sd_vae import Conv, GroupNorm, _precision, _torch_uniform

Array = Any

NORM_EPS = 1e-6
NUM_GROUPS = 32
CUBIC_A = -0.75          # torch's bicubic coefficient
CH_MULT = (1, 1, 2, 2, 4)  # fixed by upstream's VQVAE class (vq-f16 ddconfig)
PATCH_NUMS_FULL = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def vqvae_config_full() -> dict:
  """The VQVAE kwargs of the released `vae_ch160v4096z32.pth` (VAR models/__init__.py build_vae_var)."""
  return dict(vocab_size=4096, z_channels=32, ch=160, ch_mult=CH_MULT, num_res_blocks=2, share_quant_resi=4,
              patch_nums=PATCH_NUMS_FULL, quant_resi=0.5)


# ---------------------------------------------------------------------------------------------------------------------
# The phi index rule and resampling (pure, numpy-built constants).


def phi_ticks(num_phis: int) -> np.ndarray:
  k = int(num_phis)
  if k == 4:
    return np.linspace(1 / 3 / k, 1 - 1 / 3 / k, k)
  return np.linspace(1 / 2 / k, 1 - 1 / 2 / k, k)


def phi_index(num_scales: int, share_quant_resi: int, default_qresi_counts: int = 0) -> List[int]:
  """Which phi layer each scale si = 0..S-1 uses (upstream's PhiShared / PhiPartiallyShared / PhiNonShared lookup).

  share_quant_resi 1: one shared phi (all 0); 0: one phi per scale (or `default_qresi_counts` of them) picked by
  the ticks rule; K >= 2: K partially shared phis picked by the ticks rule, in float64 as upstream.
  """
  s = int(num_scales)
  if s < 2:
    raise ValueError(f"VQVAE: {s} scales; upstream's phi lookup si / (S - 1) needs at least 2")
  share = int(share_quant_resi)
  if share == 1:
    return [0] * s
  k = (int(default_qresi_counts) or s) if share == 0 else share
  ticks = phi_ticks(k)
  return [int(np.argmin(np.abs(ticks - si / (s - 1)))) for si in range(s)]


def _num_phis(share_quant_resi: int, default_qresi_counts: int, num_scales: int) -> int:
  share = int(share_quant_resi)
  if share == 1:
    return 1
  return (int(default_qresi_counts) or int(num_scales)) if share == 0 else share


def _cubic_weights(t: np.float32) -> Tuple[np.float32, ...]:
  """torch's get_cubic_upsample_coefficients for fraction t, in float32 (A = -0.75)."""
  a = np.float32(CUBIC_A)
  one = np.float32(1.0)

  def cc1(x):  # |x| <= 1
    return ((a + np.float32(2)) * x - (a + np.float32(3))) * x * x + one

  def cc2(x):  # 1 < |x| < 2
    return ((a * x - np.float32(5) * a) * x + np.float32(8) * a) * x - np.float32(4) * a

  return cc2(t + one), cc1(t), cc1(one - t), cc2(np.float32(2) - t)


@functools.lru_cache(maxsize=None)
def bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32: F.interpolate(mode='bicubic', align_corners=False) along one axis."""
  w = np.zeros((n_out, n_in), np.float32)
  scale = np.float32(n_in / n_out)
  with np.errstate(over="ignore"):
    for i in range(n_out):
      src = scale * (np.float32(i) + np.float32(0.5)) - np.float32(0.5)  # not clamped at 0 (cubic)
      i0 = int(np.floor(src))
      t = np.float32(src - np.float32(i0))
      for tap, c in zip(range(i0 - 1, i0 + 3), _cubic_weights(t)):
        w[i, min(max(tap, 0), n_in - 1)] += c
  return w


@functools.lru_cache(maxsize=None)
def area_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] float32: F.interpolate(mode='area') = adaptive average pooling along one axis."""
  w = np.zeros((n_out, n_in), np.float32)
  for i in range(n_out):
    start = (i * n_in) // n_out
    end = -((-(i + 1) * n_in) // n_out)
    w[i, start:end] = np.float32(1.0 / (end - start))
  return w


def _resample(x: Array, mat_h: np.ndarray, mat_w: np.ndarray) -> Array:
  prec = jax.lax.Precision.HIGHEST
  x = jnp.einsum("ph,bhwc->bpwc", jnp.asarray(mat_h), x.astype(jnp.float32), precision=prec)
  return jnp.einsum("qw,bpwc->bpqc", jnp.asarray(mat_w), x, precision=prec)


def _hw(size) -> Tuple[int, int]:
  return (int(size), int(size)) if np.ndim(size) == 0 else (int(size[0]), int(size[1]))


def upsample_bicubic(x: Array, size) -> Array:
  """[B, h, w, C] -> [B, H, W, C] as torch bicubic (align_corners=False, A=-0.75, clamped taps); size int or (H, W)."""
  (ho, wo), (hi, wi) = _hw(size), x.shape[1:3]
  if (ho, wo) == (hi, wi):
    return x
  return _resample(x, bicubic_matrix(hi, ho), bicubic_matrix(wi, wo))


def area_downsample(x: Array, size) -> Array:
  """[B, H, W, C] -> [B, h, w, C] as torch mode='area' (adaptive average pooling); size int or (h, w)."""
  (ho, wo), (hi, wi) = _hw(size), x.shape[1:3]
  if (ho, wo) == (hi, wi):
    return x
  return _resample(x, area_matrix(hi, ho), area_matrix(wi, wo))


# ---------------------------------------------------------------------------------------------------------------------
# Modules.


class ResnetBlock(nn.Module):
  """VQGAN ResnetBlock (dropout 0): nin_shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))."""
  features: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = GroupNorm(NUM_GROUPS, NORM_EPS, silu=True, name="norm1")(x)
    h = Conv(self.features, 3, precision=self.precision, name="conv1")(h)
    h = GroupNorm(NUM_GROUPS, NORM_EPS, silu=True, name="norm2")(h)
    h = Conv(self.features, 3, precision=self.precision, name="conv2")(h)
    if x.shape[-1] != self.features:
      x = Conv(self.features, 1, precision=self.precision, name="nin_shortcut")(x)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over positions; `qkv` output channels are blocked [q | k | v]."""
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    prec = _precision(self.precision)
    qkv = Conv(3 * c, 1, precision=self.precision, name="qkv")(GroupNorm(NUM_GROUPS, NORM_EPS, name="norm")(x))
    qkv = qkv.reshape(b, h * w, 3, c)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = jnp.einsum("bic,bjc->bij", q, k, precision=prec) * np.float32(int(c) ** -0.5)
    weights = jax.nn.softmax(logits, axis=-1)
    y = jnp.einsum("bij,bjc->bic", weights, v, precision=prec).reshape(b, h, w, c)
    return x + Conv(c, 1, precision=self.precision, name="proj_out")(y)


class _Mid(nn.Module):
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    x = ResnetBlock(c, self.precision, name="block_1")(x)
    x = AttnBlock(self.precision, name="attn_1")(x)
    return ResnetBlock(c, self.precision, name="block_2")(x)


class _Level(nn.Module):
  """One encoder `down.<i>` / decoder `up.<i>` entry: blocks (with attention after each when `attn`), then the
  optional resampling conv (`downsample` or `upsample`)."""
  features: int
  num_blocks: int
  attn: bool
  resample: Optional[str]  # None, 'downsample' or 'upsample'
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for j in range(self.num_blocks):
      x = ResnetBlock(self.features, self.precision, name=f"block_{j}")(x)
      if self.attn:
        x = AttnBlock(self.precision, name=f"attn_{j}")(x)
    if self.resample == "downsample":
      x = Downsample2x(self.precision, name="downsample")(x)
    elif self.resample == "upsample":
      x = Upsample2x(self.precision, name="upsample")(x)
    return x


class Downsample2x(nn.Module):
  """Zero-pad one row / column at the bottom / right, then a 3x3 conv with stride 2 and no padding."""
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return Conv(x.shape[-1], 3, stride=2, padding=((0, 1), (0, 1)), precision=self.precision, name="conv")(x)


class Upsample2x(nn.Module):
  """Nearest-neighbour 2x, then a 3x3 conv (padding 1)."""
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    n, h, w, c = x.shape
    x = jnp.broadcast_to(x[:, :, None, :, None, :], (n, h, 2, w, 2, c)).reshape(n, 2 * h, 2 * w, c)
    return Conv(c, 3, precision=self.precision, name="conv")(x)


class Encoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  z_channels: int
  precision: Any = "highest"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    mult, prec = tuple(self.ch_mult), self.precision
    x = Conv(self.ch, 3, precision=prec, name="conv_in")(x)
    for i, m in enumerate(mult):
      last = i == len(mult) - 1
      x = _Level(self.ch * m, self.num_res_blocks, last, None if last else "downsample", prec, name=f"down_{i}")(x)
    x = _Mid(prec, name="mid")(x)
    x = GroupNorm(NUM_GROUPS, NORM_EPS, silu=True, name="norm_out")(x)
    return Conv(self.z_channels, 3, precision=prec, name="conv_out")(x)


class Decoder(nn.Module):
  ch: int
  ch_mult: Sequence[int]
  num_res_blocks: int
  out_channels: int = 3
  precision: Any = "highest"

  @nn.compact
  def __call__(self, z: Array) -> Array:
    mult, prec = tuple(self.ch_mult), self.precision
    x = Conv(self.ch * mult[-1], 3, precision=prec, name="conv_in")(z)
    x = _Mid(prec, name="mid")(x)
    for i in reversed(range(len(mult))):
      x = _Level(self.ch * mult[i], self.num_res_blocks + 1, i == len(mult) - 1, "upsample" if i else None, prec,
                 name=f"up_{i}")(x)
    x = GroupNorm(NUM_GROUPS, NORM_EPS, silu=True, name="norm_out")(x)
    return Conv(self.out_channels, 3, precision=prec, name="conv_out")(x)


class Phi(nn.Module):
  """phi(h) = (1 - r) h + r conv3x3(h) (upstream `Phi`, an nn.Conv2d subclass: leaves `kernel`, `bias`)."""
  ratio: float
  precision: Any = "highest"

  @nn.compact
  def __call__(self, h: Array) -> Array:
    c = h.shape[-1]
    init = _torch_uniform(9 * c)
    kernel = self.param("kernel", init, (3, 3, c, c))
    bias = self.param("bias", init, (c,))
    y = jax.lax.conv_general_dilated(h, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=_precision(self.precision)) + bias
    r = abs(float(self.ratio))
    return h * np.float32(1 - r) + y * np.float32(r)


class _PhiList(nn.Module):
  """`quant_resi` of PhiPartiallyShared (its `qresi_ls_<k>`) or PhiShared (`qresi`)."""
  num_phis: int
  shared: bool
  ratio: float
  precision: Any = "highest"

  def setup(self):
    if self.shared:
      self.qresi = Phi(self.ratio, self.precision)
    else:
      self.qresi_ls = [Phi(self.ratio, self.precision) for _ in range(self.num_phis)]

  def __call__(self, h: Array, k: int) -> Array:
    return self.qresi(h) if self.shared else self.qresi_ls[k](h)


class Quantizer(nn.Module):
  """VectorQuantizer2's parameters: the codebook `embedding` [V, Cvae] and the phi layers."""
  vocab_size: int
  z_channels: int
  num_scales: int
  share_quant_resi: int = 4
  default_qresi_counts: int = 0
  quant_resi_ratio: float = 0.5
  precision: Any = "highest"

  def setup(self):
    self.embedding = self.param("embedding", nn.initializers.normal(1.0), (self.vocab_size, self.z_channels))
    self.identity_phi = abs(float(self.quant_resi_ratio)) <= 1e-6
    n = _num_phis(self.share_quant_resi, self.default_qresi_counts, self.num_scales)
    if self.identity_phi:
      return
    if int(self.share_quant_resi) == 0:
      # PhiNonShared is itself the ModuleList: torch keys quantize.quant_resi.<k>.weight -> quant_resi_<k>
      self.quant_resi = [Phi(self.quant_resi_ratio, self.precision) for _ in range(n)]
    else:
      self.quant_resi = _PhiList(n, int(self.share_quant_resi) == 1, self.quant_resi_ratio, self.precision)

  def phi_k(self, h: Array, k: int) -> Array:
    if self.identity_phi:
      return h
    if int(self.share_quant_resi) == 0:
      return self.quant_resi[k](h)
    return self.quant_resi(h, k)

  def codebook(self) -> Array:
    return self.embedding


class VQVAE(nn.Module):
  """VAR's VQVAE (test mode). Methods (via `apply(..., method=...)`):

  encode(img [B, H, W, 3]) -> f = quant_conv(encoder(img)) [B, h, w, Cvae]
  decode(f_hat, clamp=True) -> decoder(post_quant_conv(f_hat)), clamped to [-1, 1] unless clamp=False
  phi(h, si) -> phi of scale si (static int) by `phi_index`
  codebook() -> [V, Cvae]
  __call__(img) -> decode of the full tokenization (what init uses; touches every parameter)
  """
  vocab_size: int = 4096
  z_channels: int = 32
  ch: int = 160
  ch_mult: Sequence[int] = CH_MULT
  num_res_blocks: int = 2
  share_quant_resi: int = 4
  patch_nums: Sequence[int] = PATCH_NUMS_FULL
  quant_resi: float = 0.5
  default_qresi_counts: int = 0
  using_znorm: bool = False
  precision: Any = "highest"

  def __post_init__(self):
    # Tuples, so that the module stays hashable (a static jit argument) when lists are passed.
    object.__setattr__(self, "patch_nums", tuple(int(p) for p in self.patch_nums))
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    super().__post_init__()

  def setup(self):
    kw = dict(ch=self.ch, ch_mult=tuple(self.ch_mult), num_res_blocks=self.num_res_blocks, precision=self.precision)
    self.encoder = Encoder(z_channels=self.z_channels, **kw)
    self.decoder = Decoder(**kw)
    self.quant_conv = Conv(self.z_channels, 3, precision=self.precision)
    self.post_quant_conv = Conv(self.z_channels, 3, precision=self.precision)
    self.quantize = Quantizer(self.vocab_size, self.z_channels, len(self.patch_nums), self.share_quant_resi,
                              self.default_qresi_counts, self.quant_resi, self.precision)

  @property
  def phi_indices(self) -> List[int]:
    return phi_index(len(self.patch_nums), self.share_quant_resi, self.default_qresi_counts)

  @property
  def downsample(self) -> int:
    return 2 ** (len(tuple(self.ch_mult)) - 1)

  @property
  def img_size(self) -> int:
    return int(tuple(self.patch_nums)[-1]) * self.downsample

  def encode(self, img: Array) -> Array:
    return self.quant_conv(self.encoder(img.astype(jnp.float32)))

  def decode(self, f_hat: Array, clamp: bool = True) -> Array:
    x = self.decoder(self.post_quant_conv(f_hat.astype(jnp.float32)))
    return jnp.clip(x, -1.0, 1.0) if clamp else x

  def phi(self, h: Array, si: int) -> Array:
    return self.quantize.phi_k(h.astype(jnp.float32), self.phi_indices[int(si)])

  def codebook(self) -> Array:
    return self.quantize.codebook()

  def __call__(self, img: Array) -> Array:
    f = self.encode(img)
    f_hat = jnp.zeros_like(f)
    n = _num_phis(self.share_quant_resi, self.default_qresi_counts, len(self.patch_nums))
    for k in range(n):
      f_hat = f_hat + self.quantize.phi_k(f, k)
    f_hat = f_hat + jnp.mean(self.codebook())
    return self.decode(f_hat)


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions (VectorQuantizer2 / VQVAE inference methods).


def _variables(params: Mapping[str, Any]) -> Mapping[str, Any]:
  """`{'params': tree}` from either that or the bare tree."""
  return params if "params" in params else {"params": params}


def abstract_params(vae: VQVAE) -> dict:
  """jax.eval_shape of the bare parameter tree (no compute)."""
  side = vae.downsample
  x = jax.ShapeDtypeStruct((1, side, side, 3), jnp.float32)
  return jax.eval_shape(lambda k, x: vae.init(k, x), jax.random.key(0), x)["params"]


def init_params(vae: VQVAE, rng: jax.Array) -> dict:
  """Fresh variables `{'params': ...}` (torch-default-like init; codebook N(0, 1)); the smallest image."""
  side = vae.downsample
  return {"params": vae.init(rng, jnp.zeros((1, side, side, 3), jnp.float32))["params"]}


def codebook(vae: VQVAE, params) -> Array:
  return _variables(params)["params"]["quantize"]["embedding"]


def _phi(vae, variables, h, si):
  return vae.apply(variables, h, si, method=VQVAE.phi)


def _nearest(vae: VQVAE, z: Array, emb: Array) -> Array:
  """argmin_v ||z - e_v||^2 (upstream's expanded form; first index on ties) or, with using_znorm, argmax cosine."""
  prec = jax.lax.Precision.HIGHEST
  if vae.using_znorm:
    zn = z / jnp.maximum(jnp.linalg.norm(z, axis=-1, keepdims=True), 1e-12)
    en = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
    return jnp.argmax(jnp.matmul(zn, en.T, precision=prec), axis=-1)
  d = jnp.sum(z * z, axis=-1, keepdims=True) + jnp.sum(emb * emb, axis=-1)
  d = d - 2.0 * jnp.matmul(z, emb.T, precision=prec)
  return jnp.argmin(d, axis=-1)


def f_to_idx_and_fhat(vae: VQVAE, params, f: Array) -> Tuple[List[Array], List[Array]]:
  """Upstream f_to_idxBl_or_fhat on f [B, H, W, Cvae]: (token indices per scale [B, pn*pn] int32,
  cumulative f_hat after each scale [B, H, W, Cvae])."""
  variables = _variables(params)
  pns = tuple(int(p) for p in vae.patch_nums)
  b, hh, ww, c = f.shape
  if (hh, ww) != (pns[-1], pns[-1]):
    raise ValueError(f"VQVAE: feature map {hh}x{ww} does not match the last patch_num {pns[-1]}")
  emb = codebook(vae, variables)
  f_rest = f.astype(jnp.float32)
  f_hat = jnp.zeros_like(f_rest)
  idx_list, fhat_list = [], []
  for si, pn in enumerate(pns):
    last = si == len(pns) - 1
    z = f_rest if last else area_downsample(f_rest, pn)
    idx = _nearest(vae, z.reshape(b * pn * pn, c), emb).astype(jnp.int32).reshape(b, pn * pn)
    h = jnp.take(emb, idx, axis=0).reshape(b, pn, pn, c)
    if not last:
      h = upsample_bicubic(h, (hh, ww))
    h = _phi(vae, variables, h, si)
    f_hat = f_hat + h
    f_rest = f_rest - h
    idx_list.append(idx)
    fhat_list.append(f_hat)
  return idx_list, fhat_list


def img_to_idx(vae: VQVAE, params, img: Array) -> List[Array]:
  """Upstream img_to_idxBl: img [B, H, W, 3] in [-1, 1] -> token indices per scale, [B, pn*pn] int32 each."""
  f = vae.apply(_variables(params), img, method=VQVAE.encode)
  return f_to_idx_and_fhat(vae, params, f)[0]


def _embed(vae: VQVAE, params, idx: Array, pn: int) -> Array:
  emb = codebook(vae, params)
  return jnp.take(emb, idx.astype(jnp.int32), axis=0).reshape(idx.shape[0], pn, pn, emb.shape[-1])


def idx_to_var_input(vae: VQVAE, params, idx_list: Sequence[Array]) -> Array:
  """Upstream idxBl_to_var_input: [B, L - pn_0^2, Cvae], area(f_hat) after scales 0..S-2, row-major per scale."""
  variables = _variables(params)
  pns = tuple(int(p) for p in vae.patch_nums)
  hw = pns[-1]
  b = idx_list[0].shape[0]
  f_hat = jnp.zeros((b, hw, hw, vae.z_channels), jnp.float32)
  outs = []
  for si in range(len(pns) - 1):
    h = upsample_bicubic(_embed(vae, variables, idx_list[si], pns[si]), hw)
    f_hat = f_hat + _phi(vae, variables, h, si)
    nxt = pns[si + 1]
    outs.append(area_downsample(f_hat, nxt).reshape(b, nxt * nxt, vae.z_channels))
  return jnp.concatenate(outs, axis=1)


def next_ar_input(vae: VQVAE, params, si: int, f_hat: Array, h: Array) -> Tuple[Array, Optional[Array]]:
  """Upstream get_next_autoregressive_input: h [B, pn_si, pn_si, Cvae] (codebook vectors of scale si).

  Returns (f_hat + phi_si(bicubic(h)), area(f_hat) at patch_nums[si + 1] [B, pn', pn', Cvae]); at the last scale
  (f_hat + phi(h), None).
  """
  variables = _variables(params)
  pns = tuple(int(p) for p in vae.patch_nums)
  si = int(si)
  if si != len(pns) - 1:
    f_hat = f_hat + _phi(vae, variables, upsample_bicubic(h, f_hat.shape[1:3]), si)
    return f_hat, area_downsample(f_hat, pns[si + 1])
  return f_hat + _phi(vae, variables, h, si), None


def idx_to_fhat(vae: VQVAE, params, idx_list: Sequence[Array], all_scales: bool = False):
  """Upstream embed_to_fhat(all_to_max_scale=True): f_hat [B, H, W, Cvae] (the list after each scale if all_scales)."""
  variables = _variables(params)
  pns = tuple(int(p) for p in vae.patch_nums)
  hw = pns[-1]
  b = idx_list[0].shape[0]
  f_hat = jnp.zeros((b, hw, hw, vae.z_channels), jnp.float32)
  out = []
  for si, pn in enumerate(pns):
    h = _embed(vae, variables, idx_list[si], pn)
    if si < len(pns) - 1:
      h = upsample_bicubic(h, hw)
    f_hat = f_hat + _phi(vae, variables, h, si)
    out.append(f_hat)
  return out if all_scales else f_hat


def fhat_to_img(vae: VQVAE, params, f_hat: Array, clamp: bool = True) -> Array:
  """Upstream fhat_to_img: decoder(post_quant_conv(f_hat)) clamped to [-1, 1], [B, H, W, 3]."""
  return vae.apply(_variables(params), f_hat, clamp, method=VQVAE.decode)


def idx_to_img(vae: VQVAE, params, idx_list: Sequence[Array]) -> Array:
  """Upstream idxBl_to_img(same_shape=True, last_one=True)."""
  return fhat_to_img(vae, params, idx_to_fhat(vae, params, idx_list))
