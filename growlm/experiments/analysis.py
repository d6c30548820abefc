"""Reads run dirs of a sweep and answers: how much compute did growing save?

Only reads files (config.json, metrics.jsonl, growth_report.json); never trains. For every
grown run it finds the from-scratch run of the same model and reports, per eval dataset:
the loss right after growth against the scratch run's loss at step 0 and at the same FLOPs,
final losses, the FLOPs the grown run needed to reach the scratch run's final eval loss, and
the savings 1 - FLOPs(grown to target) / FLOPs(scratch), without and with the source model's
own training FLOPs (docs/design.md, "Compute accounting").
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from growlm.curves import eval_curve, eval_datasets, is_grown, load_run, plot_loss_curves
from growlm.curves import train_curve  # noqa: F401  (public: notebooks read curves here too)
from growlm import fs
from growlm.errors import GrowlmError

_IGNORED_MODEL_FIELDS = ("norm_eps",)  # growth may rescale it; the architecture is the same


def load_sweep(sweep_dir: str) -> list[dict[str, Any]]:
  runs = []
  try:
    names = fs.listdir(sweep_dir)
  except FileNotFoundError:
    raise GrowlmError(f"sweep dir {sweep_dir} does not exist; accepted: a directory of run dirs "
                      "(local or gs://)") from None
  for name in names:
    d = fs.join(sweep_dir, name)
    if fs.isdir(d):
      run = load_run(d)
      if run is not None:
        runs.append(run)
  return runs


def flops_to_reach(flops: np.ndarray, loss: np.ndarray, target: float) -> float | None:
  """FLOPs at which the curve first reaches `target`, interpolated between evaluations."""
  for i in range(len(loss)):
    if loss[i] <= target:
      if i == 0:
        return float(flops[0])
      f0, f1, l0, l1 = flops[i - 1], flops[i], loss[i - 1], loss[i]
      return float(f0 + (f1 - f0) * (l0 - target) / (l0 - l1))
  return None


def loss_at(flops: np.ndarray, loss: np.ndarray, f: float) -> float | None:
  """Loss interpolated at FLOPs `f` (None outside the curve)."""
  if len(flops) == 0 or f < flops[0] or f > flops[-1]:
    return None
  return float(np.interp(f, flops, loss))


def _arch(run: dict) -> dict:
  return {k: v for k, v in run["config"]["model"].items() if k not in _IGNORED_MODEL_FIELDS}


def find_baseline(run: dict, runs: list[dict]) -> dict | None:
  """The from-scratch run of the same architecture (same data and token budget preferred)."""
  cands = [r for r in runs if not is_grown(r) and _arch(r) == _arch(run) and r is not run]
  same_budget = [r for r in cands if r["config"]["train"]["num_steps"] ==
                 run["config"]["train"]["num_steps"]]
  return (same_budget or cands or [None])[0]


def _final(run: dict, dataset: str) -> tuple[float | None, float | None]:
  f, l, _ = eval_curve(run, dataset)
  return (float(l[-1]), float(f[-1])) if len(l) else (None, None)


def compare(grown: dict, scratch: dict) -> dict[str, Any]:
  """The comparison of one grown run with its scratch baseline, per eval dataset."""
  report = grown["report"] or {}
  source_flops = float(report.get("source_flops", 0.0))
  out: dict[str, Any] = {"run": grown["name"], "baseline": scratch["name"],
                         "method": report.get("method", "?"),
                         "exact_expected": report.get("exact_expected"),
                         "max_abs_logit_diff": report.get("max_abs_logit_diff"),
                         "source_flops": source_flops, "datasets": {}}
  for ds in eval_datasets(grown):
    gf, gl, _ = eval_curve(grown, ds)
    sf, sl, _ = eval_curve(scratch, ds)
    if not len(gl) or not len(sl):
      continue
    target, scratch_flops = float(sl[-1]), float(sf[-1])
    reach = flops_to_reach(gf, gl, target)
    out["datasets"][ds] = {
        "loss_after_growth": float(gl[0]),
        "scratch_loss_step0": float(sl[0]),
        "scratch_loss_at_source_flops": loss_at(sf, sl, source_flops),
        "final_loss": float(gl[-1]),
        "scratch_final_loss": target,
        "scratch_flops": scratch_flops,
        "flops_to_scratch_final": reach,
        "savings": None if reach is None else 1.0 - reach / scratch_flops,
        "savings_with_source": (None if reach is None else
                                1.0 - (reach + source_flops) / scratch_flops),
    }
  return out


def analyze(sweep_dir: str, plot: bool = True) -> dict[str, Any]:
  """Writes results.json, results.md (and loss_curves.png) in `sweep_dir`; returns results."""
  runs = load_sweep(sweep_dir)
  results: dict[str, Any] = {"sweep_dir": fs.absolute(sweep_dir), "runs": {}, "grown": []}
  sources = {fs.absolute(r["config"]["init"]["source"]) for r in runs if is_grown(r)}
  for run in runs:
    final = {ds: _final(run, ds)[0] for ds in eval_datasets(run)}
    kind = ("grown" if is_grown(run) else
            "source" if fs.absolute(run["dir"]) in sources else "scratch")
    f = [r["flops"] for r in run["rows"] if "flops" in r]
    results["runs"][run["name"]] = {
        "kind": kind,
        "model": {k: run["config"]["model"][k] for k in ("d_model", "n_layers", "n_heads",
                                                          "mlp_dim")},
        "steps": max((r["step"] for r in run["rows"]), default=0),
        "flops": max(f, default=0.0), "final_eval_loss": final}
  for run in runs:
    if not is_grown(run):
      continue
    base = find_baseline(run, runs)
    results["grown"].append(compare(run, base) if base else
                            {"run": run["name"], "baseline": None})
  fs.write_json_atomic(fs.join(sweep_dir, "results.json"), results)
  fs.write_text_atomic(fs.join(sweep_dir, "results.md"), results_markdown(results))
  if plot and runs:
    plot_loss_curves(runs, fs.join(sweep_dir, "loss_curves.png"))
  return results


def _fmt(v, spec=".4f", missing="n/a") -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return missing
  return format(v, spec)


def results_markdown(results: dict[str, Any]) -> str:
  """The savings table (one row per grown run and dataset) and the run list."""
  lines = ["# Grown vs from-scratch", "",
           "FLOPs: PaLM convention (6N + 12 L H E T per token). Savings = 1 - FLOPs(grown run to "
           "reach the scratch run's final eval loss) / FLOPs(scratch run); \"+src\" adds the "
           "source model's training FLOPs to the grown run's.", "",
           "| run | method | dataset | loss after growth | scratch @ step 0 | scratch @ source "
           "FLOPs | final | scratch final | savings | savings +src |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for g in results["grown"]:
    if not g.get("baseline"):
      lines.append(f"| {g['run']} | no scratch baseline of this size | | | | | | | | |")
      continue
    for ds, d in g["datasets"].items():
      lines.append(
          f"| {g['run']} | {g['method']} | {ds} | {_fmt(d['loss_after_growth'])} | "
          f"{_fmt(d['scratch_loss_step0'])} | {_fmt(d['scratch_loss_at_source_flops'])} | "
          f"{_fmt(d['final_loss'])} | {_fmt(d['scratch_final_loss'])} | "
          f"{_fmt(d['savings'], '.1%', 'not reached')} | "
          f"{_fmt(d['savings_with_source'], '.1%', 'not reached')} |")
  lines += ["", "| run | kind | d_model | layers | steps | FLOPs |", "|---|---|---|---|---|---|"]
  for name, r in results["runs"].items():
    lines.append(f"| {name} | {r['kind']} | {r['model']['d_model']} | {r['model']['n_layers']} "
                 f"| {r['steps']} | {r['flops']:.3e} |")
  return "\n".join(lines) + "\n"
