"""Compile a run's train step for a TPU slice this machine does not have (`--compile_for`).

Before renting a slice, a researcher wants to know three things the CPU cannot tell by running:
does the step compile there (splash attention's Pallas kernels, the mesh's shardings), which
attention kernel it uses, and whether it fits each chip's memory. XLA's TPU compiler answers all
three without a TPU: libtpu describes a slice by its topology name (`v5e:2x2`, `v5p:4x4x4`; an
accelerator type such as `v4-32` is mapped to its topology), and the step is lowered and compiled
for those devices as the trainer would jit it (same config, mesh, sharding rules, optimizer,
donated state). A run executes two more programs there, and they are compiled too
(growlm/train/aot_programs.py): each stage's eval step, and for a staged run each growth of the
train state between stages, which holds both stages' states at once. Nothing runs and nothing
is written.

Memory on a TPU is planned by the compiler, so its figure for a step is what the chip will hold:
arguments (the state and the batch) + outputs not aliased to them + temporaries. It is compared
with the chip's HBM (HBM_GIB, public specs; a device is a chip, or a core where the slice lists
cores, as v2's and v3's do). The first program, in the order the run executes them, that needs
more is refused, named.

libtpu is found at TPU_LIBRARY_PATH, else as the `libtpu` package, else under the environment's
prefix at libtpu/libtpu/libtpu.so (where `make install` puts it, out of jax's sight, so that CPU
runs do not probe for a TPU).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
from collections import Counter
from typing import Any

import jax
import jax.numpy as jnp

from growlm import optim, sharding
from growlm.config import stages as stages_lib
from growlm.config.typed import RunConfig
from growlm.errors import GrowlmError, first_line
from growlm.model import attention
from growlm.model import decoder as model_lib
from growlm.model import flops as flops_lib
from growlm.model import speed
from growlm.train import loss as loss_lib
from growlm.train import aot_programs as programs
from growlm.train import stages as run_stages
from growlm.train.aot_programs import GIB, SMALLER, SMALLER_EVAL, SMALLER_GROWTH
from growlm.train.state import state_shardings
from growlm.train.trainer import make_train_step

# HBM per chip in GiB, by jax's device_kind (Google Cloud's published TPU specs).
HBM_GIB = {"TPU v2": 16, "TPU v3": 32, "TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95,
           "TPU v6 lite": 32}
TOPOLOGY_HELP = ("a TPU topology name such as v5e:2x2, v5p:2x2x1, v6e:2x4, v4:2x2x1 "
                 "(generation:chips per dimension), or a Cloud TPU accelerator type such as "
                 "v5litepod-8, v6e-8, v4-32, v5p-128")
# Cloud TPU accelerator types (gcloud's --accelerator-type) as topologies, by chips: v5e and v6e
# slices are 2D and named by chips; v4 and v5p slices are 3D and named by TensorCores (2 a chip).
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8"}
_ACCELERATORS = {"v5litepod": ("v5e", 1, _GRID_2D), "v5e": ("v5e", 1, _GRID_2D),
                 "v6e": ("v6e", 1, _GRID_2D), "v4": ("v4", 2, _GRID_3D),
                 "v5p": ("v5p", 2, _GRID_3D)}
PALLAS_CALL = 'custom_call_target="tpu_custom_call"'   # a Pallas (Mosaic) kernel in TPU HLO


def libtpu_path() -> str | None:
  """libtpu.so's path (module docstring), or None."""
  env = os.environ.get("TPU_LIBRARY_PATH")
  if env:
    return env if os.path.isfile(env) else None
  try:
    import libtpu  # pylint: disable=g-import-not-at-top
    return libtpu.get_library_path()
  except ImportError:
    pass
  beside = os.path.join(sys.prefix, "libtpu", "libtpu", "libtpu.so")
  return beside if os.path.isfile(beside) else None


def topology_name(name: str, flag: str = "--compile_for") -> str:
  """`name` as libtpu's topology name: an accelerator type (v4-32) becomes its topology
  (v4:2x2x4); a topology name is returned as it is. A refusal names `flag`, where it was given."""
  m = re.fullmatch(r"(v5litepod|v5e|v6e|v4|v5p)-(\d+)", name)
  if m is None:
    if ":" not in name:
      raise GrowlmError(f"{flag}={name!r}; accepted: {TOPOLOGY_HELP}")
    return name
  generation, per_chip, grid = _ACCELERATORS[m.group(1)]
  count = int(m.group(2))
  chips = count // per_chip
  if count % per_chip or chips not in grid:
    sizes = ", ".join(f"{m.group(1)}-{c * per_chip}" for c in grid)
    raise GrowlmError(f"{flag}={name}: no {m.group(1)} slice of that size; accepted: "
                      f"{sizes}, or a topology name such as {generation}:{grid[4]}")
  return f"{generation}:{grid[chips]}"


def topology_devices(name: str, flag: str = "--compile_for") -> list:
  """The devices of the TPU slice `name` (a topology or an accelerator type), described by
  libtpu (no TPU needed). A refusal names `flag`, where it was given."""
  name = topology_name(name, flag)
  path = libtpu_path()
  if path is None:
    raise GrowlmError(f"{flag}={name} needs libtpu, which was not found; accepted: "
                      "`make install` (puts it under .venv/libtpu), `pip install libtpu`, or "
                      "TPU_LIBRARY_PATH=/path/to/libtpu.so")
  quiet = logging.getLogger("jax._src.xla_bridge")   # its INFO line on the TPU it looked for
  level = quiet.level
  quiet.setLevel(logging.WARNING)
  try:
    jax.devices()   # this host's backend first, so that jax never takes libtpu for its own TPU
  finally:
    quiet.setLevel(level)
  # Off a TPU VM, libtpu asks the VM's metadata for the worker names and accelerator type and
  # logs warnings when it finds none; a description of a slice needs neither. The variables are
  # set only while libtpu loads, so no process started later takes them for a TPU's.
  env = {"TPU_LIBRARY_PATH": path,
         "TPU_WORKER_HOSTNAMES": os.environ.get("TPU_WORKER_HOSTNAMES") or "localhost",
         "TPU_ACCELERATOR_TYPE": os.environ.get("TPU_ACCELERATOR_TYPE") or "v5litepod-1",
         # libtpu locks /tmp/libtpu_lockfile against a second process using the TPU; a slice's
         # description uses none, so other compiles (and TPU runs) may load it too.
         "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  error, kw = None, {}
  dims = re.fullmatch(r"[^:]+:(\d+(?:x\d+)*)", name)
  dims = [int(d) for d in dims.group(1).split("x")] if dims else []
  if dims and 0 < math.prod(dims) < 4:   # fewer chips than a host's default 2x2: one host holds
    kw["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))   # them (v5e-1, v6e-1)
  with _environ(env):
    _load_libtpu(path)
    # One device per chip, as jax has on a slice: "megacore" where the generation has it (v4,
    # v5p: two cores act as one device), else the chip's default configuration.
    for chip_config in ("megacore", "default"):
      try:
        return list(topologies.get_topology_desc(name, "tpu", chip_config_name=chip_config,
                                                 **kw).devices)
      except Exception as e:  # pylint: disable=broad-except  (libtpu's runtime errors)
        error = e
  raise GrowlmError(f"{flag}={name}: libtpu refused it ({first_line(error)[:160]}); "
                    f"accepted: {TOPOLOGY_HELP}") from None


def _load_libtpu(path: str) -> None:
  """Loads libtpu as jax's "tpu" plugin, as jax's topology call would, but without hooking
  libtpu's profiler into jax's: hooked, it took over the process's traces, and a CPU step
  profiled afterwards showed no events (benchmarks/parts.py read 0 ms for every part)."""
  try:
    from jax._src.lib import xla_client  # pylint: disable=g-import-not-at-top
    if not xla_client.pjrt_plugin_loaded("tpu"):
      xla_client.load_pjrt_plugin_dynamically("tpu", path)
  except (ImportError, AttributeError):   # another jax: its topology call loads libtpu itself
    pass


@contextlib.contextmanager
def _environ(values: dict[str, str]):
  """Sets environment variables for the block, then restores them."""
  saved = {k: os.environ.get(k) for k in values}
  os.environ.update(values)
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


def hbm_bytes(devices: list) -> int | None:
  """HBM per device of `devices` (a chip's, divided among its devices), None if unknown."""
  gib = HBM_GIB.get(devices[0].device_kind)
  if gib is None:
    return None
  per_chip = Counter(tuple(getattr(d, "coords", (d.id,))) for d in devices)
  return gib * GIB // max(per_chip.values())


def compile_for(config: RunConfig, topology: str,
                state_growth: programs.StateGrowthFn | None = None,
                train_only: bool = False) -> dict[str, Any]:
  """Compiles each stage's train and eval steps, and each growth between stages (the programs
  `state_growth` builds: growlm.grow.optimizer.state_growth, needed with config.stages), for
  the slice `topology` (with train_only, the train steps alone); returns the report (module
  docstring). GrowlmError for a bad topology, a mesh or batch the slice cannot take, or a
  program that does not fit a device's HBM."""
  devices = topology_devices(topology)
  return compile_on(config, devices, topology, topology_name(topology), hbm_bytes(devices),
                    state_growth=state_growth, train_only=train_only)


def compile_on(config: RunConfig, devices: list, topology: str, name: str, hbm: int | None,
               keep_hlo: bool = False, train_only: bool = False,
               state_growth: programs.StateGrowthFn | None = None) -> dict[str, Any]:
  """compile_for on `devices` (any backend's, e.g. a deviceless GPU's: benchmarks/
  gpu_traffic.py), `topology` as asked for and `name` as resolved, each device `hbm` bytes;
  with keep_hlo, each stage's compiled train-step HLO text as "hlo"; with train_only, the
  train steps alone (no "eval" per stage, no "growth")."""
  if config.stages and not train_only and state_growth is None:
    raise ValueError("a config with stages needs a state_growth (growlm.grow.optimizer)")
  rules = config.sharding_rules
  mesh = sharding.make_mesh(config.mesh.to_dict(), devices)
  d, t = config.data, config.train
  shards = sharding.batch_shards(mesh, rules)
  if d.batch_size % (shards * t.grad_accum):
    raise GrowlmError(f"data.batch_size={d.batch_size} is not a multiple of the batch shards "
                      f"({shards} = mesh data x fsdp) times train.grad_accum ({t.grad_accum})")
  schedule = run_stages.make_schedule(config)
  optimizer = optim.make_optimizer(t, schedule, lr_multipliers=config.init.lr_multipliers,
                                   lr_rescale=config.init.lr_rescale != "none")
  report = {"topology": topology, "topology_name": name,
            "device_kind": devices[0].device_kind,
            "devices": len(devices), "hosts": len({x.process_index for x in devices}),
            "mesh": dict(mesh.shape), "hbm_bytes_per_device": hbm,
            "global_batch": d.batch_size, "seq_len": d.seq_len, "stages": [], "growth": []}
  models = stages_lib.models(config.model, config.stages)
  abstracts = []
  for i, cfg in enumerate(models):
    stage, abstract = _stage(i, cfg, config, optimizer, schedule, mesh, rules, hbm, keep_hlo,
                             train_only)
    report["stages"].append(stage)
    abstracts.append(abstract)
    if i and not train_only:
      prev = report["stages"][i - 1]
      with jax.set_mesh(mesh):
        report["growth"].append(programs.growth(
            i, models[i - 1], cfg, config.stages[i - 1], optimizer, abstracts[i - 1], abstract,
            prev["argument_bytes"], prev["eval"]["argument_bytes"], hbm, state_growth))
  _refuse_what_does_not_fit(report, topology)
  return report


def _refuse_what_does_not_fit(report: dict[str, Any], topology: str) -> None:
  """GrowlmError naming the first program, in the order a run executes them, that needs more
  than a device's HBM."""
  for i, s in enumerate(report["stages"]):
    checks = []
    if i and report["growth"]:
      g = report["growth"][i - 1]
      checks.append((g, f"stage {i}'s growth (from stage {i - 1})",
                     f"stage {i - 1}'s state {g['source_state_bytes'] / GIB:.2f}, stage {i}'s "
                     f"state {g['target_state_bytes'] / GIB:.2f}", SMALLER_GROWTH))
    checks.append((s, f"stage {i}'s train step",
                   f"state and batch {s['argument_bytes'] / GIB:.2f}", SMALLER))
    if "eval" in s:
      checks.append((s["eval"], f"stage {i}'s eval step",
                     f"train state and batch {s['eval']['held_bytes'] / GIB:.2f}", SMALLER_EVAL))
    for p, what, held, hint in checks:
      if not p["fits"]:
        raise GrowlmError(
            f"--compile_for={topology}: {what} needs {p['bytes_per_device'] / GIB:.2f} GiB per "
            f"device ({held}, temporaries {p['temp_bytes'] / GIB:.2f}) and a "
            f"{report['device_kind']} device has "
            f"{report['hbm_bytes_per_device'] / GIB:.4g} GiB; accepted: {hint}")


def _stage(i: int, cfg, config: RunConfig, optimizer, schedule, mesh, rules, hbm: int | None,
           keep_hlo: bool, train_only: bool) -> tuple[dict[str, Any], Any]:
  """One stage's compiled train step (and eval step) and their figures; the stage's abstract
  sharded state."""
  d = config.data
  # Under the slice's abstract mesh (its platform, for the model's kernels) but not the mesh
  # itself, on whose devices nothing can run: optax builds the state's tree from real arrays.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    abstract, shard = state_shardings(cfg, optimizer, mesh, rules)
  with jax.set_mesh(mesh):
    batch_shard = sharding.batch_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct((d.batch_size, d.seq_len), jnp.int32, sharding=batch_shard)
             for k in ("inputs", "targets")}
    step = run_stages.jit_step(make_train_step(cfg, optimizer, schedule, config.train.grad_accum),
                               shard, batch_shard)
    compiled, seconds = programs.compile_program(
        step, (abstract, batch), f"stage {i}'s train step", mesh.devices.flat[0].device_kind,
        SMALLER)
    micro = d.batch_size // config.train.grad_accum
    kernel = attention.choose(cfg.attention, cfg.dtype, cfg.head_dim, d.seq_len)
    unroll = speed.layers_per_iteration(cfg)
    logits = speed.stored_logits_dtype(cfg)
    chunk = loss_lib.model_chunk(cfg, micro // sharding.batch_shards(mesh, rules), d.seq_len)
    m = compiled.memory_analysis()
    evaluated = {} if train_only else {"eval": programs.eval_step(
        i, cfg, abstract.params, batch, batch_shard, m.argument_size_in_bytes, hbm)}
  text = compiled.as_text()
  total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
           + m.temp_size_in_bytes)
  return {"stage": i, "params": model_lib.count_params(abstract.params),
          "d_model": cfg.d_model, "n_layers": cfg.n_layers, "dtype": cfg.dtype,
          "attention": kernel, "pallas_kernels": text.count(PALLAS_CALL),
          "remat": speed.remat_policy(cfg.remat), "loss_chunk": chunk,
          "scan_unroll": unroll, "logits": logits,
          "flops_per_token": flops_lib.flops_per_token(cfg, d.seq_len),
          "compile_seconds": seconds, "argument_bytes": m.argument_size_in_bytes,
          "temp_bytes": m.temp_size_in_bytes, "bytes_per_device": total,
          "fits": hbm is None or total <= hbm, **evaluated,
          **({"hlo": text} if keep_hlo else {})}, abstract


def format_report(report: dict[str, Any]) -> list[str]:
  """The report as the lines `--compile_for` prints."""
  hbm = report["hbm_bytes_per_device"]
  name = report["topology"]
  if report["topology_name"] != name:
    name += f" ({report['topology_name']})"
  head = (f"growlm: compiled for {name}: {report['devices']} x "
          f"{report['device_kind']} ({report['hosts']} host(s), "
          f"{'unknown' if hbm is None else f'{hbm / GIB:.0f} GiB'} HBM each), mesh "
          + " ".join(f"{k}={v}" for k, v in report["mesh"].items())
          + f", global batch {report['global_batch']} x {report['seq_len']}")
  lines = [head]
  fits = lambda p: "fits" if p["fits"] else "DOES NOT FIT"
  for s in report["stages"]:
    g = report.get("growth") or []
    if s["stage"] and len(g) >= s["stage"]:
      g = g[s["stage"] - 1]
      lines.append(
          f"growlm: growth to stage {g['stage']} after step {g['step']} (Adam {g['optimizer']}): "
          f"{g['bytes_per_device'] / GIB:.2f} GiB per device (stage {g['from_stage']}'s state "
          f"{g['source_state_bytes'] / GIB:.2f}, stage {g['stage']}'s state "
          f"{g['target_state_bytes'] / GIB:.2f}, temporaries {g['temp_bytes'] / GIB:.2f}), "
          f"{fits(g)}; compiled in {g['compile_seconds']:.1f} s")
    lines.append(
        f"growlm: stage {s['stage']}: {s['params'] / 1e6:.1f}M params ({s['dtype']}), attention "
        f"{s['attention']} ({s['pallas_kernels']} Pallas kernels), remat {s['remat']}, "
        f"{s['scan_unroll']} of {s['n_layers']} layers per scan iteration, loss chunk "
        f"{s['loss_chunk']} ({s['logits']} logits): {s['bytes_per_device'] / GIB:.2f} GiB per "
        f"device (state and batch {s['argument_bytes'] / GIB:.2f}, temporaries "
        f"{s['temp_bytes'] / GIB:.2f}), "
        f"{fits(s)}; compiled in {s['compile_seconds']:.1f} s")
    if "eval" in s:
      e = s["eval"]
      lines.append(
          f"growlm: stage {s['stage']} eval step: {e['bytes_per_device'] / GIB:.2f} GiB per "
          f"device (train state and batch {e['held_bytes'] / GIB:.2f}, temporaries "
          f"{e['temp_bytes'] / GIB:.2f}), {fits(e)}; compiled in {e['compile_seconds']:.1f} s")
  return lines
