"""Speed and memory of the full-size CIFAR-10 EDM network (DDPM++, 55.7M parameters) under DDO.

  python benchmarks/edm_cifar10.py --batch 64 --steps 5 --sample_batch 64
  python benchmarks/edm_cifar10.py --batch 512 --steps 20 --sample_batch 512     # on an accelerator

Prints: DDO train step throughput (real images/s; each step also processes as many reference samples,
and runs target and reference on both), compile time, memory (XLA's buffer analysis of the compiled step
and the device's peak, where the backend reports it; host RSS), and the Heun sampler's images/s at 35 NFE.
Weights are random (speed does not depend on their values); nothing is read from disk.
"""
import functools
import pathlib
import resource
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout

from absl import app, flags

_BATCH = flags.DEFINE_integer("batch", 64, "real images per DDO step (plus as many fakes)")
_STEPS = flags.DEFINE_integer("steps", 5, "timed DDO steps (after one warm-up step)")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", 64, "images per sampler call")
_SAMPLE_STEPS = flags.DEFINE_integer("sample_steps", 18, "Heun steps (18 = 35 NFE)")
_VARIANT = flags.DEFINE_enum("variant", "cond", ["cond", "uncond"], "configs/edm_cifar10.py variant")
_SKIP_SAMPLER = flags.DEFINE_bool("skip_sampler", False, "only benchmark the train step")


def _mib(n) -> str:
  return f"{n / 2 ** 20:.0f} MiB"


def _memory(compiled) -> str:
  try:
    m = compiled.memory_analysis()
    return (f"arguments {_mib(m.argument_size_in_bytes)}, outputs {_mib(m.output_size_in_bytes)}, "
            f"temporaries {_mib(m.temp_size_in_bytes)}, aliased {_mib(m.alias_size_in_bytes)}")
  except Exception as e:  # some backends do not implement it
    return f"n/a ({type(e).__name__})"


def _device_peak(jax) -> str:
  stats = jax.devices()[0].memory_stats() or {}
  peak = stats.get("peak_bytes_in_use")
  return _mib(peak) if peak is not None else "not reported by this backend"


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from configs import edm_cifar10
  from ddo_jax import families, parallel
  from ddo_jax.sampling import seeded
  from ddo_jax.train import optim, step as step_lib

  jax.config.update("jax_default_matmul_precision", "highest")
  config = edm_cifar10.get_config(_VARIANT.value)
  config.model.metric = "denoise_loss"     # no FID files needed here
  family = families.make(config)
  mesh = parallel.make_mesh()
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} ({jax.default_backend()})")

  shapes = jax.eval_shape(family.init_params, jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), shapes)
  n_params = parallel.tree_size(params)
  print(f"network: EDMPrecond + SongUNet DDPM++ {_VARIANT.value}, {n_params / 1e6:.1f}M parameters, float32")

  param_sh = parallel.param_shardings(shapes, mesh)
  tx = optim.make_optimizer(config.optim)
  init = functools.partial(step_lib.init_state, tx=tx, ema_specs=dict(config.ema))
  state_sh = parallel.param_shardings(jax.eval_shape(init, shapes, jax.random.key(0)), mesh)
  params = jax.device_put(params, param_sh)
  ref = jax.tree_util.tree_map(jnp.copy, params)
  state = jax.jit(init, out_shardings=state_sh)(params, jax.random.key(1))
  step = step_lib.make_ddo_step(family, tx, dict(config.ema), alpha=config.ddo.alpha, beta=config.ddo.beta,
                                batch_size=_BATCH.value, mesh=mesh, shardings=state_sh, ref_shardings=param_sh)
  b = _BATCH.value
  parallel.check_batch_divisible(b, mesh)
  label = lambda: np.eye(10, dtype=np.float32)[rng.integers(0, 10, b)]
  part = lambda: {"x": rng.uniform(-1, 1, (b, 32, 32, 3)).astype(np.float32), **(
      {"label": label()} if family.label_dim else {})}
  batch = parallel.global_batch({"real": part(), "fake": part()}, mesh)

  t0 = time.time()
  compiled = step.lower(state, ref, batch).compile()
  compile_s = time.time() - t0
  state, m = compiled(state, ref, batch)
  jax.block_until_ready(m)
  t0 = time.time()
  for _ in range(_STEPS.value):
    state, m = compiled(state, ref, batch)
  jax.block_until_ready(m)
  dt = (time.time() - t0) / _STEPS.value
  print(f"DDO step, batch {b} real + {b} fake: compile {compile_s:.1f} s, {dt * 1000:.0f} ms/step, "
        f"{b / dt:.1f} real images/s ({2 * b / dt:.1f} images/s counting fakes)")
  print(f"DDO step memory (XLA buffer analysis): {_memory(compiled)}")
  print(f"device peak memory: {_device_peak(jax)}")

  if not _SKIP_SAMPLER.value:
    sb = _SAMPLE_BATCH.value
    parallel.check_batch_divisible(sb, mesh, "--sample_batch")
    config.model.sampler.num_steps = _SAMPLE_STEPS.value
    fn = seeded.make_seeded_sampler(family.sample, mesh, param_sh)
    ids = jax.device_put(np.arange(sb, dtype=np.int32), parallel.batch_sharding(mesh))
    base = jax.random.key(0)
    t0 = time.time()
    sampler = fn.lower(params, base, ids).compile()
    sample_compile = time.time() - t0
    jax.block_until_ready(sampler(params, base, ids))
    t0 = time.time()
    jax.block_until_ready(sampler(params, base, ids))
    ds = time.time() - t0
    nfe = 2 * _SAMPLE_STEPS.value - 1
    print(f"Heun sampler, {nfe} NFE, batch {sb}: compile {sample_compile:.1f} s, {ds:.2f} s/batch, "
          f"{sb / ds:.2f} images/s")
    print(f"sampler memory (XLA buffer analysis): {_memory(sampler)}")
  print(f"host peak RSS: {_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)}")


if __name__ == "__main__":
  app.run(main)
