"""A grown leaf put together from its pieces, each piece computed only where it lands.

A growth writes each target entry from one of two sides: a copy of a source entry, or a new
value (often the target's own init, a fresh Threefry draw: twenty rounds of integer arithmetic
per value, most of a growth's time on a CPU, and by its arithmetic likely on a GPU). A select
(`jnp.where(copied, copy, new)`) evaluates both of its sides at every entry, so the draw ran
for the copied entries too: for GPT-2 124M -> 355M (mean_fill + identity), 176 million values
drawn, 50 million of them for entries that keep their copy. Here the leaf is built by
concatenation instead (and a gather along the layers, where old and new layers interleave).
Compiled for a GPU, XLA fuses each leaf into one loop that evaluates, for each entry, only the
piece it comes from, so an entry is drawn only where a new value is written, and the growth
moves fewer bytes too (no copy is gathered for a new entry); XLA's CPU compiler still computes
the draw whole first. The values are the same bit for bit (tests/test_grow_assemble.py).
benchmarks/README.md, "Growth assembled without selects", has the figures.

Only on a GPU (`enabled`): XLA's CPU compiler computes the draw whole into temporaries before
the concatenation (88 MiB for growth.py's cpu preset, 1.1 GB for gpt2-124m, where the selects
need none), so a CPU, and a TPU (unmeasured), keep the selects.

`assemble` does the width of one leaf, where every grown axis keeps its source positions in
place and appends the new ones (`appended`; otherwise grow.core keeps the select), and
`assemble_layers` the layers of a depth growth by new identity layers.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from growlm import sharding
from growlm.grow.depth import fill_new_layers, place_layers
from growlm.grow.plan import GrowthPlan


def enabled() -> bool:
  """Whether growth assembles leaves for the platform being traced for: a GPU only."""
  return sharding.platform() == "gpu"


def appended(maps: dict, symmetry_noise: float) -> dict[int, int] | None:
  """{axis: source size} when each grown axis (`maps`: grow.core.LeafSpec.maps) keeps its
  source positions in place and appends the new ones, and no zero-sum symmetry noise is added
  to the copies; else None."""
  cuts = {}
  for i, m in maps.items():
    s = int((m.index >= 0).sum())
    if ((m.zero_sum > 1 and symmetry_noise > 0) or np.any(m.index[:s] != np.arange(s))
        or np.any(m.index[s:] >= 0)):
      return None
    cuts[i] = s
  return cuts


def block(v: np.ndarray, cuts: dict[int, int]) -> np.ndarray:
  """A per-entry constant broadcastable to the target, on the source's positions alone."""
  return v[tuple(slice(0, cuts[i]) if i in cuts and v.shape[i] > 1 else slice(None)
                 for i in range(v.ndim))]


def assemble(copies: jax.Array, new: jax.Array, cuts: dict[int, int]) -> jax.Array:
  """The target leaf from `copies` (the source positions, in place) and `new` (the whole
  target's shape, read at new positions only): along each grown axis in turn, the source
  positions then the appended ones."""
  def build(axes: list[int], new_part: jax.Array) -> jax.Array:
    if not axes:
      return copies
    i = axes[0]
    kept = build(axes[1:], jax.lax.slice_in_dim(new_part, 0, cuts[i], axis=i))
    return jnp.concatenate([kept, jax.lax.slice_in_dim(new_part, cuts[i], None, axis=i)], i)
  return build(sorted(cuts), new)


def _rows(v: jax.Array, idx: np.ndarray) -> jax.Array:
  """v's entries `idx` along axis 0: a slice where they are a range, else a gather."""
  if np.array_equal(idx, np.arange(idx[0], idx[0] + len(idx))):
    return jax.lax.slice_in_dim(v, int(idx[0]), int(idx[0]) + len(idx), axis=0)
  return jnp.take(v, jnp.asarray(idx), axis=0, mode="clip")


def assemble_layers(x: jax.Array, sources: list[tuple[int, bool]], plan: GrowthPlan,
                    path: tuple[str, ...], grow_width: Callable, fresh: jax.Array | None,
                    identity_new: Any, zeroed_copy: Any = None) -> jax.Array:
  """Layers placed (grow.depth, `sources`: layer_sources), then grown in width by
  `grow_width(layers, their rows of fresh)`. With new identity layers, the copied layers are
  grown as one stack and the new ones take `identity_new` (a scalar, or an array of the
  target's layers), and the two stacks are interleaved along axis 0; other depth methods place
  and grow every layer (grow.depth.fill_new_layers), and so does every method off a GPU."""
  is_new = np.array([n for _, n in sources])
  if plan.depth != "identity" or not is_new.any() or not enabled():
    return fill_new_layers(grow_width(place_layers(x, sources), fresh), path, sources, plan,
                           identity_new, zeroed_copy)
  old, new = np.flatnonzero(~is_new), np.flatnonzero(is_new)
  grown = grow_width(_rows(x, np.array([sources[k][0] for k in old])),
                     None if fresh is None else _rows(fresh, old))
  if jnp.ndim(identity_new) == 0:
    added = jnp.full((len(new),) + grown.shape[1:], identity_new,
                     jnp.result_type(identity_new, grown))
  else:
    added = _rows(identity_new, new)
  if new[0] > old[-1]:
    return jnp.concatenate([grown, added], axis=0)
  if old[0] > new[-1]:
    return jnp.concatenate([added, grown], axis=0)
  order = np.argsort(np.concatenate([old, new]), kind="stable")
  return jnp.take(jnp.concatenate([grown, added], axis=0), jnp.asarray(order), axis=0,
                  mode="clip")
