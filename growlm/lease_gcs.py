"""The run-dir lease on gs://: compare-and-swap on object generations instead of O_EXCL + rename.

Cloud Storage gives every write of an object a new generation number and accepts a write only
if a precondition on the current generation holds. That is all a lease needs:
  create     upload with ifGenerationMatch=0: exactly one of several launches creates it;
  take over  upload with ifGenerationMatch=G, G the generation read and judged stale: of several
             launches that judged the same lease stale, exactly one wins (no guard file needed);
  renew      upload with ifGenerationMatch=OURS: fails once anyone else wrote the lease, which is
             how a holder learns that it lost it;
  release    delete with ifGenerationMatch=OURS.
growlm.lock decides when (staleness, heartbeat cadence, messages); this module only talks to the
store, through google-cloud-storage (installed with gcsfs), which honours STORAGE_EMULATOR_HOST.
"""

from __future__ import annotations

import functools
from typing import Any


@functools.lru_cache(maxsize=1)
def _client():
  from google.cloud import storage  # pylint: disable=g-import-not-at-top
  return storage.Client()


def _blob(url: str):
  bucket, _, key = url.partition("://")[2].partition("/")
  return _client().bucket(bucket).blob(key)


def _precondition_failed(e: BaseException) -> bool:
  return getattr(e, "code", None) == 412


def read(url: str) -> tuple[bytes, float, int] | None:
  """(bytes, update time in epoch seconds, generation) of the lease object; None if absent."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  blob = _blob(url)
  try:
    raw = blob.download_as_bytes()
  except exceptions.NotFound:
    return None
  updated: Any = blob.updated
  return raw, (updated.timestamp() if updated is not None else 0.0), int(blob.generation)


def write(url: str, data: bytes, if_generation: int) -> int | None:
  """Writes the lease if its generation is `if_generation` (0: if it does not exist); returns
  the new generation, None if the precondition failed (someone else wrote it)."""
  blob = _blob(url)
  try:
    blob.upload_from_string(data, content_type="application/json",
                            if_generation_match=if_generation)
  except Exception as e:  # pylint: disable=broad-except
    if _precondition_failed(e):
      return None
    raise
  return int(blob.generation)


def delete(url: str, if_generation: int) -> None:
  """Deletes the lease if it is still generation `if_generation`."""
  from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
  try:
    _blob(url).delete(if_generation_match=if_generation)
  except exceptions.NotFound:
    pass
  except Exception as e:  # pylint: disable=broad-except
    if not _precondition_failed(e):
      raise
