"""One run's curves, read from its run dir, and the loss-vs-FLOPs plot.

Shared by the sweep analysis (growlm.experiments.analysis) and the W&B tracker, which logs the
same plot for each run; only reads files.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from growlm import fs, rundir


def load_run(run_dir: str) -> dict[str, Any] | None:
  """{'name', 'dir', 'config', 'rows', 'report'} or None if the dir holds no run."""
  path = fs.join(run_dir, rundir.CONFIG)
  if not fs.exists(path):
    return None
  config = json.loads(fs.read_bytes(path))
  report_path = fs.join(run_dir, rundir.GROWTH_REPORT)
  report = None
  if fs.exists(report_path):
    report = json.loads(fs.read_bytes(report_path))
  return {"name": fs.basename(run_dir), "dir": run_dir, "config": config,
          "rows": rundir.read_metrics(rundir.metrics_path(run_dir)), "report": report}


def eval_datasets(run: dict) -> list[str]:
  names = []
  for r in run["rows"]:
    for k in r:
      if k.startswith("eval_loss/") and k[10:] not in names:
        names.append(k[10:])
  return names


def eval_curve(run: dict, dataset: str, with_source: bool = False) -> tuple[np.ndarray, ...]:
  """(flops, loss, step) at each evaluation of `dataset`, FLOPs optionally including the
  source model's training FLOPs."""
  key = f"eval_loss/{dataset}"
  rows = [r for r in run["rows"] if key in r]
  fkey = "flops_with_source" if with_source else "flops"
  flops = np.array([r.get(fkey, r["flops"]) for r in rows], float)
  return flops, np.array([r[key] for r in rows], float), np.array([r["step"] for r in rows])


def train_curve(run: dict, with_source: bool = False) -> tuple[np.ndarray, np.ndarray]:
  rows = [r for r in run["rows"] if "train_loss" in r]
  fkey = "flops_with_source" if with_source else "flops"
  return (np.array([r.get(fkey, r["flops"]) for r in rows], float),
          np.array([r["train_loss"] for r in rows], float))


def is_grown(run: dict) -> bool:
  """True for a run that started from a grown source or grows inside the run (stages)."""
  return bool(run["config"].get("init", {}).get("source") or run["config"].get("stages"))


def stage_flops(run: dict) -> list[float]:
  """FLOPs (with the source's) at each growth stage inside the run (growlm.config.stages)."""
  return [float(r.get("flops_with_source", r["flops"])) for r in run["rows"]
          if r.get("event") == "growth" and "stage" in r]


def plot_loss_curves(runs: list[dict], path: str, group: Any = None) -> str:
  """Eval loss against FLOPs (grown runs include their source's FLOPs), one panel per dataset;
  the growth point of each grown run is marked. `group(run)` names the line a run belongs to
  (repetitions over seeds: one line, their mean, in a band from their min to their max)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  datasets = []
  for run in runs:
    datasets += [d for d in eval_datasets(run) if d not in datasets]
  lines: dict[str, list[dict]] = {}
  for run in runs:
    lines.setdefault(group(run) if group else run["name"], []).append(run)
  fig, axes = plt.subplots(1, max(len(datasets), 1), figsize=(6 * max(len(datasets), 1), 4.5),
                           squeeze=False)
  for ax, ds in zip(axes[0], datasets):
    for name, members in lines.items():
      curves = [c for c in (eval_curve(r, ds, with_source=True) for r in members) if len(c[0])]
      if not curves:
        continue
      n = min(len(c[0]) for c in curves)
      f = np.mean([c[0][:n] for c in curves], axis=0)
      losses = np.array([c[1][:n] for c in curves])
      grown = is_grown(members[0])
      label = name if len(curves) == 1 else f"{name} (mean of {len(curves)})"
      (line,) = ax.plot(f, losses.mean(0), "-" if grown else "--", marker=".", label=label)
      if len(curves) > 1:
        ax.fill_between(f, losses.min(0), losses.max(0), color=line.get_color(), alpha=0.2)
      if grown:   # a growth stage inside the run is marked where it happened
        at = stage_flops(members[0]) or list(f[:1])
        ax.plot(at, np.interp(at, f, losses.mean(0)), marker="*", markersize=14,
                color=line.get_color(), linestyle="none")
    ax.set_xlabel("training FLOPs (grown runs: + source FLOPs)")
    ax.set_ylabel(f"eval loss ({ds}), nats/token")
    ax.set_title(ds)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.suptitle("loss vs compute (star: growth point)")
  fig.tight_layout()
  if fs.is_url(path):
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    fs.write_bytes_atomic(path, buf.getvalue())
  else:
    fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
