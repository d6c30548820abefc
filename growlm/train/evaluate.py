"""Evaluation: held-out loss (nats per token) and bits per byte on each eval dataset."""

from __future__ import annotations

import copy
import math
from typing import Callable

import jax
import jax.numpy as jnp

from growlm import data as data_lib
from growlm import sharding
from growlm.model.config import ModelConfig
from growlm.train.loss import token_nll


def make_eval_step(cfg: ModelConfig) -> Callable:
  """(params, batch) -> summed loss (nats) and token count."""
  def step(params, batch):
    nll = token_nll(cfg, params, batch["inputs"], batch["targets"], train=False)
    return nll.sum(), jnp.asarray(nll.size, jnp.float32)
  return step


def jit_eval_step(cfg: ModelConfig, p_shard, batch_shard) -> Callable:
  """The eval step as the trainer runs it (and `--compile_for` compiles it): the parameters in
  their train shardings, not donated (training goes on with them), the batch split by
  `batch_shard`."""
  return jax.jit(make_eval_step(cfg), in_shardings=(p_shard, batch_shard))


class Evaluator:
  """Held-out datasets, kept on device as global batches; reports loss and bits per byte."""

  def __init__(self, cfg: ModelConfig, streams: dict[str, data_lib.TokenStream], seq_len: int,
               global_batch: int, n_batches: int, batch_shard, p_shard):
    self.bytes_per_token = {n: s.bytes_per_token for n, s in streams.items()}
    self.batches = {
        n: [sharding.global_batch_from_local(b, batch_shard) for b in data_lib.eval_batches(
            s, seq_len, global_batch, n_batches, process_index=jax.process_index(),
            process_count=jax.process_count())]
        for n, s in streams.items()}
    self._batch_shard = batch_shard
    self._step = jit_eval_step(cfg, p_shard, batch_shard)

  def for_model(self, cfg: ModelConfig, p_shard) -> "Evaluator":
    """The same datasets and batches for another model (a run's next growth stage)."""
    other = copy.copy(self)
    other._step = jit_eval_step(cfg, p_shard, self._batch_shard)
    return other

  def __call__(self, params) -> dict[str, float]:
    out = {}
    for name, batches in self.batches.items():
      sums = [self._step(params, b) for b in batches]
      total, count = (float(sum(x)) for x in zip(*jax.device_get(sums)))
      loss = total / count
      out[f"eval_loss/{name}"] = loss
      out[f"eval_bpb/{name}"] = loss / math.log(2) / self.bytes_per_token[name]
    return out
