"""Files: atomic JSON writes and JSON reads that fail with one clear line.

Every JSON file growlm writes (config.json, manifests, reports, results, W&B state) goes through
`write_json_atomic`, so a crash never leaves half a file behind.
"""

from __future__ import annotations

import json
import os
from typing import Any

from growlm.errors import GrowlmError


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file and a rename, so a crash never leaves half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def read_json_object(path: str, what: str) -> dict[str, Any]:
  """The JSON object in `path`; GrowlmError naming `what` if it is unreadable or not an object."""
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    first = (str(e).splitlines() or [type(e).__name__])[0]
    raise GrowlmError(f"{what} {path} cannot be read ({type(e).__name__}: {first})") from e
  if not isinstance(out, dict):
    raise GrowlmError(f"{what} {path} is not a JSON object")
  return out
