"""Checkpoints: checksums, fallback past damaged steps only, stop on I/O errors, close().

Damage is made by editing the files of a saved step the way disks and copies break them; the
orbax/tensorstore errors each kind raises without a checksum manifest are the classification table
in growlm/train/checkpoint.py.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from conftest import REPO
from growlm.errors import GrowlmError
from growlm.train import checkpoint as ckpt_lib
from growlm.train import checkpoint_files as ckpt_files
from growlm.train.checkpoint import CHECKSUMS, Checkpoints

LOGGER = "growlm.train.checkpoint"
# A damaged restore leaves orbax coroutines for the other arrays un-awaited; Python reports them
# when they are collected. That is orbax's noise, not a failure here.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _state(k: int) -> dict:
  """A TrainState-like tree whose numbers differ per step; `w` sharded over all devices."""
  mesh = Mesh(np.array(jax.devices()), ("x",))
  w = jax.random.normal(jax.random.key(k), (64, 96))
  return {"step": jnp.int32(k),
          "params": {"w": jax.device_put(w, NamedSharding(mesh, P("x"))),
                     "b": jnp.full(5, k * 1.5)},
          "opt": {"mu": jnp.arange(32, dtype=jnp.float32) * k}}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _same(a, b) -> bool:
  return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def _save(directory, steps=(1, 2, 3), async_save=True) -> dict:
  c = Checkpoints(str(directory), keep=5, async_save=async_save)
  for s in steps:
    c.save(s, _state(s), {"position": s * 10}, {"step": s})
  c.close()
  return {s: _state(s) for s in steps}


def _data_file(directory, step) -> str:
  """The step's largest array data file (ocdbt chunk)."""
  return max(glob.glob(f"{directory}/{step}/state/ocdbt.process_*/d/*"), key=os.path.getsize)


def _snapshot(directory) -> dict:
  out = {}
  for root, _, files in os.walk(directory):
    for f in files:
      with open(os.path.join(root, f), "rb") as fh:
        out[os.path.relpath(os.path.join(root, f), directory)] = hashlib.sha256(fh.read()).digest()
  return out


def _warnings(caplog) -> list[str]:
  return [r.getMessage() for r in caplog.records
          if r.name == LOGGER and r.levelno >= logging.WARNING]


def test_saved_steps_are_checksummed_and_restore_in_a_fresh_manager(tmp_path):
  states = _save(tmp_path, async_save=True)
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]  # no tmp dir left by close()
  for s in (1, 2, 3):
    listed = json.load(open(tmp_path / str(s) / CHECKSUMS))["files"]
    assert "state/_METADATA" in listed and "data/metadata" in listed and CHECKSUMS not in listed
    assert listed["data/metadata"]["bytes"] == os.path.getsize(tmp_path / str(s) / "data/metadata")
  c = Checkpoints(str(tmp_path))  # orbax must ignore the extra JSON file in each step dir
  step, state, data, meta = c.restore_latest(_abstract(states[3]))
  c.close()
  assert (step, data, meta) == (3, {"position": 30}, {"step": 3})
  assert _same(state, states[3]) and not _same(state, states[2])
  assert state["params"]["w"].sharding == states[3]["params"]["w"].sharding
  assert [Checkpoints(str(tmp_path)).verify(s) for s in (1, 2, 3)] == ["verified"] * 3  # untouched


def _flip(path):
  b = bytearray(open(path, "rb").read())
  i = len(b) // 2
  b[i:i + 16] = bytes(x ^ 0xFF for x in b[i:i + 16])
  open(path, "wb").write(bytes(b))


def test_flipped_bytes_fall_back_to_the_previous_step(tmp_path, caplog):
  states = _save(tmp_path)
  victim = _data_file(tmp_path, 3)
  size = os.path.getsize(victim)
  _flip(victim)
  assert os.path.getsize(victim) == size
  c = Checkpoints(str(tmp_path))
  assert c.verify(3).startswith("damaged: state/ocdbt.process_0/d/")
  with caplog.at_level(logging.INFO, logger=LOGGER):
    step, state, data, _ = c.restore_latest(_abstract(states[3]))
  assert (step, data) == (2, {"position": 20}) and _same(state, states[2])
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.damaged-0"] and c.steps() == [1, 2]
  (line,) = _warnings(caplog)
  assert "step 3 (" in line and os.path.basename(victim) in line and "sha256 mismatch" in line
  assert "set aside as 3.damaged-0" in line and "restored step 2" in line
  # The run writes step 3 again; a second damage of it is set aside next to the first.
  c.save(3, _state(33), {"position": 33}, {"step": 3})
  c.close()
  _flip(_data_file(tmp_path, 3))
  assert Checkpoints(str(tmp_path)).restore_latest(_abstract(states[3]))[0] == 2
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.damaged-0", "3.damaged-1"]


def _truncate(d):
  p = _data_file(d, 3)
  os.truncate(p, os.path.getsize(p) // 2)


def _delete_data(d):
  os.remove(_data_file(d, 3))


def _empty_ocdbt_manifest(d):
  open(f"{d}/3/state/manifest.ocdbt", "w").close()


def _zero_data(d):
  p = _data_file(d, 3)
  open(p, "wb").write(bytes(os.path.getsize(p)))


def _delete_chunk_dir(d):
  shutil.rmtree(f"{d}/3/state/d")


def _corrupt_json_item(d):
  open(f"{d}/3/data/metadata", "w").write("{not json")


def _delete_json_item(d):
  os.remove(f"{d}/3/data/metadata")


def _delete_state_item(d):
  shutil.rmtree(f"{d}/3/state")


def _delete_metadata(d):
  os.remove(f"{d}/3/state/_METADATA")


def _add_file(d):
  open(f"{d}/3/state/stray", "w").write("x")


def _corrupt_checksums(d):
  open(f"{d}/3/{CHECKSUMS}", "w").write("{")


# (damage, fragment of the warning): with the manifest the checksum check names the file.
WITH_MANIFEST = [(_truncate, "bytes, growlm_checksums.json says"), (_delete_data, ": missing"),
                 (_empty_ocdbt_manifest, "state/manifest.ocdbt: 0 bytes"),
                 (_delete_metadata, "state/_METADATA: missing"),  # orbax alone restores this
                 (_add_file, "state/stray: not in growlm_checksums.json"),
                 (_corrupt_checksums, "growlm_checksums.json: unreadable")]
# Without it, orbax/tensorstore's own errors must be recognised as damage (verified table).
WITHOUT_MANIFEST = [(_truncate, "OUT_OF_RANGE"), (_delete_data, "FAILED_PRECONDITION"),
                    (_zero_data, "ValueError: (OUT_OF_RANGE|FAILED_PRECONDITION|DATA_LOSS)"),
                    (_empty_ocdbt_manifest, "DATA_LOSS"), (_delete_chunk_dir, "NOT_FOUND"),
                    (_corrupt_json_item, "JSONDecodeError"),
                    (_delete_json_item, "FileNotFoundError"),
                    (_delete_state_item, 'KeyError: .Item "state" was not found')]


@pytest.mark.parametrize("damage,fragment,manifest",
                         [(d, f, True) for d, f in WITH_MANIFEST]
                         + [(d, f, False) for d, f in WITHOUT_MANIFEST],
                         ids=lambda v: getattr(v, "__name__", None) if callable(v) else None)
def test_damaged_newest_step_falls_back(tmp_path, caplog, damage, fragment, manifest):
  states = _save(tmp_path)
  if not manifest:
    for s in (1, 2, 3):
      os.remove(tmp_path / str(s) / CHECKSUMS)
  damage(str(tmp_path))
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    step, state, data, meta = Checkpoints(str(tmp_path)).restore_latest(_abstract(states[3]))
  assert (step, data, meta) == (2, {"position": 20}, {"step": 2}) and _same(state, states[2])
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "3.damaged-0"]
  (line,) = _warnings(caplog)
  assert "step 3 (" in line and re.search(fragment, line) and "\n" not in line


def test_without_set_aside_damaged_steps_stay_and_several_go_in_one_line(tmp_path, caplog):
  states = _save(tmp_path)
  _flip(_data_file(tmp_path, 3))
  _truncate_2 = _data_file(tmp_path, 2)
  os.truncate(_truncate_2, 10)
  before = _snapshot(tmp_path)
  with caplog.at_level(logging.WARNING, logger=LOGGER):
    step, state, _, _ = Checkpoints(str(tmp_path)).restore_latest(_abstract(states[3]),
                                                                  set_aside=False)
  assert step == 1 and _same(state, states[1]) and _snapshot(tmp_path) == before
  (line,) = _warnings(caplog)
  assert "step 3 (" in line and "step 2 (" in line and "skipped" in line


def test_all_steps_damaged_is_one_line_and_changes_nothing(tmp_path):
  states = _save(tmp_path, steps=(1, 2))
  for s in (1, 2):
    _flip(_data_file(tmp_path, s))
  before = _snapshot(tmp_path)
  with pytest.raises(GrowlmError) as e:
    Checkpoints(str(tmp_path)).restore_latest(_abstract(states[2]))
  msg = str(e.value)
  assert "\n" not in msg and "step 2 (" in msg and "step 1 (" in msg
  assert "nothing was changed" in msg
  assert _snapshot(tmp_path) == before


def _read_error_in_hashing(monkeypatch, victim):
  real = ckpt_files._sha256

  def fake(path):
    if path == victim:
      raise PermissionError(13, "Permission denied", path)
    return real(path)
  monkeypatch.setattr(ckpt_files, "_sha256", fake)


def _restore_raises(exc):
  def patch(monkeypatch, c):
    def fail(*a, **k):
      raise exc
    monkeypatch.setattr(c.manager, "restore", fail)
  return patch


def _tensorstore_error(text):
  """What orbax raises for a tensorstore failure: a bare Exception caused by a ValueError."""
  try:
    try:
      raise ValueError(text)
    except ValueError as inner:
      raise Exception("Encountered error while reading array index: (slice(0, 64, 1),)") from inner
  except Exception as outer:  # pylint: disable=broad-except
    return outer


STOPS = [
    ("hash_permission", True, None, "PermissionError: [Errno 13] Permission denied"),
    ("restore_eio", False, _restore_raises(OSError(5, "Input/output error")),
     "OSError: [Errno 5] Input/output error"),
    ("restore_enospc", False, _restore_raises(OSError(28, "No space left on device")),
     "No space left on device"),
    ("restore_tensorstore_permission", False, _restore_raises(_tensorstore_error(
        'PERMISSION_DENIED: Error reading "params.w/0.0" in OCDBT database: Failed to open: '
        '"x/d/abc": Permission denied [os_error_code=\'13\']')), "ValueError: PERMISSION_DENIED"),
    ("restore_unrecognised", False, _restore_raises(RuntimeError("something new")),
     "RuntimeError: something new"),
    ("restore_shape_mismatch", False, _restore_raises(ValueError(
        "Requested shape: (64, 32) is not compatible with the stored shape: (64, 96).")),
     "is not compatible"),
]


@pytest.mark.parametrize("name,manifest,patch,fragment", STOPS, ids=[s[0] for s in STOPS])
def test_read_errors_stop_with_one_line_and_rename_nothing(tmp_path, monkeypatch, name, manifest,
                                                           patch, fragment):
  states = _save(tmp_path)
  if not manifest:
    for s in (1, 2, 3):
      os.remove(tmp_path / str(s) / CHECKSUMS)
  before = _snapshot(tmp_path)
  c = Checkpoints(str(tmp_path))
  if patch is None:
    _read_error_in_hashing(monkeypatch, _data_file(tmp_path, 3))
  else:
    patch(monkeypatch, c)
  with pytest.raises(GrowlmError) as e:
    c.restore_latest(_abstract(states[3]))
  msg = str(e.value)
  assert msg.startswith(f"cannot read checkpoint step 3 in {tmp_path} (") and "\n" not in msg
  assert fragment in msg and "nothing was changed; fix the cause and relaunch" in msg
  assert _snapshot(tmp_path) == before and c.steps() == [1, 2, 3]


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv"),
                    reason="needs root and setpriv to drop the capability that bypasses chmod")
def test_really_unreadable_file_and_dir_stop(tmp_path):
  """chmod 000 without CAP_DAC_OVERRIDE (root ignores file modes otherwise)."""
  _save(tmp_path)
  os.chmod(_data_file(tmp_path, 3), 0)
  os.chmod(tmp_path / "2" / "state", 0)  # orbax alone calls an unreadable dir "not found"
  os.remove(tmp_path / "2" / CHECKSUMS)
  script = f"""
import sys; sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
import shutil
import test_checkpoint as t
from growlm.train.checkpoint import Checkpoints
from growlm.errors import GrowlmError
for _ in range(2):
  try:
    Checkpoints({str(tmp_path)!r}).restore_latest(t._abstract(t._state(3)))
  except GrowlmError as e:
    print(e)
  shutil.move({str(tmp_path / "3")!r}, {str(tmp_path / "moved3")!r})  # then try step 2
"""
  out = subprocess.run(["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
                        sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
  lines = [l for l in out.stdout.splitlines() if l.startswith("cannot read")]
  assert len(lines) == 2, out.stdout + out.stderr[-3000:]
  assert "step 3" in lines[0] and "PermissionError" in lines[0]
  assert "step 2" in lines[1] and "PermissionError" in lines[1]
  assert sorted(os.listdir(tmp_path)) == ["1", "2", "moved3"]  # nothing set aside


def test_steps_without_checksums_restore_unverified(tmp_path, caplog):
  states = _save(tmp_path)
  for s in (1, 2, 3):
    os.remove(tmp_path / str(s) / CHECKSUMS)
  c = Checkpoints(str(tmp_path))
  assert c.verify(3) == "unverified"
  with caplog.at_level(logging.INFO, logger=LOGGER):
    step, state, _, _ = c.restore_latest(_abstract(states[3]))
  assert step == 3 and _same(state, states[3]) and sorted(os.listdir(tmp_path)) == ["1", "2", "3"]
  assert not _warnings(caplog)
  assert any("step 3" in r.getMessage() and "unverified" in r.getMessage()
             for r in caplog.records if r.name == LOGGER and r.levelno == logging.INFO)


@pytest.mark.parametrize("abandon", [False, True])
def test_save_then_close_finalises_and_checksums(tmp_path, abandon):
  c = Checkpoints(str(tmp_path), async_save=True)
  c.save(5, _state(5), {"position": 50}, {"step": 5})
  c.close(abandon=abandon)
  c.close()
  c.close(abandon=True)
  assert sorted(os.listdir(tmp_path)) == ["5"]
  assert Checkpoints(str(tmp_path)).verify(5) == "verified"
  with pytest.raises(RuntimeError, match="is closed"):
    c.save(6, _state(6), {}, {})


@pytest.mark.parametrize("abandon", [False, True])
def test_a_failed_save_is_one_line_and_leaves_no_tmp_dir(tmp_path, monkeypatch, caplog, abandon):
  c = Checkpoints(str(tmp_path), async_save=True)
  c.save(1, _state(1), {}, {})
  c.save(2, _state(2), {}, {})
  real, calls = c.manager.wait_until_finished, []

  def fail_once():
    real()
    if not calls:  # what a full disk leaves: the step never renamed from its tmp dir
      calls.append(1)
      os.rename(tmp_path / "2", tmp_path / "2.orbax-checkpoint-tmp")
      raise OSError(28, "No space left on device")
  monkeypatch.setattr(c.manager, "wait_until_finished", fail_once)
  if abandon:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
      c.close(abandon=True)  # an error is already on its way out: never raise over it
    (line,) = _warnings(caplog)
    assert "[2]" in line and "No space left on device" in line
  else:
    with pytest.raises(GrowlmError) as e:
      c.close()
    assert str(e.value) == (f"checkpoint step 2 was not written to {tmp_path} (OSError: [Errno 28] "
                            "No space left on device); fix the cause and relaunch")
  c.close()
  assert sorted(os.listdir(tmp_path)) == ["1"]
  assert Checkpoints(str(tmp_path)).verify(1) == "verified"


def test_close_after_the_manager_was_closed(tmp_path):
  c = Checkpoints(str(tmp_path), async_save=True)
  c.save(1, _state(1), {}, {})
  c.manager.close()  # finalises; our close must still checksum and not fail
  c.close()
  assert Checkpoints(str(tmp_path)).verify(1) == "verified"


def test_leftover_tmp_dirs_are_left_by_readers_and_removed_by_the_first_save(tmp_path):
  states = _save(tmp_path, steps=(1,))
  leftover = tmp_path / "7.orbax-checkpoint-tmp"  # what a killed async save leaves
  (leftover / "state.orbax-checkpoint-tmp").mkdir(parents=True)
  reader = Checkpoints(str(tmp_path))
  assert reader.steps() == [1] and reader.restore_latest(_abstract(states[1]))[0] == 1
  reader.close()
  assert leftover.exists()
  writer = Checkpoints(str(tmp_path))
  writer.save(2, _state(2), {}, {})
  writer.close()
  assert sorted(os.listdir(tmp_path)) == ["1", "2"]


def test_classification_of_recorded_errors():
  damage = [_tensorstore_error('OUT_OF_RANGE: Error reading "params.w/0.0": Requested byte range'),
            _tensorstore_error("DATA_LOSS: Error decoding manifest: Encoded length (0)"),
            _tensorstore_error("FAILED_PRECONDITION: ZSTD_decompressStream() failed: Data "
                               "corruption detected"),
            _tensorstore_error("NOT_FOUND: Error reading byte range [os_error_code='2']"),
            FileNotFoundError("File /x/3/data/metadata not found."),
            json.JSONDecodeError("Expecting value", "", 0)]
  stop = [PermissionError(13, "Permission denied"), OSError(5, "Input/output error"),
          TimeoutError("barrier"), RuntimeError("new"),
          _tensorstore_error("UNAVAILABLE: Failed to open [os_error_code='5']"),
          _tensorstore_error("FAILED_PRECONDITION: Error opening zarr: metadata mismatch"),
          ValueError("User-provided restore item and on-disk value metadata tree structures do "
                     "not match")]
  assert [ckpt_lib.is_damage(e) for e in damage] == [True] * len(damage)
  assert [ckpt_lib.is_damage(e) for e in stop] == [False] * len(stop)
  assert ckpt_lib.describe(damage[0]).startswith("ValueError: OUT_OF_RANGE")
