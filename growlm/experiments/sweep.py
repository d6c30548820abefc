"""Sweeps as config code (big_vision style): expand, order, run, resume, or print commands.

A config file defines `get_config(arg)` and `sweep(add)`; `sweep` calls
`add(name=..., **{"dotted.field": value})` once per run. A value "@other" for `init.source`
names another run of the same sweep: that run goes first and its final checkpoint is grown.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
from typing import Any, Callable

import ml_collections

from growlm import rundir
from growlm.config import files
from growlm.config.typed import resolve
from growlm.errors import GrowlmError


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  depends: list[str]
  workdir: str


def expand(config: str, sweep_dir: str) -> list[Run]:
  """The sweep's runs, each with its resolved config, in dependency order."""
  path, _ = files.split_spec(config)
  mod = files.load_module(path)
  if not hasattr(mod, "sweep"):
    raise GrowlmError(f"--config={path} defines no sweep(add); accepted: a sweep config file")
  specs: list[tuple[str, dict]] = []

  def add(name: str, **overrides):
    if not isinstance(name, str) or not name or "/" in name:
      raise GrowlmError(f"sweep run name {name!r}; accepted: a non-empty string without '/' "
                        "(it names the run's directory)")
    if any(n == name for n, _ in specs):
      raise GrowlmError(f"sweep run name {name!r} is used twice; accepted: one add() per name")
    specs.append((name, overrides))

  try:
    mod.sweep(add)
  except GrowlmError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0]
    raise GrowlmError(f"--config={path}: sweep(add) raised {type(e).__name__}"
                      + (f": {first}" if first else "")) from None
  names = {n for n, _ in specs}
  sweep_name = os.path.basename(os.path.normpath(sweep_dir))
  runs = []
  for name, overrides in specs:
    cfg = files.load(config)
    depends = []
    for key, value in overrides.items():
      if key == "init.source" and isinstance(value, str) and value.startswith("@"):
        if value[1:] not in names:
          raise GrowlmError(f"sweep run {name!r}: init.source={value!r} names no run; "
                            f"accepted: one of {sorted(names)}")
        depends.append(value[1:])
        value = os.path.join(sweep_dir, value[1:])
      files.set_field(cfg, key, value, what=f"sweep run {name!r}")
    with cfg.unlocked():
      cfg.name = name
      cfg.sweep_name = sweep_name
    try:
      resolve(cfg)   # every run's values are checked before the first run starts
    except GrowlmError as e:
      raise GrowlmError(f"sweep run {name!r}: {e}") from None
    runs.append(Run(name, overrides, cfg, depends, os.path.join(sweep_dir, name)))
  return order(runs)


def order(runs: list[Run]) -> list[Run]:
  """Topological order: every run after the runs it grows from (stable otherwise)."""
  done: list[Run] = []
  pending = list(runs)
  while pending:
    ready = [r for r in pending if all(d in {x.name for x in done} for d in r.depends)]
    if not ready:
      raise GrowlmError(f"sweep: circular init.source among {[r.name for r in pending]}")
    done.append(ready[0])
    pending.remove(ready[0])
  return done


def is_done(run: Run) -> bool:
  """Finished = a checkpoint at the run's last step exists."""
  return run.config.train.num_steps in rundir.checkpoint_steps(run.workdir)


def _flag_value(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def command(config: str, run: Run, python: str = "python", extra: tuple[str, ...] = ()
            ) -> list[str]:
  """The growlm.main command line that trains `run` exactly as the launcher does."""
  args = [python, "-m", "growlm.main", f"--config={config}", f"--workdir={run.workdir}"]
  for key, value in run.overrides.items():
    if key == "init.source" and isinstance(value, str) and value.startswith("@"):
      value = os.path.join(os.path.dirname(run.workdir), value[1:])
    args.append(f"--config.{key}={_flag_value(value)}")
  args += [f"--config.name={run.name}", f"--config.sweep_name={run.config.sweep_name}"]
  return args + list(extra)


def tpu_command(config: str, run: Run, tpu: str, zone: str, project: str | None = None,
                remote_dir: str = "~/growlm", python: str = "python3") -> list[str]:
  """A gcloud invocation that runs `run` on every host of a Cloud TPU VM slice at once; each
  host runs the same program and jax.distributed.initialize() finds its peers (--distributed)."""
  inner = " ".join(shlex.quote(a) for a in command(config, run, python, ("--distributed",)))
  gcloud = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", tpu, f"--zone={zone}"]
  if project:
    gcloud.append(f"--project={project}")
  return gcloud + ["--worker=all", f"--command=cd {remote_dir} && {inner}"]


def launch(config: str, sweep_dir: str, *, dry_run: bool = False, tpu: str | None = None,
           zone: str | None = None, project: str | None = None, only: tuple[str, ...] = (),
           echo: Callable[[str], None] = print, run_fn: Callable | None = None
           ) -> list[Run]:
  """Runs (or prints) every run of the sweep in dependency order, skipping finished ones."""
  if tpu and not zone:
    raise GrowlmError("--tpu needs --zone (and optionally --project)")
  runs = expand(config, sweep_dir)
  if only:
    unknown = sorted(set(only) - {r.name for r in runs})
    if unknown:
      raise GrowlmError(f"--only names unknown runs {unknown}; accepted: {[r.name for r in runs]}")
    runs = [r for r in runs if r.name in only]
  for run in runs:
    cmd = (tpu_command(config, run, tpu, zone, project) if tpu else command(config, run))
    line = " ".join(shlex.quote(a) for a in cmd)
    if dry_run:
      echo(line)
      continue
    if is_done(run):
      echo(f"[{run.name}] finished, skipped")
      continue
    echo(f"[{run.name}] {line}")
    if tpu:
      import subprocess  # pylint: disable=g-import-not-at-top
      subprocess.run(cmd, check=True)
    else:
      if run_fn is None:
        from growlm import commands  # pylint: disable=g-import-not-at-top
        run_fn = commands.train
      os.makedirs(sweep_dir, exist_ok=True)
      run_fn(run.config, run.workdir)
  return runs
