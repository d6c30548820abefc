"""The run directory: what lives where, and the questions asked of it in several places.

  RUN/config.json          the full resolved config (a relaunch must match it)
  RUN/data_manifest.json   what data the run saw
  RUN/metrics.jsonl        one JSON object per line
  RUN/growth_report.json   grown runs only: the preservation report
  RUN/checkpoints/N/       orbax: state, data (iterator state), meta

Only names and reads live here (no JAX): the trainer, the initialisation seam, the sweep launcher
and the analysis all ask "does this run dir hold a checkpoint" through `checkpoint_steps`.
"""

from __future__ import annotations

import json
import os
from typing import Any

from growlm import fs
from growlm.errors import GrowlmError

CONFIG = "config.json"
DATA_MANIFEST = "data_manifest.json"
METRICS = "metrics.jsonl"
GROWTH_REPORT = "growth_report.json"
CHECKPOINTS = "checkpoints"
ORBAX_COMMIT_MARKER = "commit_success.txt"  # orbax's last file of a step saved to gs://


def config_path(workdir: str) -> str:
  return fs.join(workdir, CONFIG)


def checkpoints_dir(workdir: str) -> str:
  return fs.join(workdir, CHECKPOINTS)


def metrics_path(workdir: str) -> str:
  return fs.join(workdir, METRICS)


def stage_report_name(stage: int) -> str:
  """The preservation report of growth stage `stage` inside a run (growlm.config.stages)."""
  return f"growth_stage{stage}.json"


def checkpoint_steps(workdir: str) -> list[int]:
  """Step numbers of the checkpoints listed under RUN/checkpoints (sorted; damaged steps set
  aside as N.damaged-K and unfinished N.orbax-checkpoint-tmp-* saves are not listed)."""
  d = checkpoints_dir(workdir)
  if fs.is_url(d):
    try:
      names = fs.listdir(d)
    except FileNotFoundError:
      # An object store has no directories: a prefix whose first object is being written can
      # list as absent and exist a moment later. Only an object named like the dir is refused.
      if fs.isfile(d):
        raise GrowlmError(f"{d} is not a directory; accepted: a run dir's checkpoints/ directory "
                          "(move the object away)") from None
      return []
    # Orbax writes a step in place on an object store and commits it with this marker last.
    return sorted(int(n) for n in names
                  if n.isdigit() and fs.exists(fs.join(d, n, ORBAX_COMMIT_MARKER)))
  if not os.path.isdir(d):
    if os.path.lexists(d):
      raise GrowlmError(f"{d} is not a directory; accepted: a run dir's checkpoints/ directory "
                        "(move the file away)")
    return []
  return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def has_checkpoint(workdir: str) -> bool:
  return bool(checkpoint_steps(workdir))


def read_config(workdir: str) -> dict[str, Any] | None:
  """The run's saved config.json as a dict, None if there is none; GrowlmError if unreadable.

  Every command opens a run dir here first, so a checkpoints/ that is not a directory (which
  would otherwise read as "no checkpoint" and be trained over) is refused here too."""
  checkpoint_steps(workdir)
  path = config_path(workdir)
  if not fs.exists(path):
    return None
  return fs.read_json_object(path, "run config")


def read_metrics(path: str) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file (a torn last line from a crash is ignored)."""
  out = []
  try:
    text = fs.read_text(path)
  except FileNotFoundError:
    return out
  for line in text.splitlines():
    try:
      out.append(json.loads(line))
    except json.JSONDecodeError:
      continue
  return out


def last_step(rows: list[dict[str, Any]]) -> int | None:
  """The last step in metrics.jsonl `rows`; None while they record no step taken: only the
  start's lines (its eval and growth lines, at the step it started from), which "at step 0"
  would misreport as a step taken."""
  steps = [r["step"] for r in rows if isinstance(r.get("step"), int)]
  if not steps or (max(steps) == steps[0] and not any("train_loss" in r for r in rows)):
    return None
  return max(steps)
