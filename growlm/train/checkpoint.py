"""Checkpoints with orbax: train state, data iterator state and metadata, one step a directory.

Orbax writes each step into a temporary directory and renames it when complete, so a crash
mid-save never leaves a half-written step as the latest. A damaged step that is still listed
is skipped on restore (with a warning) in favour of the newest older step that restores.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from growlm.errors import GrowlmError

log = logging.getLogger(__name__)


class Checkpoints:
  """A CheckpointManager with items `state` (arrays), `data` and `meta` (JSON)."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts saving `step` (asynchronously); every process must call it."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore_latest(self, abstract_state: Any, *, set_aside: bool = True
                     ) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data_state, meta) from the newest step that restores, else None if empty.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with the target shardings, so a
    checkpoint written on one mesh restores onto another. With `set_aside`, damaged steps newer
    than the restored one are renamed so this run can write those steps again.
    """
    steps = self.steps()
    if not steps:
      return None
    errors = []
    for step in reversed(steps):
      try:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
        if errors:
          log.warning("skipped unrestorable checkpoint step(s): %s", "; ".join(errors))
          if set_aside:
            self._set_aside([s for s in steps if s > step])
        return step, out["state"], out["data"], out["meta"]
      except Exception as e:  # orbax raises many types for damaged data; try an older step.
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        errors.append(f"step {step}: {type(e).__name__}: {first_line}")
    raise GrowlmError(f"no checkpoint in {self.directory} restores onto this run's state "
                      f"({'; '.join(errors)})")

  def _set_aside(self, steps: list[int]) -> None:
    """Renames damaged steps to `N.damaged-K` (kept for inspection, no longer listed), so the
    resumed run can write those step numbers again."""
    if jax.process_index() == 0:
      for step in steps:
        src = os.path.join(self.directory, str(step))
        k = 0
        while os.path.exists(f"{src}.damaged-{k}"):
          k += 1
        os.rename(src, f"{src}.damaged-{k}")
    multihost_utils.sync_global_devices("growlm_checkpoint_set_aside")
    self.manager.reload()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
