"""Resuming a run dir: which differences between its config.json and a relaunch's are allowed.

A relaunch must compute what the run computed up to its checkpoint; fields that do not change
that (RESUMABLE_FIELDS) may differ, and a field added to growlm since the run dir was written
counts as its default, which is what the run had.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from growlm import trees
from growlm.config.typed import DataConfig, InitConfig
from growlm.grow.plan import GrowthPlan
from growlm.model.config import ModelConfig

# Fields that may differ between a run and its resumption (they do not change what is computed
# up to the resumed step; attention kernels and logits_dtype change only its rounding).
RESUMABLE_FIELDS = ("name", "sweep_name", "train.num_steps", "train.stop_at", "eval.every_steps",
                    "log.every_steps", "log.progress_bar", "checkpoint.every_steps",
                    "checkpoint.keep", "checkpoint.async_save", "wandb", "mesh", "sharding_rules",
                    "model.remat", "model.attention", "model.scan_unroll", "model.loss_chunk",
                    "model.logits_dtype")


def _added_field_default(key: str) -> Any:
  """The JSON value a model, growth-plan, init or data field added since a run dir was written stood
  for then (its dataclass default); a sentinel for any other key."""
  for prefix, cls in (("model.", ModelConfig), ("init.plan.", GrowthPlan), ("init.", InitConfig),
                      ("data.", DataConfig)):
    for f in dataclasses.fields(cls) if key.startswith(prefix) else ():
      if f.name == key[len(prefix):] and f.default is not dataclasses.MISSING:
        return json.loads(json.dumps(f.default))
  return _NO_DEFAULT


_NO_DEFAULT = object()


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Fields whose values differ between a run dir's config.json and the new config.json. A
  model, growth-plan or init field that the saved config lacks (written before it existed)
  conflicts only when the new value is not the field's default, which is what the run had."""
  a, b = trees.flatten(saved), trees.flatten(current)

  def ignored(k):
    return any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)

  def differs(k):
    if k not in a and k in b and b[k] == _added_field_default(k):
      return False
    return a.get(k) != b.get(k)
  return sorted(k for k in set(a) | set(b) if not ignored(k) and differs(k))
