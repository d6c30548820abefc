"""What a checkpoint step holds on disk: its files and their hashes, and what a restore error
means (damaged bytes, or storage at fault). Local paths or gs:// URLs (growlm.fs)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import re

from growlm import fs

CHECKSUMS = "growlm_checksums.json"
_NOT_LISTED = (CHECKSUMS, CHECKSUMS + ".tmp")  # the manifest cannot list itself

# Restore errors that mean the bytes on disk are wrong or missing (each seen by damaging a saved
# step; see tests/test_checkpoint.py). Tensorstore reports absl status codes inside ValueError
# messages, which orbax wraps in a bare Exception, so the whole cause chain is read.
_DAMAGE_TEXT = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND):|Data corruption detected|"
                          r"\bFAILED_PRECONDITION:.*(decompress|compressed stream|Error decoding)",
                          re.S)
# ...and errors that say the storage, not the checkpoint, is at fault: never set a step aside.
_IO_CODES = re.compile(r"\b(PERMISSION_DENIED|UNAVAILABLE|RESOURCE_EXHAUSTED|DEADLINE_EXCEEDED|"
                       r"ABORTED|CANCELLED|UNAUTHENTICATED):|os_error_code='(?!2')")


def _chain(e: BaseException) -> list[BaseException]:
  out = []
  while e is not None and e not in out and len(out) < 16:
    out.append(e)
    e = e.__cause__ or e.__context__
  return out


def is_damage(e: BaseException) -> bool:
  """Whether a restore error means corrupt or missing data (else: stop, touch nothing)."""
  chain = _chain(e)
  for x in chain:
    if isinstance(x, OSError) and not isinstance(x, FileNotFoundError):
      return False  # PermissionError, EIO, ENOSPC...: the file may be fine
    if _IO_CODES.search(str(x)):
      return False
  for x in chain:
    text = str(x)
    if (isinstance(x, (FileNotFoundError, json.JSONDecodeError))
        or (isinstance(x, KeyError) and "was not found in the checkpoint" in text)
        or _DAMAGE_TEXT.search(text)):
      return True
  return False


def describe(e: BaseException) -> str:
  """One line for an error: the innermost tensorstore/OS error of the chain when there is one."""
  chain = _chain(e)
  pick = next((x for x in reversed(chain)
               if isinstance(x, OSError) or re.search(r"\b[A-Z][A-Z_]{5,}:", str(x))), chain[0])
  text = next((line.strip() for line in str(pick).splitlines() if line.strip()), "no message")
  return f"{type(pick).__name__}: {text[:300]}"


def list_files(root: str) -> dict[str, int]:
  """{path relative to root: size} of every file under root; an unreadable directory raises
  (os.walk would skip it silently, and orbax reports one as missing)."""
  if fs.is_url(root):
    return {r: n for r, n in fs.file_sizes(root).items() if r not in _NOT_LISTED}
  out, todo = {}, [""]
  while todo:
    rel = todo.pop()
    with os.scandir(os.path.join(root, rel)) as it:
      for entry in it:
        name = os.path.join(rel, entry.name)
        if entry.is_dir(follow_symlinks=False):
          todo.append(name)
        elif name not in _NOT_LISTED:
          out[name] = entry.stat().st_size
  return out


def _sha256(path: str) -> str:
  if fs.is_url(path):
    return hashlib.sha256(fs.read_bytes(path)).hexdigest()
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def hash_all(root: str, rels: list[str]) -> dict[str, str]:
  """{rel: sha256} of files under root."""
  # hashlib releases the GIL on large buffers, so threads overlap reads and hashing.
  with concurrent.futures.ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
    return dict(zip(rels, pool.map(lambda r: _sha256(fs.join(root, *r.split("/"))), rels)))
