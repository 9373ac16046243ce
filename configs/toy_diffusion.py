"""DDO on a 2-D mixture of 8 Gaussians with a small MLP denoiser (the quickstart run).

A deliberately small network (2x32 hidden units) is pretrained by maximum likelihood (EDM's denoising
loss) and spreads some mass between the modes; DDO self-play rounds pull it back. Runs in a few minutes
on a laptop CPU.

  python -m launch.train --config configs/toy_diffusion.py --workdir /tmp/ddo_toy
  python -m launch.train --config configs/toy_diffusion.py:tiny --workdir /tmp/ddo_toy_tiny   # seconds
"""
import ml_collections


VARIANTS = {"": "MLP denoiser on an 8-mode 2-D mixture, 5 rounds", "tiny": "the same in seconds (tests)"}


def get_config(arg: str = ""):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "toy_diffusion"
  c.model = dict(
      num_modes=8, radius=1.0, mode_std=0.05,   # ground truth
      features=[32, 32], num_freqs=8,           # limited capacity on purpose
      P_mean=-1.2, P_std=1.2,                   # EDM's CIFAR-10 sigma distribution (METHOD.md §2.2)
      num_train=50_000,                         # size of the finite training set
      eval_samples=16_384,                      # samples per evaluation (metrics vs fresh data)
      sampler=dict(num_steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0),  # EDM Heun, 35 NFE
  )
  c.mesh = dict(data=-1, fsdp=1)
  # How the train step is split over the mesh: 'jit' (XLA partitions the global step) or 'shard_map' (an
  # explicit per-device program; the same results to float32 rounding). ddo_jax/train/step.py.
  c.step_impl = "jit"
  c.sharding_rules = ((".*", "replicate"),)

  c.init = dict(kind="pretrain", checkpoint="")
  c.pretrain = dict(steps=10_000, batch_size=512,
                    optim=dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, clip_norm=0.0))

  # alpha = beta = 1: the setting of Theorem 3.1, whose optimum is the data distribution.
  c.ddo = dict(alpha=1.0, beta=1.0)
  c.rounds = dict(num=5, images=512_000, batch_size=512)        # 1000 steps per round
  c.negatives = dict(mode="offline", num=50_000)                # reference samples per round
  c.sampling = dict(batch_size=4096)                            # sampler batch (negatives and evals)
  # Linear warm-up over the whole round and no decay, as in the paper's EDM rounds (METHOD.md §2.4).
  c.optim = dict(name="adam", lr=3e-4, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=1000, clip_norm=0.0)
  c.ema = {"ema": dict(kind="halflife", halflife_kimg=25.0, rampup_ratio=None)}
  c.selection = dict(params="ema", metric="swd", choose="best", eval_every=250)
  c.checkpoint = dict(every=250, async_save=False)
  c.log_every = 100
  c.plot_samples = 4096

  if arg == "tiny":  # seconds: the tests' variant
    c.pretrain.steps = 300
    c.rounds = dict(num=2, images=16 * 64, batch_size=64)
    c.negatives.num = 512
    c.sampling.batch_size = 256
    c.optim.warmup_steps = 16
    c.model.eval_samples = 512
    c.selection = dict(params="ema", metric="swd", choose="best", eval_every=8)
    c.checkpoint.every = 4
    c.log_every = 4
    c.plot_samples = 512
    c.ema = {"ema": dict(kind="halflife", halflife_kimg=0.5, rampup_ratio=None)}
  elif arg:
    raise ValueError(f"unknown variant {arg!r} of configs/toy_diffusion.py (use '' or 'tiny')")
  return c
