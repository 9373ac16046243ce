"""DDO fine-tuning of EDM2-L on ImageNet 512x512 in the SD VAE's latent space (4x64x64), as in the paper's
ImageNet-512 runs.

Variants (`--config configs/edm2_img512.py:<variant>`):
  l         edm2-img512-l-1879048-0.085.pkl (EDM2-L, the FID-optimal post-hoc EMA, confirmed in NVlabs/DDO
            issue #2) -> DDO, 28 rounds of 6.4M images, FID selection of unguided samples
  l_guided  as `l`, but each checkpoint's FID is measured with autoguidance by EDM2-XS
            (edm2-img512-xs-0134217-0.165.pkl, converted, at model.eval.guide) at guidance 1.1, DDO's README
            protocol for its 1.21 "w/ G" figure; negatives stay unguided
  tiny      self-contained smoke run: the goldens' tiny 16x16x4 EDM2 Precond architecture (edm2/precond_latent),
            RANDOMLY INITIALISED (init.kind='random'), on SYNTHETIC VAE moments (data.source='synthetic', not
            ImageNet latents); 2 rounds, no download, no checkpoint; metric 'denoise_loss'. With
            --config.model.data.source=synthetic_images --config.model.vae=<tiny VAE> it runs through a VAE
            instead (the suite does, with the goldens' tiny SD VAE).

The `l` variants need a converted EDM2 checkpoint (init.checkpoint: `python -m launch.convert edm2 --src
edm2-img512-l-1879048-0.085.pkl --out <dir>`), the SD VAE (model.vae: the stabilityai/sd-vae-ft-mse diffusers
folder, or that folder converted by `python -m launch.convert sd-vae`), and ImageNet, one of:
  * EDM2's latent zip (default; model.data.source='edm2_zip', model.data.path=img512-sd.zip: 8-channel mean/std
    .npy per image plus dataset.json labels, made with EDM2's dataset_tool.py convert + encode; read lazily);
  * `tfds.data_source('imagenet2012')` (model.data.source='tfds', model.data.data_dir) or the extracted train
    folder (model.data.source='folder', model.data.path): center-cropped to 512 as dataset_tool does and
    encoded by model.vae on the fly (one VAE encoder pass per real image; the zip avoids that cost).
A missing dataset or VAE stops the run at start with one line saying how to prepare it. FID (the round metric)
decodes the samples with model.vae and needs model.eval.inception (pytorch-fid's
pt_inception-2015-12-05-6726825d.pth) and model.eval.ref_stats (EDM2's
https://nvlabs-fi-cdn.nvidia.com/edm2/dataset-refs/img512.pkl); each scored image is the one `launch.sample
--seeds 0-49999` makes from the saved round with the same sampler, guide and guidance.

Sources: METHOD.md §2.2, §2.5, §4.1, §5; ARCHITECTURES.md §3.1, §3.7. [3P] marks third-party transcriptions
of the paper's appendix (S7).

Real latents are sampled from the stored VAE posterior every batch, (mean + std * n) * scale + bias with
EDM2's StabilityVAEEncoder statistics (raw_mean [5.81, 3.25, 0.12, -2.15], raw_std [4.17, 4.62, 3.71, 3.28],
final std 0.5); negatives are the reference's latents as sampled (whether the paper decoded and re-encoded
them is unknown, METHOD.md §2.3).

Open questions, stated rather than hidden:
  * alpha, beta: swept per round; alpha = 4, beta = 0.02 for every round here.
  * P_mean -0.4 is EDM2 img512's pretraining value; P_std 1.6, not img512's 1.0, because S7 [3P] reports
    "EDM2-L: 1.6 -> 2.0 -> 3.0" over the rounds (METHOD.md §2.2 item 5); the later widening is not expressed.
  * LR for EDM2-L is unknown; we use EDM2-S's 5e-5 [3P]. Batch 512 is unconfirmed for EDM2-L.
  * LR schedule as configs/edm2_img64.py: warm-up then inverse-sqrt decay with ref = round_steps / 6.25, so
    the rate ends a round at 0.4x of its peak [3P]; warm-up length = ref (an assumption).
  * Adam betas (0.9, 0.99), eps 1e-8 (EDM2's), presumed. EMA: power function, sigma_rel 0.05 [3P].
  * Negatives: offline 50k per round, unguided Heun 32 steps (63 NFE), class-balanced labels.
"""
import ml_collections

from ddo_jax.convert.edm2_names import config_from_init_kwargs

# EDM2-L img512 constructor kwargs (ARCHITECTURES.md §3.1); dropout 0.1 in pretraining, 0 for DDO.
L_NET = dict(img_resolution=64, img_channels=4, label_dim=1000, use_fp16=False, model_channels=320,
             channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[16, 8], dropout=0.0)
# The goldens' tiny latent EDM2 net (shared/goldens/edm2/precond_latent/config.json init_kwargs).
TINY_NET = dict(img_resolution=16, img_channels=4, label_dim=10, use_fp16=False, sigma_data=0.5,
                logvar_channels=128, model_channels=32, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8],
                channels_per_head=32, dropout=0.0)
# EDM2's StabilityVAEEncoder defaults (METHOD.md §2.5; NVlabs/edm2 training/encoders.py).
STABILITY = dict(raw_mean=[5.81, 3.25, 0.12, -2.15], raw_std=[4.17, 4.62, 3.71, 3.28], final_mean=0.0,
                 final_std=0.5)

VARIANTS = {
    "l": "EDM2-L ImageNet-512 latents (edm2-img512-l-1879048-0.085.pkl), 28 rounds",
    "l_guided": "as l, FID selection with EDM2-XS autoguidance at 1.1 (model.eval.guide)",
    "tiny": "self-contained smoke run: random tiny latent EDM2 net on SYNTHETIC latents, 2 rounds",
}


# DDO's README: `--gnet=edm2-img512-xs-0134217-0.165.pkl --guidance=1.1` (METHOD.md §5).
GUIDE_PICKLE = "edm2-img512-xs-0134217-0.165.pkl"
GUIDANCE = 1.1


def get_config(arg: str = "l"):
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/edm2_img512.py ({', '.join(VARIANTS)})")
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.family = "edm2"
  c.model = dict(
      net=config_from_init_kwargs(TINY_NET if arg == "tiny" else L_NET, "Precond"),
      space="latent",
      latent=STABILITY,
      P_mean=-0.4, P_std=1.6,                   # see open questions
      labels="balanced",
      sampler=dict(num_steps=32, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0),  # 63 NFE
      data=dict(source="edm2_zip", path="", num=0, split="train", data_dir="", num_workers=0),
      vae="",                                   # SD VAE folder (diffusers or launch.convert sd-vae)
      compute_dtype="float32",                  # or 'bfloat16' (Blocks in bf16; see benchmarks/edm2_bench.py)
      remat=False,                              # True: rematerialize each Block in the backward pass
      metric="fid",
      eval_batch=256,
      # FID: 50k samples, seeds 0..49999, class = seed mod 1000 (EDM2_sample.py), decoded by model.vae.
      eval=dict(inception="", ref_stats="", num_samples=50_000, batch_size=500, guide="", guidance=1.0),
  )
  c.mesh = dict(data=-1, fsdp=1)
  c.step_impl = "jit"
  c.sharding_rules = ((".*", "replicate"),)      # 777M parameters: consider --config.mesh.fsdp and 'fsdp' rules
  c.init = dict(kind="checkpoint", checkpoint="")
  c.pretrain = dict(steps=1, batch_size=1, optim=dict(name="adam", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8,
                                                        warmup_steps=0, clip_norm=0.0))  # unused
  c.ddo = dict(alpha=4.0, beta=0.02)
  c.rounds = dict(num=28, images=6_400_000, batch_size=512)
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

  if arg == "l_guided":
    c.model.eval.guidance = GUIDANCE           # model.eval.guide: the converted GUIDE_PICKLE folder (required)

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
