"""growlm.fs: one path layer for local paths and gs:// URLs, run against the GCS emulator."""

import http.server
import json
import os
import subprocess
import sys
import threading

import pytest

from conftest import REPO

from growlm import fs, transfer
from growlm.errors import GrowlmError


@pytest.fixture(params=["local", "gs"])
def root(request, tmp_path):
  if request.param == "local":
    return str(tmp_path)
  return request.getfixturevalue("gcs").bucket() + "/some/dir"


def test_write_read_list_remove(root):
  assert not fs.exists(fs.join(root, "a.json"))
  fs.write_json_atomic(fs.join(root, "a.json"), {"x": 1})
  fs.makedirs(fs.join(root, "sub"))
  fs.write_bytes_atomic(fs.join(root, "sub", "b.bin"), b"\x00\x01")
  assert fs.read_json_object(fs.join(root, "a.json"), "test") == {"x": 1}
  assert fs.read_bytes(fs.join(root, "sub", "b.bin")) == b"\x00\x01"
  assert fs.listdir(root) == ["a.json", "sub"]
  assert fs.isdir(fs.join(root, "sub")) and not fs.isdir(fs.join(root, "a.json"))
  assert fs.isfile(fs.join(root, "a.json")) and not fs.isfile(fs.join(root, "sub"))
  assert fs.walk_files(root) == ["a.json", "sub/b.bin"]
  assert fs.glob(fs.join(root, "**", "*.bin")) == [fs.join(root, "sub", "b.bin")]
  fs.remove(fs.join(root, "a.json"))
  assert fs.listdir(root) == ["sub"]
  with pytest.raises(FileNotFoundError):
    fs.read_bytes(fs.join(root, "a.json"))
  with pytest.raises(FileNotFoundError):
    fs.listdir(fs.join(root, "nothing"))


def test_overwrite_leaves_no_temporary(root):
  p = fs.join(root, "c.json")
  fs.write_json_atomic(p, {"v": 1})
  fs.write_json_atomic(p, {"v": 2})
  assert fs.read_json_object(p, "test") == {"v": 2}
  assert fs.listdir(root) == ["c.json"]


def test_a_local_path_under_a_file_is_refused_before_any_work(tmp_path):
  """The nearest path that exists above an output is a file: nothing could be made there. The
  output itself may be a file (the command decides what to do with it)."""
  (tmp_path / "a_file").write_text("x")
  with pytest.raises(GrowlmError) as e:
    fs.check_writable(str(tmp_path / "a_file" / "run"), "--workdir")
  assert str(e.value) == (f"--workdir {tmp_path / 'a_file' / 'run'}: {tmp_path / 'a_file'} is "
                          "not a directory; accepted: a path whose parent is (or can be made) a "
                          "directory")
  fs.check_writable(str(tmp_path / "a_file"), "--out")
  fs.check_writable(str(tmp_path / "new" / "run"), "--workdir")
  assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_rename_and_copy_tree(root, tmp_path):
  src = fs.join(root, "src")
  fs.makedirs(fs.join(src, "d"))
  fs.write_bytes_atomic(fs.join(src, "d", "x"), b"xx")
  fs.write_bytes_atomic(fs.join(src, "y"), b"yy")
  fs.rename(src, fs.join(root, "dst"))
  assert not fs.exists(src) and fs.walk_files(fs.join(root, "dst")) == ["d/x", "y"]
  assert fs.read_bytes(fs.join(root, "dst", "d", "x")) == b"xx"
  out = str(tmp_path / "published")
  fs.copy_tree(fs.join(root, "dst"), out)
  assert fs.walk_files(out) == ["d/x", "y"]
  fs.copy_tree(fs.join(root, "dst"), str(tmp_path / "part"), skip=["d/x"])
  assert fs.walk_files(str(tmp_path / "part")) == ["y"]


def test_rename_to_a_url_copies_its_marker_last(gcs, tmp_path):
  local = tmp_path / "out"
  (local / "w").mkdir(parents=True)
  (local / "w" / "big").write_bytes(b"1" * 1000)
  (local / "DONE").write_text("ok")
  dst = gcs.bucket() + "/pub"
  order = []
  real = fs.copy_file
  fs.copy_file = lambda s, d: (order.append(d.rsplit("/", 1)[-1]), real(s, d))
  try:
    fs.rename(str(local), dst, last="DONE")
  finally:
    fs.copy_file = real
  assert order == ["big", "DONE"] and not local.exists()
  assert fs.read_text(fs.join(dst, "DONE")) == "ok"


def test_url_paths_are_never_made_local():
  assert fs.absolute("gs://b/x/") == "gs://b/x"
  assert fs.join("gs://b/x/", "y", "z") == "gs://b/x/y/z"
  assert fs.basename("gs://b/x/run1/") == "run1" and fs.dirname("gs://b/x/run1") == "gs://b/x"
  assert fs.absolute("rel") == os.path.abspath("rel")


@pytest.mark.parametrize("bad", ["s3://bucket/x", "gs://", "gs:///"])
def test_unsupported_urls_are_refused(bad):
  with pytest.raises(GrowlmError, match="accepted: a local path or a gs://"):
    fs.check(bad, "workdir")


def test_a_missing_bucket_is_one_line(gcs):
  with pytest.raises(GrowlmError) as e:
    fs.write_json_atomic("gs://no-such-bucket-here/x.json", {})
  assert "gs://no-such-bucket-here/x.json: cannot write" in str(e.value)
  assert "\n" not in str(e.value)


def test_mirror_copies_once_and_follows_changes(gcs, tmp_path, monkeypatch):
  monkeypatch.setenv("GROWLM_CACHE", str(tmp_path / "cache"))
  d = gcs.bucket() + "/data"
  fs.write_bytes_atomic(fs.join(d, "a.bin"), b"a" * 10)
  fs.write_bytes_atomic(fs.join(d, "sub", "b.bin"), b"b" * 5)
  local = transfer.mirror(d)
  assert local.startswith(str(tmp_path / "cache")) and fs.walk_files(local) == ["a.bin",
                                                                                "sub/b.bin"]
  before = os.stat(os.path.join(local, "a.bin")).st_mtime_ns
  assert transfer.mirror(d) == local   # unchanged objects are not copied again
  assert os.stat(os.path.join(local, "a.bin")).st_mtime_ns == before
  fs.write_bytes_atomic(fs.join(d, "sub", "b.bin"), b"c" * 5)   # same size, new generation
  transfer.mirror(d)
  assert open(os.path.join(local, "sub", "b.bin"), "rb").read() == b"c" * 5
  one = transfer.mirror(fs.join(d, "a.bin"))
  assert open(one, "rb").read() == b"a" * 10
  assert transfer.mirror(str(tmp_path)) == str(tmp_path)


class _RefusingStore(http.server.BaseHTTPRequestHandler):
  """An object store that refuses every request as GCS refuses a caller without credentials."""

  def _refuse(self):
    body = json.dumps({"error": {"code": 401, "message": "Anonymous caller does not have "
                                 "storage.buckets.get access to the Google Cloud Storage bucket.",
                                 "errors": [{"reason": "required"}]}}).encode()
    self.send_response(401)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = do_PATCH = _refuse

  def log_message(self, *args):  # quiet
    pass


@pytest.fixture
def refusing_store(monkeypatch):
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingStore)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f"http://127.0.0.1:{server.server_address[1]}"
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
    monkeypatch.setenv(name, url)
  yield url
  server.shutdown()


def test_a_store_that_refuses_these_credentials_is_one_line(refusing_store, tmp_path):
  """No credentials (GCS answers 401): the library and the trainer's command line say so in one
  line that names the fix, exit non-zero and write nothing locally."""
  with pytest.raises(GrowlmError) as e:
    fs.check_writable("gs://someone-elses-bucket/run1", "workdir")
  msg = str(e.value)
  assert "\n" not in msg and "401" in msg
  assert "accepted: credentials that can read and write it" in msg
  cmd = [sys.executable, "-m", "growlm.main", "--workdir=gs://someone-elses-bucket/run1",
         f"--config={REPO}/configs/default.py:size=nano,runlocal"]
  r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert r.returncode == 2, r.stderr          # growlm's exit status for bad input
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("growlm: error: gs://someone-elses-bucket/run1")
  assert "credentials that can read and write it" in lines[0]
  assert list(tmp_path.iterdir()) == []


def test_a_store_whose_host_does_not_resolve_fails_at_once_in_one_line(monkeypatch, tmp_path):
  """No network or DNS: Cloud Storage's host name does not resolve. growlm says so after three
  tries (not gcsfs's minute of retries), in one line that names the fix, for the library's
  checks and reads and for the trainer's command line, which exits 2 and writes nothing."""
  from growlm import gcs  # pylint: disable=g-import-not-at-top
  no_host = "http://growlm-no-such-host.invalid:9"   # .invalid never resolves (RFC 2606)
  for name in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL"):
    monkeypatch.setenv(name, no_host)
  for name in gcs._PROXIES:   # pylint: disable=protected-access
    monkeypatch.delenv(name, raising=False)
  naps = []
  monkeypatch.setattr(gcs.time, "sleep", naps.append)
  for call in (lambda: fs.check_writable("gs://a-bucket/run1", "workdir"),
               lambda: fs.read_bytes("gs://a-bucket/x.json")):
    with pytest.raises(GrowlmError) as e:
      call()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("gs://a-bucket/")
    assert "growlm-no-such-host.invalid does not resolve" in msg
    assert msg.endswith("on a machine that reaches Cloud Storage (network and DNS)")
  assert naps == [1, 1] * 2                     # three tries a second apart, each time
  cmd = [sys.executable, "-m", "growlm.main", "--workdir=gs://a-bucket/run1",
         f"--config={REPO}/configs/default.py:size=nano,runlocal"]
  r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                     env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert r.returncode == 2, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("growlm: error: gs://a-bucket/run1: cannot ")
  assert "does not resolve" in lines[0] and list(tmp_path.iterdir()) == []


def test_the_store_host_is_the_emulators_where_one_is_set(monkeypatch):
  from growlm import gcs  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  assert gcs.host() == "storage.googleapis.com"
  for url, name in (("http://127.0.0.1:4443", "127.0.0.1"), ("localhost:9000", "localhost")):
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    assert gcs.host() == name
