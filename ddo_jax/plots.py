"""PNG figures of a run: samples per round, metric per round, evaluation and training curves of a round.

Every function draws on a `matplotlib.figure.Figure` (rendered by Agg; pyplot's global state is not
touched), writes the PNG through a temporary file renamed over `path` (with the permissions a plain open()
gives), and returns the Figure so callers and tests can inspect its axes.
"""
import math

import matplotlib
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from ddo_jax import utils

# Direction of the metrics we know, used when the caller does not say.
KNOWN_MODES = {"fid": "min", "swd": "min", "kl": "min", "reverse_kl": "min", "denoise_loss": "min",
               "loss": "min", "precision": "max", "recall": "max", "is": "max", "inception_score": "max"}

_STYLE = {"font.size": 9, "axes.titlesize": 9.5, "axes.labelsize": 9, "xtick.labelsize": 8,
          "ytick.labelsize": 8, "legend.fontsize": 7.5, "legend.framealpha": 0.85, "axes.grid": True,
          "grid.alpha": 0.3, "grid.linewidth": 0.6}
_FLOOR_STYLE = {"color": "0.35", "ls": "--", "lw": 1.2}
_DPI = 120


def _figure(figsize, layout: str = "constrained") -> Figure:
  return Figure(figsize=figsize, layout=layout)


def _save(fig: Figure, path) -> Figure:
  with utils.atomic_open(path, "wb") as f:
    fig.savefig(f, format="png", dpi=_DPI, bbox_inches="tight", pad_inches=0.08)
  return fig


def _mode(metric: str, modes) -> str:
  if isinstance(modes, str):
    return modes
  if modes and metric in modes:
    return modes[metric]
  return KNOWN_MODES.get(metric, "")


def direction(mode: str) -> str:
  """'(lower is better)' for 'min', '(higher is better)' for 'max', '' otherwise."""
  return {"min": "(lower is better)", "max": "(higher is better)"}.get(mode, "")


def metric_label(metric: str, mode: str) -> str:
  return f"{metric} {direction(mode)}".strip()


def _floor_value(floor, metric):
  if floor is None:
    return None
  if isinstance(floor, dict):
    floor = floor.get(metric)
  if floor is None:
    return None
  value = float(floor)
  return value if math.isfinite(value) else None


def _integer_ticks(ax, values) -> None:
  values = sorted(set(int(v) for v in values))
  if values and len(values) <= 12:
    ax.set_xticks(values)
  else:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10]))


# --- heatmaps (the grid toy's plot_samples) ----------------------------------------------------------------

def heatmap(ax, fig, p, title: str = "", xlabel: str = "", ylabel: str = "", cbar_label: str = "", *,
            cmap: str = "viridis", vmin=None, vmax=None, origin: str = "lower", ticks: bool = True):
  """p[i, j] as a heatmap (row i on the y axis, from the bottom with origin='lower') with a colour bar
  labelled `cbar_label`; `fig` may be None (then ax's figure). Returns the image."""
  fig = fig if fig is not None else ax.figure
  im = ax.imshow(p, cmap=cmap, vmin=vmin, vmax=vmax, origin=origin, interpolation="nearest", aspect="equal")
  cbar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.03)
  cbar.ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
  cbar.ax.tick_params(labelsize=7)
  if cbar_label:
    cbar.set_label(cbar_label, fontsize=8)
  ax.set_title(title, fontsize=8)
  ax.set_xlabel(xlabel, fontsize=8)
  ax.set_ylabel(ylabel, fontsize=8)
  ax.grid(False)
  if ticks:
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True, nbins=4))
    ax.tick_params(labelsize=7)
  else:
    ax.set_xticks([])
    ax.set_yticks([])
  return im


# --- samples of each round's chosen model ---------------------------------------------------------------

def samples_per_round(path, family, samples, titles, *, ground_truth=None,
                      ground_truth_title: str = "ground truth (data)", cols: int = 4) -> Figure:
  """One panel per round (family.plot_samples(ax, x, title)); with `ground_truth` (data samples in the
  same form) a first panel of the data drawn the same way."""
  panels = list(zip(samples, titles))
  if ground_truth is not None:
    panels.insert(0, (ground_truth, ground_truth_title))
  n = len(panels)
  cols = max(1, min(n, cols))
  rows = -(-n // cols)
  with matplotlib.rc_context(_STYLE):
    # 'compressed' packs fixed-aspect panels (scatter plots, heatmaps with colour bars) without gaps.
    fig = _figure((3.1 * cols, 3.1 * rows), layout="compressed")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
      ax.set_axis_off()
    for ax, (x, title) in zip(axes.flat, panels):
      ax.grid(False)
      family.plot_samples(ax, x, title)
  return _save(fig, path)


# --- the chosen model's metrics over rounds -------------------------------------------------------------

def metrics_per_round(path, summaries, floor, *, modes=None, cols: int = 3) -> Figure:
  """One panel per metric: the chosen model's value against the round (integer ticks; round 0 is the
  starting model), the data floor as a labelled dashed line. `modes` maps metric -> 'min' | 'max' (or
  one mode for all); metrics not in it use KNOWN_MODES."""
  keys = list(summaries[0]["metrics"].keys())
  rounds = [int(s["round"]) for s in summaries]
  cols = max(1, min(len(keys), cols))
  rows = -(-len(keys) // cols)
  with matplotlib.rc_context(_STYLE):
    fig = _figure((4.0 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[len(keys):]:
      ax.set_axis_off()
    for ax, k in zip(axes.flat, keys):
      values = [float(s["metrics"][k]) for s in summaries]
      ax.plot(rounds, values, "o-", color="C0", label="chosen model of the round")
      if rounds and rounds[0] == 0:
        ax.plot(rounds[:1], values[:1], "s", color="C1", ms=7, label="round 0 (starting model)")
      f = _floor_value(floor, k)
      if f is not None:
        ax.axhline(f, **_FLOOR_STYLE, label=f"fresh data (noise floor) {f:.4g}")
      _integer_ticks(ax, rounds)
      ax.set_xlabel("round")
      ax.set_ylabel(metric_label(k, _mode(k, modes)))
      ax.set_title(k)
      ax.legend(loc="best")
  return _save(fig, path)


# --- one round: evaluations and training curves ------------------------------------------------------------

def _train_series(train_records):
  """Training records (those with a 'loss', no 'eval'), one per step (the last), sorted by step."""
  by_step = {}
  for rec in train_records or ():
    if "loss" in rec and "step" in rec and not rec.get("eval"):
      by_step[int(rec["step"])] = rec
  return [by_step[s] for s in sorted(by_step)]


def round_curve(path, history, metric, r, *, mode=None, chosen_step=None, floor=None,
                train_records=None) -> Figure:
  """Round r's evaluation metric against the optimizer step: the reference (step 0) marked, the chosen
  step starred with a vertical line, the data floor dashed. With `train_records` (the round's
  metrics.jsonl training records: 'step', 'loss', 'd_real', 'd_fake', optionally 'loss_real',
  'loss_fake', 'grad_norm'), panels below share the step axis: the DDO loss, the discriminator outputs
  d(real) and d(fake) around 0.5, and the gradient norm when logged.

  `mode` is 'min' or 'max' (default: KNOWN_MODES, else no direction); `floor` a number or a dict of
  metric -> number."""
  mode = _mode(metric, mode)
  history = sorted(history, key=lambda h: h["step"])
  series = _train_series(train_records)
  panels = ["eval"]
  if series:
    panels.append("loss")
    if any("d_real" in rec or "d_fake" in rec for rec in series):
      panels.append("d")
    if any("grad_norm" in rec for rec in series):
      panels.append("grad_norm")
  with matplotlib.rc_context(_STYLE):
    fig = _figure((6.4, 3.0 + 2.2 * (len(panels) - 1)))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        height_ratios=[1.4] + [1.0] * (len(panels) - 1))[:, 0]
    ax = axes[0]
    steps = [int(h["step"]) for h in history]
    values = [float(h[metric]) for h in history]
    ax.plot(steps, values, "o-", color="C0", ms=4, label="evaluated checkpoints")
    ref = [(s, v) for s, v in zip(steps, values) if s == 0]
    if ref:
      ax.axhline(ref[0][1], color="C1", ls=":", lw=1)
      ax.plot([0], [ref[0][1]], "s", color="C1", ms=7,
              label=f"reference = round {r - 1}'s model (step 0) {ref[0][1]:.4g}")
    if chosen_step is not None:
      chosen = [v for s, v in zip(steps, values) if s == int(chosen_step)]
      ax.axvline(int(chosen_step), color="C3", ls="--", lw=1)
      if chosen:
        ax.plot([int(chosen_step)], chosen[:1], "*", color="C3", ms=15, mec="k", mew=0.5, zorder=5,
                label=f"chosen (step {int(chosen_step)}) {chosen[0]:.4g}")
      else:
        ax.plot([], [], "--", color="C3", label=f"chosen (step {int(chosen_step)})")
    f = _floor_value(floor, metric)
    if f is not None:
      ax.axhline(f, **_FLOOR_STYLE, label=f"fresh data (noise floor) {f:.4g}")
    ax.set_ylabel(metric_label(metric, mode))
    ax.set_title(f"round {r}: {metric} of the evaluated weights")
    ax.legend(loc="best")

    x = [int(rec["step"]) for rec in series]
    for ax, panel in zip(axes[1:], panels[1:]):
      if panel == "loss":
        ax.plot(x, [rec["loss"] for rec in series], color="C0", lw=1.3, label="DDO loss, training batch")
        ax.set_ylabel("DDO loss")
        ax.set_title("training loss (logged steps)")
      elif panel == "d":
        for key, color, name in (("d_real", "C2", "d(real)"), ("d_fake", "C3", "d(fake)")):
          pts = [(int(rec["step"]), rec[key]) for rec in series if key in rec]
          if pts:
            ax.plot(*zip(*pts), color=color, lw=1.3, label=f"{name}, batch mean")
        ax.axhline(0.5, **_FLOOR_STYLE, label="0.5 (model = reference)")
        ax.set_ylabel("discriminator output d")
        ax.set_title(r"$d(x) = \sigma(\beta\,\log\,p_\theta(x)/p_{ref}(x))$: real should rise, fake fall")
      elif panel == "grad_norm":
        pts = [(int(rec["step"]), rec["grad_norm"]) for rec in series if "grad_norm" in rec]
        ax.plot(*zip(*pts), color="C4", lw=1.1, label="gradient norm")
        ax.set_ylabel("gradient norm (global L2)")
        ax.set_title("gradient norm")
      ax.legend(loc="best")
    axes[-1].set_xlabel("optimizer step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 2.5, 5, 10]))
  return _save(fig, path)
