"""Speed and memory of EDM2 under DDO: the DDO step (EDM2-S at 64x64 pixels, EDM2-L at 512 in 64x64x4 latents)
and the samplers (Heun 32 steps = 63 NFE, DPM-Solver-v3 25 steps, Heun autoguided by an XS guide).

  python benchmarks/edm2_bench.py --size tiny
  python benchmarks/edm2_bench.py --size s64 --batch 2 --steps 2 --sampler_batch 1          # CPU, slow
  python benchmarks/edm2_bench.py --size l512 --compile_only                                 # shapes, buffers
  python benchmarks/edm2_bench.py --size s64 --remat --compute_dtype bfloat16                # the options

The objects are the ones the DDO driver (`ddo_jax/train/rounds.py`) builds from configs/edm2_img64.py:s or
configs/edm2_img512.py:l (--size tiny: edm2_img64.py:tiny): the family (model.compute_dtype and model.remat from
--compute_dtype / --remat), `optim.make_optimizer(config.optim)` (Adam (0.9, 0.99)), the power-function EMA of
the config (--no_ema drops it), `step.init_state`, `step.make_ddo_step` with EDM2's forced weight
normalization after each update. Timed:

(a) the DDO step on --batch real + --batch fake examples (pixels for s64, VAE moments sampled into latents
    inside the step for l512): the target's forward and backward over real and fake, the frozen reference's
    forward, the loss, Adam, the weight normalization and the EMA;
(b) each sampler of --samplers at --sampler_batch seeds: `EDM2.sample_latents` (what `launch.sample` and the
    FID metric run: float32 noise per seed, class-balanced labels) with EDM2's Heun in float32 (heun), DDO's
    training-free DPM-Solver-v3 in float64 (dpmv3), and Heun autoguided at 1.1 by a random net of EDM2-XS's
    architecture (heun_guided: 63 NFE of the main net + 63 of the guide). The SD VAE's decoding of 512
    latents is not included.

Each program is compiled from abstract shapes (lower + compile, timed on its own), run once to warm up
(excluded), then --steps times (timed, synchronised by fetching a value to the host). Weights are random
(`family.init_params`), data SYNTHETIC (uniform pixels, or moments around EDM2's latent statistics); speed does
not depend on the values. The last line on stdout is one JSON object; progress goes to stderr.
"""
import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from benchmarks import bench_common as bc  # noqa: E402

SAMPLERS = ("heun", "dpmv3", "heun_guided")
GUIDE_CHANNELS = 128     # EDM2-XS (model_channels; the rest as the main net), the img512 autoguidance net
GUIDANCE = 1.1


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=["tiny", "s64", "l512"])
  ap.add_argument("--batch", type=int, default=2, help="real examples per DDO step (plus as many fakes)")
  ap.add_argument("--steps", type=int, default=2, help="timed calls after one warm-up call")
  ap.add_argument("--sampler_batch", type=int, default=2, help="seeds per sampler call")
  ap.add_argument("--samplers", default="heun,dpmv3,heun_guided", help=f"comma-separated subset of {SAMPLERS}")
  ap.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"])
  ap.add_argument("--remat", action="store_true", help="rematerialize each Block in the backward pass")
  ap.add_argument("--no_ema", action="store_true", help="leave the power-function EMA out of the step")
  ap.add_argument("--skip_step", action="store_true")
  ap.add_argument("--skip_sampler", action="store_true")
  ap.add_argument("--compile_only", action="store_true",
                  help="compile the step and samplers from abstract shapes, report buffers, run nothing")
  ap.add_argument("--abstract_only", action="store_true", help="parameter counts and state sizes only")
  ap.add_argument("--devices", type=int, default=1, help="devices for the mesh (default 1; 0 = all)")
  ap.add_argument("--compile_cache", default="off",
                  help="persistent compilation cache folder, or 'off' (default: off, so compile times are real)")
  ap.add_argument("--precision", default="highest", choices=["highest", "high", "default"],
                  help="jax_default_matmul_precision")
  a = ap.parse_args(argv)
  bad = [s for s in a.samplers.split(",") if s and s not in SAMPLERS]
  if bad:
    ap.error(f"--samplers: unknown {bad}; choose from {SAMPLERS}")
  return a


def make_config(size: str, compute_dtype: str, remat: bool):
  from configs import edm2_img64, edm2_img512  # pylint: disable=import-outside-toplevel
  config = {"tiny": lambda: edm2_img64.get_config("tiny"), "s64": lambda: edm2_img64.get_config("s"),
            "l512": lambda: edm2_img512.get_config("l")}[size]()
  config.init = dict(kind="random", checkpoint="")
  config.model.data.update(source="synthetic", num=64)
  config.model.metric = "denoise_loss"          # nothing is evaluated here
  config.model.compute_dtype = compute_dtype
  config.model.remat = bool(remat)
  return config


def main(argv=None):
  a = _args(argv)
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel

  from ddo_jax import compile_cache  # pylint: disable=import-outside-toplevel
  cache_dir = compile_cache.enable(a.compile_cache)
  jax.config.update("jax_default_matmul_precision", a.precision)
  from ddo_jax import families, parallel  # pylint: disable=import-outside-toplevel
  from ddo_jax.families import edm2 as edm2_family  # pylint: disable=import-outside-toplevel
  from ddo_jax.nets import edm2_unet  # pylint: disable=import-outside-toplevel
  from ddo_jax.train import optim, step as step_lib  # pylint: disable=import-outside-toplevel

  config = make_config(a.size, a.compute_dtype, a.remat)
  family = families.make(config)
  devices = jax.devices() if a.devices == 0 else jax.devices()[:a.devices]
  mesh = parallel.make_mesh(devices=devices)
  dev = devices[0]
  bc.log(f"devices: {len(devices)} x {dev.device_kind} ({jax.default_backend()}), compile cache: {cache_dir}")
  shapes = jax.eval_shape(family.init_params, jax.random.key(0))
  n_params = parallel.tree_size(shapes["params"])
  guide_config = json.loads(json.dumps(family.net_config))
  if a.size != "tiny":   # the tiny run guides with its own architecture
    guide_config["unet_kwargs"]["model_channels"] = GUIDE_CHANNELS
  guide_net = edm2_unet.build_precond(guide_config, compute_dtype=a.compute_dtype)
  guide_shapes = edm2_unet.abstract_variables(guide_net)
  n_guide = parallel.tree_size(guide_shapes["params"])
  shape = family.sample_shape
  bc.log(f"EDM2 {a.size}: {n_params:,} parameters, samples {shape}, {family.space}; XS guide {n_guide:,}")
  out = dict(impl="ddo-jax", bench="edm2", jax=jax.__version__, backend=jax.default_backend(),
             device=dev.device_kind, n_devices=len(devices),
             date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), size=a.size, batch=a.batch,
             n_params=n_params, guide_params=n_guide, sample_shape=list(shape), space=family.space,
             precision=a.precision, compute_dtype=a.compute_dtype, remat=a.remat, ema=not a.no_ema,
             compile_cache=cache_dir, weights="random (family.init_params)", data="synthetic")

  tx = optim.make_optimizer(config.optim)
  ema_specs = {} if a.no_ema else {k: dict(v) for k, v in config.ema.items()}
  schedule = optim.make_schedule(config.optim)

  def init(params, rng):
    return step_lib.init_state(family.project_params(params), rng, tx=tx, ema_specs=ema_specs)

  abstract_state = jax.eval_shape(init, shapes, jax.random.key(0))
  out["params_mib"] = bc.mib(bc.tree_bytes(shapes))
  out["state_mib"] = bc.mib(bc.tree_bytes(abstract_state))   # params, Adam moments, EMA
  out["state_plus_ref_mib"] = round(out["state_mib"] + out["params_mib"], 1)
  bc.log(f"state {out['state_mib']:.0f} MiB + reference {out['params_mib']:.0f} MiB")
  if a.abstract_only:
    out["peak_rss_mib"] = bc.rss_mib()
    print(json.dumps(out), flush=True)
    return out

  rng = np.random.default_rng(0)
  param_sh = parallel.param_shardings(shapes, mesh)
  state_sh = parallel.param_shardings(abstract_state, mesh)
  ref = params = None

  if not a.skip_step:
    b = a.batch
    parallel.check_batch_divisible(b, mesh)
    step = step_lib.make_ddo_step(family, tx, ema_specs, alpha=config.ddo.alpha, beta=config.ddo.beta,
                                  batch_size=b, mesh=mesh, shardings=state_sh, ref_shardings=param_sh,
                                  schedule=schedule)
    labels = np.eye(family.label_dim, dtype=np.float32)[rng.integers(0, family.label_dim, b)]
    if family.space == "latent":
      real_x = np.asarray(edm2_family.synthetic_latents(b, shape[0], shape[2], family.label_dim)[0])
    else:
      real_x = rng.uniform(-1, 1, (b,) + tuple(shape)).astype(np.float32)
    host = {"real": {"x": real_x, "label": labels},
            "fake": {"x": rng.standard_normal((b,) + tuple(shape)).astype(np.float32), "label": labels}}
    abstract_batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, shapes, abstract_batch).compile()
    out["step_compile_s"] = round(time.perf_counter() - t0, 3)
    out["step_buffers"] = bc.buffers(compiled)
    out["step_flops"] = bc.flops(compiled)
    out["peak_rss_compile_mib"] = bc.rss_mib()
    compile_cache.release_compile_memory()
    bc.log(f"(a) DDO step, {b} real + {b} fake: compiled in {out['step_compile_s']:.1f} s, buffers "
           f"{out['step_buffers']}, {out['step_flops'] / 1e9:.1f} GFLOP")
    if not a.compile_only:
      ref = jax.jit(family.init_params, out_shardings=param_sh)(jax.random.key(0))
      state = jax.jit(init, out_shardings=state_sh)(ref, jax.random.key(1))
      batch = parallel.global_batch(host, mesh)
      t0 = time.perf_counter()
      state, m = compiled(state, ref, batch)
      float(m["loss"])
      out["step_warmup_s"] = round(time.perf_counter() - t0, 3)
      ts = []
      for i in range(a.steps):
        t0 = time.perf_counter()
        state, m = compiled(state, ref, batch)
        loss = float(m["loss"])
        ts.append(time.perf_counter() - t0)
        bc.log(f"  step {i}: {ts[-1]:.3f} s, loss {loss:.4g}")
      med = bc.median(ts)
      out.update(step_s=[round(t, 4) for t in ts], step_median=round(med, 4),
                 real_images_per_s=round(b / med, 4), loss=loss, peak_rss_step_mib=bc.rss_mib())
      bc.log(f"(a) DDO step median {med:.3f} s: {b / med:.3f} real images/s")
      params = state["params"]
      del state, m
    del compiled

  if not a.skip_sampler:
    from ddo_jax.sampling import seeded  # pylint: disable=import-outside-toplevel
    sb = a.sampler_batch
    seeds = jnp.arange(sb, dtype=jnp.int32)
    keys_of = lambda: seeded.seed_keys(jax.random.key(seeded.CLI_BASE_SEED), seeds)
    if params is None and not a.compile_only:
      params = jax.jit(family.init_params, out_shardings=param_sh)(jax.random.key(0))
    guide_params = None
    out["samplers"] = {}
    for name in [s for s in a.samplers.split(",") if s]:
      family.sampler_name = "dpmv3" if name == "dpmv3" else "heun"
      family.float64 = name == "dpmv3"
      family.config.sampler.num_steps = edm2_family.DEFAULT_STEPS[family.sampler_name]
      guided = name == "heun_guided"
      family.guide_net, family.guidance = (guide_net, GUIDANCE) if guided else (None, 1.0)
      fn = jax.jit(lambda p, g, keys: family.sample_latents(p, g, keys, seeds)[0])
      nfe = 25 if name == "dpmv3" else 63
      rec = dict(steps=family.config.sampler.num_steps, nfe=nfe, guide_nfe=nfe if guided else 0,
                 state="float64" if family.float64 else "float32")
      with jax.enable_x64(family.float64):
        keys = keys_of()
        t0 = time.perf_counter()
        prog = fn.lower(shapes, guide_shapes if guided else None, keys).compile()
        rec["compile_s"] = round(time.perf_counter() - t0, 3)
        rec["buffers"] = bc.buffers(prog)
        rec["flops_loop_body"] = bc.flops(prog)   # XLA's cost analysis counts a scan's body once, not per step
        bc.log(f"(b) {name}, batch {sb}: compiled in {rec['compile_s']:.1f} s")
        if not a.compile_only:
          if guided and guide_params is None:
            guide_params = jax.jit(lambda k: edm2_unet.init_variables(guide_net, k))(jax.random.key(2))
          g = guide_params if guided else None
          t0 = time.perf_counter()
          float(prog(params, g, keys)[0, 0, 0, 0])
          rec["warmup_s"] = round(time.perf_counter() - t0, 3)
          ts = []
          for _ in range(a.steps):
            t0 = time.perf_counter()
            float(prog(params, g, keys)[0, 0, 0, 0])
            ts.append(time.perf_counter() - t0)
          med = bc.median(ts)
          rec.update(s=[round(t, 4) for t in ts], median=round(med, 4), images_per_s=round(sb / med, 5))
          bc.log(f"    median {med:.3f} s: {sb / med:.4f} images/s")
      out["samplers"][name] = rec
    out["sampler_batch"] = sb

  stats = bc.device_stats(dev)
  if "peak_bytes_in_use" in stats:
    out["device_peak_mib"] = bc.mib(stats["peak_bytes_in_use"])
  out["peak_rss_mib"] = bc.rss_mib()
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
