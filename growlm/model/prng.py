"""Threefry-2x32 random bits as straight-line array arithmetic: the same bits as jax's default
generator, drawn faster where jax runs the hash as a loop.

jax's default key type hashes counters with Threefry-2x32 (20 rounds; Salmon et al., "Parallel
random numbers: as easy as 1, 2, 3", SC 2011). On the CPU its lowering keeps the 20 rounds as a
5-step loop to compile quickly; each step then reads and writes the whole counter array, and the
hash cannot fuse with what follows (the uniform and the inverse error function of a truncated
normal). Written here as plain uint32 arithmetic, XLA fuses counter, hash and conversion into
one pass over the output, split over the threads. On accelerators jax already lowers the hash
this way, so nothing changes there but the code path.

`like_key(data, like)` wraps key data so that `jax.random` draws from it exactly what a key of
`like`'s type draws: through this module's hash when `like` is a Threefry key (typed or raw
uint32) and jax's partitionable counters are on (the default since jax 0.5), through `like`'s
own generator otherwise. tests/test_model.py checks the bits against the jax generator for
every bit width and for counters above 2**16.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import random as jex_random

# Threefry-2x32's rotation constants (two groups of four rounds, alternating) and key parity.
_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)
_THREEFRY = jex_random.threefry_prng_impl


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """The Threefry-2x32 hash of counter pairs (x0, x1) under key (k0, k1), all uint32."""
  ks = (k0, k1, k0 ^ k1 ^ _PARITY)
  x0, x1 = x0 + ks[0], x1 + ks[1]
  for group in range(5):
    for r in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
    x0 = x0 + ks[(group + 1) % 3]
    x1 = x1 + ks[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def _random_bits(key: jax.Array, bit_width: int, shape: tuple[int, ...]) -> jax.Array:
  """jax's partitionable Threefry bits: element i hashes the 64-bit counter i (here below 2**32,
  so its high word is 0) and keeps the xor of the two output words (both words for 64 bits)."""
  size = math.prod(shape)
  if size >= 2 ** 32 or not jax.config.jax_threefry_partitionable:
    return _THREEFRY.random_bits(key, bit_width, shape)
  # The row-major index as a sum of per-axis iotas (not a reshaped flat iota), so that XLA's
  # partitioner can split it along any axis like the array it numbers.
  lo = jnp.zeros(shape, np.uint32)
  for axis in range(len(shape)):
    lo = lo + lax.broadcasted_iota(np.uint32, shape, axis) * np.uint32(math.prod(shape[axis + 1:]))
  b0, b1 = threefry2x32(key[0], key[1], jnp.zeros_like(lo), lo)
  if bit_width == 64:
    return (b0.astype(np.uint64) << np.uint64(32)) | b1.astype(np.uint64)
  bits = b0 ^ b1
  return bits if bit_width == 32 else bits.astype(np.dtype(f"uint{bit_width}"))


STRAIGHT_THREEFRY = jex_random.define_prng_impl(
    key_shape=(2,), seed=_THREEFRY.seed, split=_THREEFRY.split, random_bits=_random_bits,
    fold_in=_THREEFRY.fold_in, name="growlm_straight_threefry2x32", tag="gsf")


def key_data(key: jax.Array) -> jax.Array:
  """The uint32 words of a typed key; a raw (legacy uint32) key is its own data."""
  return jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key


def like_key(data: jax.Array, like: jax.Array) -> jax.Array:
  """A typed key of `data` (key words) that draws what a key of `like`'s type would draw."""
  if jnp.issubdtype(like.dtype, jax.dtypes.prng_key):
    if str(like.dtype) != "key<fry>":   # not jax's Threefry: its own generator
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(like))
  elif jax.config.jax_default_prng_impl != "threefry2x32":   # a raw key of another generator
    return data
  return jax.random.wrap_key_data(data, impl=STRAIGHT_THREEFRY)
