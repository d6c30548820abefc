"""Between object stores and the local disk: local mirrors of URL inputs for readers that need
real files (array_record, safetensors, tokenizers, TFDS), and the local cache they live in.
Built on growlm.fs; local paths pass through untouched."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator

from growlm import fs


@contextlib.contextmanager
def local_file(path: str) -> Iterator[str]:
  """A local file with the bytes of `path`: itself if local, else a temporary download."""
  if not fs.is_url(path):
    yield path
    return
  with tempfile.TemporaryDirectory(prefix="growlm-") as tmp:
    local = os.path.join(tmp, fs.basename(path))
    with open(local, "wb") as f:
      f.write(fs.read_bytes(path))
    yield local


def cache_root() -> str:
  """Where URL inputs are mirrored locally: $GROWLM_CACHE, default ~/.cache/growlm."""
  return os.environ.get("GROWLM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                        "growlm")


def mirror_path(path: str) -> str:
  """Where `mirror` puts the copy of the URL `path`."""
  return os.path.join(cache_root(), "mirror", path.rstrip("/").partition("://")[2])


def mirror(path: str) -> str:
  """A local copy of the file or directory `path` (itself if local), for readers that need real
  files: array_record shards, safetensors, tokenizers, TFDS data. Kept under
  cache_root()/mirror/BUCKET/KEY and reused while each object's size and generation are
  unchanged; each file lands by rename, so processes sharing a host can mirror at once."""
  if not fs.is_url(path):
    return path
  local = mirror_path(path)
  listing = fs.versions(path)
  single = list(listing) == [""]
  stamps_path = local + ".growlm-mirror.json"   # beside the copy, never inside it
  try:
    with open(stamps_path) as f:
      stamps = json.load(f)
  except (OSError, ValueError):
    stamps = {}
  for rel, stamp in sorted(listing.items()):
    dst = local if single else os.path.join(local, *rel.split("/"))
    if stamps.get(rel) == stamp and os.path.isfile(dst):
      continue
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.{os.getpid()}.part"
    with fs.open_read(fs.join(path, *rel.split("/")) if rel else path) as src, \
        open(tmp, "wb") as out:
      shutil.copyfileobj(src, out, 16 << 20)
    os.replace(tmp, dst)
    stamps[rel] = stamp
  tmp = f"{stamps_path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    json.dump(stamps, f)
  os.replace(tmp, stamps_path)
  return local
