"""The run's metrics.jsonl writer (one JSON object per line) and the terminal progress bar."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from tqdm import tqdm

from growlm import fs
from growlm.errors import GrowlmError


def read_records(path: str) -> list[dict[str, Any]]:
  """The records of a run's metrics.jsonl, strictly: a torn last line (a crash mid-write) is
  dropped, anything else that is not a JSON object per line is refused with one line, so a
  resume never silently rewrites a file it does not understand."""
  if not fs.exists(path):
    return []
  if not fs.isfile(path):
    raise GrowlmError(f"{path} is not a file; accepted: the run's metrics.jsonl (JSON lines), "
                      "or no file")
  try:
    lines = fs.read_text(path).split("\n")
  except UnicodeDecodeError as e:
    raise GrowlmError(f"{path} is not text (byte {e.start} is not UTF-8); accepted: the run's "
                      "metrics.jsonl (JSON lines); move it away to start the history anew") from e
  except OSError as e:
    raise GrowlmError(f"cannot read {path} ({type(e).__name__}: {e.strerror})") from e
  out = []
  last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      rec = json.loads(line)
    except json.JSONDecodeError:
      rec = None
    if not isinstance(rec, dict) or not isinstance(rec.get("step", 0), int):
      if i == last and rec is None:
        continue   # the last line was cut short by a crash
      raise GrowlmError(f"{path} line {i + 1} is not a metrics record (a JSON object with an "
                        "integer step); accepted: the run's metrics.jsonl; move it away to start "
                        "the history anew")
    out.append(rec)
  return out

# How often, at most, a gs:// run dir's files that change as training goes (metrics.jsonl, the
# W&B resume state) are uploaded again: an object store has no append, and each upload is a
# network round trip the training loop waits for. Each is also stored at every checkpoint.
UPLOAD_EVERY_S = 30.0


def check_metrics_file(path: str) -> None:
  """Raises GrowlmError (one line) if `path` exists and is not a readable metrics.jsonl."""
  read_records(path)


class MetricsWriter:
  """Appends JSON lines; on resume, drops lines past the restored step so the file reads as
  one uninterrupted run.

  Object stores have no append: on a gs:// run dir the lines are kept in memory and the whole
  object is rewritten at most every `upload_every_s`, at every `flush()` (the trainer flushes
  before each checkpoint, so a resume never finds a gap before its step) and at `close()`."""

  def __init__(self, path: str, *, enabled: bool = True, truncate_after_step: int | None = None,
               upload_every_s: float = UPLOAD_EVERY_S):
    self.enabled = enabled
    self.path = path
    self._f = None
    self._lines: list[str] | None = None  # a URL's whole content
    self._uploaded = time.monotonic()
    self._upload_every_s = upload_every_s
    # Wall-clock the kept lines had reached (earlier launches of a resumed run), so the run's
    # wall_seconds carries on from there; 0 for a new start.
    self.kept_wall_seconds = 0.0
    if not enabled:
      return
    keep = None
    if truncate_after_step is not None and fs.exists(path):
      # A growth stage at the restored step is done again after the restore: its old line goes.
      keep = [r for r in read_records(path) if r.get("step", 0) < truncate_after_step or (
          r.get("step", 0) == truncate_after_step and "stage" not in r)]
      self.kept_wall_seconds = max((float(r["wall_seconds"]) for r in keep
                                    if isinstance(r.get("wall_seconds"), (int, float))),
                                   default=0.0)
    if fs.is_url(path):
      self._lines = [json.dumps(r) + "\n" for r in (keep if keep is not None
                                                    else read_records(path))]
      self.flush()
      return
    if keep is not None:
      fs.write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in keep))
    self._f = open(path, "a")

  def write(self, record: dict[str, Any]) -> None:
    if self._f is not None:
      self._f.write(json.dumps(record) + "\n")
      self._f.flush()
    elif self._lines is not None:
      self._lines.append(json.dumps(record) + "\n")
      if time.monotonic() - self._uploaded > self._upload_every_s:
        self.flush()

  def flush(self) -> None:
    """Makes every line written so far durable (a no-op for a local file, flushed per line)."""
    if self._lines is not None:
      fs.write_text_atomic(self.path, "".join(self._lines))
      self._uploaded = time.monotonic()

  def close(self) -> None:
    if self._f is not None:
      self._f.close()
      self._f = None
    if self._lines is not None:
      self.flush()
      self._lines = None


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
