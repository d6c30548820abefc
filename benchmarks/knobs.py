"""The train step's speed knobs, one variant after another in one process: which settings pay.

Each variant is the benchmark's model (throughput.py's preset and flags) with some of the
model's speed fields changed (`attention`, `remat`, `scan_unroll`, `loss_chunk`,
`logits_dtype`; docs/design.md section 9), the batch, the parameters' dtype, `projections=einsum`: the products with weight
matrices traced as the einsums growlm used before `model.decoder.project` (the A/B of its flat
form, design.md 9 "Flat projections"), or `kernel_forward=rerun`: cuDNN's or splash's forward
run again in the backward pass under the dots remat policies, as before they kept it (design.md
9, "Rematerialisation"). For each one, on one device: the trainer's jitted
train step is compiled (timed), run `--warmup` times, then timed `--steps` times with one
reference matmul timed before each step (as throughput.py does). Reported per variant: train
tokens/s (median step), its ratio to the first variant's, MFU against the matmul and against
the device's spec peak, compile seconds, and XLA's buffer estimate of the compiled step
(arguments + outputs - donated + temporaries: the step's own memory, which the process-wide
allocator peak cannot give per variant).

This is how the defaults per platform were chosen (benchmarks/README.md, "Speed knobs"). It
does not run the PyTorch reference: throughput.py gives growlm / reference for the defaults,
and a variant's ratio to the reference is its ratio to the first variant times that.

Usage:
  python benchmarks/knobs.py --preset gpt2-124m \
      --variants "default; loss_chunk=256; remat=dots_no_batch,loss_chunk=256"
  .venv/bin/python benchmarks/knobs.py --quick --out /tmp/k.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import datetime
import os
import statistics
import sys
import time
from typing import Any, Sequence

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/common.py
import parts  # pylint: disable=wrong-import-position  # benchmarks/parts.py
import throughput  # pylint: disable=wrong-import-position  # benchmarks/throughput.py

from growlm import sharding  # pylint: disable=wrong-import-position
from growlm.model import attention as attention_lib  # pylint: disable=wrong-import-position
from growlm.model import decoder as model_lib  # pylint: disable=wrong-import-position
from growlm.model import flops as flops_lib  # pylint: disable=wrong-import-position
from growlm.model import speed  # pylint: disable=wrong-import-position
from growlm.train import loss as loss_lib  # pylint: disable=wrong-import-position
from growlm.train import state as state_lib  # pylint: disable=wrong-import-position

DEFAULT_OUT = os.path.join("runs", "bench", "knobs.json")
# projections=einsum puts back the products growlm wrote before model.decoder.project (the
# weight matrix contracted over its leading dims as one dot_general, whose weight gradient
# contracts batch and position as two dims): the A/B of docs/design.md 9, "Flat projections".
PROJECTIONS = ("flat", "einsum")
# kernel_forward=rerun keeps no fused attention kernel's forward under the dots remat policies
# (model.attention.KERNEL_FORWARDS emptied), as before 2026-11-28: cuDNN's and splash's forward
# then runs again in the backward pass. The A/B of design.md 9, "Rematerialisation".
KERNEL_FORWARD = ("kept", "rerun")


def _choice(knob: str, accepted: tuple[str, ...]):
  def parse(value: str) -> str:
    if value not in accepted:
      raise ValueError(f"{knob}={value!r}; accepted: {', '.join(accepted)}")
    return value
  return parse


def _count(knob: str, minimum: int):
  def parse(value: str) -> int:
    try:
      n = int(value)
    except ValueError:
      n = None
    if n is None or n < minimum:
      raise ValueError(f"{knob}={value!r}; accepted: an integer >= {minimum}")
    return n
  return parse


# param_dtype=bfloat16 stores parameters (and so AdamW's moments) in bf16 with no float32 master
# copy: not a training setting to use, but the most that bf16 storage could gain in speed.
KNOBS = {"attention": str, "remat": str, "scan_unroll": _count("scan_unroll", 0),
         "loss_chunk": _count("loss_chunk", 0), "logits_dtype": str, "batch": _count("batch", 1),
         "param_dtype": str, "projections": _choice("projections", PROJECTIONS),
         "kernel_forward": _choice("kernel_forward", KERNEL_FORWARD)}
DEFAULT_VARIANTS = ("default; projections=einsum; loss_chunk=128; loss_chunk=256; "
                    "loss_chunk=512; remat=dots_no_batch; remat=full; scan_unroll=2; attention=xla")
QUICK = dict(size="nano", batch=2, seq_len=32, steps=2, warmup=1, matmul_size=256)
QUICK_VARIANTS = "default; loss_chunk=8"   # --quick without --variants


def parse_variants(text: str) -> list[dict[str, Any]]:
  """'default; a=1,b=x; ...' -> [{}, {'a': 1, 'b': 'x'}, ...]; ValueError naming a bad one."""
  out = []
  for item in (s.strip() for s in text.split(";")):
    if not item:
      continue
    fields: dict[str, Any] = {}
    if item != "default":
      for pair in item.split(","):
        key, sep, value = (s.strip() for s in pair.partition("="))
        if not sep or key not in KNOBS:
          raise ValueError(f"variant {item!r}: {pair!r} is not KNOB=VALUE with KNOB one of "
                           f"{sorted(KNOBS)}")
        fields[key] = KNOBS[key](value)
    out.append(fields)
  if not out:
    raise ValueError("--variants names no variant")
  return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", choices=sorted(throughput.PRESETS), default=None,
                 help="throughput.py's presets (default: cpu on a CPU, else gpt2-124m)")
  p.add_argument("--style", default="gpt2", help="model style")
  p.add_argument("--variants", default=None,
                 help="';'-separated variants, each 'default' or KNOB=VALUE[,KNOB=VALUE]; "
                 f"knobs: {', '.join(KNOBS)}; the first is the baseline of the ratios "
                 f"(default: {DEFAULT_VARIANTS!r}; with --quick: {QUICK_VARIANTS!r})")
  p.add_argument("--steps", type=int, default=8, help="timed steps per variant")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--profile", default="", help="a directory: trace 3 more steps of each "
                 "variant there and report the 40 costliest device events per step, each "
                 "profiled line's busy time and that of all of them together")
  common.add_output_flags(p, DEFAULT_OUT, QUICK)
  args = p.parse_args(argv)
  args.preset = args.preset or throughput.default_preset()
  for k, v in throughput.PRESETS[args.preset].items():
    setattr(args, k, v)
  for k in ("attention", "remat", "logits_dtype"):
    setattr(args, k, "auto")
  args.scan_unroll, args.loss_chunk = 0, 0
  common.apply_quick(args, QUICK, p, argv)
  if args.variants is None:
    args.variants = QUICK_VARIANTS if args.quick else DEFAULT_VARIANTS
  try:
    args.variant_list = parse_variants(args.variants)
  except ValueError as e:
    p.error(str(e))
  args.seen = []
  if args.steps <= 0 or args.warmup < 0:
    p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
  return args


def _einsum_project(x, w, n_in=1, preferred_element_type=None):
  """The product as the einsums before model.decoder.project computed it."""
  dims = ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ()))
  return jax.lax.dot_general(x, w, dims, preferred_element_type=preferred_element_type)


@contextlib.contextmanager
def _swapped(module, name: str, value):
  """`module.name` set to `value` while a variant is traced. The model's jitted functions cache
  their traces by config, which the swap does not change, so every cache is cleared on the way
  in and out."""
  kept = getattr(module, name)
  jax.clear_caches()
  setattr(module, name, value)
  try:
    yield
  finally:
    setattr(module, name, kept)
    jax.clear_caches()


def _using_projections(kind: str):
  """With `einsum`, model.decoder.project swapped for the einsum form."""
  return (_swapped(model_lib, "project", _einsum_project) if kind == "einsum"
          else contextlib.nullcontext())


def _using_kernel_forward(kind: str):
  """With `rerun`, no fused kernel's forward kept under remat (KERNEL_FORWARDS emptied)."""
  return (_swapped(attention_lib, "KERNEL_FORWARDS", frozenset()) if kind == "rerun"
          else contextlib.nullcontext())


def bench_variant(args: argparse.Namespace, fields: dict[str, Any], mesh,
                  reference: throughput.MatmulReference) -> dict[str, Any]:
  """One variant's train step: compile seconds, step timings, rates and buffer sizes."""
  with _using_projections(fields.get("projections", "flat")), \
       _using_kernel_forward(fields.get("kernel_forward", "kept")):
    return _bench_variant(args, fields, mesh, reference)


def _bench_variant(args: argparse.Namespace, fields: dict[str, Any], mesh,
                   reference: throughput.MatmulReference) -> dict[str, Any]:
  vargs = copy.copy(args)
  for k, v in fields.items():
    setattr(vargs, k, v)
  cfg = throughput.model_config(args.style, vargs).replace(
      param_dtype=fields.get("param_dtype", "float32"))
  device = mesh.devices.flat[0]
  optimizer, schedule = throughput.trainer_optimizer(args.size, args.style)
  rules = sharding.DEFAULT_RULES
  B, L = vargs.batch, vargs.seq_len
  with jax.set_mesh(mesh):
    abstract, shard = state_lib.state_shardings(cfg, optimizer, mesh, rules)
    batch_shard = sharding.batch_sharding(mesh, rules)
    state = state_lib.init_state(cfg, optimizer, shard, seed=0)
    _, batch, abstract_batch = throughput.device_batch(cfg, B, L, batch_shard)
    compiled, compile_s = throughput.compile_train_step(
        cfg, optimizer, schedule, shard, batch_shard, abstract, abstract_batch)
    carry = {"state": state}

    def step():
      carry["state"], metrics = compiled(carry["state"], batch)
      return metrics

    step_s, matmul_s, _ = throughput._interleaved(  # pylint: disable=protected-access
        step, reference, args.steps, args.warmup)
    loss = float(step()["train_loss"])
    ops, busy, by_part = (profile(step, args.profile, len(args.seen), compiled.as_text())
                          if args.profile else (None, None, None))
    args.seen.append(fields)
    del carry["state"]
  fpt = flops_lib.flops_per_token(cfg, L)
  tokens_per_sec = B * L / statistics.median(step_s)
  peak = throughput.spec_peak_flops(device.device_kind)
  matmul_rate = reference.flops / statistics.median(matmul_s)
  return {
      "variant": fields,
      # The knobs as this platform resolves them ("auto" and 0 made concrete).
      "model": {"attention": attention_lib.choose(cfg.attention, cfg.dtype, cfg.head_dim, L),
                "remat": speed.remat_policy(cfg.remat),
                "scan_unroll": speed.layers_per_iteration(cfg),
                "loss_chunk": loss_lib.model_chunk(cfg, B, L),
                "logits": speed.stored_logits_dtype(cfg),
                "dtype": cfg.dtype, "param_dtype": cfg.param_dtype,
                "projections": fields.get("projections", "flat"),
                "kernel_forward": fields.get("kernel_forward", "kept")},
      "batch": B, "seq_len": L,
      "compile_seconds": compile_s,
      "step_seconds": step_s,
      "matmul_seconds": matmul_s,
      "tokens_per_sec": tokens_per_sec,
      "tokens_per_sec_best": B * L / min(step_s),
      "flops_per_token": fpt,
      "mfu": tokens_per_sec * fpt / matmul_rate,
      "mfu_spec": tokens_per_sec * fpt / peak if peak else None,
      "final_train_loss": loss,
      "xla_memory": common.xla_memory(compiled),
      "profile_top": ops,
      "profile_busy": busy,
      "profile_parts_ms_per_step": by_part,
  }


ANY_LINE = "any of the lines above"


def profile(step, directory: str, index: int, hlo_text: str, steps: int = 3, top: int = 40
            ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
  """Traces `steps` steps with jax.profiler into DIRECTORY/INDEX and sums each event name's time
  over the device planes' lines (the host's when there is no device plane; whole-module and
  step lines left out): the `top` names by time, in ms per step, with their line (on a GPU:
  the HLO ops' line and each stream's kernels). Then the busy time, the union of events in ms
  per step, of each line that runs the program (on a CPU, each thread's instructions of the
  step and executor work, parts.cpu_work), and last of all of them together: the step less that
  is the most time nothing ran. A line's own figure undercounts on a CPU: a product that
  YNNPACK splits over both threads is traced on one.
  Last, the step's wall time by part of the model (benchmarks/parts.py). The .xplane.pb stays
  for tools like xprof."""
  out = os.path.join(directory, str(index))
  jax.block_until_ready(step())
  planes = parts.trace_planes(lambda: jax.block_until_ready(step()), out, steps)
  table = parts.instructions(hlo_text)
  by_part = parts.jax_parts(planes, table, steps)
  device = [pl for pl in planes if pl.name.startswith("/device:")]
  host = not device
  totals: collections.Counter = collections.Counter()
  busy, every = [], []
  for plane in device or [pl for pl in planes if pl.name.startswith("/host:CPU")]:
    for line in plane.lines:
      if "Modules" in line.name or "Steps" in line.name:
        continue
      for event in line.events:
        totals[(line.name, event.name)] += event.duration_ns
      spans = (parts.cpu_work(line.events, table) if host else
               sorted((e.start_ns, e.start_ns + e.duration_ns) for e in line.events))
      if spans:   # on a CPU, only the threads that ran the step (python's only waits for it)
        busy.append({"line": line.name, "busy_ms_per_step": _union_ns(spans) / 1e6 / steps})
        every += spans
  if every:
    busy.append({"line": ANY_LINE, "busy_ms_per_step": _union_ns(sorted(every)) / 1e6 / steps})
  ops = [{"line": line, "name": name, "ms_per_step": ns / 1e6 / steps}
         for (line, name), ns in totals.most_common(top)]
  return ops, busy, by_part


def _union_ns(spans: list[tuple[int, int]]) -> int:
  """Total length of the union of sorted (start, end) spans (nested events count once)."""
  total, (start, end) = 0, spans[0]
  for s, e in spans[1:]:
    if s > end:
      total, start, end = total + end - start, s, e
    else:
      end = max(end, e)
  return total + end - start


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  """Every variant in turn; ratios against the first."""
  device = jax.devices()[0]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
  reference = throughput.MatmulReference(args.matmul_size, device, args.dtype)
  started = time.perf_counter()
  rows = []
  for fields in args.variant_list:
    with parts.fresh_metadata() if args.profile else contextlib.nullcontext():
      row = bench_variant(args, fields, mesh, reference)
    row["over_first"] = row["tokens_per_sec"] / (rows[0] if rows else row)["tokens_per_sec"]
    rows.append(row)
    print(_line(row), flush=True)
    for op in row["profile_top"] or []:
      print(f"    {op['ms_per_step']:9.3f} ms  {op['line'][:28]:<28} {op['name'][:90]}")
    step_ms = 1e3 * statistics.median(row["step_seconds"])
    for line in row["profile_busy"] or []:
      print(f"    busy {line['busy_ms_per_step']:9.1f} ms of a {step_ms:.1f} ms step  "
            f"{line['line'][:60]}")
    if row["profile_parts_ms_per_step"]:
      print("\n".join(parts.table(row["profile_parts_ms_per_step"], None, step_ms)))
  return {
      "benchmark": "growlm train-step knobs",
      "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "settings": {k: getattr(args, k) for k in ("preset", "size", "style", "batch", "seq_len",
                                                  "dtype", "vocab_size", "steps", "warmup",
                                                  "variants")},
      "machine": {"platform": device.platform, "device_kind": device.device_kind,
                  "jax": jax.__version__},
      "rows": rows,
      "wall_seconds": time.perf_counter() - started,
  }


def _line(r: dict[str, Any]) -> str:
  name = ",".join(f"{k}={v}" for k, v in r["variant"].items()) or "default"
  m = r["model"]
  mem = r["xla_memory"].get("estimate_bytes")
  spec = f"{r['mfu_spec']:.1%}" if r["mfu_spec"] is not None else "-"
  return (f"{name:<34} {m['attention']:>7} {m['remat']:>13} {m['scan_unroll']:>2} "
          f"{m['loss_chunk']:>5} {r['batch']:>3}x{r['seq_len']:<5} {r['compile_seconds']:>6.1f} "
          f"{r['tokens_per_sec']:>10.0f} {r['over_first']:>6.3f} {r['mfu']:>6.1%} {spec:>6} "
          + (f"{mem / 2**30:>7.2f}" if mem is not None else f"{'-':>7}"))


def _fmt_table(result: dict[str, Any]) -> str:
  m = result["machine"]
  head = (f"{'variant':<34} {'attn':>7} {'remat':>13} {'un':>2} {'chunk':>5} {'B x L':>9} "
          f"{'comp s':>6} {'tokens/s':>10} {'ratio':>6} {'MFU':>6} {'spec':>6} {'XLA GiB':>7}")
  return "\n".join([f"device: {m['device_kind']} ({m['platform']}), jax {m['jax']}", head]
                   + [_line(r) for r in result["rows"]]
                   + [f"wall time {result['wall_seconds']:.0f} s"])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.cli(__file__, argv, parse_args, run, _fmt_table)


if __name__ == "__main__":
  main()
