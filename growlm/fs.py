"""Paths or URLs: every file growlm reads or writes goes through here, local or on gs://.

A path is a local path or a `gs://bucket/key` URL. Local paths keep POSIX semantics (fsync, atomic
rename); URLs go through `etils.epath` (gcsfs underneath, the same layer orbax uses for its own
metadata; configured in growlm.gcs), with these rules:
- no `os.path.abspath` on a URL, no `open()` on one: use `join`, `absolute`, `read_bytes`, ...;
- a single object write is atomic on an object store (readers see the old or the new object), so
  `write_bytes_atomic` writes URLs directly; a directory rename is not, so `rename` and
  `copy_tree` onto a URL copy a marker file (`last`) after everything else;
- directory listings are never cached (gcsfs caches them by default, which would hide files
  written by another host);
- errors from the object store (no credentials, no bucket, no permission, no network) become
  one GrowlmError line naming the path and what is accepted.

Only gs:// is accepted as a URL scheme: it is the one with the compare-and-swap writes the run
lock needs (see `growlm.lease_gcs`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from typing import Any

from growlm import gcs
from growlm.errors import GrowlmError

SCHEMES = ("gs",)
ACCEPTED = "a local path or a gs://bucket/path URL"


def is_url(path: str) -> bool:
  """Whether `path` is a URL (scheme://...) rather than a local path."""
  return "://" in str(path)


def check(path: str, what: str = "path") -> str:
  """`path` itself; GrowlmError if it is a URL of a scheme growlm cannot use, or a bare bucket."""
  path = str(path)
  if not is_url(path):
    return path
  scheme, _, rest = path.partition("://")
  if scheme not in SCHEMES:
    raise GrowlmError(f"{what} {path}: the {scheme}:// scheme is not supported; accepted: "
                      f"{ACCEPTED}")
  if not rest.strip("/"):
    raise GrowlmError(f"{what} {path}: no bucket named; accepted: {ACCEPTED}")
  return path


def check_writable(path: str, what: str = "path") -> None:
  """The early check of a command that will write `path`, before any work: GrowlmError (one line)
  unless, for a URL, its bucket exists and can be seen, or, for a local path, the nearest
  path that exists at or above it is `path` itself or a directory this user can write (not
  read-only, not another user's)."""
  check(path, what)
  if not is_url(path):
    above = os.path.abspath(path)
    while not os.path.exists(above):
      above = os.path.dirname(above)
    if not os.path.isdir(above) and above != os.path.abspath(path):
      raise GrowlmError(f"{what} {path}: {above} is not a directory; accepted: a path whose "
                        "parent is (or can be made) a directory")
    if os.path.isdir(above) and not os.access(above, os.W_OK | os.X_OK):
      raise GrowlmError(f"{what} {path}: cannot write in {above} (read-only file system or no "
                        f"permission); accepted: a path under a directory this user can write")
    return
  with _errors(path, "check its bucket"):
    found = gcs.gcsfs().exists(bucket(path).partition("://")[2])
  if not found:
    raise GrowlmError(f"{what} {path}: bucket {bucket(path)} does not exist or cannot be seen "
                      f"with these credentials; accepted: {ACCEPTED} in an existing bucket")


def bucket(path: str) -> str:
  """`gs://bucket` of a URL."""
  scheme, _, rest = str(path).partition("://")
  return f"{scheme}://{rest.split('/', 1)[0]}"


def join(base: str, *names: str) -> str:
  if not is_url(base):
    return os.path.join(base, *names)
  out = str(base).rstrip("/")
  for n in names:
    out = f"{out}/{str(n).strip('/')}" if n else out
  return out


def absolute(path: str) -> str:
  """A local path made absolute; a URL without its trailing slash."""
  return str(path).rstrip("/") if is_url(path) else os.path.abspath(path)


def basename(path: str) -> str:
  return str(path).rstrip("/").rsplit("/", 1)[-1] if is_url(path) else \
      os.path.basename(os.path.normpath(path))


def dirname(path: str) -> str:
  return str(path).rstrip("/").rsplit("/", 1)[0] if is_url(path) else \
      os.path.dirname(os.path.normpath(path))


def store_error(path: str, action: str, e: BaseException) -> GrowlmError:
  """One line for a failure to `action` the object-store or local `path`."""
  first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
  if is_url(path):
    low = first.lower()
    if isinstance(e, gcs.StoreUnreachable) or "dns" in type(e).__name__.lower():
      hint = f"{ACCEPTED} on a machine that reaches Cloud Storage (network and DNS)"
    elif "credentials" in low or "401" in first or "403" in first or "permission" in low:
      hint = ("credentials that can read and write it (gcloud auth application-default login, or "
              "GOOGLE_APPLICATION_CREDENTIALS)")
    else:
      hint = f"{ACCEPTED} in a bucket that exists and that these credentials can write"
    return GrowlmError(f"{path}: cannot {action} ({type(e).__name__}: {first}); accepted: {hint}")
  return GrowlmError(f"{path}: cannot {action} ({type(e).__name__}: {first})")


@contextlib.contextmanager
def _errors(path: str, action: str, *, writing: bool = False) -> Iterator[None]:
  """Object-store failures of any kind (gcsfs HttpError, google.auth and aiohttp errors) become
  one GrowlmError line; FileNotFoundError stays itself when reading, since callers test for it
  (when writing it means that the bucket does not exist)."""
  try:
    yield
  except GrowlmError:
    raise
  except FileNotFoundError as e:
    if not writing:
      raise
    raise GrowlmError(f"{path}: cannot {action}: bucket {bucket(path)} does not exist or cannot "
                      f"be seen with these credentials; accepted: {ACCEPTED} in an existing "
                      f"bucket") from e
  except Exception as e:  # pylint: disable=broad-except
    raise store_error(path, action, e) from e


def exists(path: str) -> bool:
  if not is_url(path):
    return os.path.exists(path)
  with _errors(path, "check"):
    return gcs.epath(path).exists()


def isdir(path: str) -> bool:
  if not is_url(path):
    return os.path.isdir(path)
  with _errors(path, "check"):
    return gcs.epath(path).is_dir()


def isfile(path: str) -> bool:
  if not is_url(path):
    return os.path.isfile(path)
  with _errors(path, "check"):
    p = gcs.epath(path)
    return p.exists() and not p.is_dir()


def listdir(path: str) -> list[str]:
  """Names in the directory `path` (sorted); FileNotFoundError if there is none."""
  if not is_url(path):
    return sorted(os.listdir(path))
  with _errors(path, "list"):
    p = gcs.epath(path)
    if not p.is_dir():
      raise FileNotFoundError(path)
    return sorted(c.name for c in p.iterdir())


def makedirs(path: str) -> None:
  """Creates the directory `path` and its parents (a no-op on object stores, which have none)."""
  if not is_url(path):
    os.makedirs(path, exist_ok=True)


def read_bytes(path: str) -> bytes:
  if not is_url(path):
    with open(path, "rb") as f:
      return f.read()
  with _errors(path, "read"):
    return gcs.epath(path).read_bytes()


def read_text(path: str) -> str:
  return read_bytes(path).decode("utf-8")


def write_bytes_atomic(path: str, data: bytes) -> None:
  """Writes `path` so that readers see the old bytes or the new, never half: locally through a
  temporary file, fsync and rename; on an object store as one object upload."""
  if is_url(path):
    with _errors(path, "write", writing=True):
      gcs.epath(path).write_bytes(data)
    return
  write_local_atomic(path, data)


def write_local_atomic(path: str, data: bytes, tmp: str | None = None) -> None:
  """Writes the local file `path` through `tmp`, fsync and os.replace."""
  tmp = tmp or f"{path}.{os.getpid()}.tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.lexists(tmp):
      os.unlink(tmp)


def write_text_atomic(path: str, text: str) -> None:
  write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON so that a crash never leaves half a file (see `write_bytes_atomic`)."""
  write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True))


def read_json_object(path: str, what: str) -> dict[str, Any]:
  """The JSON object in `path`; GrowlmError naming `what` if it is unreadable or not an object."""
  try:
    out = json.loads(read_bytes(path))
  except (OSError, ValueError) as e:
    first = (str(e).splitlines() or [type(e).__name__])[0]
    raise GrowlmError(f"{what} {path} cannot be read ({type(e).__name__}: {first})") from e
  if not isinstance(out, dict):
    raise GrowlmError(f"{what} {path} is not a JSON object")
  return out


def remove(path: str) -> None:
  """Removes the file `path`; FileNotFoundError if there is none."""
  if not is_url(path):
    os.unlink(path)
    return
  with _errors(path, "remove"):
    gcs.epath(path).unlink()


def rmtree(path: str) -> None:
  """Removes the directory tree `path` if it exists."""
  if not is_url(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  with _errors(path, "remove"):
    p = gcs.epath(path)
    if p.exists():
      p.rmtree()


def rename(src: str, dst: str, *, last: str | None = None) -> None:
  """Moves a file or directory. Atomic for local paths; on an object store a copy of each object
  (the file named `last` copied last: readers that look for it never see a partial directory;
  a failed copy removes what it wrote) and then a delete of `src`."""
  if not is_url(src) and not is_url(dst):
    os.rename(src, dst)
    return
  if not isdir(src):
    with _errors(dst, f"move {src} to", writing=True):
      gcs.epath(src).rename(gcs.epath(dst))
    return
  try:
    copy_tree(src, dst, last=last)
  except BaseException:
    with contextlib.suppress(Exception):
      rmtree(dst)
    raise
  rmtree(src)


def _objects(path: str) -> dict[str, dict]:
  """{relative path (with '/'): gcsfs info} of every object under the URL `path`."""
  with _errors(path, "list"):
    base = path.rstrip("/").partition("://")[2] + "/"
    return {k[len(base):]: v for k, v in sorted(gcs.gcsfs().find(path, detail=True).items())
            if k.startswith(base) and v.get("type") != "directory"}


def walk_files(path: str) -> list[str]:
  """Relative paths (with '/') of every file under the directory `path`, sorted."""
  if not is_url(path):
    out = []
    for root, _, files in os.walk(path):
      rel = os.path.relpath(root, path)
      out += [f if rel == "." else f"{rel}/{f}".replace(os.sep, "/") for f in files]
    return sorted(out)
  return list(_objects(path))


def size(path: str) -> int:
  """Size in bytes of the file `path`."""
  if not is_url(path):
    return os.path.getsize(path)
  with _errors(path, "read"):
    return int(gcs.gcsfs().size(path))


def file_sizes(path: str) -> dict[str, int]:
  """{relative path (with '/'): size in bytes} of every file under the directory `path`."""
  if not is_url(path):
    return {rel: os.path.getsize(os.path.join(path, rel)) for rel in walk_files(path)}
  return {rel: int(v["size"]) for rel, v in _objects(path).items()}


def versions(path: str) -> dict[str, str]:
  """{relative path ('' for a single object): "SIZE:GENERATION"} of the object or of every object
  under the URL `path`; FileNotFoundError if there is none. What `transfer.mirror` compares."""
  with _errors(path, "list"):
    found = _objects(path) if gcs.epath(path).is_dir() else {"": gcs.gcsfs().info(path)}
  if not found:
    raise FileNotFoundError(path)
  return {rel: f"{v.get('size')}:{v.get('generation') or v.get('md5Hash') or ''}"
          for rel, v in found.items()}


def open_read(path: str):
  """A binary file object reading `path` (streamed from an object store)."""
  if not is_url(path):
    return open(path, "rb")
  with _errors(path, "read"):
    return gcs.epath(path).open("rb")


def copy_tree(src: str, dst: str, *, last: str | None = None, skip: Iterable[str] = ()) -> None:
  """Copies every file under `src` to the same relative path under `dst` (either may be a URL),
  the file named `last` after all others (readers that wait for it never see a partial
  directory), leaving out the relative paths in `skip`."""
  skip = set(skip)
  for rel in sorted(walk_files(src), key=lambda r: r == last):
    if rel in skip:
      continue
    out = join(dst, *rel.split("/"))
    if not is_url(out):
      os.makedirs(os.path.dirname(out), exist_ok=True)
    copy_file(join(src, *rel.split("/")), out)


def copy_file(src: str, dst: str) -> None:
  if not is_url(src) and not is_url(dst):
    shutil.copyfile(src, dst)
    return
  with _errors(dst if is_url(dst) else src, f"copy {src} to {dst}", writing=is_url(dst)):
    if is_url(src) and is_url(dst):
      gcs.epath(src).copy(gcs.epath(dst), overwrite=True)
    elif is_url(dst):
      gcs.epath(dst).write_bytes(read_bytes(src))
    else:
      with open(dst, "wb") as f:
        f.write(read_bytes(src))


def glob(pattern: str) -> list[str]:
  """Files matching the glob `pattern` (sorted); `**` matches any depth."""
  if not is_url(pattern):
    import glob as glob_lib  # pylint: disable=g-import-not-at-top
    return sorted(glob_lib.glob(pattern, recursive=True))
  with _errors(pattern, "list"):
    scheme = pattern.partition("://")[0]
    found = gcs.gcsfs().glob(pattern, detail=True)
    return sorted(f"{scheme}://{p}" for p, v in found.items() if v.get("type") != "directory")
