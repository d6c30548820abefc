"""Where a train step's time goes, by part of the model, for growlm and for the PyTorch reference.

A profile of a few steps is cut into the same parts on both sides, so that growlm / reference
can be read part by part (benchmarks/README.md, "Where the time goes"):

  matmul      every product with a weight matrix (q, k, v, attention output, MLP, head) and
              the layout copies XLA adds around them
  attention   the attention kernel: scores, softmax, context, their gradients and layouts
  norms       layer norm / RMS norm, forward and backward
  loss        the softmax cross-entropy over the logits (not the head's product)
  optimizer   gradient clipping and AdamW (torch: also zero_grad)
  pointwise   the rest of the model: GELU / SwiGLU, residual adds, embeddings, dropout
  scan        growlm only: the scan over layers' slicing and stacking, and unnamed copies
  other       anything else

growlm's side reads the compiled step's HLO: each profiled op is the instruction of that name,
and its `op_name` metadata carries the name scopes growlm sets (model.decoder.PROJECT_SCOPE,
model.attention.SCOPE, train.loss.SCOPE, train.trainer.OPTIMIZER_SCOPE) and flax's module
names. The reference's side reads torch.profiler's events: on a CPU each op's own time, sorted
by the outermost event whose name says what it is (an AdamW step, an SDPA call, a linear and its
backward node); on CUDA each kernel's device time, by its kernel name.

Times are wall milliseconds per step. Ops that run at once on several lines (XLA's worker
threads on a CPU) share each instant equally, so a part's figure is its share of the wall clock
and the parts add up to the time anything ran.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import os
import re
from typing import Any, Callable, Iterable, Sequence

PARTS = ("matmul", "attention", "norms", "loss", "optimizer", "pointwise", "scan", "other")

# growlm's name scopes (kept equal to the constants named in the docstring by
# tests/test_benchmark.py), first match wins: a product inside the loss is a matmul.
SCOPES = (("optimizer", "optimizer"), ("project", "matmul"), ("attend", "attention"),
          ("loss", "loss"))
# Instruction names of layout and loop plumbing (CPU and GPU fusion names), when no scope says
# what they belong to.
_PLUMBING = re.compile(r"broadcast|dynamic[-_]update[-_]slice|dynamic[-_]slice|copy|transpose|"
                       r"while|concatenate|slice|^tuple|get-tuple-element|^bitcast")

# The reference: (substring of an event name, part), first match along the event's ancestry
# from the outermost down. Backward nodes are named like "...: AddmmBackward0".
TORCH_RULES = (
    ("Optimizer.", "optimizer"), ("_foreach_norm", "optimizer"), ("clip_grad", "optimizer"),
    ("scaled_dot_product", "attention"), ("ScaledDotProduct", "attention"),
    ("flash_attention", "attention"), ("FlashAttention", "attention"),
    ("layer_norm", "norms"), ("LayerNorm", "norms"),
    ("cross_entropy", "loss"), ("log_softmax", "loss"), ("LogSoftmax", "loss"),
    ("nll_loss", "loss"), ("NllLoss", "loss"),
    ("aten::linear", "matmul"), ("addmm", "matmul"), ("Addmm", "matmul"), ("aten::mm", "matmul"),
    ("MmBackward", "matmul"), ("aten::matmul", "matmul"), ("aten::bmm", "matmul"),
    ("gelu", "pointwise"), ("Gelu", "pointwise"), ("embedding", "pointwise"),
    ("Embedding", "pointwise"), ("aten::add", "pointwise"), ("AddBackward", "pointwise"),
    ("aten::mul", "pointwise"), ("aten::dropout", "pointwise"),
)
# CUDA kernels of the compiled reference (cuBLAS, flash attention, Inductor's fused kernels,
# fused AdamW), by a lower-case substring of the kernel name.
KERNEL_RULES = (
    ("adam", "optimizer"), ("multi_tensor", "optimizer"), ("foreach", "optimizer"),
    ("flash", "attention"), ("fmha", "attention"), ("attention", "attention"),
    ("gemm", "matmul"), ("nvjet", "matmul"), ("cutlass", "matmul"), ("xmma", "matmul"),
    ("layer_norm", "norms"), ("log_softmax", "loss"), ("nll_loss", "loss"),
    ("cross_entropy", "loss"), ("gelu", "pointwise"), ("embedding", "pointwise"),
    ("add", "pointwise"),
)

# On a CPU, any thread may run a step's ops: XLA's workers (tf_XLAEigen/...), its client thread
# (tf_XLAPjRtCpuClient/...), which at times runs a whole step itself while the workers idle
# (seen on 2-core machines), or the caller's. A host event is read by its name: an instruction
# of the step, or the executor's own work around them, less its waits for other threads.
CPU_EXECUTOR = "ThunkExecutor::Execute"
CPU_WAIT = "wait for completion"
GPU_OPS_LINE = "XLA Ops"   # a device plane's line of HLO ops (the kernels' lines repeat them)
HLO_OP_STAT = "hlo_op"     # a device kernel's stat naming the HLO instruction it runs
_NOT_KERNELS = (GPU_OPS_LINE, "XLA Modules", "Steps", "XLA TraceMe", "Async XLA Ops")


@contextlib.contextmanager
def fresh_metadata():
  """Within: a persistent compilation cache keys executables by their metadata too, so that a
  step compiled before a name scope changed is not reused with the old op_names (jax leaves
  metadata out of the key by default)."""
  import jax   # pylint: disable=import-outside-toplevel
  key = "jax_compilation_cache_include_metadata_in_key"
  before = getattr(jax.config, key)
  jax.config.update(key, True)
  try:
    yield
  finally:
    jax.config.update(key, before)


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, op_name metadata)} of every instruction in an HLO module's
  text (the first definition of a name wins; fused computations' inner ones are kept too)."""
  out: dict[str, tuple[str, str]] = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\((.*)$", hlo_text, re.M):
    name, opcode, rest = m.groups()
    op_name = re.search(r'op_name="([^"]*)"', rest)
    out.setdefault(name, (opcode, op_name.group(1) if op_name else ""))
  return out


def jax_part(name: str, op_name: str) -> str:
  """The part of one HLO instruction: by growlm's name scopes in its op_name, then norm
  modules, then loop and layout plumbing, then the model's other ops."""
  segments = [_unwrapped(s) for s in op_name.split("/")]
  for scope, part in SCOPES:
    if scope in segments:
      return part
  if any(s.endswith("norm") for s in segments):
    return "norms"
  if (_PLUMBING.search(name) or any("dynamic_index_in_dim" in s or "dynamic_update_index" in s
                                    for s in segments)):
    return "scan"
  if any(s in ("Decoder", "layers", "hidden") for s in segments):
    return "pointwise"
  return "other"


def _unwrapped(segment: str) -> str:
  """A name scope as written, from its op_name segment under transformations:
  "transpose(jvp(loss))" -> "loss"."""
  return re.sub(r"^(?:[\w.]+\()+([^()]*)\)+$", r"\1", segment)


def torch_part(ancestry: Sequence[str]) -> str:
  """The part of a reference event, given its name and its parents' (outermost first)."""
  for name in ancestry:
    for key, part in TORCH_RULES:
      if key in name:
        return part
  return "other"


def kernel_part(kernel: str) -> str:
  """The part of a CUDA kernel of the reference, by its name."""
  low = kernel.lower()
  for key, part in KERNEL_RULES:
    if key in low:
      return part
  return "other"


def wall_by_part(lines: Iterable[Sequence[tuple[int, int, str]]]) -> dict[str, float]:
  """{part: wall time} of timed spans (start, end, part) on several lines (threads or
  streams). On one line, nested spans give each instant to the innermost one; across lines,
  an instant shared by k running spans gives 1/k to each. The figures add up to the union."""
  # (time, -1 end / +1 start, -end: of spans starting together the longer (outer) first,
  # line, part); ends sort before starts at the same instant.
  edges: list[tuple[int, int, int, int, str]] = []
  for li, spans in enumerate(lines):
    for s, e, part in spans:
      if e > s:
        edges += [(s, 1, -e, li, part), (e, -1, 0, li, part)]
  edges.sort(key=lambda x: x[:3])
  stacks: dict[int, list[str]] = collections.defaultdict(list)
  out: dict[str, float] = collections.defaultdict(float)
  last = None
  for t, kind, _, li, part in edges:
    if last is not None and t > last:
      running = [st[-1] for st in stacks.values() if st]
      for p in running:
        out[p] += (t - last) / len(running)
    last = t
    if kind == 1:
      stacks[li].append(part)
    else:   # the innermost span of this part ends (spans of one part are interchangeable)
      del stacks[li][len(stacks[li]) - 1 - stacks[li][::-1].index(part)]
  return dict(out)


def jax_spans(planes, table: dict) -> list[list[tuple[int, int, str]]]:
  """Per line, the (start ns, end ns, part) of every event that names an instruction of the
  step (`table`, from `instructions`). On a CPU: every host thread that ran one (see
  CPU_EXECUTOR). On a device: the plane's "XLA Ops" line where its events name instructions;
  otherwise (ops grouped into command buffers, say) each stream's kernels, by the `hlo_op` stat
  the profiler attaches to one."""

  def spans(events, name_of) -> list[tuple[int, int, str]]:
    out = []
    for e in events:
      name = _instruction(name_of(e) or "")
      if name in table:
        out.append((e.start_ns, e.start_ns + e.duration_ns, jax_part(name, table[name][1])))
    return out

  device = [pl for pl in planes if pl.name.startswith("/device:")]
  if not device:
    found = [spans(line.events, lambda e: e.name)
             for pl in planes if pl.name.startswith("/host:CPU") for line in pl.lines]
    return [line for line in found if line]
  out = []
  for plane in device:
    ops = [spans(line.events, lambda e: e.name)
           for line in plane.lines if line.name == GPU_OPS_LINE]
    if any(ops):
      out += ops
      continue
    out += [spans(line.events, lambda e: _stats(e).get(HLO_OP_STAT))
            for line in plane.lines if line.name not in _NOT_KERNELS]
  return out


def _instruction(event_name: str) -> str:
  """The instruction an event's name may give: "%fusion.3 = f32[..] fusion(..)" -> fusion.3."""
  return event_name.split(" ")[0].lstrip("%")


def cpu_work(events, table: dict) -> list[tuple[int, int]]:
  """The sorted (start ns, end ns) of a host line's events that run a step: its instructions
  (`table`, from `instructions`) and the executor's work around them, not its waits."""
  return sorted((e.start_ns, e.start_ns + e.duration_ns) for e in events
                if _instruction(e.name) in table
                or (e.name.startswith(CPU_EXECUTOR) and CPU_WAIT not in e.name))


def _stats(event) -> dict[str, Any]:
  try:
    return dict(event.stats)
  except (TypeError, ValueError):
    return {}


def per_step(totals: dict[str, float], steps: int, unit: float) -> dict[str, float]:
  """{part: ms per step} for every part (0 where none), from totals in `unit` per ms."""
  return {p: totals.get(p, 0.0) / unit / steps for p in PARTS}


def trace_planes(step: Callable[[], Any], directory: str, steps: int = 3) -> list:
  """Runs `step` (which waits for its result) `steps` times under jax.profiler into
  `directory` (the .xplane.pb stays there for xprof); the trace's planes."""
  import jax   # pylint: disable=import-outside-toplevel
  os.makedirs(directory, exist_ok=True)
  jax.profiler.start_trace(directory)
  for _ in range(steps):
    step()
  jax.profiler.stop_trace()
  path = sorted(glob.glob(os.path.join(directory, "**", "*.xplane.pb"), recursive=True))[-1]
  return list(jax.profiler.ProfileData.from_file(path).planes)


def jax_parts(planes, table: dict, steps: int) -> dict[str, float]:
  """{part: wall ms per step} of a trace of `steps` steps of the compiled step whose
  instructions are `table` (from `instructions`)."""
  return per_step(wall_by_part(jax_spans(planes, table)), steps, 1e6)


def trace_jax(step: Callable[[], Any], hlo_text: str, directory: str, steps: int = 3
              ) -> dict[str, float]:
  """{part: wall ms per step} of `steps` runs of `step` traced into `directory`."""
  return jax_parts(trace_planes(step, directory, steps), instructions(hlo_text), steps)


def torch_spans(events, cuda: bool) -> list[list[tuple[int, int, str]]]:
  """Per thread (CPU) or per device stream (CUDA kernels), (start us, end us, part) of the
  reference's profiled events; on a CPU each event's span is cut to its own time by nesting."""
  lines: dict[Any, list[tuple[int, int, str]]] = collections.defaultdict(list)
  for ev in events:
    is_kernel = getattr(ev, "device_type", None) is not None and "CUDA" in str(ev.device_type)
    if cuda != is_kernel:
      continue
    start, end = int(ev.time_range.start), int(ev.time_range.end)
    if cuda:
      lines[(getattr(ev, "device_index", 0), getattr(ev, "device_resource_id", 0))].append(
          (start, end, kernel_part(ev.name)))
    else:
      chain, parent = [ev.name], ev.cpu_parent
      while parent is not None:
        chain.insert(0, parent.name)
        parent = parent.cpu_parent
      lines[ev.thread].append((start, end, torch_part(chain)))
  return list(lines.values())


def trace_torch(step: Callable[[], Any], cuda: bool, steps: int = 3) -> dict[str, float]:
  """Runs the reference's `step` (which waits for itself) `steps` times under torch.profiler;
  {part: wall ms per step}."""
  import torch   # pylint: disable=import-outside-toplevel
  activities = [torch.profiler.ProfilerActivity.CPU]
  if cuda:
    activities.append(torch.profiler.ProfilerActivity.CUDA)
  with torch.profiler.profile(activities=activities) as prof:
    for _ in range(steps):
      step()
  return per_step(wall_by_part(torch_spans(prof.events(), cuda)), steps, 1e3)


def table(growlm: dict[str, float], reference: dict[str, float] | None, step_ms: float,
          reference_ms: float | None = None) -> list[str]:
  """Lines of a side-by-side table, ms per step by part, with the ratio where both ran."""
  head = f"    {'part':<10} {'growlm ms':>10}"
  if reference is not None:
    head += f" {'reference ms':>12} {'growlm / ref':>12}"
  lines = [head]
  for p in PARTS + ("busy", "step"):
    if p == "busy":
      g, r = sum(growlm.values()), sum(reference.values()) if reference is not None else None
    elif p == "step":
      g, r = step_ms, reference_ms
    else:
      g, r = growlm[p], reference[p] if reference is not None else None
    line = f"    {p:<10} {g:>10.1f}"
    if reference is not None:
      line += f" {r:>12.1f}" if r is not None else f" {'-':>12}"
      line += f" {g / r:>12.2f}" if r else f" {'-':>12}"
    lines.append(line)
  return lines
