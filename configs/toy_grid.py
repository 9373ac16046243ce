"""DDO on the exact-likelihood toy: a two-token autoregressive model over a 16x16 grid.

The reference is the limited-capacity maximum-likelihood fit (independent tokens); DDO rounds with
alpha = beta = 1 move the full-capacity model towards p_data (Theorem 3.1). The metric is the exact
KL(p_data || p_theta), computed by enumerating the grid.

  python -m launch.train --config configs/toy_grid.py --workdir runs/grid
"""
import ml_collections


VARIANTS = {"": "two-token autoregressive model on a 16x16 grid, 3 rounds, exact KL", "tiny": "1 round (tests)"}


def get_config(arg: str = ""):
  if arg not in ("", "tiny"):
    raise ValueError(f"unknown variant {arg!r} of configs/toy_grid.py (use '' or 'tiny')")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "toy_grid"
  c.model = dict(num_train=100_000)
  c.mesh = dict(data=-1, fsdp=1)
  # How the train step is split over the mesh: 'jit' (XLA partitions the global step) or 'shard_map' (an
  # explicit per-device program; the same results to float32 rounding). ddo_jax/train/step.py.
  c.step_impl = "jit"
  c.sharding_rules = ((".*", "replicate"),)
  c.init = dict(kind="pretrain", checkpoint="")
  c.pretrain = dict(steps=500, batch_size=1024,
                    optim=dict(name="adam", lr=0.05, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=0, clip_norm=0.0))
  c.ddo = dict(alpha=1.0, beta=1.0)
  c.rounds = dict(num=3, images=1024 * 500, batch_size=1024)
  c.negatives = dict(mode="offline", num=100_000)
  c.sampling = dict(batch_size=4096)
  c.optim = dict(name="adam", lr=0.02, b1=0.9, b2=0.999, eps=1e-8, warmup_steps=50, clip_norm=0.0)
  c.ema = {}
  c.selection = dict(params="params", metric="kl", choose="best", eval_every=100)
  c.checkpoint = dict(every=100, async_save=False)
  c.log_every = 100
  c.plot_samples = 8192
  if arg == "tiny":
    c.pretrain.steps = 200
    c.rounds = dict(num=1, images=1024 * 200, batch_size=1024)
    c.negatives.num = 8192
    c.selection.eval_every = 50
    c.checkpoint.every = 50
  return c
