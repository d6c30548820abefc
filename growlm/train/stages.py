"""Growth stages at run time: which model trains at a step, what a range of steps costs in
FLOPs, one global learning-rate schedule, and each stage's compiled pieces.

The stages themselves (config, models, step convention) are growlm.config.stages; the growth of
the live state is the initialisation seam's (growlm.init.seam.grow_stage), handed to the trainer.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from growlm import optim
from growlm.config import stages as stages_lib
from growlm.config.typed import RunConfig
from growlm.model import flops as flops_lib
from growlm.model.config import ModelConfig
from growlm.train.state import TrainState, check_state_fits, state_shardings


def make_schedule(config: RunConfig) -> optax.Schedule:
  """The run's one schedule over train.num_steps (warmup, decay), times a linear ramp from 0
  over `rewarm_steps` after each stage that asks for one."""
  t = config.train
  base = optim.make_schedule(t.lr, t.warmup_steps, t.num_steps, t.schedule, t.final_lr_ratio)
  rewarms = [(s.step, s.rewarm_steps) for s in config.stages if s.rewarm_steps > 0]
  if not rewarms:
    return base

  def schedule(count):
    lr = base(count)
    for start, n in rewarms:
      ramp = jnp.clip((count - start) / n, 0.0, 1.0)
      lr = lr * jnp.where(count >= start, ramp, 1.0)
    return lr
  return schedule


def with_schedule_count(opt_state: Any, step) -> Any:
  """`opt_state` with its learning-rate schedule's step count set to `step` (a state grown or
  initialised mid-run goes on along the run's schedule instead of starting it again). The count
  is a copy: a train step donates its state, and no two leaves may share a buffer."""
  is_sched = lambda x: isinstance(x, optax.ScaleByScheduleState)
  return jax.tree.map(
      lambda x: optax.ScaleByScheduleState(count=jnp.array(step, jnp.int32, copy=True))
      if is_sched(x)
      else x, opt_state, is_leaf=is_sched)


def carry_on(new: TrainState, old: TrainState) -> TrainState:
  """`new` (a state just grown from `old`) with `old`'s step, dropout key and place on the
  learning-rate schedule: the run goes on where `old` was, as if growth took no step."""
  return new.replace(step=old.step, rng=old.rng,
                     opt_state=with_schedule_count(new.opt_state, old.step))


def jit_step(step: Callable, shard: TrainState, batch_shard) -> Callable:
  """The train step as the trainer runs it: the state in and out with its shardings (donated:
  the new state reuses the old one's buffers), the batch split by `batch_shard`."""
  return jax.jit(step, in_shardings=(shard, batch_shard), out_shardings=(shard, None),
                 donate_argnums=0)


@dataclasses.dataclass
class Kit:
  """What training one stage's model needs: its config, state shardings and jitted steps."""
  index: int
  config: RunConfig                 # the run's config with this stage's model
  abstract: TrainState
  shard: TrainState
  step_fn: Callable
  evaluator: Any
  flops_per_token: float
  optimizer: optax.GradientTransformation   # the run's (the same object in every stage)


class Stages:
  """The run's stages and their kits (built when first needed; stage 0's always)."""

  def __init__(self, config: RunConfig, optimizer, mesh, make_step: Callable[..., Callable],
               batch_shard, make_evaluator: Callable[..., Any]):
    """`make_step(model)` is the train step; `make_evaluator(model, param_shardings)` builds
    stage 0's evaluator (later stages reuse its batches, Evaluator.for_model)."""
    self.config = config
    self.stages = config.stages
    self.models: list[ModelConfig] = stages_lib.models(config.model, config.stages)
    self._optimizer, self._mesh, self._make_step = optimizer, mesh, make_step
    self._batch_shard, self._make_evaluator = batch_shard, make_evaluator
    self._kits: dict[int, Kit] = {}
    self._states: dict[int, tuple[TrainState, TrainState]] = {}
    self._fpt = [flops_lib.flops_per_token(m, config.data.seq_len) for m in self.models]
    # Before anything is built: the largest model's state must fit a device.
    last = len(self.models) - 1
    check_state_fits(self.models[last], self._state(last)[0], mesh,
                     f"stage {last}'s model" if self.stages else "model")

  def index_at(self, step: int) -> int:
    return stages_lib.index_at(self.stages, step)

  def growth_after(self, step: int) -> int | None:
    """The stage (1-based index into `models`) that grows a state at `step`, if any."""
    for j, s in enumerate(self.stages, start=1):
      if s.step == step:
        return j
    return None

  def abstract_at(self, step: int) -> TrainState:
    return self.kit(self.index_at(step)).abstract

  def _state(self, i: int) -> tuple[TrainState, TrainState]:
    """Stage i's (abstract state, state shardings), computed once (the memory check reads the
    last stage's before its kit exists)."""
    if i not in self._states:
      self._states[i] = state_shardings(self.models[i], self._optimizer, self._mesh,
                                        self.config.sharding_rules)
    return self._states[i]

  def kit(self, i: int) -> Kit:
    if i not in self._kits:
      cfg = self.models[i]
      config = self.config.replace(model=cfg, stages=()) if i else self.config
      abstract, shard = self._state(i)
      step_fn = jit_step(self._make_step(cfg), shard, self._batch_shard)
      evaluator = (self._make_evaluator(cfg, shard.params) if i == 0 else
                   self.kit(0).evaluator.for_model(cfg, shard.params))
      self._kits[i] = Kit(i, config, abstract, shard, step_fn, evaluator, self._fpt[i],
                          self._optimizer)
    return self._kits[i]

  def flops(self, first: int, last: int, tokens_per_step: int) -> float:
    """FLOPs of optimizer steps first+1 .. last, each at the model that takes it."""
    bounds = [0] + [s.step for s in self.stages] + [1 << 62]
    total = 0.0
    for i, fpt in enumerate(self._fpt):
      lo, hi = max(first, bounds[i]), min(last, bounds[i + 1])
      if hi > lo:
        total += (hi - lo) * tokens_per_step * fpt
    return total
