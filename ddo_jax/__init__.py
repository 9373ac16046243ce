"""ddo-jax: Direct Discriminative Optimization (Zheng et al., ICML 2025) in JAX/Flax.

The functional API:
  ddo_jax.ddo_loss(gap_real, gap_fake, alpha=..., beta=...)   the model-agnostic objective
  ddo_jax.var_weights(alpha, uncond_mask)                     row weights of the VAR variant
  ddo_jax.families.diffusion.edm_log_ratio(...)               diffusion gaps (EDM-style surrogate)
  ddo_jax.sampling.heun.heun_sample(...)                      EDM's Heun sampler, jitted scan
"""
from ddo_jax.objective import ddo_loss, var_weights

__version__ = "0.1.0"
__all__ = ["ddo_loss", "var_weights", "__version__"]
