"""The train step compiled for an NVIDIA GPU on this CPU, and the memory traffic of its kernels.

    make gpu-aot                                   # once: XLA's CUDA plugin and cuDNN (~1 GB)
    .venv/bin/python benchmarks/gpu_traffic.py     # GPT-2 124M, bf16, 16 x 1024, one H100
    .venv/bin/python benchmarks/gpu_traffic.py --gpu h200 --per_gpu 32 --top 20

No GPU is needed, nor a CUDA driver. XLA's CUDA compiler runs as a PJRT plugin (the
`jax-cuda12-pjrt` wheel) that describes a GPU from a target description (SMs, clock, memory,
bandwidth, compute capability: TARGETS below, from NVIDIA's public specs), and cuDNN's library
builds the fused attention's graphs without a device. The step is lowered and compiled exactly
as the trainer jits it (growlm/train/aot.py, the same path as `--compile_for`), so the optimized
HLO is the one an H100 would run, up to autotuning (which needs the device: kernels' tile sizes
may differ, their fusion and traffic do not).

From that HLO this script lists every kernel one step launches (fusions, cuBLAS/Triton products,
cuDNN calls, copies; the ones inside the scan over layers and the loss's loops counted once per
iteration) with the bytes it reads and writes: its operands and its result, except that an operand
a kernel only slices or gathers from counts as the slice it reads, and a buffer it updates in
place counts as the update it writes. Kernels are sorted into benchmarks/parts.py's parts by the
name scopes in their metadata. Traffic over the measured device copy rate is a lower bound on the
time of the parts that do not compute much (all but the matrix products and attention); the
issue's profile of an H100 step put about 12 ms there, and this estimate reads about the same
(benchmarks/README.md, "GPU traffic"). Use it to find and remove traffic before a GPU session
measures the gain; it is not a timing.
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import glob
import importlib
import os
import re
import sys
from typing import NamedTuple, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/common.py
import compile_for  # pylint: disable=wrong-import-position  # benchmarks/compile_for.py
import growth  # pylint: disable=wrong-import-position  # benchmarks/growth.py
import parts  # pylint: disable=wrong-import-position  # benchmarks/parts.py
from growlm.errors import GrowlmError  # pylint: disable=wrong-import-position

GB = 1e9
# The copy rate (read + write) of a device copy on an H100 80GB HBM3, measured on 2026-11-27
# (benchmarks/README.md, "GPU"); 0.71 of the spec bandwidth. H200: the same fraction of 4.8 TB/s.
COPY_RATE = {"h100": 2.39e12, "h200": 0.71 * 4.8e12}
# NVIDIA's public figures for the SXM parts (the H200 is the H100's chip with more and faster
# memory). XLA reads these to size its kernels and to plan memory.
TARGETS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", memory=85_520_809_984, bandwidth=3_352_320_000_000),
    "h200": dict(name="NVIDIA H200", memory=150_754_820_096, bandwidth=4_800_000_000_000),
}
_CHIP = dict(sms=132, clock_ghz=1.98, l2=50 * 2**20, smem_block=48 * 1024,
             smem_block_optin=227 * 1024, smem_sm=228 * 1024)
_SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier"}
_THROUGH = ("bitcast", "convert")
_SIZES = {"f64": 8, "s64": 8, "u64": 8, "f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2,
          "s16": 2, "u16": 2, "s8": 1, "u8": 1, "pred": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_ARRAY = re.compile(r"\b(" + "|".join(_SIZES) + r")\[([\d,]*)\]")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_HEADER = re.compile(r"^(ENTRY )?%([\w.\-]+) .*\{\s*$")


def target_config(gpu: str) -> str:
  """XLA's GpuTargetConfigProto, as text, for one of TARGETS."""
  t, c = TARGETS[gpu], _CHIP
  return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 threads_per_core_limit: 2048
  shared_memory_per_block: {c['smem_block']} shared_memory_per_core: {c['smem_sm']}
  shared_memory_per_block_optin: {c['smem_block_optin']}
  core_count: {c['sms']} fpus_per_core: 128 clock_rate_ghz: {c['clock_ghz']}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {t['bandwidth']} l2_cache_size: {c['l2']} device_memory_size: {t['memory']}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: 9 minor: 0 }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 10 patch: 0 }}
device_description_str: "{t['name']}"
"""


def aot_root() -> str:
  """Where `make gpu-aot` installs the plugin and cuDNN (GROWLM_CUDA_AOT overrides)."""
  return os.environ.get("GROWLM_CUDA_AOT") or os.path.join(sys.prefix, "cuda-aot")


def cuda_devices(gpu: str, count: int = 1) -> list:
  """`count` compile-only devices of the GPU `gpu`, from XLA's CUDA plugin (no GPU needed)."""
  root = aot_root()
  plugin = os.path.join(root, "jax_plugins", "xla_cuda12", "xla_cuda_plugin.so")
  if not os.path.isfile(plugin):
    raise GrowlmError(f"XLA's CUDA plugin is not at {plugin}; accepted: `make gpu-aot` "
                      "(installs it there), or GROWLM_CUDA_AOT=DIR holding "
                      "jax_plugins/xla_cuda12 and nvidia/cudnn")
  # cuDNN is found by the plugin through the process's loaded libraries, as jax's own CUDA
  # package arranges on a GPU machine (its engines' libraries load later, from beside it).
  for lib in glob.glob(os.path.join(root, "nvidia", "cudnn", "lib", "libcudnn.so.*")):
    ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
  import jax  # pylint: disable=import-outside-toplevel
  from jax._src import xla_bridge  # pylint: disable=import-outside-toplevel
  from jax._src.lib import xla_client  # pylint: disable=import-outside-toplevel
  jax.devices()   # the CPU backend first: jax must not take the plugin for its own GPU
  _cudnn_versions(root)
  if "cuda" not in _API:
    if xla_client.pjrt_plugin_loaded("cuda"):   # jax's own, on a GPU machine
      _API["cuda"] = xla_bridge._backend_factories["cuda"].c_api  # pylint: disable=protected-access
    else:
      _API["cuda"] = xla_client.load_pjrt_plugin_dynamically("cuda", plugin)
  topology = xla_client.make_c_api_device_topology(
      _API["cuda"], "", target_config=target_config(gpu), topology=f"1x1x{count}")
  return list(topology._make_compile_only_devices())  # pylint: disable=protected-access


_API: dict = {}   # the loaded plugin's C API, by platform


def _cudnn_versions(root: str) -> None:
  """jax asks `jax_cuda12_plugin` (installed beside the plugin) for cuDNN's version before it
  lowers cuDNN attention; a CPU install of jax looked for it at import and found none."""
  # pylint: disable=import-outside-toplevel
  from jax._src import lib
  from jax._src.cudnn import fused_attention_stablehlo as fused
  if fused.cuda_versions is None:
    if root not in sys.path:
      sys.path.append(root)
    lib.cuda_versions = fused.cuda_versions = importlib.import_module(
        "jax_cuda12_plugin._versions")


class Kernel(NamedTuple):
  """One kernel of a step: what it is, how often a step launches it, and its traffic."""
  name: str
  opcode: str
  op_name: str
  launches: int
  read: int    # bytes per launch
  written: int
  part: str

  @property
  def bytes(self) -> int:
    return self.launches * (self.read + self.written)


def array_bytes(shape: str) -> int:
  """Bytes of an HLO shape (an array or a tuple of arrays)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    n = 1
    for d in dims.split(","):
      n *= int(d) if d else 1
    total += n * _SIZES[dtype]
  return total


def _computations(hlo: str) -> tuple[dict[str, list[tuple]], str]:
  """{computation: [(name, shape, opcode, rest)], its root last} of an HLO module's text, and
  the entry's name."""
  comps: dict[str, list[tuple]] = {}
  root: dict[str, tuple | None] = {}
  entry, current = "", None
  for line in hlo.splitlines():
    header = _HEADER.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      entry = current if header.group(1) else entry
    elif line.startswith("}"):
      current = None
    elif current is not None:
      m = _INSTRUCTION.match(line)
      if m:
        comps[current].append(m.groups()[1:])
        root[current] = m.groups()[1:] if m.group(1) else root.get(current)
  for comp, inst in root.items():   # the root last, so that body[-1] is each one's root
    if inst is not None:
      comps[comp].remove(inst)
      comps[comp].append(inst)
  return comps, entry


def _operands(rest: str) -> list[str]:
  """The operand names of an instruction (the text after its opcode's parenthesis)."""
  depth, end = 1, 0
  for end, ch in enumerate(rest):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if depth == 0:
      break
  return re.findall(r"%([\w.\-]+)", rest[:end])


def _fused_traffic(body: list[tuple], operand_bytes: list[int], result_bytes: int
                   ) -> tuple[int, int]:
  """(read, written) bytes of one launch of a fusion whose computation is `body`."""
  shapes = {name: shape for name, shape, _, _ in body}
  users: dict[str, list[tuple]] = collections.defaultdict(list)
  params = {}
  for inst in body:
    name, _, opcode, rest = inst
    if opcode == "parameter":
      params[name] = int(re.match(r"(\d+)", rest).group(1))
      continue
    for i, operand in enumerate(_operands(rest)):
      users[operand].append((inst, i))
  read = 0
  for name, index in params.items():
    full = operand_bytes[index] if index < len(operand_bytes) else array_bytes(shapes[name])
    uses = list(users[name])
    # A bitcast reads nothing, and a fused convert only the elements its users ask for (XLA
    # emits a fusion's elementwise ops per element its users read): their users read.
    while any(u[2] in _THROUGH for u, _ in uses):
      uses = [x for u, i in uses for x in (users[u[0]] if u[2] in _THROUGH else [(u, i)])]
    if uses and all(u[2] in ("slice", "dynamic-slice", "gather") and i == 0 for u, i in uses):
      read += sum(array_bytes(u[1]) for u, _ in uses)    # only the slices it reads
    elif uses and all(u[2] == "dynamic-update-slice" and i == 0 for u, i in uses):
      pass                                                 # a buffer updated in place
    else:
      read += full
  root = body[-1] if body else None
  written = result_bytes
  if root is not None:
    outs = [root] if root[2] != "tuple" else [i for i in body if i[0] in _operands(root[3])]
    if all(o[2] == "dynamic-update-slice" for o in outs):
      written = sum(array_bytes(shapes[_operands(o[3])[1]]) for o in outs)
  return read, written


def kernels(hlo: str) -> list[Kernel]:
  """Every kernel a step of the optimized HLO module `hlo` launches (module docstring)."""
  comps, entry = _computations(hlo)
  out: list[Kernel] = []

  def walk(comp: str, times: int) -> None:
    shapes = {name: shape for name, shape, _, _ in comps[comp]}
    for name, shape, opcode, rest in comps[comp]:
      if opcode in _SKIP:
        continue
      if opcode == "while":
        body = re.search(r"body=%([\w.\-]+)", rest).group(1)
        trips = re.search(r'known_trip_count":\{"n":"(\d+)"', rest)
        walk(body, times * (int(trips.group(1)) if trips else 1))
        continue
      if opcode in ("call", "conditional", "async-start"):
        for callee in re.findall(r"(?:to_apply|calls|branch_computations)=\{?%([\w.\-]+)", rest):
          walk(callee, times)
        continue
      operand_bytes = [array_bytes(shapes.get(o, "")) for o in _operands(rest)]
      read, written = sum(operand_bytes), array_bytes(shape)
      fused = re.search(r"calls=%([\w.\-]+)", rest)
      if opcode == "fusion" and fused and fused.group(1) in comps:
        read, written = _fused_traffic(comps[fused.group(1)], operand_bytes, written)
      op_name = re.search(r'op_name="([^"]*)"', rest)
      out.append(Kernel(name, opcode, op_name.group(1) if op_name else "", times, read,
                        written, parts.jax_part(name, op_name.group(1) if op_name else "")))

  walk(entry, 1)
  return out


def by_part(ks: list[Kernel]) -> dict[str, dict[str, float]]:
  """{part: {"launches", "gb"}} per step, in parts.PARTS order."""
  out = {p: {"launches": 0, "gb": 0.0} for p in parts.PARTS}
  for k in ks:
    out[k.part]["launches"] += k.launches
    out[k.part]["gb"] += k.bytes / GB
  return {p: v for p, v in out.items() if v["launches"]}


def report(gpu: str, style: str, remat: str, per_gpu: int, n_layers: int, top: int,
           attention: str = "auto", overrides: Sequence[str] = ()) -> dict:
  """Compiles the `gpt2-124m` step (benchmarks/compile_for.py's shape) for one `gpu` and
  returns its memory plan, kernels by part, and the `top` kernels by traffic. `overrides`:
  config fields as "model.scan_unroll=2", typed as --config's are."""
  from growlm.config import files  # pylint: disable=import-outside-toplevel
  from growlm.config.typed import resolve  # pylint: disable=import-outside-toplevel
  from growlm.train import aot  # pylint: disable=import-outside-toplevel
  devices = cuda_devices(gpu)
  config = compile_for.gpt2_124m(style, remat, per_gpu, 1, {}, n_layers)
  config.model.attention = attention
  files.apply_overrides(config, dict(item.partition("=")[::2] for item in overrides),
                        what="--set")
  r = aot.compile_on(resolve(config), devices, gpu, gpu, TARGETS[gpu]["memory"], keep_hlo=True,
                     train_only=True)   # the train step's kernels only
  stage = r["stages"][0]
  ks = kernels(stage.pop("hlo"))
  rate = COPY_RATE[gpu]
  parted = by_part(ks)
  for v in parted.values():
    v["ms_at_copy_rate"] = v["gb"] * GB / rate * 1e3
  light = sum(v["gb"] for p, v in parted.items() if p not in ("matmul", "attention"))
  biggest = sorted(ks, key=lambda k: -k.bytes)[:top]
  return {"gpu": gpu, "device_kind": r["device_kind"], "style": style, "stage": stage,
          "copy_rate": rate, "launches": sum(k.launches for k in ks), "parts": parted,
          "light_gb": light, "light_ms_at_copy_rate": light * GB / rate * 1e3,
          "top": [k._asdict() | {"gb": k.bytes / GB} for k in biggest]}


def growth_report(device, style: str, preset: str = "gpt2-124m", top: int = 5) -> dict:
  """benchmarks/growth.py's growth (`preset`'s shapes, its default plan for `style`) compiled for
  `device` (a GPU target's, or any jax device): its kernels and their traffic against the
  floor's bytes, the source's params read and the target's written."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from growlm.grow.plan import GrowthPlan  # pylint: disable=import-outside-toplevel
  from growlm.model import decoder as model_lib  # pylint: disable=import-outside-toplevel
  src, dst = growth.PRESETS[preset](style)
  plan = GrowthPlan(width=growth.default_width(style), depth="identity")
  fn = growth.growth_fn(src, dst, plan, "none")
  place = jax.sharding.SingleDeviceSharding(device)
  params = model_lib.abstract_params(src)[0]
  args = (jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=place), params),
          jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=place))
  # Traced under a mesh of the GPU, so that growth takes the GPU's path (grow/assemble.py).
  with jax.set_mesh(jax.sharding.Mesh(np.array([device]), ("data",))):
    ks = kernels(jax.jit(fn).lower(*args).compile().as_text())
  floor = growth.nbytes(params) + growth.nbytes(jax.eval_shape(fn, *args))
  moved = sum(k.bytes for k in ks)
  return {"style": style, "preset": preset, "width": plan.width, "depth": plan.depth,
          "floor_gb": floor / GB, "gb": moved / GB, "over_floor": moved / floor,
          "launches": sum(k.launches for k in ks),
          "top": [k._asdict() | {"gb": k.bytes / GB}
                  for k in sorted(ks, key=lambda k: -k.bytes)[:top]]}


def format_growth(g: dict, rate: float) -> str:
  return (f"growth {g['preset']} ({g['style']}, {g['width']} + {g['depth']}): {g['launches']} "
          f"kernels, {g['gb']:.2f} GB read + written, {g['over_floor']:.2f}x the floor's "
          f"{g['floor_gb']:.2f} GB (source read, target written); at the copy rate "
          f"{g['gb'] * GB / rate * 1e3:.2f} ms against {g['floor_gb'] * GB / rate * 1e3:.2f} ms")


def format_report(r: dict) -> str:
  """One GPU and style's report as the tables the script prints."""
  s = r["stage"]
  lines = [f"{r['device_kind']}: {r['style']} {s['params'] / 1e6:.1f}M params, attention "
           f"{s['attention']}, remat {s['remat']}, {s['scan_unroll']} of {s['n_layers']} layers "
           f"per scan iteration, loss chunk {s['loss_chunk']} ({s['logits']} logits); XLA's "
           f"plan {s['bytes_per_device'] / 2**30:.2f} GiB (state and batch "
           f"{s['argument_bytes'] / 2**30:.2f}, temporaries {s['temp_bytes'] / 2**30:.2f}); "
           f"{r['launches']} kernels per step; compiled in {s['compile_seconds']:.1f} s",
           "", "| part | kernels | GB read + written | ms at the copy rate |",
           "| --- | --- | --- | --- |"]
  for p, v in r["parts"].items():
    lines.append(f"| {p} | {v['launches']} | {v['gb']:.2f} | {v['ms_at_copy_rate']:.2f} |")
  lines.append(f"| all but matmul and attention | | {r['light_gb']:.2f} | "
               f"{r['light_ms_at_copy_rate']:.2f} |")
  if r["top"]:
    lines += ["", "| GB | launches | part | kernel | op_name |", "| --- | --- | --- | --- | --- |"]
    for k in r["top"]:
      lines.append(f"| {k['gb']:.2f} | {k['launches']} | {k['part']} | {k['name']} | "
                   f"{k['op_name'][-80:]} |")
  return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--gpu", choices=sorted(TARGETS), default="h100")
  p.add_argument("--styles", default="gpt2")
  p.add_argument("--remat", default="auto")
  p.add_argument("--attention", default="auto")
  p.add_argument("--per_gpu", type=int, default=16, help="sequences of 1024 tokens per step")
  p.add_argument("--n_layers", type=int, default=12)
  p.add_argument("--top", type=int, default=12, help="list the kernels with the most traffic")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="a config field, e.g. model.scan_unroll=2 (repeatable)")
  p.add_argument("--growth", action="store_true",
                 help="also benchmarks/growth.py's gpt2-124m growth (124M -> 355M shapes) "
                 "compiled for the GPU, against its floor")
  p.add_argument("--out", default="runs/bench/gpu_traffic.json")
  return p.parse_args(argv)


def run(args: argparse.Namespace, command: str = "") -> dict:
  results = [report(args.gpu, style, args.remat, args.per_gpu, args.n_layers, args.top,
                    args.attention, args.set) for style in args.styles.split(",")]
  grown = ([growth_report(cuda_devices(args.gpu)[0], style) for style in args.styles.split(",")]
           if args.growth else [])
  return {"command": command, "results": results, "growth": grown,
          "copy_rate": COPY_RATE[args.gpu]}


def _summary(result: dict) -> str:
  return "\n\n".join([format_report(r) for r in result["results"]]
                     + [format_growth(g, result["copy_rate"]) for g in result["growth"]])


def main(argv: Sequence[str] | None = None) -> dict:
  return common.cli(__file__, argv, parse_args, run, _summary)


if __name__ == "__main__":
  main()
