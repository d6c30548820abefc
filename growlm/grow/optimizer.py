"""Growing the optimizer state with the parameters (docs/design.md 5.11).

Adam's moments are mapped by the same index maps as the parameters. A copied entry whose
gradient in the grown model is b times the source's (b from `Grown.grad_scale`: 1/n for tiled
writers, 1 for tiled readers, 1/r for gains rescaled by r) gets mu * b and nu * b^2, so Adam's
next step on it equals the source's step; new entries start at zero; the step count (Adam's
bias correction) is kept. With learning-rate multipliers on, each entry's multiplier is its
value scale `a` (1/n for tiled readers), so the grown model takes the small model's step.
Under jit, `a` and `b` are built leaf by leaf where they are read (core.scale_trees), never as
whole trees, unless the Grown already carries them.

With init.lr_rescale='fan_in', each weight matrix whose fan-in grew takes the learning-rate
factor fan_in(source) / fan_in(target) (muP style), times the source's own factors when its
Adam state is grown (so repeated growth composes).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from growlm import optim, trees
from growlm.grow import core
from growlm.grow.plan import GrowthPlan
from growlm.model.config import ModelConfig
from growlm.optim import MultiplierState

# Fan-in of each weight matrix by its parameter path; every other leaf (input embeddings, the
# tied `embed` table that is also the output layer, biases, norm gains) keeps factor 1.
FAN_IN = {
    ("layers", "attn", "query"): lambda c: c.d_model,
    ("layers", "attn", "key"): lambda c: c.d_model,
    ("layers", "attn", "value"): lambda c: c.d_model,
    ("layers", "attn", "out"): lambda c: c.n_heads * c.head_dim,
    ("layers", "mlp", "wi"): lambda c: c.d_model,
    ("layers", "mlp", "wi_gate"): lambda c: c.d_model,
    ("layers", "mlp", "wi_up"): lambda c: c.d_model,
    ("layers", "mlp", "wo"): lambda c: c.mlp_dim,
    ("head",): lambda c: c.d_model,             # untied output layer only
}


def grow_moments(tree: Any, grown: core.Grown, src: ModelConfig, plan: GrowthPlan,
                 power: int) -> Any:
  """Maps a params-shaped moment tree: copied entries * grad_scale**power, new entries 0.
  Without `grown.grad_scale` (grown with scales=False) each leaf's b is built where it is read,
  so under jit no target-sized multiplier is materialised."""
  b_tree = core.scale_trees(src, grown.config, plan)[1] if grown.grad_scale is None \
      else grown.grad_scale
  specs = core.leaf_specs(src, grown.config, plan, tree)
  layers = jnp.asarray([j for j, _ in grown.layer_map])

  def one(path, x):
    keys = tuple(k.key for k in path)
    g = jnp.take(x, layers, axis=0) if keys[0] == "layers" else x
    for i, m in specs[keys][0].maps.items():   # the index maps alone (no fills)
      g = jnp.take(g, jnp.asarray(np.maximum(m.index, 0)), axis=i)
    b = trees.get(b_tree, keys)
    return (g * b.astype(g.dtype) ** power).astype(x.dtype)
  return jax.tree_util.tree_map_with_path(one, tree)


def grow_opt_state(src_state: Any, grown: core.Grown, src: ModelConfig, plan: GrowthPlan,
                   target_optimizer: optax.GradientTransformation) -> Any:
  """The target optimizer's state: Adam moments grown, count kept, multipliers set, per-leaf
  learning-rate factors (if the target optimizer has them) the source's times the fan-in ratios."""
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  adams = [x for x in jax.tree.leaves(src_state, is_leaf=is_adam) if is_adam(x)]
  if len(adams) != 1:
    raise ValueError(f"expected one Adam state in the source optimizer state, found {len(adams)}")
  adam = adams[0]
  if grown.grad_scale is None or grown.value_scale is None:   # one build serves mu, nu and lr
    a, b = core.scale_trees(src, grown.config, plan)
    grown = grown._replace(value_scale=a if grown.value_scale is None else grown.value_scale,
                           grad_scale=b if grown.grad_scale is None else grown.grad_scale)
  new_adam = optax.ScaleByAdamState(count=adam.count,
                                    mu=grow_moments(adam.mu, grown, src, plan, 1),
                                    nu=grow_moments(adam.nu, grown, src, plan, 2))
  fresh = target_optimizer.init(grown.params)
  state = jax.tree.map(lambda x: new_adam if is_adam(x) else x, fresh, is_leaf=is_adam)
  base = optim.leaf_scales(src_state, adam.mu)   # the source's own factors (mu: its shape)
  return with_lr_rescale(with_multipliers(state, grown, src, plan), src, grown.config,
                         grown.params, base)


def with_multipliers(opt_state: Any, grown: core.Grown, src: ModelConfig, plan: GrowthPlan
                     ) -> Any:
  """`opt_state` (e.g. `optimizer.init(grown.params)`) with the growth's value scales as its
  learning-rate multipliers, if it has a MultiplierState; without one, no scale is built."""
  is_mult = lambda x: isinstance(x, MultiplierState)
  if not any(is_mult(x) for x in jax.tree.leaves(opt_state, is_leaf=is_mult)):
    return opt_state
  value_scale = core.scale_trees(src, grown.config, plan)[0] if grown.value_scale is None \
      else grown.value_scale
  return set_multipliers(opt_state, value_scale)


def set_multipliers(opt_state: Any, value_scale: Any) -> Any:
  """Puts the growth's value scales into a MultiplierState (if the optimizer has one)."""
  is_mult = lambda x: isinstance(x, MultiplierState)
  return jax.tree.map(lambda x: MultiplierState(value_scale) if is_mult(x) else x, opt_state,
                      is_leaf=is_mult)


def fan_in_ratios(src: ModelConfig, dst: ModelConfig, params: Any) -> Any:
  """The muP-style learning-rate factor of each leaf of `params` (a tree of the target's shape,
  arrays or shapes): fan_in(src) / fan_in(dst) for the weight matrices of FAN_IN, 1.0 for every
  other leaf. Python floats; depth-only growth gives all ones."""
  def one(path, _):
    fan_in = FAN_IN.get(tuple(k.key for k in path))
    return 1.0 if fan_in is None else fan_in(src) / fan_in(dst)
  return jax.tree_util.tree_map_with_path(one, params)


def with_lr_rescale(opt_state: Any, src: ModelConfig, dst: ModelConfig, params: Any,
                    base: Any = None) -> Any:
  """`opt_state` with its per-leaf learning-rate factors (LeafScaleState) set to
  base * fan_in_ratios(src, dst, params): `base` is the source's factors as a params-shaped
  tree (optim.leaf_scales; read by path), None for ones. Unchanged without a LeafScaleState."""
  is_leaf = lambda x: isinstance(x, optim.LeafScaleState)
  if not any(is_leaf(x) for x in jax.tree.leaves(opt_state, is_leaf=is_leaf)):
    return opt_state
  ratios = fan_in_ratios(src, dst, params)
  if base is not None:
    ratios = jax.tree_util.tree_map_with_path(
        lambda path, r: r * trees.get(base, tuple(k.key for k in path)), ratios)
  return optim.set_leaf_scales(opt_state, ratios)


class StateGrowth(NamedTuple):
  """The two programs that grow a train state into the target's shardings, jitted and not run
  (init.source.grow_state runs them; `--compile_for` compiles them): `params(src_params, key)`
  -> the grown parameters, then `opt_state(src_part, params)` -> the optimizer state, where
  `src_part = opt_input(...)` is the source's optimizer state (Adam's moments grown) or only its
  learning-rate factors (a fresh Adam state)."""
  grown: Callable[[Any], core.Grown]   # params -> the Grown they are (config and layer map)
  params: Callable
  opt_state: Callable
  grow_optimizer: bool

  def opt_input(self, src_opt_state: Any, src_params: Any) -> Any:
    """What `opt_state` takes of the source's state (abstract trees too, under eval_shape)."""
    if self.grow_optimizer:
      return src_opt_state
    # A fresh Adam state still keeps the source's own learning-rate factors (the rescale is
    # relative to the first model's width, whatever happened to Adam in between).
    return None if src_opt_state is None else optim.leaf_scales(src_opt_state, src_params)


def state_growth(src: ModelConfig, target: ModelConfig, plan: GrowthPlan, optimizer,
                 param_shardings: Any, opt_shardings: Any, *, grow_optimizer: bool
                 ) -> StateGrowth:
  """The programs that grow a `src` state into `target` by `plan` (StateGrowth). The multiplier
  trees are never materialised: each leaf of them is built inside the optimizer state's jit
  where Adam's moments or the learning-rate multipliers read it, and not at all when neither
  does. With init.lr_rescale the per-leaf learning-rate factors are the fan-in ratios times the
  source's own factors (ones for a source without them)."""
  cfg = core.grown_config(src, target, plan)
  layer_map = tuple(core.layer_sources(src.n_layers, target.n_layers, plan))
  grown = lambda p: core.Grown(p, cfg, None, None, layer_map)

  def params(src_params, rng):
    return core.grow(src_params, src, target, plan, rng, scales=False).params

  if grow_optimizer:
    opt = lambda s, p: grow_opt_state(s, grown(p), src, plan, optimizer)
  else:
    opt = lambda base, p: with_lr_rescale(with_multipliers(optimizer.init(p), grown(p), src,
                                                           plan), src, cfg, p, base=base)
  return StateGrowth(grown, jax.jit(params, out_shardings=param_shardings),
                     jax.jit(opt, out_shardings=opt_shardings), grow_optimizer)
