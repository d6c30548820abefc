"""A run is never lost and never hangs: signals save and resume, divergence always exits, the
history in metrics.jsonl holds each step once, and a run dir without its config.json is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from conftest import REPO, run_config, user_env
from growlm import commands
from growlm.errors import EXIT_PEER_LOST, EXIT_PREEMPTED, GrowlmError
from growlm.rundir import read_metrics

LONG = ["--config=configs/default.py:size=nano,runlocal", "--config.train.num_steps=5000",
        "--config.checkpoint.every_steps=1000", "--config.eval.every_steps=1000",
        "--config.log.every_steps=1", "--config.log.progress_bar=False"]
EXIT_BOUND_S = 60   # from the signal to the process's exit, checkpoint written and final


def _env():
  return user_env()


def _start(args):
  return subprocess.Popen([sys.executable, "-m", "growlm.main", *args], cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_steps(workdir, n, procs, timeout=240):
  """Waits until metrics.jsonl has `n` train lines (the run is in its loop)."""
  path = os.path.join(workdir, "metrics.jsonl")
  t0 = time.time()
  while time.time() - t0 < timeout:
    if any(p.poll() is not None for p in procs):
      raise AssertionError("run ended early: " + procs[0].communicate()[1][-2000:])
    if sum("train_loss" in r for r in read_metrics(path)) >= n:
      return
    time.sleep(0.2)
  raise AssertionError(f"no {n} train lines in {timeout} s")


def _growlm_lines(stderr):
  return [l for l in stderr.splitlines() if l.startswith("growlm:")]


def _steps(workdir, key):
  return [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if key in r]


def _no_leftovers(workdir):
  ckpts = os.path.join(workdir, "checkpoints")
  return not [n for n in os.listdir(ckpts) if "tmp" in n]


def _stop_with(sig, procs, victim):
  t0 = time.time()
  procs[victim].send_signal(sig)
  outs = [p.communicate(timeout=EXIT_BOUND_S) for p in procs]
  return time.time() - t0, outs


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_signal_saves_the_current_step_and_a_relaunch_resumes(tmp_path, sig):
  workdir = str(tmp_path / "run")
  proc = _start([*LONG, f"--workdir={workdir}"])
  _wait_for_steps(workdir, 12, [proc])
  elapsed, [(_, err)] = _stop_with(sig, [proc], 0)
  assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
  assert "Traceback" not in err and "KeyboardInterrupt" not in err
  stopped = [l for l in _growlm_lines(err) if l.startswith("growlm: stopped:")]
  assert len(stopped) == 1 and signal.Signals(sig).name in stopped[0], err[-2000:]
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  train_steps = _steps(workdir, "train_loss")
  # Nothing lost beyond the current step: the checkpoint is the last step logged.
  assert saved == [train_steps[-1]] and saved[0] >= 12, (saved, train_steps[-3:])
  assert _no_leftovers(workdir) and elapsed < EXIT_BOUND_S
  if sig != signal.SIGTERM:
    return
  # The relaunch resumes there; the history reads as one uninterrupted run.
  s = saved[0]
  done = subprocess.run([sys.executable, "-m", "growlm.main", *LONG, f"--workdir={workdir}",
                         f"--config.train.stop_at={s + 4}"], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert _steps(workdir, "train_loss") == list(range(1, s + 5))
  assert _steps(workdir, "eval_loss/heldout") == [0]   # stop_at ends without an eval


def _catches(pid, sig):
  """Whether process `pid` has a handler for `sig` (Linux: SigCgt in /proc/PID/status)."""
  with open(f"/proc/{pid}/status") as f:
    mask = next(int(l.split()[1], 16) for l in f if l.startswith("SigCgt:"))
  return bool(mask >> (sig - 1) & 1)


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc/PID/status")
def test_a_signal_during_start_up_is_one_line_exit_75_and_a_relaunch_trains(tmp_path):
  """SIGTERM as soon as growlm.main watches for it (its first line; JAX is imported after, the
  trainer's own handlers come seconds later): one line and exit 75, as for a later SIGTERM, where
  it used to die silently with 143; nothing is written, and the same command then trains."""
  workdir = str(tmp_path / "run")
  args = ["--config=configs/default.py:size=nano,runlocal", "--config.train.num_steps=3",
          "--config.train.warmup_steps=1", "--config.log.every_steps=1",
          "--config.log.progress_bar=False", f"--workdir={workdir}"]
  proc, t0 = _start(args), time.time()
  while not _catches(proc.pid, signal.SIGTERM):
    assert proc.poll() is None and time.time() - t0 < 60, proc.communicate()[1][-2000:]
    time.sleep(0.002)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=EXIT_BOUND_S)
  assert proc.returncode == EXIT_PREEMPTED, err[-2000:]
  assert "Traceback" not in err and _growlm_lines(err) == [
      "growlm: stopped: SIGTERM before the first step: nothing was written or lost; relaunch the "
      "same command to resume"], err[-2000:]
  assert not os.path.exists(workdir)
  done = subprocess.run([sys.executable, "-m", "growlm.main", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert _steps(workdir, "train_loss") == [1, 2, 3]
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["3"]


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two(workdir, extra=()):
  port = _free_port()
  return [_start([*LONG, f"--workdir={workdir}", "--config.mesh.data=2", "--config.mesh.fsdp=2",
                  f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
                  f"--process_id={i}", "--cpu_devices=2", *extra]) for i in range(2)]


@pytest.mark.slow
def test_two_processes_agree_on_the_stop_step(tmp_path):
  """SIGINT to process 0 (passed on as SIGTERM to JAX's preemption service, which agrees on a
  step with process 1): both save the same step, exit 75, and a 2-process relaunch resumes."""
  workdir = str(tmp_path / "run")
  procs = _two(workdir)
  _wait_for_steps(workdir, 10, procs)
  elapsed, outs = _stop_with(signal.SIGINT, procs, 0)
  assert [p.returncode for p in procs] == [EXIT_PREEMPTED] * 2, outs[0][1][-2000:]
  lines = [[l for l in _growlm_lines(err) if l.startswith("growlm: stopped:")] for _, err in outs]
  assert all(len(l) == 1 for l in lines), lines
  # Process 0 names the signal it got; process 1 learnt of it as JAX's preemption notice.
  assert lines[0][0].startswith("growlm: stopped: SIGINT at step "), lines
  assert lines[0][0].split(" at ")[1] == lines[1][0].split(" at ")[1], lines   # the same step
  saved = sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit())
  assert len(saved) == 1 and f"step {saved[0]}:" in lines[0][0] and elapsed < EXIT_BOUND_S
  assert _steps(workdir, "train_loss")[-1] == saved[0]
  procs = _two(workdir, [f"--config.train.stop_at={saved[0] + 3}"])
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
  assert _steps(workdir, "train_loss") == list(range(1, saved[0] + 4))


def test_a_process_killed_mid_run_ends_the_other_in_one_line_and_a_relaunch_resumes(tmp_path):
  """SIGKILL to process 1 in its loop (async checkpoints every 5 steps): process 0's next
  collective fails and it exits 4 with one line, abandoning the save in flight. (Before: it
  waited in orbax's commit barrier until JAX's heartbeat timeout, about 100 s, then aborted
  with a native stack dump, exit 134.) A 2-process relaunch resumes from the newest complete
  step, the unfinished save is removed, and metrics.jsonl holds every step once."""
  workdir = str(tmp_path / "run")
  every = ["--config.checkpoint.every_steps=5"]
  procs = _two(workdir, every)
  _wait_for_steps(workdir, 12, procs)
  procs[1].kill()
  _, err = procs[0].communicate(timeout=300)
  procs[1].communicate()
  assert procs[0].returncode == EXIT_PEER_LOST, err[-3000:]
  assert "Traceback" not in err and "Check failure" not in err, err[-3000:]
  [line] = _growlm_lines(err)
  assert line.startswith("growlm: error: process 0 of 2: a collective failed ("), line
  assert line.endswith("relaunch every process to resume from the last complete checkpoint")
  saved = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  last = max(saved)
  procs = _two(workdir, [*every, f"--config.train.stop_at={last + 3}"])
  for p in procs:
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-2000:]
  assert _no_leftovers(workdir)
  assert _steps(workdir, "train_loss") == list(range(1, last + 4))


DIVERGE = {"train.lr": 1e4, "train.warmup_steps": 0, "train.grad_clip": 0.0,
           "train.num_steps": 40, "checkpoint.every_steps": 1, "checkpoint.async_save": True,
           "log.every_steps": 1, "eval.every_steps": 100, "eval.batches": 1,
           "data.max_bytes": 300_000}


@pytest.mark.slow
def test_divergence_exits_cleanly_twenty_times_in_a_row(tmp_path):
  """Diverging with an async save in flight, 20 times in one process: each time the error comes
  out, every checkpoint is final (no *tmp* left), and the process then exits (orbax threads left
  running would keep the interpreter alive: that was the hang)."""
  script = textwrap.dedent(f"""
      import json, os, sys
      sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]
      import jax
      # The 20 runs compile the same programs: a compilation cache keeps each run to seconds.
      jax.config.update("jax_compilation_cache_dir", {str(tmp_path / 'xla-cache')!r})
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
      from conftest import run_config
      from growlm import commands
      out = []
      for i in range(20):
        d = os.path.join({str(tmp_path)!r}, str(i))
        try:
          commands.train(run_config(**{DIVERGE!r}), d)
          out.append("finished")
        except FloatingPointError as e:
          names = os.listdir(os.path.join(d, "checkpoints"))
          out.append("diverged" if not [n for n in names if "tmp" in n] else "leftover")
      print(json.dumps(out))
  """)
  t0 = time.time()
  r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-2000:]
  assert json.loads(r.stdout.strip().splitlines()[-1]) == ["diverged"] * 20
  print(f"20 divergences in one process, then exit: {time.time() - t0:.1f} s")


def test_divergence_on_the_command_line_is_one_line_and_exit_3(tmp_path):
  args = ["--config=configs/default.py:size=nano,runlocal", f"--workdir={tmp_path}/run",
          "--config.log.progress_bar=False"] + [f"--config.{k}={v}" for k, v in DIVERGE.items()]
  r = subprocess.run([sys.executable, "-m", "growlm.main", *args], cwd=REPO, env=_env(),
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 3 and "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = _growlm_lines(r.stderr)
  assert len(lines) == 1 and lines[0].startswith("growlm: diverged: non-finite metrics at step")
  assert _no_leftovers(str(tmp_path / "run"))


def test_killed_before_the_first_checkpoint_logs_step_zero_once(tmp_path):
  """A start that never reached a checkpoint leaves no history behind: the relaunch's step-0
  eval is the only one (it used to be appended again at every relaunch)."""
  c = run_config(**{"train.num_steps": 6, "checkpoint.every_steps": 100})
  path = tmp_path / "metrics.jsonl"
  tmp_path.mkdir(exist_ok=True)
  path.write_text(json.dumps({"step": 0, "tokens": 0, "flops": 0.0, "eval_loss/heldout": 9.0})
                  + "\n")
  commands.train(c, str(tmp_path))
  evals = _steps(str(tmp_path), "eval_loss/heldout")
  assert evals == [0, 6] and 9.0 not in [r.get("eval_loss/heldout") for r in read_metrics(path)]


def test_a_grown_run_dir_resumed_at_step_zero_logs_step_zero_once(tmp_path):
  """The grow command writes step 0 (growth line, eval, checkpoint 0); training it on must not
  log step 0 again."""
  src = tmp_path / "src"
  commands.train(run_config(**{"train.num_steps": 4, "train.warmup_steps": 1}), str(src))
  target = {"model.d_model": 128, "model.n_heads": 4, "train.num_steps": 4, "train.warmup_steps": 1}
  commands.grow_into(run_config(**target), str(src), str(tmp_path / "grown"))
  commands.train(run_config(**target), str(tmp_path / "grown"))
  rows = read_metrics(str(tmp_path / "grown" / "metrics.jsonl"))
  assert [r["step"] for r in rows if "eval_loss/heldout" in r] == [0, 4]
  assert [r["step"] for r in rows if r.get("event") == "growth"] == [0]


@pytest.fixture(scope="module")
def four_steps(tmp_path_factory):
  """A finished 4-step run dir, trained once; tests copy it."""
  d = tmp_path_factory.mktemp("four") / "run"
  commands.train(run_config(**{"train.num_steps": 4, "train.warmup_steps": 1}), str(d))
  return d


def _copy(run, tmp_path):
  shutil.copytree(run, tmp_path, dirs_exist_ok=True)
  return tmp_path


def test_resuming_needs_the_run_dirs_config(tmp_path, four_steps):
  """config.json deleted: a relaunch with another learning rate used to resume silently."""
  _copy(four_steps, tmp_path)
  os.remove(tmp_path / "config.json")
  before = sorted(os.listdir(tmp_path))
  with pytest.raises(GrowlmError, match="no config.json") as e:
    commands.train(run_config(**{"train.num_steps": 8, "train.warmup_steps": 1,
                                 "train.lr": 1e-3}), str(tmp_path))
  assert "\n" not in str(e.value) and sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("content", [b"\x00\xff\x00garbage\n{}\n", b"[1, 2]\n{\"step\": 1}\n",
                                     b"not json\n{\"step\": 1}\n"])
def test_a_metrics_file_that_is_not_a_history_is_refused(tmp_path, content, four_steps):
  _copy(four_steps, tmp_path)
  (tmp_path / "metrics.jsonl").write_bytes(content)
  with pytest.raises(GrowlmError, match="metrics") as e:
    commands.train(run_config(**{"train.num_steps": 8, "train.warmup_steps": 1}), str(tmp_path))
  assert "\n" not in str(e.value)
  assert (tmp_path / "metrics.jsonl").read_bytes() == content   # left as it was


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, four_steps):
  _copy(four_steps, tmp_path)
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 4, "train_lo')            # a crash mid-write
  commands.train(run_config(**{"train.num_steps": 6, "train.warmup_steps": 1}), str(tmp_path))
  assert _steps(str(tmp_path), "train_loss")[-2:] == [5, 6]


def test_a_full_disk_is_one_line_and_leaves_a_resumable_run(tmp_path):
  """ENOSPC while writing metrics (simulated: the sandbox cannot fill a real disk) ends the
  command with one line and exit 2; checkpoints written before it are final, so the run
  resumes once there is room."""
  workdir = tmp_path / "run"
  script = textwrap.dedent(f"""
      import errno, sys
      sys.argv = ["growlm.main", "--config=configs/default.py:size=nano,runlocal",
                  "--workdir={workdir}", "--config.train.num_steps=12",
                  "--config.checkpoint.every_steps=4", "--config.log.every_steps=1",
                  "--config.log.progress_bar=False"]
      from growlm.train import metrics
      write = metrics.MetricsWriter.write
      def full(self, rec):
        if rec.get("step", 0) >= 7:
          raise OSError(errno.ENOSPC, "No space left on device", "{workdir}/metrics.jsonl")
        write(self, rec)
      metrics.MetricsWriter.write = full
      from growlm.cli import train
      train.run()
  """)
  r = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(), capture_output=True,
                     text=True, timeout=300)
  assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
  lines = _growlm_lines(r.stderr)
  assert len(lines) == 1 and "No space left on device" in lines[0], lines
  assert _no_leftovers(str(workdir))
  assert sorted(n for n in os.listdir(workdir / "checkpoints") if n.isdigit()) == ["4"]
  assert not (workdir / ".growlm-lock.json").exists()   # the lease was released
  done = subprocess.run([sys.executable, "-m", "growlm.main", "--config=configs/default.py:"
                         "size=nano,runlocal", f"--workdir={workdir}",
                         "--config.train.num_steps=12", "--config.checkpoint.every_steps=4",
                         "--config.log.every_steps=1", "--config.log.progress_bar=False"],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert _steps(str(workdir), "train_loss") == list(range(1, 13))
