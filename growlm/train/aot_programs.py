"""The programs a run executes on the slice besides its train steps, compiled for it
(`--compile_for`, growlm/train/aot.py): each stage's eval step at the run's eval batch; each
growth of a train state into a bigger model, at each stage boundary and, for a run with
init.source, the growth of the source into the run's first state; and after each growth the
preservation report, all jitted as the run jits them.

Their memory per device is what the device holds while they run, not only their own buffers:
- the eval step runs beside the train state (the run goes on with it): the train step's
  arguments (state and a batch of the same shape) + the eval step's outputs and temporaries.
  It takes the whole global batch at once, whatever train.grad_accum, so with accumulation it
  can need more than the train step.
- growth runs while the source state is live (the trainer drops it once the grown state exists):
  the source state + the grown parameters (the first program's output) + the first program's
  temporaries or the grown optimizer state and the second's temporaries, whichever is more.
  The source state is its parameters as the first program reads them + the rest of it: at a
  stage boundary the source stage's train-step arguments less its eval step's (its batch and
  parameters), so every figure is the compiler's own; for init.source, the rest of the state
  the run restores (the source run's optimizer state; nothing for a Hugging Face source),
  counted from its shapes and shardings.
- the preservation report runs while both states are live: both states + one eval batch + the
  largest output and temporaries of its programs (each comparison of the two models, chunked
  over positions, and the SGD step that counts the new units that train).

The growth's and the report's programs are handed in (Growth: growlm.grow.optimizer.state_growth
and growlm.grow.report.programs, by growlm.commands), as the trainer is handed the seam's
grow_stage: this layer knows nothing of growth.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from growlm import sharding
from growlm.errors import GrowlmError, first_line
from growlm.model.config import ModelConfig
from growlm.train import loss as loss_lib
from growlm.train.evaluate import jit_eval_step
from growlm.train.state import TrainState, bytes_per_device


class Growth(NamedTuple):
  """The programs of growth, handed in by growlm.commands."""
  # (src model, target model, plan, optimizer, target param shardings, target optimizer-state
  # shardings, *, grow_optimizer) -> the growth's two jitted programs: growlm.grow.optimizer's
  # state_growth, whose StateGrowth has .params, .opt_state, .opt_input and .grow_optimizer.
  state: Callable[..., Any]
  # (src model, target model, plan, loss_fn) -> [(jitted, (src params, grown params, batch) ->
  # its arguments)]: the preservation report's programs, growlm.grow.report.programs.
  report: Callable[..., list]


class Source(NamedTuple):
  """A run's init.source as `--compile_for` grows it, read from its config (no weights)."""
  model: ModelConfig                     # the source's model (its last stage's)
  abstract: Callable[[Any, Any], Any]    # (mesh, rules) -> the abstract state the run restores


GIB = 1 << 30
SMALLER = ("a config that fits, e.g. a smaller data.batch_size, train.grad_accum > 1, "
           "mesh.fsdp > 1 or model.remat=full")
SMALLER_EVAL = ("a config that fits, e.g. a smaller data.batch_size (evaluation takes the whole "
                "global batch at once, whatever train.grad_accum) or mesh.fsdp > 1")
SMALLER_GROWTH = ("a config that fits, e.g. mesh.fsdp > 1 or a larger slice (growth holds the "
                  "source's state and the grown one at once; the batch does not change it)")
SMALLER_REPORT = ("a config that fits, e.g. a smaller data.batch_size (the preservation report "
                  "runs both models on one eval batch, beside both states), mesh.fsdp > 1 or a "
                  "larger slice")


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


def boundary(what: str, src_cfg: ModelConfig, dst_cfg: ModelConfig, plan, grow_optimizer: bool,
             optimizer, src: TrainState, dst: TrainState, src_rest: int, batch: dict,
             hbm: int | None, growth: Growth) -> dict[str, Any]:
  """The growth of model `src_cfg` into `dst_cfg` by `plan` (`what` names it, e.g. "stage 1's
  growth (from stage 0)") compiled as the run executes it (growlm.init.source.grow_state ->
  `growth.state`), from the abstract sharded state `src` into `dst`'s shardings, and its
  figures, with those of the preservation report after it on a `batch` as "report"; `src_rest`
  is the bytes the source state holds besides its parameters (module docstring)."""
  mesh = jax.tree.leaves(dst.params)[0].sharding.mesh
  kind = mesh.devices.flat[0].device_kind
  programs = growth.state(src_cfg, dst_cfg, plan, optimizer, _shardings(dst.params),
                          _shardings(dst.opt_state), grow_optimizer=grow_optimizer)
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
  source = src_rest + a1
  total = source + params + max(t1, opt + t2)
  report = _report(f"the preservation report at {what}",
                   growth.report(src_cfg, dst_cfg, plan, loss_lib.token_nll), src.params,
                   dst.params, batch, source + params + opt, hbm)
  return {"source_state_bytes": source, "target_state_bytes": params + opt,
          "temp_bytes": max(t1, t2), "bytes_per_device": total,
          "fits": hbm is None or total <= hbm, "compile_seconds": s1 + s2, "report": report}


def _report(what: str, programs: list, src_params: Any, dst_params: Any, batch: dict,
            held: int, hbm: int | None) -> dict[str, Any]:
  """The preservation report's `programs` (growlm.grow.report.programs) compiled for both
  models' abstract params and a `batch`, and its figures; `held` is both states' bytes."""
  kind = batch["inputs"].sharding.mesh.devices.flat[0].device_kind
  seconds, peak, temp = 0.0, 0, 0
  for jitted, arguments in programs:
    compiled, s = compile_program(jitted, arguments(src_params, dst_params, batch), what, kind,
                                  SMALLER_REPORT)
    _, out, t = _memory(compiled)
    seconds, peak, temp = seconds + s, max(peak, out + t), max(temp, t)
  held += bytes_per_device(batch)   # the eval batch it reads (the run holds its eval batches)
  total = held + peak
  return {"held_bytes": held, "temp_bytes": temp, "bytes_per_device": total,
          "fits": hbm is None or total <= hbm, "compile_seconds": seconds,
          "programs": len(programs)}


def _in_run_order(report: dict[str, Any]) -> list[tuple[dict, str, str, str]]:
  """(figures, name, what it holds, hint) of each program, in the order a run executes them."""
  out = []

  def grew(g, what, src, dst):
    out.append((g, what, f"{src}'s state {g['source_state_bytes'] / GIB:.2f}, {dst}'s state "
                         f"{g['target_state_bytes'] / GIB:.2f}", SMALLER_GROWTH))
    r = g["report"]
    out.append((r, f"the preservation report at {what}",
                f"both states and a batch {r['held_bytes'] / GIB:.2f}", SMALLER_REPORT))

  if report.get("init"):
    grew(report["init"], "the growth from init.source", "the source", "stage 0")
  for i, s in enumerate(report["stages"]):
    if i and report["growth"]:
      grew(report["growth"][i - 1], f"stage {i}'s growth (from stage {i - 1})", f"stage {i - 1}",
           f"stage {i}")
    out.append((s, f"stage {i}'s train step",
                f"state and batch {s['argument_bytes'] / GIB:.2f}", SMALLER))
    if "eval" in s:
      out.append((s["eval"], f"stage {i}'s eval step",
                  f"train state and batch {s['eval']['held_bytes'] / GIB:.2f}", SMALLER_EVAL))
  return out


def refuse_what_does_not_fit(report: dict[str, Any], topology: str) -> None:
  """GrowlmError naming the first program, in the order a run executes them, that needs more
  than a device's HBM."""
  for p, what, held, hint in _in_run_order(report):
    if not p["fits"]:
      raise GrowlmError(
          f"--compile_for={topology}: {what} needs {p['bytes_per_device'] / GIB:.2f} GiB per "
          f"device ({held}, temporaries {p['temp_bytes'] / GIB:.2f}) and a "
          f"{report['device_kind']} device has "
          f"{report['hbm_bytes_per_device'] / GIB:.4g} GiB; accepted: {hint}")
