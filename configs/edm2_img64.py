"""DDO fine-tuning of EDM2-S on ImageNet 64x64 (pixels), as in the paper's ImageNet-64 runs.

Variants (`--config configs/edm2_img64.py:<variant>`):
  s       edm2-img64-s-1073741-0.075.pkl (EDM2-S, FID preset) -> DDO, 24 rounds of 6.4M images, FID selection
  tiny    self-contained smoke run: the goldens' tiny 16x16 EDM2 Precond architecture (edm2/precond_img),
          RANDOMLY INITIALISED (init.kind='random'), on SYNTHETIC class-coloured discs (data.source='synthetic',
          not ImageNet); 2 rounds, no download, no checkpoint; metric 'denoise_loss'.

The `s` variant needs a converted EDM2 checkpoint (init.checkpoint: `python -m launch.convert edm2 --src
edm2-img64-s-1073741-0.075.pkl --out <dir>`) and ImageNet, one of:
  * EDM2's dataset zip (default; model.data.source='edm2_zip', model.data.path=img64.zip, made with EDM2's
    `dataset_tool.py convert --resolution=64x64 --transform=center-crop-dhariwal`; read lazily);
  * `tfds.data_source('imagenet2012')` (model.data.source='tfds', model.data.data_dir, model.data.split) or the
    extracted train folder (model.data.source='folder', model.data.path), center-cropped on the fly exactly as
    that dataset_tool command does (ddo_jax/data/edm2_imagenet.py).
A missing dataset stops the run at start with one line saying how to prepare it. The FID metric needs
model.eval.inception (pytorch-fid's pt_inception-2015-12-05-6726825d.pth) and model.eval.ref_stats (EDM2's
https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img64.pkl).

Sources: METHOD.md §2.2 (the loss), §2.5 (EDM2 specifics), §4.1 (table), §5 (sampling for FID);
ARCHITECTURES.md §3.1 (network). [3P] marks third-party transcriptions of the paper's appendix (S7).

Open questions, stated rather than hidden:
  * Base checkpoint: EDM2-S; the FID preset edm2-img64-s-1073741-0.075.pkl is the obvious candidate but not
    confirmed (METHOD.md §2.5).
  * alpha, beta were swept per round (alpha in [0.5, 50], beta in [0.01, 0.1]); per-round values are unknown.
    We use alpha = 4, beta = 0.02 (the CIFAR-10 round-1 best and the goldens' values) for every round.
  * P_mean / P_std: EDM2 img64 pretraining values (-0.8, 1.6); S7 [3P] says P_std was widened to 3.0 from
    round 17 on, which a fixed config cannot express (raise model.P_std by hand for later rounds).
  * Batch 512 "at bs 512" [3P S7], unconfirmed for EDM2. LR 5e-5 [3P S7].
  * LR schedule: "warm-up, then inverse-sqrt decay, about 0.4x of the peak at the end of a round" [3P]. With
    EDM2's lr = ref_lr * min(t / warmup, 1) / sqrt(max(t / ref, 1)) that means ref = round_steps / 6.25
    (EDM2's own ref_batches = 70k would not decay at all within a 12.5k-step round). The warm-up length is not
    stated: we take it equal to ref (2000 steps, 1.0M images), so the decay starts where the ramp ends.
  * Adam betas (0.9, 0.99), eps 1e-8: EDM2's pretraining optimizer, presumed [METHOD.md §2.5].
  * Negatives: offline, 50k per round [3P S7], EDM2's unguided Heun sampler with 32 steps (63 NFE), labels
    class-balanced (seed mod 1000) like the FID protocol; how the paper labelled its negatives is unknown.
  * Evaluation: FID of 50k class-balanced samples (DDO's EDM2_sample.py) every 2500 steps (5 per round; the
    paper's checkpoint cadence is unknown). The EMA is EDM2's power function with sigma_rel 0.05.
"""
import ml_collections

from ddo_jax.convert.edm2_names import config_from_init_kwargs

# EDM2-S img64 constructor kwargs (ARCHITECTURES.md §3.1; UNet defaults otherwise). Dropout 0 for DDO (S was
# trained with 0 anyway); use_fp16 False: DDO disables mixed precision (METHOD.md §2.2 item 6).
S_NET = dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=False, model_channels=192,
             channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8], dropout=0.0)
# The goldens' tiny EDM2 net (shared/goldens/edm2/precond_img/config.json init_kwargs).
TINY_NET = dict(img_resolution=16, img_channels=3, label_dim=10, use_fp16=False, sigma_data=0.5,
                logvar_channels=128, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                channels_per_head=32, dropout=0.0)

VARIANTS = {
    "s": "EDM2-S ImageNet-64 (edm2-img64-s-1073741-0.075.pkl), 24 rounds, FID selection",
    "tiny": "self-contained smoke run: random tiny EDM2 net on SYNTHETIC 16x16 data, 2 rounds",
}


def get_config(arg: str = "s"):
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/edm2_img64.py ({', '.join(VARIANTS)})")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "edm2"
  c.model = dict(
      net=config_from_init_kwargs(TINY_NET if arg == "tiny" else S_NET, "Precond"),
      space="pixel",
      P_mean=-0.8, P_std=1.6,                   # EDM2 img64 pretraining (see open questions)
      labels="balanced",                        # label = seed mod 1000 (DDO's EDM2_sample.py)
      sampler=dict(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0),  # 63 NFE
      data=dict(source="edm2_zip", path="", num=0, split="train", data_dir="", num_workers=0),
      compute_dtype="float32",                  # or 'bfloat16' (Blocks in bf16; see benchmarks/edm2_bench.py)
      remat=False,                              # True: rematerialize each Block in the backward pass
      metric="fid",
      eval_batch=256,                           # held-out batch of the 'denoise_loss' metric
      # FID: 50k samples, seeds 0..49999, class = seed mod 1000 (EDM2_sample.py), unguided (guidance 1.0).
      eval=dict(inception="", ref_stats="", num_samples=50_000, batch_size=500, guide="", guidance=1.0),
  )
  c.mesh = dict(data=-1, fsdp=1)
  c.step_impl = "jit"
  c.sharding_rules = ((".*", "replicate"),)      # 280M parameters: data parallel; FSDP via --config overrides
  c.init = dict(kind="checkpoint", checkpoint="")
  c.pretrain = dict(steps=1, batch_size=1, optim=dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                                                        warmup_steps=0, clip_norm=0.0))  # unused
  c.ddo = dict(alpha=4.0, beta=0.02)
  c.rounds = dict(num=24, images=6_400_000, batch_size=512)   # 5 epochs per round [3P S7]
  c.negatives = dict(mode="offline", num=50_000)
  c.sampling = dict(batch_size=512)
  steps = 6_400_000 // 512
  c.optim = dict(name="adam", lr=5e-5, b1=0.9, b2=0.99, eps=1e-8, warmup_steps=round(steps / 6.25),
                 decay="rsqrt", ref_steps=round(steps / 6.25), clip_norm=0.0)
  c.ema = {"ema": dict(kind="power", std=0.05)}
  c.selection = dict(params="ema", metric="fid", choose="best", eval_every=2500)
  c.checkpoint = dict(every=500, async_save=False)
  c.log_every = 50
  c.plot_samples = 64

  if arg == "tiny":
    c.init = dict(kind="random", checkpoint="")
    c.model.data.update(source="synthetic", num=256)
    c.model.metric = "denoise_loss"
    c.model.eval_batch = 32
    c.model.sampler.num_steps = 3
    c.rounds = dict(num=2, images=4 * 16, batch_size=16)
    c.negatives.num = 32
    c.sampling.batch_size = 32
    c.optim.update(lr=1e-3, warmup_steps=2, ref_steps=2)
    c.selection = dict(params="ema", metric="denoise_loss", choose="best", eval_every=2)
    c.checkpoint.every = 2
    c.log_every = 2
    c.plot_samples = 16
  return c
