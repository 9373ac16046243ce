"""Samplers addressed by seed: sample s always uses the key fold_in(base_key, s).

The per-seed keys are made inside the jitted program, from the seeds (int32 [B], batch-sharded) and a
replicated base key, so a call costs one dispatch and one small host->device copy, and a seed's noise
does not depend on the batch it lands in or on the device count.
"""
from typing import Callable

import jax

from ddo_jax import parallel, xla_options

# launch.sample and launch.evaluate --model: seed s uses fold_in(jax.random.key(CLI_BASE_SEED), s), so both
# tools draw the same image for the same seed.
CLI_BASE_SEED = 0


def seed_keys(base_key: jax.Array, seeds: jax.Array) -> jax.Array:
  """Per-seed keys [B]: fold_in(base_key, seed)."""
  return jax.vmap(lambda s: jax.random.fold_in(base_key, s))(seeds)


def make_seeded_sampler(sample: Callable, mesh, param_shardings) -> Callable:
  """jit of (params, base_key, seeds) -> sample(params, seed_keys(base_key, seeds), seeds).

  `sample(params, keys, seeds)` is a family's pure sampler returning a dict of [B, ...] arrays; the
  output stays batch-sharded over the mesh.
  """
  batch = parallel.batch_sharding(mesh)

  def fn(params, base_key, seeds):
    return sample(params, seed_keys(base_key, seeds), seeds)

  return jax.jit(fn, in_shardings=(param_shardings, parallel.replicated(mesh), batch), out_shardings=batch,
                 compiler_options=xla_options.compiler_options(mesh))


def make_paired_sampler(sample_paired: Callable, mesh, param_shardings) -> Callable:
  """jit of (params, base_key, seeds, real) -> sample_paired(params, seed_keys(base_key, seeds), seeds, real):
  online negatives paired row by row with a real batch (`real` batch-sharded, as the step's batch['real'])."""
  batch = parallel.batch_sharding(mesh)

  def fn(params, base_key, seeds, real):
    return sample_paired(params, seed_keys(base_key, seeds), seeds, real)

  return jax.jit(fn, in_shardings=(param_shardings, parallel.replicated(mesh), batch, batch), out_shardings=batch,
                 compiler_options=xla_options.compiler_options(mesh))
