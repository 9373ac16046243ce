"""VAR transformer (Tian et al. 2024, FoundationVision/VAR models/var.py, basic_var.py) as a flax.linen module.

docs/ARCHITECTURES.md §4.1, §4.2, §4.4, §7.3. Next-scale prediction over the token maps of a multi-scale VQVAE:
the L = sum(pn^2) tokens of all scales form one sequence; token t belongs to scale lvl(t) and may attend to every
token of its own and earlier scales (block-causal). Per token the input is

    scale 0 (sos):  class_emb(label) + pos_start          + lvl_embed(lvl) + pos_1LC
    later scales:   word_embed(token-map features [Cvae]) + lvl_embed(lvl) + pos_1LC

The conditioning vector of every AdaLN is class_emb(label) (row `num_classes` is the null class used for label
dropout and the unconditional half of classifier-free guidance). Only `shared_aln=False` (the released models) is
implemented.

Block (AdaLNSelfAttn): `g1, g2, s1, s2, b1, b2 = ada_lin(silu(cond))` (this order), LayerNorm without affine
(eps `norm_eps`, biased variance),

    x = x + attn(ln(x) * (1 + s1) + b1) * g1
    x = x + ffn(ln(x) * (1 + s2) + b2) * g2          ffn = fc2(gelu_tanh(fc1(.)))

Attention: qkv = x @ mat_qkv + [q_bias | 0 | v_bias] (rows blocked q | k | v, head-major within each; the k bias is
upstream's zero buffer `zero_k_bias`, structural here: it has no leaf). With `attn_l2_norm` (the released
models), q and k are l2-normalized over the head dimension (x / max(|x|, 1e-12), as F.normalize), q is multiplied
by exp(min(scale_mul_1H11, ln 100)) per head (ln 100 as the float32 upstream computes) and the logit scale is 1;
otherwise the scale is 0.25 / sqrt(head_dim). Head: ln(h) * (1 + scale) + shift with scale, shift from its own
ada_lin, then a dense layer to the vocabulary. The head and everything after it run in float32.

Two ways to run it:
  * teacher forcing, `VAR.apply(v, labels, x_BLCv)` -> logits [B, L, V]: the whole sequence with the block-causal
    mask (upstream `forward`, with `cond_drop_rate` applied by the caller: pass label `num_classes` for dropped
    rows);
  * incremental, `VAR.apply(v, labels, x_BlCv, cache, si, method=VAR.decode_scale)` -> (logits [B, pn_si^2, V],
    cache): one scale, attending to the keys and values of all earlier scales in a preallocated cache of static
    shape [depth, B, H, L, head_dim] (`empty_cache`), masked by position, so every scale has the same cache shape.
    Both paths give the same logits (tests/test_var_net.py).

Parameter names follow the torch modules (mechanical map in `ddo_jax.convert.var_names`): `pos_start`,
`pos_1LC`, `word_embed`, `class_emb/embedding`, `lvl_embed/embedding`, `blocks_<i>/{attn/{scale_mul_1H11,
q_bias, v_bias, mat_qkv, proj}, ffn/{fc1, fc2}, ada_lin}`, `head_nm/ada_lin`, `head`. Dense kernels are [in, out].
Upstream's buffers `lvl_1L` and `attn_bias_for_masking` are functions of `patch_nums` here (`level_of_tokens`,
`block_causal_mask`), not variables.

Precision: float32 parameters; matmuls at `precision` ('highest' by default, the parity setting). `dtype` sets
the compute dtype of the embeddings' sum and the blocks (e.g. jnp.bfloat16); the head, logits and log-softmax stay
float32.
"""
from typing import Any, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = Any

# upstream: torch.log(torch.tensor(100)).item(), a float32 log.
MAX_SCALE_MUL = float(np.log(np.float32(100.0)).astype(np.float32))
L2_NORM_EPS = 1e-12  # F.normalize

# The released configuration (models/__init__.py build_vae_var), apart from depth.
RELEASED = dict(vocab_size=4096, cvae=32, num_classes=1000, patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
                mlp_ratio=4.0, norm_eps=1e-6, attn_l2_norm=True, shared_aln=False)


def _precision(p):
  return jax.lax.Precision(p) if isinstance(p, str) else p


def begin_ends(patch_nums: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
  """[(begin, end)] of each scale's tokens in the length-L sequence."""
  out, cur = [], 0
  for pn in patch_nums:
    out.append((cur, cur + pn * pn))
    cur += pn * pn
  return tuple(out)


def seq_len(patch_nums: Sequence[int]) -> int:
  return int(sum(pn * pn for pn in patch_nums))


def level_of_tokens(patch_nums: Sequence[int]) -> np.ndarray:
  """int64 [L]: the scale index of every token (upstream buffer lvl_1L[0])."""
  return np.concatenate([np.full(pn * pn, i, np.int64) for i, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """bool [L, L]: query i may attend to key j iff lvl(i) >= lvl(j) (upstream's 0 / -inf attn_bias_for_masking)."""
  lvl = level_of_tokens(patch_nums)
  return lvl[:, None] >= lvl[None, :]


def build_var(config) -> "VAR":
  """A VAR from a config mapping whose keys are VAR's fields (`config_of` gives one back)."""
  kw = dict(config)
  if "patch_nums" in kw:
    kw["patch_nums"] = tuple(int(p) for p in kw["patch_nums"])
  return VAR(**kw)


def config_of(var: "VAR") -> dict:
  """The JSON-serializable architecture fields of `var` (no precision / dtype)."""
  return dict(vocab_size=var.vocab_size, cvae=var.cvae, depth=var.depth, embed_dim=var.embed_dim,
              num_heads=var.num_heads, num_classes=var.num_classes, patch_nums=list(var.patch_nums),
              mlp_ratio=var.mlp_ratio, norm_eps=var.norm_eps, attn_l2_norm=var.attn_l2_norm,
              shared_aln=var.shared_aln)


def layer_norm(x: Array, eps: float) -> Array:
  """LayerNorm without affine parameters, biased variance (torch nn.LayerNorm(elementwise_affine=False))."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  return xc * jax.lax.rsqrt(var + jnp.asarray(eps, x.dtype))


def l2_normalize(x: Array) -> Array:
  """F.normalize over the last axis: x / max(|x|_2, 1e-12)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, jnp.asarray(L2_NORM_EPS, x.dtype))


def token_logp(logits: Array, tokens: Array) -> Array:
  """log_softmax(logits)[..., token] in float32: [B, L, V], [B, L] -> [B, L]."""
  logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None].astype(jnp.int32), axis=-1)[..., 0]


def seq_logp(logits: Array, tokens: Array) -> Array:
  """The exact log-likelihood of each sequence: the sum of `token_logp` over all L tokens (no normalization)."""
  return jnp.sum(token_logp(logits, tokens), axis=-1)


def empty_cache(var: "VAR", batch: int, dtype: Any = jnp.float32) -> dict:
  """The preallocated key / value cache of `decode_scale`: {'k', 'v'} zeros [depth, batch, H, L, head_dim]."""
  shape = (var.depth, batch, var.num_heads, seq_len(var.patch_nums), var.embed_dim // var.num_heads)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


class Dense(nn.Module):
  """y = x @ kernel + bias with kernel [in, out] (torch Linear weight transposed)."""
  features: int
  use_bias: bool = True
  precision: Any = "highest"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.features), jnp.float32)
    y = jnp.matmul(x.astype(self.dtype), kernel.astype(self.dtype), precision=_precision(self.precision))
    if self.use_bias:
      bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
      y = y + bias.astype(self.dtype)
    return y


class SelfAttention(nn.Module):
  embed_dim: int
  num_heads: int
  attn_l2_norm: bool = True
  precision: Any = "highest"
  dtype: Any = jnp.float32

  def setup(self):
    c, h = self.embed_dim, self.num_heads
    if self.attn_l2_norm:
      self.scale_mul_1H11 = self.param("scale_mul_1H11", nn.initializers.constant(float(np.log(4.0))),
                                       (1, h, 1, 1), jnp.float32)
    self.q_bias = self.param("q_bias", nn.initializers.zeros, (c,), jnp.float32)
    self.v_bias = self.param("v_bias", nn.initializers.zeros, (c,), jnp.float32)
    self.mat_qkv = Dense(3 * c, use_bias=False, precision=self.precision, dtype=self.dtype)
    self.proj = Dense(c, precision=self.precision, dtype=self.dtype)

  def _qkv(self, x):
    b, l, c = x.shape
    h = self.num_heads
    bias = jnp.concatenate([self.q_bias, jnp.zeros_like(self.q_bias), self.v_bias]).astype(self.dtype)
    qkv = (self.mat_qkv(x) + bias).reshape(b, l, 3, h, c // h).transpose(2, 0, 3, 1, 4)  # 3 B H l hd
    q, k, v = qkv[0], qkv[1], qkv[2]
    if self.attn_l2_norm:
      scale_mul = jnp.exp(jnp.minimum(self.scale_mul_1H11, MAX_SCALE_MUL)).astype(self.dtype)  # 1 H 1 1
      q = l2_normalize(q) * scale_mul
      k = l2_normalize(k)
    return q, k, v

  def _attend(self, q, k, v, allowed):
    """softmax(q k^T * scale, masked to `allowed` [lq, lk]) v -> [B, lq, C]."""
    scale = 1.0 if self.attn_l2_norm else 0.25 / np.sqrt(self.embed_dim // self.num_heads)
    prec = _precision(self.precision)
    s = jnp.einsum("bhqd,bhkd->bhqk", q, k, precision=prec)
    if scale != 1.0:
      s = s * jnp.asarray(scale, s.dtype)
    s = s.astype(jnp.float32)
    if allowed is not None:
      s = jnp.where(allowed, s, -jnp.inf)
    w = jax.nn.softmax(s, axis=-1).astype(self.dtype)
    o = jnp.einsum("bhqk,bhkd->bhqd", w, v, precision=prec)
    b, h, lq, d = o.shape
    return o.transpose(0, 2, 1, 3).reshape(b, lq, h * d)

  def __call__(self, x, allowed):
    q, k, v = self._qkv(x)
    return self.proj(self._attend(q, k, v, allowed))

  def cached(self, x, cache_k, cache_v, layer: int, begin: int):
    """Writes this scale's k, v at [layer, :, :, begin:begin + l] of the whole [depth, B, H, L, hd] caches (an
    in-place dynamic_update_slice under jit) and attends to positions < begin + l of this layer: all earlier
    scales and this one."""
    q, k, v = self._qkv(x)
    l = x.shape[1]
    cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), (layer, 0, 0, begin, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), (layer, 0, 0, begin, 0))
    allowed = (jnp.arange(cache_k.shape[3]) < begin + l)[None, :]
    o = self._attend(q, cache_k[layer].astype(self.dtype), cache_v[layer].astype(self.dtype), allowed)
    return self.proj(o), cache_k, cache_v


class FFN(nn.Module):
  embed_dim: int
  hidden: int
  precision: Any = "highest"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = Dense(self.hidden, precision=self.precision, dtype=self.dtype, name="fc1")(x)
    x = jax.nn.gelu(x, approximate=True)
    return Dense(self.embed_dim, precision=self.precision, dtype=self.dtype, name="fc2")(x)


class AdaLNSelfAttn(nn.Module):
  embed_dim: int
  num_heads: int
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  attn_l2_norm: bool = True
  precision: Any = "highest"
  dtype: Any = jnp.float32

  def setup(self):
    c = self.embed_dim
    self.attn = SelfAttention(c, self.num_heads, self.attn_l2_norm, self.precision, self.dtype)
    self.ffn = FFN(c, int(round(c * self.mlp_ratio)), self.precision, self.dtype)
    self.ada_lin = Dense(6 * c, precision=self.precision, dtype=self.dtype)

  def _mods(self, cond):
    c = self.embed_dim
    ada = self.ada_lin(jax.nn.silu(cond)).reshape(-1, 1, 6, c)
    return [ada[:, :, i] for i in range(6)]  # gamma1, gamma2, scale1, scale2, shift1, shift2

  def __call__(self, x, cond, allowed):
    g1, g2, s1, s2, b1, b2 = self._mods(cond)
    x = x + self.attn(layer_norm(x, self.norm_eps) * (s1 + 1) + b1, allowed) * g1
    return x + self.ffn(layer_norm(x, self.norm_eps) * (s2 + 1) + b2) * g2

  def cached(self, x, cond, cache_k, cache_v, layer: int, begin: int):
    g1, g2, s1, s2, b1, b2 = self._mods(cond)
    a, cache_k, cache_v = self.attn.cached(layer_norm(x, self.norm_eps) * (s1 + 1) + b1, cache_k, cache_v, layer,
                                           begin)
    x = x + a * g1
    return x + self.ffn(layer_norm(x, self.norm_eps) * (s2 + 1) + b2) * g2, cache_k, cache_v


class AdaLNBeforeHead(nn.Module):
  """ln(h) * (1 + scale) + shift, (scale, shift) = ada_lin(silu(cond)); always float32."""
  embed_dim: int
  norm_eps: float = 1e-6
  precision: Any = "highest"

  @nn.compact
  def __call__(self, h, cond):
    c = self.embed_dim
    ada = Dense(2 * c, precision=self.precision, name="ada_lin")(jax.nn.silu(cond)).reshape(-1, 1, 2, c)
    return layer_norm(h, self.norm_eps) * (ada[:, :, 0] + 1) + ada[:, :, 1]


class VAR(nn.Module):
  """The VAR transformer; see the module docstring. Fields are upstream's constructor arguments (`cvae`,
  `vocab_size` come from the VQVAE), plus `precision` and the compute `dtype`."""
  vocab_size: int = 4096
  cvae: int = 32
  depth: int = 16
  embed_dim: int = 1024
  num_heads: int = 16
  num_classes: int = 1000
  patch_nums: Tuple[int, ...] = RELEASED["patch_nums"]
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-6
  attn_l2_norm: bool = True
  shared_aln: bool = False
  precision: Any = "highest"
  dtype: Any = jnp.float32

  def setup(self):
    if self.shared_aln:
      raise NotImplementedError("VAR with shared_aln=True is not implemented (the released models use False)")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")
    c = self.embed_dim
    init = nn.initializers.truncated_normal(float(np.sqrt(1 / c / 3)))
    first_l = self.patch_nums[0] ** 2
    self.pos_start = self.param("pos_start", init, (1, first_l, c), jnp.float32)
    self.pos_1LC = self.param("pos_1LC", init, (1, seq_len(self.patch_nums), c), jnp.float32)
    self.word_embed = Dense(c, precision=self.precision)
    self.class_emb = nn.Embed(self.num_classes + 1, c, embedding_init=init)
    self.lvl_embed = nn.Embed(len(self.patch_nums), c, embedding_init=init)
    # a list attribute: Flax names them blocks_0, blocks_1, ...
    self.blocks = [AdaLNSelfAttn(c, self.num_heads, self.mlp_ratio, self.norm_eps, self.attn_l2_norm,
                                 self.precision, self.dtype) for _ in range(self.depth)]
    self.head_nm = AdaLNBeforeHead(c, self.norm_eps, self.precision)
    self.head = Dense(self.vocab_size, precision=self.precision)

  # -- pieces shared by both paths -------------------------------------------------------------------------------

  def _cond(self, labels):
    return jnp.take(self.class_emb.embedding, jnp.asarray(labels).astype(jnp.int32), axis=0)

  def _lvl_pos(self):
    lvl = jnp.asarray(level_of_tokens(self.patch_nums), jnp.int32)
    return jnp.take(self.lvl_embed.embedding, lvl, axis=0)[None] + self.pos_1LC  # 1 L C

  def _logits(self, h, cond):
    return self.head(self.head_nm(h.astype(jnp.float32), cond.astype(jnp.float32))).astype(jnp.float32)

  # -- teacher forcing ---------------------------------------------------------------------------------------------

  def __call__(self, labels, x_BLCv):
    """Logits [B, L, V] (float32) for labels [B] (int; `num_classes` = null) and the teacher-forcing input
    x_BLCv [B, L - pn_0^2, cvae] (the VQVAE's idxBl_to_var_input)."""
    cond = self._cond(labels)
    b = cond.shape[0]
    first_l = self.patch_nums[0] ** 2
    sos = jnp.broadcast_to(cond[:, None] + self.pos_start, (b, first_l, self.embed_dim))
    x = jnp.concatenate([sos, self.word_embed(jnp.asarray(x_BLCv, jnp.float32))], axis=1)
    x = (x + self._lvl_pos()).astype(self.dtype)
    allowed = jnp.asarray(block_causal_mask(self.patch_nums))
    cond_c = cond.astype(self.dtype)
    for blk in self.blocks:
      x = blk(x, cond_c, allowed)
    return self._logits(x, cond)

  # -- incremental decoding ----------------------------------------------------------------------------------------

  def decode_scale(self, labels, x_BlCv, cache, si: int):
    """One scale of the KV-cached path: logits [B, pn_si^2, V] and the updated cache.

    labels [B]; x_BlCv [B, pn_si^2, cvae]: the scale's input features (the VQVAE's next autoregressive input of
    scale si - 1), ignored for si = 0 (the sos tokens); cache from `empty_cache` (or the previous call), its
    positions >= begin(si) are overwritten and never read before. `si` is a Python int.
    """
    bg, ed = begin_ends(self.patch_nums)[si]
    cond = self._cond(labels)
    lvl_pos = self._lvl_pos()[:, bg:ed]
    if si == 0:
      x = cond[:, None] + self.pos_start + lvl_pos
    else:
      x = self.word_embed(jnp.asarray(x_BlCv, jnp.float32)) + lvl_pos
    x = x.astype(self.dtype)
    cond_c = cond.astype(self.dtype)
    cache_k, cache_v = cache["k"], cache["v"]
    for i, blk in enumerate(self.blocks):
      x, cache_k, cache_v = blk.cached(x, cond_c, cache_k, cache_v, i, bg)
    return self._logits(x, cond), {"k": cache_k, "v": cache_v}


def num_parameters(var: VAR) -> int:
  """Trainable parameters of `var` (what upstream counts: every torch Parameter; no buffers)."""
  shapes = jax.eval_shape(lambda: var.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32),
                                           jnp.zeros((1, seq_len(var.patch_nums) - var.patch_nums[0] ** 2,
                                                      var.cvae))))
  return int(sum(np.prod(s.shape) for s in jax.tree_util.tree_leaves(shapes)))


def abstract_params(var: VAR):
  """jax.eval_shape of var.init: the variables {'params': ...} as ShapeDtypeStructs."""
  return jax.eval_shape(lambda: var.init(jax.random.PRNGKey(0), jnp.zeros((1,), jnp.int32),
                                         jnp.zeros((1, seq_len(var.patch_nums) - var.patch_nums[0] ** 2,
                                                    var.cvae))))
