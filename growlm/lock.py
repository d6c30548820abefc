"""One writer per run dir: the lease file RUN/.growlm-lock.json, its heartbeat and its take-over.

Two launches on one run dir corrupt it (metrics.jsonl rewritten under a live writer, orbax saves
that time out), so a run holds a lease while it writes:

  RUN/.growlm-lock.json   {"host", "pid", "pid_space", "token", "started", "heartbeat", "command"}

Not flock: it is unreliable on the shared filesystems run dirs live on (NFS, GCS FUSE); a lease
needs only exclusive create, atomic rename and wall-clock time (growlm.lease_posix). On gs://
the same lease is kept with compare-and-swap on object generations instead (growlm.lease_gcs).
A lease whose heartbeat is older than `stale_after_s`, or whose pid no longer runs on this host,
is stale and is taken over. This module owns the lease: its name and format, `check_free` (the
read-only early check) and `RunLock` (acquire, heartbeat, release). No JAX: it sits with the
foundations.
Assumed, as by any lease: hosts' clocks agree to well within `stale_after_s`, and a live owner
renews within it (one paused for longer has lost its lease: `RunLock.lost`).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import socket
import sys
import threading
import time
from typing import Any

from growlm import fs, lease_posix
from growlm.errors import GrowlmError

LEASE = ".growlm-lock.json"
_ATTEMPTS = 5  # rounds of create / inspect / take over before giving up on a changing lease


def lease_path(workdir: str) -> str:
  """The lease file of the run dir `workdir`."""
  return fs.join(workdir, LEASE)


def _pid_space() -> str:
  """This boot of this machine and this pid namespace: pids are comparable only within it.

  The hostname alone is not enough: containers run with --net=host share the host's name but
  not its pids, so a pid that is "not running" there may be a live trainer next door."""
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      boot = f.read().strip()
    return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
  except OSError:
    return ""


HOST = socket.gethostname()
PID_SPACE = _pid_space()


@dataclasses.dataclass(frozen=True)
class _Seen:
  """One read of a lease file: its bytes, the lease (None when unreadable) and its mtime."""
  raw: bytes
  lease: dict[str, Any] | None
  why: str  # why it is unreadable ("" when it is a lease)
  mtime: float
  generation: int = 0  # the object's generation on gs:// (0 locally)


def _is_lease(obj: Any) -> bool:
  # type() rather than isinstance: JSON true is no pid; pid 0 or -1 would make os.kill signal groups
  return (isinstance(obj, dict) and isinstance(obj.get("host"), str) and bool(obj.get("token"))
          and isinstance(obj["token"], str) and type(obj.get("pid")) is int and obj["pid"] > 0
          and all(type(obj.get(k)) in (int, float) for k in ("started", "heartbeat")))


def _read(path: str) -> _Seen | None:
  """The lease file at `path`, None if there is none; OSError if it cannot be read."""
  generation = 0
  if fs.is_url(path):
    from growlm import lease_gcs  # pylint: disable=g-import-not-at-top  (google-cloud-storage)
    got = lease_gcs.read(path)
    if got is None:
      return None
    raw, mtime, generation = got
  else:
    raw, mtime = lease_posix.read(path) or (None, 0.0)
    if raw is None:
      return None
  try:
    obj = json.loads(raw)
  except ValueError as e:
    why = "empty" if not raw else f"not JSON: {str(e).splitlines()[0]}"
    return _Seen(raw, None, why, mtime, generation)
  if not _is_lease(obj):
    return _Seen(raw, None, "not a lease object", mtime, generation)
  return _Seen(raw, obj, "", mtime, generation)


def _pid_alive(pid: int) -> bool:
  """Whether `pid` runs on this host (True when that cannot be told)."""
  if os.name != "posix":
    return True  # on Windows os.kill(pid, 0) would send CTRL_C: rely on the heartbeat there
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except OSError:  # PermissionError: it exists, under another user
    pass
  return True


def _stale_reason(seen: _Seen, stale_after_s: float) -> str | None:
  """Why the lease `seen` may be taken over, None while it is live."""
  now = time.time()
  if seen.lease is None:
    # A crash while the lease was written leaves it empty or truncated; a launch that is writing
    # it right now shows the same bytes, so only age tells the two apart.
    age = now - seen.mtime
    return f"unreadable lock file {age:.0f}s old" if age > stale_after_s else None
  lease = seen.lease
  age = now - lease["heartbeat"]
  if age > stale_after_s:
    return f"heartbeat {age:.0f}s old"
  # A lease without pid_space (hand-written, older) is compared by host name only.
  if (lease["host"] == HOST and lease.get("pid_space", PID_SPACE) == PID_SPACE
      and not _pid_alive(lease["pid"])):
    return f"pid {lease['pid']} no longer runs on host {HOST}"
  return None


def _refusal(workdir: str, seen: _Seen, stale_after_s: float) -> GrowlmError:
  """The one-line error for a live lease (or a fresh unreadable one)."""
  if seen.lease is None:
    return GrowlmError(
        f"run dir {workdir}: lock file {lease_path(workdir)} is unreadable ({seen.why}) and "
        f"{time.time() - seen.mtime:.0f}s old, so it is being written or is corrupt; retry in a "
        f"moment, or delete it if no run uses this dir (one older than {stale_after_s:g} s is "
        f"taken over)")
  lease = seen.lease
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease["started"]))
  return GrowlmError(
      f"run dir {workdir} is in use by pid {lease['pid']} on host {lease['host']} since {since} "
      f"(heartbeat {time.time() - lease['heartbeat']:.0f}s ago); wait for it to finish, or stop "
      f"it; a lease not renewed for {stale_after_s:g} s is taken over")


def _os_failure(workdir: str, action: str, e: OSError) -> GrowlmError:
  what = f"{action} {e.filename}" if e.filename else action
  return GrowlmError(f"run dir {workdir}: cannot {what} ({type(e).__name__}: {e.strerror or e}); "
                     f"accepted: a writable directory, or a path where one can be created")


def check_free(workdir: str, *, stale_after_s: float = 60.0) -> None:
  """Raises GrowlmError (one line) if a live lease holds `workdir`; writes nothing.

  The early check, before a launch does any work: a missing dir, no lease or a stale lease
  (which `RunLock.acquire` would take over) all pass."""
  try:
    seen = _read(lease_path(workdir))
  except OSError as e:
    raise _os_failure(workdir, "read lock file", e) from e
  except Exception as e:  # pylint: disable=broad-except  (object-store errors)
    raise fs.store_error(lease_path(workdir), "read the run's lease", e) from e
  if seen is not None and _stale_reason(seen, stale_after_s) is None:
    raise _refusal(workdir, seen, stale_after_s)


def holder(workdir: str, *, stale_after_s: float = 60.0) -> dict[str, Any] | None:
  """The live lease on `workdir` ({"host", "pid", "heartbeat", ...}), None when no launch holds
  it; for a sweep's status, which reads a local run's state from its dir alone."""
  try:
    seen = _read(lease_path(workdir))
  except Exception:  # pylint: disable=broad-except  (unreadable: the run says nothing here)
    return None
  if seen is None or seen.lease is None or _stale_reason(seen, stale_after_s) is not None:
    return None
  return seen.lease


def clear_leftover(partial: str, out: str) -> None:
  """Removes what an interrupted command left at `partial`, the OUT.partial it builds `out` in.

  Such a leftover holds the command's stale lease (or nothing). Refuses in one line, removing
  nothing, when a live launch holds the lease (the same command running twice) or when
  `partial` holds files and no lease: that is not a leftover, so it may be someone's own work."""
  check_leftover(partial, out)
  fs.rmtree(partial)   # a no-op when there is nothing


def check_leftover(partial: str, out: str) -> None:
  """clear_leftover's refusals, removing nothing: the early check, before any work."""
  if not fs.exists(partial):
    return
  if fs.isdir(partial):
    check_free(partial)   # a live launch's work in progress
    if not fs.listdir(partial) or _read(lease_path(partial)) is not None:
      return   # empty, or a stale lease: what an interrupted launch leaves
  raise GrowlmError(f"{partial} exists and is not what an interrupted growlm command leaves "
                    f"(that holds a lease file, {LEASE}); it is left as it is; accepted: move it "
                    f"away, or choose another output than {out}")


def remove_unless_live(partial: str) -> None:
  """Removes `partial` after a failed command, unless a live launch holds its lease: a second
  launch of the same command, refused, must not delete the output the first is writing."""
  try:
    check_free(partial)
  except GrowlmError:
    return
  fs.rmtree(partial)


def _encode(lease: dict[str, Any]) -> bytes:
  return json.dumps(lease, indent=2, sort_keys=True).encode()


class RunLock:
  """The lease on one run dir: `acquire()` / `release()`, or `with RunLock(workdir) as lock:`.

  While held, a daemon thread renews the heartbeat every `heartbeat_s`; a lease not renewed for
  `stale_after_s` may be taken over by another launch. `lost` turns True when this lease was
  taken over or removed (or not renewed in time): the holder must then stop writing the run dir.
  Nothing global is registered (no atexit, no signal handler): the caller decides.
  """

  def __init__(self, workdir: str, *, heartbeat_s: float = 10.0, stale_after_s: float = 60.0):
    if not (heartbeat_s > 0 and stale_after_s >= 2 * heartbeat_s):  # one late beat is no take-over
      raise GrowlmError(f"run lock: heartbeat_s={heartbeat_s!r}, stale_after_s={stale_after_s!r}; "
                        f"accepted: heartbeat_s > 0 and stale_after_s >= 2 * heartbeat_s")
    self.workdir = workdir
    self.path = lease_path(workdir)
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self.took_over: str | None = None  # the stale lease this acquire replaced, for the log
    self._lease: dict[str, Any] | None = None  # ours, while held
    self._renewed = 0.0  # wall time of the last heartbeat written
    self._lost = False
    self._generation = 0  # of our lease object on gs://
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  @property
  def held(self) -> bool:
    """Whether acquire() succeeded and release() has not run yet (even if the lease was lost)."""
    return self._lease is not None

  @property
  def lost(self) -> bool:
    """Whether this held lease was taken over, removed, or went unrenewed for stale_after_s."""
    # The expiry test is here too, so `lost` is right even if the heartbeat thread is starved.
    return self._lost or (self.held and time.time() - self._renewed > self.stale_after_s)

  def ensure_held(self) -> None:
    """Raises GrowlmError (one line) if the lease was lost; call before writing the run dir."""
    if not self.held and not self._lost:
      raise RuntimeError(f"RunLock on {self.workdir} is not held; acquire() it first")
    if self.lost:
      raise GrowlmError(f"run dir {self.workdir}: this run's lease {self.path} was taken over or "
                        f"not renewed for {self.stale_after_s:g} s; stopping so that only one run "
                        f"writes the dir")

  def __enter__(self) -> RunLock:
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()

  def acquire(self) -> RunLock:
    """Takes the lease (creating the run dir if needed) and starts the heartbeat; returns self.

    GrowlmError (one line) if a live run holds the dir, or if the lease cannot be written."""
    if self.held:
      raise RuntimeError(f"RunLock on {self.workdir} is already held; release() it first")
    lease = {"host": HOST, "pid": os.getpid(), "pid_space": PID_SPACE,
             "token": secrets.token_hex(16), "command": " ".join(sys.argv)}
    self.took_over, self._lost = None, False
    try:
      fs.makedirs(self.workdir)
    except OSError as e:
      raise _os_failure(self.workdir, "create the directory", e) from e
    try:
      for _ in range(_ATTEMPTS):
        lease["started"] = lease["heartbeat"] = time.time()
        if self._create(_encode(lease)):
          break
        seen = _read(self.path)
        if seen is None:
          continue  # released between our create and our read: create again
        reason = _stale_reason(seen, self.stale_after_s)
        if reason is None:
          raise _refusal(self.workdir, seen, self.stale_after_s)
        if self._take_over(seen, reason, lease):
          break
      else:
        raise GrowlmError(f"run dir {self.workdir}: its lease {self.path} changed under each of "
                          f"{_ATTEMPTS} tries to acquire it; retry the launch")
    except OSError as e:
      raise _os_failure(self.workdir, "write lock file", e) from e
    except (GrowlmError, RuntimeError):
      raise
    except Exception as e:  # pylint: disable=broad-except  (object-store errors)
      raise fs.store_error(self.path, "write the run's lease", e) from e
    self._lease, self._renewed = lease, lease["heartbeat"]
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name=f"growlm-lock {self.workdir}",
                                    daemon=True)
    self._thread.start()
    return self

  def _create(self, data: bytes) -> bool:
    """Creates the lease if there is none; False if there is one."""
    if not fs.is_url(self.path):
      return lease_posix.create(self.path, data)
    from growlm import lease_gcs  # pylint: disable=g-import-not-at-top
    self._generation = lease_gcs.write(self.path, data, 0) or 0
    return self._generation != 0

  def _take_over(self, seen: _Seen, reason: str, lease: dict[str, Any]) -> bool:
    """Replaces the stale lease `seen` by `lease`; False: look again."""
    if fs.is_url(self.path):  # compare-and-swap on the generation judged stale: one launch wins
      from growlm import lease_gcs  # pylint: disable=g-import-not-at-top
      self._generation = lease_gcs.write(self.path, _encode(lease), seen.generation) or 0
      if not self._generation:
        return False
    elif not lease_posix.take_over(self.path, _encode(lease), lease["token"], self.workdir,
                                   self.stale_after_s, still_stale=lambda: self._same(seen)):
      return False
    old = seen.lease
    self.took_over = (f"pid {old['pid']} on host {old['host']} ({reason})" if old else reason)
    return True

  def _same(self, seen: _Seen) -> bool:
    """Whether the lease file is still byte-for-byte `seen`, and still stale."""
    now = _read(self.path)
    return (now is not None and now.raw == seen.raw
            and _stale_reason(now, self.stale_after_s) is not None)

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        if not self._renew():
          self._lost = True
          return
      except Exception:  # pylint: disable=broad-except
        self._lost = True  # a heartbeat that cannot run is a lease that will expire: say so now
        return

  def _renew(self) -> bool:
    """Writes a new heartbeat if the lease is still ours; False once it is not (or expired)."""
    lease, now = self._lease, time.time()
    if now - self._renewed > self.stale_after_s:
      return False  # others may already have taken it over: renewing could overwrite theirs
    renewed = dict(lease, heartbeat=now)
    if fs.is_url(self.path):  # compare-and-swap on our own generation: fails once it was taken
      from growlm import lease_gcs  # pylint: disable=g-import-not-at-top
      try:
        generation = lease_gcs.write(self.path, _encode(renewed), self._generation)
      except Exception:  # pylint: disable=broad-except  (transient: expiry still applies)
        return True
      if generation is None:
        return False
      self._generation, self._lease, self._renewed = generation, renewed, now
      return True
    try:
      seen = _read(self.path)
    except OSError:
      return True  # transient (NFS hiccup): try again at the next beat, expiry still applies
    if seen is None or seen.lease is None or seen.lease["token"] != lease["token"]:
      return False
    try:
      lease_posix.replace(self.path, _encode(renewed), f"{self.path}.{lease['token']}.tmp")
    except OSError:
      return True
    self._lease, self._renewed = renewed, now
    return True

  def release(self) -> None:
    """Stops the heartbeat and removes the lease if it is still ours. Idempotent."""
    lease = self._lease
    if lease is None:
      return
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join()
    self._thread = None
    try:
      if fs.is_url(self.path):
        if not self.lost:
          from growlm import lease_gcs  # pylint: disable=g-import-not-at-top
          lease_gcs.delete(self.path, self._generation)
      else:
        seen = None if self.lost else _read(self.path)
        if seen is not None and seen.lease is not None and seen.lease["token"] == lease["token"]:
          os.unlink(self.path)
    except Exception:  # pylint: disable=broad-except
      pass  # a lease left behind goes stale and is taken over; release must not fail a run
    self._lease = None
