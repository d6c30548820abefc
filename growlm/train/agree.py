"""What the processes of a multi-process run must agree on before any work: the run's config and
run dir (`check_same_run`), then that process 0 holds the run dir's lease (`take_lease`). Each
process parses its own flags, so a flag given to one host only (a different train.num_steps, say)
would otherwise go unnoticed until the processes part ways in a collective and wait for each
other forever."""

from __future__ import annotations

import hashlib
import json
from typing import Any, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from growlm import lock as lock_lib
from growlm.errors import GrowlmError
from growlm.train import peers

ACCEPTED = "accepted: the same config and flags on every process"


def _digest(value: Any) -> int:
  """31 bits of a SHA-256 of `value`'s JSON (an int32 every process can gather)."""
  data = json.dumps(value, sort_keys=True, default=str).encode()
  return int.from_bytes(hashlib.sha256(data).digest()[:4], "little") & 0x7FFFFFFF


def _fields(tree: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in sorted(tree.items()):
    if isinstance(value, dict) and value:
      yield from _fields(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def check_same_run(config_json: dict[str, Any], workdir: str) -> None:
  """GrowlmError on every process, naming the fields, unless all processes were given the same
  config (config.json's form) and run dir. A collective: every process must call it."""
  if jax.process_count() == 1:
    return
  fields = dict(_fields(config_json))
  fields["--workdir"] = workdir
  names = sorted(fields)
  heads = np.asarray(multihost_utils.process_allgather(np.int32(_digest(names)))).ravel()
  peers.joined()   # every process has met here: the join timer is done
  if len(set(heads.tolist())) > 1:
    raise GrowlmError(f"the {jax.process_count()} processes' configs have different fields; "
                      f"{ACCEPTED}")
  mine = np.array([_digest(fields[n]) for n in names], np.int32)
  every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1, len(names))
  differ = [n for i, n in enumerate(names) if len(set(every[:, i].tolist())) > 1]
  if differ:
    raise GrowlmError(f"the {jax.process_count()} processes were given different values of "
                      f"{', '.join(differ[:5])} (process {jax.process_index()}: "
                      f"{differ[0]}={fields[differ[0]]!r}); {ACCEPTED}")


def take_lease(workdir: str) -> lock_lib.RunLock | None:
  """Process 0 takes the run dir's lease; every process learns whether it did, so all refuse
  together (a lone process carrying on would wait forever in its next collective)."""
  lease, error, multi = None, "", jax.process_count() > 1
  if multi:   # no lease written while a process still fails its own input checks
    multihost_utils.sync_global_devices("growlm: every process's inputs are good")
  if jax.process_index() == 0:
    try:
      lease = lock_lib.RunLock(workdir).acquire()
    except GrowlmError as e:
      error = str(e)
  if multi:
    ok = multihost_utils.broadcast_one_to_all(np.int32(0 if error else 1))
    if not int(ok) and not error:
      error = f"run dir {workdir} is in use by another launch (process 0 could not take its lease)"
  if error:
    raise GrowlmError(error)
  return lease
