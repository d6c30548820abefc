"""Growing the optimizer state with the parameters (docs/design.md 5.11).

Adam's moments are mapped by the same index maps as the parameters. A copied entry whose
gradient in the grown model is b times the source's (b from `Grown.grad_scale`: 1/n for tiled
writers, 1 for tiled readers, 1/r for gains rescaled by r) gets mu * b and nu * b^2, so Adam's
next step on it equals the source's step; new entries start at zero; the step count (Adam's
bias correction) is kept. With learning-rate multipliers on, each entry's multiplier is its
value scale `a` (1/n for tiled readers), so the grown model takes the small model's step.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from growlm import trees
from growlm.grow import core
from growlm.grow.plan import GrowthPlan
from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig
from growlm.optim import MultiplierState


def _gather(x, path, names, src: ModelConfig, dst: ModelConfig, plan: GrowthPlan, sources):
  """Source-shaped leaf -> target-shaped leaf by the index maps alone (no fills)."""
  for i, name in enumerate(names):
    s = x.shape[i]
    if name == "layers":
      x = jnp.take(x, jnp.asarray([j for j, _ in sources]), axis=0)
      continue
    t = _target_size(dst, name, s)
    if s == t:
      continue
    role = core._leaf_role(path, name, dst.tie_embeddings)  # pylint: disable=protected-access
    m = core._axis_map(role, name, s, t, src, dst, plan,  # pylint: disable=protected-access
                       is_bias=path[-1] == "bias")
    x = jnp.take(x, jnp.asarray(np.maximum(m.index, 0)), axis=i)
  return x


def _target_size(cfg: ModelConfig, name: str, s: int) -> int:
  sizes = {"embed": cfg.d_model, "mlp": cfg.mlp_dim, "heads": cfg.n_heads,
           "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "pos": cfg.max_len,
           "vocab": cfg.vocab_size}
  return sizes.get(name, s)


def grow_moments(tree: Any, grown: core.Grown, src: ModelConfig, plan: GrowthPlan,
                 power: int) -> Any:
  """Maps a params-shaped moment tree: copied entries * grad_scale**power, new entries 0."""
  _, axes = model_lib.abstract_params(grown.config)
  def one(path, x):
    keys = tuple(k.key for k in path)
    names = trees.get(axes, keys)
    b = trees.get(grown.grad_scale, keys)
    g = _gather(x, keys, names, src, grown.config, plan, grown.layer_map)
    return (g * b.astype(g.dtype) ** power).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(one, tree)


def grow_opt_state(src_state: Any, grown: core.Grown, src: ModelConfig, plan: GrowthPlan,
                   target_optimizer: optax.GradientTransformation) -> Any:
  """The target optimizer's state: Adam moments grown, count kept, multipliers set."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adams = [x for x in jax.tree.leaves(src_state, is_leaf=is_adam) if is_adam(x)]
  if len(adams) != 1:
    raise ValueError(f"expected one Adam state in the source optimizer state, found {len(adams)}")
  adam = adams[0]
  new_adam = optax.ScaleByAdamState(count=adam.count,
                                    mu=grow_moments(adam.mu, grown, src, plan, 1),
                                    nu=grow_moments(adam.nu, grown, src, plan, 2))
  fresh = target_optimizer.init(grown.params)
  return set_multipliers(jax.tree.map(lambda x: new_adam if is_adam(x) else x, fresh,
                                      is_leaf=is_adam), grown.value_scale)


def set_multipliers(opt_state: Any, value_scale: Any) -> Any:
  """Puts the growth's value scales into a MultiplierState (if the optimizer has one)."""
  is_mult = lambda x: isinstance(x, MultiplierState)
  return jax.tree.map(lambda x: MultiplierState(value_scale) if is_mult(x) else x, opt_state,
                      is_leaf=is_mult)
