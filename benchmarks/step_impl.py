"""Speed of the two train-step implementations, `config.step_impl` = 'jit' and 'shard_map', side by side.

  python benchmarks/step_impl.py --model edm_tiny --batch 32 --steps 5
  python benchmarks/step_impl.py --model toy --batch 512 --steps 50 --fsdp 2
  python -m launch.local_multiprocess -n 2 -d 2 -- python benchmarks/step_impl.py --model edm_tiny --batch 32

For each implementation: the DDO step of `ddo_jax.train.step.make_ddo_step` on the chosen model over a
('data', 'fsdp') mesh of all devices (of all processes when launched through launch/local_multiprocess.py
or on a pod), compiled from abstract shapes (compile time reported apart), one warm-up step, then --steps
timed steps, each synchronised by fetching the loss. Both start from the same state and see the same
batches, so the script also reports how far apart their parameters end (float32 rounding expected).

Models: toy = configs/toy_diffusion.py's MLP on 2-D points; edm_tiny = configs/edm_cifar10.py:tiny's
network (16x16, 32 channels); edm_full = the CIFAR-10 network (55.7M parameters; use an accelerator).
Weights and data are random (speed does not depend on them). float32, 'highest' matmul precision.

stderr: a table; stdout (process 0): one JSON object per implementation, then the difference.
"""
import argparse
import functools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="edm_tiny", choices=["toy", "edm_tiny", "edm_full"])
  ap.add_argument("--batch", type=int, default=32, help="global real batch per step (plus as many fakes)")
  ap.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
  ap.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp (parameters sharded over this many devices)")
  ap.add_argument("--impls", default="jit,shard_map", help="comma-separated step implementations to time")
  ap.add_argument("--precision", default="highest", choices=["highest", "high", "default"])
  return ap.parse_args(argv)


def _log(*a):
  print(*a, file=sys.stderr, flush=True)


def _median(v):
  v = sorted(v)
  n = len(v)
  return v[n // 2] if n % 2 else 0.5 * (v[n // 2 - 1] + v[n // 2])


def _setup(model: str):
  from configs import edm_cifar10, toy_diffusion
  from ddo_jax import families
  if model == "toy":
    config = toy_diffusion.get_config("tiny")
  else:
    config = edm_cifar10.get_config("tiny" if model == "edm_tiny" else "cond")
    config.model.metric = "denoise_loss"
  return config, families.make(config)


def main(argv=None):
  a = _args(argv)
  from ddo_jax import parallel
  parallel.maybe_initialize_distributed()
  import jax
  import numpy as np
  jax.config.update("jax_default_matmul_precision", a.precision)
  from ddo_jax.train import optim, step as step_lib

  config, family = _setup(a.model)
  mesh = parallel.make_mesh(-1, a.fsdp)
  rules = [(".*", "fsdp" if a.fsdp > 1 else "replicate")]
  parallel.check_batch_divisible(a.batch, mesh)
  tx = optim.make_optimizer(config.optim)
  ema = {k: dict(v) for k, v in config.ema.items()}
  params_shape = jax.eval_shape(family.init_params, jax.random.key(0))
  init = functools.partial(step_lib.init_state, tx=tx, ema_specs=ema)
  shardings = parallel.param_shardings(jax.eval_shape(init, params_shape, jax.random.key(0)), mesh, rules)
  param_shardings = parallel.param_shardings(params_shape, mesh, rules)
  make_params = jax.jit(family.init_params, out_shardings=param_shardings)
  ref = make_params(jax.random.key(1))

  # Random batches shaped like the family's data (this process's rows of each global batch).
  x_shape = jax.eval_shape(family.sample, params_shape, jax.random.split(jax.random.key(0), 2),
                           np.zeros(2, np.int32))
  rng = np.random.default_rng(0)
  local = a.batch // jax.process_count()

  def batch(i):
    del i
    out = {}
    for side in ("real", "fake"):
      out[side] = {k: rng.normal(size=(local,) + v.shape[1:]).astype(v.dtype) for k, v in x_shape.items()}
      if "label" in out[side]:   # one-hot class labels
        k = x_shape["label"].shape[-1]
        out[side]["label"] = np.eye(k, dtype=np.float32)[rng.integers(0, k, local)]
    return out

  batches = [parallel.global_batch(batch(i), mesh) for i in range(a.steps + 1)]
  n = parallel.tree_size(params_shape)
  _log(f"{a.model}: {n / 1e6:.2f}M parameters; {jax.process_count()} process(es) x {jax.local_device_count()} "
       f"{jax.devices()[0].platform} devices, mesh data={mesh.shape['data']} fsdp={mesh.shape['fsdp']}, "
       f"global batch {a.batch} real + {a.batch} fake")

  results, finals = [], {}
  for impl in a.impls.split(","):
    with jax.set_mesh(mesh):
      state = jax.jit(init, out_shardings=shardings)(make_params(jax.random.key(0)), jax.random.key(2))
      fn = step_lib.make_ddo_step(family, tx, ema, alpha=config.ddo.alpha, beta=config.ddo.beta,
                                  batch_size=a.batch, mesh=mesh, shardings=shardings,
                                  ref_shardings=param_shardings, impl=impl)
      t0 = time.perf_counter()
      compiled = fn.lower(state, ref, batches[0]).compile()
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      state, m = compiled(state, ref, batches[0])
      float(m["loss"])
      warmup_s = time.perf_counter() - t0
      times = []
      for b in batches[1:]:
        t0 = time.perf_counter()
        state, m = compiled(state, ref, b)
        float(m["loss"])
        times.append(time.perf_counter() - t0)
    finals[impl] = parallel.to_host(state["params"])
    r = dict(impl=impl, model=a.model, params_m=round(n / 1e6, 3), processes=jax.process_count(),
             devices=jax.device_count(), fsdp=a.fsdp, batch=a.batch, compile_s=round(compile_s, 3),
             warmup_s=round(warmup_s, 3), step_median_s=round(_median(times), 5), step_min_s=round(min(times), 5),
             real_images_per_s=round(a.batch / _median(times), 1), loss=float(m["loss"]))
    results.append(r)
    _log(f"  {impl:10s} compile {compile_s:7.2f} s   step median {r['step_median_s'] * 1e3:9.2f} ms   "
         f"min {r['step_min_s'] * 1e3:9.2f} ms   {r['real_images_per_s']:9.1f} real images/s")
  diff = None
  if len(finals) == 2:
    x, y = (jax.tree_util.tree_leaves(t) for t in finals.values())
    diff = max(float(np.max(np.abs(np.asarray(u, np.float64) - v)) / max(float(np.max(np.abs(u))), 1e-30))
               for u, v in zip(x, y))
    _log(f"  parameters after {a.steps + 1} steps: max relative difference between the two {diff:.2g}")
  if jax.process_index() == 0:
    for r in results:
      print(json.dumps(r))
    print(json.dumps({"max_rel_param_diff": diff}))
  parallel.barrier("benchmark-done")
  return 0


if __name__ == "__main__":
  sys.exit(main())
