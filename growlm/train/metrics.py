"""The run's metrics.jsonl writer (one JSON object per line) and the terminal progress bar."""

from __future__ import annotations

import json
import os
import sys
from typing import Any

from tqdm import tqdm

from growlm.rundir import read_metrics


class MetricsWriter:
  """Appends JSON lines; on resume, drops lines past the restored step so the file reads as
  one uninterrupted run."""

  def __init__(self, path: str, *, enabled: bool = True, truncate_after_step: int | None = None):
    self.enabled = enabled
    self._f = None
    if not enabled:
      return
    if truncate_after_step is not None and os.path.exists(path):
      keep = [r for r in read_metrics(path) if r.get("step", 0) <= truncate_after_step]
      tmp = path + ".tmp"
      with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
      os.replace(tmp, path)
    self._f = open(path, "a")

  def write(self, record: dict[str, Any]) -> None:
    if self._f is not None:
      self._f.write(json.dumps(record) + "\n")
      self._f.flush()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None


class ProgressBar:
  """tqdm bar over steps with the latest loss; ETA comes from tqdm's rate."""

  def __init__(self, start: int, end: int, *, enabled: bool = True):
    # Only on a terminal: redirected to a file, a bar is a flood of carriage returns.
    enabled = enabled and sys.stderr.isatty()
    self._bar = tqdm(total=end, initial=start, dynamic_ncols=True, file=sys.stderr, unit="step",
                     smoothing=0.1, mininterval=0.5) if enabled else None
    self._last = start

  def update(self, step: int, loss: float) -> None:
    if self._bar is not None:
      self._bar.update(step - self._last)
      self._bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
      self._last = step

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
