"""Diffusion pieces on the toy: the EDM-style log-ratio, the Heun sampler, the negative store."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import toy_diffusion
from ddo_jax import families, parallel
from ddo_jax.data import negatives
from ddo_jax.families import diffusion
from ddo_jax.sampling import heun, seeded


def _family():
  return families.make(toy_diffusion.get_config("tiny"))


def test_log_ratio_shares_sigma_and_noise_and_stops_reference_gradient():
  fam = _family()
  params = fam.init_params(jax.random.key(0))
  ref = jax.tree_util.tree_map(lambda p: p * 0.9, params)
  rng = np.random.default_rng(0)
  xr, xf = (jnp.asarray(rng.normal(size=(6, 2)), jnp.float32) for _ in range(2))
  sigma, eps = diffusion.draw_sigma_and_noise(jax.random.key(3), xr.shape, P_mean=-1.2, P_std=1.2)
  gr, gf = diffusion.edm_log_ratio_given_noise(fam.denoise, params, ref, xr, xf, sigma, eps,
                                               sigma_data=fam.sigma_data)
  # Plain per-sample recomputation: one sigma_i and one noise_i for real i, fake i, theta and ref.
  w = (sigma ** 2 + fam.sigma_data ** 2) / (sigma * fam.sigma_data) ** 2
  n = sigma[:, None] * eps

  def logp(p, x):
    return -w * jnp.sum((fam.denoise(p, x + n, sigma) - x) ** 2, axis=1)

  np.testing.assert_allclose(gr, logp(params, xr) - logp(ref, xr), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gf, logp(params, xf) - logp(ref, xf), rtol=1e-5, atol=1e-6)
  # Gaps vanish at theta == ref, and no gradient flows into the reference parameters.
  g0 = diffusion.edm_log_ratio_given_noise(fam.denoise, params, params, xr, xf, sigma, eps,
                                           sigma_data=fam.sigma_data)
  assert float(jnp.abs(g0[0]).max()) == 0.0 and float(jnp.abs(g0[1]).max()) == 0.0
  ref_grad = jax.grad(lambda r: jnp.sum(diffusion.edm_log_ratio_given_noise(
      fam.denoise, params, r, xr, xf, sigma, eps, sigma_data=fam.sigma_data)[0]))(ref)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(ref_grad))


def _numpy_heun(x, denoise, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
  """EDM's Algorithm 2 (no churn) written plainly in float64 numpy."""
  i = np.arange(num_steps)
  t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
  t = np.append(t, 0.0)
  x = x * t[0]
  for k in range(num_steps):
    d = (x - denoise(x, t[k])) / t[k]
    x_next = x + (t[k + 1] - t[k]) * d
    if k < num_steps - 1:
      d2 = (x_next - denoise(x_next, t[k + 1])) / t[k + 1]
      x_next = x + (t[k + 1] - t[k]) * (0.5 * d + 0.5 * d2)
    x = x_next
  return x


def test_heun_sampler_with_exact_gaussian_denoiser():
  """Data N(0, s^2): the ideal denoiser is x s^2/(s^2+sigma^2) and the ODE maps x_T to x_T s/sqrt(s^2+T^2)."""
  s = 0.7
  np_denoise = lambda x, sigma: x * s ** 2 / (s ** 2 + sigma ** 2)
  denoise = lambda x, sigma, labels: x * s ** 2 / (s ** 2 + sigma[:, None] ** 2)
  latents = jax.random.normal(jax.random.key(0), (512, 2))
  for steps in (18, 256):
    x = jax.jit(functools.partial(heun.heun_sample, denoise, num_steps=steps))(latents)
    # Step by step the same scheme as a plain float64 implementation (float32 rounding only) ...
    np.testing.assert_allclose(x, _numpy_heun(np.asarray(latents, np.float64), np_denoise, steps), rtol=2e-5,
                               atol=1e-6)
  # ... and converging to the exact ODE solution (Heun's error at 18 steps is ~5% here, at 256 steps < 0.1%).
  exact = np.asarray(latents) * 80.0 * s / np.sqrt(s ** 2 + 80.0 ** 2)
  np.testing.assert_allclose(x, exact, rtol=1e-3, atol=1e-4)
  t = heun.edm_sigma_steps(18)
  assert t.shape == (19,) and float(t[-1]) == 0.0
  np.testing.assert_allclose([float(t[0]), float(t[-2])], [80.0, 0.002], rtol=1e-6)


def test_heun_trajectory_and_compile_size_independent_of_steps():
  denoise = lambda x, sigma, labels: 0.5 * x
  lat = jnp.ones((2, 3))
  x, traj = heun.heun_sample(denoise, lat, num_steps=5, return_trajectory=True)
  assert traj["x_states"].shape == (6, 2, 3) and traj["x_euler"].shape == (4, 2, 3)
  np.testing.assert_array_equal(traj["x_states"][-1], x)
  j5 = jax.jit(functools.partial(heun.heun_sample, denoise, num_steps=5)).lower(lat).as_text()
  j50 = jax.jit(functools.partial(heun.heun_sample, denoise, num_steps=50)).lower(lat).as_text()
  assert abs(len(j5) - len(j50)) < 200          # a scan: the program does not unroll the steps


def test_negative_store_is_independent_of_device_count_and_resumable(tmp_path):
  fam = _family()
  params = fam.init_params(jax.random.key(0))
  outs = []
  for devices, chunk in ((jax.devices()[:1], 64), (jax.devices(), 128)):
    mesh = parallel.make_mesh(devices=devices)
    fn = seeded.make_seeded_sampler(fam.sample, mesh, parallel.replicated(mesh))
    d = tmp_path / f"store_{len(devices)}"
    negatives.generate(fn, params, num=256, chunk_size=chunk, directory=d, seed=5, mesh=mesh)
    outs.append((negatives.load(d)["x"], d, fn, mesh, chunk))
  # Sample s comes from fold_in(key(seed), s): the same samples whatever the chunking or devices.
  np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-6, atol=1e-6)
  # Interrupted store: no manifest, one chunk missing -> regenerated identically.
  x, d, fn, mesh, chunk = outs[1]
  (d / "manifest.json").unlink()
  (d / "chunk_00001.npz").unlink()
  assert not negatives.is_complete(d)
  negatives.generate(fn, params, num=256, chunk_size=chunk, directory=d, seed=5, mesh=mesh)
  np.testing.assert_array_equal(negatives.load(d)["x"], x)
  assert not list(d.glob(".*tmp"))


def test_online_negatives_mode_runs(tmp_path):
  from ddo_jax.train import rounds
  config = toy_diffusion.get_config("tiny")
  config.negatives.mode = "online"
  config.rounds.num = 1
  config.pretrain.steps = 20
  summaries = rounds.train(config, tmp_path)
  assert len(summaries) == 2 and not (tmp_path / "round_001" / "negatives").exists()
  assert summaries[1]["step_compilations"] == 1
