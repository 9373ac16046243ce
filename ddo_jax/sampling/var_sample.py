"""VAR's `autoregressive_infer_cfg` (FoundationVision/VAR models/var.py, helpers.py) as one jitted program.

docs/ARCHITECTURES.md §7.3. For labels [B] the sampler runs 2B rows, the B conditional ones and B rows of the null
class (`num_classes`), through the VAR's KV-cached `decode_scale` scale by scale; the cache is preallocated over
all L tokens ([depth, 2B, H, L, head_dim], masked by position), so all S scales live in ONE compiled program (the
Python loop over scales unrolls inside the jit; `compile_count()` reports the compilations). Guidance weight,
top_k, top_p and more_smooth are traced values, so changing them does not recompile either. At scale si:

    logits = (1 + t) * logits_cond - t * logits_uncond,    t = w * si / (S - 1)
    idx    ~ softmax(top-k / top-p masked logits)          (jax.random.categorical; key folded with si)
    h      = codebook[idx]                                  or, with more_smooth, the Gumbel-softmax mixture
    f_hat, next input = the VQVAE's next_ar_input(si, f_hat, h)

and the image is (decoder(post_quant_conv(f_hat)) clamped to [-1, 1] + 1) / 2, NHWC in [0, 1].

Guidance conventions (`guidance=`); `cfg` is the number the user passes:
  'var'         upstream VAR: w = cfg. cfg = 0 is guidance-free; cfg = 1 is NOT (2 cond - uncond at the last
                scale). DDO's VAR_sample.py calls upstream's sampler with its literal `--cfg` (1.0, 1.4), so this is
                the convention that reproduces DDO's released numbers (ARCHITECTURES.md §7.3).
  'one_plus_w'  w = cfg - 1: cfg = 1 is guidance-free, the reading under which DDO's README calls `--cfg 1.0`
                "guidance-free" (METHOD.md §3.3 'CFG convention warning': the paper's w = 0; 'cfg 1.4' = w 0.4).
The default is 'var'. Online negatives for DDO are guidance-free: guidance='var', cfg=0 (METHOD.md §3.3).

Truncation exactly as upstream's `sample_with_top_k_top_p_`: top_k > 0 masks logits below the k-th largest (ties
kept); top_p > 0 then works on the top-k-MASKED logits: sort ascending, mask where the ascending cumulative
softmax is <= 1 - top_p, the largest never masked. top_k = top_p = 0 (DDO's FID protocol) samples the full
softmax. `more_smooth` (visualization only, upstream): h = softmax((masked logits * (1 + ratio) + Gumbel) / tau)
@ codebook, tau = max(0.27 (1 - 0.95 ratio), 0.005), ratio = si / (S - 1); the sampled index is still drawn.

Layering: sampling/ imports no nets/, so the modules are passed in: `var` (nets.var.VAR), `vae` (a VQVAE module)
and `vq`, any object with the VQVAE functions `next_ar_input(vae, params, si, f_hat, h)`,
`fhat_to_img(vae, params, f_hat)` and `codebook(vae, params)` (the module ddo_jax.nets.var_vqvae itself).
Upstream draws with one torch.Generator; these draws use JAX keys, so only greedy (top_k = 1) runs reproduce
upstream's tokens.
"""
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

GUIDANCE_VAR = "var"
GUIDANCE_ONE_PLUS_W = "one_plus_w"
GUIDANCE_CONVENTIONS = (GUIDANCE_VAR, GUIDANCE_ONE_PLUS_W)

_TRACES = {"count": 0}


def compile_count() -> int:
  """How many times the sampler program has been traced (= compiled) in this process."""
  return _TRACES["count"]


def guidance_weight(cfg: float, guidance: str = GUIDANCE_VAR) -> float:
  """The weight w of t = w * si / (S - 1) for a user's `cfg` under a named convention."""
  if guidance == GUIDANCE_VAR:
    return float(cfg)
  if guidance == GUIDANCE_ONE_PLUS_W:
    return float(cfg) - 1.0
  raise ValueError(f"unknown guidance convention {guidance!r}; use one of {list(GUIDANCE_CONVENTIONS)}")


def guidance_coefficients(w: float, num_scales: int):
  """[(1 + t, t)] per scale as float32, t = w * si / (S - 1) computed in float64 like upstream's Python floats."""
  out = []
  for si in range(num_scales):
    t = w * (si / (num_scales - 1)) if num_scales > 1 else 0.0
    out.append((np.float32(1.0 + t), np.float32(t)))
  return out


def _mask_top_k(logits, top_k):
  kth = jnp.take_along_axis(jnp.sort(logits, axis=-1),
                            jnp.broadcast_to(logits.shape[-1] - top_k, logits.shape[:-1] + (1,)), axis=-1)
  return jnp.where(logits < kth, -jnp.inf, logits)


def _mask_top_p(logits, top_p):
  order = jnp.argsort(logits, axis=-1)  # ascending
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  cum = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
  remove_sorted = cum <= (1.0 - top_p)
  remove_sorted = remove_sorted.at[..., -1].set(False)  # the largest is never masked
  remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
  return jnp.where(remove, -jnp.inf, logits)


def mask_top_k_top_p(logits: jax.Array, top_k=0, top_p=0.0) -> jax.Array:
  """Upstream's masking of sample_with_top_k_top_p_ on [..., V] logits (masked entries -inf).

  top_k and top_p may be traced (one program for every setting); each mask runs only when enabled (lax.cond),
  top_k >= V being no mask.
  """
  v = logits.shape[-1]
  top_k = jnp.asarray(top_k, jnp.int32)
  top_p = jnp.asarray(top_p, jnp.float32)
  logits = jax.lax.cond((top_k > 0) & (top_k < v), _mask_top_k, lambda x, k: x, logits, top_k)
  return jax.lax.cond(top_p > 0, _mask_top_p, lambda x, p: x, logits, top_p)


def _empty_cache(var, batch: int):
  big_l = int(sum(p * p for p in var.patch_nums))
  shape = (var.depth, batch, var.num_heads, big_l, var.embed_dim // var.num_heads)
  dtype = jnp.dtype(var.dtype) if var.dtype is not None else jnp.float32
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


@functools.partial(jax.jit, static_argnames=("var", "vae", "vq", "return_logits"))
def _infer(var_params, vae_params, labels, key, coeffs, top_k, top_p, more_smooth, *, var, vae, vq,
           return_logits: bool):
  _TRACES["count"] += 1
  pns = tuple(int(p) for p in var.patch_nums)
  if tuple(int(p) for p in vae.patch_nums) != pns:
    raise ValueError(f"VAR patch_nums {pns} differ from the VQVAE's {tuple(vae.patch_nums)}")
  n_scales = len(pns)
  labels = jnp.asarray(labels).astype(jnp.int32)
  labels = jnp.where(labels < 0, var.num_classes, labels)
  b = labels.shape[0]
  labels2 = jnp.concatenate([labels, jnp.full_like(labels, var.num_classes)])
  codebook = vq.codebook(vae, vae_params)
  cvae = codebook.shape[-1]
  cache = _empty_cache(var, 2 * b)
  f_hat = jnp.zeros((b, pns[-1], pns[-1], cvae), jnp.float32)
  x = None
  idx_list, logit_list = [], []
  for si, pn in enumerate(pns):
    ratio = si / (n_scales - 1) if n_scales > 1 else 0.0
    logits2, cache = var.apply(var_params, labels2, x, cache, si, method="decode_scale")
    logits = coeffs[si, 0] * logits2[:b] - coeffs[si, 1] * logits2[b:]
    if return_logits:
      logit_list.append(logits)
    masked = mask_top_k_top_p(logits, top_k, top_p)
    k_idx, k_gumbel = jax.random.split(jax.random.fold_in(key, si))
    idx = jax.random.categorical(k_idx, masked, axis=-1).astype(jnp.int32)  # [B, pn^2]
    idx_list.append(idx)

    def smooth(masked, k_gumbel, ratio=ratio):
      tau = max(0.27 * (1 - ratio * 0.95), 0.005)
      gumbel = jax.random.gumbel(k_gumbel, masked.shape, jnp.float32)
      soft = jax.nn.softmax((masked * np.float32(1 + ratio) + gumbel) / np.float32(tau), axis=-1)
      return jnp.matmul(soft, codebook, precision=jax.lax.Precision.HIGHEST)

    h = jax.lax.cond(more_smooth, smooth, lambda m, k, idx=idx: jnp.take(codebook, idx, axis=0), masked, k_gumbel)
    h = h.reshape(b, pn, pn, cvae)
    f_hat, nxt = vq.next_ar_input(vae, vae_params, si, f_hat, h)
    if si != n_scales - 1:
      x = nxt.reshape(b, pns[si + 1] ** 2, cvae)
      x = jnp.concatenate([x, x])
  image = (vq.fhat_to_img(vae, vae_params, f_hat) + 1.0) * 0.5
  out = {"image": image, "idx": idx_list, "f_hat": f_hat}
  if return_logits:
    out["cfg_logits"] = logit_list
  return out


def autoregressive_infer_cfg(var, var_params, vae, vae_params, vq, labels, key, *, cfg: float = 1.5,
                             guidance: str = GUIDANCE_VAR, top_k: int = 0, top_p: float = 0.0,
                             more_smooth: bool = False, return_logits: bool = False) -> Any:
  """Samples images for `labels` [B] (int; negative = the null class) with one compiled program.

  cfg, guidance, top_k, top_p and more_smooth are data, not compile-time constants: the program is compiled once
  per (modules, batch size, return_logits), whatever their values. The guidance coefficients (1 + t, t) are
  computed on the host in float64 and rounded to float32, as upstream's Python floats are.

  Returns {'image': [B, H, W, 3] float32 in [0, 1], 'idx': [idx_s [B, pn_s^2] int32 per scale], 'f_hat':
  [B, pn_last, pn_last, Cvae]} plus 'cfg_logits' (per scale [B, pn_s^2, V], after guidance, before masking)
  when return_logits.
  """
  coeffs = np.asarray(guidance_coefficients(guidance_weight(cfg, guidance), len(var.patch_nums)), np.float32)
  return _infer(var_params, vae_params, labels, key, coeffs, np.int32(top_k), np.float32(top_p),
                np.bool_(more_smooth), var=var, vae=vae, vq=vq, return_logits=bool(return_logits))


def cache_size() -> int:
  """Compiled programs held by the sampler's jit cache."""
  return _infer._cache_size()  # pylint: disable=protected-access


def g_seed_key(g_seed: Optional[int]) -> jax.Array:
  """The PRNG key of an upstream-style integer g_seed (DDO's FID protocol: g_seed = 1 + cls * 2 + i)."""
  return jax.random.key(0 if g_seed is None else int(g_seed))
