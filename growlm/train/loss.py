"""The training and evaluation loss: per-token cross-entropy in nats, accumulated in float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """Per-token negative log-likelihood [B, L] in nats (float32 or wider)."""
  logp = jax.nn.log_softmax(logits_BxLxV.astype(jnp.promote_types(logits_BxLxV.dtype,
                                                                    jnp.float32)), axis=-1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], axis=-1)[..., 0]
