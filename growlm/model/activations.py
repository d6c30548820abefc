"""GELU (tanh approximation, GPT-2's) with its derivative written out.

The forward pass is `jax.nn.gelu(x, approximate=True)`, bit for bit. The backward pass computes,
in >= float32 from the kept input x alone,

    t = tanh(c (x + 0.044715 x^3)),  c = sqrt(2 / pi)
    d gelu / dx = (1 + t) / 2 + x (1 - t^2) c (1 + 3 * 0.044715 x^2) / 2

where autodiff's graph kept tanh's output as a tensor of its own: compiled for an H100, XLA
wrote and read it again in every layer's backward (2.4 GB per GPT-2 124M step at 16 x 1024),
and the written-out form moves 3.6 GB less in all (benchmarks/README.md, "GPU traffic").
Gradients equal float32 autodiff's to rounding; in bfloat16 they are computed in float32, so
closer to exact than bf16 autodiff's, whose intermediates round (tests/test_model.py).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

_C = math.sqrt(2.0 / math.pi)
_A = 0.044715


@jax.custom_vjp
def gelu_tanh(x: jax.Array) -> jax.Array:
  """GELU, tanh approximation: x / 2 (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))."""
  return jax.nn.gelu(x, approximate=True)


def _fwd(x):
  return gelu_tanh(x), jnp.asarray(x)


def _bwd(x, g):
  xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  t = jnp.tanh(_C * (xf + _A * xf * xf * xf))
  slope = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _C * (1.0 + 3.0 * _A * xf * xf)
  return ((g.astype(xf.dtype) * slope).astype(x.dtype),)


gelu_tanh.defvjp(_fwd, _bwd)
