"""The train state and its shardings (shared by the trainer and growth initialisation)."""

from __future__ import annotations

import math
import os
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from growlm.errors import GrowlmError
from growlm.model import decoder as model_lib
from growlm import sharding

GIB = 1 << 30


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




def bytes_per_device(abstract: Any) -> int:
  """Bytes a device holds of `abstract` (ShapeDtypeStructs with NamedShardings: growlm's
  shardings split only dimensions they divide, so every device holds the same shard shape)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract))


def device_memory(mesh) -> tuple[int | None, str]:
  """(bytes one device of `mesh` may hold, what that is) or (None, ''): a GPU's or TPU's
  allocator limit; on a CPU, the machine's RAM shared by this process's devices of the mesh."""
  local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  device = (local or list(mesh.devices.flat))[0]   # another host's device has no statistics here
  if device.platform == "cpu":
    try:
      ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
      return None, ""
    n = max(len(local), 1)
    return ram // n, f"RAM {ram / GIB:.1f} GiB shared by {n} CPU device(s)"
  try:
    limit = (device.memory_stats() or {}).get("bytes_limit")
  except Exception:  # pylint: disable=broad-except  (a backend without memory statistics)
    return None, ""
  return limit, f"a {device.device_kind} holds {limit / GIB:.1f} GiB" if limit else ""


def check_state_fits(cfg, abstract: TrainState, mesh, what: str = "model") -> None:
  """Refuses a train state that alone exceeds a device's memory, before anything is allocated
  (a lower bound: activations come on top). Without it a CPU, which overcommits memory, would
  start to initialise a model of any size and page for hours."""
  need = bytes_per_device(abstract)
  have, where = device_memory(mesh)
  if have is not None and need > have:
    n = model_lib.count_params(abstract.params)
    raise GrowlmError(
        f"the train state of the {what} ({n:,} parameters, d_model={cfg.d_model}, n_layers="
        f"{cfg.n_layers}, vocab_size={cfg.vocab_size}; parameters and Adam's moments) needs "
        f"{need / GIB:.1f} GiB per device, more than a device has ({where}); accepted: a "
        "smaller model, or mesh.fsdp / mesh.tensor splitting the state over more devices")
