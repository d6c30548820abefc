"""The training and evaluation loss: per-token cross-entropy in nats, accumulated in float32.

`token_nll` is what the train and eval steps use. It never holds the float32 [B, L, V] logits
of a whole batch: the output layer and the softmax run over chunks of `model.loss_chunk`
sequence positions inside a scan, so the largest float32 logits buffer is [B, c, V] (forward
and backward). In float32 the chunk is rematerialised; in a half dtype `half_nll` keeps each
chunk's logit gradient in that dtype instead (docs/design.md section 9), and the train step may
store the logits themselves in that dtype (`model.logits_dtype`, model/speed.py). `cross_entropy`
on full logits stays as the plain reference; the two agree to float32 rounding
(tests/test_loss.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from growlm import sharding
from growlm.model import decoder as model_lib
from growlm.model import speed
from growlm.model.config import ModelConfig

# loss_chunk=0: the largest chunk whose logits fit in this (benchmarks/README.md, "Speed knobs":
# on an H100, 16 x 1024 tokens with vocab 50304, chunks of 256 positions (824 MB of float32) ran
# 25% faster than chunks of 16 (the CPU's 64 MiB), and the whole [B, L, V] only 2% faster).
AUTO_CHUNK_BYTES = {"cpu": 64 * 2**20, "accelerator": 1 << 30}
SCOPE = "loss"   # the name scope of the head's softmax cross-entropy
# A half-precision loss of up to this many chunks is one Python loop (`half_nll`); more chunks
# run as a scan of one-chunk `half_nll`s, which compiles in constant time but stacks the chunks'
# logit gradients (a zero-filled buffer, and a copy of each chunk out of it for the backward
# products). 16 chunks compile in about 3 s on the CPU, 256 in 14 s. On a TPU the scan stays:
# XLA's TPU compiler planned 4.6 GiB more per v5e chip for GPT-2 124M's step with the loop (it
# held the chunks' float32 logits at once, barrier or not), where for an H100 the loop planned
# slightly less than the scan and moved 4.2 GB less (benchmarks/README.md, "GPU traffic").
MAX_UNROLLED_CHUNKS = 16


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, L] in nats (float32 or wider)."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.promote_types(logits_BxLxV.dtype,
                                                                    jnp.float32)), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]


def chunk_length(requested: int, batch: int, seq_len: int, vocab: int,
                 platform: str | None = None, logit_bytes: int = 4) -> int:
  """Positions per loss chunk: the largest divisor of seq_len <= the requested length (0: auto,
  the largest whose [batch, c, vocab] logits of `logit_bytes` each take <= AUTO_CHUNK_BYTES of
  this platform, and at most half of seq_len, so no chunk is the whole batch's logits)."""
  if requested <= 0:
    kind = "cpu" if (platform or sharding.platform()) == "cpu" else "accelerator"
    requested = max(1, min(seq_len // 2,
                           AUTO_CHUNK_BYTES[kind] // (logit_bytes * batch * vocab)))
  c = min(requested, seq_len)
  while seq_len % c:
    c -= 1
  return c


def model_chunk(cfg: ModelConfig, batch: int, seq_len: int, platform: str | None = None, *,
                train: bool = True) -> int:
  """`chunk_length` for a model's loss: its `loss_chunk`, sized to the logits it stores: the
  train step's model.logits_dtype; float32 for eval (`train=False`), whose pass keeps float32
  logits whatever the train step stores."""
  stored = jnp.dtype(speed.stored_logits_dtype(cfg, platform) if train else jnp.float32)
  return chunk_length(cfg.loss_chunk, batch, seq_len, cfg.vocab_size, platform, stored.itemsize)


def logsumexp_one_pass(x_BxCxV: jax.Array) -> jax.Array:
  """log-sum-exp over the last axis in one read of x: a reduction of (running max, sum of
  exp(x - that max)) pairs, where `jax.nn.logsumexp` reads x twice (the max, then the sum).
  Same value to float32 rounding; not differentiable (the half-precision loss below has its own
  backward pass)."""
  def combine(a, b):
    (ma, sa), (mb, sb) = a, b
    m = jnp.maximum(ma, mb)
    # Rescale the pair whose max is not the larger; `==` also keeps -inf - -inf out of exp.
    return m, (jnp.where(ma == m, sa, sa * jnp.exp(ma - m))
               + jnp.where(mb == m, sb, sb * jnp.exp(mb - m)))
  dtype = x_BxCxV.dtype
  m, s = jax.lax.reduce((x_BxCxV, jnp.ones_like(x_BxCxV)),
                        (np.array(-np.inf, dtype), np.array(0, dtype)), combine,
                        (x_BxCxV.ndim - 1,))
  return m + jnp.log(s)


def _nll_and_grad(x_BxCxD, w_DxV, t_BxC, with_grad=True, half=False):
  """One chunk's NLL [B, C] (logits, log-sum-exp, target) and, if with_grad, its gradient with
  respect to the logits, softmax - one_hot, rounded to x's (half) dtype. The logits are float32,
  or, with `half` and with_grad, x's dtype (the product accumulating in float32; the arithmetic
  after it in float32, on the rounded values)."""
  stored = x_BxCxD.dtype if half and with_grad else jnp.float32
  logits_BxCxV = model_lib.project(x_BxCxD, w_DxV, preferred_element_type=stored)
  logits_BxCxV = logits_BxCxV.astype(jnp.float32)
  # One read of the float32 logits where bandwidth bounds the step; on a CPU, whose compute
  # bounds it, XLA's two plain reductions are faster (the paired one ran a bf16 loss at B 4,
  # L 1024, vocab 1000 in 29 ms against 14).
  lse_BxC = (jax.nn.logsumexp(logits_BxCxV, axis=-1) if sharding.platform() == "cpu"
             else logsumexp_one_pass(logits_BxCxV))
  target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
  if not with_grad:
    return lse_BxC - target_BxC, None
  onehot = jnp.arange(w_DxV.shape[1]) == t_BxC[..., None]
  g_BxCxV = (jnp.exp(logits_BxCxV - lse_BxC[..., None]) - onehot).astype(x_BxCxD.dtype)
  return lse_BxC - target_BxC, g_BxCxV


def _half_chunks(x_BxLxD, w_DxV, t_BxL, chunk, with_grad, half=False):
  """Each chunk's NLL (and logit gradient), the chunks in order: a chunk's product waits, through
  an optimization barrier, for the previous chunk's last read of its float32 logits, so one
  chunk's logits are live at a time however XLA schedules."""
  out, last = [], None
  for i in range(x_BxLxD.shape[1] // chunk):
    x_BxCxD, t_BxC = x_BxLxD[:, i * chunk:(i + 1) * chunk], t_BxL[:, i * chunk:(i + 1) * chunk]
    if last is not None:
      x_BxCxD, _ = jax.lax.optimization_barrier((x_BxCxD, last))
    nll_BxC, g_BxCxV = _nll_and_grad(x_BxCxD, w_DxV, t_BxC, with_grad, half)
    out.append((nll_BxC, g_BxCxV))
    last = nll_BxC if g_BxCxV is None else g_BxCxV
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def half_nll(x_BxLxD: jax.Array, w_DxV: jax.Array, t_BxL: jax.Array, chunk: int,
             half_logits: bool) -> jax.Array:
  """Per-token NLL [B, L] of half-precision (bfloat16/float16) x @ w, logits in float32,
  `chunk` positions at a time (a Python loop: each chunk's tensors are buffers of their own).
  With `half_logits`, the differentiated pass stores the logits in x's dtype (`_nll_and_grad`);
  the plain pass (eval) keeps them in float32.

  Differentiated, the forward pass also writes d nll / d logits (softmax - one_hot) in the half
  dtype, and the backward pass is two half-precision products per chunk with float32
  accumulation that scale rows by the incoming cotangent: no logits are recomputed, no float32
  [B, L, V] tensor is kept or revisited, and no product runs in float32. Each chunk's float32
  logits are written once and read twice (one-pass log-sum-exp, then the gradient). Plain
  autodiff of a checkpointed chunk recomputed the head's matmul, made three more float32 passes
  over the logits and gave the float32 cotangent to two TF32 matmuls: on an H100 (GPT-2 124M,
  16 x 1024, vocab 50304) about 16 of a 51 ms step went to the loss; and a scan over the chunks
  stacked the logit gradients in a zero-filled buffer and copied each out again for the
  backward products (benchmarks/README.md, "GPU" and "GPU traffic")."""
  del half_logits   # the plain pass keeps float32 logits
  return jnp.concatenate([n for n, _ in _half_chunks(x_BxLxD, w_DxV, t_BxL, chunk, False)], 1)


def _half_nll_fwd(x_BxLxD, w_DxV, t_BxL, chunk, half_logits):
  out = _half_chunks(x_BxLxD, w_DxV, t_BxL, chunk, True, half_logits)
  return (jnp.concatenate([n for n, _ in out], 1),
          (tuple(g for _, g in out), x_BxLxD, w_DxV, t_BxL))


def _half_nll_bwd(chunk, half_logits, res, s_BxL):
  del half_logits
  grads, x_BxLxD, w_DxV, t_BxL = res
  D, V = w_DxV.shape
  dx, dw = [], None
  for i, g_BxCxV in enumerate(grads):
    s = s_BxL[:, i * chunk:(i + 1) * chunk].astype(jnp.float32)[..., None]
    x_BxCxD = x_BxLxD[:, i * chunk:(i + 1) * chunk]
    dx.append((model_lib.project(g_BxCxV, w_DxV.T, preferred_element_type=jnp.float32)
               * s).astype(x_BxLxD.dtype))
    xs_BxCxD = (x_BxCxD.astype(jnp.float32) * s).astype(x_BxLxD.dtype)
    # The tokens are the one contracted dim (model_lib.project says why that matters).
    with jax.named_scope(model_lib.PROJECT_SCOPE):
      dw_i = jax.lax.dot_general(xs_BxCxD.reshape(-1, D), g_BxCxV.reshape(-1, V),
                                 (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    dw = dw_i if dw is None else dw + dw_i
  return (jnp.concatenate(dx, 1), dw.astype(w_DxV.dtype),
          np.zeros(t_BxL.shape, dtype=jax.dtypes.float0))


half_nll.defvjp(_half_nll_fwd, _half_nll_bwd)


def chunked_cross_entropy(x_BxLxD: jax.Array, w_DxV: jax.Array, targets_BxL: jax.Array,
                          chunk: int, half_logits: bool = False) -> jax.Array:
  """Per-token NLL [B, L] of logits x @ w, computed `chunk` positions at a time.

  Each chunk's logits come out of the matmul in >= float32, then log-sum-exp and the target's
  logit. In float32 (or float64) a scan over the chunks is rematerialised, so the backward pass
  recomputes one chunk's logits at a time instead of keeping them all; in a half dtype
  `half_nll` keeps each chunk's logit gradient in that dtype instead (half the bytes of the
  float32 logits, and no recomputation), over all chunks at once up to MAX_UNROLLED_CHUNKS
  (not on a TPU). `half_logits`: half_nll's.
  """
  B, L, D = x_BxLxD.shape
  acc = jnp.promote_types(x_BxLxD.dtype, jnp.float32)
  n = L // chunk
  if acc != x_BxLxD.dtype:
    w_DxV = w_DxV.astype(x_BxLxD.dtype)
    if n <= MAX_UNROLLED_CHUNKS and sharding.platform() != "tpu":
      return half_nll(x_BxLxD, w_DxV, targets_BxL, chunk, half_logits)
    one = lambda x_BxCxD, t_BxC: half_nll(x_BxCxD, w_DxV, t_BxC, chunk, half_logits)
  else:
    @jax.checkpoint
    def one(x_BxCxD, t_BxC):
      logits_BxCxV = model_lib.project(x_BxCxD, w_DxV, preferred_element_type=acc)
      target_BxC = jnp.take_along_axis(logits_BxCxV, t_BxC[..., None], axis=-1)[..., 0]
      return jax.nn.logsumexp(logits_BxCxV, axis=-1) - target_BxC

  if n == 1:
    return one(x_BxLxD, targets_BxL)
  x_NxBxCxD = jnp.moveaxis(x_BxLxD.reshape(B, n, chunk, D), 1, 0)
  t_NxBxC = jnp.moveaxis(targets_BxL.reshape(B, n, chunk), 1, 0)
  _, nll_NxBxC = jax.lax.scan(lambda carry, xt: (carry, one(*xt)), None, (x_NxBxCxD, t_NxBxC))
  return jnp.moveaxis(nll_NxBxC, 0, 1).reshape(B, L)


def token_nll(cfg: ModelConfig, params, inputs_BxL: jax.Array, targets_BxL: jax.Array, *,
              dropout_rng: jax.Array | None = None, train: bool = True) -> jax.Array:
  """Per-token NLL [B, L] of the model on a batch, without a whole-batch logits tensor.
  `train=False` (eval: not differentiated) sizes auto chunks to its float32 logits."""
  x_BxLxD, w_DxV = model_lib.hidden(cfg, params, inputs_BxL, dropout_rng=dropout_rng)
  B, L = targets_BxL.shape
  chunk = model_chunk(cfg, B, L, train=train)
  with jax.named_scope(SCOPE):   # profiles sort the loss's ops by it (benchmarks/parts.py)
    return chunked_cross_entropy(x_BxLxD, w_DxV, targets_BxL, chunk, speed.half_logits(cfg))
