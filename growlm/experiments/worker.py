"""What a remote backend runs on every host: `python -m growlm.worker
--plan=gs://SWEEP/launch/ATTEMPT.json --worker=W [--only=RUN,...]` (flags: growlm/cli/worker.py).

It trains the plan's runs one after another (the order the launcher gave: sources first), each
as a `growlm.main` child process, skipping runs whose last checkpoint exists; every host runs the
same sequence and each run's processes meet through jax.distributed. While a run trains it
writes RUN/logs/worker-W.json (a heartbeat) and copies its output, kept in ~/growlm-logs on the
host, to RUN/logs/worker-W.log every --heartbeat_s; at the end the exit code goes there too
(growlm.experiments.status reads both). The first run that fails ends the sequence: a run grown
from it could not start, and the hosts must stay in step.

A stop signal (a preempted VM's shutdown, `kill -- -PGID`) reaches the run's processes too: they
save the step's checkpoint and exit 75; this program waits for that, records it, and starts
nothing more. How the run's processes find each other:
  GROWLM_COORDINATOR_ADDRESS, GROWLM_NUM_PROCESSES, GROWLM_PROCESS_ID (all three in the
      environment): passed on as --coordinator_address, --num_processes, --process_id
      (clusters without JAX auto-detection: SkyPilot GPU nodes, the tests' fake TPU workers);
  else the plan's "distributed": "auto" adds --distributed (Cloud TPU VMs find their peers),
      "none" adds nothing (one host).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from growlm import fs, rundir
from growlm.errors import EXIT_PREEMPTED, GrowlmError
from growlm.experiments import status

ENV_KEYS = ("GROWLM_COORDINATOR_ADDRESS", "GROWLM_NUM_PROCESSES", "GROWLM_PROCESS_ID")
DISTRIBUTED = ("auto", "none")


def distributed_flags(mode: str, env: dict[str, str]) -> list[str]:
  """The growlm.main flags that let this host's process meet the others."""
  given = [k for k in ENV_KEYS if env.get(k)]
  if given and len(given) < len(ENV_KEYS):
    raise GrowlmError(f"environment has {given} but not all of {list(ENV_KEYS)}; accepted: all "
                      "three, or none")
  if given:
    return [f"--coordinator_address={env[ENV_KEYS[0]]}", f"--num_processes={env[ENV_KEYS[1]]}",
            f"--process_id={env[ENV_KEYS[2]]}"]
  if mode not in DISTRIBUTED:
    raise GrowlmError(f"plan distributed={mode!r}; accepted: {', '.join(DISTRIBUTED)}")
  return ["--distributed"] if mode == "auto" else []


class _Stop:
  """Remembers a stop signal while it is entered; the run's own processes get it too and save."""

  SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

  def __enter__(self) -> "_Stop":
    self.signal_name: str | None = None
    self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame) -> None:
    del frame
    self.signal_name = self.signal_name or signal.Signals(signum).name


def _beat(run: dict[str, Any], worker: str, attempt: str, state: str, code: int | None,
          local_log: str) -> None:
  """Copies the log up and rewrites the heartbeat; a failed write (the store briefly out of
  reach) is reported and the run goes on: the next beat tries again."""
  try:
    fs.makedirs(fs.join(run["workdir"], status.LOGS))
    if os.path.exists(local_log):
      fs.copy_file(local_log, status.log_path(run["workdir"], worker))
    fs.write_json_atomic(status.heartbeat_path(run["workdir"], worker),
                         {"attempt": attempt, "state": state, "code": code,
                          "updated": time.time(), "host": os.uname().nodename,
                          "pid": os.getpid()})
  except (GrowlmError, OSError) as e:
    print(f"growlm worker {worker}: heartbeat of {run['name']} not written: {e}", flush=True)


def train(run: dict[str, Any], worker: str, attempt: str, extra: list[str], log_dir: str,
          heartbeat_s: float) -> int:
  """Runs one run's growlm.main on this host; returns its exit code (128+N for signal N)."""
  local_log = os.path.join(log_dir, f"{run['name']}-worker-{worker}.log")
  argv = [sys.executable, *run["argv"][1:], *extra]
  _beat(run, worker, attempt, "running", None, local_log)
  with open(local_log, "ab") as out:
    out.write(f"growlm worker {worker}: {' '.join(argv)}\n".encode())
    out.flush()
    proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    while True:
      try:
        code = proc.wait(timeout=heartbeat_s)
        break
      except subprocess.TimeoutExpired:
        _beat(run, worker, attempt, "running", None, local_log)
  code = 128 - code if code < 0 else code
  _beat(run, worker, attempt, "exited", code, local_log)
  return code


def drive(plan: dict[str, Any], worker: str, only: tuple[str, ...] = (),
          logs: str = "~/growlm-logs", heartbeat_s: float = 30.0,
          env: dict[str, str] | None = None) -> int:
  """Trains the plan's runs in order on this host; the first non-zero exit code ends it."""
  extra = distributed_flags(plan.get("distributed", "none"), dict(os.environ if env is None
                                                                  else env))
  log_dir = os.path.expanduser(logs)
  os.makedirs(log_dir, exist_ok=True)
  runs = [r for r in plan["runs"] if not only or r["name"] in only]
  with _Stop() as stop:
    for run in runs:
      if stop.signal_name:
        print(f"growlm worker {worker}: {stop.signal_name}: not starting {run['name']}",
              flush=True)
        return EXIT_PREEMPTED
      if run["num_steps"] in rundir.checkpoint_steps(run["workdir"]):
        print(f"growlm worker {worker}: {run['name']} finished, skipped", flush=True)
        continue
      print(f"growlm worker {worker}: {run['name']} starts", flush=True)
      code = train(run, worker, plan["attempt"], extra, log_dir, heartbeat_s)
      print(f"growlm worker {worker}: {run['name']} exited {code}", flush=True)
      if code:
        return code
  return 0
