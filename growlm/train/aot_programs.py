"""The programs a run executes on the slice besides its train steps, compiled for it
(`--compile_for`, growlm/train/aot.py): each stage's eval step at the run's eval batch, and at
each stage boundary the growth of the train state into the next stage's model, both jitted as
the trainer jits them.

Their memory per device is what the device holds while they run, not only their own buffers:
- the eval step runs beside the train state (the run goes on with it): the train step's
  arguments (state and a batch of the same shape) + the eval step's outputs and temporaries.
  It takes the whole global batch at once, whatever train.grad_accum, so with accumulation it
  can need more than the train step.
- growth runs while the source state is live (the trainer drops it once the grown state exists):
  the source state + the grown parameters (the first program's output) + the first program's
  temporaries or the grown optimizer state and the second's temporaries, whichever is more.
  The source state is the source stage's train-step arguments less its batch (the eval step's
  arguments less the parameters, which are growth's first argument), so every figure is the
  compiler's own.

The growth's programs are handed in (growlm.grow.optimizer.state_growth, by growlm.commands), as
the trainer is handed the seam's grow_stage: this layer knows nothing of growth.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable

import jax
import jax.numpy as jnp

from growlm import sharding
from growlm.config.stages import Stage
from growlm.errors import GrowlmError, first_line
from growlm.model.config import ModelConfig
from growlm.train.evaluate import jit_eval_step
from growlm.train.state import TrainState

# (src model, target model, plan, optimizer, target param shardings, target optimizer-state
# shardings, *, grow_optimizer) -> the growth's two jitted programs: growlm.grow.optimizer's
# state_growth, whose StateGrowth has .params, .opt_state, .opt_input and .grow_optimizer.
StateGrowthFn = Callable[..., Any]
GIB = 1 << 30
SMALLER = ("a config that fits, e.g. a smaller data.batch_size, train.grad_accum > 1, "
           "mesh.fsdp > 1 or model.remat=full")
SMALLER_EVAL = ("a config that fits, e.g. a smaller data.batch_size (evaluation takes the whole "
                "global batch at once, whatever train.grad_accum) or mesh.fsdp > 1")
SMALLER_GROWTH = ("a config that fits, e.g. mesh.fsdp > 1 or a larger slice (growth holds both "
                  "stages' states at once; the batch does not change it)")


def compile_program(jitted: Callable, args: tuple, what: str, kind: str, hint: str
                    ) -> tuple[Any, float]:
  """(`jitted` lowered for the abstract `args` and compiled, seconds taken); GrowlmError naming
  `what` (e.g. "stage 0's train step") when XLA's compiler for a `kind` device refuses it."""
  t0 = time.perf_counter()
  try:
    with warnings.catch_warnings():
      # Where a persistent compilation cache is set, jax stores the slice's executable but
      # cannot load one without the slice's devices; it warns and compiles again.
      warnings.filterwarnings("ignore", "Error reading persistent compilation cache entry")
      compiled = jitted.lower(*args).compile()
  except GrowlmError:   # the model's own refusals (an attention that cannot run there, ...)
    raise
  except Exception as e:  # pylint: disable=broad-except  (XLA's compile errors)
    first = first_line(e)
    if "RESOURCE_EXHAUSTED" in first:
      raise GrowlmError(f"{what} does not fit a {kind} device ({first[:200]}); "
                        f"accepted: {hint}") from None
    raise GrowlmError(f"{what} does not compile for {kind} ({type(e).__name__}: "
                      f"{first[:200]}); accepted: a model and mesh XLA's compiler for it "
                      "takes") from None
  return compiled, time.perf_counter() - t0


def _memory(compiled) -> tuple[int, int, int]:
  """(argument, output not aliased to an argument, temporary) bytes per device."""
  m = compiled.memory_analysis()
  return (m.argument_size_in_bytes, m.output_size_in_bytes - m.alias_size_in_bytes,
          m.temp_size_in_bytes)


def _shardings(abstract: Any) -> Any:
  return jax.tree.map(lambda a: a.sharding, abstract)


def eval_step(i: int, cfg: ModelConfig, params: Any, batch: dict, batch_shard,
              train_arguments: int, hbm: int | None) -> dict[str, Any]:
  """Stage `i`'s eval step (model `cfg`, abstract sharded `params`) compiled for `batch`, and
  its figures; `train_arguments` is the stage's train-step argument bytes (module docstring)."""
  kind = batch_shard.mesh.devices.flat[0].device_kind
  step = jit_eval_step(cfg, _shardings(params), batch_shard)
  compiled, seconds = compile_program(step, (params, batch), f"stage {i}'s eval step", kind,
                                      SMALLER_EVAL)
  args, out, temp = _memory(compiled)
  total = train_arguments + out + temp
  return {"argument_bytes": args, "held_bytes": train_arguments, "temp_bytes": temp,
          "bytes_per_device": total, "fits": hbm is None or total <= hbm,
          "compile_seconds": seconds}


def growth(j: int, src_cfg: ModelConfig, dst_cfg: ModelConfig, stage: Stage, optimizer,
           src: TrainState, dst: TrainState, src_train_arguments: int, src_eval_arguments: int,
           hbm: int | None, state_growth: StateGrowthFn) -> dict[str, Any]:
  """The growth into stage `j` (model `src_cfg` -> `dst_cfg` by `stage`) compiled as the trainer
  runs it (growlm.init.seam.grow_stage -> init.source.grow_state -> `state_growth`), from the
  abstract sharded state `src` into `dst`'s shardings, and its figures. The source stage's
  train- and eval-step argument bytes give its state's (module docstring)."""
  mesh = jax.tree.leaves(dst.params)[0].sharding.mesh
  kind = mesh.devices.flat[0].device_kind
  programs = state_growth(src_cfg, dst_cfg, stage.plan, optimizer, _shardings(dst.params),
                          _shardings(dst.opt_state), grow_optimizer=stage.optimizer == "grow")
  what = f"stage {j}'s growth (from stage {j - 1})"
  rep = sharding.replicated(mesh)
  key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)   # jax.random.PRNGKey(seed)
  first, s1 = compile_program(programs.params, (src.params, key), what, kind, SMALLER_GROWTH)
  part = src.opt_state
  if not programs.grow_optimizer:   # the source's learning-rate factors: replicated scalars
    part = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep),
                        jax.eval_shape(programs.opt_input, src.opt_state, src.params))
  second, s2 = compile_program(programs.opt_state, (part, dst.params), what, kind,
                               SMALLER_GROWTH)
  (a1, params, t1), (_, opt, t2) = _memory(first), _memory(second)
  # The first program reads every source parameter (and the key); the second's arguments are
  # held already (the source's moments, the grown parameters), or are a few scalars (a fresh
  # Adam's learning-rate factors), and jit drops those it does not read, so they go uncounted.
  source = src_train_arguments - src_eval_arguments + a1
  total = source + params + max(t1, opt + t2)
  return {"stage": j, "from_stage": j - 1, "step": stage.step, "optimizer": stage.optimizer,
          "source_state_bytes": source, "target_state_bytes": params + opt,
          "temp_bytes": max(t1, t2), "bytes_per_device": total,
          "fits": hbm is None or total <= hbm, "compile_seconds": s1 + s2}
