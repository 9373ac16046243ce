"""The model-agnostic DDO objective."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax import objective


@pytest.mark.parametrize("alpha,beta", [(1.0, 1.0), (4.0, 0.02), (50.0, 0.1), (0.5, 3.0)])
def test_loss_at_reference_is_one_plus_alpha_log2(alpha, beta):
  # float32: log_sigmoid(0) = -log1p(exp(0)) rounded by XLA's kernels (~1-2 ulp), then the means, the
  # alpha product and the sum (one rounding each): up to ~5 ulp on a CPU whose log1p is less exact
  # (measured 2 ulp here), so 8 ulp, eps = 1.2e-7.
  zeros = jnp.zeros([16])
  loss, m = objective.ddo_loss(zeros, zeros, alpha=alpha, beta=beta)
  np.testing.assert_allclose(float(loss), (1 + alpha) * math.log(2), rtol=8 * np.finfo(np.float32).eps)
  assert float(m["d_real"]) == 0.5 and float(m["d_fake"]) == 0.5
  # float64: exact to double rounding.
  with jax.enable_x64(True):
    z64 = jnp.zeros([16], jnp.float64)
    loss64, _ = objective.ddo_loss(z64, z64, alpha=alpha, beta=beta)
    assert loss64.dtype == jnp.float64
    np.testing.assert_allclose(float(loss64), (1 + alpha) * math.log(2), rtol=1e-15)


def test_matches_plain_formula_and_diagnostics():
  rng = np.random.default_rng(0)
  gr, gf = rng.normal(size=32) * 20, rng.normal(size=32) * 20
  alpha, beta = 3.0, 0.05
  loss, m = objective.ddo_loss(jnp.asarray(gr), jnp.asarray(gf), alpha=alpha, beta=beta)
  sig = lambda z: 1 / (1 + np.exp(-z))
  expected = np.mean(-np.log(sig(beta * gr)) - alpha * np.log(1 - sig(beta * gf)))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  np.testing.assert_allclose(float(m["gap_real"]), gr.mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["d_fake"]), sig(beta * gf).mean(), rtol=1e-6)
  np.testing.assert_allclose(float(m["acc_real"]), np.mean(gr > 0))
  np.testing.assert_allclose(float(m["acc_fake"]), np.mean(gf < 0))
  np.testing.assert_allclose(float(m["loss_real"] + m["loss_fake"]), float(loss), rtol=1e-6)


def test_stable_for_huge_gaps():
  g = jnp.asarray([-1e5, -1e3, 0.0, 1e3, 1e5])
  loss, grads = jax.value_and_grad(
      lambda a, b: objective.ddo_loss(a, b, alpha=2.0, beta=1.0)[0], argnums=(0, 1))(g, g)
  assert np.isfinite(float(loss))
  assert all(np.all(np.isfinite(np.asarray(x))) for x in grads)
  # -log sigmoid(1e5) = 0 and -log sigmoid(-1e5) = 1e5 exactly in the limit.
  np.testing.assert_allclose(float(loss), (1e5 + 1e3 + math.log(2) + 2 * (math.log(2) + 1e3 + 1e5)) / 5, rtol=1e-6)


def test_gradient_is_discriminator_weighted():
  """d loss / d gap_real = -beta (1 - d) / N and d loss / d gap_fake = alpha beta d / N (Eq. 10)."""
  gr, gf = jnp.asarray([0.3, -2.0, 5.0]), jnp.asarray([1.0, -0.5, 0.0])
  alpha, beta = 2.0, 0.7
  grad = jax.grad(lambda a, b: objective.ddo_loss(a, b, alpha=alpha, beta=beta)[0], argnums=(0, 1))
  # The formula, exactly (float64).
  with jax.enable_x64(True):
    g64, f64 = jnp.asarray(gr, jnp.float64), jnp.asarray(gf, jnp.float64)
    dr, df = grad(g64, f64)
    np.testing.assert_allclose(dr, -beta * (1 - jax.nn.sigmoid(beta * g64)) / 3, rtol=1e-13)
    np.testing.assert_allclose(df, alpha * beta * jax.nn.sigmoid(beta * f64) / 3, rtol=1e-13)
  # float32: autodiff through log_sigmoid and the closed form each take ~6 rounded ops (exp, log1p,
  # sigmoid, products, the mean's divide), so they agree to a few ulp each (measured 6 ulp): 16 ulp.
  dr, df = grad(gr, gf)
  tol = 16 * np.finfo(np.float32).eps
  np.testing.assert_allclose(dr, -beta * (1 - jax.nn.sigmoid(beta * gr)) / 3, rtol=tol)
  np.testing.assert_allclose(df, alpha * beta * jax.nn.sigmoid(beta * gf) / 3, rtol=tol)


def test_var_variant_weights():
  mask = jnp.asarray([False, True, False, True])
  alpha = 50.0
  w_r, w_f, norm = objective.var_weights(alpha, mask)
  np.testing.assert_array_equal(w_r, [1, 50, 1, 50])
  np.testing.assert_array_equal(w_f, [50, 0, 50, 0])
  assert norm == 50.0
  zeros = jnp.zeros([4])
  loss, _ = objective.ddo_loss(zeros, zeros, alpha=alpha, beta=0.02, weight_real=w_r, weight_fake=w_f,
                               normalizer=norm)
  expected = (np.mean([1, 50, 1, 50]) + np.mean([50, 0, 50, 0])) * math.log(2) / 50
  # float32: log 2 rounded, two weighted means, a sum and a divide: a few ulp (1e-7 is under one ulp).
  np.testing.assert_allclose(float(loss), expected, rtol=4 * np.finfo(np.float32).eps)


def test_rejects_non_vector_gaps():
  with pytest.raises(ValueError, match="per-sample vectors"):
    objective.ddo_loss(jnp.zeros([2, 3]), jnp.zeros([2, 3]), alpha=1.0, beta=1.0)
