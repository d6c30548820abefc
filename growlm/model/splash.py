"""growlm's wrapper around the Pallas TPU splash-attention kernel shipped with JAX.

This module owns one function, `splash_attention`: causal softmax attention with scale
1/sqrt(E) and grouped KV heads (query head h reads kv head h // G, H = K * G), computed by
`jax.experimental.pallas.ops.tpu.splash_attention`. It computes the same function as
growlm.model.attention.naive, on the same shapes: q [B, L, H, E], k and v [B, S, K, E] with
S = L, result [B, L, H, E] in the input dtype (float32 or bfloat16).

What the kernel needs, and how this wrapper provides it:
  * it works per device on [heads, seq, head_dim] for one batch element: the wrapper
    transposes and vmaps over the batch;
  * it does not scale the logits: q is multiplied by 1/sqrt(E) (in float32) first;
  * seq_len must be a multiple of 128 (its lane width; its blocks must divide seq_len): the
    block is the largest of 512, 256, 128 that divides seq_len, and other lengths raise
    GrowlmError;
  * a Pallas call cannot be partitioned by XLA: under a mesh (`jax.set_mesh`), the call runs
    inside `jax.shard_map`, batch split over ('data', 'fsdp') and query heads over 'tensor'
    (each where it divides); kv heads are split over 'tensor' too when it divides K, else
    replicated, and each shard then takes the kv heads its query heads read.
Gradients use the kernel's own custom VJP (Pallas backward kernels for dq and dk/dv).
On CPU, `interpret=True` runs the same kernel in the Pallas interpreter (for tests).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as _sa
from jax.sharding import PartitionSpec as P

from growlm.errors import GrowlmError

Array = jax.Array

LANES = 128                  # the kernel's lane width: seq_len must be a multiple of it
BLOCKS = (512, 256, 128)     # block sizes tried, largest first (512 is the usual TPU choice)
DTYPES = ("float32", "bfloat16")
BATCH_AXES = ("data", "fsdp")
HEAD_AXIS = "tensor"


def block_size(seq_len: int) -> int:
  """The kernel's block for `seq_len`: the largest of BLOCKS dividing it; GrowlmError if none."""
  for b in BLOCKS:
    if seq_len % b == 0 and seq_len >= b:
      return b
  raise GrowlmError(f"splash attention needs seq_len a multiple of {LANES} on TPU, got "
                    f"{seq_len}; accepted: 128, 256, 384, ... (or model.attention=xla)")


def _check(q: Array, k: Array, v: Array) -> None:
  """GrowlmError (one line) unless q, k, v have the shapes and dtypes the kernel accepts."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise GrowlmError(f"splash attention needs q [B, L, H, E] and k, v [B, S, K, E], got ranks "
                      f"{q.ndim}, {k.ndim}, {v.ndim}")
  B, L, H, E = q.shape
  if k.shape != v.shape or k.shape[0] != B or k.shape[1] != L or k.shape[3] != E:
    raise GrowlmError(f"splash attention needs k and v of shape [B={B}, S={L}, K, E={E}] (causal "
                      f"self-attention, S = L), got k {k.shape}, v {v.shape}")
  K = k.shape[2]
  if H % K:
    raise GrowlmError(f"splash attention needs query heads H a multiple of kv heads K, got H={H}, "
                      f"K={K}")
  names = {jnp.dtype(x.dtype).name for x in (q, k, v)}
  if len(names) != 1 or not names <= set(DTYPES):
    raise GrowlmError(f"splash attention needs q, k, v of one dtype in {DTYPES}, got "
                      f"{sorted(names)}")
  block_size(L)


def _kernel(heads: int, seq_len: int, interpret: bool) -> Callable[..., Array]:
  """The splash MHA kernel for one device: `heads` causal heads of length `seq_len`."""
  b = block_size(seq_len)
  sizes = _sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b,
                         block_q_dkv=b, block_kv_dkv=b, block_kv_dkv_compute=b,
                         block_q_dq=b, block_kv_dq=b)
  mask = _sa.MultiHeadMask([_sa.CausalMask((seq_len, seq_len))] * heads)
  return _sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                             interpret=interpret)


def _local(q_BxLxHxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array, interpret: bool) -> Array:
  """Kernel call on this device's arrays; q already scaled, query head h reads kv h // G."""
  _, L, H, _ = q_BxLxHxE.shape
  kernel = _kernel(H, L, interpret)
  to_hle = lambda x: jnp.swapaxes(x, 1, 2)     # [B, L, H, E] <-> [B, H, L, E]
  ctx_BxHxLxE = jax.vmap(kernel)(to_hle(q_BxLxHxE), to_hle(k_BxSxKxE), to_hle(v_BxSxKxE))
  return to_hle(ctx_BxHxLxE)


def _kv_for_shard(k_BxSxKxE: Array, v_BxSxKxE: Array, H: int, G: int,
                  tensor: int) -> tuple[Array, Array]:
  """Inside shard_map, with all K kv heads here but only H / tensor query heads: the kv heads
  those query heads read, so that local query head j reads local kv head j // G_local."""
  Hl = H // tensor
  first = jax.lax.axis_index(HEAD_AXIS) * Hl       # global index of this shard's first q head
  # (Hl a multiple of G would make K a multiple of tensor, and kv heads would be split.)
  if G % Hl == 0:                                   # all local q heads read one kv head
    take = lambda x: jax.lax.dynamic_slice_in_dim(x, first // G, 1, axis=2)
  else:                                             # groups cut by shard edges: one kv per head
    idx = (first + jnp.arange(Hl)) // G
    take = lambda x: jnp.take(x, idx, axis=2)
  return take(k_BxSxKxE), take(v_BxSxKxE)


def _specs(mesh: jax.sharding.AbstractMesh, B: int, H: int, K: int) -> tuple[P, P, bool]:
  """shard_map specs for q/out and for k/v, and whether query heads are split over 'tensor'."""
  sizes = dict(zip(mesh.axis_names, mesh.axis_sizes))
  batch = tuple(a for a in BATCH_AXES if a in sizes)
  if B % math.prod(sizes[a] for a in batch):
    batch = tuple(a for a in batch if B % sizes[a] == 0)[:1]
  batch_part = batch if len(batch) > 1 else (batch[0] if batch else None)
  tensor = sizes.get(HEAD_AXIS, 1)
  heads_split = tensor > 1 and H % tensor == 0
  kv_split = heads_split and K % tensor == 0
  q_spec = P(batch_part, None, HEAD_AXIS if heads_split else None, None)
  kv_spec = P(batch_part, None, HEAD_AXIS if kv_split else None, None)
  return q_spec, kv_spec, heads_split and not kv_split


def splash_attention(q_BxLxHxE: Array, k_BxSxKxE: Array, v_BxSxKxE: Array, *,
                     interpret: bool = False) -> Array:
  """Causal GQA softmax attention (scale 1/sqrt(E)) by the splash kernel: [B, L, H, E].

  Args:
    q_BxLxHxE: queries, rotary-embedded, float32 or bfloat16.
    k_BxSxKxE: keys (S = L, H a multiple of K), same dtype.
    v_BxSxKxE: values, same shape and dtype as the keys.
    interpret: run the Pallas kernel in interpret mode (CPU tests); TPU runs leave it False.

  Under a non-empty mesh (`jax.set_mesh`) the kernel runs in `jax.shard_map` over it (see the
  module docstring); without one it is called directly, on whatever this device holds.
  Raises GrowlmError on shapes or dtypes the kernel cannot take (seq_len not a multiple of 128).
  """
  _check(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE)
  B, _, H, E = q_BxLxHxE.shape
  K = k_BxSxKxE.shape[2]
  dt = q_BxLxHxE.dtype
  # The kernel does not scale its logits; scaling q in float32 keeps bfloat16 rounding to one.
  q_BxLxHxE = (q_BxLxHxE.astype(jnp.float32) * (1.0 / math.sqrt(E))).astype(dt)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or mesh.empty or math.prod(mesh.axis_sizes) == 1:
    return _local(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE, interpret)
  q_spec, kv_spec, pick_kv = _specs(mesh, B, H, K)
  tensor = dict(zip(mesh.axis_names, mesh.axis_sizes)).get(HEAD_AXIS, 1)

  def per_shard(q: Array, k: Array, v: Array) -> Array:
    if pick_kv:
      k, v = _kv_for_shard(k, v, H, H // K, tensor)
    return _local(q, k, v, interpret)

  # check_vma=False: the kernel's pallas_call outputs carry no varying-axes types (JAX refuses
  # them under check_vma=True); its output is split exactly as out_specs say.
  return jax.shard_map(per_shard, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                       out_specs=q_spec, check_vma=False)(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE)
