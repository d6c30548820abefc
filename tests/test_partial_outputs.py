"""Outputs built under OUT.partial (the grow command's run dir, an HF export): what an
interrupted command left there is cleared, anything else there is kept, and a second launch to
the same output is refused without touching the first one's work (growlm.lock.clear_leftover,
remove_unless_live)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from conftest import run_config
from growlm import commands
from growlm import lock as lock_lib
from growlm.errors import GrowlmError

FIELDS = {"train.num_steps": 2, "train.warmup_steps": 1, "eval.batches": 1,
          "data.max_bytes": 200_000}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  """A nano run at step 0 (its checkpoint and config.json), written as the grow command does."""
  run = str(tmp_path_factory.mktemp("src") / "run")
  commands.train(run_config(**FIELDS), run, stop_after_init=True)
  return run


def _target():
  return run_config(**FIELDS, **{"model.n_layers": 3})


def _dead_pid() -> int:
  p = subprocess.Popen([sys.executable, "-c", "pass"])
  p.wait()
  return p.pid


def _lease(pid: int, heartbeat_age_s: float = 0.0) -> str:
  now = time.time() - heartbeat_age_s
  return json.dumps({"host": lock_lib.HOST, "pid": pid, "pid_space": lock_lib.PID_SPACE,
                     "token": "0123abcd", "started": now, "heartbeat": now, "command": "test"})


def _leftover(partial: str, pid: int) -> None:
  """What a grow killed while writing leaves: its lease and part of a run dir."""
  os.makedirs(os.path.join(partial, "checkpoints", "0"))
  with open(os.path.join(partial, "checkpoints", "0", "half-written"), "w") as f:
    f.write("x")
  with open(lock_lib.lease_path(partial), "w") as f:
    f.write(_lease(pid))


def test_grow_clears_what_an_interrupted_grow_left(source, tmp_path):
  out = str(tmp_path / "grown")
  _leftover(out + ".partial", _dead_pid())
  commands.grow_into(_target(), source, out)
  assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["0"]
  assert not os.path.exists(os.path.join(out, lock_lib.LEASE))
  assert not os.path.exists(out + ".partial")


@pytest.mark.parametrize("what", ["foreign", "live"])
def test_grow_keeps_a_partial_it_may_not_remove(source, tmp_path, what):
  """A directory at OUT.partial with no lease is someone's own; one whose lease is live is
  another grow's work in progress. Either is refused before any growth and left as it was."""
  out, partial = str(tmp_path / "grown"), str(tmp_path / "grown.partial")
  if what == "foreign":
    os.makedirs(partial)
    with open(os.path.join(partial, "notes.txt"), "w") as f:
      f.write("mine")
  else:
    _leftover(partial, os.getpid())   # this process: alive, heartbeat fresh
  before = sorted(os.walk(partial))
  with pytest.raises(GrowlmError, match="move it away" if what == "foreign" else "in use by pid"):
    commands.grow_into(_target(), source, out)
  assert sorted(os.walk(partial)) == before and not os.path.exists(out)


def test_a_refused_second_grow_leaves_the_first_ones_output(source, tmp_path, monkeypatch):
  """Two grows into one --out: the one refused the lease (here: the trainer finds it held)
  must not delete the directory the holder is writing."""
  out, partial = str(tmp_path / "grown"), str(tmp_path / "grown.partial")
  holder = lock_lib.RunLock(partial)

  def refused(config, workdir, **kw):
    del config, kw
    holder.acquire()   # the other launch takes the lease while this one grows
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write("{}")
    raise GrowlmError(f"run dir {workdir} is in use by another launch")

  monkeypatch.setattr(commands, "train", refused)
  try:
    with pytest.raises(GrowlmError, match="in use"):
      commands.grow_into(_target(), source, out)
    assert sorted(os.listdir(partial)) == [lock_lib.LEASE, "config.json"]
  finally:
    holder.release()


def test_a_grow_that_finishes_second_discards_its_result(source, tmp_path, monkeypatch):
  out = tmp_path / "grown"
  real = commands.train

  def other_finishes_first(config, workdir, **kw):
    summary = real(config, workdir, **kw)
    (out / "checkpoints").mkdir(parents=True)   # the other launch renamed its output first
    return summary

  monkeypatch.setattr(commands, "train", other_finishes_first)
  with pytest.raises(GrowlmError, match="written by another launch"):
    commands.grow_into(_target(), source, str(out))
  assert os.listdir(out) == ["checkpoints"] and not os.listdir(out / "checkpoints")
  assert not os.path.exists(str(out) + ".partial")


def test_export_clears_a_leftover_and_keeps_anything_else(source, tmp_path):
  out = str(tmp_path / "hf")
  with open(out + ".partial", "w") as f:   # a file where the export builds its directory
    f.write("mine")
  with pytest.raises(GrowlmError, match="move it away"):
    commands.export_run(source, out)
  assert open(out + ".partial").read() == "mine" and not os.path.exists(out)
  os.remove(out + ".partial")
  os.makedirs(out + ".partial")
  with open(os.path.join(out + ".partial", "model.safetensors"), "w") as f:
    f.write("half")
  with open(lock_lib.lease_path(out + ".partial"), "w") as f:
    f.write(_lease(os.getpid(), heartbeat_age_s=3600))   # an export that stopped an hour ago
  commands.export_run(source, out)
  assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
  assert os.path.getsize(os.path.join(out, "model.safetensors")) > 1000
  assert not os.path.exists(out + ".partial")
