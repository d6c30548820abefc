"""Starting a run from another run: load its checkpoint, grow it, report, hand a TrainState over.

A source is a run directory (config.json + checkpoints/), as the trainer and the grow command
write them, or a Hugging Face directory (config.json + *.safetensors, growlm.hf). Its parameters
(and, for a run, Adam state if asked) are restored onto the current mesh, grown under jit with
the target's shardings, so a big target is built shard by shard on its devices.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from growlm import config as config_lib
from growlm import hf as hf_lib
from growlm import model as model_lib
from growlm import optim, sharding
from growlm.checkpoint import Checkpoints
from growlm.errors import GrowlmError
from growlm.grow import core as grow_core
from growlm.grow.optimizer import grow_opt_state, set_multipliers
from growlm.grow.plan import GrowthPlan
from growlm.model_config import ModelConfig
from growlm.state import TrainState, state_shardings

OPTIMIZER_INIT = ("fresh", "grow")


@dataclasses.dataclass
class Source:
  directory: str
  config: ml_collections.ConfigDict   # the source run's full config
  model: ModelConfig
  step: int = 0
  state: TrainState | None = None
  meta: dict | None = None
  hf: bool = False                     # a Hugging Face directory (no optimizer state)


def read_source(directory: str) -> Source:
  """The source's config (no arrays read yet): a run dir, or a Hugging Face directory whose
  config and tensor headers are checked here; one clear error if it is neither."""
  if hf_lib.is_hf_dir(directory):
    _, model, raw = hf_lib.check_hf_dir(directory)
    cfg = ml_collections.ConfigDict({"model": model.to_dict(), "hf_config": raw})
    return Source(directory, cfg, model, meta={"flops": 0}, hf=True)
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise GrowlmError(f"init.source={directory!r} has no config.json; accepted: a run directory "
                      "written by growlm.main or the grow command")
  ckpt_dir = os.path.join(directory, "checkpoints")
  if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
    raise GrowlmError(f"init.source={directory!r} has no checkpoint under checkpoints/")
  with open(path) as f:
    cfg = ml_collections.ConfigDict(json.load(f))
  if "model" not in cfg:
    raise GrowlmError(f"init.source={directory!r}: config.json is neither a growlm run's (no "
                      "model section) nor a Hugging Face model's (no model_type)")
  return Source(directory, cfg, config_lib.model_config(cfg))


def source_optimizer(src: Source):
  lr_mult = bool(src.config.get("init", {}).get("lr_multipliers", False))
  return optim.make_optimizer(src.config.train, lr_multipliers=lr_mult)


def _restore_hf(src: Source, mesh, rules) -> Source:
  """Imports an HF source onto `mesh`, each process placing only its own shards."""
  imported = hf_lib.import_hf(src.directory, param_dtype=src.model.param_dtype,
                              dtype=src.model.dtype)
  shapes, axes = model_lib.abstract_params(src.model)
  shard = sharding.tree_shardings(axes, shapes, mesh, rules)
  params = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]),
      imported.params, shard)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=None)
  return dataclasses.replace(src, step=0, state=state, meta={"flops": 0})


def restore_source(src: Source, mesh, rules) -> Source:
  """Restores the source's newest restorable checkpoint (or imports its HF weights) onto `mesh`
  (the source is not changed)."""
  if src.hf:
    return _restore_hf(src, mesh, rules)
  abstract, _ = state_shardings(src.model, source_optimizer(src), mesh, rules)
  ckpt = Checkpoints(os.path.join(src.directory, "checkpoints"), async_save=False)
  try:
    restored = ckpt.restore_latest(abstract, set_aside=False)
  finally:
    ckpt.close()
  step, state, _, meta = restored
  return dataclasses.replace(src, step=step, state=state, meta=meta)


def plan_from_config(config) -> GrowthPlan:
  return GrowthPlan.from_dict(config.init.plan.to_dict())


def check_init(config) -> None:
  if config.init.optimizer not in OPTIMIZER_INIT:
    raise GrowlmError(f"config init.optimizer={config.init.optimizer!r}; accepted: "
                      f"{OPTIMIZER_INIT}")
  if hf_lib.is_hf_dir(config.init.source):
    if config.init.optimizer == "grow":
      raise GrowlmError(f"config init.optimizer='grow' with init.source={config.init.source!r}: "
                        "Hugging Face checkpoints carry no optimizer state; accepted: 'fresh'")
    hf_lib.check_seq_len(hf_lib.read_hf_config(config.init.source)[1], config.data.seq_len)
  elif os.path.isfile(os.path.join(config.init.source, "config.json")):
    hf_lib.check_seq_len(read_source(config.init.source).model, config.data.seq_len)


def grow_state(src: Source, target: ModelConfig, plan: GrowthPlan, optimizer, shard: TrainState,
               *, seed: int, train_seed: int, grow_optimizer: bool
               ) -> tuple[TrainState, grow_core.Grown]:
  """The target's first TrainState from the restored source, built directly in `shard`."""
  p_shard = shard.params

  def run(params, rng):
    g = grow_core.grow(params, src.model, target, plan, rng)
    return g.params, g.value_scale, g.grad_scale

  params, a, b = jax.jit(run, out_shardings=(p_shard, p_shard, p_shard))(
      src.state.params, jax.random.PRNGKey(seed))
  grown = grow_core.Grown(params, grow_core.grown_config(src.model, target, plan), a, b,
                          tuple(grow_core.layer_sources(src.model.n_layers, target.n_layers,
                                                        plan)))
  if grow_optimizer:
    opt_state = jax.jit(lambda s: grow_opt_state(s, grown, src.model, plan, optimizer),
                        out_shardings=shard.opt_state)(src.state.opt_state)
  else:
    opt_state = jax.jit(lambda p, a: set_multipliers(optimizer.init(p), a),
                        out_shardings=shard.opt_state)(params, a)
  rng = jax.random.split(jax.random.PRNGKey(train_seed))[1]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     rng=jax.device_put(rng, shard.rng))
  return state, grown
