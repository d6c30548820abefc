"""Growth plans: which method grows each dimension, and where new layers go."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from growlm.errors import GrowlmError, strict_fields

WIDTH_METHODS = ("zeros", "noise", "mean_fill", "tile")
DEPTH_METHODS = ("identity", "copy", "stack")
DEPTH_POSITIONS = ("append", "prepend", "interleave")
# Methods whose grown model computes the source's function (where the model allows it).
EXACT_WIDTH = ("mean_fill", "tile")


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
  depth: str = "identity"        # identity | copy | stack (new layers)
  depth_position: str = "interleave"  # append | prepend | interleave (identity and copy)
  new_layer_indices: tuple[int, ...] = ()  # explicit target indices of new layers (overrides)
  noise_scale: float = 0.01      # `noise`: std of new entries, as a fraction of the init std
  symmetry_noise: float = 0.0    # zero-sum noise (tile) / noise on free entries (others), exact
  copy_zero_out: bool = True     # `copy`: zero the copies' output projections (then exact)
  require_exact: bool = False    # refuse any growth that cannot be function preserving

  def __post_init__(self):
    if self.width not in WIDTH_METHODS:
      raise GrowlmError(f"growth plan: width={self.width!r}; accepted: {WIDTH_METHODS}")
    if self.depth not in DEPTH_METHODS:
      raise GrowlmError(f"growth plan: depth={self.depth!r}; accepted: {DEPTH_METHODS}")
    if self.depth_position not in DEPTH_POSITIONS:
      raise GrowlmError(f"growth plan: depth_position={self.depth_position!r}; accepted: "
                        f"{DEPTH_POSITIONS}")
    for name in ("noise_scale", "symmetry_noise"):
      v = getattr(self, name)
      if not v >= 0:  # also refuses NaN
        raise GrowlmError(f"growth plan: {name}={v!r}; accepted: a float >= 0")
    object.__setattr__(self, "new_layer_indices", tuple(int(i) for i in self.new_layer_indices))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GrowthPlan":
    return cls(**strict_fields("growth plan", d, {f.name for f in dataclasses.fields(cls)}))

  @property
  def name(self) -> str:
    return f"{self.width}+{self.depth}"


def layer_sources(n_src: int, n_dst: int, plan: GrowthPlan) -> list[tuple[int, bool]]:
  """For each target layer: (source layer index, is_new). New layers also name the source
  layer they copy (copy, stack) or sit after (identity; ignored)."""
  if n_dst < n_src:
    raise GrowlmError(f"growth: n_layers {n_src} -> {n_dst}; accepted: target >= source")
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


def check_layer_sources(sources: Sequence[tuple[int, bool]], n_src: int) -> None:
  olds = [s for s, new in sources if not new]
  assert olds == list(range(n_src)) or not olds, (olds, n_src)
