"""Reads run dirs of a sweep and answers: how much compute did growing save?

Only reads files (config.json, metrics.jsonl, growth_report.json); never trains. For every
grown run it finds the from-scratch run of the same model and reports, per eval dataset:
the loss right after growth against the scratch run's loss at step 0 and at the same FLOPs,
final losses, the FLOPs the grown run needed to reach the scratch run's final eval loss, and
the savings 1 - FLOPs(grown to target) / FLOPs(scratch), without and with the source model's
own training FLOPs (docs/design.md, "Compute accounting"), against the same-budget scratch run
and against the cheapest scratch run of any budget (the frontier), and in wall-clock.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from growlm.curves import eval_curve, eval_datasets, is_grown, load_run, plot_loss_curves
from growlm.curves import train_curve  # public here too: notebooks read curves from analysis
from growlm import fs, rundir
from growlm.config.stages import final_model
from growlm.errors import GrowlmError
from growlm.experiments import sweep as sweep_lib
from growlm.train import tracking

_IGNORED_MODEL_FIELDS = ("norm_eps",)  # growth may rescale it; the architecture is the same


def load_sweep(sweep_dir: str) -> list[dict[str, Any]]:
  """Every run dir in `sweep_dir`, loaded; GrowlmError when there is none (a mistyped sweep dir
  is refused before anything reads it: the notebook's first cell, analyze)."""
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
  if not runs:
    raise GrowlmError(f"sweep dir {sweep_dir} holds no run dirs (config.json and metrics.jsonl); "
                      "accepted: the --sweep_dir of a launched sweep")
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
  return {k: v for k, v in final_model(run["config"]).items() if k not in _IGNORED_MODEL_FIELDS}


def _seed_of(run: dict, seeds: int) -> str:
  """The repetition suffix of a run of a sweep launched with --seeds ('' otherwise)."""
  return run["name"][len(sweep_lib.base_name(run["name"], seeds)):]


def scratch_runs(run: dict, runs: list[dict], seeds: int = 1) -> list[dict]:
  """The from-scratch runs of `run`'s architecture, at any budget (of the same seed, in a sweep
  repeated over seeds: each repetition is compared within itself)."""
  return [r for r in runs if not is_grown(r) and _arch(r) == _arch(run) and r is not run
          and _seed_of(r, seeds) == _seed_of(run, seeds)]


def find_baseline(run: dict, runs: list[dict], seeds: int = 1) -> dict | None:
  """The from-scratch run of the same architecture (same data and token budget preferred). A
  run with growth stages counts the steps it took at its final size, as a grown run does (its
  earlier stages play the source's part, and its FLOPs include them)."""
  cands = scratch_runs(run, runs, seeds)
  steps = run["config"]["train"]["num_steps"] - max(
      (s["step"] for s in run["config"].get("stages") or []), default=0)
  same_budget = [r for r in cands if r["config"]["train"]["num_steps"] == steps]
  return (same_budget or cands or [None])[0]


def _eval_wall(run: dict, dataset: str) -> np.ndarray:
  """Wall-clock seconds at each evaluation of `dataset` (NaN where a row has none)."""
  key = f"eval_loss/{dataset}"
  return np.array([r.get("wall_seconds", math.nan) for r in run["rows"] if key in r], float)


def frontier(target: float, dataset: str, scratch: list[dict]) -> tuple[float | None, str | None]:
  """(FLOPs, run) of the cheapest scratch run to reach `target`: each run with its own full
  schedule, so a longer budget may reach the loss sooner or later than a shorter one; the
  compute-efficient frontier is the least FLOPs over all of them."""
  best: tuple[float | None, str | None] = (None, None)
  for r in scratch:
    f, l, _ = eval_curve(r, dataset)
    reach = flops_to_reach(f, l, target) if len(l) else None
    if reach is not None and (best[0] is None or reach < best[0]):
      best = (reach, r["name"])
  return best


def frontier_loss(f: float, dataset: str, scratch: list[dict]) -> float | None:
  """The lowest eval loss any scratch run had at FLOPs `f` (interpolated; a run whose curve
  ends before `f` does not count): the frontier at equal compute."""
  at = [loss_at(*eval_curve(r, dataset)[:2], f) for r in scratch]
  return min((v for v in at if v is not None), default=None)


def _final(run: dict, dataset: str) -> tuple[float | None, float | None]:
  f, l, _ = eval_curve(run, dataset)
  return (float(l[-1]), float(f[-1])) if len(l) else (None, None)


def _saving(used: float | None, scratch: float | None) -> float | None:
  return None if used is None or not scratch else 1.0 - used / scratch


def compare(grown: dict, scratch: dict, others: list[dict] | None = None) -> dict[str, Any]:
  """The comparison of one grown run with its scratch baseline, per eval dataset; `others` are
  every scratch run of its architecture (any budget), for the frontier.

  A grown run whose first evaluation (right after growth) is already at or below the
  target reached it with the source's compute alone: its savings are reported as
  `reached_at_growth`, never as 100%; savings counting the source stay a number. A run that
  grows inside itself (stages) starts from scratch: it has no source and no loss after growth."""
  report = grown["report"] or {}
  source_flops = float(report.get("source_flops", 0.0))
  stages = grown["config"].get("stages") or []
  method = report.get("method", "?") if not stages else "stages " + ", ".join(
      f"{s['plan']['width']}+{s['plan']['depth']}@{s['step']}" for s in stages)
  out: dict[str, Any] = {"run": grown["name"], "baseline": scratch["name"], "method": method,
                         "exact_expected": report.get("exact_expected"),
                         "max_abs_logit_diff": report.get("max_abs_logit_diff"),
                         "source_flops": source_flops, "datasets": {}}
  every = others if others is not None else [scratch]   # the frontier's scratch runs
  for ds in eval_datasets(grown):
    gf, gl, _ = eval_curve(grown, ds)
    sf, sl, _ = eval_curve(scratch, ds)
    if not len(gl) or not len(sl):
      continue
    target, scratch_flops = float(sl[-1]), float(sf[-1])
    reach = flops_to_reach(gf, gl, target)
    at_growth = not stages and reach is not None and float(gl[0]) <= target
    front, front_run = frontier(target, ds, every)
    gw, sw = _eval_wall(grown, ds), _eval_wall(scratch, ds)
    wall_reach = (float(np.interp(reach, gf, gw)) if reach is not None and len(gw)
                  and not np.isnan(gw).any() else None)
    scratch_wall = float(sw[-1]) if len(sw) and not math.isnan(sw[-1]) else None
    eq, eq_src = (frontier_loss(float(gf[-1]) + extra, ds, every) for extra in (0.0, source_flops))
    out["datasets"][ds] = {
        "loss_after_growth": None if stages else float(gl[0]),
        "scratch_loss_step0": float(sl[0]),
        "scratch_loss_at_source_flops": loss_at(sf, sl, source_flops),
        "final_loss": float(gl[-1]),
        "scratch_final_loss": target,
        "scratch_flops": scratch_flops,
        "flops_to_scratch_final": reach,
        "reached_at_growth": at_growth,
        "savings": None if at_growth else _saving(reach, scratch_flops),
        "savings_with_source": _saving(None if reach is None else reach + source_flops,
                                       scratch_flops),
        "frontier_flops": front,
        "frontier_run": front_run,
        "savings_vs_frontier": None if at_growth else _saving(reach, front),
        "savings_vs_frontier_with_source": _saving(
            None if reach is None else reach + source_flops, front),
        "wall_seconds_to_scratch_final": wall_reach,
        "scratch_wall_seconds": scratch_wall,
        "wall_savings": None if at_growth else _saving(wall_reach, scratch_wall),
        "frontier_loss_at_final_flops": eq,
        "final_vs_frontier": None if eq is None else float(gl[-1]) - eq,
        "frontier_loss_at_final_flops_with_source": eq_src,
        "final_vs_frontier_with_source": None if eq_src is None else float(gl[-1]) - eq_src,
        "final_train_loss": _last_train(grown),
        "scratch_final_train_loss": _last_train(scratch),
    }
  return out


def _last_train(run: dict) -> float | None:
  _, losses = train_curve(run)
  return float(losses[-1]) if len(losses) else None


def sweep_seeds(sweep_dir: str) -> int:
  """How many seeds the sweep was launched with (SWEEP/sweep.json; 1 without one)."""
  path = fs.join(sweep_dir, sweep_lib.MANIFEST)
  if not fs.exists(path):
    return 1
  seeds = fs.read_json_object(path, "sweep manifest").get("seeds", 1)
  return seeds if isinstance(seeds, int) and seeds >= 1 else 1


POOLED = ("loss_after_growth", "final_loss", "final_train_loss", "savings",
          "savings_with_source", "savings_vs_frontier", "savings_vs_frontier_with_source",
          "wall_savings", "final_vs_frontier", "final_vs_frontier_with_source")


def pool(grown: list[dict], seeds: int) -> list[dict[str, Any]]:
  """Per sweep run (its repetitions over seeds together) and eval dataset: n, and mean, sample
  standard deviation, min and max of each POOLED figure over the repetitions that have it;
  `reached_at_growth` counts the repetitions that reached the target at growth."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for g in grown:
    if not g.get("baseline"):
      continue
    for ds, d in g["datasets"].items():
      groups.setdefault((sweep_lib.base_name(g["run"], seeds), ds), []).append(
          dict(d, method=g["method"]))
  out = []
  for (name, ds), ds_rows in groups.items():
    row: dict[str, Any] = {"run": name, "dataset": ds, "method": ds_rows[0]["method"],
                           "n": len(ds_rows),
                           "reached_at_growth": sum(bool(d["reached_at_growth"]) for d in ds_rows)}
    for key in POOLED:
      v = np.array([d[key] for d in ds_rows if d.get(key) is not None], float)
      row[key] = ({"n": len(v), "mean": float(v.mean()),
                   "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                   "min": float(v.min()), "max": float(v.max())} if len(v) else None)
    out.append(row)
  return out


def _last_step(run: dict) -> int:
  return max((r["step"] for r in run["rows"] if isinstance(r.get("step"), int)), default=0)


def is_finished(run: dict) -> bool:
  """Whether the run reached its last step (train.num_steps): a run still training, or stopped,
  has no final loss yet, and a comparison with it would be read as a result."""
  return _last_step(run) >= run["config"]["train"]["num_steps"]


def _unfinished(run: dict) -> str:
  step, total = rundir.last_step(run["rows"]), run["config"]["train"]["num_steps"]
  return (f"{run['name']} before its first step (of {total})" if step is None
          else f"{run['name']} at step {step} of {total}")


def _comparison(run: dict, runs: list[dict], seeds: int) -> dict[str, Any]:
  """compare() of a finished grown run with its finished baseline; while the run or the scratch
  run it would be compared with is unfinished, an entry that says so and compares nothing."""
  base = find_baseline(run, runs, seeds)
  waiting = [r for r in (run, base) if r is not None and not is_finished(r)]
  if waiting or base is None:
    return {"run": run["name"], "baseline": None,
            "unfinished": [_unfinished(r) for r in waiting]}
  return compare(run, base, scratch_runs(run, [r for r in runs if is_finished(r)], seeds))


def analyze(sweep_dir: str, plot: bool = True) -> dict[str, Any]:
  """Writes results.json, results.md (and loss_curves.png) in `sweep_dir`; returns results.
  Only finished runs are compared; an unfinished one is listed with its step."""
  runs = load_sweep(sweep_dir)
  seeds = sweep_seeds(sweep_dir)
  results: dict[str, Any] = {"sweep_dir": fs.absolute(sweep_dir), "seeds": seeds, "runs": {},
                             "grown": []}
  # By path, or by name when the sweep dir was moved after launch (the paths name the old place).
  sources = {r["config"]["init"]["source"].rstrip("/") for r in runs
             if r["config"]["init"].get("source")}
  sources = {fs.absolute(s) for s in sources} | {fs.basename(s) for s in sources}
  for run in runs:
    final = {ds: _final(run, ds)[0] for ds in eval_datasets(run)}
    kind = ("grown" if is_grown(run) else
            "source" if {fs.absolute(run["dir"]), run["name"]} & sources else "scratch")
    f = [r["flops"] for r in run["rows"] if "flops" in r]
    wall = [r["wall_seconds"] for r in run["rows"] if "wall_seconds" in r]
    model = final_model(run["config"])
    results["runs"][run["name"]] = {
        "kind": kind,
        "model": {k: model[k] for k in ("d_model", "n_layers", "n_heads", "mlp_dim")},
        "steps": _last_step(run),
        "num_steps": run["config"]["train"]["num_steps"], "finished": is_finished(run),
        "flops": max(f, default=0.0), "wall_seconds": max(wall, default=None),
        "final_eval_loss": final, "final_train_loss": _last_train(run)}
  for run in runs:
    if is_grown(run):
      results["grown"].append(_comparison(run, runs, seeds))
  results["pooled"] = pool(results["grown"], seeds)
  fs.write_json_atomic(fs.join(sweep_dir, "results.json"), results)
  fs.write_text_atomic(fs.join(sweep_dir, "results.md"), results_markdown(results))
  png = None
  if plot and runs:
    png = plot_loss_curves(runs, fs.join(sweep_dir, "loss_curves.png"),
                           group=lambda r: sweep_lib.base_name(r["name"], seeds))
  if runs:
    tracking.log_sweep_results(sweep_dir, runs[0]["config"], *results_table(results), png)
  return results


def results_table(results: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
  """(columns, rows): one row per grown run and eval dataset, the numbers of results.json."""
  keys = ("loss_after_growth", "final_loss", "scratch_final_loss", "final_train_loss",
          "reached_at_growth", "savings", "savings_with_source", "savings_vs_frontier",
          "savings_vs_frontier_with_source", "wall_savings", "final_vs_frontier",
          "final_vs_frontier_with_source")
  rows = [[g["run"], g["method"], g["baseline"], ds] + [d.get(k) for k in keys]
          for g in results["grown"] if g.get("baseline") for ds, d in g["datasets"].items()]
  return ["run", "method", "baseline", "dataset", *keys], rows


def _fmt(v, spec=".4f", missing="n/a") -> str:
  if v is None or (isinstance(v, float) and math.isnan(v)):
    return missing
  return format(v, spec)


def _pm(stat: dict | None, pct: bool = False) -> str:
  """mean ± std (n) of a pooled figure, in percent for savings, else to 4 decimals."""
  if stat is None:
    return "n/a"
  spec = ".1%" if pct else ".4f"
  return f"{stat['mean']:{spec}} ± {stat['std']:{spec}} ({stat['n']})"


def _savings_cell(d: dict, key: str) -> str:
  if d.get("reached_at_growth") and not key.endswith("with_source"):
    return "reached at growth: source FLOPs only"
  return _fmt(d[key], ".1%", "not reached")


def results_markdown(results: dict[str, Any]) -> str:
  """The savings table (one row per grown run and dataset) and the run list."""
  lines = ["# Grown vs from-scratch", "",
           "FLOPs: PaLM convention (6N + 12 L H E T per token). Savings = 1 - FLOPs(grown run to "
           "reach the scratch run's final eval loss) / FLOPs(scratch run); \"+src\" adds the "
           "source model's training FLOPs to the grown run's; \"frontier\" divides by the least "
           "FLOPs any scratch run of that size (each budget with its own schedule) needed to "
           "reach the same loss; \"wall\" is the same ratio in wall-clock seconds. A grown run "
           "already at the target right after growth reads \"reached at growth\". \"final - "
           "frontier\" is the grown run's final eval loss minus the lowest loss any scratch run "
           "of that size had at the same FLOPs (+src: at the grown run's FLOPs plus the "
           "source's): below zero, growth did better at equal compute.", "",
           "| run | method | dataset | loss after growth | scratch @ step 0 | scratch @ source "
           "FLOPs | final | scratch final | train final | scratch train final | savings | "
           "savings +src | frontier | frontier +src | wall | final - frontier | "
           "final - frontier +src |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for g in results["grown"]:
    if g.get("unfinished"):
      lines.append(f"| {g['run']} | unfinished: {', '.join(g['unfinished'])} |" + " |" * 15)
      continue
    if not g.get("baseline"):
      lines.append(f"| {g['run']} | no scratch baseline of this size |" + " |" * 15)
      continue
    for ds, d in g["datasets"].items():
      lines.append(
          f"| {g['run']} | {g['method']} | {ds} | {_fmt(d['loss_after_growth'])} | "
          f"{_fmt(d['scratch_loss_step0'])} | {_fmt(d['scratch_loss_at_source_flops'])} | "
          f"{_fmt(d['final_loss'])} | {_fmt(d['scratch_final_loss'])} | "
          f"{_fmt(d['final_train_loss'])} | {_fmt(d['scratch_final_train_loss'])} | "
          f"{_savings_cell(d, 'savings')} | {_savings_cell(d, 'savings_with_source')} | "
          f"{_savings_cell(d, 'savings_vs_frontier')} | "
          f"{_savings_cell(d, 'savings_vs_frontier_with_source')} | "
          f"{_savings_cell(d, 'wall_savings')} | {_fmt(d['final_vs_frontier'], '+.4f')} | "
          f"{_fmt(d['final_vs_frontier_with_source'], '+.4f')} |")
  if results.get("seeds", 1) > 1:
    lines += ["", f"## Over {results['seeds']} seeds", "",
              "Mean ± sample standard deviation over the repetitions (n); each repetition is "
              "compared with the scratch runs of its own seed.", "",
              "| run | method | dataset | n | final | savings | savings +src | frontier | "
              "frontier +src | final - frontier | final - frontier +src | reached at growth |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in results.get("pooled", []):
      cells = [_pm(p["final_loss"])] + [_pm(p[k], pct=True) for k in (
          "savings", "savings_with_source", "savings_vs_frontier",
          "savings_vs_frontier_with_source")] + [
              _pm(p[k]) for k in ("final_vs_frontier", "final_vs_frontier_with_source")]
      lines.append(f"| {p['run']} | {p['method']} | {p['dataset']} | {p['n']} | "
                   + " | ".join(cells) + f" | {p['reached_at_growth']} of {p['n']} |")
  lines += ["", "| run | kind | d_model | layers | steps | FLOPs | wall s | train loss |",
            "|---|---|---|---|---|---|---|---|"]
  for name, r in results["runs"].items():
    steps = r["steps"] if r.get("finished", True) else f"{r['steps']} of {r['num_steps']}"
    lines.append(f"| {name} | {r['kind']} | {r['model']['d_model']} | {r['model']['n_layers']} "
                 f"| {steps} | {r['flops']:.3e} | {_fmt(r['wall_seconds'], '.1f')} | "
                 f"{_fmt(r['final_train_loss'])} |")
  return "\n".join(lines) + "\n"
