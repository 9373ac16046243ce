"""Evaluator (sharded Inception + float64 statistics + IS/PR), the procedures and readers behind
launch.evaluate (ddo_jax.metrics.evaluate, ddo_jax.metrics.reference, ddo_jax.data.images) and the CLI.

The Inception weights follow the goldens' hash rule (tests/hashweights.py; the same tensors as
goldens/inception, regenerated without reading the goldens). Images are tiny (16x16; the network
resizes them to 299) and few, since the Inception on CPU is slow.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ddo_jax import cli, parallel
from ddo_jax.convert import inception_names
from ddo_jax.data import images as images_lib
from ddo_jax.metrics import evaluate as evaluate_lib
from ddo_jax.metrics import evaluator as evaluator_lib
from ddo_jax.metrics import reference as reference_lib
from ddo_jax.metrics import fid as fid_lib
from ddo_jax.metrics import stats as stats_lib
from ddo_jax.nets import inception
from tests.hashweights import hash_uniform

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED_BASE = 51 * 100000  # goldens/inception: seed = 51 * 100000 + state_dict index
HW = 16


def _rule(name: str, shape) -> tuple:
  """(scale, offset) of goldens/inception's per-kind rule for one tensor."""
  if name.endswith("conv.weight"):
    return np.sqrt(3.0) * np.sqrt(2.0 / np.prod(shape[1:])), 0.0
  table = {"bn.weight": (0.1, 1.0), "bn.bias": (0.1, 0.0), "bn.running_mean": (0.05, 0.0),
           "bn.running_var": (0.2, 1.0), "fc.weight": (np.sqrt(3.0) / np.sqrt(2048.0), 0.0),
           "fc.bias": (0.01, 0.0)}
  for suffix, value in table.items():
    if name.endswith(suffix):
      return value
  raise KeyError(name)


@pytest.fixture(scope="module")
def state_dict():
  return hash_inception_state_dict()


def hash_inception_state_dict() -> dict:
  """Golden-rule pytorch-fid state dict (torch names; num_batches_tracked omitted)."""
  out, k = {}, 0
  for name, (_, _, shape) in inception_names.expected_layout().items():
    scale, offset = _rule(name, shape)
    out[name] = hash_uniform(SEED_BASE + k, shape, scale, offset)
    # torch's state_dict has bn.num_batches_tracked after bn.running_var: it takes an index.
    k += 2 if name.endswith("running_var") else 1
  return out


@pytest.fixture(scope="module")
def variables(state_dict):
  return inception_names.inception_variables_from_state_dict(state_dict)


@pytest.fixture(scope="module")
def pth_path(tmp_path_factory, state_dict):
  from ddo_jax.convert import torch_write  # pylint: disable=import-outside-toplevel
  path = tmp_path_factory.mktemp("weights") / evaluator_lib.INCEPTION_FILENAME
  torch_write.save_torch_zip(state_dict, path)
  return path


@pytest.fixture(scope="module")
def images():
  rng = np.random.default_rng(0)
  return rng.integers(0, 256, size=(10, HW, HW, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def direct(variables, images):
  """pool3 / unbiased logits of `images` on ONE device with nets.inception (float64 host)."""
  fn = jax.jit(lambda v, x: inception.apply_uint8(v, x))
  out = jax.device_get(fn(jax.device_put(variables, jax.devices()[0]),
                          jax.device_put(images, jax.devices()[0])))
  return {k: np.asarray(out[k], np.float64) for k in ("pool3", "logits_unbiased")}


def _assert_stats_close(mu, sigma, features):
  mu_ref, sigma_ref = stats_lib.mean_cov(stats_lib.from_features(features))
  scale = np.abs(features).max()
  np.testing.assert_allclose(mu, mu_ref, rtol=0, atol=1e-5 * scale)
  np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=1e-5 * scale ** 2)
  return np.abs(mu - mu_ref).max() / scale, np.abs(sigma - sigma_ref).max() / scale ** 2


def _is_tolerance(logits: np.ndarray, delta: float, num_splits: int) -> float:
  """Absolute tolerance on IS mean and std when every logit may move by at most `delta`.

  The two paths compare float32 logits computed with different batch shapes, so XLA sums the
  convolutions in another order and each logit moves by a few float32 ulp. A logit shift of at most
  delta moves every log p(y|x) and log p(y) by at most 2 delta, hence each split's mean KL by at most
  2 delta * max_x sum_y p |log p(y|x) - log p(y)| + 4 delta, and each split score exp(KL) by that
  factor. The std of the split scores is a difference of scores near 1 (about 1e-4 here for random
  weights and tiny images), so its error is bounded by the scores' absolute error, not by a fraction
  of the std itself: a relative tolerance on the std has no float32 justification.
  """
  logits = np.asarray(logits, np.float64)
  log_p = logits - logits.max(1, keepdims=True)
  log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
  n, bound, top = len(logits), 0.0, 0.0
  for k in range(num_splits):
    part = log_p[k * n // num_splits:(k + 1) * n // num_splits]
    p = np.exp(part)
    log_m = np.log(p.mean(0))
    spread = (p * np.abs(part - log_m)).sum(1).max()
    bound = max(bound, 2 * delta * spread + 4 * delta)
    top = max(top, np.exp((p * (part - log_m)).sum(1).mean()))
  return 2 * top * np.expm1(bound)


# --------------------------------------------------------------------------- in-process


def test_golden_rule_weights_match_goldens_when_present(state_dict):
  path = pathlib.Path(os.environ.get("DDO_JAX_GOLDENS", REPO.parent / "shared" / "goldens"))
  config = path / "inception" / "config.json"
  if not config.exists():
    pytest.skip("goldens not found; the rule is still used")
  tensors = {t["key"]: t for t in json.loads(config.read_text())["weights"]["tensors"]}
  from tests.hashweights import sha256_float32  # pylint: disable=import-outside-toplevel
  for name in ("Conv2d_1a_3x3.conv.weight", "Mixed_7c.branch_pool.bn.running_var", "fc.weight"):
    assert sha256_float32(state_dict[name]) == tensors[name]["sha256_float32"], name


def _mesh():
  """8 devices as data=4 x fsdp=2 (every test uses this mesh: one compile of the Inception)."""
  return parallel.make_mesh(data=4, fsdp=2)


def test_sharded_statistics_equal_single_device(variables, images, direct):
  # 10 images in uneven calls -> one full batch of 8 and a zero-padded, masked batch of 2.
  ev = evaluator_lib.Evaluator(variables, _mesh(), batch_size=8, keep_features=7,
                               num_is_splits=2)
  assert ev.stats_on_device  # float64 psum over the 8 devices
  ev.add_uint8(images[:3])
  ev.add_uint8(jax.numpy.asarray(images[3:]))
  assert ev.num_images == 10
  mu, sigma = ev.statistics()
  err = _assert_stats_close(mu, sigma, direct["pool3"])
  print(f"8 devices vs 1: max |dmu|/scale {err[0]:.2g}, max |dsigma|/scale^2 {err[1]:.2g}")
  np.testing.assert_allclose(ev.features(), direct["pool3"][:7], rtol=0, atol=1e-4)
  np.testing.assert_allclose(ev.logits(), direct["logits_unbiased"], rtol=0, atol=1e-4)
  result = ev.result()
  # IS of the evaluator's own logits is exactly the library function on them (same path)...
  assert (result["is_mean"], result["is_std"]) == fid_lib.inception_score(ev.logits(), 2)
  # ...and within the float32 bound of the single-device logits' IS (see _is_tolerance).
  want = fid_lib.inception_score(direct["logits_unbiased"], 2)
  delta = np.abs(np.asarray(ev.logits(), np.float64) - direct["logits_unbiased"]).max()
  tol = _is_tolerance(direct["logits_unbiased"], max(delta, 1e-7), 2)
  print(f"IS: max |dlogit| {delta:.2g}, |dmean| {abs(result['is_mean'] - want[0]):.2g}, "
        f"|dstd| {abs(result['is_std'] - want[1]):.2g}, tolerance {tol:.2g}")
  assert result["num_images"] == 10 and "fid" not in result and "precision" not in result
  np.testing.assert_allclose([result["is_mean"], result["is_std"]], want, rtol=0, atol=tol)
  ev.reset()
  ev.add_uint8(images[:2])  # only a partial batch
  assert ev.num_images == 2
  _assert_stats_close(*ev.statistics(), direct["pool3"][:2])


def test_host_statistics_path(variables, images, direct):
  ev = evaluator_lib.Evaluator(variables, _mesh(), batch_size=8, stats_on_device=False,
                               compute_is=False)
  ev.add_uint8(images[:5])
  assert ev.num_images == 5 and ev.logits().shape == (0, 1008)
  _assert_stats_close(*ev.statistics(), direct["pool3"][:5])


def test_sampler_hook_and_precision_recall(variables, images, direct):
  from launch import evaluate as launch_evaluate  # pylint: disable=import-outside-toplevel

  def sampler(num):
    for start in range(0, 9, 3):  # yields 9 > num images; the evaluator keeps num
      yield images[start:start + 3]

  ref_features = direct["pool3"][:8].astype(np.float32)
  ev = evaluator_lib.Evaluator(variables, _mesh(), 8, ref_features=ref_features,
                               compute_is=False)
  result = evaluate_lib.evaluate_sampler(sampler, 8, ev)
  # The sampler's first 8 images are images[0:8]: the same set as the reference.
  assert result == {"num_images": 8, "precision": 1.0, "recall": 1.0}
  with pytest.raises(ValueError, match="fewer than"):
    evaluate_lib.evaluate_sampler(lambda num: iter([]), 8, evaluator_lib.Evaluator(variables, _mesh(), 8))
  with pytest.raises(FileNotFoundError, match="model.json not found"):
    launch_evaluate.build_sampler("no-such-ckpt", 8, _mesh(), num_steps=18)


def test_rejects_bad_inputs(variables):
  ev = evaluator_lib.Evaluator(variables, _mesh(), 8)
  with pytest.raises(ValueError, match="uint8"):
    ev.add_uint8(np.zeros((2, HW, HW, 3), np.float32))
  with pytest.raises(ValueError, match="3 channels"):
    ev.add_uint8(np.zeros((2, 3, HW, HW), np.uint8))
  with pytest.raises(ValueError, match="divisible"):
    evaluator_lib.Evaluator(variables, _mesh(), 6)


def test_load_inception_formats(tmp_path, variables, state_dict, pth_path):
  def same(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), dict(jax.tree_util.tree_leaves_with_path(b))
    assert len(la) == len(lb)
    for key, leaf in la:
      np.testing.assert_array_equal(leaf, lb[key])

  same(evaluator_lib.load_inception(pth_path), variables)
  npz = tmp_path / "inception.npz"
  evaluator_lib.save_inception_npz(variables, npz)
  same(evaluator_lib.load_inception(npz), variables)
  torch_npz = tmp_path / "inception_torch_names.npz"
  np.savez(torch_npz, **state_dict)
  same(evaluator_lib.load_inception(torch_npz), variables)
  bad = tmp_path / "bad.npz"
  np.savez(bad, **{"params/fc/kernel": np.zeros((3, 3), np.float32)})
  with pytest.raises(ValueError, match="missing"):
    evaluator_lib.load_inception(bad)


def test_missing_inception_file_error(tmp_path, monkeypatch):
  monkeypatch.delenv(evaluator_lib.INCEPTION_ENV, raising=False)
  for path in (tmp_path / "nope.pth", None):
    with pytest.raises(evaluator_lib.InceptionWeightsNotFoundError) as info:
      evaluator_lib.load_inception(path)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, cli.UserError)
    msg = str(info.value)
    assert msg.startswith("error: ") and "\n" not in msg
    for fragment in (evaluator_lib.INCEPTION_FILENAME, evaluator_lib.INCEPTION_URL, "--inception",
                     evaluator_lib.INCEPTION_ENV):
      assert fragment in msg


# --------------------------------------------------------------------------- CLI subprocesses


@pytest.fixture(scope="module")
def cli_env(tmp_path_factory):
  """Environment of the CLI subprocesses: 8 CPU devices, a shared persistent compile cache."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
             JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  env.pop(evaluator_lib.INCEPTION_ENV, None)
  return env


def _cli(env, *args, check=True):
  proc = subprocess.run([sys.executable, "-m", "launch.evaluate", *map(str, args)], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  if check and proc.returncode:
    raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
  return proc


def _assert_one_line_error(proc, *needles):
  """Exit 2, exactly one line on stderr starting with 'error:' (after any log lines), no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stderr)
  assert "Traceback" not in proc.stderr, proc.stderr
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and proc.stderr.rstrip().splitlines()[-1] == errors[0], proc.stderr
  for needle in needles:
    assert needle in errors[0], (needle, errors[0])
  return errors[0]


def test_cli_user_errors(tmp_path, cli_env, pth_path, images):
  npz = tmp_path / "samples.npz"
  np.savez(npz, arr_0=images[:2])
  line = _assert_one_line_error(_cli(cli_env, "--images", npz, "--inception", tmp_path / "missing.pth",
                                     check=False),
                                evaluator_lib.INCEPTION_FILENAME, evaluator_lib.INCEPTION_URL, "--inception",
                                evaluator_lib.INCEPTION_ENV)
  print(line)
  print(_assert_one_line_error(_cli(cli_env, "--images", npz, "--ref", tmp_path / "nope.npz", "--inception",
                                    pth_path, check=False), "nope.npz does not exist", "(--ref)"))
  print(_assert_one_line_error(_cli(cli_env, "--images", tmp_path / "nothere", "--inception", pth_path,
                                    check=False), "does not exist", "(--images)"))
  print(_assert_one_line_error(_cli(cli_env, "--images", npz, "--inception", pth_path, "--metrics", "fid,kid",
                                    check=False), "kid", "(--metrics)"))
  print(_assert_one_line_error(_cli(cli_env, "--images", npz, "--inception", pth_path, "--num", 5, check=False),
                               "found only 2", "(--num)"))
  print(_assert_one_line_error(_cli(cli_env, "--images", npz, "--inception", pth_path, "--batch_size", 12,
                                    check=False), "not a multiple of the 8 devices", "(--batch_size)"))
  print(_assert_one_line_error(_cli(cli_env, "--model", tmp_path, "--inception", pth_path, check=False),
                               "has no model.json", "(--model)"))
  help_proc = _cli(cli_env, "--help", check=False)
  assert help_proc.returncode == 0 and "--make_ref" in help_proc.stdout and "Traceback" not in help_proc.stderr


def test_readers_behind_the_cli(tmp_path, images):
  openai = tmp_path / "openai_like.npz"
  np.savez(openai, arr_0=images[:4])
  ref = reference_lib.read_reference(str(openai), want_stats=True, want_features=True)
  assert ref.stats is None and ref.features is None and ref.images.count == 4
  assert reference_lib.parse_metrics("auto", str(openai)) == ["is", "fid", "pr"]
  assert reference_lib.parse_metrics("auto", None) == ["is"]
  with pytest.raises(cli.UserError, match="fid and pr need reference statistics") as info:
    reference_lib.parse_metrics("fid", None)
  assert info.value.where == "--ref"
  nchw = tmp_path / "nchw.npz"
  np.savez(nchw, images=np.transpose(images[:3], (0, 3, 1, 2)))
  source = images_lib.open_images(str(nchw))
  got = np.concatenate(list(source.batches(2)))
  np.testing.assert_array_equal(got, images[:3])
  stats_only = tmp_path / "edm.npz"
  np.savez(stats_only, mu=np.zeros(3), sigma=np.eye(3))
  with pytest.raises(cli.UserError, match="no features and no 'arr_0'"):
    reference_lib.read_reference(str(stats_only), want_stats=True, want_features=True)
  with pytest.raises(cli.UserError, match="does not exist") as info:
    reference_lib.read_reference(str(tmp_path / "nope.npz"), want_stats=True, want_features=False)
  assert info.value.where == "--ref"
  with pytest.raises(cli.UserError, match="no member 'x'") as info:
    images_lib.open_images(str(nchw), key="x")
  assert info.value.where == "--images_key"
  floats = tmp_path / "floats.npy"
  np.save(floats, np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(cli.UserError, match="not uint8"):
    images_lib.open_images(str(floats))
  with pytest.raises(cli.UserError, match="found only 3"):
    images_lib.count_images(source, 4)
  # launch.evaluate calls the same function (tests/test_cifar10.py reaches it from there).
  from launch import evaluate as launch_evaluate  # pylint: disable=import-outside-toplevel
  assert launch_evaluate.open_images is images_lib.open_images


def test_cli_make_ref_on_npz_then_evaluate_folder(tmp_path, images, direct, pth_path, cli_env):
  # --make_ref on an OpenAI-style npz (arr_0: uint8 NHWC) of 6 images.
  npz = tmp_path / "samples.npz"
  np.savez(npz, arr_0=images[:6])
  ref = tmp_path / "ref.npz"
  proc = _cli(cli_env, "--make_ref", "--images", npz, "--inception", pth_path,
              "--batch_size", 8, "--ref_features", 6, "--out", ref)
  print(proc.stderr[-1500:])
  assert json.loads(proc.stdout.strip().splitlines()[-1])["num_images"] == 6
  with np.load(ref) as f:
    assert set(f.files) == {"mu", "sigma", "features", "num_images"}
    assert int(f["num_images"]) == 6
    _assert_stats_close(f["mu"], f["sigma"], direct["pool3"][:6])
    np.testing.assert_allclose(f["features"], direct["pool3"][:6], rtol=0, atol=1e-4)

  # The same 6 images as PNGs in nested folders (sorted relative paths: a/0.png, a/1.png,
  # b/c/2.png, ...), evaluated against that reference.
  folder = tmp_path / "pngs"
  for i in range(6):
    sub = folder / ("a" if i < 2 else "b/c")
    sub.mkdir(parents=True, exist_ok=True)
    Image.fromarray(images[i]).save(sub / f"{i}.png")
  (folder / "notes.txt").write_text("not an image")
  out = tmp_path / "metrics.json"
  proc = _cli(cli_env, "--images", folder, "--ref", ref, "--inception", pth_path,
              "--batch_size", 8, "--metrics", "fid,is,pr", "--is_splits", 2, "--out", out)
  print(proc.stderr[-1500:])
  record = json.loads(out.read_text())
  assert json.loads(proc.stdout.strip().splitlines()[-1]) == record
  assert set(evaluator_lib.METRIC_KEYS) <= set(record)
  assert record["num_images"] == 6 and record["num_devices"] == 8
  print(f"FID of the set against its own statistics: {record['fid']:.3g}; {record['fid_warning']}")
  # 6 images give a rank-5 covariance in 2048 dimensions: the FID is flagged as not meaningful, and the
  # rounding of a set against its own statistics is not reported as a negative number.
  assert 0.0 <= record["fid"] < 1e-2
  assert "not meaningful" in record["fid_warning"] and "rank at most 5" in record["fid_warning"]
  assert "not meaningful" in proc.stderr
  assert record["precision"] == 1.0 and record["recall"] == 1.0
  # The same images through the in-process Evaluator with the CLI's mesh and batch size take the CLI's
  # compiled path (one padded batch of 8 over 8 devices), so they give the CLI's numbers exactly.
  ev = evaluator_lib.Evaluator(evaluator_lib.load_inception(str(pth_path)), parallel.make_mesh(), 8,
                               num_is_splits=2)
  ev.add_uint8(images[:6])
  assert (ev.result()["is_mean"], ev.result()["is_std"]) == (record["is_mean"], record["is_std"])
  # The direct path (10 images on one device) differs by float32 rounding of the logits, which bounds
  # the IS difference (_is_tolerance).
  want = fid_lib.inception_score(direct["logits_unbiased"][:6], 2)
  delta = np.abs(np.asarray(ev.logits(), np.float64) - direct["logits_unbiased"][:6]).max()
  assert delta <= 1e-4
  tol = _is_tolerance(direct["logits_unbiased"][:6], max(delta, 1e-7), 2)
  print(f"IS: max |dlogit| {delta:.2g}, |dmean| {abs(record['is_mean'] - want[0]):.2g}, "
        f"|dstd| {abs(record['is_std'] - want[1]):.2g}, tolerance {tol:.2g}")
  np.testing.assert_allclose([record["is_mean"], record["is_std"]], want, rtol=0, atol=tol)


def test_edm_family_fid_selection_metric(tmp_path, pth_path, images, direct):
  """The round driver's FID path: EDM.evaluate samples through the driver's callable into an Evaluator
  built from model.eval (Inception file + reference statistics) and returns the FID the metrics give."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from ddo_jax.families.edm import EDM  # pylint: disable=import-outside-toplevel
  from ddo_jax.metrics import fid as fid_lib, reference_stats  # pylint: disable=import-outside-toplevel
  from configs import edm_cifar10  # pylint: disable=import-outside-toplevel
  ref_images = np.random.default_rng(1).integers(0, 256, size=(10, HW, HW, 3), dtype=np.uint8)
  ref_feats = jax.device_get(jax.jit(inception.apply_uint8)(evaluator_lib.load_inception(str(pth_path)),
                                                            ref_images))["pool3"]
  ref_feats = np.asarray(ref_feats, np.float64)
  reference_stats.save_stats_npz(tmp_path / "ref.npz", ref_feats.mean(0), np.cov(ref_feats, rowvar=False))
  cfg = edm_cifar10.get_config("tiny").model
  cfg.metric = "fid"
  cfg.eval = dict(inception=str(pth_path), ref_stats=str(tmp_path / "ref.npz"), num_samples=10, batch_size=8)
  family = EDM(cfg)
  calls = []

  def sample(num, start=0):   # stands in for the driver's sharded Heun sampling
    calls.append((num, start))
    return {"x": images[start:start + num].astype(np.float32) / 127.5 - 1.0}   # to_uint8 inverts this

  out = family.evaluate(None, sample, seed=0)
  assert calls == [(8, 0), (2, 8)] and out["num_images"] == 10
  # Numbers only (the driver formats every value as a number); the too-few-images warning is logged.
  assert all(isinstance(v, (int, float)) for v in out.values()), out
  want = fid_lib.frechet_distance(direct["pool3"].mean(0), np.cov(direct["pool3"], rowvar=False),
                                  ref_feats.mean(0), np.cov(ref_feats, rowvar=False))
  np.testing.assert_allclose(out["fid"], want, rtol=1e-6)
  with pytest.raises(ValueError, match="needs model.eval.ref_stats"):
    cfg.eval.ref_stats = ""
    EDM(cfg)
