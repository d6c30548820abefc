"""Training and eval throughput of growlm on this machine, with MFU against a measured matmul rate.

What one run measures (see benchmarks/README.md):
  1. the reference: jax float32 matmul rate (an N^3 `jnp.dot` under jit), measured in this run:
     one matmul is timed just before every timed model step, so the reference samples the same
     machine load as the steps it is compared with (a shared machine's load drifts);
  2. per model style: tokens/sec of the jitted train step (forward + backward + AdamW, the
     trainer's own `make_train_step` and optimizer) and of the jitted eval step (forward + loss),
     compile times apart, median over timed steps with `jax.block_until_ready`;
  3. model FLOPs per token (growlm.flops, the PaLM convention), achieved model FLOP/s and
     MFU = achieved model FLOP/s / matmul FLOP/s (median of the matmuls interleaved with those
     steps): a ratio to what this machine's jax does on a large dense matmul, not a claim about
     the hardware's peak.

Everything runs on one device (the first one), whatever device count the process was given.

Usage:
  .venv/bin/python benchmarks/throughput.py                 # the default (d_model 256, 4 layers)
  .venv/bin/python benchmarks/throughput.py --quick --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from growlm.config import defaults as config_lib
from growlm.config.typed import resolve
from growlm.model import flops as flops_lib
from growlm.model import decoder as model_lib
from growlm import optim
from growlm import sharding
from growlm.train import trainer as train_lib
from growlm.train import evaluate as eval_lib
from growlm.train import state as state_lib
from growlm.model.config import make_model_config

DEFAULT_OUT = os.path.join("runs", "bench", "throughput.json")

# --quick: sizes small enough that the test compiles and runs both styles in seconds.
QUICK = dict(size="nano", batch=2, seq_len=32, steps=2, warmup=1, matmul_size=256)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--size", default="small", help="growlm named model size")
  p.add_argument("--styles", default="gpt2,llama", help="comma-separated model styles")
  p.add_argument("--batch", type=int, default=8, help="sequences per step")
  p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence (also max_len)")
  p.add_argument("--steps", type=int, default=10, help="timed steps (train and eval each)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--matmul_size", type=int, default=2048, help="N of the N^3 reference matmul")
  p.add_argument("--out", default=DEFAULT_OUT, help="where to write the JSON result")
  quick = ", ".join(f"{k}={v}" for k, v in QUICK.items())
  p.add_argument("--quick", action="store_true", help=f"tiny sizes for tests: sets {quick}")
  args = p.parse_args(argv)
  if args.quick:
    for k, v in QUICK.items():
      setattr(args, k, v)
  for name in ("batch", "seq_len", "steps", "matmul_size"):
    if getattr(args, name) <= 0:
      p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
  if args.warmup < 0:
    p.error(f"--warmup must be >= 0, got {args.warmup}")
  args.styles = [s.strip() for s in args.styles.split(",") if s.strip()]
  if not args.styles:
    p.error("--styles names no style")
  return args


class MatmulReference:
  """The reference rate: float32 [n, n] @ [n, n] under jit on one device, one timing per call."""

  def __init__(self, n: int, device):
    ka, kb = jax.random.split(jax.random.key(0))
    self.n = n
    self.flops = 2.0 * n ** 3
    self._a = jax.device_put(jax.random.normal(ka, (n, n), jnp.float32), device)
    self._b = jax.device_put(jax.random.normal(kb, (n, n), jnp.float32), device)
    # Default precision, like the model's einsums: full float32 on CPU; on an accelerator both
    # take the same (possibly tf32/bf16-pass) path, so the ratio stays like for like.
    self._dot = jax.jit(jnp.dot)
    for _ in range(2):  # compile, then a run that touches fresh buffers and wakes the threads
      jax.block_until_ready(self._dot(self._a, self._b))

  def time_one(self) -> float:
    """Wall seconds of one matmul, waited for."""
    t0 = time.perf_counter()
    jax.block_until_ready(self._dot(self._a, self._b))
    return time.perf_counter() - t0


def _interleaved(step: Callable[[], Any], reference: MatmulReference, n: int, warmup: int
                 ) -> tuple[list[float], list[float]]:
  """Times n calls of `step` (each waited for), one reference matmul timed before each.

  Returns (step seconds, matmul seconds). Interleaving makes both medians sample the same
  stretch of machine load, which on a shared CPU moves by 2x within a minute. The `warmup`
  untimed pairs first matter for the matmul too: the first one after a compile runs cold.
  """
  for _ in range(warmup):
    reference.time_one()
    jax.block_until_ready(step())
  step_s, matmul_s = [], []
  for _ in range(n):
    matmul_s.append(reference.time_one())
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    step_s.append(time.perf_counter() - t0)
  return step_s, matmul_s


def _memory(compiled) -> dict[str, Any]:
  """XLA's static buffer sizes for one compiled step (the CPU client keeps no runtime peak).

  `estimate_bytes` = arguments + outputs - aliased (donated) + temporaries. XLA's own
  `peak_memory_in_bytes` is kept as reported, but on CPU it leaves out the temporaries.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # some backends do not implement it
    return {}
  if m is None:
    return {}
  out = {k: int(getattr(m, k)) for k in ("argument_size_in_bytes", "output_size_in_bytes",
                                         "alias_size_in_bytes", "temp_size_in_bytes")
         if hasattr(m, k)}
  if hasattr(m, "peak_memory_in_bytes"):
    out["peak_memory_in_bytes"] = int(m.peak_memory_in_bytes)
  if len(out) >= 4:
    out["estimate_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                             - out["alias_size_in_bytes"] + out["temp_size_in_bytes"])
  return out


def _part(tokens: int, flops_per_token: float, compile_s: float, step_s: list[float],
          matmul_s: list[float], reference: MatmulReference, compiled) -> dict[str, Any]:
  """One part (train or eval) of a row: timings, rates and MFU against its own matmuls.

  Headline figures use medians. The `_best` figures use the fastest step and the fastest
  matmul: under intermittent load from other processes they are the steadier pair.
  """
  matmul_rate = reference.flops / statistics.median(matmul_s)
  tokens_per_sec = tokens / statistics.median(step_s)
  achieved = tokens_per_sec * flops_per_token
  best_matmul_rate = reference.flops / min(matmul_s)
  best_achieved = tokens / min(step_s) * flops_per_token
  return {
      "flops_per_token": flops_per_token,
      "compile_seconds": compile_s,
      "step_seconds": step_s,
      "median_step_seconds": statistics.median(step_s),
      "tokens_per_sec": tokens_per_sec,
      "achieved_flops_per_sec": achieved,
      "achieved_gflops": achieved / 1e9,
      "matmul_seconds": matmul_s,
      "matmul_flops_per_sec": matmul_rate,
      "matmul_gflops": matmul_rate / 1e9,
      "mfu": achieved / matmul_rate,
      "tokens_per_sec_best": tokens / min(step_s),
      "achieved_flops_per_sec_best": best_achieved,
      "matmul_flops_per_sec_best": best_matmul_rate,
      "mfu_best": best_achieved / best_matmul_rate,
      "xla_memory": _memory(compiled),
  }


def bench_style(style: str, args: argparse.Namespace, mesh, reference: MatmulReference
                ) -> dict[str, Any]:
  """One row: train and eval throughput and MFU for `style` at the requested size."""
  cfg = make_model_config(args.size, style, max_len=args.seq_len)
  # The trainer's own optimizer (AdamW, clipping, decay mask) with its default hyperparameters:
  # the step benchmarked is the step `growlm.train.trainer.train` runs.
  tcfg = resolve(config_lib.base_config(args.size, style)).train
  schedule = optim.make_schedule(tcfg.lr, tcfg.warmup_steps, tcfg.num_steps, tcfg.schedule,
                                 tcfg.final_lr_ratio)
  optimizer = optim.make_optimizer(tcfg, schedule)
  rules = sharding.DEFAULT_RULES
  B, L = args.batch, args.seq_len
  tokens = B * L
  fpt_train = flops_lib.flops_per_token(cfg, L)
  fpt_eval = flops_lib.forward_flops_per_token(cfg, L)

  with jax.set_mesh(mesh):
    abstract, shard = state_lib.state_shardings(cfg, optimizer, mesh, rules)
    batch_shard = sharding.batch_sharding(mesh, rules)
    state = state_lib.init_state(cfg, optimizer, shard, seed=0)
    # Random tokens, made once: data loading is not part of what is timed.
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, size=(B, L + 1), dtype=np.int32)
    batch = {"inputs": jax.device_put(ids[:, :-1], batch_shard),
             "targets": jax.device_put(ids[:, 1:], batch_shard)}
    abstract_batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)

    # Train step, as the trainer jits it (state donated). Compile time is lower + compile.
    step_jit = jax.jit(train_lib.make_train_step(cfg, optimizer, schedule),
                       in_shardings=(shard, batch_shard), out_shardings=(shard, None),
                       donate_argnums=0)
    t0 = time.perf_counter()
    train_compiled = step_jit.lower(abstract, abstract_batch).compile()
    train_compile_s = time.perf_counter() - t0

    # The state is donated, so each step must consume the state the previous one returned.
    carry = {"state": state, "metrics": None}

    def train_step():
      carry["state"], carry["metrics"] = train_compiled(carry["state"], batch)
      return carry["state"], carry["metrics"]

    train_times, train_mm = _interleaved(train_step, reference, args.steps, args.warmup)
    state = carry["state"]
    final_loss = float(carry["metrics"]["train_loss"])

    # Eval step: forward and summed loss, the trainer's Evaluator step.
    eval_jit = jax.jit(eval_lib.make_eval_step(cfg), in_shardings=(shard.params, batch_shard))
    t0 = time.perf_counter()
    eval_compiled = eval_jit.lower(abstract.params, abstract_batch).compile()
    eval_compile_s = time.perf_counter() - t0
    eval_times, eval_mm = _interleaved(lambda: eval_compiled(state.params, batch), reference,
                                       args.steps, args.warmup)

  # Where the arrays actually lived (read back, not assumed): the benchmark is one-device.
  used = sorted({d.id for x in jax.tree.leaves((state, batch)) for d in x.sharding.device_set})
  return {
      "style": style,
      "size": args.size,
      "model": cfg.to_dict(),
      "params": model_lib.count_params(state.params),
      "matmul_params": flops_lib.matmul_params(cfg),
      "batch": B,
      "seq_len": L,
      "tokens_per_step": tokens,
      "device_ids": used,
      "final_train_loss": final_loss,
      "train": _part(tokens, fpt_train, train_compile_s, train_times, train_mm, reference,
                     train_compiled),
      "eval": _part(tokens, fpt_eval, eval_compile_s, eval_times, eval_mm, reference,
                    eval_compiled),
  }


def _device_memory(device) -> dict[str, Any] | str:
  """The runtime's allocator statistics where it keeps them (GPU/TPU; not the CPU client)."""
  try:
    stats = device.memory_stats()
  except Exception:  # pylint: disable=broad-except
    stats = None
  if not stats:
    return "unavailable (the jax CPU client keeps no allocator statistics)"
  return {k: int(v) for k, v in stats.items() if k in ("peak_bytes_in_use", "bytes_in_use",
                                                        "bytes_limit")}


def _cpus() -> int:
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 0


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  """Runs the whole benchmark and returns the result dict (also what is written as JSON)."""
  device = jax.devices()[0]
  # One-device mesh over the first device: a process with several (fake) devices still
  # measures one device, and the train step is jitted exactly as the trainer does it.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
  started = time.perf_counter()

  reference = MatmulReference(args.matmul_size, device)
  rows = [bench_style(style, args, mesh, reference) for style in args.styles]
  # The run's matmul rate: median over every timed matmul (each row's MFU uses its own).
  all_times = [t for r in rows for p in ("train", "eval") for t in r[p]["matmul_seconds"]]
  ref_flops_per_sec = reference.flops / statistics.median(all_times)

  return {
      "benchmark": "growlm throughput",
      "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": bool(args.quick),
      "settings": {k: getattr(args, k) for k in ("size", "styles", "batch", "seq_len", "steps",
                                                "warmup", "matmul_size")},
      "machine": {
          "platform": device.platform,
          "device_kind": device.device_kind,
          "devices_visible": jax.device_count(),
          "devices_used": len({i for r in rows for i in r["device_ids"]}),
          "cpus": _cpus(),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(),
          "jax": jax.__version__,
      },
      "flops_convention": ("PaLM (Chowdhery et al. 2022, app. B): train FLOPs/token = 6*N + "
                           "12*n_layers*n_heads*head_dim*seq_len, N = matmul parameters "
                           "(output projection in, embedding lookup out); eval = train / 3"),
      "mfu_definition": ("per row and part: achieved model FLOP/s (median step) / "
                         "matmul_flops_per_sec of the reference matmuls timed interleaved with "
                         "those steps (median), both measured in this run"),
      "matmul": {"n": args.matmul_size, "dtype": "float32", "precision": "default",
                 "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
                 "flops_per_matmul": reference.flops, "reps": len(all_times),
                 "gflops": ref_flops_per_sec / 1e9,
                 "gflops_min": reference.flops / max(all_times) / 1e9,
                 "gflops_max": reference.flops / min(all_times) / 1e9},
      "matmul_gflops": ref_flops_per_sec / 1e9,
      "matmul_flops_per_sec": ref_flops_per_sec,
      "rows": rows,
      "device_memory": _device_memory(device),
      "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "wall_seconds": time.perf_counter() - started,
  }


def _fmt_table(result: dict[str, Any]) -> str:
  """A plain-text summary (the README's table is in the same units)."""
  mm = result["matmul"]
  lines = [f"reference: jax f32 matmul {mm['n']}^3, {mm['reps']} reps interleaved with the steps: "
           f"median {mm['gflops']:.1f} GFLOP/s (range {mm['gflops_min']:.0f}-"
           f"{mm['gflops_max']:.0f})",
           f"{'style':<6} {'part':<5} {'B x L':>9} {'MFLOP/tok':>9} {'compile s':>9} "
           f"{'tokens/s':>9} {'GFLOP/s':>8} {'matmul GFLOP/s':>14} {'MFU':>6} {'MFU best':>8}"]
  for r in result["rows"]:
    for part in ("train", "eval"):
      p = r[part]
      lines.append(
          f"{r['style']:<6} {part:<5} {r['batch']:>4}x{r['seq_len']:<4} "
          f"{p['flops_per_token'] / 1e6:>9.2f} {p['compile_seconds']:>9.1f} "
          f"{p['tokens_per_sec']:>9.0f} {p['achieved_gflops']:>8.1f} "
          f"{p['matmul_gflops']:>14.1f} {p['mfu']:>6.1%} {p['mfu_best']:>8.1%}")
  dev = result["device_memory"]
  lines.append("peak memory: device " + (dev if isinstance(dev, str) else json.dumps(dev)))
  for r in result["rows"]:
    est = {p: r[p]["xla_memory"].get("estimate_bytes") for p in ("train", "eval")}
    if all(v is not None for v in est.values()):
      lines.append(f"  {r['style']}: XLA buffer estimate train {est['train'] / 2**20:.0f} MiB, "
                   f"eval {est['eval'] / 2**20:.0f} MiB")
  lines.append(f"  process max RSS {result['process_max_rss_bytes'] / 2**20:.0f} MiB")
  lines.append(f"wall time {result['wall_seconds']:.0f} s")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; `argv` (without the program name) defaults to sys.argv[1:]."""
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  script = os.path.relpath(os.path.abspath(__file__))
  result = run(args, command=" ".join([os.path.relpath(sys.executable), script] + argv))
  print(_fmt_table(result))
  out_dir = os.path.dirname(args.out)
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, sort_keys=True)
  os.replace(tmp, args.out)
  print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
