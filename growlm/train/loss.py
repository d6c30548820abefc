"""The training and evaluation loss: per-token cross-entropy in nats, accumulated in float32.

`token_nll` is what the train and eval steps use. It never holds the float32 [B, L, V] logits
of a whole batch: the output layer and the softmax run over chunks of `model.loss_chunk`
sequence positions inside a rematerialised scan, so the largest logits buffer is [B, c, V]
(forward and backward). `cross_entropy` on full logits stays as the plain reference; the two
agree to float32 rounding (tests/test_loss.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig

AUTO_CHUNK_BYTES = 64 * 2**20   # loss_chunk=0: the largest chunk whose f32 logits fit in this


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, L] in nats (float32 or wider)."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.promote_types(logits_BxLxV.dtype,
                                                                    jnp.float32)), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def chunk_length(requested: int, batch: int, seq_len: int, vocab: int) -> int:
  """Positions per loss chunk: the largest divisor of seq_len <= the requested length (0: auto,
  the largest whose float32 [batch, c, vocab] logits take <= AUTO_CHUNK_BYTES, and at most
  half of seq_len, so no chunk is the whole batch's logits)."""
  if requested <= 0:
    requested = max(1, min(seq_len // 2, AUTO_CHUNK_BYTES // (4 * batch * vocab)))
  c = min(requested, seq_len)
  while seq_len % c:
    c -= 1
  return c


def chunked_cross_entropy(x_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                          chunk: int) -> jax.Array:
  """Per-token NLL [B, L] of logits x @ w, computed `chunk` positions at a time.

  Each chunk's logits come out of the matmul in >= float32, then log-sum-exp and the target's
  logit; the scan body is rematerialised, so the backward pass recomputes one chunk's logits
  at a time instead of keeping them all.
  """
  B, L, D = x_BxLxD.shape
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  n = L // chunk

  @jax.checkpoint
  def one(x_BxCxD, t_BxC):
    logits_BxCxV = jnp.einsum("bcd,dv->bcv", x_BxCxD, w_DxV, preferred_element_type=acc)
    target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BxCxV, axis=-1) - target_BxC

  if n == 1:
    return one(x_BxLxD, targets_BxL)
  x_NxBxCxD = jnp.moveaxis(x_BxLxD.reshape(B, n, chunk, D), 1, 0)
  t_NxBxC = jnp.moveaxis(targets_BxL.reshape(B, n, chunk), 1, 0)
  _, nll_NxBxC = jax.lax.scan(lambda carry, xt: (carry, one(*xt)), None, (x_NxBxCxD, t_NxBxC))
  return jnp.moveaxis(nll_NxBxC, 0, 1).reshape(B, L)


def token_nll(cfg: ModelConfig, params, inputs_BxL: jax.Array, targets_BxL: jax.Array, *,
              dropout_rng: jax.Array | None = None) -> jax.Array:
  """Per-token NLL [B, L] of the model on a batch, without a whole-batch logits tensor."""
  x_BxLxD, w_DxV = model_lib.hidden(cfg, params, inputs_BxL, dropout_rng=dropout_rng)
  B, L = targets_BxL.shape
  chunk = chunk_length(cfg.loss_chunk, B, L, cfg.vocab_size)
  return chunked_cross_entropy(x_BxLxD, w_DxV, targets_BxL, chunk)
