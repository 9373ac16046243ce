"""Speed and memory of the EDM CIFAR-10 network (DDPM++) under DDO, the same work as the PyTorch peer.

  python benchmarks/edm_cifar10.py --size tiny --batch 32 --steps 3 --sampler_batch 32
  python benchmarks/edm_cifar10.py --size full --batch 8 --steps 3 --sampler_batch 8
  python benchmarks/edm_cifar10.py --size full --batch 512 --steps 20 --sampler_batch 512 --peak_tflops 67

What is timed is what `../shared/bench/peer_edm_torch.py` (upstream NVlabs/edm in PyTorch) times, so
`../shared/bench/pair.py` can run the two alternately and compare their JSON fields:

* one DDO step (the project's `train.step.make_ddo_step` on the EDM family): the trainable EDMPrecond +
  SongUNet on B real + B fake noisy images (one sigma and one noise per pair, shared by real and fake), the
  frozen reference on the same 2B inputs under stop_gradient, the lambda-weighted squared error summed over
  C, H, W, DDO's log-sigmoid loss (alpha 4, beta 0.02), the gradient and an Adam update; no EMA unless
  --ema (the peer keeps none). Every step is synchronised (the loss is fetched to the host).
* the Heun sampler (18 steps = 35 network evaluations) at --sampler_batch, float64 state around the
  float32 network as upstream `generate.edm_sampler` (--sampler_dtype float32 for the project's default).
* compile (lowering + XLA compilation, from abstract shapes before any buffer exists) and the first
  (warm-up) call are excluded from the timings and reported on their own.

Sizes: full = the CIFAR-10 checkpoints' network (55.7M parameters, cond; --variant uncond drops the
labels); tiny = configs/edm_cifar10.py:tiny (img 16, 32 channels, mult [1, 2], 1 block, attention at 8).
Runs on one device by default (--devices 0 = all); float32 with 'highest' matmul precision.
Weights are random (speed does not depend on their values); nothing is read from disk.

The last line on stdout is one JSON object with the peer's field names (`step_median`, `step_min`,
`sampler_median`, `real_images_per_s`, `sampler_images_per_s`, `peak_rss_mib`, ...) plus `compile_s`,
`sampler_compile_s`, the compilation-cache outcome, XLA's buffer sizes and FLOP counts, the device's peak
memory where the backend reports it (GPU/TPU), and MFU when --peak_tflops is given.
"""
import argparse
import functools
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from benchmarks.bench_common import log as _log, mib as _mib, rss_mib as _rss_mib, rss_now_mib as _rss_now_mib, buffers as _buffers, flops as _flops, device_stats as _device_stats, median as _median  # noqa: E402


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="full", choices=["full", "tiny"])
  ap.add_argument("--variant", default="cond", choices=["cond", "uncond"], help="full size only")
  ap.add_argument("--batch", type=int, default=8, help="real images per step (plus as many fakes)")
  ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
  ap.add_argument("--skip_step", action="store_true", help="only the sampler")
  ap.add_argument("--compile_only", action="store_true",
                  help="compile the step, report XLA's buffers and FLOPs, run nothing")
  ap.add_argument("--sampler_batch", type=int, default=8)
  ap.add_argument("--sample_batch", type=int, dest="sampler_batch", help=argparse.SUPPRESS)  # old name
  ap.add_argument("--sampler_reps", type=int, default=1, help="timed sampler calls after one warm-up call")
  ap.add_argument("--sampler_batches", default="",
                  help="comma-separated batch sizes: also time the sampler at each (compile + 1 warm-up "
                       "+ --sampler_reps calls each) and report images/s per batch")
  ap.add_argument("--sampler_steps", type=int, default=18, help="Heun steps (18 = 35 NFE)")
  ap.add_argument("--sampler_dtype", default="float64", choices=["float64", "float32"],
                  help="the sampler state's dtype (upstream: float64); the network runs in float32")
  ap.add_argument("--skip_sampler", action="store_true")
  ap.add_argument("--ema", action="store_true", help="update the config's EMA in the step (the peer: none)")
  ap.add_argument("--devices", type=int, default=1, help="devices to run on; 0 = all")
  ap.add_argument("--compile_cache", default=None,
                  help="persistent compilation cache folder, or 'off'; default: ddo_jax.compile_cache's "
                       "($DDO_JAX_COMPILE_CACHE, else ~/.cache/ddo_jax/jax_cache)")
  ap.add_argument("--precision", default="highest", choices=["highest", "high", "default"],
                  help="jax_default_matmul_precision (GPU: 'highest' = full float32, no TF32)")
  ap.add_argument("--compute_dtype", default="float32", choices=["float32", "bfloat16"],
                  help="SongUNet compute dtype (parameters and loss stay float32)")
  ap.add_argument("--remat", action="store_true", help="SongUNet rematerialises each UNet block")
  ap.add_argument("--peak_tflops", type=float, default=0.0,
                  help="the device's peak TFLOP/s for the MFU fields (0 = no MFU)")
  ap.add_argument("--no_trim", action="store_true",
                  help="skip compile_cache.release_compile_memory() (malloc_trim) after compiling")
  ap.add_argument("--profile_dir", default="", help="write a jax.profiler trace of 2 timed steps here")
  ap.add_argument("--hlo_dump", default="", help="write the compiled step's HLO text here")
  ap.add_argument("--xla_option", action="append", default=[], metavar="KEY=VALUE",
                  help="XLA compile option for the step and the sampler (repeatable), on top of "
                       "ddo_jax.xla_options' (e.g. xla_cpu_experimental_ynn_fusion_type="
                       "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION: XLA's own CPU default)")
  ap.add_argument("--json", action="store_true", help="(accepted for symmetry; the JSON line is always printed)")
  return ap.parse_args(argv)


class _CacheEvents:
  """Counts JAX's persistent-cache hits and misses (jax.monitoring events)."""

  def __init__(self, jax):
    self.counts = {"hits": 0, "misses": 0}
    try:
      jax.monitoring.register_event_listener(self._on)
    except Exception:
      pass

  def _on(self, name, **kw):
    if name.endswith("/cache_hits"):
      self.counts["hits"] += 1
    elif name.endswith("/cache_misses"):
      self.counts["misses"] += 1

  def snapshot(self):
    return dict(self.counts)

  def since(self, before):
    h, m = self.counts["hits"] - before["hits"], self.counts["misses"] - before["misses"]
    return "hit" if h and not m else "miss" if m and not h else "mixed" if h else "none"


def _compile_kw(a) -> dict:
  opts = dict(kv.split("=", 1) for kv in a.xla_option)
  return {"compiler_options": opts} if opts else {}


def net_config(size: str, variant: str, compute_dtype: str = "float32", remat: bool = False) -> dict:
  """The EDMPrecond config of the benchmarked network (configs/edm_cifar10.py's nets)."""
  from configs import edm_cifar10
  from ddo_jax.convert.edm_names import config_from_init_kwargs
  if size == "tiny":
    net = dict(edm_cifar10.TINY_NET)
  else:
    net = dict(edm_cifar10.CIFAR10_NET, label_dim=10 if variant == "cond" else 0)
  cfg = config_from_init_kwargs(net, "EDMPrecond")
  extra = {}
  if compute_dtype != "float32":
    extra["compute_dtype"] = compute_dtype
  if remat:
    extra["remat"] = True
  if extra:
    cfg = dict(cfg, model_kwargs=dict(cfg["model_kwargs"], **extra))
  return cfg


def main(argv=None):
  a = _args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ddo_jax import compile_cache
  events = _CacheEvents(jax)
  cache_dir = compile_cache.enable(a.compile_cache)
  jax.config.update("jax_default_matmul_precision", a.precision)

  from configs import edm_cifar10
  from ddo_jax import families, parallel, xla_options
  from ddo_jax.sampling import seeded
  from ddo_jax.train import optim, step as step_lib

  config = edm_cifar10.get_config("tiny" if a.size == "tiny" else a.variant)
  config.model.net = net_config(a.size, a.variant, a.compute_dtype, a.remat)
  config.model.metric = "denoise_loss"     # no FID files needed here
  config.model.sampler.num_steps = a.sampler_steps
  family = families.make(config)
  devices = jax.devices() if a.devices == 0 else jax.devices()[:a.devices]
  mesh = parallel.make_mesh(devices=devices)
  dev = devices[0]
  _log(f"devices: {len(devices)} x {dev.device_kind} ({jax.default_backend()}), compile cache: {cache_dir}")

  shapes = jax.eval_shape(family.init_params, jax.random.key(0))
  n_params = parallel.tree_size(shapes)
  _log(f"network: {a.size} EDMPrecond + SongUNet DDPM++ ({'uncond' if not family.label_dim else 'cond'}), "
       f"{n_params / 1e6:.2f}M parameters")
  res = family.sample_shape[0]
  out = dict(impl="ddo-jax", jax=jax.__version__, backend=jax.default_backend(), device=dev.device_kind,
             n_devices=len(devices), size=a.size, batch=a.batch, n_params=n_params, precision=a.precision,
             compute_dtype=a.compute_dtype, remat=a.remat, ema=a.ema, compile_cache=cache_dir,
             xla_options=dict(xla_options.compiler_options(mesh), **_compile_kw(a).get("compiler_options", {})))

  param_sh = parallel.param_shardings(shapes, mesh)
  rng = np.random.default_rng(0)
  params = None
  if not a.skip_step:
    b = a.batch
    parallel.check_batch_divisible(b, mesh)
    tx = optim.make_optimizer(config.optim)
    ema_specs = dict(config.ema) if a.ema else {}
    init = functools.partial(step_lib.init_state, tx=tx, ema_specs=ema_specs)
    abstract_state = jax.eval_shape(init, shapes, jax.random.key(0))
    state_sh = parallel.param_shardings(abstract_state, mesh)
    step = step_lib.make_ddo_step(family, tx, ema_specs, alpha=config.ddo.alpha, beta=config.ddo.beta,
                                  batch_size=b, mesh=mesh, shardings=state_sh, ref_shardings=param_sh)

    def part():
      p = {"x": rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32)}
      if family.label_dim:
        p["label"] = np.eye(family.label_dim, dtype=np.float32)[rng.integers(0, family.label_dim, b)]
      return p

    host_batch = {"real": part(), "fake": part()}
    abstract_batch = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_batch)
    # Compile from abstract shapes, before any parameter buffer exists (as a cached or AOT run would).
    before = events.snapshot()
    t0 = time.perf_counter()
    compiled = step.lower(abstract_state, shapes, abstract_batch).compile(**_compile_kw(a))
    out["compile_s"] = round(time.perf_counter() - t0, 3)
    out["compile_cache_result"] = events.since(before)
    out["peak_rss_compile_mib"] = _rss_mib()
    out["rss_after_compile_mib"] = _rss_now_mib()
    if not a.no_trim:
      compile_cache.release_compile_memory()
      out["rss_after_trim_mib"] = _rss_now_mib()
    out["step_buffers"] = _buffers(compiled)
    out["step_flops"] = _flops(compiled)
    if a.hlo_dump:
      pathlib.Path(a.hlo_dump).write_text(compiled.as_text())
    if a.compile_only:
      out["peak_rss_mib"] = _rss_mib()
      print(json.dumps(out), flush=True)
      return out

    ref = jax.device_put(jax.tree_util.tree_map(
        lambda s: (0.02 * rng.standard_normal(s.shape, dtype=np.float32)), shapes), param_sh)
    state = jax.jit(init, out_shardings=state_sh)(ref, jax.random.key(1))
    batch = parallel.global_batch(host_batch, mesh)
    out["rss_after_init_mib"] = _rss_now_mib()
    t0 = time.perf_counter()
    state, m = compiled(state, ref, batch)
    float(m["loss"])
    out["warmup_s"] = round(time.perf_counter() - t0, 3)
    out["rss_after_warmup_mib"] = _rss_now_mib()
    wall, cpu = [], []
    for i in range(a.steps):
      if a.profile_dir and i == a.steps - 2:
        jax.profiler.start_trace(a.profile_dir, create_perfetto_trace=True)
      t0, c0 = time.perf_counter(), time.process_time()
      state, m = compiled(state, ref, batch)
      loss = float(m["loss"])   # synchronises
      wall.append(time.perf_counter() - t0)
      cpu.append(time.process_time() - c0)
    if a.profile_dir:
      jax.profiler.stop_trace()
    med = _median(wall)
    out.update(step_s=[round(t, 4) for t in wall], step_min=round(min(wall), 4), step_median=round(med, 4),
               step_cpu_s=[round(t, 3) for t in cpu], real_images_per_s=round(b / med, 4), loss=loss,
               peak_rss_step_mib=_rss_mib())
    if a.peak_tflops:
      out["step_tflops_per_s"] = round(out["step_flops"] / med / 1e12, 3)
      out["step_mfu"] = round(out["step_flops"] / med / (a.peak_tflops * 1e12), 4)
    _log(f"DDO step, {b} real + {b} fake: compile {out['compile_s']:.1f} s ({out['compile_cache_result']}), "
         f"median {med:.4f} s, {b / med:.2f} real images/s, {out['step_flops'] / 1e9:.1f} GFLOP/step")
    step_stats = _device_stats(dev)
    if "peak_bytes_in_use" in step_stats:
      out["step_device_peak_mib"] = _mib(step_stats["peak_bytes_in_use"])
    params = state["params"]
    del ref, batch, m

  if not a.skip_sampler:
    if params is None:
      params = jax.device_put(jax.tree_util.tree_map(
          lambda s: (0.02 * rng.standard_normal(s.shape, dtype=np.float32)), shapes), param_sh)
    f64 = a.sampler_dtype == "float64"
    fn = seeded.make_seeded_sampler(family.sample_float64 if f64 else family.sample, mesh, param_sh)
    nfe = 2 * a.sampler_steps - 1
    base = jax.random.key(0)

    def time_sampler(sb):
      parallel.check_batch_divisible(sb, mesh, "--sampler_batch")
      ids = jax.device_put(np.arange(sb, dtype=np.int32), parallel.batch_sharding(mesh))
      with jax.enable_x64(f64):
        before = events.snapshot()
        t0 = time.perf_counter()
        sampler = fn.lower(params, base, ids).compile(**_compile_kw(a))
        comp = time.perf_counter() - t0
        hit = events.since(before)
        t0 = time.perf_counter()
        jax.block_until_ready(sampler(params, base, ids))
        warm = time.perf_counter() - t0
        ts = []
        for _ in range(a.sampler_reps):
          t0 = time.perf_counter()
          jax.block_until_ready(sampler(params, base, ids))
          ts.append(time.perf_counter() - t0)
      return sampler, comp, hit, warm, ts

    sampler, comp, hit, warm, ts = time_sampler(a.sampler_batch)
    med = _median(ts)
    out.update(sampler_batch=a.sampler_batch, sampler_dtype=a.sampler_dtype, sampler_nfe=nfe,
               sampler_compile_s=round(comp, 3), sampler_compile_cache_result=hit,
               sampler_warmup_s=round(warm, 3), sampler_s=[round(t, 3) for t in ts],
               sampler_median=round(med, 3), sampler_images_per_s=round(a.sampler_batch / med, 4),
               sampler_buffers=_buffers(sampler), sampler_flops=_flops(sampler))
    if a.peak_tflops:
      out["sampler_mfu"] = round(out["sampler_flops"] / med / (a.peak_tflops * 1e12), 4)
    _log(f"Heun sampler, {nfe} NFE, batch {a.sampler_batch}: compile {comp:.1f} s ({hit}), median "
         f"{med:.3f} s, {a.sampler_batch / med:.3f} images/s")
    del sampler
    sweep = []
    for sb in [int(s) for s in a.sampler_batches.split(",") if s.strip()]:
      try:
        s_, comp, hit, warm, ts = time_sampler(sb)
        del s_
        med = _median(ts)
        sweep.append(dict(batch=sb, compile_s=round(comp, 3), median_s=round(med, 3),
                          images_per_s=round(sb / med, 4), rss_mib=_rss_mib()))
        _log(f"  sampler batch {sb}: {med:.3f} s, {sb / med:.3f} images/s")
      except Exception as e:  # out of memory at this batch
        sweep.append(dict(batch=sb, error=f"{type(e).__name__}: {str(e)[:200]}"))
        _log(f"  sampler batch {sb}: {type(e).__name__}")
        break
    if sweep:
      out["sampler_sweep"] = sweep

  stats = _device_stats(dev)
  if "peak_bytes_in_use" in stats:
    out["device_peak_mib"] = _mib(stats["peak_bytes_in_use"])
  out["peak_rss_mib"] = _rss_mib()
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
