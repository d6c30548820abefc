"""The sharded trainer: jit over a (data, fsdp, tensor) mesh, AdamW, evaluation, checkpoints.

`train(config, workdir)` is the library entry point (main.py and notebooks call it). A run
directory holds config.json, data_manifest.json, metrics.jsonl and checkpoints/; launching
again on the same directory resumes from the newest checkpoint that restores.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax

from growlm import config as config_lib
from growlm import data as data_lib
from growlm import flops as flops_lib
from growlm import model as model_lib
from growlm import optim, sharding
from growlm import tracking, warmstart
from growlm.checkpoint import Checkpoints
from growlm.grow import core as grow_core
from growlm.grow import report as report_lib
from growlm.errors import GrowlmError
from growlm.metrics import MetricsWriter, ProgressBar, write_json_atomic
from growlm.state import TrainState, init_state, state_shardings  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, L] in nats."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.promote_types(logits_BxLxV.dtype,
                                                                    jnp.float32)), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def make_train_step(cfg, optimizer: optax.GradientTransformation, schedule: optax.Schedule,
                    grad_accum: int = 1) -> Callable:
  """(state, batch) -> (state, metrics); the batch is split into `grad_accum` microbatches."""

  def loss_fn(params, batch, rng):
    logits = model_lib.apply(cfg, params, batch["inputs"], dropout_rng=rng)
    return cross_entropy(logits, batch["targets"]).mean()

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
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"train_loss": loss, "grad_norm": optax.tree.norm(grads),
               "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

  return step


def make_eval_step(cfg) -> Callable:
  """(params, batch) -> summed loss (nats) and token count."""
  def step(params, batch):
    nll = cross_entropy(model_lib.apply(cfg, params, batch["inputs"]), batch["targets"])
    return nll.sum(), jnp.asarray(nll.size, jnp.float32)
  return step


class Evaluator:
  """Held-out datasets, kept on device as global batches; reports loss and bits per byte."""

  def __init__(self, cfg, streams: dict[str, data_lib.TokenStream], seq_len: int,
               global_batch: int, n_batches: int, batch_shard, p_shard):
    self.bytes_per_token = {n: s.bytes_per_token for n, s in streams.items()}
    self.batches = {
        n: [sharding.global_batch_from_local(b, batch_shard) for b in data_lib.eval_batches(
            s, seq_len, global_batch, n_batches, process_index=jax.process_index(),
            process_count=jax.process_count())]
        for n, s in streams.items()}
    self._step = jax.jit(make_eval_step(cfg), in_shardings=(p_shard, batch_shard))

  def __call__(self, params) -> dict[str, float]:
    out = {}
    for name, batches in self.batches.items():
      sums = [self._step(params, b) for b in batches]
      total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
      loss = total / count
      out[f"eval_loss/{name}"] = loss
      out[f"eval_bpb/{name}"] = loss / math.log(2) / self.bytes_per_token[name]
    return out


def _load_streams(config, tokenizer) -> tuple[data_lib.TokenStream, dict[str, Any], dict]:
  d = config.data
  kw = dict(eval_fraction=d.eval_fraction, max_bytes=d.max_bytes, data_dir=d.data_dir or None)
  train = data_lib.tokenize_corpus(data_lib.load_corpus(d.train, "train", **kw), tokenizer)
  evals, manifests = {}, {"train": train.manifest}
  for name, spec in d.eval.items():
    source, split = config_lib.parse_eval_spec(spec, d.train)
    evals[name] = data_lib.tokenize_corpus(data_lib.load_corpus(source, split, **kw), tokenizer)
    manifests[f"eval/{name}"] = evals[name].manifest
  return train, evals, manifests


def _check_run_dir(workdir: str, config_json: dict) -> None:
  path = os.path.join(workdir, "config.json")
  if os.path.exists(path):
    with open(path) as f:
      saved = json.load(f)
    conflicts = config_lib.resume_conflicts(saved, config_json)
    if conflicts:
      raise GrowlmError(f"run dir {workdir} holds a run with another config (differs in "
                        f"{', '.join(conflicts[:8])}); use a new --workdir or the same config")


def _saved_config(workdir: str) -> dict | None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _adjust_for_growth(config, workdir: str) -> warmstart.Source | None:
  """Reads the growth source (if a fresh run starts from one) and sets model.norm_eps to what
  growth makes it. A grown run dir remembers its `init` section, so relaunching it (to resume,
  or to train on what the grow command wrote) needs no init flags."""
  saved = _saved_config(workdir)
  with config.unlocked():
    if saved and saved.get("init", {}).get("source") and not config.init.source:
      config.init = ml_collections.ConfigDict(saved["init"])
    if not config.init.source:
      return None
    warmstart.check_init(config)
    ckpts = os.path.join(workdir, "checkpoints")
    if saved and os.path.isdir(ckpts) and any(n.isdigit() for n in os.listdir(ckpts)):
      config.model.norm_eps = saved["model"]["norm_eps"]  # resuming: growth already happened
      return None
    src = warmstart.read_source(config.init.source)
    grown = grow_core.grown_config(src.model, config_lib.model_config(config),
                                   warmstart.plan_from_config(config))
    config.model.norm_eps = grown.norm_eps
  return src


def train(config: ml_collections.ConfigDict, workdir: str, *,
          init_params_fn: Callable[[Any], Any] | None = None,
          grow_only: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last train and eval metrics.

  With `config.init.source` set, a fresh run starts from that run's checkpoint, grown to this
  config's model by `config.init.plan`: the preservation report is printed, saved as
  growth_report.json and logged. `grow_only` stops after writing step 0 (the grow command).
  `init_params_fn(shardings)` supplies starting parameters instead (tests).
  """
  config_lib.validate(config)
  tracking.check_wandb(config)
  source = _adjust_for_growth(config, workdir)
  cfg = config_lib.model_config(config)
  d, t = config.data, config.train
  config_json = config_lib.to_json_dict(config)
  is_main = jax.process_index() == 0

  # Everything that can fail on bad input happens before any file is written.
  _check_run_dir(workdir, config_json)
  tokenizer = data_lib.make_tokenizer(d.tokenizer)
  if tokenizer.vocab_size > cfg.vocab_size:
    raise GrowlmError(f"model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                      f"vocabulary ({tokenizer.vocab_size}); accepted: >= {tokenizer.vocab_size}")
  rules = config.sharding_rules
  mesh = sharding.make_mesh(config.mesh.to_dict())
  if d.batch_size % sharding.batch_shards(mesh, rules):
    raise GrowlmError(f"data.batch_size={d.batch_size} is not a multiple of the batch shards "
                      f"({sharding.batch_shards(mesh, rules)} = mesh data x fsdp)")
  train_stream, eval_streams, manifests = _load_streams(config, tokenizer)
  iterator = data_lib.DataIterator(train_stream, d.seq_len, d.batch_size, d.seed,
                                   process_index=jax.process_index(),
                                   process_count=jax.process_count())

  schedule = optim.make_schedule(t.lr, t.warmup_steps, t.num_steps, t.schedule, t.final_lr_ratio)
  optimizer = optim.make_optimizer(t, schedule, lr_multipliers=config.init.lr_multipliers)
  abstract, shard = state_shardings(cfg, optimizer, mesh, rules)
  batch_shard = sharding.batch_sharding(mesh, rules)
  tokens_per_step = d.batch_size * d.seq_len
  fpt = flops_lib.flops_per_token(cfg, d.seq_len)
  ckpt_dir = os.path.join(workdir, "checkpoints")

  with jax.set_mesh(mesh):
    evaluator = Evaluator(cfg, eval_streams, d.seq_len, d.batch_size, config.eval.batches,
                          batch_shard, shard.params)
    restored = None
    if os.path.isdir(ckpt_dir):
      ckpt = Checkpoints(ckpt_dir, keep=config.checkpoint.keep,
                         async_save=config.checkpoint.async_save)
      restored = ckpt.restore_latest(abstract)
    growth_report = None
    if restored is not None:
      step0, state, data_state, meta0 = restored
      iterator.set_state(data_state)
      log.info("resumed from step %d", step0)
    elif source is not None:
      state, growth_report, meta0 = _grow_from_source(config, source, cfg, optimizer, shard, mesh,
                                                      rules, evaluator)
    else:
      start_params = init_params_fn(shard.params) if init_params_fn else None
      state = init_state(cfg, optimizer, shard, t.seed, start_params)
      meta0 = {}
      log.info("initialised %s parameters", f"{model_lib.count_params(state.params):,}")

    # Inputs are good and the state exists: now the run dir is written.
    os.makedirs(workdir, exist_ok=True)
    if is_main:
      write_json_atomic(os.path.join(workdir, "config.json"), config_json)
      write_json_atomic(os.path.join(workdir, "data_manifest.json"), manifests)
      if growth_report is not None:
        report_lib.save_report(growth_report, workdir)
    ckpt = Checkpoints(ckpt_dir, keep=config.checkpoint.keep,
                       async_save=config.checkpoint.async_save)
    start = int(jax.device_get(state.step))
    source_flops = float(meta0.get("source_flops", 0.0))
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), enabled=is_main,
                           truncate_after_step=start)
    tracker = tracking.make_tracker(config, workdir)
    if growth_report is not None:
      tracker.log_report(growth_report)

    def record(rec: dict[str, Any]) -> None:
      writer.write(rec)
      tracker.log(rec)
    step_fn = jax.jit(make_train_step(cfg, optimizer, schedule, t.grad_accum),
                      in_shardings=(shard, batch_shard), out_shardings=(shard, None),
                      donate_argnums=0)

    def counters(step: int) -> dict[str, Any]:
      out = {"step": step, "tokens": step * tokens_per_step, "flops": step * tokens_per_step * fpt}
      if source_flops:
        out["flops_with_source"] = out["flops"] + source_flops
      return out

    def meta(step: int) -> dict[str, Any]:
      return {**counters(step), "source_flops": source_flops, "model": cfg.to_dict()}

    last_eval: dict[str, float] = {}
    if start == 0:
      if growth_report is not None:
        record({**counters(0), "event": "growth",
                **{k: v for k, v in growth_report.items() if not isinstance(v, dict)}})
      last_eval = evaluator(state.params)
      record({**counters(0), **last_eval})
      if grow_only:
        ckpt.save(0, state, iterator.get_state(), meta(0))
        ckpt.close()
        writer.close()
        tracker.close()
        return {**counters(0), **last_eval}

    end = min(t.num_steps, t.stop_at) if t.stop_at else t.num_steps
    bar = ProgressBar(start, end, enabled=is_main and config.log.progress_bar)
    pending = None  # (step, device metrics) of the step dispatched before the current one
    window_t, window_steps = time.perf_counter(), 0
    last_train: dict[str, float] = {}

    def read_back(item):
      nonlocal window_t, window_steps, last_train
      s, m = item
      m = {k: float(v) for k, v in jax.device_get(m).items()}
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
      for step in range(start + 1, end + 1):
        batch = sharding.global_batch_from_local(next(iterator), batch_shard)
        state, metrics = step_fn(state, batch)
        window_steps += 1
        if pending is not None:
          read_back(pending)   # the step just dispatched runs while we read the previous one
        pending = (step, metrics)
        if step % config.eval.every_steps == 0 or step == t.num_steps:
          read_back(pending)
          pending = None
          last_eval = evaluator(state.params)
          record({**counters(step), **last_eval})
        if step % config.checkpoint.every_steps == 0 or step == end:
          if pending is not None:
            read_back(pending)   # never checkpoint a state whose loss was not checked
            pending = None
          ckpt.save(step, state, iterator.get_state(), meta(step))
      if pending is not None:
        read_back(pending)
      bar.close()
      ckpt.close()
      writer.close()
      if isinstance(tracker, tracking.WandbTracker):
        from growlm import analysis  # pylint: disable=g-import-not-at-top
        run = analysis.load_run(workdir)
        tracker.log_image("loss_curve", analysis.plot_loss_curves(
            [run], os.path.join(workdir, "loss_curve.png")))
  return {**counters(int(jax.device_get(state.step))), **last_train, **last_eval}


def _grow_from_source(config, source, cfg, optimizer, shard, mesh, rules, evaluator):
  """Restores and grows the source; returns (state, preservation report, meta)."""
  src = warmstart.restore_source(source, mesh, rules)
  plan = warmstart.plan_from_config(config)
  state, grown = warmstart.grow_state(
      src, cfg, plan, optimizer, shard, seed=config.init.seed, train_seed=config.train.seed,
      grow_optimizer=config.init.optimizer == "grow")
  batches = next(iter(evaluator.batches.values()))
  source_flops = float(src.meta.get("flops_with_source", src.meta.get("flops", 0.0)))
  report = report_lib.preservation_report(
      src.model, src.state.params, grown.config, state.params, batches, plan,
      extra={"source": os.path.abspath(src.directory), "source_step": src.step,
             "source_flops": source_flops, "optimizer_init": config.init.optimizer,
             "lr_multipliers": bool(config.init.lr_multipliers),
             "eval_dataset": next(iter(evaluator.batches))})
  if jax.process_index() == 0:
    print(report_lib.format_report(report), flush=True)
  return state, report, {"source_flops": source_flops}


def grow_into(config: ml_collections.ConfigDict, source: str, out: str) -> dict[str, Any]:
  """The grow command as a library call: `source` grown to `config`'s model, written as the run
  dir `out` at step 0 (checkpoint, growth report). It is built under OUT.partial and renamed at
  the end, so on any error nothing is left at `out`."""
  if os.path.exists(out):
    raise GrowlmError(f"--out={out} exists; accepted: a path that does not exist yet")
  partial = out.rstrip("/") + ".partial"
  if jax.process_index() == 0 and os.path.exists(partial):
    shutil.rmtree(partial)
  with config.unlocked():
    config.init.source = source
  try:
    summary = train(config, partial, grow_only=True)
  except BaseException:
    if jax.process_index() == 0:
      shutil.rmtree(partial, ignore_errors=True)
    raise
  if jax.process_index() == 0:
    os.rename(partial, out)
  return summary
