"""EDM2 samplers against the PyTorch goldens: the autoguided Heun sampler of EDM2's generate_images.py
(goldens/edm2/guided_sampler), DDO's DPM-Solver-v3 (goldens/edm2/dpmv3_sampler) and the class-balanced
labels of DDO's EDM2_sample.py (goldens/edm2/balanced_labels), on the tiny EDM2 Precond of the goldens;
and the batch sharded over 8 devices against one device.

Tolerances (goldens/README.md, "Verification and observed float32 tolerances", the spread that float32
rounding alone causes when upstream recomputes with other CPU kernels):
* network outputs: 1e-5 max abs (observed 1e-6 - 5e-6 at magnitude 1-5);
* DPM-Solver-v3 states (float64 solver around the float32 net): observed 3.2e-6 / 1.4e-6 / 5.4e-6 on the
  final state (6 / 25 / guided 6 steps), 3.3e-6 on model_x, 2.6e-6 on x_cached, 3.2e-6 on D: 1e-5;
* EDM2 guided Heun sampler (float32 state, 9 evaluations of two nets, magnitude 15): observed 4.4e-5 on
  the final state: 1e-4. (Replaying upstream's recursion on the stored D_net/D_gnet with a single-rounding
  lerp reproduces every stored state bit for bit; the remaining difference is the nets' float32 rounding,
  ~2e-6, flipping roundings of the float32 states at magnitude 40-100 and growing from there.)
* uint8 images: +-1 on a pixel (README: one pixel off by one in the guided run).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ddo_jax.convert import edm2_names
from ddo_jax.nets import edm2_unet
from ddo_jax import parallel
from ddo_jax.sampling import dpmv3, heun, labels as labels_lib, seeded
from tests.goldens import load_json, load_npz

NET_ATOL = 1e-5          # a float32 network output
DPMV3_ATOL = 1e-5        # DPM-Solver-v3 states, float64 solver (README: up to 5.4e-6 from rounding alone)
HEUN_ATOL = 1e-4         # EDM2 guided Heun, float32 state (README: up to 4.4e-5 from rounding alone)


def _nhwc(a):
  return jnp.asarray(np.asarray(a).transpose(0, 2, 3, 1))


def _nchw(a):
  a = np.asarray(a)
  return a.transpose(*range(a.ndim - 3), a.ndim - 1, a.ndim - 3, a.ndim - 2)


def _err(got_nhwc, want_nchw):
  return float(np.max(np.abs(_nchw(got_nhwc).astype(np.float64) - np.asarray(want_nchw, np.float64))))


@functools.lru_cache(maxsize=None)
def _net(name):
  """(Precond, variables) of goldens/edm2/<name> (state.npz plus its stated overrides)."""
  meta = load_json("edm2", name, "config.json")
  state = load_npz("edm2", name, *meta["weights"]["file"].split("/"))
  if "override_file" in meta["weights"]:
    state.update(load_npz("edm2", name, meta["weights"]["override_file"]))
  config = edm2_names.config_from_init_kwargs(meta["init_kwargs"], meta["class_name"])
  return edm2_unet.build_precond(config), edm2_names.torch_to_flax(state, config)


def _denoiser(name):
  net, _ = _net(name)
  return lambda v: (lambda x, sigma, labels: net.apply(v, x, sigma, labels))


# ------------------------------------------------------------------------------------------------
# EDM2 edm_sampler with autoguidance.


def _guided_heun_config():
  meta = load_json("edm2", "guided_sampler", "config.json")
  kw = dict(meta["sampler_kwargs"])
  assert kw["dtype"] == "float32" and kw["S_churn"] == 0
  net_name, gnet_name = meta["net"].split("/")[-1], meta["gnet"].split("/")[-1]
  return kw, net_name, gnet_name


def _run_guided_heun(noise, labels, return_trajectory=True, shardings=None):
  kw, net_name, gnet_name = _guided_heun_config()
  den, gden = _denoiser(net_name), _denoiser(gnet_name)

  def run(v, gv, noise, labels):
    return heun.edm2_heun_sample(den(v), noise, labels, guide=gden(gv), guidance=kw["guidance"],
                                 num_steps=kw["num_steps"], sigma_min=kw["sigma_min"],
                                 sigma_max=kw["sigma_max"], rho=kw["rho"],
                                 return_trajectory=return_trajectory)

  fn = jax.jit(run) if shardings is None else jax.jit(run, in_shardings=shardings[0],
                                                       out_shardings=shardings[1])
  return fn(_net(net_name)[1], _net(gnet_name)[1], noise, labels)


def test_guided_heun_matches_edm2():
  io = load_npz("edm2", "guided_sampler", "io.npz")
  kw, net_name, gnet_name = _guided_heun_config()
  x, traj = _run_guided_heun(_nhwc(io["noise"]), jnp.asarray(io["class_labels"]))
  np.testing.assert_array_equal(np.asarray(traj["t_steps"]), io["t_steps"])   # float32, bit for bit
  errs = {"x_states": _err(traj["x_states"], io["x_states"]), "x_euler": _err(traj["x_euler"], io["x_euler"]),
          "x_final": _err(x, io["x_final"])}
  print("guided Heun max abs errors:", errs, "tolerance", HEUN_ATOL,
        "| magnitude", float(np.max(np.abs(io["x_final"]))))
  for k, e in errs.items():
    assert e <= HEUN_ATOL, (k, e)
  assert float(np.max(np.abs(io["x_final"] - io["x_states"][-2]))) > 100 * HEUN_ATOL   # not vacuous


def test_guidance_one_never_calls_the_guide():
  den = lambda x, s, l: x * 0.5
  assert heun.guided_denoiser(den, None, 1.0) is den
  with pytest.raises(ValueError, match="guide"):
    heun.guided_denoiser(den, None, 1.5)


def test_torch_lerp_rounds_once():
  """torch's vectorized lerp is one fused multiply-add: equal, bit for bit, to the float64 evaluation of
  the same float32 operands rounded to float32 (exact product, one rounding of the sum)."""
  io = load_npz("edm2", "guided_sampler", "io.npz")
  rng = np.random.default_rng(0)
  start = np.concatenate([io["D_gnet"].ravel(), rng.standard_normal(50000).astype(np.float32) * 10])
  end = np.concatenate([io["D_net"].ravel(), rng.standard_normal(50000).astype(np.float32)])
  diff = (end - start).astype(np.float64)
  fn = jax.jit(heun.torch_lerp, static_argnums=2)
  two_roundings = 0
  for w in (0.25, -0.3, 1.1, 2.45):
    w32 = np.float32(w)
    want = (start + w32 * diff if abs(w) < 0.5 else end + (w32 - np.float32(1)) * diff).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(fn(jnp.asarray(start), jnp.asarray(end), w)), want, err_msg=str(w))
    two_roundings += int(np.sum((end + (w32 - np.float32(1)) * (end - start)) != want))
  assert two_roundings > 1000   # the single rounding is visible on these values


# ------------------------------------------------------------------------------------------------
# DPM-Solver-v3.


def test_dpmv3_tables_and_timesteps():
  stats = load_npz("edm2", "dpmv3_sampler", "statistics.npz")
  meta = load_json("edm2", "dpmv3_sampler", "config.json")
  tables = dpmv3.dpmv3_tables()
  assert tables.ts.shape == stats["ts"].shape
  # End points (they fix every time step) bit for bit.
  assert tables.lambda_T == stats["lambda_T"] and tables.lambda_0 == stats["lambda_0"]
  # Interior points: torch's vectorized float32 linspace rounds some base + k*step sums differently from
  # its scalar formula (CPU-dependent); they agree to one float32 ulp of lambda (4.8e-7 for |lambda| in
  # [4, 8)) after the exp/log round trip, so 1e-6. I is a sum growing to 4e4: relative 1e-6.
  assert np.max(np.abs(tables.ts - stats["ts"])) <= 1e-6
  assert np.max(np.abs(tables.L - stats["L"])) <= 1e-6
  np.testing.assert_allclose(tables.I, stats["I"], rtol=1e-6, atol=0)
  assert abs(stats["I"][-1] - 40004.99) < 0.01   # the trapezoid value, not the closed form 39999.00
  for run in meta["runs"]:
    io = load_npz("edm2", "dpmv3_sampler", f"{run}.npz")
    plan = dpmv3.dpmv3_plan(int(io["num_steps"]))
    np.testing.assert_array_equal(plan["indexes"], io["indexes"])
    np.testing.assert_array_equal(plan["timesteps"], io["timesteps"])       # float32 values, exact
    np.testing.assert_array_equal(plan["t_unsnapped"], io["t_unsnapped"])
    assert sorted(plan["exp_coeffs"]) == sorted(map(tuple, io["exp_coeff_keys"].tolist()))
    got = np.array([plan["exp_coeffs"][tuple(k)] for k in io["exp_coeff_keys"].tolist()])
    # c2 integrates over a few grid points only, so a 5e-7 shift of one interior point moves it by up to
    # ~3e-6 relative (5e-7 / a span of 0.17 - 0.4 in lambda); 1e-5.
    np.testing.assert_allclose(got, io["exp_coeff_values"], rtol=1e-5, atol=0)
    orders = [min(k, 2, len(plan["t"]) + 1 - k) for k in range(1, len(plan["t"]) + 1)]
    assert list(plan["order2"]) == [o == 2 for o in orders]
    assert list(plan["corrector"]) == [k >= 3 for k in range(1, len(plan["t"]) + 1)]


@functools.lru_cache(maxsize=None)
def _golden_run_dpmv3(run, return_trajectory=False):
  """_run_dpmv3 on the fixture's own noise and labels, computed once per session."""
  return _run_dpmv3(run, return_trajectory=return_trajectory)


def _run_dpmv3(run, noise=None, labels=None, shardings=None, return_trajectory=False, num_steps=None,
               dtype=jnp.float64):
  meta = load_json("edm2", "dpmv3_sampler", "config.json")
  cfg = meta["runs"][run]
  net_name = meta["net"].split("/")[-1]
  io = load_npz("edm2", "dpmv3_sampler", f"{run}.npz")
  noise = _nhwc(io["noise"]) if noise is None else noise
  labels = jnp.asarray(io["class_labels"]) if labels is None else labels
  den = _denoiser(net_name)
  gname = cfg["gnet"].split("/")[-1] if cfg["gnet"] else net_name
  gden = _denoiser(gname)

  def run_fn(v, gv, noise, labels):
    return dpmv3.dpmv3_sample(den(v), noise.astype(dtype), labels, guide=gden(gv),
                              guidance=cfg["guidance"], num_steps=num_steps or int(io["num_steps"]),
                              return_trajectory=return_trajectory)

  with jax.enable_x64(True):
    fn = jax.jit(run_fn) if shardings is None else jax.jit(run_fn, in_shardings=shardings[0],
                                                           out_shardings=shardings[1])
    out = fn(_net(net_name)[1], _net(gname)[1], noise, labels)
    out = jax.device_get(out)
  return out, io


def test_dpmv3_short_every_state():
  (x, traj), io = _golden_run_dpmv3("short", return_trajectory=True)
  assert x.dtype == np.float64
  np.testing.assert_array_equal(traj["model_x"][0], _nhwc(io["model_x"][0]))   # noise * 80 in float32
  errs = {k: _err(traj[k], io[k]) for k in ("model_x", "D", "x_cached")}
  errs["x_final"] = _err(x, io["x_final"])
  print("DPM-Solver-v3 (6 steps) max abs errors:", errs, "tolerance", DPMV3_ATOL)
  for k, e in errs.items():
    assert e <= DPMV3_ATOL, (k, e)
  # The corrector moves the states of steps >= 3 by far more than the tolerance (not vacuous).
  assert float(np.max(np.abs(io["x_cached"][2:] - io["model_x"][2:]))) > 100 * DPMV3_ATOL
  images = np.clip(_nchw(x).astype(np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)
  assert np.max(np.abs(images.astype(int) - io["images"].astype(int))) <= 1


@pytest.mark.parametrize("run", ["default", "guided"])
def test_dpmv3_final_state(run):
  x, io = _golden_run_dpmv3(run)
  err = _err(x, io["x_final"])
  print(f"DPM-Solver-v3 {run} ({int(io['num_steps'])} steps) x_final max abs error {err:.3g}, "
        f"tolerance {DPMV3_ATOL}, magnitude {float(np.max(np.abs(io['x_final']))):.3g}")
  assert err <= DPMV3_ATOL
  images = np.clip(_nchw(x).astype(np.float32) * 127.5 + 128, 0, 255).astype(np.uint8)
  assert np.max(np.abs(images.astype(int) - io["images"].astype(int))) <= 1


def test_dpmv3_float32_state_and_short_schedules():
  """A float32 solver state (no x64, e.g. on TPU) stays close to upstream's float64 one; plans of 1-3 steps
  have upstream's orders (first order at both ends, the corrector from step 3 on)."""
  x32, io = _run_dpmv3("short", dtype=jnp.float32)
  assert x32.dtype == np.float32
  err = _err(x32, io["x_final"])
  print(f"DPM-Solver-v3 float32 state (6 steps): x_final max abs error {err:.3g}")
  assert err <= DPMV3_ATOL   # even the float64 parity tolerance (measured 3.7e-6)
  for n, order2, corrector in ((1, [False], [False]), (2, [False, False], [False, False]),
                               (3, [False, True, False], [False, False, True])):
    plan = dpmv3.dpmv3_plan(n)
    assert list(plan["order2"]) == order2 and list(plan["corrector"]) == corrector, n
    assert plan["indexes"][0] == 0 and plan["indexes"][-1] == dpmv3.STATISTICS_STEPS


def test_dpmv3_guidance_changes_the_result():
  """The guided run differs from an unguided one on the same noise (the guide is really used)."""
  (short, _), _ = _golden_run_dpmv3("short", return_trajectory=True)
  guided, io = _golden_run_dpmv3("guided")
  io_short = load_npz("edm2", "dpmv3_sampler", "short.npz")
  np.testing.assert_array_equal(io_short["noise"], io["noise"])
  assert float(np.max(np.abs(short - guided))) > 1e-2


# ------------------------------------------------------------------------------------------------
# Class-balanced labels.


def test_balanced_labels_match_upstream():
  meta = load_json("edm2", "balanced_labels", "config.json")
  data = load_npz("edm2", "balanced_labels", "labels.npz")
  for case, c in meta["cases"].items():
    n, dim, w = c["num_seeds"], c["label_dim"], c["world_size"]
    # Upstream's whole label list: the batches' rows in seed-list chunk order (chunk = batch_idx * W + rank).
    rows = np.split(data[f"{case}/batch_labels"], np.cumsum(data[f"{case}/batch_num_labels"])[:-1])
    order = np.argsort(data[f"{case}/batch_idx"] * w + data[f"{case}/batch_rank"], kind="stable")
    label_list = np.concatenate([rows[i] for i in order]) if rows else np.zeros([0], np.int64)
    ours = labels_lib.balanced_labels(n, dim, c["class_idx"])
    upstream = data[f"{case}/label_of_position"]
    assert len(upstream) == n == len(data[f"{case}/seeds"])
    paired = upstream >= 0
    if c["consistent"]:
      assert paired.all(), case
      np.testing.assert_array_equal(ours, upstream, err_msg=case)
    else:
      # Upstream has only label_dim * (n // label_dim) labels: ours are that same label list (in order)
      # extended cyclically to every seed, so each class gets n // label_dim or one more sample.
      n_lab = c["num_labels"]
      np.testing.assert_array_equal(ours[:n_lab], label_list, err_msg=case)
      counts = np.bincount(ours, minlength=dim)
      assert counts.min() >= n // dim and counts.max() <= n // dim + 1, case
    # Upstream's label list: position mod label_dim (or class_idx), label_dim * (n // label_dim) rows.
    want = np.tile(np.arange(dim), n // dim) if c["class_idx"] is None else np.full([n], c["class_idx"])
    np.testing.assert_array_equal(label_list, want, err_msg=case)
  one_hot = labels_lib.one_hot_labels(labels_lib.balanced_labels(12, 10), 10)
  np.testing.assert_array_equal(np.asarray(one_hot), np.eye(10, dtype=np.float32)[np.arange(12) % 10])
  # Inside jit, from positions (a sharded sampler's view).
  pos = jnp.arange(100, 124, dtype=jnp.int32)
  np.testing.assert_array_equal(jax.jit(lambda p: labels_lib.balanced_classes(p, 10))(pos),
                                np.arange(100, 124) % 10)
  with pytest.raises(ValueError):
    labels_lib.balanced_labels(4, 10, class_idx=10)


# ------------------------------------------------------------------------------------------------
# Batch sharded over 8 devices equals one device.


def _sharded_inputs(io_noise, io_labels, n):
  """n samples: the fixture's noise and its negatives / reversals, labels position mod label_dim."""
  noise = np.asarray(io_noise)
  noise = np.concatenate([noise, -noise, noise[:, :, ::-1], -noise[:, :, :, ::-1]])[:n]
  classes = labels_lib.balanced_labels(n, io_labels.shape[1])
  return _nhwc(noise), labels_lib.one_hot_labels(classes, io_labels.shape[1])


def _seeded_dpmv3(mesh, num_steps=3):
  """DPM-Solver-v3 as a family would run it: sampling.seeded's jitted (params, base key, seeds) program,
  noise from each seed's key, balanced labels from each seed's position in the list (here 0..7)."""
  meta = load_json("edm2", "dpmv3_sampler", "config.json")
  net, variables = _net(meta["net"].split("/")[-1])
  label_dim = net.label_dim
  shape = (net.unet.img_resolution, net.unet.img_resolution, net.unet.img_channels)

  def sample(v, keys, positions):
    noise = jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)
    lab = labels_lib.one_hot_labels(labels_lib.balanced_classes(positions, label_dim), label_dim)
    x = dpmv3.dpmv3_sample(lambda x, s, l: net.apply(v, x, s, l), noise.astype(jnp.float64), lab,
                           num_steps=num_steps)
    return {"x": x, "label": lab}

  with jax.enable_x64(True):
    fn = seeded.make_seeded_sampler(sample, mesh, parallel.replicated(mesh))
    out = fn(variables, jax.random.key(0), jnp.arange(8, dtype=jnp.int32))
    assert out["x"].sharding.is_equivalent_to(parallel.batch_sharding(mesh), out["x"].ndim)
    np.testing.assert_array_equal(np.argmax(np.asarray(out["label"]), -1), np.arange(8) % label_dim)
    return np.asarray(out["x"])


@pytest.mark.parametrize("sampler", ["guided_heun", "dpmv3"])
def test_sharded_equals_single_device(sampler):
  """The guided Heun sampler of the fixture (two nets, explicit shardings), and DPM-Solver-v3 unguided with
  3 steps (first and second order and the corrector; fewer steps keep it fast, the program is the same
  scan) through sampling.seeded over parallel.make_mesh's mesh."""
  devices = jax.devices()
  assert len(devices) == 8
  n = len(devices)
  mesh = Mesh(np.asarray(devices).reshape(n, 1), ("data", "fsdp"))
  batch, repl = NamedSharding(mesh, P(("data", "fsdp"))), NamedSharding(mesh, P())
  one = NamedSharding(Mesh(np.asarray(devices[:1]).reshape(1, 1), ("data", "fsdp")), P())
  if sampler == "guided_heun":
    io = load_npz("edm2", "guided_sampler", "io.npz")
    noise, labels = _sharded_inputs(io["noise"], io["class_labels"], n)
    sharded = _run_guided_heun(noise, labels, False, ((repl, repl, batch, batch), batch))
    single = _run_guided_heun(noise, labels, False, ((one, one, one, one), one))
    atol = HEUN_ATOL
  else:
    sharded, single = _seeded_dpmv3(parallel.make_mesh(devices=devices)), \
        _seeded_dpmv3(parallel.make_mesh(devices=devices[:1]))
    atol = DPMV3_ATOL
  sharded, single = np.asarray(sharded), np.asarray(single)
  err = float(np.max(np.abs(sharded.astype(np.float64) - single)))
  print(f"{sampler}: 8-device vs 1-device max abs difference {err:.3g}")
  # Each sample's arithmetic is the same program on its own rows; only the kernels' blocking over a batch
  # of 1 vs 8 rounds differently: float32 rounding, which the samplers amplify as the README measured
  # (its kernel-swap spread), so the parity tolerances of each sampler.
  assert err <= atol
  assert float(np.max(np.abs(single[:4] - single[4:]))) > 1.0   # the 8 samples differ
