"""The train state and its shardings (shared by the trainer and growth initialisation)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from growlm.model import decoder as model_lib
from growlm import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # optimizer steps taken (int32 scalar)
  params: Any
  opt_state: Any
  rng: jax.Array         # raw uint32 PRNG key for dropout


def state_shardings(cfg, optimizer, mesh, rules) -> tuple[TrainState, TrainState]:
  """(abstract TrainState, TrainState of NamedShardings): parameters by their logical axes,
  optimizer moments like their parameters, scalars replicated."""
  shapes, axes = model_lib.abstract_params(cfg)
  p_shard = sharding.tree_shardings(axes, shapes, mesh, rules)
  rep = sharding.replicated(mesh)
  abstract_opt = jax.eval_shape(optimizer.init, shapes)
  o_shard = optax.tree_map_params(optimizer, lambda _, s: s, abstract_opt, p_shard,
                                  transform_non_params=lambda _: rep)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=shapes,
                        opt_state=abstract_opt, rng=key)
  shard = TrainState(step=rep, params=p_shard, opt_state=o_shard, rng=rep)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shard)
  return abstract, shard


def init_state(cfg, optimizer, shard: TrainState, seed: int, params: Any = None) -> TrainState:
  """A fresh TrainState, born sharded (jit with out_shardings); `params` replaces the init."""
  def init(rng):
    init_rng, drop_rng = jax.random.split(rng)
    p = model_lib.init_params(cfg, init_rng) if params is None else params
    return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p),
                      rng=drop_rng)
  return jax.jit(init, out_shardings=shard)(jax.random.PRNGKey(seed))


