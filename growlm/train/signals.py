"""Stopping on a signal: SIGTERM, SIGINT and SIGHUP finish the current step, save it, and exit.

One process: handlers for the three signals record the first one; the trainer asks
`should_stop(step)` after dispatching each step, saves that step's checkpoint, waits until it is
final and raises growlm.errors.Preempted; the command line exits with growlm.errors.EXIT_PREEMPTED (75). A second
signal acts at once (the default handlers are back after the first).

Several processes (jax.distributed): they must all stop at the same step, or the next
collective would hang. JAX's preemption service already catches SIGTERM on every process and
agrees on a step through the coordination service; `should_stop` asks it
(multihost_utils.reached_preemption_sync_point, called at every step). SIGINT and SIGHUP are
turned into a SIGTERM to this process, so they take the same agreed path.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _sync_manager_ready() -> bool:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return (distributed.global_state.client is not None
          and distributed.global_state.preemption_sync_manager is not None)


class StopRequest:
  """Watches for a stop signal while the trainer runs; `install()` ... `uninstall()`."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous: dict[int, object] = {}
    self._multi = False

  def install(self) -> "StopRequest":
    """Installs the handlers (only possible on the main thread; elsewhere nothing is watched)."""
    if threading.current_thread() is not threading.main_thread():
      return self
    self._multi = jax.process_count() > 1
    if self._multi and not _sync_manager_ready():
      log.warning("no JAX preemption service: a signal stops this run without a checkpoint")
      return self
    for sig in SIGNALS:
      if self._multi and sig == signal.SIGTERM:
        continue   # JAX's preemption notifier owns SIGTERM
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def _handle(self, signum, frame) -> None:
    del frame
    name = signal.Signals(signum).name
    for sig, prev in self._previous.items():   # a second signal acts at once
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous = {}
    if self._multi:
      self.signal_name = name
      os.kill(os.getpid(), signal.SIGTERM)     # agree on the step with the other processes
      return
    if self.signal_name is None:
      self.signal_name = name
      print(f"growlm: {name} received: finishing this step and saving a checkpoint (send it "
            "again to stop at once)", file=sys.stderr, flush=True)

  def should_stop(self, step: int) -> bool:
    """True when the run must stop after `step` (the same step on every process)."""
    if self._multi:
      if _sync_manager_ready() and multihost_utils.reached_preemption_sync_point(step):
        # JAX's service saw a SIGTERM, here or on another process (or ours re-sent it)
        self.signal_name = self.signal_name or "SIGTERM to this or another process of the run"
        return True
      return False
    return self.signal_name is not None

  def uninstall(self) -> None:
    """Puts back the handlers that were there before install()."""
    for sig, prev in self._previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)
    self._previous = {}
