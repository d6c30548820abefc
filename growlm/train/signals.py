"""Stopping on a signal: SIGTERM, SIGINT and SIGHUP finish the current step, save it, and exit.

One process: handlers for the three signals record the first one; the trainer asks
`should_stop(step)` after dispatching each step, saves that step's checkpoint, waits until it is
final and raises growlm.errors.Preempted; the command line exits with
growlm.errors.EXIT_PREEMPTED (75). A second signal acts at once (the default handlers are back
after the first).

Several processes (jax.distributed): they must all stop at the same step, or the next
collective would hang. JAX's preemption service already catches SIGTERM on every process and
agrees on a step through the coordination service; `should_stop` asks it
(multihost_utils.reached_preemption_sync_point, called at every step). SIGINT and SIGHUP are
turned into a SIGTERM to this process, so they take the same agreed path.

Before the trainer watches (start-up: imports, input checks, data, initialisation, compiles),
`start_up()` around an entry point makes the same signals end the process at once, with one
`growlm: stopped:` line and EXIT_PREEMPTED, so launchers relaunch it alike: nothing of the run
dir is written until StopRequest.install(), just before the trainer takes the run dir's lease.
This module imports JAX only when the trainer installs its handlers: start_up() comes first.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from typing import Iterator

from growlm import errors
from growlm.train import peers

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOPPED_EARLY = ("growlm: stopped: {} before the first step: nothing was written or lost; "
                 "relaunch the same command to resume")
_EARLY = {"armed": False}   # start_up() arms it; StopRequest.install() disarms it for good


def _early(signum, frame) -> None:
  """A stop signal during start-up ends the process here and now. Not by an exception raised
  where the process was: a C extension being imported turns one into its own ImportError, and a
  finaliser (JAX's gc callback) swallows it; nothing of the run dir needs unwinding yet."""
  del frame
  if not _EARLY["armed"]:   # the trainer has watched and is done: the signal's default action
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return
  for sig in SIGNALS:   # a second signal acts at once (a multi-process exit waits for its peers)
    signal.signal(sig, signal.SIG_DFL)
  peers.leave_now(STOPPED_EARLY.format(signal.Signals(signum).name), errors.EXIT_PREEMPTED)


@contextlib.contextmanager
def start_up() -> Iterator[None]:
  """Around an entry point, from its first line: a stop signal before the trainer watches for one
  ends the process with one `growlm: stopped:` line and EXIT_PREEMPTED (telling the other
  processes of a multi-process run, growlm.train.peers), not with the signal's silent default."""
  previous = {}
  try:
    if threading.current_thread() is threading.main_thread():
      _EARLY["armed"] = True
      for sig in SIGNALS:
        previous[sig] = signal.signal(sig, _early)
    yield
  finally:
    _EARLY["armed"] = False
    for sig, prev in previous.items():
      signal.signal(sig, prev if prev is not None else signal.SIG_DFL)


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
    """Installs the handlers (only possible on the main thread; elsewhere nothing is watched).
    From here on a stop signal saves a step; start_up()'s exit at once is over."""
    _EARLY["armed"] = False
    if threading.current_thread() is not threading.main_thread():
      return self
    import jax  # pylint: disable=g-import-not-at-top  (start_up() runs before JAX is imported)
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
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
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
