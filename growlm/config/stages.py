"""Growth stages inside one run: at step k the live model grows to new dimensions.

A run's `stages` config lists them in step order; each is a mapping

  {"step": 250,                                   # grow after this many optimizer steps
   "model": {"d_model": 128, "n_heads": 4, ...},  # model fields that change (the rest carry)
   "plan": {"width": "tile", "depth": "identity"},# the growth plan (growlm.grow.plan)
   "optimizer": "grow",                           # grow: Adam moments mapped | fresh: reset
   "rewarm_steps": 0}                             # > 0: ramp the LR from 0 again over N steps

`config.model` is the model the run starts with. Stage j's model is stage j-1's grown by stage
j's plan (`growlm.grow.core.grown_config`, which may rescale norm_eps), so every stage's model
follows from the config alone, which is what resuming in any stage needs.

Step convention: a state that has taken k optimizer steps holds the model of the last stage
whose `step` is below k (stage 0 for k <= the first stage's step). Growth happens just before
step `step + 1` is taken, so a checkpoint at a stage's step holds the model before that growth.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from growlm.errors import GrowlmError, strict_fields
from growlm.grow import core as grow_core
from growlm.grow.plan import GrowthPlan
from growlm.model.config import ModelConfig

STAGE_OPTIMIZER = ("grow", "fresh")


@dataclasses.dataclass(frozen=True)
class Stage:
  """One growth inside a run (see the module docstring)."""
  step: int
  model: tuple[tuple[str, Any], ...]   # (field, value) pairs of the ModelConfig fields it sets
  plan: GrowthPlan = GrowthPlan()
  optimizer: str = "grow"
  rewarm_steps: int = 0

  def to_dict(self) -> dict[str, Any]:
    return {"step": self.step, "model": dict(self.model), "plan": self.plan.to_dict(),
            "optimizer": self.optimizer, "rewarm_steps": self.rewarm_steps}


_EXAMPLE = "{'step': 250, 'model': {'d_model': 128}, 'plan': {'width': 'tile'}}"


def _as_mapping(x: Any, what: str, example: str = _EXAMPLE) -> Mapping[str, Any]:
  if hasattr(x, "to_dict"):
    x = x.to_dict()
  if not isinstance(x, Mapping):
    raise GrowlmError(f"config {what}={x!r}; accepted: a mapping such as {example}")
  return x


def _count(what: str, v: Any, minimum: int) -> int:
  if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
    raise GrowlmError(f"config {what}={v!r}; accepted: an integer >= {minimum}")
  return v


def parse(value: Any) -> tuple[Stage, ...]:
  """The `stages` config value (a list of mappings, or Stage objects) as Stages; unknown keys
  and bad values are refused with one line naming the stage and field."""
  if value is None:
    return ()
  if not isinstance(value, (list, tuple)):
    raise GrowlmError(f"config stages={value!r}; accepted: a list of stage mappings "
                      "(empty: no growth inside the run)")
  out = []
  model_fields = {f.name for f in dataclasses.fields(ModelConfig)}
  for i, raw in enumerate(value):
    if isinstance(raw, Stage):
      out.append(raw)
      continue
    what = f"stages[{i}]"
    fields = strict_fields(f"config {what}", _as_mapping(raw, what),
                           {f.name for f in dataclasses.fields(Stage)})
    if "step" not in fields or "model" not in fields:
      raise GrowlmError(f"config {what} lacks 'step' or 'model'; accepted: a mapping with step "
                        "(int > 0), model (the model fields that change), and optional plan, "
                        f"optimizer {STAGE_OPTIMIZER}, rewarm_steps")
    changes = dict(_as_mapping(fields["model"], f"{what}.model", "{'d_model': 128, 'n_layers': 8}"))
    unknown = sorted(set(changes) - model_fields)
    if unknown:
      raise GrowlmError(f"config {what}.model names unknown field {unknown[0]!r}; accepted: "
                        f"model fields ({', '.join(sorted(model_fields))})")
    optimizer = fields.get("optimizer", "grow")
    if optimizer not in STAGE_OPTIMIZER:
      raise GrowlmError(f"config {what}.optimizer={optimizer!r}; accepted: {STAGE_OPTIMIZER}")
    plan = _as_mapping(fields.get("plan", {}), f"{what}.plan",
                       "{'width': 'tile', 'depth': 'identity'}")
    try:
      plan = GrowthPlan.from_dict(plan)
    except GrowlmError as e:   # which stage: a config may have several
      raise GrowlmError(f"config {what}.plan: {e}") from None
    out.append(Stage(step=_count(f"{what}.step", fields["step"], 1),
                     model=tuple(sorted(changes.items())),
                     plan=plan,
                     optimizer=optimizer,
                     rewarm_steps=_count(f"{what}.rewarm_steps", fields.get("rewarm_steps", 0),
                                         0)))
  return tuple(out)


def models(model: ModelConfig, stages: tuple[Stage, ...]) -> list[ModelConfig]:
  """[the starting model, stage 1's model, ...]: each grown from the one before by its plan."""
  out = [model]
  for i, stage in enumerate(stages):
    try:
      target = out[-1].replace(**dict(stage.model))
      out.append(grow_core.grown_config(out[-1], target, stage.plan))
    except GrowlmError as e:
      raise GrowlmError(f"config stages[{i}]: {e}") from None
    except (TypeError, ValueError) as e:
      raise GrowlmError(f"config stages[{i}].model: {e}") from None
  return out


def check(stages: tuple[Stage, ...], model: ModelConfig, num_steps: int) -> None:
  """Steps strictly increasing inside (0, num_steps); every growth valid."""
  last = 0
  for i, stage in enumerate(stages):
    if not last < stage.step < num_steps:
      raise GrowlmError(f"config stages[{i}].step={stage.step}; accepted: steps increasing from "
                        f"stage to stage, each > {last} and < train.num_steps={num_steps}")
    last = stage.step
  models(model, stages)


def index_at(stages: tuple[Stage, ...], step: int) -> int:
  """The stage whose model a state at `step` (optimizer steps taken) holds."""
  return sum(1 for s in stages if s.step < step)


def model_of_run(config_json: Mapping[str, Any], step: int) -> dict[str, Any]:
  """The model (config.json form) of a run dir's state at `step`: config.json's `model` for a
  run without stages, else the model of the stage that step is in."""
  model = config_json["model"]
  stages = parse(config_json.get("stages") or ())
  if not stages:
    return model
  return models(ModelConfig.from_dict(model), stages)[index_at(stages, step)].to_dict()


def final_model(config_json: Mapping[str, Any]) -> dict[str, Any]:
  """The model a run dir's run ends with (its last stage's; config.json's `model` without
  stages)."""
  return model_of_run(config_json, 1 << 62)
