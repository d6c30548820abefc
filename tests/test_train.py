"""The trainer: sharded steps, gradient accumulation, resume, mesh changes, run dir, errors."""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import DATASETS, REPO, run_config, user_env
from growlm import commands, fs, rundir
from growlm.config.typed import resolve
from growlm.model import flops
from growlm.model import decoder as model
from growlm import optim
from growlm import sharding
from growlm.train import trainer as train
from growlm.train import state as state_lib
from growlm.errors import GrowlmError
from growlm.rundir import read_metrics
from growlm.model.config import make_model_config



_config = run_config


def _step_setup(cfg, mesh_shape, train_cfg, grad_accum=1):
  mesh = sharding.make_mesh(mesh_shape)
  rules = sharding.DEFAULT_RULES
  schedule = optim.make_schedule(1e-2, 2, 10)
  opt = optim.make_optimizer(train_cfg, schedule)
  abstract, shard = state_lib.state_shardings(cfg, opt, mesh, rules)
  bs = sharding.batch_sharding(mesh, rules)
  with jax.set_mesh(mesh):
    state = state_lib.init_state(cfg, opt, shard, seed=0)
  step = jax.jit(train.make_train_step(cfg, opt, schedule, grad_accum),
                 in_shardings=(shard, bs), out_shardings=(shard, None))
  return mesh, state, step, bs


def _batches(cfg, n, B=8, L=16):
  rng = np.random.default_rng(0)
  return [{"inputs": rng.integers(0, cfg.vocab_size, (B, L)).astype(np.int32),
           "targets": rng.integers(0, cfg.vocab_size, (B, L)).astype(np.int32)}
          for _ in range(n)]


def _run_steps(mesh, state, step, bs, batches):
  losses = []
  with jax.set_mesh(mesh):
    for b in batches:
      state, m = step(state, jax.device_put(b, bs))
      losses.append(float(m["train_loss"]))
  return state, losses


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_sharded_steps_match_single_device(style, n_devices):
  """Three AdamW steps on a 2x2x2 (data, fsdp, tensor) mesh equal one-device steps."""
  assert n_devices == 8
  cfg = make_model_config("nano", style, n_heads=4, n_kv_heads=2)
  tc = _config().train
  batches = _batches(cfg, 3)
  s1, l1 = _run_steps(*_step_setup(cfg, {"data": 1, "fsdp": 1, "tensor": 1}, tc), batches)
  mesh8, st8, step8, bs8 = _step_setup(cfg, {"data": 2, "fsdp": 2, "tensor": 2}, tc)
  # The parameters really are split over fsdp and tensor.
  q = st8.params["layers"]["attn"]["query"]
  assert q.sharding.spec[1:3] == ("fsdp", "tensor")
  assert q.addressable_shards[0].data.size == q.size // 4
  s8, l8 = _run_steps(mesh8, st8, step8, bs8, batches)
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  _assert_params_close(s8.params, s1.params)


def _assert_params_close(got, want):
  """Each parameter agrees to 1e-5 relative, in Frobenius norm: Adam divides by sqrt(v), so an
  element whose gradient is near zero turns rounding-order noise into a visible step, and an
  elementwise comparison would measure that noise, not the sharding. The key bias is checked
  apart: softmax is shift invariant, so its gradient is exactly zero in exact arithmetic and all
  of its Adam steps are such noise (it must stay tiny and finite)."""
  flat_w = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, a in jax.tree_util.tree_leaves_with_path(got):
    a, b = np.asarray(a, np.float64), np.asarray(flat_w[path], np.float64)
    if path[-1].key == "key_bias":
      assert np.abs(a).max() < 1e-2 and np.isfinite(a).all()
      continue
    rel = np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12)
    assert rel < 1e-5, (jax.tree_util.keystr(path), rel)


def test_grad_accumulation_matches_full_batch():
  cfg = make_model_config("nano", "gpt2")
  tc = _config().train
  batches = _batches(cfg, 2)
  s1, l1 = _run_steps(*_step_setup(cfg, {"data": 1}, tc, grad_accum=1), batches)
  s4, l4 = _run_steps(*_step_setup(cfg, {"data": 1}, tc, grad_accum=4), batches)
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  _assert_params_close(s4.params, s1.params)


def test_schedule_warmup_and_decay():
  s = optim.make_schedule(1.0, 10, 110, "cosine", 0.1)
  assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5)
  assert float(s(10)) == pytest.approx(1.0)
  assert float(s(60)) == pytest.approx(0.55, abs=1e-3)
  assert float(s(110)) == pytest.approx(0.1, abs=1e-6)
  lin = optim.make_schedule(1.0, 0, 100, "linear", 0.0)
  assert float(lin(50)) == pytest.approx(0.5, abs=1e-6)


def test_no_weight_decay_on_norms_and_biases():
  cfg = make_model_config("nano", "gpt2")
  mask = optim.decay_mask(model.init_params(cfg, jax.random.key(0)))
  assert mask["layers"]["attn"]["query"] and mask["embed"]
  assert not mask["layers"]["attn"]["query_bias"] and not mask["final_norm"]["scale"]
  assert not mask["layers"]["mlp_norm"]["bias"] and not mask["layers"]["mlp"]["wo_bias"]


def _train_lines(path):
  return [r for r in read_metrics(path) if "train_loss" in r]


def test_run_dir_contents_and_flops(tmp_path):
  c = _config()
  out = commands.train(c, str(tmp_path))
  for name in ("config.json", "data_manifest.json", "metrics.jsonl"):
    assert (tmp_path / name).exists()
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["10", "20"]
  rows = read_metrics(str(tmp_path / "metrics.jsonl"))
  lines = _train_lines(str(tmp_path / "metrics.jsonl"))
  for key in ("step", "tokens", "flops", "train_loss", "lr", "grad_norm", "tokens_per_sec"):
    assert key in lines[-1]
  fpt = flops.flops_per_token(resolve(c).model, c.data.seq_len)
  last = lines[-1]
  assert last["tokens"] == last["step"] * c.data.batch_size * c.data.seq_len
  assert last["flops"] == pytest.approx(last["tokens"] * fpt)
  evals = [r for r in rows if "eval_loss/heldout" in r]
  assert [r["step"] for r in evals] == [0, 10, 20]
  assert evals[-1]["eval_loss/heldout"] < evals[0]["eval_loss/heldout"]
  assert out["step"] == 20
  saved = json.loads((tmp_path / "config.json").read_text())
  assert saved["model"]["d_model"] == c.model.d_model


def test_resume_gives_the_same_losses(tmp_path):
  """Stopped at step 10 and relaunched, a run logs what an uninterrupted run logs."""
  c = _config(**{"log.every_steps": 1})
  assert "eval_step" not in commands.train(c, str(tmp_path / "full"))
  stop = _config(**{"log.every_steps": 1, "train.stop_at": 10})
  assert "eval_step" not in commands.train(stop, str(tmp_path / "resumed"))   # evals every 10
  # Stopped between evals: the summary's eval is step 0's, and says so.
  early = commands.train(_config(**{"train.stop_at": 7}), str(tmp_path / "early"))
  assert (early["step"], early["eval_step"]) == (7, 0)
  assert max(r["step"] for r in _train_lines(str(tmp_path / "resumed" / "metrics.jsonl"))) == 10
  commands.train(c, str(tmp_path / "resumed"))
  full = _train_lines(str(tmp_path / "full" / "metrics.jsonl"))
  resumed = _train_lines(str(tmp_path / "resumed" / "metrics.jsonl"))
  assert [r["step"] for r in resumed] == list(range(1, 21))
  assert [r["train_loss"] for r in resumed] == [r["train_loss"] for r in full]
  # Each line's throughput counts the steps finished since the line before: one per line here,
  # the eval steps (10, 20) included, where a step dispatched but not yet read was counted.
  assert all(r["tokens_per_sec"] > 0 for r in full + resumed), [
      (r["step"], r["tokens_per_sec"]) for r in full + resumed if not r["tokens_per_sec"] > 0]
  # Wall-clock carries on across the relaunch (the second launch starts from the first's).
  wall = [r["wall_seconds"] for r in resumed]
  assert all(w > 0 for w in wall) and wall == sorted(wall)
  assert all(r["flops_with_source"] == r["flops"] for r in resumed)   # a scratch run


def test_restore_onto_another_mesh(tmp_path):
  """A checkpoint written on a (2, 2, 2) mesh resumes on (8, 1, 1) with matching losses."""
  base = {"log.every_steps": 1, "model.n_heads": 4, "model.head_dim": 16,
          "mesh": {"data": 2, "fsdp": 2, "tensor": 2}}
  commands.train(_config(**base), str(tmp_path / "ref"))
  commands.train(_config(**{**base, "train.stop_at": 10}), str(tmp_path / "moved"))
  # The mesh is not part of the computation, so a resumed run may change it.
  moved = _config(**{**base, "mesh": {"data": 8, "fsdp": 1, "tensor": 1}})
  commands.train(moved, str(tmp_path / "moved"))
  ref = _train_lines(str(tmp_path / "ref" / "metrics.jsonl"))
  got = _train_lines(str(tmp_path / "moved" / "metrics.jsonl"))
  np.testing.assert_allclose([r["train_loss"] for r in got], [r["train_loss"] for r in ref],
                             rtol=1e-5)


def test_resume_refuses_another_config(tmp_path):
  commands.train(_config(**{"train.stop_at": 10}), str(tmp_path))
  with pytest.raises(GrowlmError, match="model.d_model") as e:
    commands.train(_config(**{"model.d_model": 96}), str(tmp_path))
  assert "\n" not in str(e.value)


def test_damaged_latest_checkpoint_falls_back(tmp_path):
  commands.train(_config(**{"train.stop_at": 20, "train.num_steps": 30}), str(tmp_path))
  for root, _, files in os.walk(tmp_path / "checkpoints" / "20" / "state"):
    for f in files:
      if f == "_METADATA":
        os.remove(os.path.join(root, f))
  out = commands.train(_config(**{"train.num_steps": 30}), str(tmp_path))
  assert out["step"] == 30
  steps = [r["step"] for r in _train_lines(str(tmp_path / "metrics.jsonl"))]
  assert steps == sorted(set(steps)) and steps[-1] == 30  # resumed from 10, no duplicates
  assert (tmp_path / "checkpoints" / "20.damaged-0").is_dir()  # set aside, not deleted


@pytest.mark.parametrize("override, words", [
    ({"data.train": "file:/no/such/file.txt"}, "/no/such/file.txt"),
    ({"train.schedule": "step"}, "schedule"),
    ({"data.batch_size": 6, "train.grad_accum": 4}, "grad_accum"),
    ({"model.vocab_size": 100}, "vocab_size"),
    ({"mesh": {"data": 3}}, "mesh"),
    ({"data.seq_len": 1000}, "max_len"),
])
def test_bad_config_one_line_and_nothing_written(tmp_path, override, words):
  with pytest.raises(GrowlmError, match=words) as e:
    commands.train(_config(**override), str(tmp_path / "run"))
  assert "\n" not in str(e.value)
  assert not (tmp_path / "run").exists()


def test_divergence_stops_without_checkpoint(tmp_path):
  def nan_params(shardings):
    p = model.init_params(resolve(_config()).model, jax.random.key(0))
    return jax.tree.map(lambda x: x * jnp.nan, p)
  with pytest.raises(FloatingPointError, match="non-finite"):
    commands.train(_config(), str(tmp_path), params_fn=nan_params)
  ckpts = tmp_path / "checkpoints"
  assert not ckpts.exists() or not [d for d in os.listdir(ckpts) if d.isdigit()]


def _cli(args, env_extra=None, timeout=300):
  env = user_env()
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "growlm.main", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=timeout)


def test_cli_runs_and_bad_flag_is_one_line(tmp_path):
  ok = _cli(["--config=configs/default.py:size=nano,runlocal", f"--workdir={tmp_path}/a",
             "--config.train.num_steps=4", "--config.train.warmup_steps=1",
             "--config.log.progress_bar=False"])
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "growlm: done: step=4" in ok.stdout
  bad = _cli(["--config=configs/default.py:size=nano,runlocal", f"--workdir={tmp_path}/b",
              "--config.model.norm=batchnorm"])
  assert bad.returncode == 2
  err = [l for l in bad.stderr.splitlines() if l.startswith("growlm: error:")]
  assert len(err) == 1 and "norm" in err[0] and "layernorm" in err[0]
  assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_bits_per_byte_falls_on_tiny_shakespeare(tmp_path):
  """A byte-level model's held-out bits per byte drops far below its start in 300 steps."""
  text = DATASETS / "tinyshakespeare" / "input.txt"
  if not text.exists():
    pytest.skip(f"{text} not present")
  c = _config(**{"data.train": f"file:{text}", "data.eval_fraction": 0.1,
                 "data.max_bytes": 0, "data.seq_len": 64, "data.batch_size": 16,
                 "train.num_steps": 300, "train.warmup_steps": 30, "train.lr": 3e-3,
                 "eval.every_steps": 300, "eval.batches": 8,
                 "checkpoint.every_steps": 300, "log.every_steps": 50})
  commands.train(c, str(tmp_path))
  evals = [r for r in read_metrics(str(tmp_path / "metrics.jsonl")) if "eval_bpb/heldout" in r]
  start, end = evals[0]["eval_bpb/heldout"], evals[-1]["eval_bpb/heldout"]
  assert start == pytest.approx(math.log2(258), abs=0.3)  # uniform over the vocabulary
  # Measured on 2 CPU cores: 8.04 -> 3.68 bits per byte.
  assert end < 4.0 and end < 0.5 * start, (start, end)


def _free_port():
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, extra):
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "-m", "growlm.main", *extra, f"--workdir={workdir}",
       f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
       "--cpu_devices=2"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env=user_env()) for i in range(2)]
  outs = [p.communicate(timeout=400) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]


def test_two_processes_given_different_flags_both_refuse_before_any_work(tmp_path):
  """A flag given to one process only (here train.num_steps) is found by the first collective:
  each process exits 2 with one line naming the field, and no run dir is written. (Before, the
  two trained apart until one waited forever in a collective the other never reached.)"""
  port = _free_port()
  base = ["--config=configs/default.py:size=nano,runlocal", "--config.log.progress_bar=False",
          "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
          f"--workdir={tmp_path / 'run'}", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", "--cpu_devices=2"]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "growlm.main", *base, f"--process_id={i}",
       f"--config.train.num_steps={steps}"], cwd=REPO, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True, env=user_env()) for i, steps in enumerate((6, 10))]
  outs = [p.communicate(timeout=300) for p in procs]
  for i, (p, (_, err)) in enumerate(zip(procs, outs)):
    lines = [l for l in err.splitlines() if l.startswith("growlm:")]
    assert p.returncode == 2 and "Traceback" not in err, err[-3000:]
    assert lines == [f"growlm: error: the 2 processes were given different values of "
                     f"train.num_steps (process {i}: train.num_steps={(6, 10)[i]}); accepted: "
                     "the same config and flags on every process"], err[-3000:]
  assert not (tmp_path / "run").exists()


def _two_with(tmp_path, flags_of, extra=(), cwds=(REPO, REPO)):
  """Runs 2 processes on one run dir, process i with flags_of[i] added and in cwds[i] (a host's
  own files); (returncodes, stderrs)."""
  port = _free_port()
  base = [f"--config={REPO / 'configs' / 'default.py'}:size=nano,runlocal",
          "--config.log.progress_bar=False",
          "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
          f"--workdir={tmp_path / 'run'}", f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2", "--cpu_devices=2", *extra]
  procs = [subprocess.Popen(
      [sys.executable, "-m", "growlm.main", *base, f"--process_id={i}", *flags_of[i]],
      cwd=cwds[i],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=user_env())
           for i in range(2)]
  errs = [p.communicate(timeout=200)[1] for p in procs]
  return [p.returncode for p in procs], errs


def _lines(err):
  return [l for l in err.splitlines() if l.startswith("growlm:")]


@pytest.mark.parametrize("bad", [0, 1])
def test_a_bad_flag_on_one_process_ends_the_other_when_it_does_not_join(tmp_path, bad):
  """A config error on one process only: that one exits 2 before joining, and the other, left
  waiting for it, exits 4 after --join_timeout with one line naming the coordinator and the
  process count. (Before: process 0 waited 120 s for JAX's timeout, then a traceback or a native
  abort, exit 134; the bad process itself waited in JAX's shutdown barrier.)"""
  flags_of = [[], []]
  flags_of[bad] = ["--config.train.num_steps=-1"]
  codes, errs = _two_with(tmp_path, flags_of, ["--join_timeout=8"])
  good = 1 - bad
  assert codes[bad] == 2 and _lines(errs[bad]) == [
      "growlm: error: config train.num_steps=-1; accepted: a positive integer"], errs[bad][-2000:]
  assert codes[good] == 4 and "Traceback" not in errs[good], errs[good][-3000:]
  [line] = _lines(errs[good])
  assert line.startswith(f"growlm: error: process {good} of 2: not every process joined the run "
                         "within --join_timeout=8 s (coordinator 127.0.0.1:"), line
  assert ", 2 processes); check that every process was started with the same" in line
  assert "Check failure" not in errs[good] and not (tmp_path / "run").exists()


def test_an_error_on_one_process_after_joining_ends_the_other_at_once(tmp_path):
  """A failure on process 1 only, after both joined (its init.source is missing on its host):
  it tells process 0, which stops too, exit 4, with one line quoting process 1's (before:
  process 0 waited in its first collective until JAX aborted it natively)."""
  codes, errs = _two_with(tmp_path, [[], ["--config.init.source=/nonexistent/run"]])
  assert codes == [4, 2], [e[-2000:] for e in errs]
  [mine] = _lines(errs[1])
  assert mine.startswith("growlm: error: init.source='/nonexistent/run' does not exist"), mine
  assert _lines(errs[0]) == [
      f"growlm: error: process 0 of 2: process 1 stopped with '{mine[len('growlm: error: '):]}'"
      "; this process stops too (nothing of it is lost that a relaunch of every process cannot "
      "resume)"], errs[0][-2000:]
  assert not any("Traceback" in e or "Check failure" in e for e in errs)
  assert not (tmp_path / "run").exists()


def test_data_missing_on_one_host_ends_both_and_writes_nothing(tmp_path):
  """The same config, a relative data path that only process 0's host has: process 1 refuses
  in the trainer's input checks; process 0, past its own, ends with exit 4 before it writes the
  run dir's lease (before: it took the lease, and its exit left a run dir holding only that)."""
  hosts = [tmp_path / "host0", tmp_path / "host1"]
  for h in hosts:
    h.mkdir()
  (hosts[0] / "corpus.txt").write_text((REPO / "README.md").read_text() * 4)
  codes, errs = _two_with(tmp_path, [[], []], ["--config.data.train=file:corpus.txt"], hosts)
  assert codes == [4, 2], [e[-2000:] for e in errs]
  assert "corpus.txt" in _lines(errs[1])[0] and "process 1 stopped with" in _lines(errs[0])[0]
  assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.parametrize("source", ["in-memory", "prepared"])
def test_two_processes_train_checkpoint_resume(tmp_path, source, request):
  """2 processes x 2 CPU devices (jax.distributed over localhost, as on a multi-host TPU VM)
  train, stop at a checkpoint, resume, and log the losses of one 4-device process: on the
  in-memory corpus into a gs:// run dir (the GCS emulator: orbax's multi-process save, the lease
  and metrics on an object store), and streamed from prepared shards (each process reading its
  own rows) into a local one."""
  args = ["--config=configs/default.py:size=nano,runlocal", "--config.log.every_steps=1",
          "--config.log.progress_bar=False", "--config.mesh.data=2", "--config.mesh.fsdp=2",
          "--config.mesh.tensor=1"]
  multi = str(tmp_path / "multi")
  if source == "prepared":
    from growlm import data  # pylint: disable=g-import-not-at-top
    data.prepare_tokens("stdlib", "bytes", str(tmp_path / "prep"), progress=False)
    args += [f"--config.data.train=prepared:{tmp_path / 'prep'}", "--config.data.max_bytes=0"]
  else:
    multi = request.getfixturevalue("gcs").bucket() + "/runs/multi"
  single = _cli([*args, f"--workdir={tmp_path}/single", "--cpu_devices=4"])
  assert single.returncode == 0, single.stderr[-3000:]
  _two_processes(multi, [*args, "--config.train.stop_at=10"])
  assert max(r["step"] for r in _train_lines(fs.join(multi, "metrics.jsonl"))) == 10
  assert rundir.checkpoint_steps(multi) == [10]
  _two_processes(multi, args)
  ref = _train_lines(str(tmp_path / "single" / "metrics.jsonl"))
  got = _train_lines(fs.join(multi, "metrics.jsonl"))
  assert [r["step"] for r in got] == list(range(1, 21))
  np.testing.assert_allclose([r["train_loss"] for r in got], [r["train_loss"] for r in ref],
                             rtol=1e-5)


def test_state_bytes_per_device_follow_the_mesh():
  """The memory check's figure: a replicated state is every leaf whole on each device; fsdp
  over 8 devices splits each leaf's embed dimension, so a device holds about an eighth."""
  cfg = make_model_config("tiny", "gpt2")
  opt = optim.make_optimizer(resolve(run_config()).train)
  whole, split = (state_lib.state_shardings(cfg, opt, sharding.make_mesh(m),
                                            sharding.DEFAULT_RULES)[0]
                  for m in ({"data": 8}, {"fsdp": 8}))
  exact = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(whole))
  assert state_lib.bytes_per_device(whole) == exact
  # Leaves without an embed axis (MLP biases, scalars) stay whole: a little over an eighth.
  assert exact / 8 < state_lib.bytes_per_device(split) < exact / 7


def test_a_mesh_that_leaves_a_process_out_is_refused():
  """Two processes of two devices each, a mesh of two devices: the second process would hold
  no part of the step (it raised in jax, and the first waited minutes). One line instead."""
  import types  # pylint: disable=g-import-not-at-top
  devices = [types.SimpleNamespace(process_index=i // 2, id=i) for i in range(4)]
  with pytest.raises(GrowlmError, match=r"takes 2 of the 4 devices, none of process\(es\) \[1\]"):
    sharding.make_mesh({"data": 2}, devices)
