"""Speed and memory of VAR (d16, d30) under DDO: the online-negative sampler, the DDO step, and the CFG sampler.

  python benchmarks/var_bench.py --size tiny
  python benchmarks/var_bench.py --size d16 --batch 1 --steps 1 --sampler_batch 1        # CPU, slow
  python benchmarks/var_bench.py --size d16 --batch 16 --steps 5 --sampler_batch 25      # accelerator
  python benchmarks/var_bench.py --size d30 --abstract_only                               # builds, allocates nothing

The objects are the ones the DDO driver (`ddo_jax/train/rounds.py`) builds from configs/var_imagenet256.py:
the mesh (`parallel.make_mesh(config.mesh.data, config.mesh.fsdp)`), the sharding rules of the config,
`optim.make_optimizer(config.optim)` (AdamW, gradient clipping, accumulation as `optax.MultiSteps`),
`step.init_state`, `step.make_ddo_step` and `seeded.make_paired_sampler(family.sample_paired, ...)`. Timed:

(a) the online negative sampler for one micro-batch of --batch real images (`family.sample_paired`: per real
    row one guidance-free VAR sample with the real row's class, model.negatives' options, decoded to pixels);
(b) the DDO step given that fake batch (tokenisation of reals and fakes by the VQVAE, the trained VAR and the
    frozen reference over all 680 tokens, DDO's loss, the gradient and the optimizer update);
(c) their sum, reported as real images/s (what a driver micro-step costs with online negatives);
(d) `var_sample.autoregressive_infer_cfg` at --sampler_batch classes with CFG --cfg (2 x --sampler_batch rows:
    cond + uncond; upstream's FID protocol is 25 classes x 2 per call), and var_sample.compile_count().

Each program is compiled from abstract shapes before it runs (lower + compile, timed on its own), then run once
to warm up (excluded), then --steps times (timed, synchronised by fetching a value to the host).

Weights are random: the VAR from `family.init_params`, the VQVAE (vae_ch160v4096z32's architecture for d16 /
d30, the config's tiny VQVAE for tiny) from `families.var.random_vae_params`' fixed seed; speed does not depend
on their values. Data are SYNTHETIC: uniform pixels in [-1, 1] with uniform random labels, not ImageNet.

The last line on stdout is one JSON object; progress goes to stderr.
"""
import argparse
import functools
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout
from benchmarks.bench_common import log as _log, mib as _mib, rss_mib as _rss_mib, buffers as _buffers, flops as _flops, device_stats as _device_stats, median as _median, tree_bytes as _bytes  # noqa: E402

# vae_ch160v4096z32.pth (VAR's released VQVAE; ddo_jax/convert/vqvae.py converts it)
REAL_VAE = dict(vocab_size=4096, z_channels=32, ch=160, share_quant_resi=4)


def _args(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--size", default="tiny", choices=["tiny", "d16", "d30"], help="configs/var_imagenet256.py variant")
  ap.add_argument("--batch", type=int, default=2, help="real images per micro-step (plus as many online fakes)")
  ap.add_argument("--steps", type=int, default=2, help="timed calls after one warm-up call")
  ap.add_argument("--sampler_batch", type=int, default=25, help="classes per CFG sampler call (x2 rows)")
  ap.add_argument("--cfg", type=float, default=1.5, help="the CFG sampler's cfg (1.5: DDO's guided FID)")
  ap.add_argument("--cfg_convention", default="one_plus_w", choices=["one_plus_w", "var"],
                  help="how --cfg maps to VAR's guidance weight w (one_plus_w: w = cfg - 1; var: w = cfg)")
  ap.add_argument("--skip_step", action="store_true", help="skip (a)-(c)")
  ap.add_argument("--skip_sampler", action="store_true", help="skip (d)")
  ap.add_argument("--abstract_only", action="store_true",
                  help="build the config, family and abstract state (jax.eval_shape), report sizes, run nothing")
  ap.add_argument("--devices", type=int, default=0, help="devices for the mesh; 0 = all (as the driver)")
  ap.add_argument("--compile_cache", default="off",
                  help="persistent compilation cache folder, or 'off' (default: off, so compile times are real)")
  ap.add_argument("--precision", default="highest", choices=["highest", "high", "default"],
                  help="jax_default_matmul_precision")
  return ap.parse_args(argv)


def make_config(size: str):
  from configs import var_imagenet256
  config = var_imagenet256.get_config(size)
  config.model.metric = "nll"             # FID selection is refused by the family; nothing is evaluated here
  config.selection.metric = "nll"
  if size != "tiny":
    config.model.vae_checkpoint = ""      # a random VQVAE of the real architecture instead of the converted one
    config.model.vae = dict(REAL_VAE)
    config.init = dict(kind="random", checkpoint="")
  return config


def main(argv=None):
  a = _args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np

  from ddo_jax import compile_cache
  cache_dir = compile_cache.enable(a.compile_cache)
  jax.config.update("jax_default_matmul_precision", a.precision)

  from ddo_jax import families, parallel
  from ddo_jax.nets import var_vqvae
  from ddo_jax.sampling import seeded, var_sample
  from ddo_jax.train import optim, step as step_lib

  t_build = time.perf_counter()
  config = make_config(a.size)
  family = families.make(config)
  devices = jax.devices() if a.devices == 0 else jax.devices()[:a.devices]
  mesh = parallel.make_mesh(config.mesh.data, config.mesh.fsdp, devices=None if a.devices == 0 else devices)
  rules = [tuple(r) for r in config.sharding_rules]
  dev = devices[0]
  _log(f"devices: {len(devices)} x {dev.device_kind} ({jax.default_backend()}), compile cache: {cache_dir}")

  shapes = jax.eval_shape(family.init_params, jax.random.key(0))
  n_params = parallel.tree_size(shapes)
  n_vae = parallel.tree_size(family.vae_params)
  res = family.image_size
  _log(f"VAR-{a.size}: {n_params / 1e6:.2f}M parameters, VQVAE {n_vae / 1e6:.2f}M (random), {res}px, "
       f"patch_nums {tuple(family.net.patch_nums)}")
  out = dict(impl="ddo-jax", bench="var", jax=jax.__version__, backend=jax.default_backend(), device=dev.device_kind,
             n_devices=len(devices), date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), size=a.size,
             batch=a.batch, n_params=n_params, vae_params=n_vae, vae_arch=dict(config.model.vae) if "vae" in
             config.model else None, image_size=res, tokens=int(sum(p * p for p in family.net.patch_nums)),
             precision=a.precision, compute_dtype=str(config.model.compute_dtype),
             optimizer=f"{config.optim.name} accumulate={config.optim.accumulate} clip={config.optim.clip_norm}",
             negatives=dict(config.model.negatives), compile_cache=cache_dir,
             data="synthetic: uniform pixels in [-1, 1], uniform random labels (not ImageNet)",
             weights="random (family.init_params; VQVAE random_vae_params)")

  param_sh = parallel.param_shardings(shapes, mesh, rules)
  tx = optim.make_optimizer(config.optim)
  schedule = optim.make_schedule(config.optim)
  ema_specs = {k: dict(v) for k, v in config.ema.items()}

  def init(params, rng):
    return step_lib.init_state(family.project_params(params), rng, tx=tx, ema_specs=ema_specs)

  abstract_state = jax.eval_shape(init, shapes, jax.random.key(0))
  state_sh = parallel.param_shardings(abstract_state, mesh, rules)
  out["build_s"] = round(time.perf_counter() - t_build, 3)
  out["params_mib"] = _mib(_bytes(shapes))
  out["state_mib"] = _mib(_bytes(abstract_state))   # params + optimizer state (+ accumulator), float32
  out["state_plus_ref_mib"] = round(out["state_mib"] + out["params_mib"], 1)
  _log(f"abstract state: {out['state_mib']:.0f} MiB (+ reference {out['params_mib']:.0f} MiB)")
  if a.abstract_only:
    out["peak_rss_mib"] = _rss_mib()
    print(json.dumps(out), flush=True)
    return out

  rng = np.random.default_rng(0)
  t0 = time.perf_counter()
  ref = jax.jit(family.init_params, out_shardings=param_sh)(jax.random.key(0))
  jax.block_until_ready(ref)
  out["init_params_s"] = round(time.perf_counter() - t0, 3)
  params = ref

  if not a.skip_step:
    b = a.batch
    parallel.check_batch_divisible(b, mesh)
    step = step_lib.make_ddo_step(family, tx, ema_specs, alpha=config.ddo.alpha, beta=config.ddo.beta,
                                  batch_size=b, mesh=mesh, shardings=state_sh, ref_shardings=param_sh,
                                  schedule=schedule, impl=config.get("step_impl", "jit"))
    paired = seeded.make_paired_sampler(family.sample_paired, mesh, param_sh)
    host_real = {"x": rng.uniform(-1, 1, (b, res, res, 3)).astype(np.float32),
                 "label": rng.integers(0, family.num_classes, b).astype(np.int32)}
    real = parallel.global_batch(host_real, mesh)
    ids = jax.device_put(np.arange(b, dtype=np.int32), parallel.batch_sharding(mesh))
    base = jax.random.key(500_000)

    # (a) the online negative sampler, compiled from abstract shapes
    t0 = time.perf_counter()
    neg_compiled = paired.lower(shapes, base, ids, real).compile()
    out["neg_compile_s"] = round(time.perf_counter() - t0, 3)
    out["neg_buffers"] = _buffers(neg_compiled)
    out["neg_flops"] = _flops(neg_compiled)
    _log(f"(a) online negatives, batch {b}: compiled in {out['neg_compile_s']:.1f} s")
    fake_abstract = jax.eval_shape(paired, shapes, base, ids, real)

    # (b) the DDO step, compiled from abstract shapes
    abstract_batch = {"real": jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), real),
                      "fake": fake_abstract}
    t0 = time.perf_counter()
    step_compiled = step.lower(abstract_state, shapes, abstract_batch).compile()
    out["step_compile_s"] = round(time.perf_counter() - t0, 3)
    out["step_buffers"] = _buffers(step_compiled)
    out["step_flops"] = _flops(step_compiled)
    out["peak_rss_compile_mib"] = _rss_mib()
    compile_cache.release_compile_memory()
    _log(f"(b) DDO step, {b} real + {b} fake: compiled in {out['step_compile_s']:.1f} s")

    state = jax.jit(init, in_shardings=(param_sh, parallel.replicated(mesh)), out_shardings=state_sh)(
        ref, jax.random.key(1))

    def neg(i):
      fake = neg_compiled(ref, base, ids + i * b, real)
      jax.block_until_ready(fake)
      return fake

    t0 = time.perf_counter()
    fake = neg(0)
    out["neg_warmup_s"] = round(time.perf_counter() - t0, 3)
    _log(f"  warm-up negatives: {out['neg_warmup_s']:.1f} s")
    t0 = time.perf_counter()
    state, m = step_compiled(state, ref, {"real": real, "fake": fake})
    float(m["loss"])
    out["step_warmup_s"] = round(time.perf_counter() - t0, 3)
    _log(f"  warm-up DDO step: {out['step_warmup_s']:.1f} s")
    neg_t, step_t = [], []
    for i in range(a.steps):
      t0 = time.perf_counter()
      fake = neg(i + 1)
      neg_t.append(time.perf_counter() - t0)
      t0 = time.perf_counter()
      state, m = step_compiled(state, ref, {"real": real, "fake": fake})
      loss = float(m["loss"])   # synchronises
      step_t.append(time.perf_counter() - t0)
      _log(f"  step {i}: negatives {neg_t[-1]:.3f} s, DDO step {step_t[-1]:.3f} s, loss {loss:.4g}")
    nm, sm = _median(neg_t), _median(step_t)
    tot = [n + s for n, s in zip(neg_t, step_t)]
    out.update(neg_s=[round(t, 4) for t in neg_t], neg_median=round(nm, 4),
               neg_images_per_s=round(b / nm, 4),
               step_s=[round(t, 4) for t in step_t], step_median=round(sm, 4),
               step_only_real_images_per_s=round(b / sm, 4),
               micro_step_median=round(_median(tot), 4), real_images_per_s=round(b / _median(tot), 4),
               loss=loss, peak_rss_step_mib=_rss_mib())
    _log(f"(c) negatives {nm:.3f} s + DDO step {sm:.3f} s per micro-batch of {b}: "
         f"{out['real_images_per_s']:.3f} real images/s ({out['step_only_real_images_per_s']:.3f} without sampling)")
    st = _device_stats(dev)
    if "peak_bytes_in_use" in st:
      out["step_device_peak_mib"] = _mib(st["peak_bytes_in_use"])
    params = state["params"]
    del m, fake, neg_compiled, step_compiled

  if not a.skip_sampler:
    sb = a.sampler_batch
    guidance = a.cfg_convention
    fn = jax.jit(lambda p, labels, key: var_sample.autoregressive_infer_cfg(
        family.net, p, family.vae, family.vae_params, var_vqvae, labels, key, cfg=a.cfg, guidance=guidance)["image"])
    labels = jnp.asarray(rng.integers(0, family.num_classes, sb).astype(np.int32))
    before = var_sample.compile_count()
    t0 = time.perf_counter()
    sampler = fn.lower(shapes, labels, jax.random.key(0)).compile()
    comp = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(sampler(params, labels, jax.random.key(0)))
    warm = time.perf_counter() - t0
    ts = []
    for i in range(a.steps):
      t0 = time.perf_counter()
      img = sampler(params, labels, jax.random.key(i + 1))
      float(img[0, 0, 0, 0])
      ts.append(time.perf_counter() - t0)
    med = _median(ts)
    out.update(sampler_batch=sb, sampler_rows=2 * sb, sampler_cfg=a.cfg, sampler_cfg_convention=guidance,
               sampler_compile_s=round(comp, 3), sampler_warmup_s=round(warm, 3),
               sampler_s=[round(t, 4) for t in ts], sampler_median=round(med, 4),
               sampler_images_per_s=round(sb / med, 4), sampler_buffers=_buffers(sampler),
               sampler_flops=_flops(sampler), sampler_compile_count=var_sample.compile_count(),
               sampler_compiles_here=var_sample.compile_count() - before)
    _log(f"(d) CFG sampler, {sb} x 2 rows, cfg {a.cfg} ({guidance}): compiled in {comp:.1f} s, median {med:.3f} s, "
         f"{sb / med:.3f} images/s")

  stats = _device_stats(dev)
  if "peak_bytes_in_use" in stats:
    out["device_peak_mib"] = _mib(stats["peak_bytes_in_use"])
    out["device_bytes_limit_mib"] = _mib(stats.get("bytes_limit", 0))
  out["peak_rss_mib"] = _rss_mib()
  print(json.dumps(out), flush=True)
  return out


if __name__ == "__main__":
  main()
