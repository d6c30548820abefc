"""A sweep's state, read from the sweep dir itself (local or gs://), never from the launching
machine's disk: what `launch.py status` prints and what `--wait` follows.

Per run, under RUN/logs/ (written by growlm.experiments.remote and .worker):
  launch.json        {"attempt", "backend", "submitted"}: the launcher handed the run over
  worker-W.json      {"attempt", "state": "running"|"exited", "code", "updated"}: one per host,
                     rewritten every heartbeat while the run trains and once when it exits
  worker-W.log       that host's output, copied up every heartbeat

States: finished (a checkpoint at the run's last step: nothing else counts), running (a worker of
the current attempt reported within STALE_S), failed (a worker exited non-zero, or went silent),
pending (not handed over yet, handed over and not started, stopped by the local backend, or
a SkyPilot job preempted and being relaunched). A run's step is its last one in metrics.jsonl,
none ("-") before its first: the start's step-0 eval is no step taken.
"""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any, Callable

from growlm import fs, rundir
from growlm import lock as lock_lib
from growlm.errors import EXIT_PREEMPTED, GrowlmError
from growlm.experiments import sweep

LOGS = "logs"
LAUNCH = "launch.json"
STALE_S = 600.0   # a worker silent this long is taken as lost (heartbeats come every 30 s)
EXIT_MEANING = {EXIT_PREEMPTED: "stopped by a signal after saving its checkpoint (or during "
                                "start-up, before anything was written)",
                3: "diverged; the last good checkpoint is kept", 2: "bad input",
                4: "another process of the run did not join, failed or was lost"}


@dataclasses.dataclass
class RunState:
  name: str
  state: str            # pending | running | finished | failed
  step: int | None      # last step in metrics.jsonl past the start; None before the first
  loss: float | None    # last train_loss in metrics.jsonl
  detail: str


def launch_path(workdir: str) -> str:
  return fs.join(workdir, LOGS, LAUNCH)


def heartbeat_path(workdir: str, worker: str) -> str:
  return fs.join(workdir, LOGS, f"worker-{worker}.json")


def log_path(workdir: str, worker: str) -> str:
  return fs.join(workdir, LOGS, f"worker-{worker}.log")


def _read_json(path: str) -> dict[str, Any] | None:
  try:
    out = json.loads(fs.read_bytes(path))
  except (FileNotFoundError, ValueError):
    return None
  return out if isinstance(out, dict) else None


def _heartbeats(workdir: str) -> dict[str, dict[str, Any]]:
  try:
    names = fs.listdir(fs.join(workdir, LOGS))
  except FileNotFoundError:
    return {}
  out = {}
  for n in names:
    if n.startswith("worker-") and n.endswith(".json"):
      beat = _read_json(fs.join(workdir, LOGS, n))
      if beat is not None:
        out[n[len("worker-"):-len(".json")]] = beat
  return out


def age(seconds: float) -> str:
  seconds = max(0, int(seconds))
  if seconds < 120:
    return f"{seconds} s"
  if seconds < 7200:
    return f"{seconds // 60} min"
  return f"{seconds // 3600} h {seconds % 3600 // 60} min"


def _progress(workdir: str) -> tuple[int | None, float | None]:
  rows = rundir.read_metrics(rundir.metrics_path(workdir))
  losses = [r["train_loss"] for r in rows if "train_loss" in r]
  return rundir.last_step(rows), (float(losses[-1]) if losses else None)


def classify(num_steps: int, steps: list[int], launch: dict | None,
             beats: dict[str, dict], now: float) -> tuple[str, str]:
  """(state, detail) of one run from what its dir holds (pure: `now` is given)."""
  if num_steps in steps:
    return "finished", f"checkpoint {num_steps}"
  if launch is None:
    return "pending", "not submitted"
  mine = {w: b for w, b in beats.items() if b.get("attempt") == launch.get("attempt")}
  if not mine:
    return "pending", (f"submitted {age(now - launch.get('submitted', now))} ago "
                       f"({launch.get('backend', '?')}), not started")
  for w, b in sorted(mine.items()):
    code = b.get("code")
    if code == EXIT_PREEMPTED and launch.get("backend") == "skypilot":
      return "pending", (f"preempted: worker {w} exited {code}; SkyPilot relaunches managed jobs "
                         "(sky jobs queue)")
    if b.get("state") == "exited" and code not in (0, None):
      meaning = EXIT_MEANING.get(code, f"see the run's {LOGS}/worker-{w}.log")
      return "failed", f"worker {w} exited {code}: {meaning}; relaunch to resume"
  running = {w: b for w, b in mine.items() if b.get("state") == "running"}
  if running:
    last = max(b.get("updated", 0.0) for b in running.values())
    if now - last > STALE_S:
      return "failed", (f"no heartbeat for {age(now - last)} (host lost or preempted?); "
                        "relaunch to resume")
    return "running", f"{len(running)} worker(s), last heartbeat {age(now - last)} ago"
  return "failed", "every worker exited 0 before the last step"


def _local(run: dict[str, Any], finished: set[str], now: float, step: int | None
           ) -> tuple[str, str]:
  """(state, detail) of a run no remote backend was handed (the local backend, or not yet):
  running while a launch holds its lease, else pending, stopped at its last checkpoint, stopped
  before one (`step`: its last, None before the first) or waiting for the runs it grows from."""
  lease = lock_lib.holder(run["workdir"])
  if lease is not None:
    return "running", (f"pid {lease['pid']} on {lease['host']}, last heartbeat "
                       f"{age(now - lease['heartbeat'])} ago")
  steps = rundir.checkpoint_steps(run["workdir"])
  if steps:
    return "pending", f"stopped at checkpoint {max(steps)}; relaunch to resume"
  if fs.exists(rundir.config_path(run["workdir"])):   # written once a launch holds the run dir
    return "pending", ("started, stopped before its first step; relaunch to resume"
                       if step is None else f"started, stopped at step {step} before its "
                       "first checkpoint; relaunch to start it again")
  waiting = [d for d in run.get("depends", []) if d not in finished]
  return "pending", f"waits for {', '.join(waiting)}" if waiting else "not submitted"


def read(runs: list[dict[str, Any]], now: float | None = None) -> list[RunState]:
  """The state of each run ({'name', 'workdir', 'num_steps', 'depends'}), from its dir."""
  now = time.time() if now is None else now
  out, finished = [], set()
  for r in runs:
    state, detail = classify(r["num_steps"], rundir.checkpoint_steps(r["workdir"]),
                             _read_json(launch_path(r["workdir"])),
                             _heartbeats(r["workdir"]), now)
    step, loss = _progress(r["workdir"])
    if state == "pending" and detail == "not submitted":
      state, detail = _local(r, finished, now, step)
    if state == "finished":
      finished.add(r["name"])
    out.append(RunState(r["name"], state, step, loss, detail))
  return out


def table(states: list[RunState]) -> str:
  """A fixed-width table: run, state, last step, last train loss, detail."""
  rows = [("run", "state", "step", "loss", "detail")]
  rows += [(s.name, s.state, "-" if s.step is None else str(s.step),
            "-" if s.loss is None else f"{s.loss:.4f}", s.detail) for s in states]
  widths = [max(len(r[i]) for r in rows) for i in range(4)]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
                   for r in rows)


def load_manifest(sweep_dir: str) -> dict[str, Any]:
  """SWEEP/sweep.json (written by the launcher); a GrowlmError line if there is none."""
  path = fs.join(sweep_dir, sweep.MANIFEST)
  if not fs.exists(path):
    raise GrowlmError(f"{path} does not exist; accepted: the --sweep_dir of a launched sweep "
                      "(or pass --config too)")
  return fs.read_json_object(path, "sweep manifest")


def follow(runs: list[dict[str, Any]], echo: Callable[[str], None], *, poll_s: float = 30.0,
           on_poll: Callable[[list[RunState]], None] | None = None,
           sleep: Callable[[float], None] = time.sleep) -> list[RunState]:
  """Polls until every run is finished, or nothing is running or starting while a run has
  failed; prints the table whenever it changes. `on_poll` may submit runs that became ready."""
  shown = None
  while True:
    states = read(runs)
    if on_poll is not None:
      on_poll(states)
      states = read(runs)
    seen = [(s.name, s.state, s.step) for s in states]   # not the heartbeat's age
    if seen != shown:
      echo(table(states))
      shown = seen
    by = {s.state for s in states}
    if by == {"finished"}:
      return states
    moving = any(s.state == "running" or (s.state == "pending" and s.detail.startswith(
        ("submitted", "preempted"))) for s in states)
    if "failed" in by and not moving:
      return states
    sleep(poll_s)
