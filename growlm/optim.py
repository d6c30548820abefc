"""Optimizer: AdamW with warmup then cosine, linear or constant decay, and gradient clipping.

Weight decay applies to matrices and embedding tables only, never to norm gains or biases.
Growth may add per-entry learning-rate multipliers (scale_by_multipliers) or one learning-rate
factor per parameter leaf (scale_by_leaf, init.lr_rescale; docs/design.md 5.11).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from growlm.errors import GrowlmError

SCHEDULES = ("cosine", "linear", "constant")


def make_schedule(lr: float, warmup_steps: int, total_steps: int, decay: str = "cosine",
                  final_lr_ratio: float = 0.1) -> optax.Schedule:
  """Linear warmup from 0 to `lr` over `warmup_steps`, then `decay` to lr * final_lr_ratio."""
  if decay not in SCHEDULES:
    raise GrowlmError(f"train.schedule={decay!r}; accepted: {SCHEDULES}")
  if warmup_steps < 0 or total_steps <= 0:
    raise GrowlmError(f"train.warmup_steps={warmup_steps}, train.num_steps={total_steps}; "
                      "accepted: warmup >= 0, num_steps > 0")
  rest = max(total_steps - warmup_steps, 1)
  if decay == "cosine":
    after = optax.cosine_decay_schedule(lr, rest, alpha=final_lr_ratio)
  elif decay == "linear":
    after = optax.linear_schedule(lr, lr * final_lr_ratio, rest)
  else:
    after = optax.constant_schedule(lr)
  if warmup_steps == 0:
    return after
  warmup = optax.linear_schedule(0.0, lr, warmup_steps)
  return optax.join_schedules([warmup, after], [warmup_steps])


def decay_mask(params: Any) -> Any:
  """True for leaves that take weight decay: every leaf except norm gains and biases."""
  def keep(path, _):
    last = getattr(path[-1], "key", str(path[-1]))
    return not (last == "scale" or last == "bias" or last.endswith("_bias"))
  return jax.tree_util.tree_map_with_path(keep, params)


class MultiplierState(NamedTuple):
  """Per-entry learning-rate multipliers (a params-shaped tree), kept in checkpoints."""
  mults: Any


def scale_by_multipliers() -> optax.GradientTransformation:
  """Multiplies the Adam direction entry by entry (ones at init; growth sets them).

  Placed before weight decay, so decay keeps its usual strength: a parameter stored as W/n
  with multiplier 1/n then moves exactly as the small model's W does (docs/design.md 5.11).
  """
  def init(params):
    return MultiplierState(jax.tree.map(jnp.ones_like, params))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, state.mults), state

  return optax.GradientTransformation(init, update)


class LeafScaleState(NamedTuple):
  """One learning-rate factor per parameter leaf, kept in checkpoints: a float32 vector whose
  i-th entry scales the i-th leaf of `jax.tree.leaves(params)` (ones at init). A vector, not a
  params-shaped tree of scalars: its structure then does not depend on the parameters, so
  optax.tree_map_params (which shards optimizer state like the parameters) replicates it."""
  scales: jax.Array


def scale_by_leaf() -> optax.GradientTransformation:
  """Multiplies each leaf's update by its factor in LeafScaleState (ones at init; growth with
  init.lr_rescale sets them). Placed after weight decay, so it scales the whole step, decay
  included, as a smaller learning rate for that leaf would."""
  def init(params):
    return LeafScaleState(jnp.ones((len(jax.tree.leaves(params)),), jnp.float32))

  def update(updates, state, params=None):
    del params
    leaves, treedef = jax.tree.flatten(updates)
    if len(leaves) != state.scales.shape[0]:
      raise ValueError(f"{len(leaves)} update leaves, {state.scales.shape[0]} leaf scales")
    return jax.tree.unflatten(treedef, [u * state.scales[i].astype(u.dtype)
                                        for i, u in enumerate(leaves)]), state

  return optax.GradientTransformation(init, update)


def leaf_scales(opt_state: Any, params: Any) -> Any:
  """The factors of the LeafScaleState in `opt_state` as a params-shaped tree of scalars, or
  None if it has none."""
  is_leaf = lambda x: isinstance(x, LeafScaleState)
  found = [x for x in jax.tree.leaves(opt_state, is_leaf=is_leaf) if is_leaf(x)]
  if not found:
    return None
  scales = found[0].scales
  return jax.tree.unflatten(jax.tree.structure(params),
                            [scales[i] for i in range(scales.shape[0])])


def set_leaf_scales(opt_state: Any, scales: Any) -> Any:
  """`opt_state` with its LeafScaleState (if it has one) holding `scales`, a params-shaped tree
  of scalars."""
  vector = jnp.stack([jnp.asarray(s, jnp.float32) for s in jax.tree.leaves(scales)])
  is_leaf = lambda x: isinstance(x, LeafScaleState)
  return jax.tree.map(lambda x: LeafScaleState(vector) if is_leaf(x) else x, opt_state,
                      is_leaf=is_leaf)


def make_optimizer(train_cfg: Any, schedule: optax.Schedule | None = None, *,
                   lr_multipliers: bool = False, lr_rescale: bool = False
                   ) -> optax.GradientTransformation:
  """AdamW from the `train` config section (lr, b1, b2, eps, weight_decay, grad_clip, ...).

  The chain is optax.adamw's (scale_by_adam, add_decayed_weights, scale_by_learning_rate),
  written out so that per-parameter learning-rate multipliers can sit after Adam and per-leaf
  learning-rate factors (`lr_rescale`) after weight decay. Without either, the chain (and so
  the state a checkpoint holds) is optax.adamw's.
  """
  if schedule is None:
    schedule = make_schedule(train_cfg.lr, train_cfg.warmup_steps, train_cfg.num_steps,
                             train_cfg.schedule, train_cfg.final_lr_ratio)
  parts = []
  if train_cfg.grad_clip and train_cfg.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(train_cfg.grad_clip))
  parts.append(optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps))
  if lr_multipliers:
    parts.append(scale_by_multipliers())
  parts.append(optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask))
  if lr_rescale:
    parts.append(scale_by_leaf())
  parts.append(optax.scale_by_learning_rate(schedule))
  return optax.chain(*parts)
