"""The sharded trainer: a jitted step over a (data, fsdp, tensor) mesh, the loop around it.

`train(config, workdir, initialize)` trains the run in `workdir` from the state that
`initialize(setup)` returns: it knows nothing of where that state came from (a resumed
checkpoint, a grown source, a fresh init: growlm.init.seam decides). It evaluates, checkpoints,
writes metrics.jsonl and logs to the tracker. Bad input fails before any file is written.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from growlm import data as data_lib
from growlm import lock as lock_lib
from growlm import fs, rundir, sharding
from growlm.config.resume import resume_conflicts
from growlm.config.typed import RunConfig
from growlm.errors import GrowlmError, Preempted
from growlm.model import config as model_config
from growlm import optim
from growlm.train import agree, peers
from growlm.train import stages as stages_lib
from growlm.train import tracking
from growlm.train.checkpoint import Checkpoints
from growlm.train.evaluate import Evaluator
from growlm.train.loss import token_nll
from growlm.train.metrics import MetricsWriter, ProgressBar, check_metrics_file
from growlm.train.signals import StopRequest
from growlm.train.state import TrainState

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Setup:
  """What an initialiser is handed: everything needed to build the first state on the mesh."""
  config: RunConfig
  workdir: str
  mesh: Mesh
  optimizer: optax.GradientTransformation
  abstract: TrainState                     # ShapeDtypeStructs carrying the target shardings
  shard: TrainState                        # NamedShardings of every leaf
  eval_batches: dict[str, list[dict]]      # global eval batches on device, per dataset
  abstract_at: Callable[[int], TrainState] | None = None   # a checkpoint's abstract, by step


@dataclasses.dataclass(frozen=True)
class Start:
  """The first state and what the trainer should log about it."""
  state: TrainState
  data_state: dict | None = None           # iterator state of a resumed run
  report: dict | None = None               # growth preservation report (a grown start)
  source_flops: float = 0.0                # training FLOPs of the source model(s)
  resumed: bool = False                    # restored from this run dir's own checkpoint
  flops: float = 0.0                       # this run's own training FLOPs up to the state


Initializer = Callable[[Setup], Start]
# (run config, the stage's kit before, its kit after, state, stage index) -> (grown state,
# preservation report): growlm.init.seam.grow_stage.
StageGrower = Callable[[RunConfig, "stages_lib.Kit", "stages_lib.Kit", TrainState, int],
                       tuple[TrainState, dict]]


OPTIMIZER_SCOPE = "optimizer"   # the name scope of the update (clipping, AdamW)


def make_train_step(cfg, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1) -> Callable:
  """(state, batch) -> (state, metrics); the batch is split into `grad_accum` microbatches."""

  def loss_fn(params, batch, rng):
    return token_nll(cfg, params, batch["inputs"], batch["targets"], dropout_rng=rng).mean()

  grad_fn = jax.value_and_grad(loss_fn)

  def step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    rng, sub = jax.random.split(state.rng)
    if grad_accum == 1:
      loss, grads = grad_fn(state.params, batch, sub)
    else:
      # Microbatch a takes rows a, a + A, a + 2A, ...: each stays spread over the batch shards.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape((x.shape[0] // grad_accum, grad_accum) + x.shape[1:]),
                                 0, 1), batch)

      def body(carry, xs):
        mb, r = xs
        l, g = grad_fn(state.params, mb, r)
        return jax.tree.map(jnp.add, carry, (l, g)), None

      zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
      (loss, grads), _ = jax.lax.scan(body, zero, (micro, jax.random.split(sub, grad_accum)))
      loss, grads = jax.tree.map(lambda x: x / grad_accum, (loss, grads))
    with jax.named_scope(OPTIMIZER_SCOPE):   # for profiles (benchmarks/parts.py)
      updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
      params = optax.apply_updates(state.params, updates)
      metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
                 "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return step


def load_data(config: RunConfig, tokenizer) -> tuple[Any, dict, dict]:
  """(training iterator, eval streams by name, data manifests) of the run's data section. A
  "prepared:DIR" source streams from its token shards (growlm.data.stream); evaluation reads
  only the tokens its batches need, from the start of each eval split."""
  d = config.data
  kw = dict(eval_fraction=d.eval_fraction, max_bytes=d.max_bytes, data_dir=d.data_dir or None,
            text_field=d.text_field)
  iterator = data_lib.train_iterator(d.train, tokenizer, seq_len=d.seq_len,
                                     global_batch=d.batch_size, seed=d.seed,
                                     process_index=jax.process_index(),
                                     process_count=jax.process_count(), **kw)
  evals, manifests = {}, {"train": iterator.manifest}
  eval_tokens = data_lib.eval_tokens(d.seq_len, d.batch_size, config.eval.batches)
  for name, source, split in d.eval_sources():
    evals[name] = data_lib.token_stream(source, split, tokenizer, max_tokens=eval_tokens, **kw)
    manifests[f"eval/{name}"] = evals[name].manifest
  return iterator, evals, manifests


def require_config(workdir: str) -> dict | None:
  """The run dir's saved config.json (None for a new run dir). A run dir that holds checkpoints
  must hold a readable config.json: without it a relaunch could not be checked against the run,
  so it is refused rather than resumed with whatever the new command says."""
  fs.check_writable(workdir, "--workdir")
  if fs.isfile(workdir):
    raise GrowlmError(f"--workdir={workdir} is not a directory; accepted: a new path or a run dir")
  saved = rundir.read_config(workdir)
  if saved is None and rundir.has_checkpoint(workdir):
    raise GrowlmError(f"run dir {workdir} holds checkpoints but no config.json, so a relaunch "
                      "cannot be checked against it; accepted: put its config.json back, or use "
                      "a new --workdir")
  return saved


def check_run_dir(workdir: str, config_json: dict) -> None:
  """Refuses a run dir that holds a run with another config (fields that do not change what is
  computed may differ, growlm.config.resume.RESUMABLE_FIELDS), or whose files are not a run's."""
  saved = require_config(workdir)
  if saved is not None:
    conflicts = resume_conflicts(saved, config_json)
    if conflicts:
      raise GrowlmError(f"run dir {workdir} holds a run with another config (differs in "
                        f"{', '.join(conflicts[:8])}); use a new --workdir or the same config")
  check_metrics_file(rundir.metrics_path(workdir))


def train(config: RunConfig, workdir: str, initialize: Initializer, *,
          stop_after_init: bool = False, grow_stage: StageGrower | None = None
          ) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last train and eval metrics.

  `initialize(setup)` builds the first state (growlm.init.seam.initializer); `grow_stage`
  grows the live state at each of config.stages (growlm.init.seam.grow_stage). With
  `stop_after_init` the run dir is written at the start state's step (step-0 eval, checkpoint)
  and nothing is trained: the grow command.
  """
  cfg, d, t = config.model, config.data, config.train
  config_json = config.to_json()
  agree.check_same_run(config_json, workdir)   # first: every process reaches this collective
  tracking.check_wandb(config)
  is_main = jax.process_index() == 0

  # Everything that can fail on bad input happens before any file is written.
  check_run_dir(workdir, config_json)
  lock_lib.check_free(workdir)   # another launch writing this run dir: refuse before any work
  tokenizer = data_lib.make_tokenizer(d.tokenizer)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise GrowlmError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({tokenizer.vocab_size}); accepted: >= {tokenizer.vocab_size}")
  model_config.check_dtype_runs_on(cfg.dtype, sharding.platform())
  model_config.check_dtype_runs_on(cfg.param_dtype, sharding.platform(), "model.param_dtype",
                                   computes=False)
  rules = config.sharding_rules
  mesh = sharding.make_mesh(config.mesh.to_dict())
  if d.batch_size % sharding.batch_shards(mesh, rules):
    raise GrowlmError(f"data.batch_size={d.batch_size} is not a multiple of the batch shards "
                      f"({sharding.batch_shards(mesh, rules)} = mesh data x fsdp)")
  iterator, eval_streams, manifests = load_data(config, tokenizer)

  if config.stages and grow_stage is None:
    raise ValueError("a config with stages needs a grow_stage (growlm.init.seam.grow_stage)")
  schedule = stages_lib.make_schedule(config)
  optimizer = optim.make_optimizer(t, schedule, lr_multipliers=config.init.lr_multipliers,
                                   lr_rescale=config.init.lr_rescale != "none")
  batch_shard = sharding.batch_sharding(mesh, rules)

  with jax.set_mesh(mesh):
    stages = stages_lib.Stages(
        config, optimizer, mesh, lambda m: make_train_step(m, optimizer, schedule, t.grad_accum),
        batch_shard, lambda m, p_shard: Evaluator(m, eval_streams, d.seq_len, d.batch_size,
                                                  config.eval.batches, batch_shard, p_shard))
    kit = stages.kit(0)
    start = initialize(Setup(config, workdir, mesh, optimizer, kit.abstract, kit.shard,
                             kit.evaluator.batches, abstract_at=stages.abstract_at))
    state = start.state
    first = int(jax.device_get(state.step))
    if not start.resumed and stages.index_at(first) != 0:
      raise GrowlmError(f"config stages[0].step={config.stages[0].step} is not after the start "
                        f"state's step {first}; accepted: stage steps > {first}")
    if start.data_state is not None:
      iterator.set_state(start.data_state)
    growth_report = start.report

    # Inputs are good and the state exists: now the run dir is written, by one launch only, and
    # a stop signal saves a step (before, it ended the start-up: signals.start_up).
    stop, lease, ckpt, writer = StopRequest().install(), None, None, None
    tracker = tracking.Tracker()
    try:
      lease = agree.take_lease(workdir)
      fs.makedirs(workdir)
      if is_main:
        fs.write_json_atomic(rundir.config_path(workdir), config_json)
        fs.write_json_atomic(fs.join(workdir, rundir.DATA_MANIFEST), manifests)
        if growth_report is not None:
          fs.write_json_atomic(fs.join(workdir, rundir.GROWTH_REPORT), growth_report)
      ckpt = Checkpoints(rundir.checkpoints_dir(workdir), keep=config.checkpoint.keep,
                         async_save=config.checkpoint.async_save)
      # metrics.jsonl keeps what the restored state had seen (lines up to its step) and nothing
      # of a start that never reached a checkpoint, so every step is in it exactly once.
      writer = MetricsWriter(rundir.metrics_path(workdir), enabled=is_main,
                             truncate_after_step=first if start.resumed else -1)
      tracker = tracking.make_tracker(config, workdir)
      summary = _loop(config, workdir, start, state, iterator, stages, ckpt, writer, tracker,
                      stop, batch_shard, stop_after_init, lease, grow_stage)
    finally:
      # Every exit path (done, diverged, preempted, a data or disk error) waits for the
      # checkpoint in flight and closes every writer, so the process ends and nothing is
      # left half-written; the run dir's lease goes last.
      stop.uninstall()
      lost = peers.lost(sys.exc_info()[1])   # a save in flight then can never be committed
      if ckpt is not None:
        _close_quietly(lambda: ckpt.close(abandon=True, wait=not lost), "checkpoints")
      if writer is not None:
        _close_quietly(writer.close, "metrics")
      _close_quietly(tracker.close, "tracker")
      if lease is not None:
        _close_quietly(lease.release, "run-dir lease")
  return summary


def _close_quietly(close: Callable[[], None], what: str) -> None:
  try:
    close()
  except Exception as e:  # pylint: disable=broad-except  (never hide the error that got us here)
    log.warning("closing the %s failed: %s: %s", what, type(e).__name__,
                (str(e).splitlines() or [""])[0])


def _loop(config: RunConfig, workdir: str, start: Start, state: TrainState, iterator,
          stages: stages_lib.Stages, ckpt: Checkpoints, writer: MetricsWriter, tracker,
          stop: StopRequest, batch_shard, stop_after_init: bool,
          lease: lock_lib.RunLock | None, grow_stage: StageGrower | None) -> dict[str, Any]:
  """Steps from the start state to the end (or the stop step), growing the state at each stage;
  returns the last metrics."""
  d, t = config.data, config.train
  is_main = jax.process_index() == 0
  tokens_per_step = d.batch_size * d.seq_len
  first = int(jax.device_get(state.step))
  source_flops = float(start.source_flops)
  growth_report = start.report
  if growth_report is not None:
    tracker.log_report(growth_report)

  def record(rec: dict[str, Any]) -> None:
    writer.write(rec)
    tracker.log(rec)
  kit = stages.kit(stages.index_at(first))

  # Wall-clock of the run so far: this launch's seconds plus what earlier launches recorded
  # (read by the metrics writer with the lines it keeps; only process 0 records either).
  wall_start = time.perf_counter() - writer.kept_wall_seconds

  def counters(step: int) -> dict[str, Any]:
    flops = start.flops + stages.flops(first, step, tokens_per_step)
    # flops_with_source equals flops for a scratch run: every run has the same three axes.
    return {"step": step, "tokens": step * tokens_per_step, "flops": flops,
            "flops_with_source": flops + source_flops,
            "wall_seconds": time.perf_counter() - wall_start}

  def meta(step: int) -> dict[str, Any]:
    return {**counters(step), "source_flops": source_flops, "model": kit.config.model.to_dict(),
            "stage": kit.index}

  last_eval: dict[str, float] = {}
  eval_step = first
  if not start.resumed:
    if growth_report is not None:
      record({**counters(first), "event": "growth",
              **{k: v for k, v in growth_report.items() if not isinstance(v, dict)}})
    last_eval = kit.evaluator(state.params)
    record({**counters(first), **last_eval})
  if stop_after_init:
    ckpt.save(first, state, iterator.get_state(), meta(first))
    ckpt.close()   # final (and checksummed) before the grow command renames the run dir
    return {**counters(first), **last_eval}

  end = min(t.num_steps, t.stop_at) if t.stop_at else t.num_steps
  bar = ProgressBar(first, end, enabled=is_main and config.log.progress_bar)
  pending = None  # (step, device metrics) of the step dispatched before the current one
  window_t, window_steps = time.perf_counter(), 0
  last_train: dict[str, float] = {}

  def read_back(item):
    nonlocal window_t, window_steps, last_train
    s, m = item
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    window_steps += 1   # steps finished since the last train line (not dispatched: one more)
    if not all(math.isfinite(v) for v in m.values()):
      raise FloatingPointError(f"non-finite metrics at step {s}: {m}; no checkpoint written "
                               "for this step (lower train.lr or raise train.warmup_steps)")
    bar.update(s, m["train_loss"])
    last_train = m
    if s % config.log.every_steps == 0 or s == end:
      now = time.perf_counter()
      m["tokens_per_sec"] = window_steps * tokens_per_step / max(now - window_t, 1e-9)
      window_t, window_steps = now, 0
      record({**counters(s), **m})

  with tracker:  # closes the W&B run, marked failed on an exception
    for step in range(first + 1, end + 1):
      grows = stages.growth_after(step - 1)
      if grows is not None:
        if pending is not None:
          read_back(pending)
          pending = None
        before, kit = kit, stages.kit(grows)
        state, report = grow_stage(config, before, kit, state, grows)
        if is_main:
          fs.write_json_atomic(fs.join(workdir, rundir.stage_report_name(grows)), report)
        record({**counters(step - 1), "event": "growth", "stage": grows,
                **{k: v for k, v in report.items() if not isinstance(v, dict)}})
        tracker.log_report(report)
      batch = sharding.global_batch_from_local(next(iterator), batch_shard)
      state, metrics = kit.step_fn(state, batch)
      if pending is not None:
        read_back(pending)   # the step just dispatched runs while we read the previous one
      pending = (step, metrics)
      stopping = stop.should_stop(step)   # every step, on every process (the same answer)
      if not stopping and (step % config.eval.every_steps == 0 or step == t.num_steps):
        read_back(pending)
        pending = None
        last_eval, eval_step = kit.evaluator(state.params), step
        record({**counters(step), **last_eval})
      if stopping or step % config.checkpoint.every_steps == 0 or step == end:
        if pending is not None:
          read_back(pending)   # never checkpoint a state whose loss was not checked
          pending = None
        if lease is not None:
          lease.ensure_held()  # taken over by another launch: stop before writing over it
        writer.flush()   # every line up to a checkpoint is stored before it (see MetricsWriter)
        tracker.flush()  # and the W&B run's last step, so a resume skips what it holds
        ckpt.save(step, state, iterator.get_state(), meta(step))
      if stopping:
        bar.close()
        ckpt.close()   # the stop checkpoint is final before we say so
        raise Preempted(step, stop.signal_name or "signal", workdir)
    if pending is not None:
      read_back(pending)
    bar.close()
    ckpt.close()
    writer.close()
    tracker.log_loss_curve(workdir)
  final = int(jax.device_get(state.step))
  # An eval older than the last step (train.stop_at between evals) says which step it is of.
  stale = {"eval_step": eval_step} if last_eval and eval_step != final else {}
  return {**counters(final), **last_train, **last_eval, **stale}
