"""The training and evaluation loss: per-token cross-entropy in nats, accumulated in float32.

`token_nll` is what the train and eval steps use. It never holds the float32 [B, L, V] logits
of a whole batch: the output layer and the softmax run over chunks of `model.loss_chunk`
sequence positions inside a scan, so the largest float32 logits buffer is [B, c, V] (forward
and backward). In float32 the chunk is rematerialised; in a half dtype `half_chunk_nll` keeps
the chunk's logit gradient in that dtype instead (docs/design.md section 9). `cross_entropy` on
full logits stays as the plain reference; the two agree to float32 rounding
(tests/test_loss.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from growlm import sharding
from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig

# loss_chunk=0: the largest chunk whose f32 logits fit in this (benchmarks/README.md, "Speed
# knobs": on an H100, 16 x 1024 tokens with vocab 50304, chunks of 256 positions (824 MB) ran
# 25% faster than chunks of 16 (the CPU's 64 MiB), and the whole [B, L, V] only 2% faster).
AUTO_CHUNK_BYTES = {"cpu": 64 * 2**20, "accelerator": 1 << 30}
SCOPE = "loss"   # the name scope of the head's softmax cross-entropy


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, L] in nats (float32 or wider)."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.promote_types(logits_BxLxV.dtype,
                                                                    jnp.float32)), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def chunk_length(requested: int, batch: int, seq_len: int, vocab: int,
                 platform: str | None = None) -> int:
  """Positions per loss chunk: the largest divisor of seq_len <= the requested length (0: auto,
  the largest whose float32 [batch, c, vocab] logits take <= AUTO_CHUNK_BYTES of this platform,
  and at most half of seq_len, so no chunk is the whole batch's logits)."""
  if requested <= 0:
    kind = "cpu" if (platform or sharding.platform()) == "cpu" else "accelerator"
    requested = max(1, min(seq_len // 2, AUTO_CHUNK_BYTES[kind] // (4 * batch * vocab)))
  c = min(requested, seq_len)
  while seq_len % c:
    c -= 1
  return c


def _nll_and_grad(x_BxCxD, w_DxV, t_BxC):
  """One chunk's NLL [B, C] (float32 logits, log-sum-exp, target) and its gradient with respect
  to the logits, softmax - one_hot, rounded to x's (half) dtype."""
  logits_BxCxV = model_lib.project(x_BxCxD, w_DxV, preferred_element_type=jnp.float32)
  lse_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
  target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
  onehot = jnp.arange(w_DxV.shape[1]) == t_BxC[..., None]
  g_BxCxV = (jnp.exp(logits_BxCxV - lse_BxC[..., None]) - onehot).astype(x_BxCxD.dtype)
  return lse_BxC - target_BxC, g_BxCxV


@jax.custom_vjp
def half_chunk_nll(x_BxCxD: jax.Array, w_DxV: jax.Array, t_BxC: jax.Array) -> jax.Array:
  """Per-token NLL [B, C] of half-precision (bfloat16/float16) x @ w, logits in float32.

  Differentiated, the forward pass also writes d nll / d logits (softmax - one_hot) in the half
  dtype, and the backward pass is two half-precision products with float32 accumulation that
  scale rows by the incoming cotangent: no logits are recomputed, no float32 [B, C, V] tensor
  is kept or revisited, and no product runs in float32. Plain autodiff of the checkpointed
  chunk recomputed the head's matmul, made three more float32 passes over the logits and gave
  the float32 cotangent to two TF32 matmuls: on an H100 (GPT-2 124M, 16 x 1024, vocab 50304)
  about 16 of a 51 ms step went to the loss (benchmarks/README.md, "GPU")."""
  return _nll_and_grad(x_BxCxD, w_DxV, t_BxC)[0]


def _half_chunk_nll_fwd(x_BxCxD, w_DxV, t_BxC):
  nll_BxC, g_BxCxV = _nll_and_grad(x_BxCxD, w_DxV, t_BxC)
  return nll_BxC, (g_BxCxV, x_BxCxD, w_DxV, t_BxC)


def _half_chunk_nll_bwd(res, s_BxC):
  g_BxCxV, x_BxCxD, w_DxV, t_BxC = res
  s = s_BxC.astype(jnp.float32)[..., None]
  dx = model_lib.project(g_BxCxV, w_DxV.T, preferred_element_type=jnp.float32) * s
  xs_BxCxD = (x_BxCxD.astype(jnp.float32) * s).astype(x_BxCxD.dtype)
  # The tokens are the one contracted dim (model_lib.project says why that matters).
  D, V = w_DxV.shape
  with jax.named_scope(model_lib.PROJECT_SCOPE):
    dw = jax.lax.dot_general(xs_BxCxD.reshape(-1, D), g_BxCxV.reshape(-1, V),
                             (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return (dx.astype(x_BxCxD.dtype), dw.astype(w_DxV.dtype),
          np.zeros(t_BxC.shape, dtype=jax.dtypes.float0))


half_chunk_nll.defvjp(_half_chunk_nll_fwd, _half_chunk_nll_bwd)


def chunked_cross_entropy(x_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                          chunk: int) -> jax.Array:
  """Per-token NLL [B, L] of logits x @ w, computed `chunk` positions at a time.

  Each chunk's logits come out of the matmul in >= float32, then log-sum-exp and the target's
  logit. In float32 (or float64) the scan body is rematerialised, so the backward pass
  recomputes one chunk's logits at a time instead of keeping them all; in a half dtype
  `half_chunk_nll` keeps each chunk's logit gradient in that dtype instead (half the bytes of
  the float32 logits, and no recomputation).
  """
  B, L, D = x_BxLxD.shape
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  n = L // chunk

  @jax.checkpoint
  def one_wide(x_BxCxD, t_BxC):
    logits_BxCxV = model_lib.project(x_BxCxD, w_DxV, preferred_element_type=acc)
    target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits_BxCxV, axis=-1) - target_BxC

  def one(x_BxCxD, t_BxC):
    if acc == x_BxCxD.dtype:
      return one_wide(x_BxCxD, t_BxC)
    return half_chunk_nll(x_BxCxD, w_DxV.astype(x_BxCxD.dtype), t_BxC)

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
  with jax.named_scope(SCOPE):   # profiles sort the loss's ops by it (benchmarks/parts.py)
    return chunked_cross_entropy(x_BxLxD, w_DxV, targets_BxL, chunk)
