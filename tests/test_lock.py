"""The run-dir lease (growlm.lock): acquire/release, refusal, stale take-over, heartbeat, races.

Leases of other launches are written by hand, so every case (dead pid, old heartbeat, other host,
corrupt file, abandoned take-over guard) is set up exactly; races use real threads and processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from conftest import REPO
from growlm import lease_posix
from growlm import lock as lock_lib
from growlm.errors import GrowlmError
from growlm.lock import RunLock, check_free


@pytest.fixture(scope="module")
def dead_pid():
  """A pid that surely runs no process: a child that has exited and been reaped."""
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _path(d) -> str:
  return lock_lib.lease_path(str(d))


def _write_lease(d, **fields) -> bytes:
  """Writes another launch's lease into run dir `d`; returns its bytes."""
  now = time.time()
  lease = {"host": lock_lib.HOST, "pid": os.getpid(), "token": "theirs", "started": now - 5,
           "heartbeat": now, "command": "train --other"}
  lease.update(fields)
  os.makedirs(d, exist_ok=True)
  raw = json.dumps(lease).encode()
  with open(_path(d), "wb") as f:
    f.write(raw)
  return raw


def _read(d) -> dict:
  with open(_path(d)) as f:
    return json.load(f)


def _raw(d) -> bytes:
  with open(_path(d), "rb") as f:
    return f.read()


def _one_line(e: pytest.ExceptionInfo) -> str:
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def _wait_for(cond, timeout=3.0) -> bool:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if cond():
      return True
    time.sleep(0.01)
  return cond()


def test_acquire_creates_the_dir_writes_the_lease_and_release_removes_it(tmp_path):
  d = tmp_path / "runs" / "a"  # does not exist yet: acquire makes it
  lock = RunLock(str(d)).acquire()
  try:
    lease = _read(d)
    assert lease["host"] == lock_lib.HOST and lease["pid"] == os.getpid()
    assert len(lease["token"]) == 32 and abs(lease["heartbeat"] - time.time()) < 5
    assert lease["started"] == lease["heartbeat"] and lease["command"] == " ".join(sys.argv)
    assert lock.held and not lock.lost and lock.took_over is None
    first_token = lease["token"]
  finally:
    lock.release()
  assert not os.path.exists(_path(d)) and not lock.held
  assert sorted(os.listdir(d)) == []  # no temp files or guards left behind
  lock.release()  # idempotent
  with RunLock(str(d)):
    assert _read(d)["token"] != first_token  # a fresh token per acquire


def test_context_manager_releases_even_on_error(tmp_path):
  with pytest.raises(KeyError):
    with RunLock(str(tmp_path)) as lock:
      assert os.path.exists(_path(tmp_path)) and lock.held
      raise KeyError("boom")
  assert not os.path.exists(_path(tmp_path))


def test_second_launch_is_refused_with_pid_and_host(tmp_path):
  with RunLock(str(tmp_path)):
    before = _raw(tmp_path)
    with pytest.raises(GrowlmError) as e:
      RunLock(str(tmp_path)).acquire()
    msg = _one_line(e)
    assert f"pid {os.getpid()} on host {lock_lib.HOST}" in msg and str(tmp_path) in msg
    assert "taken over" in msg
    with pytest.raises(GrowlmError) as e2:
      check_free(str(tmp_path))
    assert _one_line(e2).startswith(f"run dir {tmp_path} is in use by pid {os.getpid()}")
    assert _raw(tmp_path) == before  # the refused launch left the holder's lease alone
  check_free(str(tmp_path))
  with RunLock(str(tmp_path)):
    pass


def test_check_free_writes_nothing(tmp_path, dead_pid):
  missing = tmp_path / "not-yet"
  check_free(str(missing))
  assert not missing.exists()
  raw = _write_lease(tmp_path, pid=dead_pid)
  check_free(str(tmp_path))  # stale: acquire would take it over, so the early check passes
  assert _raw(tmp_path) == raw


def test_dead_pid_on_this_host_is_taken_over(tmp_path, dead_pid):
  _write_lease(tmp_path, pid=dead_pid, pid_space=lock_lib.PID_SPACE)
  with RunLock(str(tmp_path)) as lock:
    assert _read(tmp_path)["token"] != "theirs" and _read(tmp_path)["pid"] == os.getpid()
    assert f"pid {dead_pid}" in lock.took_over and "no longer runs" in lock.took_over


def test_dead_pid_in_another_pid_namespace_is_not_taken_over(tmp_path, dead_pid):
  # Same host name (containers with --net=host) but other pids: the pid says nothing here.
  raw = _write_lease(tmp_path, pid=dead_pid, pid_space="other-boot/pid:[1]")
  with pytest.raises(GrowlmError, match=f"in use by pid {dead_pid}"):
    RunLock(str(tmp_path)).acquire()
  assert _raw(tmp_path) == raw


def test_pid_of_another_user_counts_as_running(tmp_path, dead_pid, monkeypatch):
  def kill(pid, sig):
    raise PermissionError(1, "Operation not permitted")  # what os.kill says for another user's pid
  monkeypatch.setattr(os, "kill", kill)
  raw = _write_lease(tmp_path, pid=dead_pid)
  with pytest.raises(GrowlmError, match=f"in use by pid {dead_pid}"):
    RunLock(str(tmp_path)).acquire()
  assert _raw(tmp_path) == raw


def test_owner_renewing_during_the_take_over_keeps_its_lease(tmp_path, monkeypatch):
  # The lease was judged stale, then its (slow, not dead) owner renewed it before the take-over
  # got the guard: the take-over must notice the change and refuse rather than replace it.
  _write_lease(tmp_path, host="other-host", heartbeat=time.time() - 120)
  write_new = lease_posix.create

  def owner_renews_first(path, data):
    if path.endswith(".takeover"):
      _write_lease(tmp_path, host="other-host", heartbeat=time.time())
    return write_new(path, data)
  monkeypatch.setattr(lease_posix, "create", owner_renews_first)
  with pytest.raises(GrowlmError, match="in use by pid .* on host other-host"):
    RunLock(str(tmp_path)).acquire()
  assert _read(tmp_path)["host"] == "other-host"
  assert os.listdir(tmp_path) == [lock_lib.LEASE]  # the guard is gone


def test_old_heartbeat_is_taken_over_even_from_another_host(tmp_path):
  _write_lease(tmp_path, host="other-host", pid=1, heartbeat=time.time() - 120)
  with RunLock(str(tmp_path)) as lock:
    assert _read(tmp_path)["host"] == lock_lib.HOST
    assert "other-host" in lock.took_over and "heartbeat 120s old" in lock.took_over


def test_fresh_lease_of_another_host_is_refused(tmp_path, dead_pid):
  # A pid of another host cannot be checked here, even one that is dead on this host.
  raw = _write_lease(tmp_path, host="other-host", pid=dead_pid, heartbeat=time.time() - 30)
  with pytest.raises(GrowlmError) as e:
    RunLock(str(tmp_path)).acquire()
  msg = _one_line(e)
  assert f"pid {dead_pid} on host other-host" in msg and "(heartbeat 30s ago)" in msg
  with pytest.raises(GrowlmError):
    check_free(str(tmp_path))
  assert _raw(tmp_path) == raw


def test_heartbeat_renews_the_lease(tmp_path):
  with RunLock(str(tmp_path), heartbeat_s=0.05) as lock:
    first = _read(tmp_path)
    assert _wait_for(lambda: _read(tmp_path)["heartbeat"] > first["heartbeat"] + 0.1)
    now = _read(tmp_path)
    assert (now["token"], now["started"]) == (first["token"], first["started"])
    assert not lock.lost
    lock.ensure_held()
    assert [n for n in os.listdir(tmp_path) if n != lock_lib.LEASE] == []


def test_lease_taken_over_behind_our_back_is_lost_and_kept(tmp_path):
  lock = RunLock(str(tmp_path), heartbeat_s=0.05).acquire()
  _write_lease(tmp_path, token="new-owner", pid=1)  # what another launch's take-over leaves
  assert _wait_for(lambda: lock.lost)
  with pytest.raises(GrowlmError) as e:
    lock.ensure_held()
  assert "taken over" in _one_line(e)
  time.sleep(0.2)
  assert _read(tmp_path)["token"] == "new-owner"  # the heartbeat stopped: nothing overwritten
  lock.release()
  assert _read(tmp_path)["token"] == "new-owner"  # release removes only our own lease
  assert lock.lost


def test_release_before_the_next_beat_leaves_a_new_owners_lease(tmp_path):
  lock = RunLock(str(tmp_path), heartbeat_s=10.0).acquire()
  _write_lease(tmp_path, token="new-owner", pid=1)
  assert not lock.lost  # no beat has looked yet
  lock.release()
  assert _read(tmp_path)["token"] == "new-owner"


def test_lease_removed_behind_our_back_is_lost_and_not_recreated(tmp_path):
  lock = RunLock(str(tmp_path), heartbeat_s=0.05).acquire()
  os.unlink(_path(tmp_path))
  assert _wait_for(lambda: lock.lost)
  time.sleep(0.2)
  assert not os.path.exists(_path(tmp_path))
  lock.release()


def test_lease_not_renewed_in_time_counts_as_lost(tmp_path):
  # A process paused past stale_after_s may have been taken over: it must neither keep writing
  # nor remove what may now be another run's lease.
  lock = RunLock(str(tmp_path), heartbeat_s=5.0, stale_after_s=10.0).acquire()
  lock._renewed -= 11  # pylint: disable=protected-access
  assert lock.lost
  lock.release()
  assert os.path.exists(_path(tmp_path))


def test_threads_racing_to_take_over_one_stale_lease(tmp_path, dead_pid):
  for round_ in range(5):
    d = tmp_path / str(round_)
    _write_lease(d, pid=dead_pid)
    n = 12
    barrier = threading.Barrier(n)
    won, refused, other = [], [], []

    def launch():
      lock = RunLock(str(d))  # pylint: disable=cell-var-from-loop
      barrier.wait()  # pylint: disable=cell-var-from-loop
      try:
        won.append(lock.acquire())  # pylint: disable=cell-var-from-loop
      except GrowlmError as e:
        refused.append(str(e))  # pylint: disable=cell-var-from-loop
      except Exception as e:  # pylint: disable=broad-except
        other.append(repr(e))  # pylint: disable=cell-var-from-loop

    threads = [threading.Thread(target=launch) for _ in range(n)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
    assert other == [] and len(won) == 1 and len(refused) == n - 1, (won, refused, other)
    assert all("\n" not in m and "in use by pid" in m for m in refused), refused
    assert _read(d)["token"] == won[0]._lease["token"]  # pylint: disable=protected-access
    won[0].release()
    assert os.listdir(d) == []


_RACER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from growlm.errors import GrowlmError
from growlm.lock import RunLock
lock = RunLock(sys.argv[2])
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))
try:
  lock.acquire()
  print("won", flush=True)
except GrowlmError as e:
  print("refused", e, flush=True)
sys.stdin.readline()  # hold the lease until every racer has answered
lock.release()
"""


def test_processes_racing_to_take_over_one_stale_lease(tmp_path, dead_pid):
  _write_lease(tmp_path, pid=dead_pid, heartbeat=time.time() - 120)
  start = time.time() + 2.0
  procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(REPO), str(tmp_path), str(start)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
           for _ in range(6)]
  try:
    answers = [p.stdout.readline().strip() for p in procs]
  finally:
    for p in procs:
      p.stdin.close()
      p.wait(timeout=20)
  assert sum(a == "won" for a in answers) == 1, answers
  assert all(a.startswith("refused run dir") for a in answers if a != "won"), answers
  assert os.listdir(tmp_path) == []  # the winner released; nothing left behind


@pytest.mark.parametrize("content", [b"", b'{"host": "h", "pid": 12', b"[1, 2]"])
def test_unreadable_lease_is_refused_while_fresh_and_taken_over_when_old(tmp_path, content):
  os.makedirs(tmp_path, exist_ok=True)
  with open(_path(tmp_path), "wb") as f:
    f.write(content)
  with pytest.raises(GrowlmError) as e:
    RunLock(str(tmp_path)).acquire()
  assert "being written or is corrupt" in _one_line(e) and _path(tmp_path) in str(e.value)
  with pytest.raises(GrowlmError):
    check_free(str(tmp_path))
  assert _raw(tmp_path) == content
  old = time.time() - 120
  os.utime(_path(tmp_path), (old, old))
  with RunLock(str(tmp_path)) as lock:
    assert _read(tmp_path)["pid"] == os.getpid()
    assert "unreadable lock file 120s old" in lock.took_over


def test_take_over_in_progress_is_waited_for_and_an_abandoned_one_cleared(tmp_path, dead_pid,
                                                                          monkeypatch):
  monkeypatch.setattr(lease_posix, "GUARD_WAIT_S", 0.2)
  guard = _path(tmp_path) + ".takeover"
  raw = _write_lease(tmp_path, pid=dead_pid)
  with open(guard, "w") as f:
    f.write("another launch")
  with pytest.raises(GrowlmError) as e:
    RunLock(str(tmp_path)).acquire()
  assert "taking over its stale lease" in _one_line(e) and guard in str(e.value)
  assert _raw(tmp_path) == raw and os.path.exists(guard)
  old = time.time() - 120  # a launch that crashed inside its take-over
  os.utime(guard, (old, old))
  with RunLock(str(tmp_path)):
    assert _read(tmp_path)["pid"] == os.getpid()
  assert os.listdir(tmp_path) == []


def test_workdir_that_is_a_file_is_refused_in_one_line(tmp_path):
  f = tmp_path / "run"
  f.write_text("not a dir")
  with pytest.raises(GrowlmError) as e:
    RunLock(str(f)).acquire()
  msg = _one_line(e)
  assert msg.startswith(f"run dir {f}: cannot create the directory") and "FileExistsError" in msg
  with pytest.raises(GrowlmError) as e2:
    check_free(str(f))
  assert "NotADirectoryError" in _one_line(e2) and str(f) in str(e2.value)
  assert f.read_text() == "not a dir"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through directory permissions")
def test_read_only_workdir_is_refused_in_one_line(tmp_path):
  os.chmod(tmp_path, 0o555)
  try:
    with pytest.raises(GrowlmError) as e:
      RunLock(str(tmp_path)).acquire()
    assert "PermissionError" in _one_line(e) and _path(tmp_path) in str(e.value)
  finally:
    os.chmod(tmp_path, 0o755)


@pytest.mark.parametrize("heartbeat_s,stale_after_s", [(0, 60), (-1, 60), (10, 15)])
def test_bad_timings_are_refused(heartbeat_s, stale_after_s):
  with pytest.raises(GrowlmError, match="accepted: heartbeat_s > 0 and stale_after_s >= 2"):
    RunLock("unused", heartbeat_s=heartbeat_s, stale_after_s=stale_after_s)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs Linux procfs")
def test_unwritable_workdir_is_refused_in_one_line_even_as_root():
  # procfs takes no new files, whoever asks: the lease cannot be created there.
  with pytest.raises(GrowlmError) as e:
    RunLock("/proc/self").acquire()
  assert _one_line(e).startswith("run dir /proc/self: cannot write lock file /proc/self/.growlm")
