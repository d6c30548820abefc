"""Depth growth: placing source layers (and new ones) along the stacked `layers` axis.

`layer_sources` (plan.py) says, for each target layer, which source layer it takes and whether
it is new; this module applies that map to one leaf and says when the placement alone keeps the
source's function. docs/design.md 5.7 gives the rules.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import numpy as np

from growlm.grow.plan import GrowthPlan, layer_sources

DEPTH_WRITERS = ("out", "out_bias", "wo", "wo_bias")   # a block's writers into the stream


def depth_exact(n_src: int, n_dst: int, plan: GrowthPlan) -> bool:
  """Whether the layer placement keeps the function (in exact arithmetic). New identity blocks
  and zeroed copies add nothing to the stream; a repeated or reordered block changes what the
  next one reads, so layer_ranges are exact only when they list the source's layers in order
  ([[0, N]] or a split of it), and copies without zero-out and stacking never are."""
  if plan.depth == "layer_ranges":
    return [j for j, _ in layer_sources(n_src, n_dst, plan)] == list(range(n_src))
  return n_dst == n_src or plan.depth == "identity" or (
      plan.depth == "copy" and plan.copy_zero_out)


def grow_depth(v: Any, path: tuple[str, ...], sources: list[tuple[int, bool]], plan: GrowthPlan,
               identity_new: Any, zeroed_copy: Any = None) -> Any:
  """Places layers along axis 0: copies of source layers, or new ones. New identity layers take
  `identity_new`; with copy_zero_out, the writers of new copies take `zeroed_copy` (None: kept).
  layer_ranges and stack copy every target layer's source layer as it is."""
  return fill_new_layers(place_layers(v, sources), path, sources, plan, identity_new,
                         zeroed_copy)


def place_layers(v: Any, sources: list[tuple[int, bool]]) -> Any:
  """Each target layer's source layer (layer_sources' index), along axis 0."""
  index = [j for j, _ in sources]
  return v if index == list(range(v.shape[0])) else jnp.take(v, jnp.asarray(index), axis=0)


def fill_new_layers(v: Any, path: tuple[str, ...], sources: list[tuple[int, bool]],
                    plan: GrowthPlan, identity_new: Any, zeroed_copy: Any = None) -> Any:
  """grow_depth's values for new layers, over placed layers `v`."""
  is_new = np.array([n for _, n in sources])
  if not is_new.any():
    return v
  new_b = jnp.asarray(is_new.reshape((-1,) + (1,) * (v.ndim - 1)))
  if plan.depth == "identity":
    return jnp.where(new_b, identity_new, v)
  if (plan.depth == "copy" and plan.copy_zero_out and path[-1] in DEPTH_WRITERS
      and zeroed_copy is not None):
    return jnp.where(new_b, zeroed_copy, v)
  return v


def draw_layers(sources: list[tuple[int, bool]], plan: GrowthPlan) -> tuple[int, ...]:
  """For each target layer, the layer of the target's own init its fresh values come from: a
  new identity layer's own; the source layer's for a copy (its width growth reads the init's
  layer of the source layer's index, as when width grew the source's layers before placing)."""
  return tuple(i if new and plan.depth == "identity" else j
               for i, (j, new) in enumerate(sources))
