"""The target's own init where a growth reads it: which leaves, which layers, and the draw.

New entries that take fresh weights (noise and free entries, the non-writers of new identity
layers, the scale of zero-sum noise) read the target model's own initialisation, bit for bit
what `init_params` of the target config would give for the same key, so that a published growth
reproduces. Only those leaves are drawn (model.decoder.init_leaves), each one where it is
written: per-layer leaves are placed (depth) before their width grows, and each target layer
draws the init's layer that the width-first order read. Leaves whose fresh values the growth
scales (noise, symmetry noise) keep the former order and the init's scan: see scaled_fresh.
"""

from __future__ import annotations

import functools

import jax
import numpy as np

from growlm import trees
from growlm.grow.depth import DEPTH_WRITERS, draw_layers
from growlm.grow.plan import FREE, NOISE, NORM_LEAVES, GrowthPlan
from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig


def _needs_fresh(path, spec, plan: GrowthPlan, new_layers: bool) -> bool:
  """Whether the leaf (spec: its grow.core.LeafSpec) reads the target's own init: noise and
  free entries (without symmetry noise, free ones take 0 * fresh, so each zero keeps the sign it
  always had), the scale of zero-sum noise, and the non-writers of new identity layers."""
  if new_layers and plan.depth == "identity" and path[-1] not in DEPTH_WRITERS:
    return True
  if zero_sum_noise(spec, plan):
    return True
  return path[-1] not in NORM_LEAVES and bool(np.isin(spec.fill, (NOISE, FREE)).any())


def zero_sum_noise(spec, plan: GrowthPlan) -> bool:
  """Whether the leaf takes zero-sum symmetry noise (tile's split readers)."""
  return plan.symmetry_noise > 0 and any(m.zero_sum > 1 for m in spec.maps.values())


def fresh_paths(specs: dict, plan: GrowthPlan, sources) -> tuple:
  """The leaves (of `leaf_specs`) a growth reads from the target's own init, in tree order."""
  new_layers = any(n for _, n in sources)
  return tuple(p for p, (spec, _, _) in specs.items()
               if _needs_fresh(p, spec, plan, p[0] == "layers" and new_layers))


def scaled_fresh(spec, plan: GrowthPlan) -> bool:
  """Whether the growth multiplies the leaf's fresh values by a constant other than 0 or 1
  (noise_scale, symmetry_noise). Drawn in the same stretch of program, XLA may fold that constant
  into the initialiser's own scale: an ulp or two off the values growlm gave before."""
  return bool((plan.width == "noise" and plan.noise_scale != 1.0 and (spec.fill == NOISE).any())
              or (plan.symmetry_noise > 0 and (spec.fill == FREE).any()))


def late_width(path, spec, plan: GrowthPlan) -> bool:
  """Whether a per-layer leaf grows depth first, then width on the placed layers, so that each
  fresh value is drawn where it is written (XLA fuses the draw into the write; drawn first and
  then moved between layers, it would run element by element). Zero-sum symmetry noise keeps
  width first (its draw and its scale are per source layer), and so do scaled fresh values,
  drawn in the init's scan over layers as before (bit for bit, at the former speed)."""
  return path[0] == "layers" and not (zero_sum_noise(spec, plan) or scaled_fresh(spec, plan))


def fresh_layers(paths: tuple, specs: dict, plan: GrowthPlan, sources) -> tuple:
  """fresh_leaves' `layers` for a growth: in target order where width grows late (a placed
  copy reads the init's layer of its source's index, as when width went first), else None."""
  return tuple(draw_layers(sources, plan) if late_width(p, specs[p][0], plan) else None
               for p in paths)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def fresh_leaves(cfg: ModelConfig, rng, paths: tuple, layers: tuple | None = None) -> list:
  """The target's own init of the leaves at `paths` alone, bit for bit `init_params(cfg, rng)`'s.
  `layers[i]` lists the layers to draw for per-layer leaf i (model.decoder.init_leaves, each
  leaf drawn in one pass); per-layer leaves without it are drawn in the init's own scan over
  layers (init_params traced whole, XLA dropping the other leaves)."""
  layers = layers or (None,) * len(paths)
  in_scan = [i for i, p in enumerate(paths) if p[0] == "layers" and layers[i] is None]
  rest = [i for i in range(len(paths)) if i not in in_scan]
  out = dict(zip(rest, model_lib.init_leaves(cfg, rng, tuple(paths[i] for i in rest),
                                             tuple(layers[i] for i in rest)))) if rest else {}
  if in_scan:
    full = model_lib.init_params(cfg.replace(attention="naive", scan_unroll=1), rng)
    out.update((i, trees.get(full, paths[i])) for i in in_scan)
  return [out[i] for i in range(len(paths))]
