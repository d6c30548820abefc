"""Remote backends: hand a sweep to Cloud TPU VMs (`gcloud`) or to SkyPilot, and return at once.

The launcher provisions nothing itself beyond what the backend's own tool does; it packs or names
the checkout, writes a plan (SWEEP/launch/ATTEMPT.json: each run's growlm.main argv, in order)
into the shared sweep dir, and starts `growlm.worker` on the hosts. The sweep dir
must be a gs:// URL: the hosts write there and `status` reads there.

Dependency order remotely (a grown run may only start once its source is finished):
  gcloud    one TPU runs one program at a time, so each host gets one driver that trains every
            unfinished run in order, sources first; nothing waits on the launcher.
  skypilot  one managed job per run, each on its own cluster. Runs whose sources are finished are
            submitted at once; the others are submitted by `--wait` (or by relaunching the same
            command) when their sources finish. `status` only reads.
W&B settings (WANDB_API_KEY, from the environment or ~/.netrc; WANDB_ENTITY, WANDB_PROJECT,
WANDB_MODE, WANDB_BASE_URL) go to the hosts' environment; the key is never printed.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shlex
import subprocess
import tarfile
import time
import urllib.parse
from typing import Any, Callable

from growlm import fs
from growlm.config import files
from growlm.errors import GrowlmError
from growlm.experiments import status
from growlm.experiments import sweep as sweep_lib
from growlm.train import tracking

WANDB_VARS = ("WANDB_API_KEY", "WANDB_ENTITY", "WANDB_PROJECT", "WANDB_MODE", "WANDB_BASE_URL")
SECRET = "WANDB_API_KEY"
LAUNCH_DIR = "launch"
FLAGS = {"gcloud": ("tpu", "zone", "project", "spot", "accelerator_type", "runtime_version"),
         "skypilot": ("accelerators", "num_nodes", "spot", "cloud", "region", "zone",
                      "runtime_version")}


@dataclasses.dataclass(frozen=True)
class Settings:
  """The remote flags of experiments/launch.py."""
  tpu: str | None = None               # gcloud: the TPU VM's name
  zone: str | None = None              # gcloud: its zone; skypilot: optional zone
  project: str | None = None           # gcloud: Google Cloud project (default: gcloud's)
  spot: bool = False                   # spot capacity (gcloud: via queued resources)
  accelerator_type: str | None = None  # gcloud --spot: the TPU type to request, e.g. v4-32
  runtime_version: str = "tpu-ubuntu2204-base"   # the TPU VM image of a new TPU
  accelerators: str | None = None      # skypilot: e.g. tpu-v4-32 or H100:8 (none: CPU)
  num_nodes: int = 1                   # skypilot: nodes of a GPU cluster (a TPU pod is one)
  cloud: str | None = None             # skypilot: restrict to one cloud
  region: str | None = None            # skypilot: restrict to one region


class Shell:
  """Runs (or, dry, prints) the backend's commands; every failure is the caller's one line."""

  def __init__(self, echo: Callable[[str], None], dry_run: bool):
    self.echo, self.dry_run = echo, dry_run

  def run(self, cmd: list[str], *, stdin: str | None = None, shown_stdin: str = "",
          env: dict[str, str] | None = None) -> subprocess.CompletedProcess | None:
    line = " ".join(shlex.quote(a) for a in cmd) + (f" <<< {shown_stdin}" if shown_stdin else "")
    self.echo(line)
    if self.dry_run:
      return None
    try:
      return subprocess.run(cmd, input=stdin if stdin is not None else "", capture_output=True,
                            text=True, env=env, check=False)
    except FileNotFoundError:
      raise GrowlmError(f"{cmd[0]} is not on PATH; accepted: {cmd[0]} installed (see "
                        "docs/tpu.md and docs/gpu-cluster.md)") from None


def last_line(text: str) -> str:
  lines = [l.strip() for l in (text or "").splitlines() if l.strip()]
  return lines[-1][:300] if lines else "no output"


def checkout() -> str:
  """The git checkout this growlm runs from: what the hosts get."""
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  try:
    top = subprocess.run(["git", "-C", root, "rev-parse", "--show-toplevel"], capture_output=True,
                         text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    top = ""
  if os.path.realpath(top or "/nonexistent") != os.path.realpath(root):
    raise GrowlmError(f"growlm runs from {root}, which is not a git checkout; accepted: launch "
                      "remote sweeps from a clone of the growlm repository")
  return root


def relative_config(config: str, root: str) -> str:
  """`config` (PATH[:ARG]) with PATH relative to the checkout, as the hosts see it."""
  path, arg = files.split_spec(config)
  rel = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
  if rel.startswith(".."):
    raise GrowlmError(f"--config={path} is outside the checkout {root}; accepted: a config file "
                      "inside it (the hosts get the checkout's files)")
  return rel + (f":{arg}" if arg is not None else "")


def code_files(root: str) -> list[str]:
  """The checkout's files as git sees them: tracked and untracked, not ignored."""
  out = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others",
                        "--exclude-standard"], capture_output=True, check=True).stdout
  names = sorted({n for n in out.decode().split("\0") if n})
  return [n for n in names if os.path.isfile(os.path.join(root, n))]


def pack(root: str, dest: str) -> int:
  """Writes the checkout's files to the tar.gz `dest`; returns how many."""
  names = code_files(root)
  with tarfile.open(dest, "w:gz") as tar:
    for n in names:
      tar.add(os.path.join(root, n), arcname=n, recursive=False)
  return len(names)


def wandb_env(environ: dict[str, str] | None = None) -> dict[str, str]:
  """The W&B settings to forward: set WANDB_* variables, and the API key from the environment
  or else from the netrc entry that `wandb login` writes."""
  environ = dict(os.environ if environ is None else environ)
  out = {k: environ[k] for k in WANDB_VARS if environ.get(k)}
  if SECRET not in out:
    base = urllib.parse.urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    key = tracking.netrc_key((base.hostname or "", "api.wandb.ai"))
    if key:
      out[SECRET] = key
  return out


def shown_env(env: dict[str, str]) -> str:
  """`env` as KEY=VALUE words with the API key redacted (what logs and dry runs show)."""
  return " ".join(f"{k}=<redacted>" if k == SECRET else f"{k}={shlex.quote(v)}"
                  for k, v in env.items())


def setup_script(extra: str, unpack: bool, sep: str = "\n") -> str:
  """Bash for every host, one command per `sep`: unpack the code (gcloud), then an idempotent
  venv in ~/growlm-venv with growlm installed with `extra`, rebuilt only when setup.cfg or the
  extra changes (a stamp file holds both). A failed step prints one `growlm-setup-failed` line
  naming the host and exits 1; a half-installed venv is removed."""
  spec = f".[{extra}]" if extra else "."
  log = ">> ~/growlm-setup.log 2>&1"
  venv = [
      "rm -rf ~/growlm-venv",
      "{ command -v python3.11 || { sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive "
      f'apt-get install -y -qq python3.11 python3.11-venv; }}; }} {log} || fail "installing '
      'python3.11"',
      f'python3.11 -m venv ~/growlm-venv {log} || {{ rm -rf ~/growlm-venv; fail "python3.11 -m '
      'venv"; }',
      f'~/growlm-venv/bin/pip install -q -e "{spec}" {log} || {{ rm -rf ~/growlm-venv; '
      f'fail "pip install -e {spec}"; }}',
      'echo "$want" > ~/growlm-venv/growlm-stamp']
  lines = [
      'W="${TPU_WORKER_ID:-$(hostname)}"',
      'fail() { echo "growlm-setup-failed worker=$W: $1 ($(tail -n 1 ~/growlm-setup.log '
      '2>/dev/null))"; exit 1; }',
      ': > ~/growlm-setup.log',
      'if pgrep -f "growlm[.]experiments[.]worker" >> ~/growlm-setup.log; then '
      'fail "a growlm worker is still running here; wait for it or stop it"; fi']
  if unpack:
    lines += [f'rm -rf ~/growlm.new && mkdir ~/growlm.new && tar -xzf ~/growlm-code.tar.gz '
              f'-C ~/growlm.new {log} || fail "unpacking the code"',
              'rm -rf ~/growlm && mv ~/growlm.new ~/growlm && rm -f ~/growlm-code.tar.gz',
              'cd ~/growlm']
  lines += [f'want="$(sha256sum setup.cfg | cut -d" " -f1) {extra}"',
            'if [ "$(cat ~/growlm-venv/growlm-stamp 2>/dev/null)" != "$want" ]; then '
            + "; ".join(venv) + "; fi"]
  return sep.join(lines)


def new_attempt() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")


def make_plan(config: str, runs: list[sweep_lib.Run], overrides: dict | None, attempt: str,
              distributed: str) -> dict[str, Any]:
  """The plan the workers read: each run's growlm.main argv (config relative to the checkout)."""
  return {"attempt": attempt, "distributed": distributed,
          "runs": [{"name": r.name, "workdir": r.workdir, "depends": r.depends,
                    "num_steps": int(r.config.train.num_steps),
                    "argv": sweep_lib.command(config, r, overrides=overrides)} for r in runs]}


def plan_url(sweep_dir: str, attempt: str) -> str:
  return fs.join(sweep_dir, LAUNCH_DIR, f"{attempt}.json")


class Published:
  """The files a launch writes to the sweep dir before it starts anything; `undo` removes them
  when a start fails, so a failed launch leaves nothing half-written."""

  def __init__(self, shell: Shell):
    self.shell, self.paths = shell, []

  def write(self, path: str, obj: Any) -> None:
    if self.shell.dry_run:
      return
    fs.makedirs(fs.dirname(path))
    fs.write_json_atomic(path, obj)
    self.paths.append(path)

  def undo(self) -> None:
    for p in reversed(self.paths):
      try:
        fs.remove(p)
      except (FileNotFoundError, GrowlmError):
        pass


def publish(out: Published, sweep_dir: str, manifest: dict, plan: dict,
            submitted: list[str], backend: str, with_plan: bool = True) -> None:
  """Writes the plan and the sweep manifest (unless written already), then each submitted
  run's launch marker."""
  if with_plan:
    out.write(plan_url(sweep_dir, plan["attempt"]), plan)
    out.write(fs.join(sweep_dir, sweep_lib.MANIFEST), manifest)
  for r in plan["runs"]:
    if r["name"] in submitted:
      out.write(status.launch_path(r["workdir"]), {"attempt": plan["attempt"], "backend": backend,
                                                   "submitted": time.time()})


def _check_flags(backend: str, given: dict[str, Any]) -> Settings:
  mine = FLAGS[backend]
  for name, value in given.items():
    if value in (None, False, "") or name in mine:
      continue
    owner = next((b for b, names in FLAGS.items() if name in names), None)
    raise GrowlmError(f"--{name} is not a flag of --backend={backend}" +
                      (f"; it belongs to --backend={owner}" if owner else "") +
                      f"; accepted with --backend={backend}: "
                      + ", ".join(f"--{n}" for n in mine))
  return Settings(**{k: v for k, v in given.items() if v not in (None, "")})


def launch(config: str, sweep_dir: str, backend: str, *, backend_module, overrides=None,
           dry_run=False, only=(), echo=print, wait: bool = False, poll_s: float = 30.0,
           attempt: str | None = None, seeds: int = 1, **flags) -> list:
  """Checks everything, then hands the sweep to `backend` (`backend_module`: growlm.experiments.
  gcloud or skypilot, chosen by the caller, since both build on this module); with `wait`,
  follows it until every
  run is finished (or one failed and nothing moves)."""
  settings = _check_flags(backend, flags)
  if not fs.is_url(sweep_dir):
    raise GrowlmError(f"--sweep_dir={sweep_dir} with --backend={backend}; accepted: a gs://"
                      "bucket/path URL that the hosts and this machine can both read and write")
  mod = backend_module
  mod.check(settings)
  root = checkout()
  rel = relative_config(config, root)
  every = sweep_lib.expand(config, sweep_dir, overrides, seeds)
  runs = sweep_lib.select(every, tuple(only))
  attempt = attempt or new_attempt()
  shell = Shell(echo, dry_run)
  manifest = sweep_lib.manifest(rel, every, overrides, backend, dataclasses.asdict(settings),
                                seeds)
  plan = make_plan(rel, runs, overrides, attempt, mod.distributed(settings))
  job = mod.Launch(settings, sweep_dir, root, plan, manifest, shell, wandb_env())
  if dry_run:
    job.submit([r["name"] for r in plan["runs"]])
    return runs
  sweep_lib.check_run_dirs(runs)
  job.submit_ready(status.read(manifest["runs"]), explicit=set(only))
  if wait:
    names = {r.name for r in runs}
    states = status.follow(
        [m for m in manifest["runs"] if m["name"] in names], echo, poll_s=poll_s,
        on_poll=lambda _: job.submit_ready(status.read(manifest["runs"]), set(), quiet=True))
    failed = ([s for s in states if s.state == "failed"] or
              [s for s in states if s.state != "finished"])
    if failed:
      raise GrowlmError(f"sweep {sweep_dir}: run {failed[0].name} is {failed[0].state} "
                        f"({failed[0].detail})")
  return runs
