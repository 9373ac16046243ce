"""DDO fine-tuning of VAR (d16, d30) on ImageNet 256x256, as in the paper's VAR runs (DDO's train_ddo.sh).

Variants (`--config configs/var_imagenet256.py:<variant>`):
  d16   var_d16.pth (VAR-d16, 310M) -> var_d16-ddo (paper FID 3.12 guidance-free, 2.54 guided), 2 rounds
  d30   var_d30.pth (VAR-d30, 2.0B) -> var_d30-ddo (1.79 / 1.73), 2 rounds

Both need the converted VAR and VQVAE checkpoints (init.checkpoint, model.vae_checkpoint) and ImageNet
(model.data: tfds imagenet2012 as ArrayRecord, or the extracted train/ folder; ddo_jax/data/imagenet.py).

Sources: METHOD.md §3 (VAR: §3.1 likelihood, §3.2 label dropout, §3.3 negatives and real images, §3.4
optimization, all from DDO's train_ddo.sh / DDO_trainer.py [CODE S2] and VAR's train.py, utils/arg_util.py,
utils/lr_control.py, utils/data.py [CODE S3]); §5 and DDO's VAR_sample.py for the FID protocol.

Units. `rounds.batch_size` is the global micro-batch (VAR's `args.bs` after parsing: 1024 / ac); the driver
runs one step per micro-batch and the optimizer steps every `optim.accumulate` of them
(ddo_jax/train/optim.py), so every step count below (rounds.images // rounds.batch_size, checkpoint.every,
selection.eval_every, optim.warmup_steps, optim.total_steps) is in micro-steps, as upstream's g_it.

Open questions, stated rather than hidden:
  * Which FID selected the checkpoint (guidance-free or guided) is not stated; both are evaluated and the
    guidance-free one ('fid_cfg1.0') selects. Switch with --config.selection.metric=fid_cfg1.5.
  * CFG convention (METHOD.md §3.3): the cfg values here are DDO's literal `--cfg` values (1.0 "guidance
    free", 1.5 guided); how they map to VAR's t = w * si / 9 ramp is unresolved; here w = cfg - 1
    (cfg_convention 'one_plus_w'; 'var' gives public VAR's w = cfg) for negatives and evaluation alike.
  * Upstream stops a round after ~101k real images (791 micro-steps for d16 = 98 optimizer steps + 7 micro-
    steps whose gradients are never applied); here a round is exactly 98 optimizer steps (100,352 images).
  * Upstream trains in fp16 autocast with a GradScaler; this port computes in float32 (model.compute_dtype).
  * The random crop of an image is a function of (seed, image index) here (redrawn per epoch upstream); a
    round reads 8% of ImageNet, so an image is rarely seen twice.
"""
import math

import ml_collections

IMAGENET_TRAIN = 1_281_167          # images in ImageNet-1k train (VAR's len(train_set))
EFFECTIVE_BATCH = 1024              # train_ddo.sh --bs=1024: real images per optimizer step (plus as many fakes)
OPTIMIZER_STEPS = 98                # METHOD.md §3.4: the run stops after ~101k real images = 98 optimizer steps
CHECKPOINT_EVERY = 4                # DDO_trainer.py save_freq = 4 optimizer steps
BASE_LR = 1e-6                      # train_ddo.sh --tblr=1e-6

# depth -> (gradient accumulation `--ac` in train_ddo.sh, VAR's width 64 * depth, heads = depth)
VARIANTS = {
    "d16": "VAR-d16 (var_d16.pth) on ImageNet-256: 2 rounds of 98 AdamW steps of 1024 real + 1024 online fakes",
    "d30": "VAR-d30 (var_d30.pth) on ImageNet-256: 2 rounds of 98 AdamW steps of 1024 real + 1024 online fakes",
    "tiny": "smoke run: a random depth-2 VAR and a random tiny VQVAE on SYNTHETIC 64x64 images, 2 rounds of 2 steps",
}
ACCUMULATE = {"d16": 8, "d30": 32, "tiny": 1}  # train_ddo.sh: d16 --ac=8, d30 --ac=32 (8 GPUs, 16 resp. 4 per GPU)

# VAR train.py's nowd_keys (filter_params also exempts every 1-D parameter and names ending in 'bias'; an
# embedding that matches none of these, like class_emb, IS decayed upstream).
NO_DECAY_KEYS = ("cls_token", "start_token", "task_token", "cfg_uncond", "pos_embed", "pos_1LC", "pos_start",
                 "start_pos", "lvl_embed", "gamma", "beta", "ada_gss", "moe_bias", "scale_mul")


def get_config(arg: str = "d16"):
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/var_imagenet256.py ({', '.join(VARIANTS)})")
  depth = 2 if arg == "tiny" else int(arg[1:])
  ac = ACCUMULATE[arg]
  micro = EFFECTIVE_BATCH // ac                       # 128 (d16), 32 (d30): VAR's args.bs = round(bs / ac)
  iters_per_epoch = math.ceil(IMAGENET_TRAIN / micro)  # 10010 (d16), 40037 (d30): VAR's iters_train, --ep=1

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "var"
  c.model = dict(
      depth=depth,                              # VAR-d16 / d30: width 64 * depth, heads = depth (ARCHITECTURES.md §4)
      patch_nums=(1, 2, 3, 4, 5, 6, 8, 10, 13, 16),   # 680 tokens (METHOD.md §3.1)
      num_classes=1000,
      vae_checkpoint="",                        # converted vae_ch160v4096z32.pth (launch.convert vqvae)
      uncond_ratio=0.5,                         # train_ddo.sh --uncond_ratio=0.5 (label dropout, METHOD.md §3.2)
      compute_dtype="float32",                  # upstream: fp16 autocast; float32 here for parity (issue 10 §5)
      # DDO_trainer.py samples negatives with cfg=1.0, which DDO calls guidance-free: read as w = cfg - 1 = 0
      # (cfg_convention "one_plus_w"; METHOD.md §3.3 recommendation), same labels as the real batch.
      negatives=dict(cfg=1.0, cfg_convention="one_plus_w", top_k=0, top_p=0.0, more_smooth=False),
      data=dict(source="tfds", split="train", data_dir="", path="",     # ddo_jax/data/imagenet.py
                resolution=256, resize=288,     # VAR utils/data.py: shorter side round(1.125 * 256), crop 256
                num_workers=0),                 # 0: min(16, cpu count) decode threads
      metric="fid_cfg1.0",
      eval=dict(cfg=(1.0, 1.5),                 # DDO_trainer.py: FID at cfg 1.0 and 1.5 for every checkpoint
                cfg_convention="one_plus_w",    # DDO's literal --cfg values: w = cfg - 1 (METHOD.md §3.3 warning)
                per_class=50,                   # 50 per class = 50k (VAR_sample.py)
                top_k=0, top_p=0.0,             # VAR_sample.py FID protocol
                inception="", ref_stats="",     # VIRTUAL_imagenet256_labeled.npz (OpenAI's reference batch)
                batch_size=200, sample_batch=200),   # Inception batch; sampler calls of the FID samples
  )
  c.mesh = dict(data=-1, fsdp=1)
  c.step_impl = "jit"
  # d16 (310M): data parallel; d30 (2.0B, ~32 GB of params + AdamW state + accumulator in float32): shard it,
  # with --config.mesh.fsdp=<devices per host>.
  c.sharding_rules = ((".*", "replicate"),) if depth <= 16 else ((".*", "fsdp"),)
  c.init = dict(kind="checkpoint", checkpoint="")   # converted var_d16.pth / var_d30.pth (launch.convert var)
  c.pretrain = dict(steps=1, batch_size=1, optim=dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                                                        warmup_steps=0, clip_norm=0.0))  # unused
  c.ddo = dict(alpha=50.0, beta=0.02)          # train_ddo.sh --alpha=50 --beta=0.02
  c.rounds = dict(num=2,                        # paper: "only finetune for 2 rounds" (METHOD.md §3.4)
                  images=OPTIMIZER_STEPS * EFFECTIVE_BATCH,   # 100,352 real images = 98 optimizer steps
                  batch_size=micro)
  c.negatives = dict(mode="online", num=0)      # sampled by the reference inside the loop (METHOD.md §3.3)
  c.sampling = dict(batch_size=200)             # FID sampling batch (upstream B=25 per GPU); divisible by 8
  c.optim = dict(
      name="adamw", b1=0.9, b2=0.95, eps=1e-8,  # VAR train.py: AdamW betas (0.9, 0.95), torch's eps
      lr=ac * BASE_LR * micro / 256,            # VAR arg_util: tlr = ac * tblr * bs / 256 = 4e-6 for both
      accumulate=ac,                            # micro-batch * ac = 1024 real (+ 1024 fake) per optimizer step
      decay="lin0",                             # VAR --sche default 'lin0' (utils/lr_control.py)
      warmup_steps=round(iters_per_epoch / 50),  # VAR arg_util wp = ep / 50: 200 (d16), 801 (d30) micro = 25 opt
      warmup_from=0.005,                        # VAR --wp0 default
      total_steps=iters_per_epoch,              # lin0's max_it = ep * iters_train with --ep=1
      end_ratio=0.1,                            # train_ddo.sh --wpe=0.1
      weight_decay=0.05,                        # VAR --twd = --twde = 0.05 (constant)
      no_decay_keys=NO_DECAY_KEYS,
      clip_norm=2.0, clip_eps=1e-6,             # VAR --tclip=2: torch clip_grad_norm_ (norm + 1e-6)
  )
  c.ema = {}                                    # no EMA in VAR DDO (METHOD.md §3.4)
  c.selection = dict(params="params", metric="fid_cfg1.0", choose="best",
                     eval_every=CHECKPOINT_EVERY * ac)        # every 4 optimizer steps (save_freq * ac)
  c.checkpoint = dict(every=CHECKPOINT_EVERY * ac, async_save=False)
  c.log_every = ac                              # once per optimizer step
  c.plot_samples = 16

  if arg == "tiny":
    # The architectures of the goldens' tiny VAR / VQVAE (written out here; configs never read goldens).
    c.model.update(embed_dim=64, num_heads=2, patch_nums=(1, 2, 3, 4), num_classes=10,
                   vae=dict(vocab_size=64, z_channels=8, ch=32, share_quant_resi=4),   # 64x64 images
                   data=dict(source="synthetic", num=64, resolution=64),
                   metric="nll", eval_batch=8)
    c.sharding_rules = ((".*", "replicate"),)
    c.init = dict(kind="random", checkpoint="")
    c.rounds = dict(num=2, images=2 * 4, batch_size=4)
    c.sampling = dict(batch_size=4)
    c.optim.update(lr=1e-3, accumulate=1, warmup_steps=1, total_steps=4)
    c.selection = dict(params="params", metric="nll", choose="best", eval_every=2)
    c.checkpoint = dict(every=2, async_save=False)
    c.log_every = 1
    c.plot_samples = 4
  return c
