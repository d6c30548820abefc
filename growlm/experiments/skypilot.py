"""The `skypilot` backend: one SkyPilot managed job per run, on Cloud TPU VMs and pod slices or on
GPU clusters of any cloud SkyPilot supports.

Each job's task: the checkout as SkyPilot's workdir (synced by SkyPilot), a setup that builds the
same idempotent venv as the gcloud backend with growlm's `tpu` or `cuda` extra, and a run command
that starts `growlm.worker` for that one run on every node. Nodes meet through
jax.distributed: a TPU slice finds its peers itself (--distributed); a GPU cluster gets
SkyPilot's SKYPILOT_NODE_IPS / SKYPILOT_NUM_NODES / SKYPILOT_NODE_RANK as the coordinator
address, process count and process id. Managed jobs (`sky jobs launch`) relaunch a preempted spot
job on new capacity, and the run resumes from its gs:// checkpoint (the trainer saves on
SIGTERM).

SkyPilot is called through its `sky` command, so any SkyPilot install on PATH works (the `cloud`
extra pins one that installs beside growlm's own pins). The API key is not in the task file: the
command names `--env WANDB_API_KEY` and SkyPilot reads its value from this process's environment.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import tempfile
from typing import Any

import yaml

from growlm import fs
from growlm.errors import GrowlmError
from growlm.experiments import remote

COORDINATOR_PORT = 8476   # the port Cloud TPU's own jax.distributed setup uses
GCS_KEY = "~/.config/growlm/gcs-key.json"   # where a node off GCP finds the sweep dir's key


def check(s: remote.Settings) -> None:
  if s.num_nodes < 1:
    raise GrowlmError(f"--num_nodes={s.num_nodes}; accepted: a positive number of nodes")
  if is_tpu(s) and s.num_nodes != 1:
    raise GrowlmError(f"--num_nodes={s.num_nodes} with --accelerators={s.accelerators}; "
                      "accepted: --num_nodes=1 (a TPU pod slice is one node with many hosts, "
                      "and every host runs the command)")


def is_tpu(s: remote.Settings) -> bool:
  return (s.accelerators or "").lower().startswith("tpu-")


def distributed(s: remote.Settings) -> str:
  return "auto" if is_tpu(s) else "none"   # GPU nodes get the SKYPILOT_* settings as env


def extra(s: remote.Settings) -> str:
  """growlm's extra for the hosts: jax with libtpu, with CUDA, or plain (CPU)."""
  return "tpu" if is_tpu(s) else ("cuda" if s.accelerators else "")


def job_name(sweep_dir: str, run: str) -> str:
  """A valid SkyPilot name: letters, digits, '-', '_', '.', starting with a letter."""
  raw = f"growlm-{fs.basename(sweep_dir)}-{run}"
  return re.sub(r"[^A-Za-z0-9_.-]", "-", raw).rstrip("-_.")


def gcs_key(s: remote.Settings, environ: dict[str, str]) -> str | None:
  """The local service-account key (GOOGLE_APPLICATION_CREDENTIALS) that nodes off GCP need to
  reach the gs:// sweep dir; None on GCP, where the VM's own service account is used."""
  if is_tpu(s) or (s.cloud or "").lower() == "gcp":
    return None
  return environ.get("GOOGLE_APPLICATION_CREDENTIALS") or None


def run_script(s: remote.Settings, with_key: bool = False) -> str:
  lines = [f"export GOOGLE_APPLICATION_CREDENTIALS={GCS_KEY}"] if with_key else []
  if not is_tpu(s) and s.num_nodes > 1:
    lines += ['export GROWLM_COORDINATOR_ADDRESS="$(echo "$SKYPILOT_NODE_IPS" | head -n1):'
              f'{COORDINATOR_PORT}"',
              'export GROWLM_NUM_PROCESSES="$SKYPILOT_NUM_NODES"',
              'export GROWLM_PROCESS_ID="$SKYPILOT_NODE_RANK"']
  worker = '"$(hostname)"' if is_tpu(s) else '"$SKYPILOT_NODE_RANK"'
  lines.append('~/growlm-venv/bin/python -m growlm.worker --plan="$GROWLM_PLAN" '
               f'--only="$GROWLM_RUN" --worker={worker}')
  return "\n".join(lines) + "\n"


def task(s: remote.Settings, sweep_dir: str, root: str, plan_url: str, run: str,
         env: dict[str, str], key_file: str | None = None) -> dict[str, Any]:
  """The SkyPilot task (YAML as a dict) that trains one run; the API key stays out of it, and
  `key_file` (a GCS service-account key for nodes off GCP) is copied to the nodes."""
  resources: dict[str, Any] = {"use_spot": bool(s.spot)}
  if s.accelerators:
    resources["accelerators"] = s.accelerators
  if s.cloud or is_tpu(s):
    resources["cloud"] = s.cloud or "gcp"
  if is_tpu(s):
    resources["accelerator_args"] = {"runtime_version": s.runtime_version}
  envs = {k: v for k, v in env.items() if k != remote.SECRET}
  envs.update(GROWLM_PLAN=plan_url, GROWLM_RUN=run)
  out = {"name": job_name(sweep_dir, run), "workdir": root, "num_nodes": s.num_nodes,
         "resources": resources, "envs": envs}
  if key_file:
    out["file_mounts"] = {GCS_KEY: os.path.abspath(key_file)}
  out.update(setup=remote.setup_script(extra(s), unpack=False) + "\n",
             run=run_script(s, with_key=bool(key_file)))
  return out


def launch_command(s: remote.Settings, name: str, task_file: str, with_key: bool) -> list[str]:
  """`sky jobs launch`: detached (returns once submitted), zone/region as CLI overrides (in the
  task file they would make SkyPilot's parser fetch its catalog)."""
  cmd = ["sky", "jobs", "launch", "--yes", "--detach-run", f"--name={name}"]
  cmd += [f"--zone={s.zone}"] if s.zone else []
  cmd += [f"--region={s.region}"] if s.region else []
  cmd += ["--env", remote.SECRET] if with_key else []
  return cmd + [task_file]


class _Dumper(yaml.SafeDumper):
  """Multi-line strings (setup, run) as YAML block literals, as people write task files."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def dump(task_dict: dict[str, Any]) -> str:
  return yaml.dump(task_dict, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                   width=100)


class Launch:
  """Submits the runs whose sources are finished, one managed job each."""

  def __init__(self, settings: remote.Settings, sweep_dir: str, root: str, plan: dict,
               manifest: dict, shell: remote.Shell, env: dict[str, str]):
    self.s, self.sweep_dir, self.root, self.plan = settings, sweep_dir, root, plan
    self.manifest, self.shell, self.env = manifest, shell, env
    self.url = remote.plan_url(sweep_dir, plan["attempt"])
    self._published = False   # the plan and manifest are in the sweep dir

  def submit_ready(self, states, explicit: set[str], quiet: bool = False) -> None:
    """Submits each planned run that is ready: not finished or running, not already submitted
    (unless --only names it), its sources finished; on a poll, only runs never submitted."""
    by = {st.name: st for st in states}
    finished = {n for n, st in by.items() if st.state == "finished"}
    todo, waiting = [], []
    for r in self.plan["runs"]:
      st = by[r["name"]]
      submitted = st.state == "pending" and st.detail.startswith(("submitted", "preempted"))
      if st.state in ("finished", "running") or (submitted and r["name"] not in explicit):
        continue
      if quiet and st.state == "failed":
        continue   # a poll resubmits nothing that failed: relaunching does
      if any(d not in finished for d in r["depends"]):
        waiting.append(r["name"])
        continue
      todo.append(r["name"])
    if todo:
      self.submit(todo)
    elif not quiet and not waiting:
      self.shell.echo("growlm: nothing to submit (every run is finished, running or submitted)")
    if waiting and not quiet:
      self.shell.echo(f"growlm: {', '.join(waiting)} wait(s) for their sources; --wait (or "
                      "relaunching this command) submits them when those finish")

  def submit(self, names: list[str], finished: Any = None) -> None:
    del finished
    if not self.shell.dry_run and not shutil.which("sky"):
      raise GrowlmError("sky is not on PATH; accepted: SkyPilot installed (pip install -e "
                        "'.[cloud]', or SkyPilot in its own environment on PATH) and `sky "
                        "check` passing")
    env = dict(os.environ)
    if remote.SECRET in self.env:
      env[remote.SECRET] = self.env[remote.SECRET]   # read by `--env WANDB_API_KEY`
    if not self._published:
      self.shell.echo(f"# write {self.url}: the runs' commands (each job runs one, skipping it "
                      "when finished):")
      for r in self.plan["runs"]:
        self.shell.echo("#   " + " ".join(shlex.quote(a) for a in r["argv"]))
    with tempfile.TemporaryDirectory(prefix="growlm-sky-") as tmp:
      for name in names:
        t = task(self.s, self.sweep_dir, self.root, self.url, name, self.env,
                 gcs_key(self.s, dict(os.environ)))
        path = os.path.join(tmp, f"{name}.sky.yaml")
        text = dump(t)
        with open(path, "w") as f:
          f.write(text)
        after = next(r["depends"] for r in self.plan["runs"] if r["name"] == name)
        if self.shell.dry_run and after:
          self.shell.echo(f"# {name}: submitted once {', '.join(after)} is finished (by --wait, "
                          "or by relaunching this command)")
        self.shell.echo(f"# {path}:")
        for line in text.splitlines():
          self.shell.echo("#   " + line)
        out = remote.Published(self.shell)
        remote.publish(out, self.sweep_dir, self.manifest, self.plan, [name], "skypilot",
                       with_plan=not self._published)
        res = self.shell.run(launch_command(self.s, t["name"], path, remote.SECRET in self.env),
                             env=env)
        if not self.shell.dry_run and res.returncode:
          out.undo()
          raise GrowlmError(f"sky jobs launch for run {name} failed (exit {res.returncode}: "
                            f"{remote.last_line(res.stderr or res.stdout)})")
        self._published = True
    if not self.shell.dry_run:
      self.shell.echo(f"growlm: submitted {', '.join(names)}; follow with: python "
                      f"experiments/launch.py status --sweep_dir={self.sweep_dir}")
