"""The processes of a multi-process run (jax.distributed) end together, each with one line.

JAX ends a process whose peers are missing with a native abort (exit 134 and a C++ stack dump):
after its initialization timeout while a peer has not joined, and after heartbeat_timeout
(100 s) once a peer has stopped; JAX's shutdown barrier at exit waits for every peer the same
way. A process that fails on its own (a flag, a file or a disk on one host only) would leave the
others waiting for it until then. So, here:

* `initialize` arms a join timer: a process whose peers have not all joined (connected and met
  in the run's first collective, `joined()`) within --join_timeout ends with one line naming the
  coordinator and the process count (JAX's own timeout is set later, as a backstop);
* a process that fails calls `leave(line, code)`: it posts its line in the coordination
  service's key-value store, waits (bounded) until every other process has seen it, and exits
  without JAX's shutdown barrier; a thread on every process polls the store and ends its process
  with one line naming the one that failed;
* a peer that is gone makes the next collective on the CPU raise (`lost`): the trainer then
  abandons the checkpoint in flight (it cannot be committed without the peer) and leaves.

Process 0 hosts the coordination service, and a process whose service goes away aborts at once
(JAX's default error callback: jax 0.10.2 offers no Python one, a Python callable fails to cast
its absl::Status argument). So process 0 leaves last: it waits for the others' acknowledgements
and then LINGER_S more.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, NoReturn

from growlm import errors

log = logging.getLogger(__name__)

DEFAULT_JOIN_TIMEOUT_S = 600   # hosts of a TPU pod or cluster may start minutes apart
POLL_S = 0.5       # how often each process reads the store for a peer's exit
GRACE_S = 3.0      # a peer's exit seen: time for this process to fail on its own (the same error)
ACK_WAIT_S = 6.0   # a leaving process waits this long for the others to see its line (and exit)
LINGER_S = 1.0     # process 0 (the service) outlives the others' exits by this much
_EXITS, _ACKS = "growlm/exit", "growlm/exit_ack"
HINT = ("check that every process was started with the same --coordinator_address and "
        "--num_processes, and the log of each one that did not join")


class _State:
  def __init__(self):
    self.timer: threading.Timer | None = None
    self.watcher: threading.Thread | None = None
    self.stop = threading.Event()
    self.leaving = threading.Event()   # this process is on its way out (main thread or watcher)
    self.where = ""                    # "coordinator HOST:PORT, N processes", once connected


_STATE = _State()
_LOCK = threading.Lock()


def _client() -> Any:
  """JAX's coordination client when this is a connected multi-process run, else None."""
  if _STATE.watcher is None:
    return None
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  return distributed.global_state.client


def _index() -> tuple[int, int]:
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  g = distributed.global_state
  return g.process_id, g.num_processes


def initialize(join_timeout_s: float, **kwargs: Any) -> None:
  """jax.distributed.initialize(**kwargs) (no kwargs: detected, as on Cloud TPU VMs), bounded by
  `join_timeout_s` until `joined()`; then watches for the other processes' exits."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import distributed  # pylint: disable=g-import-not-at-top

  def timeout():   # JAX has set the coordinator and process count (flags or detection) by now
    g = distributed.global_state
    where = f"coordinator {g.coordinator_address or 'not found'}, {g.num_processes} processes"
    _leave(f"growlm: error: process {g.process_id} of {g.num_processes}: not every process "
           f"joined the run within --join_timeout={join_timeout_s:g} s ({where}); {HINT}; "
           "accepted: --join_timeout=SECONDS longer where hosts start minutes apart",
           errors.EXIT_PEER_LOST)

  _STATE.timer = threading.Timer(join_timeout_s, timeout)
  _STATE.timer.daemon = True
  _STATE.timer.start()
  # JAX's own timeout (a native abort) only as a backstop behind the timer.
  jax.distributed.initialize(**kwargs, initialization_timeout=int(join_timeout_s) + 60)
  g = distributed.global_state
  _STATE.where = f"coordinator {g.coordinator_address}, {g.num_processes} processes"
  if g.num_processes == 1:
    joined()
  else:
    _STATE.watcher = threading.Thread(target=_watch, name="growlm-peers", daemon=True)
    _STATE.watcher.start()
    import atexit  # pylint: disable=g-import-not-at-top
    atexit.register(_stop_watching)   # before JAX's shutdown (atexit runs last-in first-out)


def joined() -> None:
  """Every process has met in a collective: the join timer is no longer needed."""
  if _STATE.timer is not None:
    _STATE.timer.cancel()
    _STATE.timer = None


def lost(error: BaseException) -> bool:
  """Whether `error` is a failed collective of a multi-process run (a peer gone or out of step):
  this process cannot go on, nor finish a checkpoint, without it."""
  if _client() is None:
    return False
  import jax  # pylint: disable=g-import-not-at-top
  return isinstance(error, jax.errors.JaxRuntimeError)


def lost_line(error: BaseException) -> str:
  """The one line for a `lost` error."""
  i, n = _index()
  return (f"growlm: error: process {i} of {n}: a collective failed ({errors.first_line(error)})"
          f": another process of this run has stopped or is out of step ({_STATE.where}; see "
          "the other processes' logs); relaunch every process to resume from the last "
          "complete checkpoint")


def leave(line: str, code: int) -> NoReturn:
  """Prints `line` on stderr and exits with `code`. In a multi-process run, first tells the
  other processes, and exits without JAX's shutdown barrier (it would wait for them)."""
  if _client() is None:
    print(line, file=sys.stderr, flush=True)
    sys.exit(code)
  _leave(line, code)


def leave_now(line: str, code: int) -> NoReturn:
  """As `leave`, without unwinding the stack: for a signal handler, which may have interrupted
  code that would catch or swallow a SystemExit (an import, a finaliser)."""
  _leave(line, code)


def _claim() -> bool:
  """True for the first caller only: the one thread that prints this process's line and exits."""
  with _LOCK:
    if _STATE.leaving.is_set():
      return False
    _STATE.leaving.set()
    return True


def _leave(line: str, code: int) -> NoReturn:
  if not _claim():   # the watcher (or the join timer) is already ending this process
    threading.Event().wait()
  print(line, file=sys.stderr, flush=True)
  client = _client()
  if client is not None:
    i, n = _index()
    try:
      client.key_value_set(f"{_EXITS}/{i}", line, allow_overwrite=True)
      deadline = time.monotonic() + ACK_WAIT_S
      for j in range(n):
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if j != i and left_ms:
          client.blocking_key_value_get(f"{_ACKS}/{j}/{i}", left_ms)
    except Exception as e:  # pylint: disable=broad-except  (a peer or the service is gone)
      log.info("not every process confirmed this one's exit: %s", errors.first_line(e))
  _exit(code)


def _exit(code: int) -> NoReturn:
  """Exits now, without the atexit handlers (JAX's shutdown barrier) and its threads."""
  logging.shutdown()
  sys.stdout.flush()
  sys.stderr.flush()
  if _client() is not None and _index()[0] == 0:
    time.sleep(LINGER_S)   # the service outlives the others' exits (see the module docstring)
  os._exit(code)  # pylint: disable=protected-access


def _watch() -> None:
  """Polls the store for another process's exit line; acknowledges it and, unless this process
  is failing too (the same error, reached a moment later), ends this one with one line."""
  client = _client()
  i, n = _index()
  acked: set[int] = set()
  while not _STATE.stop.wait(POLL_S):
    try:
      posted = [(int(k.rsplit("/", 1)[1]), v) for k, v in client.key_value_dir_get(f"{_EXITS}/")]
    except Exception:  # pylint: disable=broad-except  (shutting down, or the service is gone)
      return
    posted = sorted(p for p in posted if p[0] != i and p[0] not in acked)
    if not posted:
      continue
    if not _STATE.leaving.wait(GRACE_S) and _claim():
      j, line = posted[0]
      print(f"growlm: error: process {i} of {n}: process {j} stopped with "
            f"'{line.removeprefix('growlm: error: ')}'; this process stops too (nothing of it "
            "is lost that a relaunch of every process cannot resume)", file=sys.stderr,
            flush=True)
      _acknowledge(client, i, posted)
      _exit(errors.EXIT_PEER_LOST)
    _acknowledge(client, i, posted)   # this process is leaving too: let that one go
    acked.update(j for j, _ in posted)


def _acknowledge(client: Any, i: int, posted: list[tuple[int, str]]) -> None:
  for j, _ in posted:
    try:
      client.key_value_set(f"{_ACKS}/{i}/{j}", "1", allow_overwrite=True)
    except Exception:  # pylint: disable=broad-except  (the one leaving may be gone already)
      pass


def _stop_watching() -> None:
  _STATE.stop.set()
  if _STATE.watcher is not None:
    _STATE.watcher.join(2 * POLL_S)
