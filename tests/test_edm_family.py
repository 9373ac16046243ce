"""DDO for EDM against the PyTorch goldens: the loss (goldens/ddo/edm_loss) and Heun (goldens/edm/heun_sampler)."""
import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ddo_jax import objective
from ddo_jax.convert import edm_names
from ddo_jax.families import diffusion
from ddo_jax.families.edm import EDM
from ddo_jax.sampling import heun
from tests.goldens import load_json, load_npz


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  return np.asarray(a).transpose(0, 3, 1, 2)


@pytest.fixture(scope="module")
def setup():
  meta = load_json("edm", "ddpmpp_cond", "config.json")
  net = edm_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
  cfg = ml_collections.ConfigDict(dict(
      net=net, P_mean=-1.2, P_std=1.2, labels="random", metric="denoise_loss",
      sampler=dict(num_steps=6, sigma_min=0.002, sigma_max=80.0, rho=7.0, S_churn=0.0)))
  family = EDM(cfg)
  ref = edm_names.torch_to_flax(load_npz("edm", "ddpmpp_cond", "state.npz"), net)
  theta = edm_names.torch_to_flax(load_npz("ddo", "edm_loss", "target_state.npz"), net)
  return family, net, ref, theta


def _loss_and_gaps(family, theta, ref, io, alpha, beta):
  gr, gf = diffusion.edm_log_ratio_given_noise(
      family.denoise, theta, ref, _nhwc(io["x_real"]), _nhwc(io["x_fake"]), jnp.asarray(io["sigma"]),
      _nhwc(io["eps"]), labels_real=jnp.asarray(io["class_labels_real"]),
      labels_fake=jnp.asarray(io["class_labels_fake"]), sigma_data=0.5)
  loss, _ = objective.ddo_loss(gr, gf, alpha=alpha, beta=beta)
  return loss, (gr, gf)


def test_ddo_edm_loss_gaps_and_gradients_match_goldens(setup):
  family, net, ref, theta = setup
  io = load_npz("ddo", "edm_loss", "io.npz")
  hyper = load_json("ddo", "edm_loss", "config.json")["hyper"]
  alpha, beta = hyper["alpha"], hyper["beta"]
  (loss, (gr, gf)), grads = jax.value_and_grad(
      lambda t: _loss_and_gaps(family, t, ref, io, alpha, beta), has_aux=True)(theta)
  # The per-sample log-likelihoods (sums of 768 weighted terms, |logp| ~ 1400) to 1e-5 relative.
  x = jnp.concatenate([_nhwc(io["x_real"]), _nhwc(io["x_fake"])])
  noise = jnp.concatenate([_nhwc(io["noise"])] * 2)
  sigma = jnp.concatenate([jnp.asarray(io["sigma"])] * 2)
  labels = jnp.concatenate([jnp.asarray(io["class_labels_real"]), jnp.asarray(io["class_labels_fake"])])
  logp_theta = diffusion.weighted_logp(family.denoise, theta, x, noise, sigma, labels, 0.5)
  want = np.concatenate([io["logp_theta_real"], io["logp_theta_fake"]])
  rel_logp = np.max(np.abs(np.asarray(logp_theta) - want) / np.abs(want))
  assert rel_logp < 1e-5, rel_logp
  # Gaps are differences of two such sums: their float32 rounding is set by |logp| (torch itself moves
  # them by 3.7e-4 across CPU kernels, goldens README); 1e-3 absolute is ~1e-6 of |logp|.
  gap_err = max(np.max(np.abs(np.asarray(gr) - io["gap_real"])), np.max(np.abs(np.asarray(gf) - io["gap_fake"])))
  assert gap_err < 1e-3, gap_err
  loss_rel = abs(float(loss) - float(io["loss"])) / abs(float(io["loss"]))
  assert loss_rel < 1e-5, loss_rel
  # Every parameter's gradient, in torch names, to 1e-5 of that tensor's largest gradient entry.
  torch_grads = edm_names.flax_to_torch(jax.tree_util.tree_map(np.asarray, grads), net)
  golden = load_npz("ddo", "edm_loss", "grads.npz")
  worst = 0.0
  for k, g in golden.items():
    got = torch_grads[k]
    if not np.any(g):
      assert not np.any(got), k             # map_augment: exactly zero, no augment labels passed
      continue
    worst = max(worst, float(np.max(np.abs(got - g)) / np.max(np.abs(g))))
  print(f"DDO-EDM parity: logp rel {rel_logp:.1e}, gaps abs {gap_err:.1e}, loss rel {loss_rel:.1e}, "
        f"worst per-tensor grad rel {worst:.1e}")
  assert worst < 1e-5, worst
  assert set(golden) == {k for k in torch_grads if not k.endswith("resample_filter")}


def test_loss_at_reference(setup):
  family, _, ref, _ = setup
  io = load_npz("ddo", "edm_loss", "io.npz")
  loss, (gr, gf) = _loss_and_gaps(family, ref, ref, io, 4.0, 0.02)
  assert float(jnp.abs(gr).max()) == 0.0 and float(jnp.abs(gf).max()) == 0.0
  np.testing.assert_allclose(float(loss), 5 * math.log(2), rtol=3e-7)
  np.testing.assert_allclose(float(loss), float(io["loss_at_ref"]), rtol=3e-7)


def test_heun_sampler_matches_goldens_step_by_step(setup):
  family, _, ref, _ = setup
  io = load_npz("edm", "heun_sampler", "io.npz")
  kw = load_json("edm", "heun_sampler", "config.json")["sampler_kwargs"]
  labels = jnp.asarray(io["class_labels"])
  with jax.enable_x64(True):   # EDM's protocol: float64 sampler arithmetic around the float32 net
    latents = _nhwc(io["latents"]).astype(jnp.float64)
    x, traj = jax.jit(lambda z: heun.heun_sample(
        lambda x, s, l: family.denoise(ref, x, s, l), z, labels, num_steps=kw["num_steps"],
        sigma_min=kw["sigma_min"], sigma_max=kw["sigma_max"], rho=kw["rho"], return_trajectory=True))(latents)
    traj = jax.tree_util.tree_map(np.asarray, traj)
  assert traj["x_states"].dtype == np.float64
  # t_i = (s_max^(1/rho) + i/(N-1) (s_min^(1/rho) - s_max^(1/rho)))^rho in float64 here and in torch: each
  # pow and the affine step round to ~1 ulp, and the outer ^rho multiplies the base's relative error by rho,
  # so the two libm's agree to a few rho ulp (measured 0.8e-15), not to 1e-15 on every CPU.
  np.testing.assert_allclose(traj["t_steps"], io["t_steps"], rtol=4 * kw["rho"] * np.finfo(np.float64).eps)
  err_states = np.abs(_nchw(traj["x_states"].reshape((-1,) + traj["x_states"].shape[2:])).reshape(io["x_states"].shape)
                      - io["x_states"])
  # Order of the stored denoiser calls: step i's first call at 2i, its correction at 2i+1.
  d = []
  for i in range(kw["num_steps"]):
    d.append(traj["denoised_first"][i])
    if i < kw["num_steps"] - 1:
      d.append(traj["denoised_second"][i])
  d = np.stack([_nchw(v) for v in d])
  err_d = np.abs(d - io["denoiser_D"])
  err_euler = np.abs(np.stack([_nchw(v) for v in traj["x_euler"]]) - io["x_euler"])
  print(f"Heun parity: states {err_states.max():.1e}, euler {err_euler.max():.1e}, D {err_d.max():.1e}")
  # The net runs in float32 (|D| up to ~5); everything else is float64.
  assert err_d.max() < 1e-5 and err_euler.max() < 1e-5 and err_states.max() < 1e-5
  np.testing.assert_array_equal(_nchw(np.asarray(x)), _nchw(traj["x_states"][-1]))


def test_labels_random_or_balanced(setup):
  family, net, ref, _ = setup
  keys = jax.random.split(jax.random.key(0), 20)
  seeds = jnp.arange(20, dtype=jnp.int32)
  family.config.labels = "balanced"
  lab = family.labels_for(keys, seeds)
  np.testing.assert_array_equal(np.argmax(lab, 1), np.arange(20) % 10)
  family.config.labels = "random"
  lab = family.labels_for(keys, seeds)
  assert lab.shape == (20, 10) and len(set(np.argmax(lab, 1).tolist())) > 3
  # Per-seed determinism: a key gives the same label alone or in a batch.
  np.testing.assert_array_equal(family.labels_for(keys[3:4], seeds[3:4]), lab[3:4])


def test_unconditional_net_ignores_dataset_labels():
  """tfds CIFAR-10 always carries labels; an unconditional EDM must ignore them (fakes have none)."""
  meta = load_json("edm", "ddpmpp_uncond", "config.json")
  net = edm_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
  state = {k: v for k, v in load_npz("edm", "ddpmpp_cond", "state.npz").items()
           if k not in meta["weights"].get("exclude_keys", [])}
  params = edm_names.torch_to_flax(state, net)
  family = EDM(ml_collections.ConfigDict(dict(net=net, P_mean=-1.2, P_std=1.2, labels="random",
                                              metric="denoise_loss", sampler=dict(num_steps=4))))
  x = jnp.zeros((2, 16, 16, 3))
  batch = {"real": {"x": x, "label": jnp.eye(10)[:2]}, "fake": {"x": x + 0.1}}
  gr, gf = family.log_ratio(params, params, batch, jax.random.key(0))
  assert float(jnp.abs(gr).max()) == 0.0 and gf.shape == (2,)


def test_converted_checkpoint_must_match_the_config(setup, tmp_path):
  family, net, _, _ = setup
  other = json.loads(json.dumps(net, default=list))
  other["model_kwargs"]["model_channels"] = 64
  other["model_kwargs"]["dropout"] = 0.13            # dropout may differ (DDO turns it off)
  (tmp_path / "model.json").write_text(json.dumps({"family": "edm", "net": other}))
  with pytest.raises(ValueError, match=r"model_kwargs.model_channels: config 32 vs checkpoint 64"):
    family.check_converted(tmp_path / "model.json")
  other["model_kwargs"]["model_channels"] = 32
  (tmp_path / "model.json").write_text(json.dumps({"family": "edm", "net": other}))
  family.check_converted(tmp_path / "model.json")
  (tmp_path / "model.json").write_text(json.dumps({"family": "var", "net": other}))
  with pytest.raises(ValueError, match="not an EDM one"):
    family.check_converted(tmp_path / "model.json")
