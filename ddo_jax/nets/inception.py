"""FID Inception-v3 (pytorch-fid's `use_fid_inception=True` network) as a flax.linen module.

This is the network of the TF graph `inception-2015-12-05` as ported by pytorch-fid
(`pt_inception-2015-12-05-6726825d.pth`): torchvision's Inception3 layout (1008-way fc, no aux
head) with the FID-specific blocks

* FIDInceptionA (Mixed_5b/5c/5d), FIDInceptionC (Mixed_6b..6e), FIDInceptionE_1 (Mixed_7b):
  the pool branch is a 3x3/1 average pool with padding 1 that does NOT count the padded zeros
  (`count_include_pad=False`, TF semantics);
* FIDInceptionE_2 (Mixed_7c): the pool branch is a 3x3/1 MAX pool with padding 1.

Every conv is `BasicConv2d` = conv (no bias) -> BatchNorm (inference form, eps 1e-3) -> ReLU.
Layout is NHWC. Parameter names follow the pytorch-fid weight file: the flax path
`Mixed_5b/branch1x1/conv/kernel` holds `Mixed_5b.branch1x1.conv.weight` (see
`ddo_jax.convert.inception_names`).

Input handling follows `pytorch_fid.inception.InceptionV3(resize_input=True, normalize_input=True)`:
images in [0, 1] are resized bilinearly to 299x299 with `align_corners=False` and no antialias
(torch `F.interpolate`), then mapped to [-1, 1] by `2x - 1`. The resize is written as two explicit
interpolation matrices (`bilinear_resize_matrix`). An alternative `resize_mode='tf_legacy'`
gives TF1's `ResizeBilinear(align_corners=False, half_pixel_centers=False)` sampling grid, which
the original TF graph uses; it is tested against its formula only, not against TF.

Outputs (dict):
* `pool3`: [N, 2048] final average-pool features (FID features).
* `logits`: [N, 1008] fc output with bias (torchvision's `fc`).
* `logits_unbiased`: [N, 1008] `pool3 @ W` without the bias. This is what the Inception Score
  of improved-gan, the OpenAI guided-diffusion evaluator (`softmax/logits/MatMul` input 1) and
  torch-fidelity (`logits_unbiased`) use.
* with `return_blocks=True` also `block0_mean` [N, 64], `block1_mean` [N, 192], `block2_mean`
  [N, 768] (spatial means of pytorch-fid's output blocks 0-2) and `resized_input_mean` [N, 3]
  (per-channel mean after the resize, before `2x - 1`), for debugging.

Precision: convolutions and the fc use `precision=jax.lax.Precision.HIGHEST` by default, so
features are full float32 on GPU/TPU as well (the default precision there would use
TF32/bfloat16 passes, which moves FID). Set `precision=None` to use the global default.
"""
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FID_INPUT_SIZE = 299
BN_EPS = 1e-3
NUM_CLASSES = 1008
POOL3_DIM = 2048
RESIZE_MODES = ("pytorch_fid", "tf_legacy")

_Precision = Any


def bilinear_resize_matrix(in_size: int, out_size: int,
                           mode: str = "pytorch_fid") -> np.ndarray:
  """Interpolation matrix R [out_size, in_size] (float32) of a 1-D bilinear resize, no antialias.

  `out = R @ in` along one axis.

  * `mode='pytorch_fid'`: torch `F.interpolate(mode='bilinear', align_corners=False)` with an
    explicit output size. The source coordinate is `(dst + 0.5) * in/out - 0.5`, clamped below at
    0; the upper neighbour is clamped to `in - 1`. Like torch's CPU kernel, scale, source coordinate
    and lambdas are computed in float32.
  * `mode='tf_legacy'`: TF1 `ResizeBilinear(align_corners=False, half_pixel_centers=False)`: the
    source coordinate is `dst * in/out`.

  Args:
    in_size: input length.
    out_size: output length.
    mode: one of `RESIZE_MODES`.

  Returns:
    float32 array [out_size, in_size]; every row has at most two nonzeros that sum to 1.
  """
  if mode not in RESIZE_MODES:
    raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  dst = np.arange(out_size, dtype=f32)
  if mode == "pytorch_fid":
    src = scale * (dst + f32(0.5)) - f32(0.5)
    src = np.maximum(src, f32(0.0))
  else:
    src = dst * scale
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  lam1 = np.clip(src - i0.astype(f32), f32(0.0), f32(1.0)).astype(f32)
  lam0 = (f32(1.0) - lam1).astype(f32)
  i1 = np.minimum(i0 + 1, in_size - 1)
  mat = np.zeros((out_size, in_size), dtype=f32)
  rows = np.arange(out_size)
  mat[rows, i0] += lam0
  mat[rows, i1] += lam1
  return mat


def resize_bilinear(x: jax.Array, size: Sequence[int] = (FID_INPUT_SIZE, FID_INPUT_SIZE),
                    mode: str = "pytorch_fid",
                    precision: _Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
  """Bilinear resize of NHWC images by two interpolation matrices (see `bilinear_resize_matrix`).

  Args:
    x: [N, H, W, C] float array.
    size: (out_h, out_w).
    mode: `'pytorch_fid'` (torch align_corners=False) or `'tf_legacy'`.
    precision: matmul precision of the two contractions.

  Returns:
    [N, out_h, out_w, C] array of x's dtype.
  """
  _, h, w, _ = x.shape
  out_h, out_w = size
  rh = jnp.asarray(bilinear_resize_matrix(h, out_h, mode), dtype=x.dtype)
  rw = jnp.asarray(bilinear_resize_matrix(w, out_w, mode), dtype=x.dtype)
  x = jnp.einsum("oh,nhwc->nowc", rh, x, precision=precision)
  return jnp.einsum("pw,nowc->nopc", rw, x, precision=precision)


def max_pool(x: jax.Array, window: int = 3, stride: int = 2, padding: int = 0) -> jax.Array:
  """Max pool over H and W (NHWC); padded cells are -inf, as torch `max_pool2d`."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1),
                               (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x: jax.Array, window: int = 3, stride: int = 1,
                         padding: int = 1) -> jax.Array:
  """Average pool (NHWC) that divides by the number of in-image cells (`count_include_pad=False`)."""
  pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
  dims, strides = (1, window, window, 1), (1, stride, stride, 1)
  total = jax.lax.reduce_window(x, jnp.zeros((), x.dtype), jax.lax.add, dims, strides, pad)
  ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
  count = jax.lax.reduce_window(ones, jnp.zeros((), x.dtype), jax.lax.add, dims, strides, pad)
  return total / count


class BasicConv2d(nn.Module):
  """conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Sequence[int] = (0, 0)
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = [(p, p) for p in self.padding]
    x = nn.Conv(self.features, tuple(self.kernel_size), strides=tuple(self.strides), padding=pad,
                use_bias=False, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=BN_EPS, name="bn")(x)
    return nn.relu(x)


class FIDInceptionA(nn.Module):
  """Mixed_5b/5c/5d: 1x1, 5x5, double 3x3 and (TF-style average) pool branches."""
  pool_features: int
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(64, (1, 1), name="branch1x1")(x)
    b5 = conv(48, (1, 1), name="branch5x5_1")(x)
    b5 = conv(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, (1, 1), name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: grid reduction 35 -> 17."""
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = conv(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = conv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    bp = max_pool(x, 3, 2)
    return jnp.concatenate([b3, bd, bp], axis=-1)


class FIDInceptionC(nn.Module):
  """Mixed_6b..6e: factorized 7x7 branches and a (TF-style average) pool branch."""
  channels_7x7: int
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    c7 = self.channels_7x7
    b1 = conv(192, (1, 1), name="branch1x1")(x)
    b7 = conv(c7, (1, 1), name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, (1, 1), name="branch_pool")(avg_pool_exclude_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Mixed_7a: grid reduction 17 -> 8."""
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b3 = conv(192, (1, 1), name="branch3x3_1")(x)
    b3 = conv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = conv(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    bp = max_pool(x, 3, 2)
    return jnp.concatenate([b3, b7, bp], axis=-1)


class FIDInceptionE(nn.Module):
  """Mixed_7b (`pool='avg'`, FIDInceptionE_1) and Mixed_7c (`pool='max'`, FIDInceptionE_2)."""
  pool: str = "avg"
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    b1 = conv(320, (1, 1), name="branch1x1")(x)
    b3 = conv(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3),
    ], axis=-1)
    bd = conv(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = conv(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
        conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd),
    ], axis=-1)
    if self.pool == "avg":
      pooled = avg_pool_exclude_pad(x)
    elif self.pool == "max":
      pooled = max_pool(x, 3, 1, 1)
    else:
      raise ValueError(f"pool must be 'avg' or 'max', got {self.pool!r}")
    bp = conv(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FCLayer(nn.Module):
  """The 2048 -> 1008 fc layer; returns (x @ W + b, x @ W)."""
  features: int = NUM_CLASSES
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    unbiased = jnp.matmul(x, kernel, precision=self.precision)
    return unbiased + bias, unbiased


class InceptionV3(nn.Module):
  """pytorch-fid FID InceptionV3 (NHWC).

  Attributes:
    resize_input: resize to 299x299 first (pytorch-fid `resize_input`).
    normalize_input: map [0, 1] to [-1, 1] by `2x - 1` (pytorch-fid `normalize_input`).
    resize_mode: `'pytorch_fid'` (default; torch bilinear, align_corners=False) or
      `'tf_legacy'` (TF1 ResizeBilinear grid; not golden-tested).
    precision: precision of convs, fc and resize matmuls.
  """
  resize_input: bool = True
  normalize_input: bool = True
  resize_mode: str = "pytorch_fid"
  precision: _Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array, return_blocks: bool = False) -> dict:
    """Runs the network.

    Args:
      x: [N, H, W, 3] float images, in [0, 1] when `normalize_input`.
      return_blocks: also return the block 0-2 spatial means and the resized input mean.

    Returns:
      dict with `pool3` [N, 2048], `logits` [N, 1008], `logits_unbiased` [N, 1008] and, with
      `return_blocks`, `block0_mean`, `block1_mean`, `block2_mean`, `resized_input_mean`.
    """
    if x.ndim != 4 or x.shape[-1] != 3:
      raise ValueError(f"expected NHWC images with 3 channels, got shape {x.shape}")
    x = jnp.asarray(x, jnp.float32)
    out = {}
    if self.resize_input:
      x = resize_bilinear(x, (FID_INPUT_SIZE, FID_INPUT_SIZE), self.resize_mode, self.precision)
    if return_blocks:
      out["resized_input_mean"] = jnp.mean(x, axis=(1, 2))
    if self.normalize_input:
      x = 2.0 * x - 1.0

    conv = lambda *a, **k: BasicConv2d(*a, precision=self.precision, **k)
    # Block 0: up to maxpool1.
    x = conv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = max_pool(x, 3, 2)
    if return_blocks:
      out["block0_mean"] = jnp.mean(x, axis=(1, 2))
    # Block 1: up to maxpool2.
    x = conv(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = max_pool(x, 3, 2)
    if return_blocks:
      out["block1_mean"] = jnp.mean(x, axis=(1, 2))
    # Block 2: up to the (absent) aux classifier.
    p = self.precision
    x = FIDInceptionA(32, precision=p, name="Mixed_5b")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5c")(x)
    x = FIDInceptionA(64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    x = FIDInceptionC(128, precision=p, name="Mixed_6b")(x)
    x = FIDInceptionC(160, precision=p, name="Mixed_6c")(x)
    x = FIDInceptionC(160, precision=p, name="Mixed_6d")(x)
    x = FIDInceptionC(192, precision=p, name="Mixed_6e")(x)
    if return_blocks:
      out["block2_mean"] = jnp.mean(x, axis=(1, 2))
    # Block 3: up to the final average pool.
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = FIDInceptionE("avg", precision=p, name="Mixed_7b")(x)
    x = FIDInceptionE("max", precision=p, name="Mixed_7c")(x)
    pool3 = jnp.mean(x, axis=(1, 2))
    out["pool3"] = pool3
    out["logits"], out["logits_unbiased"] = FCLayer(NUM_CLASSES, precision=p, name="fc")(pool3)
    return out


def uint8_to_unit(images: jax.Array) -> jax.Array:
  """uint8 [0, 255] -> float32 [0, 1] by `/255`, as pytorch-fid's `ToTensor()` does for images."""
  images = jnp.asarray(images)
  if images.dtype != jnp.uint8:
    raise ValueError(f"expected uint8 images, got {images.dtype}")
  return images.astype(jnp.float32) / 255.0


def apply_uint8(variables: Any, images: jax.Array, model: Optional[InceptionV3] = None,
                return_blocks: bool = False) -> dict:
  """Runs `model` (default `InceptionV3()`) on uint8 NHWC images in [0, 255], as samplers produce.

  The images are divided by 255 and then go through the model's own resize and `2x - 1`, so the
  result equals pytorch-fid on the same pixels (pytorch-fid reads PNGs with `ToTensor()`).
  Jit this function (or the caller) for speed; `model` must then be static.

  Args:
    variables: `{'params': ..., 'batch_stats': ...}` (see `ddo_jax.convert.inception_names`).
    images: [N, H, W, 3] uint8.
    model: the module; default `InceptionV3()`.
    return_blocks: forwarded to the module.

  Returns:
    The module's output dict.
  """
  model = InceptionV3() if model is None else model
  return model.apply(variables, uint8_to_unit(images), return_blocks=return_blocks)


def make_feature_fn(variables: Any, model: Optional[InceptionV3] = None, uint8_input: bool = True):
  """A jitted `images -> {'pool3', 'logits', 'logits_unbiased'}` function bound to `variables`.

  The variables are passed to the jitted function as an argument (not closed over), so they are
  not baked into the compiled program as constants.

  Args:
    variables: Flax variables of `InceptionV3`.
    model: the module; default `InceptionV3()`.
    uint8_input: the function takes uint8 [0, 255] images (else float [0, 1]).

  Returns:
    A function of NHWC images.
  """
  model = InceptionV3() if model is None else model

  @jax.jit
  def fn(variables, images):
    x = uint8_to_unit(images) if uint8_input else images
    return model.apply(variables, x)

  return functools.partial(fn, variables)
