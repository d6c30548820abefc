"""Compile a run's train step for a TPU slice this machine does not have (`--compile_for`).

Before renting a slice, a researcher wants to know three things the CPU cannot tell by running:
does the step compile there (splash attention's Pallas kernels, the mesh's shardings), which
attention kernel it uses, and whether it fits each chip's memory. XLA's TPU compiler answers all
three without a TPU: libtpu describes a slice by its topology name (`v5e:2x2`, `v5p:4x4x4`; an
accelerator type such as `v4-32` is mapped to its topology), and the step is lowered and compiled
for those devices as the trainer would jit it (same config, mesh, sharding rules, optimizer,
donated state). A run executes more programs there, and they are compiled too
(growlm/train/aot_programs.py): each stage's eval step; each growth of a train state, between
stages and, for a run with init.source, of the source (read from its config, no weights) into
the first state, which hold both states at once; and the preservation report after each growth.
Nothing runs and nothing is written.

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
from growlm.train.aot_programs import GIB, SMALLER
from growlm.train.state import bytes_per_device, state_shardings
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


def compile_for(config: RunConfig, topology: str, growth: programs.Growth | None = None,
                train_only: bool = False, source: programs.Source | None = None,
                steps_of: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles each stage's train and eval steps, each growth between stages and, with
  `source` (config.init.source, read), the growth of the source into the first state, each
  growth with its preservation report (the programs `growth` builds, needed with config.stages
  or a source), for the slice `topology` (with train_only, the train steps alone); returns the
  report (module docstring). `steps_of`: the report of a config with the same steps (a sweep's
  run), whose steps and stage growths are taken instead of compiled again. GrowlmError for a
  bad topology, a mesh or batch the slice cannot take, or a program that does not fit a
  device's HBM."""
  devices = topology_devices(topology)
  return compile_on(config, devices, topology, topology_name(topology), hbm_bytes(devices),
                    growth=growth, train_only=train_only, source=source, steps_of=steps_of)


def compile_on(config: RunConfig, devices: list, topology: str, name: str, hbm: int | None,
               keep_hlo: bool = False, train_only: bool = False,
               growth: programs.Growth | None = None, source: programs.Source | None = None,
               steps_of: dict[str, Any] | None = None) -> dict[str, Any]:
  """compile_for on `devices` (any backend's, e.g. a deviceless GPU's: benchmarks/
  gpu_traffic.py), `topology` as asked for and `name` as resolved, each device `hbm` bytes;
  with keep_hlo, each stage's compiled train-step HLO text as "hlo"; with train_only, the
  train steps alone (no "eval" per stage, no "growth", no "init")."""
  source = None if train_only else source
  if (config.stages and not train_only or source) and growth is None:
    raise ValueError("a config with stages or a source needs a growth (growlm.commands)")
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
            "global_batch": d.batch_size, "seq_len": d.seq_len, "stages": [], "growth": [],
            "init": None}
  models = stages_lib.models(config.model, config.stages)
  with jax.set_mesh(mesh):
    batch_shard = sharding.batch_sharding(mesh, rules)
    batch = {k: jax.ShapeDtypeStruct((d.batch_size, d.seq_len), jnp.int32, sharding=batch_shard)
             for k in ("inputs", "targets")}
  abstracts = [_abstract(cfg, optimizer, mesh, rules)
               for cfg in (models if steps_of is None else models[:1])]
  if source is not None:   # the run's first program: the source grown into stage 0's state
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      src = source.abstract(mesh, rules)
    with jax.set_mesh(mesh):
      grown = programs.boundary(
          "the growth from init.source", source.model, models[0], config.init.plan,
          config.init.optimizer == "grow", optimizer, src, abstracts[0],
          bytes_per_device(src.replace(params=None)), batch, hbm, growth)
    report["init"] = {"source_params": model_lib.count_params(src.params),
                      "optimizer": config.init.optimizer, **grown}
  if steps_of is not None:   # a sweep's run of the same steps: compiled already
    report["stages"], report["growth"] = steps_of["stages"], steps_of["growth"]
  for i, cfg in enumerate(models if steps_of is None else []):
    report["stages"].append(_stage(i, cfg, config, optimizer, schedule, mesh, rules, hbm,
                                   keep_hlo, train_only, abstracts[i], batch))
    if i and not train_only:
      prev, stage = report["stages"][i - 1], config.stages[i - 1]
      with jax.set_mesh(mesh):
        report["growth"].append({
            "stage": i, "from_stage": i - 1, "step": stage.step, "optimizer": stage.optimizer,
            **programs.boundary(
                f"stage {i}'s growth (from stage {i - 1})", models[i - 1], cfg, stage.plan,
                stage.optimizer == "grow", optimizer, abstracts[i - 1], abstracts[i],
                prev["argument_bytes"] - prev["eval"]["argument_bytes"], batch, hbm, growth)})
  programs.refuse_what_does_not_fit(report, topology)
  return report


def _abstract(cfg, optimizer, mesh, rules):
  """A stage's abstract sharded train state. Under the slice's abstract mesh (its platform, for
  the model's kernels) but not the mesh itself, on whose devices nothing can run: optax builds
  the state's tree from real arrays."""
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    return state_shardings(cfg, optimizer, mesh, rules)[0]


def _stage(i: int, cfg, config: RunConfig, optimizer, schedule, mesh, rules, hbm: int | None,
           keep_hlo: bool, train_only: bool, abstract: Any, batch: dict) -> dict[str, Any]:
  """One stage's train step (and eval step), compiled for its `abstract` sharded state and a
  `batch`, and their figures."""
  d = config.data
  shard = jax.tree.map(lambda a: a.sharding, abstract)
  batch_shard = batch["inputs"].sharding
  with jax.set_mesh(mesh):
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
          **({"hlo": text} if keep_hlo else {})}


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
  lines = [head] + format_init(report)
  for s in report["stages"]:
    g = report.get("growth") or []
    if s["stage"] and len(g) >= s["stage"]:
      g = g[s["stage"] - 1]
      lines += _grew(g, f"growth to stage {g['stage']} after step {g['step']} (Adam "
                     f"{g['optimizer']})", f"stage {g['from_stage']}", f"stage {g['stage']}",
                     f"stage {g['stage']}'s growth")
    lines.append(
        f"growlm: stage {s['stage']}: {s['params'] / 1e6:.1f}M params ({s['dtype']}), attention "
        f"{s['attention']} ({s['pallas_kernels']} Pallas kernels), remat {s['remat']}, "
        f"{s['scan_unroll']} of {s['n_layers']} layers per scan iteration, loss chunk "
        f"{s['loss_chunk']} ({s['logits']} logits): {s['bytes_per_device'] / GIB:.2f} GiB per "
        f"device (state and batch {s['argument_bytes'] / GIB:.2f}, temporaries "
        f"{s['temp_bytes'] / GIB:.2f}), "
        f"{_fits(s)}; compiled in {s['compile_seconds']:.1f} s")
    if "eval" in s:
      e = s["eval"]
      lines.append(
          f"growlm: stage {s['stage']} eval step: {e['bytes_per_device'] / GIB:.2f} GiB per "
          f"device (train state and batch {e['held_bytes'] / GIB:.2f}, temporaries "
          f"{e['temp_bytes'] / GIB:.2f}), {_fits(e)}; compiled in {e['compile_seconds']:.1f} s")
  return lines


def format_init(report: dict[str, Any]) -> list[str]:
  """The lines of the growth from init.source and its preservation report (none without)."""
  g = report.get("init")
  if g is None:
    return []
  return _grew(g, f"growth from init.source ({g['source_params'] / 1e6:.1f}M params) to stage 0 "
               f"(Adam {g['optimizer']})", "the source", "stage 0", "the growth from init.source")


def _fits(p: dict[str, Any]) -> str:
  return "fits" if p["fits"] else "DOES NOT FIT"


def _grew(g: dict[str, Any], name: str, src: str, dst: str, where: str) -> list[str]:
  """A growth's line (`name`, from `src`'s state to `dst`'s) and its report's (`where`)."""
  r = g["report"]
  return [f"growlm: {name}: {g['bytes_per_device'] / GIB:.2f} GiB per device ({src}'s state "
          f"{g['source_state_bytes'] / GIB:.2f}, {dst}'s state "
          f"{g['target_state_bytes'] / GIB:.2f}, temporaries {g['temp_bytes'] / GIB:.2f}), "
          f"{_fits(g)}; compiled in {g['compile_seconds']:.1f} s",
          f"growlm: preservation report at {where}: {r['bytes_per_device'] / GIB:.2f} GiB per "
          f"device (both states and a batch {r['held_bytes'] / GIB:.2f}, temporaries "
          f"{r['temp_bytes'] / GIB:.2f}), {_fits(r)}; compiled in {r['compile_seconds']:.1f} s"]
