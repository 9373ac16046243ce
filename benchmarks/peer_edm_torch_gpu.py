"""The PyTorch peer (`../shared/bench/peer_edm_torch.py`) on a CUDA device: the same work, placed on the GPU.

The peer builds everything on the CPU. This runs its `build()` (upstream NVlabs/edm EDMPrecond + SongUNet,
imported at run time from UPSTREAM_EDM) and its step and sampler unchanged, except that the networks and
tensors live on `cuda`, the sampler is synchronised before the clock stops, and the JSON line also carries
the device's peak memory (torch.cuda.max_memory_allocated). Convolutions and matmuls run in full float32
(cudnn/cuBLAS TF32 off, as EDM's training loop sets them) unless --tf32; cudnn.benchmark is on (EDM's
train.py default); its autotuning happens in the excluded warm-up.

  UPSTREAM_EDM=<NVlabs/edm tree> PEER_EDM_TORCH=<peer_edm_torch.py> python benchmarks/peer_edm_torch_gpu.py \
      --size full --batch 64 --steps 10 --sampler_batch 256
"""
import argparse
import copy
import importlib.util
import json
import os
import resource
import sys
import time

import numpy as np
import torch

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load_peer():
  path = os.environ.get("PEER_EDM_TORCH") or os.path.join(_HERE, "..", "..", "shared", "bench",
                                                           "peer_edm_torch.py")
  spec = importlib.util.spec_from_file_location("peer_edm_torch", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)   # imports upstream `training.networks` and `generate` from UPSTREAM_EDM
  return mod


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--size", default="full", choices=["full", "tiny"])
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--sampler_batch", type=int, default=8)
  ap.add_argument("--sampler_reps", type=int, default=1)
  ap.add_argument("--skip_sampler", action="store_true")
  ap.add_argument("--tf32", action="store_true", help="allow TF32 in cudnn convolutions and cuBLAS matmuls")
  a = ap.parse_args()
  torch.backends.cudnn.allow_tf32 = a.tf32
  torch.backends.cuda.matmul.allow_tf32 = a.tf32
  torch.backends.cudnn.benchmark = True
  peer = _load_peer()
  import generate   # the upstream module the peer imported
  dev = torch.device("cuda")
  sync = torch.cuda.synchronize

  torch.manual_seed(0)
  net = peer.build(a.size).to(dev).train().requires_grad_(True)
  ref = copy.deepcopy(net).eval().requires_grad_(False)
  opt = torch.optim.Adam(net.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8)
  R, B = net.img_resolution, a.batch
  x = torch.randn(B, 3, R, R).clamp(-1, 1).to(dev)
  xf = torch.randn(B, 3, R, R).clamp(-1, 1).to(dev)
  lab = torch.eye(10)[torch.randint(0, 10, (B,))].to(dev)
  alpha, beta, sd = 4.0, 0.02, 0.5

  def step():   # peer_edm_torch.py's step, on the device
    sigma = (torch.randn(B, 1, 1, 1, device=dev) * 1.2 - 1.2).exp()
    w = (sigma ** 2 + sd ** 2) / (sigma * sd) ** 2
    n = torch.randn_like(x) * sigma
    xx, ll = torch.cat([x, xf]), torch.cat([lab, lab])
    nn_, ss, ww = torch.cat([n, n]), torch.cat([sigma, sigma]), torch.cat([w, w])
    lp = -(ww * (net(xx + nn_, ss, ll) - xx) ** 2).sum((1, 2, 3))
    with torch.no_grad():
      lpr = -(ww * (ref(xx + nn_, ss, ll) - xx) ** 2).sum((1, 2, 3))
    gap = lp - lpr
    loss = (-torch.nn.functional.logsigmoid(beta * gap[:B])
            - alpha * torch.nn.functional.logsigmoid(-beta * gap[B:])).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()   # synchronises

  t0 = time.perf_counter()
  step()
  warm = time.perf_counter() - t0
  wall, cpu = [], []
  for _ in range(a.steps):
    t0, c0 = time.perf_counter(), time.process_time()
    loss = step()
    wall.append(time.perf_counter() - t0)
    cpu.append(time.process_time() - c0)
  step_peak = torch.cuda.max_memory_allocated()
  out = dict(impl="torch-upstream-edm-cuda", torch=torch.__version__, device=torch.cuda.get_device_name(),
             tf32=a.tf32, size=a.size, batch=B, n_params=sum(p.numel() for p in net.parameters()),
             warmup_s=round(warm, 3), step_s=[round(t, 4) for t in wall], step_min=round(min(wall), 4),
             step_median=round(float(np.median(wall)), 4), step_cpu_s=[round(t, 3) for t in cpu],
             real_images_per_s=round(B / float(np.median(wall)), 4), loss=loss,
             step_device_peak_mib=round(step_peak / 2 ** 20, 1))
  if not a.skip_sampler:
    sampler_net = copy.deepcopy(net).eval().requires_grad_(False)
    latents = torch.randn(a.sampler_batch, 3, R, R).to(dev)
    labels = torch.eye(10)[torch.randint(0, 10, (a.sampler_batch,))].to(dev)
    generate.edm_sampler(sampler_net, latents, labels, num_steps=2)   # warm-up
    sync()
    ts = []
    for _ in range(a.sampler_reps):
      t0 = time.perf_counter()
      generate.edm_sampler(sampler_net, latents, labels, num_steps=18)
      sync()
      ts.append(time.perf_counter() - t0)
    out.update(sampler_batch=a.sampler_batch, sampler_s=[round(t, 3) for t in ts],
               sampler_median=round(float(np.median(ts)), 3),
               sampler_images_per_s=round(a.sampler_batch / float(np.median(ts)), 4))
  out["device_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
  out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  print(json.dumps(out), flush=True)


if __name__ == "__main__":
  main()
