"""The Cloud Storage layer under growlm.fs: etils.epath and gcsfs, configured once per process.

- Directory listings are never cached (gcsfs caches them by default, which would hide objects
  another host wrote since); gcsfs's own logging of retries and credential fallbacks is quiet,
  since growlm.fs says what failed in one line.
- Before the first use, and until it succeeds, Cloud Storage's host name (the one in
  STORAGE_EMULATOR_HOST where that is set, as gcsfs reads it) must resolve: on a machine with no
  network or DNS, gcsfs would retry every request for over a minute before failing, so the
  failure comes here at once instead (three tries a second apart), as StoreUnreachable. Where
  an HTTPS proxy is set (HTTPS_PROXY, ALL_PROXY), the proxy resolves names and nothing is checked.
"""

from __future__ import annotations

import os
import socket
import time
import urllib.parse

_HOST = "https://storage.googleapis.com"
_TRIES = 3
_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
_resolved: set[str] = set()   # Cloud Storage hosts this process has resolved
_configured = False


class StoreUnreachable(ConnectionError):
  """Cloud Storage's host name does not resolve here."""


def host() -> str:
  """The host name gcsfs talks to: STORAGE_EMULATOR_HOST's where set, else Cloud Storage's."""
  url = os.environ.get("STORAGE_EMULATOR_HOST") or _HOST
  return urllib.parse.urlsplit(url if "://" in url else f"http://{url}").hostname or url


def reach() -> None:
  """StoreUnreachable unless `host()` resolves within _TRIES tries a second apart."""
  name = host()
  if name in _resolved or any(os.environ.get(v) for v in _PROXIES):
    return   # through a proxy, the proxy resolves the name
  for attempt in range(_TRIES):
    try:
      socket.getaddrinfo(name, None)
    except socket.gaierror as e:
      if attempt == _TRIES - 1:
        raise StoreUnreachable(f"{name} does not resolve ({e.strerror})") from e
      time.sleep(1)
    else:
      _resolved.add(name)
      return


def configure() -> None:
  """`reach`, then (once) gcsfs without listing cache and with quiet logs."""
  global _configured
  reach()
  if _configured:
    return
  import logging  # pylint: disable=g-import-not-at-top

  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.config.conf.setdefault("gs", {}).update(use_listings_cache=False, skip_instance_cache=True)
  logging.getLogger("gcsfs").setLevel(logging.CRITICAL)  # retries and fallbacks: we say it once
  logging.getLogger("google.auth._default").setLevel(logging.ERROR)  # each credential tried
  _configured = True


def epath(path: str):
  """etils.epath.Path of the URL `path`."""
  configure()
  from etils import epath as epath_lib  # pylint: disable=g-import-not-at-top
  return epath_lib.Path(path)


def gcsfs():
  """The gcsfs filesystem (for recursive listing and globs, which epath refuses on gs://)."""
  configure()
  import fsspec  # pylint: disable=g-import-not-at-top
  return fsspec.filesystem("gs")
