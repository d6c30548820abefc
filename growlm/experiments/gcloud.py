"""The `gcloud` backend: a sweep on an existing Cloud TPU VM (one host or a pod slice), with the
plain `gcloud compute tpus tpu-vm` commands, for users without SkyPilot.

It follows big_vision's documented practice for TPU VMs: the code goes to every worker
(`tpu-vm scp --worker=all`, here of a tarball of the checkout's files as git lists them,
uncommitted edits included), and each worker sets up an idempotent venv (big_vision's
run_tpu.sh; here ~/growlm-venv with growlm[tpu], rebuilt only when setup.cfg changes) before
the same command starts on every worker (`tpu-vm ssh --worker=all`). Unlike big_vision's
blocking ssh, the command starts `growlm.worker` detached (setsid nohup), which
trains the runs one after another and keeps their logs under the run dirs, so the launcher
returns at once.

--spot asks for the TPU through a queued resource (`gcloud compute tpus queued-resources create
NAME --node-id=NAME --spot`), the way spot TPUs are requested, when it does not exist, and again
after a preemption; the launcher waits until it is ACTIVE, then starts the sweep.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import tempfile
import time
from typing import Any

from growlm.errors import GrowlmError
from growlm.experiments import remote

CODE = "growlm-code.tar.gz"
GONE = ("PREEMPTED", "TERMINATED")


def check(s: remote.Settings) -> None:
  if not s.tpu or not s.zone:
    raise GrowlmError("--backend=gcloud needs --tpu=NAME and --zone=ZONE (and optionally "
                      "--project=PROJECT)")
  if s.spot and not s.accelerator_type:
    raise GrowlmError("--spot needs --accelerator_type (e.g. v4-32): the TPU to request when it "
                      "does not exist")


def distributed(s: remote.Settings) -> str:
  del s
  return "auto"   # every TPU VM worker finds its peers itself


def _where(s: remote.Settings) -> list[str]:
  return [f"--zone={s.zone}"] + ([f"--project={s.project}"] if s.project else [])


def tpu_vm(s: remote.Settings, verb: str, *args: str) -> list[str]:
  """`gcloud compute tpus tpu-vm VERB NAME ...` for the TPU of `s`."""
  return ["gcloud", "compute", "tpus", "tpu-vm", verb, s.tpu, *_where(s), *args]


def describe(s: remote.Settings) -> list[str]:
  return tpu_vm(s, "describe", "--format=json")


def queued(s: remote.Settings, verb: str, *args: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "queued-resources", verb, s.tpu, *_where(s), *args]


def queued_create(s: remote.Settings) -> list[str]:
  return queued(s, "create", f"--node-id={s.tpu}", f"--accelerator-type={s.accelerator_type}",
                f"--runtime-version={s.runtime_version}", "--spot")


def scp(s: remote.Settings, local: str) -> list[str]:
  return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{s.tpu}:{CODE}", *_where(s),
          "--worker=all", "--quiet"]


def ssh(s: remote.Settings, command: str) -> list[str]:
  """`--quiet`: no prompts (gcloud makes the SSH key on first use without asking)."""
  return tpu_vm(s, "ssh", "--worker=all", "--quiet", f"--command={command}")


def start_command(plan_url: str) -> str:
  """Every worker: W&B settings from stdin into a mode-600 file, then the worker, detached; a
  worker that is gone 2 s later (a bad plan URL, no credentials) is reported."""
  log = '~/growlm-logs/worker-"$W".log'
  return ("umask 077 && cat > ~/growlm-env && cd ~/growlm && set -a && . ~/growlm-env && "
          'set +a && mkdir -p ~/growlm-logs && W="${TPU_WORKER_ID:-$(hostname)}" && '
          "{ setsid nohup ~/growlm-venv/bin/python -m growlm.worker "
          f'--plan={shlex.quote(plan_url)} --worker="$W" > {log} 2>&1 < /dev/null & }} && '
          f'sleep 2 && {{ kill -0 $! 2>/dev/null || {{ echo "growlm-start-failed worker=$W: '
          f'$(tail -n 1 {log})"; exit 1; }}; }}')


def _state(describe_json: str) -> str | None:
  try:
    return json.loads(describe_json).get("state")
  except (ValueError, AttributeError):
    return None


def env_file(env: dict[str, str]) -> str:
  return "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())


class Launch:
  """One launch on one TPU: make sure it exists, ship the code, set up, start the workers."""

  def __init__(self, settings: remote.Settings, sweep_dir: str, root: str, plan: dict,
               manifest: dict, shell: remote.Shell, env: dict[str, str]):
    self.s, self.sweep_dir, self.root, self.plan = settings, sweep_dir, root, plan
    self.manifest, self.shell, self.env = manifest, shell, env

  def _fail(self, what: str, res) -> GrowlmError:
    return GrowlmError(f"TPU {self.s.tpu} (zone {self.s.zone}): {what} failed (gcloud exit "
                       f"{res.returncode}: {remote.last_line(res.stderr or res.stdout)})")

  def ensure_tpu(self) -> None:
    """The TPU exists and is READY; with --spot, requested (again) until it is."""
    s, echo = self.s, self.shell.echo
    res = self.shell.run(describe(s))
    if self.shell.dry_run:
      if s.spot:
        echo("# if it does not exist or was preempted: its queued resource, unless one is "
             "still waiting (a suspended one is deleted first:")
        echo(f"#   {' '.join(queued(s, 'delete', '--force', '--quiet'))})")
        self.shell.run(queued_create(s))
        echo("# every 30 s until ACTIVE:")
        self.shell.run(queued(s, "describe", "--format=value(state.state)"))
      return
    state = _state(res.stdout) if res.returncode == 0 else None
    if res.returncode != 0 and not (s.spot and "NOT_FOUND" in res.stderr.upper()):
      where = f"zone {s.zone}" + (f", project {s.project}" if s.project else "")
      raise GrowlmError(f"TPU {s.tpu} ({where}) cannot be described: "
                        f"{remote.last_line(res.stderr)}; accepted: the name of an existing TPU "
                        f"VM (gcloud compute tpus tpu-vm list --zone={s.zone}), or --spot "
                        "--accelerator_type=TYPE to request one")
    if s.spot and (res.returncode != 0 or state in GONE):
      self._request()
      state = "READY"
    if state != "READY":
      raise GrowlmError(f"TPU {s.tpu} is {state}; accepted: a READY TPU VM (relaunch when it "
                        "is, or use --spot to request it again)")

  def _queued_state(self) -> str | None:
    res = self.shell.run(queued(self.s, "describe", "--format=value(state.state)"))
    return (res.stdout.strip() or None) if res.returncode == 0 else None

  def _request(self) -> None:
    """Waits for --spot's queued resource: requested if there is none, requested anew if it was
    suspended (preempted) or failed; one that is still waiting keeps its place in the queue."""
    s = self.s
    state = self._queued_state()
    if state in ("ACTIVE", "SUSPENDING", "SUSPENDED", "FAILED"):   # its TPU is gone
      res = self.shell.run(queued(s, "delete", "--force", "--quiet"))
      if res.returncode:
        raise self._fail("deleting the suspended queued resource", res)
      state = None
    if state is None:
      res = self.shell.run(queued_create(s))
      if res.returncode:
        raise self._fail("queued-resources create", res)
    while (state := self._queued_state()) != "ACTIVE":
      if state in ("FAILED", "SUSPENDED"):
        raise GrowlmError(f"queued resource {s.tpu} is {state}; accepted: a request that "
                          "becomes ACTIVE (gcloud compute tpus queued-resources describe "
                          f"{s.tpu} --zone={s.zone} says why)")
      self.shell.echo(f"# queued resource {s.tpu} is {state or 'not listed yet'}; next look in "
                      "30 s (Ctrl-C leaves the request queued; relaunching waits for it again)")
      time.sleep(30)

  def setup(self) -> None:
    res = self.shell.run(ssh(self.s, remote.setup_script("tpu", unpack=True, sep="; ")))
    if self.shell.dry_run or res.returncode == 0:
      return
    failed = re.findall(r"growlm-setup-failed worker=(\S+): (.*)", res.stdout + res.stderr)
    if not failed:
      raise self._fail("setting up the workers", res)
    (worker, what), more = failed[0], len(failed) - 1
    raise GrowlmError(f"TPU {self.s.tpu} worker {worker} failed to set up: {what}"
                      + (f" (and {more} more worker(s))" if more else "")
                      + "; nothing was started")

  def submit_ready(self, states, explicit: set[str], quiet: bool = False) -> None:
    """Hands every unfinished run to the TPU at once (the workers keep the order)."""
    del explicit
    if quiet:
      return   # nothing waits on the launcher
    planned = {r["name"] for r in self.plan["runs"]}
    finished = {st.name for st in states if st.state == "finished"}
    todo = [st.name for st in states if st.name in planned and st.state != "finished"]
    for r in self.plan["runs"]:
      missing = [d for d in r["depends"] if d not in finished and d not in todo]
      if r["name"] in todo and missing:
        raise GrowlmError(f"run {r['name']} grows from {missing[0]}, which is not finished and "
                          f"not in --only; accepted: --only with {missing[0]} too")
    if not todo:
      self.shell.echo("growlm: every run is finished; nothing to launch")
      return
    self.submit(todo)

  def submit(self, names: list[str], finished: Any = None) -> None:
    del finished
    echo = self.shell.echo
    echo(f"# sweep {self.sweep_dir} on TPU {self.s.tpu}: {', '.join(names)}, in this order "
         f"(attempt {self.plan['attempt']})")
    self.ensure_tpu()
    with tempfile.TemporaryDirectory(prefix="growlm-launch-") as tmp:
      tar = os.path.join(tmp, CODE)
      echo(f"# pack {tar}: the files of {self.root} that git lists (tracked or untracked, not "
           "ignored)")
      if not self.shell.dry_run:
        remote.pack(self.root, tar)
      res = self.shell.run(scp(self.s, tar))
      if not self.shell.dry_run and res.returncode:
        raise self._fail("copying the code to every worker", res)
    self.setup()
    url = remote.plan_url(self.sweep_dir, self.plan["attempt"])
    echo(f"# write {url}: each worker trains these in order (adding --distributed), skipping "
         "finished ones:")
    for r in self.plan["runs"]:
      echo("#   " + " ".join(shlex.quote(a) for a in r["argv"]))
    out = remote.Published(self.shell)
    remote.publish(out, self.sweep_dir, self.manifest, self.plan, names, "gcloud")
    res = self.shell.run(ssh(self.s, start_command(url)), stdin=env_file(self.env),
                         shown_stdin=remote.shown_env(self.env))
    if not self.shell.dry_run and res.returncode:
      out.undo()
      failed = re.findall(r"growlm-start-failed worker=(\S+): (.*)", res.stdout + res.stderr)
      if failed:
        raise GrowlmError(f"TPU {self.s.tpu} worker {failed[0][0]}: growlm.worker "
                          f"exited at once ({failed[0][1]}); the plan was removed")
      raise self._fail("starting the workers", res)
    if not self.shell.dry_run:
      echo(f"growlm: started on TPU {self.s.tpu}; follow it with: python experiments/launch.py "
           f"status --sweep_dir={self.sweep_dir}")
