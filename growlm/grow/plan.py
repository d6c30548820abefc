"""Growth plans: which method grows each dimension, and where new layers go (or, for
`layer_ranges`, which source layers make up the target)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

from growlm.errors import GrowlmError, strict_fields

WIDTH_METHODS = ("zeros", "noise", "mean_fill", "tile")
DEPTH_METHODS = ("identity", "copy", "stack", "layer_ranges")
DEPTH_POSITIONS = ("append", "prepend", "interleave")
# Methods whose grown model computes the source's function (where the model allows it).
EXACT_WIDTH = ("mean_fill", "tile")
ZERO, MEAN, NOISE, FREE = 4, 3, 2, 1   # fill kinds of new entries; the highest wins
NORM_LEAVES = {"scale", "bias"}        # a norm's leaves: new entries are set, never drawn


def _show(v: Any) -> str:
  """repr(v) on one line: an array's repr spans lines, and messages must stay one line."""
  return " ".join(repr(v).split())


def _layer_indices(v: Any) -> tuple[int, ...]:
  """`new_layer_indices` as a tuple of distinct non-negative ints, or GrowlmError. A tuple (not
  a list) keeps the plan hashable: jit takes it as a static argument. The upper bound needs the
  target's n_layers, so layer_sources checks it."""
  accepted = "a list of distinct integers >= 0 (target layer indices)"
  if not isinstance(v, (list, tuple)):
    raise GrowlmError(f"growth plan: new_layer_indices={_show(v)}; accepted: {accepted}")
  # bool is an int subclass (True would mean layer 1); 1.5 would be truncated by int().
  if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) and i >= 0 for i in v):
    raise GrowlmError(f"growth plan: new_layer_indices={_show(list(v))}; accepted: {accepted}")
  if len(set(v)) != len(v):
    raise GrowlmError(f"growth plan: new_layer_indices={_show(list(v))} repeats an index; "
                      f"accepted: {accepted}")
  return tuple(int(i) for i in v)


def _layer_ranges(v: Any) -> tuple[tuple[int, int], ...]:
  """`layer_ranges` as a tuple of (start, stop) int pairs with 0 <= start < stop, or GrowlmError.
  Configs and flags give lists ([[0, 24], [8, 32]]); tuples keep the plan hashable for jit. The
  upper bound and the total need the source's and target's n_layers, so layer_sources checks
  them."""
  accepted = "pairs [start, stop] of integers with 0 <= start < stop, e.g. [[0, 24], [8, 32]]"
  is_int = lambda i: isinstance(i, numbers.Integral) and not isinstance(i, bool)
  if not isinstance(v, (list, tuple)) or not all(
      isinstance(r, (list, tuple)) and len(r) == 2 and all(is_int(i) for i in r)
      and 0 <= r[0] < r[1] for r in v):
    raise GrowlmError(f"growth plan: layer_ranges={_show(v)}; accepted: {accepted}")
  return tuple((int(a), int(b)) for a, b in v)


@dataclasses.dataclass(frozen=True)
class GrowthPlan:
  """How to grow. Every field is one line of documentation.

  width governs d_model (the residual stream); new MLP units, heads, KV heads and head dims
  follow from it: `zeros` pads every new entry with 0 (the seed paper's jnp.pad), `noise` fills
  them with variance-scaled noise (the paper's "small initialization values"), and the exact
  methods give new units fresh weights on the side that writes them and zeros on the side
  that reads them, so they start silent but trainable.
  """

  width: str = "tile"            # zeros | noise | mean_fill | tile (d_model and new units)
  depth: str = "identity"        # identity | copy | stack | layer_ranges (new layers)
  depth_position: str = "interleave"  # append | prepend | interleave (identity and copy)
  new_layer_indices: tuple[int, ...] = ()  # explicit target indices of new layers (overrides)
  layer_ranges: tuple[tuple[int, int], ...] = ()  # `layer_ranges`: target = these source ranges
  noise_scale: float = 0.01      # `noise`: std of new entries, as a fraction of the init std
  symmetry_noise: float = 0.0    # zero-sum noise (tile) / noise on free entries (others), exact
  copy_zero_out: bool = True     # `copy`: zero the copies' output projections (then exact)
  require_exact: bool = False    # refuse any growth that cannot be function preserving

  def __post_init__(self):
    # Plans also come from Python (tests, notebooks, library callers), not only from flags:
    # every field is checked here by type and value, so a bad one never reaches growth.
    for name, accepted in (("width", WIDTH_METHODS), ("depth", DEPTH_METHODS),
                           ("depth_position", DEPTH_POSITIONS)):
      v = getattr(self, name)
      # isinstance first: `in` on an array or other odd value would not give a clean answer.
      if not isinstance(v, str) or v not in accepted:
        raise GrowlmError(f"growth plan: {name}={_show(v)}; accepted: {accepted}")
    for name in ("noise_scale", "symmetry_noise"):
      v = getattr(self, name)
      # bool is an int subclass: True would silently mean 1.0. inf and NaN would poison every
      # new entry (NaN also compares False, so test finiteness, not just the sign).
      if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
              and v >= 0):
        raise GrowlmError(f"growth plan: {name}={_show(v)}; accepted: a finite number >= 0")
      object.__setattr__(self, name, float(v))
    for name in ("copy_zero_out", "require_exact"):
      v = getattr(self, name)
      # Only real bools: the string 'false' is truthy and would flip the meaning.
      if not isinstance(v, bool):
        raise GrowlmError(f"growth plan: {name}={_show(v)}; accepted: True or False")
    object.__setattr__(self, "new_layer_indices", _layer_indices(self.new_layer_indices))
    object.__setattr__(self, "layer_ranges", _layer_ranges(self.layer_ranges))
    self._check_layer_ranges()

  def _check_layer_ranges(self) -> None:
    """depth='layer_ranges' and the layer_ranges field come together, and nothing that places
    new layers contradicts them: the ranges already place every target layer. depth_position
    is refused only away from its default (interleave), which cannot be told from unset."""
    ranges = [list(r) for r in self.layer_ranges]
    if self.depth == "layer_ranges" and not ranges:
      raise GrowlmError("growth plan: depth='layer_ranges' with layer_ranges=[]; accepted: "
                        "half-open source layer ranges, e.g. layer_ranges=[[0, 24], [8, 32]]")
    if ranges and self.depth != "layer_ranges":
      raise GrowlmError(f"growth plan: layer_ranges={ranges} with depth={self.depth!r}; "
                        "accepted: layer_ranges with depth='layer_ranges'")
    if ranges and self.new_layer_indices:
      raise GrowlmError(f"growth plan: new_layer_indices={list(self.new_layer_indices)} with "
                        "layer_ranges (the ranges place every layer); accepted: one of the two")
    if ranges and self.depth_position != "interleave":
      raise GrowlmError(f"growth plan: depth_position={self.depth_position!r} with layer_ranges "
                        "(the ranges place every layer); accepted: depth_position left at its "
                        "default 'interleave'")

  def to_dict(self) -> dict[str, Any]:
    """The plan as a plain dict (what configs and growth reports hold)."""
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GrowthPlan":
    """Builds a plan from a mapping; unknown keys are an error, not silently dropped."""
    return cls(**strict_fields("growth plan", d, {f.name for f in dataclasses.fields(cls)}))

  @property
  def name(self) -> str:
    """'width+depth', e.g. 'tile+identity'."""
    return f"{self.width}+{self.depth}"


def layer_sources(n_src: int, n_dst: int, plan: GrowthPlan) -> list[tuple[int, bool]]:
  """For each target layer: (source layer index, is_new). New layers also name the source
  layer they copy (copy, stack, layer_ranges) or sit after (identity; ignored)."""
  if n_dst < n_src:
    raise GrowlmError(f"growth: n_layers {n_src} -> {n_dst}; accepted: target >= source")
  if plan.depth == "layer_ranges":
    return _range_sources(n_src, n_dst, plan.layer_ranges)
  if plan.depth == "stack":
    if plan.new_layer_indices:  # stacking appends whole copies: refuse rather than ignore
      raise GrowlmError(f"growth plan: new_layer_indices={list(plan.new_layer_indices)} with "
                        "depth='stack'; accepted: new_layer_indices with identity or copy")
    return [(i % n_src, i >= n_src) for i in range(n_dst)]
  n_new = n_dst - n_src
  if plan.new_layer_indices:
    new = sorted(set(plan.new_layer_indices))
    if len(new) != n_new or any(not 0 <= i < n_dst for i in new):
      raise GrowlmError(f"growth plan: new_layer_indices={list(plan.new_layer_indices)} must "
                        f"name {n_new} distinct indices in [0, {n_dst})")
    is_new = [i in set(new) for i in range(n_dst)]
  elif plan.depth_position == "append":
    is_new = [i >= n_src for i in range(n_dst)]
  elif plan.depth_position == "prepend":
    is_new = [i < n_new for i in range(n_dst)]
  else:  # interleave: old layer j sits at floor(j * n_dst / n_src)
    old_pos = {j * n_dst // n_src for j in range(n_src)}
    is_new = [i not in old_pos for i in range(n_dst)]
  out, j = [], -1
  for i, new in enumerate(is_new):
    if not new:
      j += 1
    out.append((max(j, 0) if new else j, new))
  return out


def _range_sources(n_src: int, n_dst: int, ranges: tuple[tuple[int, int], ...]
                   ) -> list[tuple[int, bool]]:
  """layer_sources for depth='layer_ranges': the concatenated ranges. A layer is new where its
  source already appeared (a repeat), so an in-order first copy of each layer counts as old;
  every target layer copies its source layer either way (weights and Adam moments)."""
  shown = [list(r) for r in ranges]
  if any(b > n_src for _, b in ranges):
    raise GrowlmError(f"growth plan: layer_ranges={shown} reaches past the source's {n_src} "
                      f"layers; accepted: pairs [start, stop] with 0 <= start < stop <= {n_src}")
  total = sum(b - a for a, b in ranges)
  if total != n_dst:
    raise GrowlmError(f"growth plan: layer_ranges={shown} give {total} layers, the target's "
                      f"n_layers is {n_dst}; accepted: ranges whose lengths sum to {n_dst}")
  out, seen = [], set()
  for j in (j for a, b in ranges for j in range(a, b)):
    out.append((j, j in seen))
    seen.add(j)
  return out
