"""Sweeps as config code (big_vision style): expand, order, then run here or hand to a backend.

A config file defines `get_config(arg)` and `sweep(add)`; `sweep` calls
`add(name=..., **{"dotted.field": value})` once per run. A value "@other" for `init.source`
names another run of the same sweep: that run goes first and its final checkpoint is grown.
`--config.FIELD=VALUE` on the launcher's command line applies to every run, before the run's own
values.

Backends: `local` trains each run in this process, in order; `gcloud` and `skypilot` hand the
runs to remote hosts and return at once (growlm.experiments.remote). Whatever the backend, a run
is finished when its run dir holds a checkpoint at its last step, read from the sweep dir itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import shlex
from typing import Any, Callable

import ml_collections

from growlm import fs, rundir
from growlm.config import files
from growlm.config.typed import resolve
from growlm.errors import GrowlmError

BACKENDS = ("local", "gcloud", "skypilot")
MANIFEST = "sweep.json"   # SWEEP/sweep.json: the runs and how they were launched (for `status`)


@dataclasses.dataclass
class Run:
  name: str
  overrides: dict[str, Any]
  config: ml_collections.ConfigDict
  depends: list[str]
  workdir: str


SEED_FIELDS = ("train.seed", "data.seed", "init.seed")   # what a repetition over seeds changes


def seed_name(name: str, k: int) -> str:
  """Run `name` repeated with seed offset k (--seeds): NAME-sK."""
  return f"{name}-s{k}"


def base_name(name: str, seeds: int) -> str:
  """The sweep's own run name of a repetition (NAME-sK -> NAME); `name` itself when seeds == 1."""
  head, sep, k = name.rpartition("-s")
  return head if seeds > 1 and sep and k.isdigit() else name


def _repeat(specs: list[tuple[str, dict]], seeds: int, cfg) -> list[tuple[str, dict]]:
  """Each run `seeds` times as NAME-s0..NAME-s{seeds-1}: every seed field offset by k from the
  run's own value (else the config's), and a source `@other` read as `@other-sK`, so each
  repetition grows its own source. The values go into the run's overrides, so a remote host's
  command line carries them too."""
  out = []
  for name, run_overrides in specs:
    for k in range(seeds):
      o = dict(run_overrides)
      for key in SEED_FIELDS:
        section, field = key.split(".")
        o[key] = int(run_overrides.get(key, cfg[section][field])) + k
      src = o.get("init.source")
      if isinstance(src, str) and src.startswith("@"):
        o["init.source"] = "@" + seed_name(src[1:], k)
      out.append((seed_name(name, k), o))
  return out


def expand(config: str, sweep_dir: str, overrides: dict[str, str | bool] | None = None,
           seeds: int = 1) -> list[Run]:
  """The sweep's runs, each with its resolved config, in dependency order; `overrides`
  (command-line `--config.FIELD` texts) apply to every run before its own values; with
  `seeds` > 1 every run is repeated over that many seeds (_repeat)."""
  if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
    raise GrowlmError(f"--seeds={seeds!r}; accepted: an integer >= 1 (repetitions of every run "
                      "with seeds offset by 0, 1, ...)")
  path, _ = files.split_spec(config)
  mod = files.load_module(path)
  if not hasattr(mod, "sweep"):
    raise GrowlmError(f"--config={path} defines no sweep(add); accepted: a sweep config file")
  specs: list[tuple[str, dict]] = []

  def add(name: str, **run_overrides):
    if not isinstance(name, str) or not name or "/" in name:
      raise GrowlmError(f"sweep run name {name!r}; accepted: a non-empty string without '/' "
                        "(it names the run's directory)")
    if any(n == name for n, _ in specs):
      raise GrowlmError(f"sweep run name {name!r} is used twice; accepted: one add() per name")
    specs.append((name, run_overrides))

  try:
    # sweep(add), sweep(add, arg) or sweep(add, arg, base): the second form reads the config
    # argument (configs/paper.py takes its scratch budgets from it), the third also gets the
    # config with the command line's fields, so that a budget run scales the values in use
    # (--config.train.num_steps=100 makes a 2x run 200 steps, not twice the file's default).
    n_params = len(inspect.signature(mod.sweep).parameters)
    if n_params >= 3:
      given = files.load(config)
      files.apply_overrides(given, overrides or {})
      mod.sweep(add, files.split_spec(config)[1], given)
    elif n_params == 2:
      mod.sweep(add, files.split_spec(config)[1])
    else:
      mod.sweep(add)
  except files.ArgumentError as e:
    raise GrowlmError(e.line(path)) from None
  except GrowlmError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    first = (str(e).strip().splitlines() or [""])[0]
    raise GrowlmError(f"--config={path}: sweep(add) raised {type(e).__name__}"
                      + (f": {first}" if first else "")) from None
  if not specs:
    raise GrowlmError(f"--config={config}: sweep(add) added no runs; accepted: a sweep() that "
                      "calls add(name, **fields) once per run")
  if seeds > 1:
    base = files.load(config)
    files.apply_overrides(base, overrides or {})
    specs = _repeat(specs, seeds, base)
  names = {n for n, _ in specs}
  sweep_name = fs.basename(sweep_dir)
  runs, resolved = [], {}
  for name, run_overrides in specs:
    cfg = files.load(config)
    files.apply_overrides(cfg, overrides or {})
    depends = []
    for key, value in run_overrides.items():
      if key == "init.source" and isinstance(value, str) and value.startswith("@"):
        if value[1:] not in names:
          raise GrowlmError(f"sweep run {name!r}: init.source={value!r} names no run; "
                            f"accepted: one of {sorted(names)}")
        depends.append(value[1:])
        value = fs.join(sweep_dir, value[1:])
      files.set_field(cfg, key, value, what=f"sweep run {name!r}")
    with cfg.unlocked():
      cfg.name = name
      cfg.sweep_name = sweep_name
    with naming(name):
      resolved[name] = resolve(cfg)   # every run's values are checked before the first starts
    runs.append(Run(name, run_overrides, cfg, depends, fs.join(sweep_dir, name)))
  check_growths(runs, resolved)
  return order(runs)


def check_growths(runs: list[Run], resolved: dict[str, Any]) -> None:
  """Refuses, before the first run starts, a growth from another run of the sweep that the
  grown run would refuse only once its source had trained: a plan the two models cannot take
  (tile's integer width ratio, a field that shrinks or changes), a seq_len beyond the source's
  learned positions, init.continue_schedule with no steps left after the source's.
  `resolved`: each run's RunConfig by name."""
  # pylint: disable=g-import-not-at-top  (jax, for the growth's checks)
  from growlm.config import stages as stages_lib
  from growlm.grow import core as grow_core
  from growlm.init import source as source_lib
  for run in runs:
    if not run.depends:
      continue
    c, src = resolved[run.name], resolved[run.depends[0]]
    src_model = stages_lib.models(src.model, src.stages)[-1]   # the source's last stage
    with naming(run.name):
      grow_core.validate(src_model, c.model, c.init.plan)
      source_lib.check_seq_len(src_model, c.data.seq_len)
      last = min(src.train.stop_at or src.train.num_steps, src.train.num_steps)
      if c.init.continue_schedule and last >= c.train.num_steps:
        raise GrowlmError(
            f"init.continue_schedule=True: the source run {run.depends[0]!r} stops at step "
            f"{last}, so train.num_steps={c.train.num_steps} leaves nothing to train; "
            f"accepted: num_steps > {last}")


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


def select(runs: list[Run], only: tuple[str, ...]) -> list[Run]:
  """The runs that --only names (all when empty), in the same order."""
  if not only:
    return runs
  unknown = sorted(set(only) - {r.name for r in runs})
  if unknown:
    raise GrowlmError(f"--only names unknown runs {unknown}; accepted: {[r.name for r in runs]}")
  return [r for r in runs if r.name in only]


def is_done(run: Run) -> bool:
  """Finished = a checkpoint at the run's last step exists."""
  return run.config.train.num_steps in rundir.checkpoint_steps(run.workdir)


@contextlib.contextmanager
def naming(name: str):
  """A GrowlmError inside the block, as one line that names the sweep run it is about."""
  try:
    yield
  except GrowlmError as e:
    raise GrowlmError(f"sweep run {name!r}: {e}") from None


def check_sweep_dir(sweep_dir: str) -> None:
  """--sweep_dir: a scheme growlm reads, and not a local file (no network here: a remote
  launch checks its flags first)."""
  fs.check(sweep_dir, "--sweep_dir")
  if not fs.is_url(sweep_dir) and fs.isfile(sweep_dir):
    raise GrowlmError(f"--sweep_dir={sweep_dir} is a file; accepted: a new directory or the "
                      "directory of a launched sweep")


def check_data(runs: list[Run]) -> None:
  """Refuses, before any run starts, a run whose data cannot be read here (a missing file, a
  wrong text field), which would otherwise stop the sweep only when that run's turn comes.
  Finished runs are skipped; each distinct source is checked once (growlm.data.check_source)."""
  from growlm import data  # pylint: disable=g-import-not-at-top
  seen = set()
  for run in runs:
    if is_done(run):
      continue
    d = resolve(run.config).data
    for spec in [d.train] + [source for _, source, _ in d.eval_sources()]:
      key = (spec, d.data_dir, d.text_field)
      if key in seen:
        continue
      seen.add(key)
      with naming(run.name):
        data.check_source(spec, data_dir=d.data_dir or None, text_field=d.text_field)


def check_run_dirs(runs: list[Run]) -> None:
  """Refuses, before any run starts, a run dir that holds a run of another config than the
  sweep now gives it (growlm.main's own refusal, growlm.commands.check_relaunch): a relaunch
  with changed flags would otherwise skip the finished runs and report their old results
  under the new settings."""
  from growlm import commands  # pylint: disable=g-import-not-at-top  (jax)
  for run in runs:
    with naming(run.name):
      commands.check_relaunch(run.config, run.workdir)


def _flag_value(v: Any) -> str:
  if isinstance(v, (tuple, list)):
    return "(" + ",".join(str(x) for x in v) + ("," if len(v) == 1 else "") + ")"
  return str(v)


def command(config: str, run: Run, python: str = "python", extra: tuple[str, ...] = (),
            overrides: dict[str, str | bool] | None = None) -> list[str]:
  """The growlm.main command line that trains `run` exactly as the launcher does."""
  args = [python, "-m", "growlm.main", f"--config={config}", f"--workdir={run.workdir}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in (overrides or {}).items()]
  for key, value in run.overrides.items():
    if key == "init.source" and isinstance(value, str) and value.startswith("@"):
      value = fs.join(fs.dirname(run.workdir), value[1:])
    args.append(f"--config.{key}={_flag_value(value)}")
  args += [f"--config.name={run.name}", f"--config.sweep_name={run.config.sweep_name}"]
  return args + list(extra)


def manifest(config: str, runs: list[Run], overrides: dict | None, backend: str,
             settings: dict[str, Any], seeds: int = 1) -> dict[str, Any]:
  """What SWEEP/sweep.json records: enough for `status` to read the sweep with no config, and
  for the analysis to pool a run's repetitions over seeds."""
  return {"config": config, "overrides": dict(overrides or {}), "backend": backend,
          "settings": settings, "seeds": seeds,
          "runs": [{"name": r.name, "workdir": r.workdir, "depends": r.depends,
                    "num_steps": int(r.config.train.num_steps)} for r in runs]}


def launch(config: str, sweep_dir: str, *, backend: str = "local",
           overrides: dict[str, str | bool] | None = None, dry_run: bool = False,
           only: tuple[str, ...] = (), echo: Callable[[str], None] = print,
           run_fn: Callable | None = None, seeds: int = 1, **remote_flags) -> list[Run]:
  """Runs the sweep here: every run in dependency order, finished runs skipped, unfinished ones
  resumed; with dry_run, prints what it would run. Remote backends are growlm.experiments.
  launcher's (which calls this for backend 'local')."""
  if backend not in BACKENDS:
    raise GrowlmError(f"--backend={backend}; accepted: {', '.join(BACKENDS)}")
  if backend != "local":
    raise ValueError("remote backends go through growlm.experiments.launcher.launch")
  check_sweep_dir(sweep_dir)
  given = [k for k, v in remote_flags.items() if v not in (None, False, "", 0, ())]
  if given:
    raise GrowlmError(f"--{given[0]} is a flag of a remote backend; accepted: --backend=gcloud "
                      "(--tpu, --zone, --project, --spot, ...) or --backend=skypilot "
                      "(--accelerators, --num_nodes, --spot, ...)")
  every = expand(config, sweep_dir, overrides, seeds)
  runs = select(every, only)
  check_run_dirs(runs)
  check_data(runs)   # here only: a remote run's files are its hosts', not this machine's
  if not dry_run and runs:   # first, so that `status` can follow the runs as they go
    fs.makedirs(sweep_dir)
    fs.write_json_atomic(fs.join(sweep_dir, MANIFEST),
                         manifest(config, every, overrides, backend, {}, seeds))
  for run in runs:
    line = " ".join(shlex.quote(a) for a in command(config, run, overrides=overrides))
    if dry_run:
      echo(line)
      continue
    if is_done(run):
      echo(f"[{run.name}] finished, skipped")
      continue
    echo(f"[{run.name}] {line}")
    if run_fn is None:
      from growlm import commands  # pylint: disable=g-import-not-at-top
      run_fn = commands.train
    with naming(run.name):   # which run (a data error is found only when it starts)
      run_fn(run.config, run.workdir)
  return runs


def compile_for(config: str, sweep_dir: str, topology: str, *,
                overrides: dict[str, str | bool] | None = None, only: tuple[str, ...] = (),
                seeds: int = 1, echo: Callable[[str], None] = print) -> dict[str, dict]:
  """Compiles every run's programs for the TPU slice `topology` (growlm.train.aot), each
  distinct step once (repetitions over seeds, and grown and scratch runs of one size, share
  one) and each distinct growth from a source once, printing each run's lines; GrowlmError
  naming the first run with a program that does not fit. A source that is another run of the
  sweep is compiled from that run's config (it need not have trained). Trains and writes
  nothing."""
  from growlm import commands  # pylint: disable=g-import-not-at-top
  from growlm.train import aot  # pylint: disable=g-import-not-at-top
  runs = expand(config, sweep_dir, overrides, seeds)
  resolved = {r.name: resolve(r.config) for r in runs}
  reports: dict[str, dict] = {}
  steps: dict[str, str] = {}   # what the steps depend on -> the run that compiled them
  first: dict[str, str] = {}   # ... and what its growth from a source does -> the run
  for run in select(runs, only):
    c = resolved[run.name]
    key = repr((c.model, c.stages, c.mesh, c.sharding_rules, c.data.seq_len,
                c.data.batch_size, c.train.grad_accum, c.init.lr_multipliers,
                c.init.lr_rescale))
    source = resolved[run.depends[0]] if run.depends else None
    growth = key
    if c.init.source:   # the source's model and optimizer (or its directory), and the plan
      growth += repr(((source.model, source.stages, dataclasses.replace(source.train, seed=0),
                       source.init.lr_multipliers, source.init.lr_rescale)
                      if source else c.init.source, c.init.plan, c.init.optimizer))
    if growth in first:
      reports[run.name] = reports[first[growth]]
      same = "step and growth" if c.init.source else "step"
      echo(f"[{run.name}] the same {same} as [{first[growth]}]")
      continue
    prior = reports[steps[key]] if key in steps else None
    with naming(run.name):
      reports[run.name] = commands.compile_for(c, topology, source=source, steps_of=prior)
    first[growth] = run.name
    steps.setdefault(key, run.name)
    lines = aot.format_report(reports[run.name])
    if len(first) == 1:
      echo(lines[0])
    for line in lines[1:] if prior is None else aot.format_init(reports[run.name]):
      echo(f"[{run.name}] {line.removeprefix('growlm: ')}")
    if prior is not None:
      echo(f"[{run.name}] the same step as [{steps[key]}]")
  return reports

