"""FID / IS / precision-recall, streaming float64 statistics (1 vs 8 devices), reference readers."""
import os
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from ddo_jax.metrics import fid as fid_lib
from ddo_jax.metrics import reference_stats as refs
from ddo_jax.metrics import stats as stats_lib

# --------------------------------------------------------------------------- FID


def _random_cov(rng, d, n_samples=None):
  n_samples = n_samples or 3 * d
  a = rng.normal(size=(n_samples, d)) * rng.uniform(0.2, 2.0, size=d)
  return np.cov(a, rowvar=False)


def _fid_by_eigenvalues(mu1, s1, mu2, s2):
  """Independent FID: tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), via symmetric eigh."""
  w, v = np.linalg.eigh(s1)
  root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  m = root1 @ s2 @ root1
  eig = np.linalg.eigvalsh((m + m.T) / 2)
  tr_sqrt = np.sum(np.sqrt(np.clip(eig, 0, None)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


@pytest.mark.parametrize("d", [4, 64])
def test_fid_matches_independent_computation(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  got = fid_lib.frechet_distance(mu1, s1, mu2, s2)
  want = _fid_by_eigenvalues(mu1, s1, mu2, s2)
  assert abs(got - want) <= 1e-6 * max(1.0, abs(want)), (got, want)
  assert fid_lib.fid_from_stats((mu1, s1), (mu2, s2)) == got


def test_fid_closed_forms():
  rng = np.random.default_rng(0)
  d = 16
  mu, s = rng.normal(size=d), _random_cov(rng, d)
  assert abs(fid_lib.frechet_distance(mu, s, mu, s)) < 1e-8
  # Diagonal covariances: FID = |dmu|^2 + sum (sqrt(a) - sqrt(b))^2.
  a, b = rng.uniform(0.5, 2, size=d), rng.uniform(0.5, 2, size=d)
  dmu = rng.normal(size=d)
  want = dmu @ dmu + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid_lib.frechet_distance(dmu, np.diag(a), np.zeros(d), np.diag(b))
  assert abs(got - want) <= 1e-10


def test_fid_singular_covariances_are_handled():
  # Rank-deficient covariances (fewer samples than dimensions), as with tiny sample sets.
  rng = np.random.default_rng(3)
  d = 32
  x, y = rng.normal(size=(8, d)), rng.normal(size=(8, d)) + 0.5
  mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  got = fid_lib.frechet_distance(mu1, s1, mu2, s2)
  assert np.isfinite(got)
  assert abs(got - _fid_by_eigenvalues(mu1, s1, mu2, s2)) < 1e-3
  with pytest.raises(ValueError, match="shape"):
    fid_lib.frechet_distance(mu1, s1, mu2[:3], s2[:3, :3])


def _fid_by_scipy_sqrtm(mu1, s1, mu2, s2):
  """The formula of EDM fid.py / pytorch-fid (this module's implementation before the eigenvalue one)."""
  covmean = scipy.linalg.sqrtm(s1 @ s2)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean).real)


def test_fid_equals_the_sqrtm_formula_on_full_rank_covariances():
  # Random full-rank covariances with spread-out spectra (like Inception features); the eigenvalue
  # computation must give the sqrtm formula's number to float64 rounding, far below 1e-6 relative.
  rng = np.random.default_rng(7)
  d = 256
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.1
  s1 = _random_cov(rng, d)
  s2 = _random_cov(rng, d) + 0.5 * s1
  got = fid_lib.frechet_distance(mu1, s1, mu2, s2)
  want = _fid_by_scipy_sqrtm(mu1, s1, mu2, s2)
  print(f"FID {got:.10g} vs sqrtm formula {want:.10g}: relative difference {abs(got - want) / abs(want):.2g}")
  assert abs(got - want) <= 1e-6 * abs(want)
  # The trace term alone (the part that changed), relative to itself.
  tr = fid_lib.trace_sqrt_product(s1, s2)
  tr_want = np.trace(scipy.linalg.sqrtm(s1 @ s2)).real
  assert abs(tr - tr_want) <= 1e-9 * tr_want


def test_fid_record_warns_on_rank_deficient_covariances():
  rng = np.random.default_rng(5)
  d = 16
  few = rng.normal(size=(d, d))            # d samples: rank d - 1 < d
  stats = (few.mean(0), np.cov(few, rowvar=False))
  record = fid_lib.fid_record(stats, stats, num_images=d)
  assert record["fid"] >= 0.0 and record["fid"] < 1e-9
  assert "not meaningful" in record["fid_warning"] and f"rank at most {d - 1}" in record["fid_warning"]
  assert fid_lib.fid_warning(d, d) is not None and fid_lib.fid_warning(d + 1, d) is None
  many = rng.normal(size=(4 * d, d))
  stats2 = (many.mean(0), np.cov(many, rowvar=False))
  record = fid_lib.fid_record(stats2, stats, num_images=4 * d)
  assert set(record) == {"fid"} and record["fid"] == fid_lib.fid_from_stats(stats2, stats)


# --------------------------------------------------------------------------- Inception Score


def _is_plain(logits, splits):
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  scores = []
  n = len(p)
  for k in range(splits):
    part = p[k * n // splits:(k + 1) * n // splits]
    py = part.mean(0, keepdims=True)
    scores.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
  return np.mean(scores), np.std(scores)


def test_inception_score_known_answers():
  n, c = 200, 1008
  # Identical predictions: p(y|x) = p(y) -> IS = 1.
  mean, std = fid_lib.inception_score(np.random.default_rng(0).normal(size=(1, c)).repeat(n, 0))
  assert abs(mean - 1.0) < 1e-12 and std < 1e-12
  # Confident, balanced over 20 classes in every split -> IS = 20 (up to the tiny softmax tails).
  labels = np.tile(np.arange(20), n // 20)
  logits = np.full((n, c), -1e4)
  logits[np.arange(n), labels] = 0.0
  mean, std = fid_lib.inception_score(logits)
  assert abs(mean - 20.0) < 1e-9 and std < 1e-9


def test_inception_score_matches_plain_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(1000, 1008)) * 3
  got = fid_lib.inception_score(logits.astype(np.float32), num_splits=10)
  want = _is_plain(logits.astype(np.float32).astype(np.float64), 10)
  np.testing.assert_allclose(got, want, rtol=1e-10)
  with pytest.raises(ValueError):
    fid_lib.inception_score(logits[:5], num_splits=10)


# --------------------------------------------------------------------------- precision / recall


def _pr_brute_force(ref, gen, k=3):
  def sq(a, b):
    return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
  r_gen = np.sort(sq(gen, gen), axis=1)[:, k]
  d = sq(gen, ref)
  precision = np.mean(np.any(d <= r_ref[None, :], axis=1))
  recall = np.mean(np.any(d <= r_gen[:, None], axis=0))
  return precision, recall


def test_precision_recall_identical_and_disjoint_sets():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 8)).astype(np.float32)
  assert fid_lib.precision_recall(x, x) == (1.0, 1.0)
  far = x + 1000.0
  assert fid_lib.precision_recall(x, far) == (0.0, 0.0)


def test_precision_recall_half_overlap():
  rng = np.random.default_rng(1)
  ref = rng.normal(size=(40, 6)).astype(np.float32)
  gen = np.concatenate([ref[:20] + 1e-3, 500.0 + rng.normal(size=(20, 6))]).astype(np.float32)
  precision, recall = fid_lib.precision_recall(ref, gen)
  assert precision == 0.5  # the far half is outside every reference ball
  assert recall == pytest.approx(_pr_brute_force(ref.astype(np.float64),
                                                 gen.astype(np.float64))[1])


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
def test_precision_recall_matches_brute_force_with_blocks(dtype):
  rng = np.random.default_rng(2)
  ref = rng.normal(size=(70, 5)).astype(np.float32)
  gen = (rng.normal(size=(53, 5)) * 1.3 + 0.3).astype(np.float32)
  got = fid_lib.precision_recall(ref, gen, row_batch_size=16, col_batch_size=24,
                                 distance_dtype=dtype)
  want = _pr_brute_force(ref.astype(np.float64), gen.astype(np.float64))
  if dtype == jnp.float32:
    assert got == pytest.approx(want, abs=1e-12)
  else:  # float16 distances may flip a boundary point or two
    assert got == pytest.approx(want, abs=2.5 / 53)
  radii = fid_lib.manifold_radii(ref, k=3, row_batch_size=16, col_batch_size=24)
  d = ((ref[:, None].astype(np.float64) - ref[None].astype(np.float64)) ** 2).sum(-1)
  np.testing.assert_allclose(radii, np.sort(d, 1)[:, 3], rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- streaming stats


@pytest.fixture(scope="module")
def features():
  rng = np.random.default_rng(0)
  return (rng.normal(size=(96, 24)) * rng.uniform(0.1, 3, size=24) + 2).astype(np.float32)


@pytest.fixture(scope="module")
def mesh8():
  assert len(jax.devices()) >= 8, "tests/conftest.py should force 8 host devices"
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Explicit,),
                       devices=jax.devices()[:8])


def _assert_stats_close(a, b, rtol=1e-13):
  for u, v in zip(stats_lib.to_host(a), stats_lib.to_host(b)):
    np.testing.assert_allclose(u, v, rtol=rtol, atol=rtol * np.abs(v).max())


def test_mean_cov_matches_numpy(features):
  mu, sigma = stats_lib.mean_cov(stats_lib.from_features(features))
  x = features.astype(np.float64)
  np.testing.assert_allclose(mu, x.mean(0), rtol=1e-13)
  np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-11, atol=1e-12)
  with pytest.raises(ValueError):
    stats_lib.mean_cov(stats_lib.from_features(features[:1]))


def test_streaming_chunks_equal_one_shot(features):
  one_shot = stats_lib.from_features(features)
  acc = stats_lib.init_stats(features.shape[1])
  for chunk in np.array_split(features, 7):  # uneven chunks
    acc = stats_lib.update(acc, chunk)
  _assert_stats_close(acc, one_shot)
  halves = stats_lib.merge(stats_lib.from_features(features[:40]),
                           stats_lib.from_features(features[40:]))
  _assert_stats_close(halves, one_shot)
  assert float(acc.count) == len(features)


def test_eight_devices_equal_single_device(features, mesh8):
  one = stats_lib.from_features(features)
  sharded = stats_lib.sharded_sums(jnp.asarray(features), mesh8, "data")
  assert all(v.dtype == np.float64 for v in sharded)
  _assert_stats_close(sharded, one)
  # Streaming on the devices in 3 batches of 32 (4 rows per device each).
  acc = stats_lib.init_sharded(features.shape[1], mesh8)
  for chunk in np.split(features, 3):
    acc = stats_lib.sharded_update(acc, chunk, mesh8, "data")
  _assert_stats_close(acc, one)
  mu8, sigma8 = stats_lib.mean_cov(acc)
  mu1, sigma1 = stats_lib.mean_cov(one)
  np.testing.assert_allclose(mu8, mu1, rtol=1e-13)
  np.testing.assert_allclose(sigma8, sigma1, rtol=1e-11, atol=1e-12)
  # The global x64 flag is untouched.
  assert jnp.asarray(1.0).dtype == jnp.float32


def test_sharded_padding_mask(features, mesh8):
  x = features[:90]
  padded = np.concatenate([x, np.full((6, x.shape[1]), 1e6, np.float32)])
  mask = np.concatenate([np.ones(90, np.float32), np.zeros(6, np.float32)])
  got = stats_lib.sharded_sums(padded, mesh8, "data", mask=mask)
  _assert_stats_close(got, stats_lib.from_features(x))
  with pytest.raises(ValueError, match="divisible"):
    stats_lib.sharded_sums(x, mesh8, "data")


# --------------------------------------------------------------------------- readers / writer


def _mu_sigma(d=8, seed=0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=d), _random_cov(rng, d)


def test_edm_npz_round_trip_atomic(tmp_path):
  mu, sigma = _mu_sigma()
  path = tmp_path / "sub" / "ref.npz"
  refs.save_stats_npz(path, mu, sigma)
  got_mu, got_sigma = refs.load_edm_npz(path)
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  with np.load(path) as f:  # what EDM's fid.py reads: dict(np.load(f)) with mu, sigma
    assert sorted(f.files) == ["mu", "sigma"] and f["sigma"].dtype == np.float64
  mu2, sigma2 = _mu_sigma(seed=1)
  refs.save_stats_npz(path, mu2, sigma2)  # replaces the existing file
  np.testing.assert_array_equal(refs.load_reference_stats(path)[0], mu2)
  assert sorted(os.listdir(path.parent)) == ["ref.npz"]  # no temporary left behind
  with pytest.raises(ValueError):
    refs.save_stats_npz(path, mu2, sigma2[:3])
  assert sorted(os.listdir(path.parent)) == ["ref.npz"]


def test_edm_npz_missing_keys(tmp_path):
  path = tmp_path / "bad.npz"
  np.savez(path, m=np.zeros(3))
  with pytest.raises(KeyError, match="mu"):
    refs.load_edm_npz(path)


def test_openai_npz(tmp_path):
  mu, sigma = _mu_sigma()
  mu_s, sigma_s = _mu_sigma(seed=2)
  images = np.random.default_rng(0).integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
  path = tmp_path / "VIRTUAL_tiny.npz"
  np.savez(path, arr_0=images, mu=mu.astype(np.float32), sigma=sigma, mu_s=mu_s, sigma_s=sigma_s)
  ref = refs.load_openai_npz(path)
  assert ref.images is None
  np.testing.assert_array_equal(ref.mu, mu.astype(np.float32).astype(np.float64))
  assert ref.mu.dtype == np.float64
  np.testing.assert_array_equal(ref.sigma_s, sigma_s)
  ref = refs.load_openai_npz(path, load_images=True)
  np.testing.assert_array_equal(ref.images, images)
  np.testing.assert_array_equal(refs.load_openai_images(path), images)
  np.testing.assert_array_equal(refs.load_reference_stats(path, "sfid")[1], sigma_s)
  np.testing.assert_array_equal(refs.load_reference_stats(path, "fid")[1], sigma)
  samples = tmp_path / "samples.npz"
  np.savez(samples, images)  # samplers write positional arr_0
  np.testing.assert_array_equal(refs.load_openai_images(samples), images)
  assert refs.load_openai_npz(samples).mu is None


class EasyDict(dict):  # pickled as tests.test_metrics.EasyDict; remapped below
  pass


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_edm2_pkl(tmp_path, protocol):
  mu, sigma = _mu_sigma()
  mu_d, sigma_d = _mu_sigma(d=4, seed=5)
  stats = dict(num_images=50000, fid=dict(mu=mu, sigma=sigma),
               fd_dinov2=dict(mu=mu_d, sigma=sigma_d))
  path = tmp_path / "img64.pkl"
  with open(path, "wb") as f:
    pickle.dump(stats, f, protocol=protocol)
  data = refs.load_edm2_pkl(path)
  assert data["num_images"] == 50000
  np.testing.assert_array_equal(data["fid"]["sigma"], sigma)
  got_mu, got_sigma = refs.load_reference_stats(path, "fd_dinov2")
  np.testing.assert_array_equal(got_mu, mu_d)
  np.testing.assert_array_equal(got_sigma, sigma_d)
  with pytest.raises(KeyError, match="fid_missing"):
    refs.load_reference_stats(path, "fid_missing")


def test_edm2_pkl_refuses_code(tmp_path):
  class Evil:
    def __reduce__(self):
      return (os.getcwd, ())
  path = tmp_path / "evil.pkl"
  with open(path, "wb") as f:
    pickle.dump({"fid": Evil()}, f)
  with pytest.raises(pickle.UnpicklingError, match="refused"):
    refs.load_edm2_pkl(path)
  path = tmp_path / "other.pkl"
  with open(path, "wb") as f:
    pickle.dump(EasyDict(fid=1), f)
  with pytest.raises(pickle.UnpicklingError, match="refused"):
    refs.load_edm2_pkl(path)
