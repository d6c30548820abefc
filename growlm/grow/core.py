"""Growth as a pure map of parameter trees: (src params, src cfg, dst cfg, plan, rng) -> dst.

How it works. Each parameter is grown axis by axis from its logical names. For every grown
axis an index map says, for each target position, which source position it copies (or none:
a new position), with a value multiplier `a` for copied entries (tiling divides readers by n,
norm gains are rescaled by sqrt(D/D'), W_q by the head_dim temperature) and a gradient
multiplier `b` (how the copy's gradient relates to the source's, used to grow Adam's moments).
New entries are filled by kind, in priority order: zero (readers of a new unit: it starts
silent), mean (mean_fill writers of new residual coordinates), noise (fresh weights of the
target's own initialiser, times a scale) and free (entries whose input is exactly zero, so any
value keeps the function: symmetry noise or zero). Then layers are placed (depth.py).
docs/design.md, section 5, gives the mathematics; tests prove each rule.

On device (jitted by init/source.py) growth reads the source and writes the target: maps and
masks are small broadcasting constants; fresh init only where read, multipliers too; a leaf whose
new positions are appended is joined by concatenation, not selected, on a GPU (assemble.py), so
the draw is evaluated only at the entries it writes.

Dimension letters as in growlm.model: D d_model, F mlp_dim, H heads, K kv heads, E head_dim.
"""

from __future__ import annotations

import math
import zlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from growlm import trees
from growlm.errors import GrowlmError
from growlm.grow.assemble import appended, assemble, assemble_layers, block
from growlm.grow.assemble import enabled as assembles
from growlm.grow.depth import DEPTH_WRITERS, depth_exact, grow_depth
from growlm.grow.fresh import fresh_layers, fresh_leaves, fresh_paths, late_width
from growlm.grow.plan import (EXACT_WIDTH, FREE, MEAN, NOISE, NORM_LEAVES, ZERO, GrowthPlan,
                              layer_sources)
from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig

_RESIDUAL_WRITERS = {"embed", "pos_embed", "out", "out_bias", "wo", "wo_bias"}

# Every ModelConfig field, by what growth does with it (tests check that none is left out, so a
# new field has to be decided here):
# - sizes growth may increase, never shrink;
_SIZE_FIELDS = ("d_model", "mlp_dim", "n_heads", "n_kv_heads", "head_dim", "n_layers", "max_len")
# - kept: the target's must equal the source's, since each one changes the function the copied
#   weights compute (rope_theta only where positions='rope'; learned positions never read it);
_KEPT_FIELDS = ("vocab_size", "norm", "positions", "rope_theta", "mlp", "use_bias", "qkv_bias",
                "tie_embeddings")
# - computed by growth (grown_config): the target's own value is replaced;
_COMPUTED_FIELDS = ("norm_eps",)
# - the target's own: they set precision (dtype, param_dtype: is_exact speaks of exact
#   arithmetic), training only (dropout_rate: eval runs without dropout; remat: memory), speed
#   (attention, scan_unroll, loss_chunk: kernels computing the same function; logits_dtype:
#   the train step's rounding of its logits, never eval's or a report's), or the scale of
#   fresh entries (init_std: new entries are readers' zeros, free entries, or writers of silent
#   units in exact plans; `noise` is approximate anyway), never the grown function.
_TARGET_FIELDS = ("dtype", "param_dtype", "dropout_rate", "init_std", "remat", "attention",
                  "scan_unroll", "loss_chunk", "logits_dtype")


class AxisMap(NamedTuple):
  """How one axis of one parameter grows."""
  index: np.ndarray   # [T] source position per target position, -1 for new
  a: np.ndarray       # [T] value multiplier of copied entries
  b: np.ndarray       # [T] gradient multiplier of copied entries
  fill: np.ndarray    # [T] fill kind of new positions (0 at copied positions)
  zero_sum: int = 0   # >1: copies along this axis take noise summing to zero over n copies


class Grown(NamedTuple):
  """What `grow` returns. The scale trees are None where they were not built (scales=False)."""
  params: Any         # target parameters
  config: ModelConfig  # target config (norm_eps may be rescaled, see grown_config)
  value_scale: Any    # per-entry `a` (1 for new entries): learning-rate multipliers
  grad_scale: Any     # per-entry `b` (0 for new entries): maps Adam moments
  layer_map: tuple    # per target layer: (source layer, is_new)


def grown_config(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan) -> ModelConfig:
  """The target config growth produces: `dst` (validated against `src`) with norm_eps set by
  growth, whatever `dst.norm_eps` says: the source's norm_eps * D/D' where the method pads a
  growing residual stream (zeros, noise, mean_fill), so norm statistics are preserved, else the
  source's norm_eps unchanged. `grow` builds and returns its params for this config."""
  validate(src, dst, plan)
  if plan.width in ("zeros", "noise", "mean_fill") and dst.d_model != src.d_model:
    return dst.replace(norm_eps=src.norm_eps * src.d_model / dst.d_model)
  return dst.replace(norm_eps=src.norm_eps)


def is_exact(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan) -> bool:
  """Whether growing `src` into `dst` by `plan` is function preserving (in exact arithmetic).

  Runs `validate` first and raises its GrowlmError for a growth that `grow` refuses: asking
  whether an impossible growth is exact is itself a mistake, so such a growth is never answered
  True (nor False). A plan with require_exact=True that is not exact is refused the same way."""
  validate(src, dst, plan)
  return _exact(src, dst, plan)


def _exact(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan) -> bool:
  """is_exact without validation (validate itself asks it for require_exact)."""
  width_grows = any(getattr(dst, f) != getattr(src, f)
                    for f in ("d_model", "mlp_dim", "n_heads", "n_kv_heads", "head_dim"))
  # Zero padding keeps new units silent; only a padded residual stream under LayerNorm shifts
  # the norm's mean (docs/design.md 5.3).
  width_ok = not width_grows or plan.width in EXACT_WIDTH or (
      plan.width == "zeros" and (src.norm == "rmsnorm" or dst.d_model == src.d_model))
  depth_ok = depth_exact(src.n_layers, dst.n_layers, plan)
  rope_ok = not (dst.positions == "rope" and dst.head_dim % src.head_dim)
  return width_ok and depth_ok and rope_ok


def validate(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan) -> None:
  """Refuses plans growth cannot honour, with one line naming the field and both values."""
  for f in _KEPT_FIELDS:
    if f == "rope_theta" and src.positions != "rope":
      continue  # unused by learned positions (positions itself must match, checked first)
    if getattr(src, f) != getattr(dst, f):
      raise GrowlmError(f"growth: {f} {getattr(src, f)!r} -> {getattr(dst, f)!r}; accepted: "
                        f"the source's {f} (growth keeps {', '.join(_KEPT_FIELDS)})")
  for f in _SIZE_FIELDS:
    if getattr(dst, f) < getattr(src, f):
      raise GrowlmError(f"growth: {f} {getattr(src, f)} -> {getattr(dst, f)}; shrinking is not "
                        "growth (accepted: target >= source)")
  if dst.q_per_kv < src.q_per_kv:
    raise GrowlmError(f"growth: query heads per KV head {src.q_per_kv} -> {dst.q_per_kv}; "
                      "accepted: n_heads/n_kv_heads may not shrink (keeps GQA grouping)")
  if plan.width == "tile" and dst.d_model % src.d_model:
    raise GrowlmError(f"growth: width=tile needs an integer d_model ratio, got {src.d_model} -> "
                      f"{dst.d_model}; use mean_fill (LayerNorm) or zeros (RMSNorm) for any ratio")
  if plan.width == "mean_fill" and src.norm != "layernorm" and dst.d_model != src.d_model:
    raise GrowlmError("growth: width=mean_fill is exact under LayerNorm only; under RMSNorm use "
                      "width=zeros (exact there) or tile")
  if (dst.positions == "rope" and dst.head_dim % src.head_dim
      and (plan.width in EXACT_WIDTH or plan.require_exact)):
    raise GrowlmError(f"growth: head_dim {src.head_dim} -> {dst.head_dim} under RoPE is exact "
                      "only for an integer ratio; accepted: a multiple of the source head_dim")
  # Layer placement (new_layer_indices count and range) fails here, before any array work.
  layer_sources(src.n_layers, dst.n_layers, plan)
  if plan.require_exact and not _exact(src, dst, plan):
    raise GrowlmError(f"growth: plan {plan.name} is not function preserving for "
                      f"{src.norm} ({src.d_model}->{dst.d_model}); require_exact=True refuses it")


def _leaf_role(path: tuple[str, ...], axis: str, tied: bool) -> str:
  """reader | writer | norm | final_norm_tied | q_dim | new_rows, for one axis of one leaf."""
  leaf = path[-1]
  if axis == "embed":
    if leaf in NORM_LEAVES:
      return "final_norm_tied" if path[0] == "final_norm" and tied else "norm"
    return "writer" if leaf in _RESIDUAL_WRITERS else "reader"
  if axis == "pos":
    return "new_rows"
  if axis == "head_dim" and leaf.startswith("query"):
    return "q_dim"
  # A unit (MLP unit, head, KV head, head dim) is written by wi*/query/key/value, read by wo/out.
  return "reader" if leaf in ("wo", "out") else "writer"


def _axis_map(role: str, axis: str, s: int, t: int, src: ModelConfig, dst: ModelConfig,
              plan: GrowthPlan, is_bias: bool = False) -> AxisMap:
  """The index map and multipliers for one axis of size s -> t."""
  ones = np.ones(t)
  if axis == "embed":
    if plan.width == "tile":
      n = t // s
      index = np.arange(t) % s
      fill = np.zeros(t, int)
      if role in ("reader", "final_norm_tied"):
        return AxisMap(index, ones / n, ones, fill, zero_sum=n if role == "reader" else 0)
      return AxisMap(index, ones, ones / n, fill)
    index = np.where(np.arange(t) < s, np.arange(t), -1)
    new = index < 0
    if role in ("norm", "final_norm_tied"):
      # Norm gains: old * sqrt(D/D') (biases keep their values); new entries are set in
      # grow_leaf.
      r = 1.0 if is_bias else math.sqrt(s / t)
      return AxisMap(index, ones * r, ones / r, np.where(new, NOISE, 0))
    if plan.width == "noise":
      kind = NOISE
    elif role == "writer":
      kind = MEAN if plan.width == "mean_fill" else ZERO
    else:
      kind = FREE  # reads a coordinate that is exactly zero after the norm
    return AxisMap(index, ones, ones, np.where(new, kind, 0))

  if axis == "head_dim":
    if dst.positions == "rope" and t % s == 0:
      k, h = t // s, s // 2
      index = -np.ones(t, int)
      index[k * np.arange(h)] = np.arange(h)          # old pair i -> new pair k*i
      index[t // 2 + k * np.arange(h)] = h + np.arange(h)
    else:
      index = np.where(np.arange(t) < s, np.arange(t), -1)
  elif axis == "heads":
    G, G2 = src.q_per_kv, dst.q_per_kv
    index = -np.ones(t, int)
    old = np.arange(s)
    index[(old // G) * G2 + old % G] = old           # keep each query head on its KV head
  else:
    index = np.where(np.arange(t) < s, np.arange(t), -1)
  new = index < 0
  a = ones.copy()
  if role == "q_dim":
    a = ones * math.sqrt(t / s)                      # softmax temperature of the wider heads
  if plan.width == "noise":
    kind = NOISE
  elif plan.width == "zeros":
    # jnp.pad; free entries may take symmetry noise. New query head dims are not free: new key
    # dims take noise too, so q.k would change; zero queries keep the new dims silent.
    kind = ZERO if role in ("reader", "q_dim") else FREE
  elif role in ("reader", "q_dim"):
    kind = ZERO                                      # the unit starts silent
  elif role == "new_rows":
    kind = NOISE
  else:
    kind = NOISE                                     # fresh weights write the new unit
  return AxisMap(index, a, 1.0 / a, np.where(new, kind, 0))


def _bcast(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
  shape = [1] * ndim
  shape[axis] = v.shape[0]
  return v.reshape(shape)


def _fold(rng, path: tuple[str, ...]):
  return jax.random.fold_in(rng, zlib.crc32("/".join(path).encode()) & 0x7FFFFFFF)


class LeafSpec(NamedTuple):
  """One leaf's width growth, known before any array is read: axes, maps (not `layers`) and,
  broadcastable to the leaf, copied, a, b and fill."""
  names: tuple
  maps: dict
  copied: np.ndarray
  a: np.ndarray
  b: np.ndarray
  fill: np.ndarray


def leaf_specs(src: ModelConfig, cfg: ModelConfig, plan: GrowthPlan, src_params) -> dict:
  """{path: (LeafSpec, target ShapeDtypeStruct, source leaf)}; width growth keeps `layers`."""
  shapes, axes = model_lib.abstract_params(cfg)
  out = {}
  for path in trees.paths(shapes):
    t, s, names = trees.get(shapes, path), trees.get(src_params, path), trees.get(axes, path)
    nd, one = s.ndim, [1] * s.ndim
    maps = {i: _axis_map(_leaf_role(path, name, cfg.tie_embeddings), name, n, m, src, cfg, plan,
                         is_bias=path[-1] == "bias")
            for i, (name, n, m) in enumerate(zip(names, s.shape, t.shape))
            if name != "layers" and n != m}
    copied, fill, a, b = np.ones(one, bool), np.zeros(one, int), np.ones(one), np.ones(one)
    for i, m in maps.items():   # an entry is copied where every axis copies; the top fill wins
      copied, fill = copied & _bcast(m.index >= 0, i, nd), np.maximum(fill, _bcast(m.fill, i, nd))
      a, b = a * _bcast(m.a, i, nd), b * _bcast(m.b, i, nd)
    out[path] = (LeafSpec(tuple(names), maps, copied, a, b, fill), t, s)
  return out


def grow_leaf(x: jax.Array, path: tuple[str, ...], spec: LeafSpec, fresh: jax.Array | None,
              src: ModelConfig, dst: ModelConfig, plan: GrowthPlan, rng) -> jax.Array:
  """One parameter's width growth (the layers axis is left as it is). `fresh`, the target's own
  init of the leaf (on the source's layers), is read only where _needs_fresh says so."""
  if not spec.maps:
    return x
  cuts = appended(spec.maps, plan.symmetry_noise) if assembles() else None
  if cuts is not None:   # the copies are x itself: no gather, and no select (grow/assemble.py)
    shape = tuple(len(spec.maps[i].index) if i in spec.maps else n for i, n in enumerate(x.shape))
    new_value = _new_entries(x, shape, path, spec, fresh, src, dst, plan)
    return assemble(x * jnp.asarray(block(spec.a, cuts), x.dtype), new_value, cuts)
  gathered = x
  for i, m in spec.maps.items():
    gathered = jnp.take(gathered, jnp.asarray(np.maximum(m.index, 0)), axis=i)
  dt = x.dtype
  value = gathered * jnp.asarray(spec.a, dt)
  for i, m in spec.maps.items():
    if m.zero_sum > 1 and plan.symmetry_noise > 0:
      eps = jax.random.normal(_fold(rng, path + ("zero_sum",)), value.shape, dt)
      eps = eps * (plan.symmetry_noise * jnp.std(fresh))
      shape = value.shape[:i] + (m.zero_sum, value.shape[i] // m.zero_sum) + value.shape[i + 1:]
      eps = eps.reshape(shape)
      eps = (eps - eps.mean(axis=i, keepdims=True)).reshape(value.shape)
      value = value + eps
  new_value = _new_entries(x, value.shape, path, spec, fresh, src, dst, plan)
  return jnp.where(jnp.asarray(spec.copied), value, new_value)


def _new_entries(x: jax.Array, shape: tuple, path: tuple[str, ...], spec: LeafSpec,
                 fresh: jax.Array | None, src: ModelConfig, dst: ModelConfig,
                 plan: GrowthPlan) -> jax.Array:
  """The value of every new entry of the leaf, by its fill kind, over the whole target `shape`
  (copied positions hold values nobody reads)."""
  dt = x.dtype
  leaf = path[-1]
  if leaf in NORM_LEAVES:
    # New norm gains: mean_fill makes the new coordinates read as zero (gain 0); the padding
    # methods give them the old gains' rescaled unit value. New norm biases are zero.
    # (tile has no new norm entries: its embed map copies every target coordinate.)
    new_gain = 0.0 if plan.width == "mean_fill" else math.sqrt(src.d_model / dst.d_model)
    return jnp.full(shape, new_gain if leaf == "scale" else 0.0, dt)
  new_value = jnp.zeros(shape, dt)
  if (spec.fill == MEAN).any():
    d_axis = spec.names.index("embed")
    mean = jnp.mean(x, axis=d_axis, keepdims=True)
    for i, m in spec.maps.items():
      if i != d_axis:
        mean = jnp.take(mean, jnp.asarray(np.maximum(m.index, 0)), axis=i)
    new_value = jnp.where(jnp.asarray(spec.fill == MEAN), jnp.broadcast_to(mean, shape),
                          new_value)
  if (spec.fill == NOISE).any():
    noise_scale = plan.noise_scale if plan.width == "noise" else 1.0
    new_value = jnp.where(jnp.asarray(spec.fill == NOISE), fresh * noise_scale, new_value)
  if (spec.fill == FREE).any():
    new_value = jnp.where(jnp.asarray(spec.fill == FREE), fresh * plan.symmetry_noise,
                          new_value)
  return new_value


def scale_trees(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan, params: Any = None,
                specs: dict | None = None) -> tuple[Any, Any]:
  """(value_scale, grad_scale) from the index maps alone (new entries: a = 1, b = 0, as is b in
  zeroed copies' writers), rounded to the source leaf's dtype (`params`', else src.param_dtype;
  or `specs`, leaf_specs already made of them), then the target's. Under jit each leaf is
  computed where it is read: no tree materialises."""
  cfg = grown_config(src, dst, plan)
  sources = layer_sources(src.n_layers, dst.n_layers, plan)
  if specs is None:
    specs = leaf_specs(src, cfg, plan, params or model_lib.abstract_params(src)[0])
  a_tree, b_tree = {}, {}
  for path, (spec, t, s) in specs.items():
    if spec.maps:
      width = [len(spec.maps[i].index) if i in spec.maps else n for i, n in enumerate(s.shape)]
      copied = jnp.asarray(spec.copied)
      a = jnp.broadcast_to(jnp.where(copied, jnp.asarray(spec.a, s.dtype), 1.0), width)
      b = jnp.broadcast_to(jnp.where(copied, jnp.asarray(spec.b, s.dtype), 0.0), width)
    else:
      a = b = jnp.ones(s.shape, s.dtype)
    if path[0] == "layers":
      a, b = grow_depth(a, path, sources, plan, 1.0), grow_depth(b, path, sources, plan, 0.0, 0.0)
    trees.put(a_tree, path, a.astype(t.dtype))
    trees.put(b_tree, path, b.astype(t.dtype))
  return a_tree, b_tree


def grow(params: Any, src: ModelConfig, dst: ModelConfig, plan: GrowthPlan, rng: jax.Array,
         *, scales: bool = True) -> Grown:
  """Grows `params` of `src` into parameters of `dst` following `plan`. Pure and jittable
  (configs and plan static); returns the target params, the config they need (norm_eps may be
  rescaled), the value and gradient multipliers (None with scales=False; see scale_trees) and
  the layer map. Only leaves with fresh entries build (bit for bit) the target's own init."""
  cfg = grown_config(src, dst, plan)
  # A missing leaf or a wrong shape would otherwise surface as a gather error deep in the map.
  trees.check_like(params, model_lib.abstract_params(src)[0], "growth: source")
  sources = layer_sources(src.n_layers, dst.n_layers, plan)
  specs = leaf_specs(src, cfg, plan, params)
  need = fresh_paths(specs, plan, sources)
  fresh_all = dict(zip(need, fresh_leaves(cfg, _fold(rng, ("fresh",)), need,
                                          fresh_layers(need, specs, plan, sources)))
                   ) if need else {}
  out = {}
  for path, (spec, t, x) in specs.items():
    fresh = fresh_all.get(path)
    new = 0.0 if path[-1] in DEPTH_WRITERS else fresh
    if late_width(path, spec, plan):
      value = assemble_layers(
          x, sources, plan, path,
          lambda xs, fr, path=path, spec=spec: grow_leaf(xs, path, spec, fr, src, cfg, plan, rng),
          fresh, new, 0.0)
    elif path[0] == "layers":
      value = grow_leaf(x, path, spec, None if fresh is None else fresh[:src.n_layers], src, cfg,
                        plan, rng)
      value = grow_depth(value, path, sources, plan, new, 0.0)
    else:
      value = grow_leaf(x, path, spec, fresh, src, cfg, plan, rng)
    trees.put(out, path, value.astype(t.dtype))
  a_tree, b_tree = scale_trees(src, dst, plan, specs=specs) if scales else (None, None)
  return Grown(out, cfg, a_tree, b_tree, tuple(sources))


def describe(src: ModelConfig, dst: ModelConfig) -> dict[str, Any]:
  """Which dimensions change: {'d_model': [128, 256], ...}."""
  return {f: [getattr(src, f), getattr(dst, f)] for f in _SIZE_FIELDS
          if getattr(src, f) != getattr(dst, f)}
