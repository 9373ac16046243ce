"""FID Inception-v3: golden parity with pytorch-fid, resize/pool semantics, weight-name converter."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ddo_jax.convert import inception_names
from ddo_jax.nets import inception
from tests.goldens import load_json, load_npz
from tests.hashweights import hash_uniform, regenerate_state_dict, sha256_float32


@pytest.fixture(scope="module")
def golden_config():
  return load_json("inception", "config.json")


@pytest.fixture(scope="module")
def golden_state_dict(golden_config):
  # regenerate_state_dict checks every tensor's sha256 before use.
  return regenerate_state_dict(golden_config["weights"]["tensors"])


@pytest.fixture(scope="module")
def golden_variables(golden_state_dict):
  return inception_names.inception_variables_from_state_dict(golden_state_dict)


@pytest.fixture(scope="module")
def golden_io():
  return load_npz("inception", "io.npz")


@pytest.fixture(scope="module")
def golden_outputs(golden_variables, golden_io):
  x = np.transpose(golden_io["images"], (0, 2, 3, 1))  # NCHW -> NHWC
  fn = jax.jit(lambda v, x: inception.InceptionV3().apply(v, x, return_blocks=True))
  return jax.device_get(fn(golden_variables, x))


def test_hash_rule_reproduces_readme_scheme(golden_config):
  tensors = golden_config["weights"]["tensors"]
  first = tensors[0]
  w = hash_uniform(first["seed"], tuple(first["shape"]), first["scale"], first["offset"])
  assert sha256_float32(w) == first["sha256_float32"]
  assert abs(float(w.astype(np.float64).sum()) - first["sum_float64"]) < 1e-9
  assert golden_config["weights"]["total_parameters"] == sum(
      int(np.prod(t["shape"])) for t in tensors if t.get("rule") != "zero")


def test_pool3_matches_pytorch_fid(golden_outputs, golden_io):
  err = np.abs(golden_outputs["pool3"] - golden_io["pool3_features"]).max()
  print(f"pool3 max abs err {err:.3g}")
  assert golden_outputs["pool3"].shape == (2, 2048)
  assert err <= 1e-5


@pytest.mark.parametrize("name", ["block0_mean", "block1_mean", "block2_mean",
                                  "resized_input_mean"])
def test_debug_outputs_match_pytorch_fid(golden_outputs, golden_io, name):
  err = np.abs(golden_outputs[name] - golden_io[name]).max()
  print(f"{name} max abs err {err:.3g}")
  assert golden_outputs[name].shape == golden_io[name].shape
  assert err <= 1e-5


def test_logits_are_fc_of_pool3(golden_outputs, golden_state_dict):
  pool3 = golden_outputs["pool3"].astype(np.float64)
  w = golden_state_dict["fc.weight"].astype(np.float64)
  b = golden_state_dict["fc.bias"].astype(np.float64)
  np.testing.assert_allclose(golden_outputs["logits_unbiased"], pool3 @ w.T, rtol=0, atol=2e-5)
  np.testing.assert_allclose(golden_outputs["logits"], pool3 @ w.T + b, rtol=0, atol=2e-5)


def test_uint8_helper_equals_float_path(golden_variables):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=(2, 20, 24, 3), dtype=np.uint8)
  got = inception.make_feature_fn(golden_variables)(images)
  float_fn = inception.make_feature_fn(golden_variables, uint8_input=False)
  want = float_fn(images.astype(np.float32) / np.float32(255))
  # Same math in two separately compiled programs: equal up to float32 reassociation.
  for key in ("pool3", "logits", "logits_unbiased"):
    np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want[key]), rtol=0, atol=1e-5)
  direct = inception.apply_uint8(golden_variables, images)
  np.testing.assert_allclose(np.asarray(direct["pool3"]), np.asarray(want["pool3"]), atol=1e-5)
  with pytest.raises(ValueError, match="uint8"):
    inception.uint8_to_unit(images.astype(np.float32))


def _torch_bilinear_reference(x, out_size):
  """Loop version of torch's CPU bilinear kernel (align_corners=False, explicit size), one axis.

  Like torch, scale, source coordinate and lambdas are float32 scalars; the blend is float64.
  """
  f32 = np.float32
  n = x.shape[0]
  out = np.zeros((out_size,) + x.shape[1:])
  scale = f32(n) / f32(out_size)
  for j in range(out_size):
    src = max(scale * (f32(j) + f32(0.5)) - f32(0.5), f32(0.0))
    i0 = min(int(np.floor(src)), n - 1)
    i1 = i0 + 1 if i0 < n - 1 else i0
    lam1 = min(max(src - f32(i0), f32(0.0)), f32(1.0))
    lam0 = f32(1.0) - lam1
    out[j] = float(lam0) * x[i0] + float(lam1) * x[i1]
  return out


def _exact_bilinear(x, out_size):
  """Exact (float64 coordinates) torch bilinear, align_corners=False, one axis."""
  n = x.shape[0]
  src = np.maximum((np.arange(out_size) + 0.5) * n / out_size - 0.5, 0.0)
  i0 = np.minimum(np.floor(src).astype(int), n - 1)
  i1 = np.minimum(i0 + 1, n - 1)
  lam = (src - i0).reshape((-1,) + (1,) * (x.ndim - 1))
  return (1 - lam) * x[i0] + lam * x[i1]


@pytest.mark.parametrize("in_size,out_size", [(32, 299), (64, 299), (512, 299), (299, 299),
                                              (7, 3)])
def test_resize_matrix_matches_torch_kernel_arithmetic(in_size, out_size):
  rng = np.random.default_rng(in_size)
  x = rng.uniform(size=(in_size, 5))
  mat = inception.bilinear_resize_matrix(in_size, out_size).astype(np.float64)
  np.testing.assert_allclose(mat @ x, _torch_bilinear_reference(x, out_size), rtol=0, atol=1e-12)
  np.testing.assert_allclose(mat.sum(1), 1.0, atol=1e-7)
  if in_size == out_size:
    np.testing.assert_array_equal(mat, np.eye(in_size))


@pytest.mark.parametrize("in_size,out_size", [(32, 299), (256, 299), (512, 299)])
def test_resize_equals_exact_and_jax_image_resize_up_to_coordinate_rounding(in_size, out_size):
  # Both our matrices (torch's float32 coordinate arithmetic) and jax.image.resize (its own
  # float32 kernel weights) differ from the exact resize only by float32 rounding of source
  # coordinates up to in_size: |d lambda| <= a few ulp(in_size) = in_size * 2^-23.
  bound = 4 * in_size * 2.0**-23
  rng = np.random.default_rng(1)
  x = rng.uniform(size=(1, in_size, in_size, 3)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear(jnp.asarray(x), (out_size, out_size)))
  ref = jax.image.resize(jnp.asarray(x), (1, out_size, out_size, 3), "bilinear", antialias=False,
                         precision=jax.lax.Precision.HIGHEST)
  exact = _exact_bilinear(np.swapaxes(_exact_bilinear(x[0].astype(np.float64), out_size), 0, 1),
                          out_size)
  exact = np.swapaxes(exact, 0, 1)
  np.testing.assert_allclose(ours[0], exact, rtol=0, atol=bound)
  np.testing.assert_allclose(np.asarray(ref)[0], exact, rtol=0, atol=bound)
  np.testing.assert_allclose(ours, np.asarray(ref), rtol=0, atol=2 * bound)


def test_tf_legacy_resize_formula():
  n, out = 32, 299
  x = np.random.default_rng(2).uniform(size=(n,))
  mat = inception.bilinear_resize_matrix(n, out, "tf_legacy").astype(np.float64)
  want = []
  for j in range(out):
    src = j * n / out
    i0 = int(np.floor(src))
    i1 = min(i0 + 1, n - 1)
    want.append(x[i0] + (x[i1] - x[i0]) * (src - i0))
  # The matrix is built in float32 like torch's kernel: the source coordinate j * n / out (up to n = 32) is
  # rounded to float32, so a weight can move by n * eps / 2 and the result (x in [0, 1]) by twice that.
  np.testing.assert_allclose(mat @ x, want, atol=n * np.finfo(np.float32).eps)
  with pytest.raises(ValueError):
    inception.bilinear_resize_matrix(n, out, "nearest")


def test_avg_pool_excludes_padding_and_max_pool_pads_with_minus_inf():
  x = np.arange(1, 17, dtype=np.float32).reshape(1, 4, 4, 1)
  got = np.asarray(inception.avg_pool_exclude_pad(jnp.asarray(x)))[0, :, :, 0]
  xp = np.pad(x[0, :, :, 0], 1, constant_values=np.nan)
  want = np.array([[np.nanmean(xp[i:i + 3, j:j + 3]) for j in range(4)] for i in range(4)])
  np.testing.assert_allclose(got, want, rtol=1e-6)
  neg = -x
  got = np.asarray(inception.max_pool(jnp.asarray(neg), 3, 1, 1))[0, :, :, 0]
  xp = np.pad(neg[0, :, :, 0], 1, constant_values=-np.inf)
  want = np.array([[xp[i:i + 3, j:j + 3].max() for j in range(4)] for i in range(4)])
  np.testing.assert_array_equal(got, want)


def test_converter_round_trip(golden_state_dict, golden_variables):
  back = inception_names.state_dict_from_inception_variables(golden_variables)
  expected = [k for k in golden_state_dict if not k.endswith("num_batches_tracked")]
  assert list(back) == expected  # the module's definition order is the state_dict order
  for k in expected:
    np.testing.assert_array_equal(back[k], golden_state_dict[k])
  conv = golden_variables["params"]["Mixed_6b"]["branch7x7_2"]["conv"]["kernel"]
  assert conv.shape == (1, 7, 128, 128)
  assert golden_variables["params"]["fc"]["kernel"].shape == (2048, 1008)
  assert golden_variables["batch_stats"]["Conv2d_1a_3x3"]["bn"]["var"].shape == (32,)


def test_converter_reports_every_problem_at_once(golden_state_dict):
  bad = dict(golden_state_dict)
  del bad["Mixed_5b.branch1x1.bn.running_mean"]
  del bad["fc.bias"]
  bad["Mixed_9z.conv.weight"] = np.zeros((1,), np.float32)
  bad["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
  with pytest.raises(ValueError) as info:
    inception_names.inception_variables_from_state_dict(bad)
  msg = str(info.value)
  for fragment in ["missing (2)", "Mixed_5b.branch1x1.bn.running_mean", "fc.bias",
                   "unexpected (1)", "Mixed_9z.conv.weight", "shape mismatch (1)",
                   "Conv2d_1a_3x3.conv.weight: expected (32, 3, 3, 3), got (32, 3, 5, 5)"]:
    assert fragment in msg


def test_pth_file_round_trip(tmp_path, golden_state_dict, golden_variables):
  torch_write = pytest.importorskip("ddo_jax.convert.torch_write")
  path = tmp_path / "pt_inception_tiny.pth"
  torch_write.save_torch_zip(golden_state_dict, path)
  variables = inception_names.load_pytorch_fid_weights(path)
  got = jax.tree_util.tree_leaves_with_path(variables)
  want = dict(jax.tree_util.tree_leaves_with_path(golden_variables))
  assert len(got) == len(want)
  for keypath, leaf in got:
    np.testing.assert_array_equal(leaf, want[keypath])
