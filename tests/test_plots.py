"""ddo_jax.plots: each figure is a valid PNG, written atomically, with the labels a reader needs."""
import os

import numpy as np
import pytest
from matplotlib.figure import Figure

from ddo_jax import plots, utils

PNG = b"\x89PNG\r\n\x1a\n"


def _check_png(path, mode=None):
  data = path.read_bytes()
  assert data[:8] == PNG and len(data) > 1000
  assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []   # no temporary left
  if mode is not None:
    assert os.stat(path).st_mode & 0o777 == mode


def _legend_texts(ax):
  legend = ax.get_legend()
  return [t.get_text() for t in legend.get_texts()] if legend else []


def _history():
  return [{"step": 0, "swd": 0.0141, "recall": 1.0}, {"step": 250, "swd": 0.0123, "recall": 1.0},
          {"step": 500, "swd": 0.0128, "recall": 1.0}, {"step": 1000, "swd": 0.0140, "recall": 1.0}]


def _train_records(r=2):
  rng = np.random.default_rng(0)
  out = []
  for s in range(100, 1001, 100):
    out.append({"round": r, "step": s, "loss": 1.386 - 1e-5 * s + 1e-3 * rng.normal(), "d_real": 0.5 + 2e-6 * s,
                "d_fake": 0.5 - 3e-6 * s, "grad_norm": 1.0 + 0.1 * rng.normal()})
    if s % 250 == 0:
      out.append({"round": r, "step": s, "eval": True, "swd": 0.012})   # evaluation records are skipped
  out.append(dict(out[0], loss=9.0))                                    # a re-logged step: the last wins
  return out


@pytest.fixture
def umask_077():
  old = os.umask(0o077)
  yield
  os.umask(old)


def test_round_curve_with_training_panels(tmp_path):
  path = tmp_path / "round_002" / "metrics.png"
  fig = plots.round_curve(path, _history(), "swd", 2, mode="min", chosen_step=250, floor={"swd": 0.0079},
                          train_records=_train_records())
  _check_png(path, utils.default_file_mode())
  axes = fig.axes
  assert len(axes) == 4                              # eval metric, loss, d(real)/d(fake), gradient norm
  ev, loss, d, grad = axes
  assert ev.get_ylabel() == "swd (lower is better)"
  assert grad.get_xlabel() == "optimizer step"
  texts = _legend_texts(ev)
  assert "chosen (step 250) 0.0123" in texts
  assert any(t.startswith("fresh data (noise floor) 0.0079") for t in texts)
  assert any(t.startswith("reference = round 1's model (step 0) 0.0141") for t in texts)
  stars = [l for l in ev.get_lines() if l.get_marker() == "*"]
  assert len(stars) == 1 and list(stars[0].get_xdata()) == [250] and list(stars[0].get_ydata()) == [0.0123]
  assert any(list(l.get_xdata()) == [250, 250] for l in ev.get_lines())      # the vertical line at the step
  assert loss.get_ylabel() == "DDO loss"
  loss_line = loss.get_lines()[0]
  assert list(loss_line.get_xdata()) == list(range(100, 1001, 100)) and loss_line.get_ydata()[0] == 9.0
  assert {"d(real), batch mean", "d(fake), batch mean", "0.5 (model = reference)"} <= set(_legend_texts(d))
  assert any(list(l.get_ydata()) == [0.5, 0.5] for l in d.get_lines())
  assert "gradient norm" in grad.get_ylabel()


def test_round_curve_plain_and_higher_is_better(tmp_path):
  path = tmp_path / "metrics.png"
  fig = plots.round_curve(path, _history(), "recall", 3, mode="max")    # the driver's old call, plus a mode
  _check_png(path)
  assert len(fig.axes) == 1
  assert fig.axes[0].get_ylabel() == "recall (higher is better)"
  assert fig.axes[0].get_xlabel() == "optimizer step"
  # Positional call as rounds.py makes it today: the direction comes from the known metric names.
  fig = plots.round_curve(path, _history(), "swd", 3)
  assert fig.axes[0].get_ylabel() == "swd (lower is better)"


def test_metrics_per_round_integer_ticks_floor_and_direction(tmp_path, umask_077):
  summaries = [{"round": r, "metrics": {"swd": 0.02 / (r + 1), "precision": 0.93 + 0.001 * r, "recall": 1.0}}
               for r in range(6)]
  path = tmp_path / "metrics_per_round.png"
  fig = plots.metrics_per_round(path, summaries, {"swd": 0.0079, "precision": 0.99, "recall": 1.0},
                                modes={"swd": "min"})
  _check_png(path, 0o600)
  axes = [ax for ax in fig.axes if ax.axison]
  assert [ax.get_title() for ax in axes] == ["swd", "precision", "recall"]
  assert [ax.get_ylabel() for ax in axes] == ["swd (lower is better)", "precision (higher is better)",
                                              "recall (higher is better)"]
  for ax in axes:
    assert list(ax.get_xticks()) == [0, 1, 2, 3, 4, 5]
    assert ax.get_xlabel() == "round"
    assert any(t.startswith("fresh data (noise floor)") for t in _legend_texts(ax))
  # Many rounds: integer ticks from the locator, no fractional rounds.
  many = [{"round": r, "metrics": {"fid": 3.0 - 0.01 * r}} for r in range(40)]
  fig = plots.metrics_per_round(path, many, {})
  ticks = fig.axes[0].get_xticks()
  assert len(ticks) > 2 and all(float(t).is_integer() for t in ticks)
  assert fig.axes[0].get_ylabel() == "fid (lower is better)"


class _ScatterFamily:
  def plot_samples(self, ax, x, title):
    ax.scatter(x[:, 0], x[:, 1], s=1)
    ax.set_title(title, fontsize=8)


class _HeatmapFamily:
  """The way the grid toy can draw its samples: counts on the 16x16 grid with a colour bar."""

  def plot_samples(self, ax, x, title):
    counts = np.zeros((16, 16))
    np.add.at(counts, (x[:, 0], x[:, 1]), 1)
    plots.heatmap(ax, None, counts / counts.sum(), title, "second token", "first token", "share of samples")


@pytest.mark.parametrize("family", [_ScatterFamily(), _HeatmapFamily()])
def test_samples_per_round_with_ground_truth_first(tmp_path, family):
  rng = np.random.default_rng(0)
  samples = [rng.integers(0, 16, size=(500, 2)) for _ in range(3)]
  path = tmp_path / "samples_per_round.png"
  fig = plots.samples_per_round(path, family, samples, [f"round {r}" for r in range(3)],
                                ground_truth=rng.integers(0, 16, size=(500, 2)))
  _check_png(path)
  titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
  assert titles == ["ground truth (data)", "round 0", "round 1", "round 2"]
  # Without ground truth: as before, one panel per round.
  fig = plots.samples_per_round(path, family, samples, [f"round {r}" for r in range(3)])
  assert [ax.get_title() for ax in fig.axes if ax.get_title()] == ["round 0", "round 1", "round 2"]


def test_heatmap_has_colour_bar_and_labels(tmp_path):
  fig = Figure(figsize=(4, 3.3), layout="constrained")
  ax = fig.subplots()
  p = np.random.default_rng(0).dirichlet(np.ones(256)).reshape(16, 16)
  im = plots.heatmap(ax, fig, p, "p_theta", "second token", "first token", "probability")
  assert len(fig.axes) == 2                          # the panel and its colour bar
  assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == ("p_theta", "second token", "first token")
  assert im.colorbar.ax.get_ylabel() == "probability"
  assert all(float(t).is_integer() for t in ax.get_xticks())
  path = tmp_path / "heatmap.png"
  plots._save(fig, path)
  _check_png(path)
