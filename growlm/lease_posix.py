"""The run-dir lease on a POSIX filesystem (local disk, NFS, GCS FUSE): exclusive create, atomic
rename, and a guard file that serialises take-overs. growlm.lock decides when (staleness,
heartbeat, messages); this module only touches local files.

Take-over must leave no moment in which two launches both believe they hold the dir. Renaming
the stale lease aside, re-reading it and putting back what was not the stale one leaves such a
moment with three launches: while A holds aside a lease it moved by mistake (racer B's fresh
one) the name is free, C creates it with O_EXCL, and B and C both hold. So take-overs are
serialised by a guard file, created with O_EXCL and held for milliseconds:
  1. create RUN/.growlm-lock.json.takeover (O_EXCL): one launch gets it; the others wait for it
     to go, then look again and find the winner's live lease;
  2. holding it, re-read the lease: it must be byte-for-byte the one judged stale (same random
     token, same heartbeat) and still stale, else it was renewed by a live owner or replaced:
     let go and look again;
  3. os.replace ours over it (atomic, so the name is never free for an O_EXCL creator to slip
     in), then remove the guard.
The old owner's heartbeat and release touch only its own token, and never once it went
unrenewed for stale_after_s. A guard left by a crash in those milliseconds is cleared once older
than stale_after_s: renamed to a unique name (atomic: one racer gets it), put back if what was
renamed is fresh (another launch's guard made meanwhile).
"""

from __future__ import annotations

import os
import time
from typing import Callable

from growlm import fs
from growlm.errors import GrowlmError

GUARD = ".takeover"  # suffix of the lease name: the take-over guard, held for milliseconds
GUARD_WAIT_S = 2.0  # how long a launch waits for another launch's take-over to finish


def read(path: str) -> tuple[bytes, float] | None:
  """(bytes, mtime) of the lease file, None if there is none; OSError if unreadable."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
      # fstat of the open file, not stat of the name: on NFS open() revalidates the attributes,
      # a bare stat may answer from a cache up to a minute old.
      return raw, os.fstat(f.fileno()).st_mtime
  except FileNotFoundError:
    return None


def create(path: str, data: bytes) -> bool:
  """Creates `path` holding `data` if it does not exist (O_EXCL); False if it exists."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  ours = os.fstat(fd)
  try:
    try:
      if os.write(fd, data) != len(data):  # a lease is a few hundred bytes: one write or none
        raise OSError(f"short write to {path}")
      os.fsync(fd)
    finally:
      os.close(fd)  # on GCS FUSE the upload (and its precondition) happens here: errors count
  except OSError:
    try:  # leave no empty lease behind to block the dir, but remove only the file we created
      st = os.stat(path)
      if (st.st_dev, st.st_ino) == (ours.st_dev, ours.st_ino):
        os.unlink(path)
    except OSError:
      pass
    raise
  return True


def replace(path: str, data: bytes, tmp: str) -> None:
  """Writes `path` through `tmp` and os.replace: readers see the old or the new bytes."""
  fs.write_local_atomic(path, data, tmp)


def take_over(path: str, data: bytes, token: str, workdir: str, stale_after_s: float, *,
              still_stale: Callable[[], bool]) -> bool:
  """Replaces the stale lease at `path` by `data` under the guard if `still_stale()` holds once
  the guard is ours; False: look again."""
  guard = path + GUARD
  if not create(guard, token.encode()):
    _wait_for_guard(guard, token, workdir, stale_after_s)
    return False
  try:
    if not still_stale():
      return False
    replace(path, data, f"{path}.{token}.tmp")
  finally:
    try:
      os.unlink(guard)
    except FileNotFoundError:
      pass  # cleared as abandoned: only possible if we stalled for stale_after_s in between
  return True


def _wait_for_guard(guard: str, token: str, workdir: str, stale_after_s: float) -> None:
  """Waits for another launch's take-over to finish; clears a guard abandoned by a crash."""
  deadline = time.time() + GUARD_WAIT_S
  while True:
    try:
      age = time.time() - os.stat(guard).st_mtime
    except FileNotFoundError:
      return
    if age > stale_after_s:
      aside = f"{guard}.{token}.abandoned"
      try:
        os.rename(guard, aside)
      except FileNotFoundError:
        return  # another launch cleared it first
      if time.time() - os.stat(aside).st_mtime > stale_after_s:
        os.unlink(aside)
      else:
        os.rename(aside, guard)  # a fresh guard, made after we looked: give it back
      return
    if time.time() > deadline:
      raise GrowlmError(
          f"run dir {workdir}: another launch has been taking over its stale lease for "
          f"{age:.0f}s ({guard}); retry, or delete {guard} if no launch is running (one older "
          f"than {stale_after_s:g} s is cleared)")
    time.sleep(0.02)
