"""Dead units: how many of a growth's new units can train at all, measured on held-out batches.

A new unit whose writing and reading weights are both zero (the seed paper's literal `zeros`
width growth, without symmetry noise) sits at a saddle: every weight of it gets an exactly zero
gradient, so no optimizer ever moves it (docs/design.md 5.9). The preservation report cannot see
this (a dead unit changes no logit), so it is counted here: per kind, how many new units exist
and how many receive a nonzero gradient at the grown point and after one and two optimizer steps.

Units, per target layer (new layers included) unless said otherwise; a unit is alive when the
gradient of any one of its weights is nonzero (exactly: a saddle's gradients are exact zeros):
  mlp        MLP unit f: column f of wi (wi_gate, wi_up under SwiGLU), wi_bias[f], row f of wo;
  heads      query head h: its query (and query_bias) slice and its out slice, not the KV head
             it reads (shared with the other heads of its group);
  kv_heads   KV head k: its key and value (and bias) slices;
  head_dims  head dimension e: entry e of every query, key and value head, and row e of every
             head's out;
  d_model    residual coordinate j (once, not per layer): every entry with j on its embed axis
             (embeddings, every reader's row, every writer's column, norm gains and biases).
New positions are those growth's index maps (core.leaf_specs) mark new: placement keeps the
source's units at their maps' targets (GQA and RoPE place old heads and pairs, not at the front).
The residual stream has no new positions under `tile` (every coordinate is a copy), so there a
coordinate counts as new when its index is >= the source's d_model: the copies the growth added.
Alive says that a unit moves, not that it moves apart from its twin: tiled copies without
symmetry noise move in lockstep (5.8).

Dimension letters as in growlm.model: D d_model, F mlp_dim, H heads, K kv heads, E head_dim,
N n_layers.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from growlm.grow import core
from growlm.grow.plan import GrowthPlan
from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig

# kind -> (logical axis, ModelConfig size field). d_model is the one kind not counted per layer.
KINDS = {"mlp": ("mlp", "mlp_dim"), "heads": ("heads", "n_heads"),
         "kv_heads": ("kv_heads", "n_kv_heads"), "head_dims": ("head_dim", "head_dim"),
         "d_model": ("embed", "d_model")}
STEPS = 2        # optimizer steps taken; the gradient is checked before each and after the last
SGD_LR = 1e-2    # small enough not to blow up a fresh model, large enough not to underflow

LossFn = Callable[[ModelConfig, Any, jax.Array, jax.Array], jax.Array]   # -> per-token NLL


def new_positions(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan) -> dict[str, np.ndarray]:
  """{kind: bool [size in dst]}: the positions along each kind's axis that growth adds."""
  specs = None
  out = {}
  for kind, (axis, field) in KINDS.items():
    s, t = getattr(src, field), getattr(dst, field)
    new = np.zeros(t, bool)
    if axis == "embed" or s == t:
      new[s:] = True     # tile copies count as new (the module docstring says why)
    else:
      if specs is None:
        specs = core.leaf_specs(src, dst, plan, model_lib.abstract_params(src)[0])
      maps = [spec.maps[i] for spec, _, _ in specs.values()
              for i, name in enumerate(spec.names) if name == axis and i in spec.maps]
      new = maps[0].index < 0
    out[kind] = new
  return out


@functools.lru_cache(maxsize=16)
def _axes(cfg: ModelConfig) -> dict:
  """The logical-axes tree of cfg's parameters (cached: each call traces an init)."""
  return model_lib.abstract_params(cfg)[1]


def _alive(grads: Any, cfg: ModelConfig) -> dict[str, jax.Array]:
  """{kind: bool [N, size] (d_model: [D])}: the units with any nonzero gradient entry."""
  axes = _axes(cfg)
  out: dict[str, jax.Array] = {}
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    names = axes
    for k in path:
      names = names[getattr(k, "key", k)]
    moved = g != 0
    for kind, (axis, _) in KINDS.items():
      if axis not in names:
        continue
      keep = {axis} if kind == "d_model" else {axis, "layers"}
      reduced = jnp.any(moved, axis=tuple(i for i, n in enumerate(names) if n not in keep))
      out[kind] = out[kind] | reduced if kind in out else reduced
  return out


def _mean_nll(cfg: ModelConfig, params: Any, inputs_BxL: jax.Array,
              targets_BxL: jax.Array) -> jax.Array:
  """Per-token NLL from full logits: the default loss, for callers without the trainer's."""
  logp = jax.nn.log_softmax(model_lib.apply(cfg, params, inputs_BxL).astype(jnp.float32), -1)
  return -jnp.take_along_axis(logp, targets_BxL[..., None], -1)[..., 0]


def _alive_counts(cfg: ModelConfig, loss_fn: LossFn, params: Any, batches: tuple[dict, ...],
                  new: dict[str, np.ndarray]) -> dict[str, jax.Array]:
  """{kind: [len(batches)] counts}: entry s counts the new units alive after s plain SGD steps,
  step s taken on batches[s]. One program, a scan over the steps: the gradient and the alive
  counts are traced and compiled once, the grown params stay the caller's (the scan's carry is
  the one stepped copy), and only the counts leave the devices (sharded params stay sharded)."""
  def loss(p, batch):
    return jnp.mean(loss_fn(cfg, p, batch["inputs"], batch["targets"]).astype(jnp.float32))

  def step(p, batch):
    grads = jax.grad(loss)(p, batch)
    alive = _alive(grads, cfg)
    counts = {k: jnp.sum(alive[k] & new[k]) if k in alive else jnp.zeros((), jnp.int32)
              for k in new}
    return jax.tree.map(lambda w, g: w - (SGD_LR * g).astype(w.dtype), p, grads), counts

  stacked = jax.tree.map(lambda *b: jnp.stack(b), *batches)
  return jax.lax.scan(step, params, stacked)[1]


_counts = jax.jit(_alive_counts, static_argnums=(0, 1))


def step_program(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan,
                 loss_fn: LossFn | None = None) -> tuple[Callable, Callable] | None:
  """new_unit_report's program for this growth (its SGD steps and counts), jitted and not run
  (`--compile_for` compiles it), with how it takes (the grown params, a batch) as its
  arguments; None for a growth that adds no units (the report takes no step)."""
  new = new_positions(src, dst, plan)
  if not any(m.any() for m in new.values()):
    return None
  return _counts, lambda params, batch: (dst, loss_fn or _mean_nll, params,
                                         (batch,) * (STEPS + 1), new)


def new_unit_report(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan, params: Any,
                    batches: Iterable[dict], loss_fn: LossFn | None = None
                    ) -> dict[str, dict[str, int]]:
  """{kind: {'new', 'alive_after_0', 'alive_after_1', 'alive_after_2'}} for the grown `params`
  of `dst` (the grown config); alive_after_k counts the new units with a nonzero gradient after
  k plain SGD steps (k = 0: the grown model itself), the batches taken in turn (cycled).

  Plain SGD, because its update is the gradient itself: a weight moves exactly where its
  gradient is nonzero, with no state, no weight decay (which shrinks weights that no gradient
  reaches) and no hyperparameter besides a learning rate that only sets the size of the move.
  Adam's first update m/(sqrt(v)+eps) is nonzero exactly where the gradient is, so it would
  give the same answer for "does this unit ever move" at twice the memory (its moments).
  Two steps, because an exact method's new unit moves in two: its reading side (zero) gets a
  gradient at once from the fresh writing side, and the writing side gets one as soon as the
  reading side is nonzero. `loss_fn(cfg, params, inputs, targets)` -> per-token NLL (the
  trainer's token_nll; default: from full logits). A growth that adds no units costs nothing.
  """
  new = new_positions(src, dst, plan)
  layers = {k: 1 if k == "d_model" else dst.n_layers for k in new}
  out = {k: {"new": int(m.sum()) * layers[k], **{f"alive_after_{s}": 0 for s in range(STEPS + 1)}}
         for k, m in new.items()}
  if not any(v["new"] for v in out.values()):
    return out
  batches = list(batches)
  if not batches:
    raise ValueError("new_unit_report needs at least one batch")
  # `new` goes in as numpy: host constants jit replicates onto the params' mesh.
  counts = _counts(dst, loss_fn or _mean_nll, params,
                   tuple(batches[s % len(batches)] for s in range(STEPS + 1)), new)
  for k, n in jax.device_get(counts).items():
    for s in range(STEPS + 1):
      out[k][f"alive_after_{s}"] = int(n[s])
  return out


def format_line(units: dict[str, dict[str, int]] | None) -> str:
  """'new units alive after 1/2 steps: mlp 0/0 of 128, ...' (kinds that grew only)."""
  if units is None:
    return "new units: not measured"
  grown = [f"{k} {v['alive_after_1']}/{v['alive_after_2']} of {v['new']}"
           for k, v in units.items() if v["new"]]
  if not grown:
    return "new units: none (no width growth)"
  return f"new units alive after 1/{STEPS} SGD steps: " + ", ".join(grown)
