"""Causal attention kernels behind one switch, `model.attention`.

Every implementation computes the same function: causal softmax attention with scale
1/sqrt(E) and grouped KV heads (query head h reads kv head h // G), on inputs already rotated
by RoPE where the model uses it. Shapes: q [B, L, H, E], k and v [B, S, K, E] (S = L), result
[B, L, H, E] in the compute dtype.

  naive   growlm's own einsums, masked softmax in >= float32: the numerical reference
  xla     `jax.nn.dot_product_attention(implementation='xla')`: plain XLA, any platform
  cudnn   cuDNN fused flash attention (NVIDIA GPU, bfloat16/float16): never builds the
          [L, S] score matrix in memory and skips the masked half
  splash  the Pallas splash-attention kernel (TPU), growlm.model.splash
  blocked plain XLA by blocks of queries, each reading only the keys at or before its block:
          the masked upper triangle is mostly never computed (about (n+1)/2n of the score work
          for n blocks), which is what pays on a CPU (benchmarks/README.md); its gradient is
          flash attention's, from the kept log-sum-exp
  auto    cudnn on a GPU for bfloat16/float16 compute and head_dim a multiple of 8 up to 128;
          splash on a TPU when seq_len is a multiple of 128; blocked on a CPU when seq_len
          splits into blocks (BLOCKS); xla everywhere else

The choice is made when the step is traced, for the platform of the mesh in context (else jax's
default backend; growlm.sharding.platform): a config written on a laptop picks the right kernel
on the pod, and a step compiled on a CPU host for a TPU slice picks the TPU's. An
implementation that cannot run on this platform, dtype or shape is refused with one line naming
what it needs.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from growlm import sharding
from growlm.errors import GrowlmError

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "naive", "blocked")
_HALF = ("bfloat16", "float16")
SPLASH_BLOCK = 128   # splash needs seq_len a multiple of this (its smallest block)
BLOCKS = 4           # query blocks of `blocked` (measured best on a 2-core CPU at seq_len 256)
SAVED_NAMES = ("attn_ctx", "attn_lse")   # what `blocked`'s backward reads, kept under remat
# Every kernel's inputs (after the projections' biases and RoPE), kept on a GPU under the dots
# policies (model/speed.py): unkept, the backward redoes the bias adds (and RoPE) from the kept
# products, and with the layers unrolled XLA also copies the products out to keep them.
INPUT_NAMES = ("attn_q", "attn_k", "attn_v")
# The primitives a fused kernel's forward binds, whose outputs (the context and the softmax
# statistics its backward reads) the remat policies keep as well: jax's cuDNN flash attention
# forward, and Pallas calls (growlm calls Pallas for splash attention only).
KERNEL_FORWARDS = frozenset({"dot_product_attention_fwd", "dot_product_attention_fwd_wrapper",
                             "pallas_call"})
SCOPE = "attend"   # the name scope of the attention kernel's ops

Array = jax.Array


def _platform() -> str:
  return sharding.platform()


def kernel_forward_saveable(prim, *_, **__) -> bool:
  """A jax.checkpoint policy: keep what a fused attention kernel's forward computes (cuDNN's,
  splash's), so that a backward pass under remat does not run the kernel's forward again."""
  return prim.name in KERNEL_FORWARDS


def choose(impl: str, dtype: str, head_dim: int, seq_len: int, platform: str | None = None
           ) -> str:
  """The concrete implementation `impl` stands for here; GrowlmError if it cannot run."""
  platform = platform or _platform()
  if impl not in IMPLEMENTATIONS:
    raise GrowlmError(f"model.attention={impl!r}; accepted: {IMPLEMENTATIONS}")
  cudnn_ok = dtype in _HALF and head_dim % 8 == 0 and head_dim <= 128
  if impl == "auto":
    if platform == "gpu" and cudnn_ok:
      return "cudnn"
    if platform == "tpu" and seq_len % SPLASH_BLOCK == 0:
      return "splash"
    if platform == "cpu" and seq_len % BLOCKS == 0 and seq_len >= 16 * BLOCKS:
      return "blocked"
    return "xla"
  if impl == "cudnn":
    if platform != "gpu":
      raise GrowlmError(f"model.attention='cudnn' needs an NVIDIA GPU, and this run's platform "
                        f"is {platform}; accepted here: auto, xla, blocked, naive")
    if not cudnn_ok:
      raise GrowlmError(f"model.attention='cudnn' needs dtype bfloat16 or float16 and head_dim "
                        f"a multiple of 8 up to 128, got dtype={dtype}, head_dim={head_dim}; "
                        "accepted: auto, xla, blocked, naive for this model")
  if impl == "blocked" and seq_len % BLOCKS:
    raise GrowlmError(f"model.attention='blocked' needs seq_len a multiple of {BLOCKS}, got "
                      f"{seq_len}; accepted: auto, xla, naive for this length")
  if impl == "splash":
    if platform != "tpu":
      raise GrowlmError(f"model.attention='splash' needs a TPU, and this run's platform is "
                        f"{platform}; accepted here: auto, xla, blocked, naive")
    if seq_len % SPLASH_BLOCK:
      raise GrowlmError(f"model.attention='splash' needs seq_len a multiple of {SPLASH_BLOCK}, "
                        f"got {seq_len}; accepted: auto, xla, naive for this length")
  return impl


def naive(q_BxLxHxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array) -> Array:
  """The reference: full [L, S] scores in >= float32, causal mask, softmax, weighted sum."""
  L = q_BxLxHxE.shape[1]
  return _masked(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, jnp.tril(jnp.ones((L, L), dtype=bool)))


def cached(q_BxLxHxE: Array, k_BxTxKxE: Array, v_BxTxKxE: Array, positions_L: Array) -> Array:
  """Attention of L new queries at `positions_L` over a key/value cache of T slots: query l
  reads the slots s <= positions_L[l] (later slots are unwritten or in its future)."""
  T = k_BxTxKxE.shape[1]
  return _masked(q_BxLxHxE, k_BxTxKxE, v_BxTxKxE, jnp.arange(T)[None, :] <= positions_L[:, None])


def _masked(q_BxLxHxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array, mask_LxS: Array) -> Array:
  """Softmax attention with scale 1/sqrt(E) under a boolean mask, scores in >= float32."""
  B, L, H, E = q_BxLxHxE.shape
  K = k_BxSxKxE.shape[2]
  G = H // K
  dt = q_BxLxHxE.dtype
  acc = jnp.promote_types(dt, jnp.float32)
  q_BxLxKxGxE = q_BxLxHxE.reshape(B, L, K, G, E)
  logits_BxKxGxLxS = jnp.einsum("blkge,bske->bkgls", q_BxLxKxGxE, k_BxSxKxE,
                                preferred_element_type=acc) / jnp.sqrt(E).astype(acc)
  logits_BxKxGxLxS = jnp.where(mask_LxS, logits_BxKxGxLxS, jnp.finfo(acc).min)
  probs = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(dt)
  ctx_BxLxKxGxE = jnp.einsum("bkgls,bske->blkge", probs, v_BxSxKxE)
  return ctx_BxLxKxGxE.reshape(B, L, H, E)


def blocked(q_BxLxHxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array, n: int = BLOCKS) -> Array:
  """Causal attention by n blocks of queries: block i scores only keys [0, (i+1)L/n), and only
  its diagonal square needs the mask. Same function as `naive`; scores in >= float32. Its
  gradient is written out (`_blocked_heads`), as flash attention's is."""
  B, L, H, E = q_BxLxHxE.shape
  K = k_BxSxKxE.shape[2]
  G = H // K
  # Heads-major once, so every block is a plain batched matmul over (B, K).
  q_BxKxGxLxE = jnp.transpose(q_BxLxHxE.reshape(B, L, K, G, E), (0, 2, 3, 1, 4))
  k_BxKxSxE = jnp.transpose(k_BxSxKxE, (0, 2, 1, 3))
  v_BxKxSxE = jnp.transpose(v_BxSxKxE, (0, 2, 1, 3))
  ctx_BxKxGxLxE = _blocked_heads(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, n)
  return jnp.transpose(ctx_BxKxGxLxE, (0, 3, 1, 2, 4)).reshape(B, L, H, E)


def _block_scores(q_blk, k_BxKxSxE, i: int, c: int):
  """Block i's scaled, masked scores [B, K, G, c, S] over keys [0, S), S = (i + 1) c, in >= f32."""
  S, E = (i + 1) * c, q_blk.shape[-1]
  acc = jnp.promote_types(q_blk.dtype, jnp.float32)
  s = jnp.einsum("bkgle,bkse->bkgls", q_blk, k_BxKxSxE[:, :, :S],
                 preferred_element_type=acc) * (1.0 / jnp.sqrt(jnp.asarray(E, acc)))
  causal_CxS = jnp.arange(S)[None, :] <= (i * c + jnp.arange(c))[:, None]
  return jnp.where(causal_CxS, s, jnp.finfo(acc).min)


def _blocked_fwd(q, k, v, n):
  """(ctx [B, K, G, L, E], per-query log-sum-exp [B, K, G, L] in >= float32)."""
  c = q.shape[3] // n
  ctx, lse = [], []
  for i in range(n):
    s = _block_scores(q[:, :, :, i * c:(i + 1) * c], k, i, c)
    m = jnp.max(s, axis=-1, keepdims=True)
    e = jnp.exp(s - m)
    total = jnp.sum(e, axis=-1, keepdims=True)
    probs = (e / total).astype(q.dtype)
    ctx.append(jnp.einsum("bkgls,bkse->bkgle", probs, v[:, :, :(i + 1) * c]))
    lse.append((m + jnp.log(total))[..., 0])
  return jnp.concatenate(ctx, axis=3), jnp.concatenate(lse, axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _blocked_heads(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, n):
  return _blocked_fwd(q_BxKxGxLxE, k_BxKxSxE, v_BxKxSxE, n)[0]


def _blocked_heads_fwd(q, k, v, n):
  ctx, lse = _blocked_fwd(q, k, v, n)
  # Named so that the remat policies keep them (model.speed.checkpoint_policy): the backward
  # pass then needs no rerun of the forward's scores, softmax and products.
  ctx, lse = checkpoint_name(ctx, SAVED_NAMES[0]), checkpoint_name(lse, SAVED_NAMES[1])
  return ctx, (q, k, v, ctx, lse)


def _blocked_heads_bwd(n, res, dctx):
  """Flash attention's backward by blocks: p from the saved log-sum-exp, and the softmax's
  gradient through rowsum(dctx * ctx) ([.., c] per block) instead of a reduction over keys."""
  q, k, v, ctx, lse = res
  c, E = q.shape[3] // n, q.shape[-1]
  acc = jnp.promote_types(q.dtype, jnp.float32)
  scale = 1.0 / jnp.sqrt(jnp.asarray(E, acc))
  rows = jnp.sum(dctx.astype(acc) * ctx.astype(acc), axis=-1)           # [B, K, G, L]
  dq, dk, dv = [], jnp.zeros(k.shape, acc), jnp.zeros(v.shape, acc)
  for i in range(n):
    S, blk = (i + 1) * c, slice(i * c, (i + 1) * c)
    q_blk, do_blk = q[:, :, :, blk], dctx[:, :, :, blk]
    p = jnp.exp(_block_scores(q_blk, k, i, c) - lse[:, :, :, blk, None])
    dv = dv.at[:, :, :S].add(jnp.einsum("bkgls,bkgle->bkse", p.astype(q.dtype), do_blk,
                                        preferred_element_type=acc))
    dp = jnp.einsum("bkgle,bkse->bkgls", do_blk, v[:, :, :S], preferred_element_type=acc)
    ds = (p * (dp - rows[:, :, :, blk, None]) * scale).astype(q.dtype)
    dq.append(jnp.einsum("bkgls,bkse->bkgle", ds, k[:, :, :S], preferred_element_type=acc))
    dk = dk.at[:, :, :S].add(jnp.einsum("bkgls,bkgle->bkse", ds, q_blk,
                                        preferred_element_type=acc))
  return (jnp.concatenate(dq, axis=3).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype))


_blocked_heads.defvjp(_blocked_heads_fwd, _blocked_heads_bwd)


def attend(q_BxLxHxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array, impl: str) -> Array:
  """Causal GQA attention by the implementation `impl` (resolved by `choose` first)."""
  impl = choose(impl, jnp.dtype(q_BxLxHxE.dtype).name, q_BxLxHxE.shape[-1],
                q_BxLxHxE.shape[1])
  q_BxLxHxE, k_BxSxKxE, v_BxSxKxE = (checkpoint_name(t, name) for t, name in
                                     zip((q_BxLxHxE, k_BxSxKxE, v_BxSxKxE), INPUT_NAMES))
  with jax.named_scope(SCOPE):   # profiles sort the kernel's ops by it (benchmarks/parts.py)
    return _attend(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, impl)


def _attend(q_BxLxHxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array, impl: str) -> Array:
  if impl == "naive":
    return naive(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE)
  if impl == "blocked":
    return blocked(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE)
  if impl == "splash":
    from growlm.model import splash  # TPU-only dependency (Pallas), imported when used
    return splash.splash_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE)
  return jax.nn.dot_product_attention(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, is_causal=True,
                                      implementation=impl)
