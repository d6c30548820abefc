"""Checkpoints with orbax: train state, data iterator state and metadata, one step a directory.

Orbax writes each step into `N.orbax-checkpoint-tmp` and renames it to `N` once every process has
committed, so a crash mid-save never leaves a half-written step as the latest. It does not notice
bytes changed later (a flipped byte in a zstd stream restores as wrong numbers), so each finished
step also gets `N/growlm_checksums.json`: size and sha256 of every file in the step.

* Process 0 writes it once orbax has finalised the step (at the next save() or at close(); at once
  with async_save=False), after a barrier, atomically. A step without one (older growlm, or
  stopped between finalising and checksumming) restores unverified.
* restore_latest checks it before handing the step to orbax. Damage (checksum mismatch, missing or
  extra file, or an orbax/tensorstore error meaning corrupt or missing bytes) falls back to the
  next older step; damaged newer steps become `N.damaged-K`, named in one warning line. Any other
  error (permissions, I/O, anything unrecognised) raises GrowlmError and renames nothing.
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import threading
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from growlm import fs
from growlm.errors import GrowlmError
from growlm.train.checkpoint_files import CHECKSUMS, describe, hash_all, is_damage, list_files

log = logging.getLogger(__name__)

_TMP_DIR = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")
ABANDON_WAIT_S = 300.0  # close(abandon=True) waits at most this long for the save in flight
_OK, _DAMAGED, _UNREADABLE = 0, 1, 2

class Checkpoints:
  """A CheckpointManager with items `state` (arrays), `data` and `meta` (JSON), plus checksums.

  One object writes a directory (the trainer's), others may read it. The writer's first save
  removes leftover `N.orbax-checkpoint-tmp` dirs (saves killed mid-way); readers change nothing
  but, with restore_latest(set_aside=True), the names of damaged steps."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = fs.absolute(directory)
    self.async_save = async_save
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})
    self._pending: list[int] = []  # saved here, not yet checksummed
    self._saved = False
    self._closed = False

  def steps(self) -> list[int]:
    """The finalised steps, oldest first (damaged ones too, until restore_latest meets them)."""
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict, meta: dict) -> None:
    """Starts saving `step` (asynchronously unless async_save=False); every process must call it.

    First waits for the previous save and checksums it, so a failed previous save raises here.
    """
    if self._closed:
      raise RuntimeError(f"Checkpoints({self.directory!r}) is closed; save() needs a new one")
    if not self._saved and jax.process_index() == 0:
      self._remove_tmp_dirs(None)  # no barrier: orbax's process 0 makes the new tmp dir after
    self._saved = True
    self._finish_pending()
    error = None
    try:
      self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
          meta=ocp.args.JsonSave(meta)), force=True)
    except Exception as e:  # pylint: disable=broad-except  (raised by _check_written)
      error = e
    self._check_written([step], error)
    self._pending.append(step)
    if not self.async_save:
      self._finish_pending()

  def verify(self, step: int) -> str:
    """'verified' (files match the step's checksums), 'unverified' (it has none; every file opens)
    or 'damaged: FILE: WHAT', read on this process; GrowlmError if the step cannot be read."""
    code, detail = self._inspect(step)
    if code == _UNREADABLE:
      raise self._cannot_read(step, detail)
    return f"damaged: {detail}" if code == _DAMAGED else detail

  def restore_latest(self, abstract_state: Any, *, set_aside: bool = True
                     ) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data_state, meta) from the newest undamaged step, else None if empty.

    `abstract_state` is a tree of jax.ShapeDtypeStruct with the target shardings (a checkpoint
    restores onto another mesh), or a callable step -> such a tree (a run with growth stages
    holds different models at different steps). Damaged steps are skipped, named in one
    warning line, and with `set_aside` renamed `N.damaged-K` so this run can write those steps
    again. Any other read error raises GrowlmError, nothing renamed. Every process must call
    it."""
    steps = self.steps()
    if not steps:
      return None
    damaged: list[tuple[int, str]] = []
    for step in reversed(steps):
      # Process 0 reads the files (they are shared); every process follows its verdict.
      code, detail = self._inspect(step) if jax.process_index() == 0 else (_OK, "")
      code, detail = self._agree(code, detail)
      if code == _OK:
        if detail == "unverified":
          log.info("checkpoint step %d in %s has no %s (older growlm, or stopped before "
                   "checksumming): restoring it unverified", step, self.directory, CHECKSUMS)
        try:
          out = self.manager.restore(step, args=ocp.args.Composite(
              state=ocp.args.StandardRestore(
                  abstract_state(step) if callable(abstract_state) else abstract_state),
              data=ocp.args.JsonRestore(),
              meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except  (classified right below)
          code, detail = (_DAMAGED if is_damage(e) else _UNREADABLE), describe(e)
        code, detail = self._agree(code, detail)
      if code == _UNREADABLE:
        raise self._cannot_read(step, detail)
      if code == _DAMAGED:
        damaged.append((step, detail))
        continue
      if damaged:
        names = self._set_aside([s for s, _ in damaged]) if set_aside else {}
        fate = {s: ("set aside as " + names.get(s, "N.damaged-K")) if set_aside else "skipped"
                for s, _ in damaged}
        log.warning("damaged checkpoint step(s) in %s: %s; restored step %d", self.directory,
                    "; ".join(f"step {s} ({d}), {fate[s]}" for s, d in damaged), step)
      return step, out["state"], out["data"], out["meta"]
    raise GrowlmError(
        f"no checkpoint in {self.directory} restores, all are damaged: "
        f"{'; '.join(f'step {s} ({d})' for s, d in damaged)}; nothing was changed; accepted: a "
        "directory with one undamaged step (or remove it to start afresh)")

  def close(self, abandon: bool = False, wait: bool = True) -> None:
    """Waits for the save in flight, finalises and checksums it, and closes the manager.

    Normal close (every process calls it) raises GrowlmError if a save failed. `abandon=True` is
    for error paths: it never raises, makes no cross-process barrier, and waits at most
    ABANDON_WAIT_S, or not at all with `wait=False` (then leaves that step's tmp dir: orbax ignores
    it, the next writer's first save removes it). Safe to call twice, and after `manager.close()`.
    Without close, an async save in flight dies at interpreter exit, leaving
    `N.orbax-checkpoint-tmp`.
    """
    if self._closed:
      return
    self._closed = True
    if abandon:
      try:
        self._abandon(ABANDON_WAIT_S if wait else 0.0)
      except Exception as e:  # pylint: disable=broad-except  (must not mask the error in flight)
        log.warning("closing checkpoints in %s: %s", self.directory, describe(e))
      return
    try:
      self._finish_pending()
    finally:
      try:
        self.manager.close()
      except Exception as e:  # pylint: disable=broad-except  (the save error, if any, is raised)
        log.warning("closing checkpoints in %s: %s", self.directory, describe(e))

  def _finish_pending(self) -> None:
    """Waits for orbax to finalise the pending saves, then checksums them (process 0)."""
    if not self._pending:
      return
    pending, self._pending = self._pending, []
    error = None
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (raised below, on every process)
      error = e
    # Orbax renames a step only once every process committed; this collective is also the
    # barrier that makes every process's files final before process 0 hashes them.
    self._check_written(pending, error)
    if jax.process_index() == 0:
      for step in pending:
        self._write_checksums(step)

  def _check_written(self, steps: list[int], error: BaseException | None) -> None:
    """Raises on every process if saving `steps` failed on any (a lone raise would leave the
    others waiting in the next collective); a single process removes the unfinished tmp dir."""
    code, detail = self._agree(_UNREADABLE if error else _OK, describe(error) if error else "")
    if code == _OK:
      return
    if jax.process_count() == 1:
      self._remove_tmp_dirs(steps)  # with several, others may still be writing into theirs
    raise GrowlmError(f"checkpoint step {steps[-1]} was not written to {self.directory} "
                      f"({detail}); fix the cause and relaunch") from error

  def _abandon(self, wait_s: float) -> None:
    """close(abandon=True): a wait of at most `wait_s`, no barriers, no raise."""
    if not wait_s:   # a peer is gone: orbax's commit, and so its close, would wait for it
      if self._pending:
        log.warning("checkpoint step(s) %s in %s abandoned (the next save here removes the tmp "
                    "dir)", self._pending, self.directory)
      self._pending = []
      return
    if not self._pending:  # nothing in flight (a failed save already raised in save())
      self.manager.close()
      return
    result: dict[str, Any] = {}

    def wait():
      try:
        self.manager.wait_until_finished()
      except BaseException as e:  # pylint: disable=broad-except
        result["error"] = e
    waiter = threading.Thread(target=wait, daemon=True)  # daemon: never keeps the process up
    waiter.start()
    waiter.join(wait_s)
    pending, self._pending = self._pending, []
    if waiter.is_alive():
      log.warning("checkpoint step(s) %s in %s still saving after %.0f s: abandoned (the next "
                  "save here removes its tmp dir)", pending, self.directory, wait_s)
      return  # manager.close() would wait again
    if "error" in result:
      log.warning("checkpoint step(s) %s were not written to %s (%s)", pending, self.directory,
                  describe(result["error"]))
      if jax.process_count() == 1:
        self._remove_tmp_dirs(pending)
    elif jax.process_index() == 0:
      for step in pending:  # a final dir means every process committed (see _finish_pending)
        self._write_checksums(step)
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-except
      if "error" not in result:
        raise  # else it is the save error again, logged above

  def _write_checksums(self, step: int) -> None:
    """Writes N/growlm_checksums.json for a finalised step; a failure leaves it unverified."""
    root = fs.join(self.directory, str(step))
    try:
      if not fs.isdir(root) or fs.exists(fs.join(root, CHECKSUMS)):
        return
      sizes = list_files(root)
      digests = hash_all(root, sorted(sizes))
      fs.write_json_atomic(fs.join(root, CHECKSUMS), {
          "format": "growlm-checksums-1", "algorithm": "sha256",
          "files": {r: {"bytes": sizes[r], "sha256": digests[r]} for r in sorted(sizes)}})
    except Exception as e:  # pylint: disable=broad-except  (never fail training for this)
      log.warning("could not checksum checkpoint step %d in %s (%s); it will restore unverified",
                  step, self.directory, describe(e))

  def _inspect(self, step: int) -> tuple[int, str]:
    """(_OK, 'verified' | 'unverified') or (_DAMAGED | _UNREADABLE, what), on this process."""
    root = fs.join(self.directory, str(step))
    try:
      sizes = list_files(root)
      if not fs.exists(fs.join(root, CHECKSUMS)):
        for rel in sizes:  # no checksums: still stop on a file that cannot be read
          with fs.open_read(fs.join(root, rel)) as f:
            f.read(1)
        return _OK, "unverified"
      text = fs.read_text(fs.join(root, CHECKSUMS))
    except (OSError, GrowlmError) as e:
      return _UNREADABLE, describe(e)
    try:
      listed = {r: (int(v["bytes"]), str(v["sha256"]))
                for r, v in json.loads(text)["files"].items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
      return _DAMAGED, f"{CHECKSUMS}: unreadable ({type(e).__name__})"
    problems = [f"{r}: missing" for r in sorted(set(listed) - set(sizes))]
    problems += [f"{r}: not in {CHECKSUMS}" for r in sorted(set(sizes) - set(listed))]
    problems += [f"{r}: {sizes[r]} bytes, {CHECKSUMS} says {listed[r][0]}"
                 for r in sorted(set(sizes) & set(listed)) if sizes[r] != listed[r][0]]
    if not problems:
      try:
        digests = hash_all(root, sorted(listed))
      except (OSError, GrowlmError) as e:
        return _UNREADABLE, describe(e)
      problems = [f"{r}: sha256 mismatch" for r in sorted(listed) if digests[r] != listed[r][1]]
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return (_DAMAGED, f"{problems[0]}{more}") if problems else (_OK, "verified")

  @staticmethod
  def _agree(code: int, detail: str) -> tuple[int, str]:
    """The worst verdict of all processes (one collective), so all take the same branch."""
    if jax.process_count() == 1:
      return code, detail
    for _ in range(2):
      codes = set(np.asarray(multihost_utils.process_allgather(np.int32(code))).ravel().tolist())
      if codes <= {_OK, _DAMAGED, _UNREADABLE}:
        worst = max(codes)
        return worst, (detail if worst == code else "on another process; see its log")
      # A restore that failed on this process only met the others' closing orbax barrier (also
      # an allgather): that barrier fails there, and they come here next. Meet them once more.
      code = _UNREADABLE
    return _UNREADABLE, "processes out of step in a restore"

  def _cannot_read(self, step: int, detail: str) -> GrowlmError:
    return GrowlmError(f"cannot read checkpoint step {step} in {self.directory} ({detail}); "
                       "nothing was changed; fix the cause and relaunch (or move the step aside)")

  def _remove_tmp_dirs(self, steps: list[int] | None) -> None:
    """Removes `N.orbax-checkpoint-tmp*` (for `steps`, or all): saves that will never finish."""
    try:
      names = [n for n in fs.listdir(self.directory) if (m := _TMP_DIR.match(n))
               and (steps is None or int(m.group(1)) in steps)]
      for name in names:
        fs.rmtree(fs.join(self.directory, name))
      if names:
        log.info("removed unfinished checkpoint save(s) %s from %s", names, self.directory)
    except FileNotFoundError:
      pass
    except (OSError, GrowlmError) as e:
      log.warning("could not remove unfinished saves in %s (%s)", self.directory, describe(e))

  def _set_aside(self, steps: list[int]) -> dict[int, str]:
    """Renames damaged steps to `N.damaged-K` (kept for inspection, no longer listed), so the
    resumed run can write those step numbers again; {step: new name} on process 0."""
    names = {}
    if jax.process_index() == 0:
      for step in steps:
        src = fs.join(self.directory, str(step))
        k = next(k for k in itertools.count() if not fs.exists(f"{src}.damaged-{k}"))
        fs.rename(src, f"{src}.damaged-{k}")
        names[step] = f"{step}.damaged-{k}"
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("growlm_checkpoint_set_aside")
    self.manager.reload()
    return names
