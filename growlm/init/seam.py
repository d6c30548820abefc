"""The initialisation seam: where a run's first state comes from, decided in one place.

In big_vision's order:
  1. resume: the run dir holds a checkpoint -> restore the newest one that restores;
  2. grow:   config.init.source names a growlm run dir or a Hugging Face directory -> restore it
             onto the mesh and grow it to the config's model by config.init.plan, print and
             return the preservation report;
  3. fresh:  a random init (or parameters a test hands in).

`prepare(config, workdir)` returns the run's effective config (a grown run dir remembers its
init section; growth may rescale model.norm_eps, which is announced) and the source to grow, if
any. `initializer(...)` returns the callable the trainer calls once its mesh and shardings exist.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax

from growlm import fs, rundir
from growlm.config.typed import InitConfig, RunConfig, resolve_section
from growlm.grow import core as grow_core
from growlm.grow import report as report_lib
from growlm.init import source as source_lib
from growlm.init.source import Source
from growlm.model import decoder as model_lib
from growlm.train import loss as loss_lib
from growlm.train.checkpoint import Checkpoints
from growlm.train import stages as stages_lib
from growlm.train import trainer
from growlm.train.state import TrainState, init_state
from growlm.train.trainer import Initializer, Setup, Start

log = logging.getLogger(__name__)


def _say(line: str) -> None:
  if jax.process_index() == 0:
    print(line, flush=True)


_NO_SOURCE = InitConfig().to_dict()   # init's fields as a run without a source leaves them


def prepare(config: RunConfig, workdir: str) -> tuple[RunConfig, Source | None]:
  """(the run's effective config, the source to grow or None). Reads headers only.

  A grown run dir remembers its `init` section, so relaunching it (to resume, or to train on
  what the grow command wrote) needs no init flags. A fresh grown run takes model.norm_eps from
  growth (zeros/mean_fill rescale it), saying so when it differs from the config's; a resumed
  one takes it from the run dir.
  """
  saved = trainer.require_config(workdir)
  if saved and (saved.get("init") or {}).get("source") and not config.init.source:
    config = config.replace(init=resolve_section("init", saved["init"], InitConfig))
  if not config.init.source:
    # Growth stages inside the run use the learning-rate options (docs/design.md 5.11).
    used = ("source", "seed") + (("lr_multipliers", "lr_rescale") if config.stages else ())
    unused = [f"init.{k}" for k, v in config.init.to_dict().items()
              if k not in used and v != _NO_SOURCE[k]]
    if unused:   # a sweep-wide flag reaches the source and scratch runs too: say, not refuse
      _say(f"growlm: note: {', '.join(unused)} {'has' if len(unused) == 1 else 'have'} no "
           "effect: init.source is empty, so the model starts from a random init (growth "
           "inside one run is config.stages)")
    return config, None
  src = source_lib.read_source(config.init.source)   # headers only, read once
  source_lib.check_init(config, src)
  if saved and rundir.has_checkpoint(workdir):
    norm_eps = (saved.get("model") or {}).get("norm_eps", config.model.norm_eps)
    return config.replace_model(norm_eps=norm_eps), None   # resuming: growth already happened
  grown = grow_core.grown_config(src.model, config.model, config.init.plan)
  if grown.norm_eps != config.model.norm_eps:
    _say(f"growlm: model.norm_eps {config.model.norm_eps:g} -> {grown.norm_eps:g} (set by "
         f"growth: {config.init.plan.width} growth of d_model {src.model.d_model} -> "
         f"{config.model.d_model} scales it by {src.model.d_model}/{config.model.d_model})")
  return config.replace_model(norm_eps=grown.norm_eps), src


def resume(setup: Setup) -> Start | None:
  """The newest restorable checkpoint of the run dir, or None if it holds none."""
  if not rundir.checkpoint_steps(setup.workdir):
    return None
  ckpt = Checkpoints(rundir.checkpoints_dir(setup.workdir), keep=setup.config.checkpoint.keep,
                     async_save=False)
  try:
    restored = ckpt.restore_latest(setup.abstract_at or setup.abstract)
  finally:
    ckpt.close()
  if restored is None:
    return None
  step, state, data_state, meta = restored
  log.info("resumed from step %d", step)
  return Start(state, data_state=data_state, source_flops=float(meta.get("source_flops", 0.0)),
               resumed=True, flops=float(meta.get("flops", 0.0)))


def grow(setup: Setup, src: Source) -> Start:
  """Restores `src` onto the mesh and grows it into the first state; prints the report. With
  init.continue_schedule the state takes the source's step, schedule count, dropout key and
  data position (growth between two runs that equals a growth stage inside one)."""
  config = setup.config
  src = source_lib.restore_source(src, setup.mesh, config.sharding_rules)
  plan = config.init.plan
  state, grown = source_lib.grow_state(
      src, config.model, plan, setup.optimizer, setup.shard, seed=config.init.seed,
      train_seed=config.train.seed, grow_optimizer=config.init.optimizer == "grow")
  eval_name, batches = next(iter(setup.eval_batches.items()))
  report = report_lib.preservation_report(
      src.model, src.state.params, grown.config, state.params, batches, plan,
      extra={"source": fs.absolute(src.directory), "source_step": src.step,
             "source_flops": src.flops, "optimizer_init": config.init.optimizer,
             "lr_multipliers": bool(config.init.lr_multipliers),
             "lr_rescale": config.init.lr_rescale, "eval_dataset": eval_name},
      loss_fn=loss_lib.token_nll)
  _say(report_lib.format_report(report))
  if not config.init.continue_schedule:
    return Start(state, report=report, source_flops=src.flops)
  # The grown run goes on where the source stopped: its step (so the one schedule of
  # train.num_steps, counted from the source's start), dropout key and data position.
  return Start(stages_lib.carry_on(state, src.state), data_state=src.data_state, report=report,
               source_flops=src.flops)


def grow_stage(config: RunConfig, before: stages_lib.Kit, after: stages_lib.Kit,
               state: TrainState, index: int) -> tuple[TrainState, dict]:
  """Grows the live state (model `before.config.model`) by config.stages[index - 1] into
  `after`'s model and shardings, on device; prints and returns the preservation report.

  The state keeps its step, dropout key and place on the run's one schedule; Adam's moments are
  grown (stage optimizer 'grow') or start again (fresh). Growth noise and new weights take the
  seed init.seed + index."""
  stage = config.stages[index - 1]
  step = int(jax.device_get(state.step))
  src = Source(directory="", config=config.to_json(), model=before.config.model, step=step,
               state=state, meta={"flops": 0.0})
  new, grown = source_lib.grow_state(
      src, after.config.model, stage.plan, after.optimizer, after.shard,
      seed=config.init.seed + index, train_seed=config.train.seed,
      grow_optimizer=stage.optimizer == "grow")
  new = stages_lib.carry_on(new, state)
  eval_name, batches = next(iter(after.evaluator.batches.items()))
  report = report_lib.preservation_report(
      before.config.model, state.params, grown.config, new.params, batches, stage.plan,
      extra={"stage": index, "step": step, "optimizer_init": stage.optimizer,
             "rewarm_steps": stage.rewarm_steps, "eval_dataset": eval_name},
      loss_fn=loss_lib.token_nll)
  _say(f"growlm: growth stage {index} at step {step}")
  _say(report_lib.format_report(report))
  return new, report


def fresh(setup: Setup, params_fn: Callable[[Any], Any] | None = None) -> Start:
  """A random init, born sharded; `params_fn(param_shardings)` may supply the parameters."""
  config = setup.config
  params = params_fn(setup.shard.params) if params_fn else None
  state = init_state(config.model, setup.optimizer, setup.shard, config.train.seed, params)
  log.info("initialised %s parameters", f"{model_lib.count_params(state.params):,}")
  return Start(state)


def initializer(source: Source | None = None, *,
                params_fn: Callable[[Any], Any] | None = None) -> Initializer:
  """The trainer's initialiser: resume, else grow `source`, else a fresh init."""
  def initialize(setup: Setup) -> Start:
    start = resume(setup)
    if start is not None:
      return start
    if source is not None:
      return grow(setup, source)
    return fresh(setup, params_fn)
  return initialize


