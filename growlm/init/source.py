"""A growth source: read it, restore it onto the mesh, grow it into the target's first TrainState.

A source is a run directory (config.json + checkpoints/), as the trainer and the grow command
write them, or a Hugging Face directory (config.json + *.safetensors, growlm.interop.hf). Its
parameters (and, for a run, Adam state if asked) are restored onto the current mesh and grown
under jit with the target's shardings, so a big target is built shard by shard on its devices.
Growth reads the source and writes the target; it builds neither a full fresh init nor the
multiplier trees (benchmarks/growth.py measures its time and memory against the copy floor).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from growlm import fs, rundir, sharding
from growlm.config import stages as config_stages
from growlm.config.typed import RunConfig, TrainConfig
from growlm.errors import GrowlmError
from growlm.grow import core as grow_core
from growlm.grow.optimizer import state_growth
from growlm.grow.plan import GrowthPlan
from growlm.interop import hf as hf_lib
from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig
from growlm import optim
from growlm.train.checkpoint import Checkpoints
from growlm.train.state import TrainState, state_shardings


@dataclasses.dataclass(frozen=True)
class Source:
  """A source model: where it is, its config, and (once restored) its state."""
  directory: str
  config: dict[str, Any]               # the source run's config.json (or {"model", "hf_config"})
  model: ModelConfig
  step: int = 0
  state: TrainState | None = None
  meta: dict | None = None
  hf: bool = False                     # a Hugging Face directory (no optimizer state)
  data_state: dict | None = None       # the source run's data position at `step`

  @property
  def flops(self) -> float:
    """Training FLOPs that produced this source (its own and its sources'); 0 for HF models."""
    meta = self.meta or {}
    return float(meta.get("flops_with_source", meta.get("flops", 0.0)))


def check_seq_len(src: ModelConfig, seq_len: int) -> None:
  """The preservation report runs the source on the run's batches: a learned position table
  must cover them."""
  if src.positions == "learned" and seq_len > src.max_len:
    raise GrowlmError(f"data.seq_len={seq_len} exceeds the source's max_len={src.max_len} "
                      f"(learned positions; the preservation report runs the source on the same "
                      f"batches); accepted: seq_len <= {src.max_len}")


def read_source(directory: str, *, what: str = "init.source") -> Source:
  """The source's config (no arrays read yet): a run dir, or a Hugging Face directory whose
  config and tensor headers are checked here; one clear error if it is neither."""
  if hf_lib.is_hf_dir(directory):
    _, model, raw = hf_lib.check_hf_dir(directory)
    return Source(directory, {"model": model.to_dict(), "hf_config": raw}, model,
                  meta={"flops": 0}, hf=True)
  accepted = "a run directory written by growlm.main or the grow command" + (
      ", or a Hugging Face directory" if what == "init.source" else "")
  fs.check(directory, what)
  if not fs.isdir(directory):
    raise GrowlmError(f"{what}={directory!r} does not exist or is not a directory; accepted: "
                      f"{accepted}")
  saved = rundir.read_config(directory)
  if saved is None:
    raise GrowlmError(f"{what}={directory!r} has no config.json; accepted: {accepted}")
  steps = rundir.checkpoint_steps(directory)
  if not steps:
    raise GrowlmError(f"{what}={directory!r} has no checkpoint under checkpoints/")
  if not isinstance(saved.get("model"), dict):
    raise GrowlmError(f"{what}={directory!r}: config.json is neither a growlm run's (no "
                      "model section) nor a Hugging Face model's (no model_type)")
  # A run with growth stages ends with (and its newest checkpoint holds) its last stage's model.
  return Source(directory, saved,
                ModelConfig.from_dict(config_stages.model_of_run(saved, steps[-1])))


def source_optimizer(src: Source):
  """The optimizer the source run trained with (its state's structure depends on it)."""
  known = {f.name for f in dataclasses.fields(TrainConfig)}
  train_cfg = TrainConfig(**{k: v for k, v in src.config.get("train", {}).items() if k in known})
  init = src.config.get("init", {})
  return optim.make_optimizer(train_cfg, lr_multipliers=bool(init.get("lr_multipliers", False)),
                              lr_rescale=init.get("lr_rescale", "none") != "none")


def abstract_state(src: Source, mesh, rules) -> TrainState:
  """The abstract sharded state that restore_source restores `src` as onto `mesh` (an HF
  source: its parameters alone), read from its config: what `--compile_for` grows."""
  if not src.hf:
    return state_shardings(src.model, source_optimizer(src), mesh, rules)[0]
  shapes, axes = model_lib.abstract_params(src.model)
  shard = sharding.tree_shardings(axes, shapes, mesh, rules)
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        shapes, shard)
  return TrainState(step=None, params=params, opt_state=None, rng=None)


def _restore_hf(src: Source, mesh, rules) -> Source:
  """Imports an HF source onto `mesh`, each process placing only its own shards."""
  imported = hf_lib.import_hf(src.directory, param_dtype=src.model.param_dtype,
                              dtype=src.model.dtype)
  params = jax.tree.map(
      lambda x, a: jax.make_array_from_callback(x.shape, a.sharding, lambda idx: x[idx]),
      imported.params, abstract_state(src, mesh, rules).params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=None, rng=None)
  return dataclasses.replace(src, step=0, state=state, meta={"flops": 0})


def restore_source(src: Source, mesh, rules) -> Source:
  """Restores the source's newest restorable checkpoint (or imports its HF weights) onto `mesh`
  (the source is not changed)."""
  if src.hf:
    return _restore_hf(src, mesh, rules)
  abstract = abstract_state(src, mesh, rules)
  ckpt = Checkpoints(rundir.checkpoints_dir(src.directory), async_save=False)
  try:
    restored = ckpt.restore_latest(abstract, set_aside=False)
  finally:
    ckpt.close()
  step, state, data_state, meta = restored
  return dataclasses.replace(src, step=step, state=state, meta=meta, data_state=data_state)


def check_init(config: RunConfig, src: Source) -> None:
  """Checks what init.source asks for against the source `src` (read_source of it)."""
  if src.hf and config.init.optimizer == "grow":
    raise GrowlmError(f"config init.optimizer='grow' with init.source={src.directory!r}: "
                      "Hugging Face checkpoints carry no optimizer state; accepted: 'fresh'")
  if src.hf and config.init.continue_schedule:
    raise GrowlmError(f"config init.continue_schedule=True with init.source={src.directory!r}: "
                      "a Hugging Face checkpoint has no step, schedule or data position; "
                      "accepted: a growlm run dir, or continue_schedule=False")
  if config.init.continue_schedule:
    at = rundir.checkpoint_steps(src.directory)[-1]
    if at >= config.train.num_steps:
      raise GrowlmError(f"config init.continue_schedule=True: the source stopped at step {at}, "
                        f"so train.num_steps={config.train.num_steps} leaves nothing to train; "
                        f"accepted: num_steps > {at} (the schedule counts from the source's "
                        "start)")
  check_seq_len(src.model, config.data.seq_len)


def grow_state(src: Source, target: ModelConfig, plan: GrowthPlan, optimizer, shard: TrainState,
               *, seed: int, train_seed: int, grow_optimizer: bool
               ) -> tuple[TrainState, grow_core.Grown]:
  """The target's first TrainState from the restored source, built directly in `shard`.

  Two jits with the target's shardings (growlm.grow.optimizer.state_growth, which `--compile_for`
  compiles too): the parameters, then the optimizer state (Adam's moments grown from the
  source's, or fresh). The returned Grown carries the params, config and layer map (its scale
  trees are None)."""
  growth = state_growth(src.model, target, plan, optimizer, shard.params, shard.opt_state,
                        grow_optimizer=grow_optimizer)
  params = growth.params(src.state.params, jax.random.PRNGKey(seed))
  opt_state = growth.opt_state(growth.opt_input(src.state.opt_state, src.state.params), params)
  rng = jax.random.split(jax.random.PRNGKey(train_seed))[1]
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state,
                     rng=jax.device_put(rng, shard.rng))
  return state, growth.grown(params)
