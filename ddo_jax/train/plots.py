"""PNG figures of a run: samples per round, metric per round, eval curve within a round."""
import os
import pathlib
import tempfile

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _save(fig, path) -> None:
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
  os.close(fd)
  fig.savefig(tmp, dpi=110, bbox_inches="tight")
  plt.close(fig)
  os.replace(tmp, path)


def samples_per_round(path, family, samples, titles) -> None:
  n = len(samples)
  cols = min(n, 3)
  rows = -(-n // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
  for ax in axes.flat:
    ax.axis("off")
  for ax, x, title in zip(axes.flat, samples, titles):
    ax.axis("on")
    family.plot_samples(ax, x, title)
  _save(fig, path)


def metrics_per_round(path, summaries, floor) -> None:
  keys = list(summaries[0]["metrics"].keys())
  fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
  rounds = [s["round"] for s in summaries]
  for ax, k in zip(axes.flat, keys):
    ax.plot(rounds, [s["metrics"][k] for s in summaries], "o-", label="chosen model")
    if k in floor:
      ax.axhline(floor[k], color="gray", ls="--", label="fresh data")
    ax.set_xlabel("round")
    ax.set_title(k)
    ax.legend(fontsize=7)
  _save(fig, path)


def round_curve(path, history, metric, r) -> None:
  fig, ax = plt.subplots(figsize=(4, 3))
  ax.plot([h["step"] for h in history], [h[metric] for h in history], "o-")
  ax.set_xlabel("step")
  ax.set_ylabel(metric)
  ax.set_title(f"round {r}")
  _save(fig, path)
