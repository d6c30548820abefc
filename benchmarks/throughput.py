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

  4. MFU against the device's spec peak (bf16 dense, PEAK_TFLOPS) where the device is known;
  5. for gpt2 rows, the PyTorch reference trainer (benchmarks/torch_reference.py: the same
     model, weights, batch and optimizer), one of its steps timed right after each growlm step,
     and the ratio growlm / reference; then torch's own matmul of the same size, so that the
     ratio splits into kernels (torch's matmul rate / jax's) and what each step makes of its
     library's matmul (each trainer's MFU against its own);
  6. peak device memory (allocator statistics on GPU/TPU, XLA's buffer estimate on CPU).

Everything runs on one device (the first one), whatever device count the process was given.

Usage:
  .venv/bin/python benchmarks/throughput.py                  # preset cpu on CPU, else gpt2-124m
  .venv/bin/python benchmarks/throughput.py --preset gpt2-124m --attention xla --remat full
  .venv/bin/python benchmarks/throughput.py --quick --out /tmp/t.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# jax must not take most of a GPU's memory up front: the PyTorch reference shares the device,
# and the allocator's peak is then what the step itself needed.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/; this checkout's growlm
from growlm.config import defaults as config_lib
from growlm.config.typed import resolve
from growlm.model import flops as flops_lib
from growlm.model import decoder as model_lib
from growlm import optim
from growlm import sharding
from growlm.train import trainer as train_lib
from growlm.train import evaluate as eval_lib
from growlm.train import stages as run_stages
from growlm.train import state as state_lib
from growlm.model.config import (ATTENTIONS, DTYPES, LOGITS_DTYPES, REMATS, check_dtype_runs_on,
                                 make_model_config)

import parts  # pylint: disable=wrong-import-position  # benchmarks/parts.py
import torch_reference  # pylint: disable=wrong-import-position  # benchmarks/, imports sans torch

DEFAULT_OUT = os.path.join("runs", "bench", "throughput.json")

# Presets: `cpu` is the default on a CPU, `gpt2-124m` (GPT-2 small's shape, bf16) elsewhere.
PRESETS = {
    "cpu": dict(size="small", styles="gpt2,llama", batch=16, seq_len=256, dtype="float32",
                vocab_size=0, matmul_size=2048),
    "gpt2-124m": dict(size="base", styles="gpt2", batch=16, seq_len=1024, dtype="bfloat16",
                      vocab_size=50304, matmul_size=8192),
}
# --quick: sizes small enough that the test compiles and runs both styles in seconds.
QUICK = dict(size="nano", batch=2, seq_len=32, steps=2, warmup=1, matmul_size=256)

# Spec peak dense bf16 TFLOP/s per chip, by a lower-case substring of jax's device_kind (first
# match wins). Vendor data sheets: H100 SXM 989, H100 PCIe 756, H200 989, A100 312; Cloud TPU
# v4 275, v5e 197, v5p 459, v6e (Trillium) 918.
PEAK_TFLOPS = (("h100 pcie", 756.0), ("h100", 989.0), ("h200", 989.0), ("a100", 312.0),
               ("tpu v4", 275.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0),
               ("tpu v5p", 459.0), ("tpu v5", 459.0), ("tpu v6 lite", 918.0),
               ("tpu v6e", 918.0), ("tpu v6", 918.0))


def spec_peak_flops(device_kind: str) -> float | None:
  """The device's spec peak dense bf16 FLOP/s, or None where unknown (CPUs included)."""
  kind = device_kind.lower()
  for key, tflops in PEAK_TFLOPS:
    if key in kind:
      return tflops * 1e12
  return None


def default_preset() -> str:
  """The preset where --preset is not given: `cpu` on a CPU, `gpt2-124m` on an accelerator."""
  return "cpu" if jax.default_backend() == "cpu" else "gpt2-124m"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                 help="cpu (d_model 256, 4 layers, f32) or gpt2-124m (GPT-2 small, bf16); "
                 "default: cpu on a CPU, gpt2-124m on an accelerator")
  p.add_argument("--size", default=None, help="growlm named model size (preset's)")
  p.add_argument("--styles", default=None, help="comma-separated model styles (preset's)")
  p.add_argument("--batch", type=int, default=None, help="sequences per step (preset's)")
  p.add_argument("--seq_len", type=int, default=None,
                 help="tokens per sequence, also max_len (preset's)")
  p.add_argument("--dtype", choices=DTYPES, default=None, help="compute dtype (preset's)")
  p.add_argument("--attention", choices=ATTENTIONS, default="auto", help="model.attention")
  p.add_argument("--remat", choices=REMATS, default="auto", help="model.remat")
  p.add_argument("--scan_unroll", type=int, default=0, help="model.scan_unroll (0: auto)")
  p.add_argument("--loss_chunk", type=int, default=0, help="model.loss_chunk (0: auto)")
  p.add_argument("--logits_dtype", choices=LOGITS_DTYPES, default="auto",
                 help="model.logits_dtype (auto: the compute dtype on a GPU, else float32)")
  p.add_argument("--steps", type=int, default=10, help="timed steps (train and eval each)")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  p.add_argument("--matmul_size", type=int, default=None,
                 help="N of the N^3 reference matmul (preset's)")
  p.add_argument("--torch", choices=("auto", "off"), default="auto",
                 help="the PyTorch reference for gpt2 rows (auto: when torch is installed)")
  p.add_argument("--torch_compile", choices=("auto", "on", "off"), default="auto",
                 help="torch.compile the reference (auto: on CUDA only; on this CPU it took "
                 "58 s and gained nothing, benchmarks/README.md)")
  p.add_argument("--profile", default="", help="a directory: after the timed steps, trace 3 "
                 "train steps of growlm there (and 3 of the reference) and report each one's "
                 "time by part of the model (benchmarks/parts.py)")
  common.add_output_flags(p, DEFAULT_OUT, QUICK)
  args = p.parse_args(argv)
  args.preset = args.preset or default_preset()
  for k, v in PRESETS[args.preset].items():
    if getattr(args, k, None) is None:
      setattr(args, k, v)
  common.apply_quick(args, QUICK, p, argv)
  if args.scan_unroll < 0 or args.loss_chunk < 0:
    p.error(f"--scan_unroll and --loss_chunk must be >= 0 (0: auto), got {args.scan_unroll}, "
            f"{args.loss_chunk}")
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
  """The reference rate: [n, n] @ [n, n] in the compute dtype under jit on one device, one
  timing per call."""

  def __init__(self, n: int, device, dtype: str = "float32"):
    ka, kb = jax.random.split(jax.random.key(0))
    self.n = n
    self.dtype = dtype
    self.flops = 2.0 * n ** 3
    self._a = jax.device_put(jax.random.normal(ka, (n, n), dtype), device)
    self._b = jax.device_put(jax.random.normal(kb, (n, n), dtype), device)
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


def _interleaved(step: Callable[[], Any], reference: MatmulReference, n: int, warmup: int,
                 other: Callable[[], tuple[Any, float]] | None = None
                 ) -> tuple[list[float], list[float], list[float]]:
  """Times n calls of `step` (each waited for), one reference matmul timed before each and,
  when given, one call of `other` (the PyTorch reference step, which times itself) after each.

  Returns (step seconds, matmul seconds, other's seconds). Interleaving makes the medians
  sample the same stretch of machine load, which on a shared CPU moves by 2x within a minute.
  The `warmup` untimed rounds first matter for the matmul too: the first one after a compile
  runs cold.
  """
  for _ in range(warmup):
    reference.time_one()
    jax.block_until_ready(step())
    if other is not None:
      other()
  step_s, matmul_s, other_s = [], [], []
  for _ in range(n):
    matmul_s.append(reference.time_one())
    t0 = time.perf_counter()
    jax.block_until_ready(step())
    step_s.append(time.perf_counter() - t0)
    if other is not None:
      other_s.append(other()[1])
  return step_s, matmul_s, other_s


def _part(tokens: int, flops_per_token: float, compile_s: float, step_s: list[float],
          matmul_s: list[float], reference: MatmulReference, compiled,
          peak: float | None) -> dict[str, Any]:
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
      "spec_peak_flops_per_sec": peak,
      "mfu_spec": achieved / peak if peak else None,
      "xla_memory": common.xla_memory(compiled),
  }


def model_config(style: str, args: argparse.Namespace):
  """The benchmarked model: the named size in `style` with the run's dtype and speed knobs."""
  extra = {"vocab_size": args.vocab_size} if args.vocab_size else {}
  return make_model_config(args.size, style, max_len=args.seq_len, dtype=args.dtype,
                           attention=args.attention, remat=args.remat,
                           scan_unroll=args.scan_unroll, loss_chunk=args.loss_chunk,
                           logits_dtype=args.logits_dtype, **extra)


def _torch_step(cfg, ids: np.ndarray, params, args: argparse.Namespace, device):
  """(step, info) of the PyTorch reference on the same tokens and initial weights, or
  (None, why not)."""
  if args.torch == "off":
    return None, "off (--torch off)"
  if cfg.norm != "layernorm" or cfg.positions != "learned" or not cfg.tie_embeddings:
    return None, f"not run: the reference implements the gpt2 style only, not {cfg.norm}"
  why = torch_reference.available()
  if why:
    return None, f"skipped: torch is not importable ({why})"
  if device.platform not in ("cpu", "gpu"):
    return None, f"skipped: no PyTorch device for platform {device.platform}"
  tdev = "cuda" if device.platform == "gpu" else "cpu"
  compile_ = args.torch_compile == "on" or (args.torch_compile == "auto" and tdev == "cuda")
  try:
    step, info = torch_reference.prepare(cfg, ids, dtype=args.dtype, device=tdev,
                                         compile=compile_, params=params)
  except ValueError as e:
    return None, f"skipped: {e}"
  info = dict(info, device=tdev, requested_compile=compile_)
  info["first_loss"] = float(info["first_loss"])
  return step, info


def _torch_part(tokens: int, info: dict, times: list[float], losses: list[float]
                ) -> dict[str, Any]:
  torch = torch_reference.torch
  peak = int(torch.cuda.max_memory_allocated()) if info["device"] == "cuda" else None
  return dict(info, step_seconds=times, median_step_seconds=statistics.median(times),
              tokens_per_sec=tokens / statistics.median(times),
              tokens_per_sec_best=tokens / min(times), peak_memory_bytes=peak,
              final_loss=losses[-1] if losses else None)


def _torch_matmul(seconds: list[float], flops: float, flops_per_token: float,
                  tokens_per_sec: float) -> dict[str, Any]:
  """torch's matmul rate (median of its timings) and the reference step's MFU against it."""
  rate = flops / statistics.median(seconds)
  return {"matmul_seconds": seconds, "matmul_flops_per_sec": rate,
          "mfu": tokens_per_sec * flops_per_token / rate}


def trainer_optimizer(size: str, style: str):
  """(optimizer, schedule): the trainer's own AdamW (clipping, decay mask) with the default
  hyperparameters of `size`/`style`, so the step benchmarked is the step the trainer runs."""
  tcfg = resolve(config_lib.base_config(size, style)).train
  schedule = optim.make_schedule(tcfg.lr, tcfg.warmup_steps, tcfg.num_steps, tcfg.schedule,
                                 tcfg.final_lr_ratio)
  return optim.make_optimizer(tcfg, schedule), schedule


def device_batch(cfg, batch: int, seq_len: int, batch_shard):
  """(ids, batch, abstract batch): random tokens made once and kept on the device (data
  loading is not part of what is timed)."""
  ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(batch, seq_len + 1),
                                          dtype=np.int32)
  arrays = {"inputs": jax.device_put(ids[:, :-1], batch_shard),
            "targets": jax.device_put(ids[:, 1:], batch_shard)}
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          arrays)
  return ids, arrays, abstract


def compile_train_step(cfg, optimizer, schedule, shard, batch_shard, abstract, abstract_batch):
  """(compiled step, seconds): the train step as the trainer jits it (state donated); the
  time is lower + compile."""
  step_jit = run_stages.jit_step(train_lib.make_train_step(cfg, optimizer, schedule), shard,
                                batch_shard)
  t0 = time.perf_counter()
  compiled = step_jit.lower(abstract, abstract_batch).compile()
  return compiled, time.perf_counter() - t0


def bench_style(style: str, args: argparse.Namespace, mesh, reference: MatmulReference
                ) -> dict[str, Any]:
  """One row: train and eval throughput and MFU for `style` at the requested size, and the
  PyTorch reference's train throughput beside it where it runs."""
  cfg = model_config(style, args)
  device = mesh.devices.flat[0]
  peak = spec_peak_flops(device.device_kind)
  optimizer, schedule = trainer_optimizer(args.size, style)
  rules = sharding.DEFAULT_RULES
  B, L = args.batch, args.seq_len
  tokens = B * L
  fpt_train = flops_lib.flops_per_token(cfg, L)
  fpt_eval = flops_lib.forward_flops_per_token(cfg, L)

  with jax.set_mesh(mesh):
    abstract, shard = state_lib.state_shardings(cfg, optimizer, mesh, rules)
    batch_shard = sharding.batch_sharding(mesh, rules)
    state = state_lib.init_state(cfg, optimizer, shard, seed=0)
    ids, batch, abstract_batch = device_batch(cfg, B, L, batch_shard)
    # The reference starts from the same weights (copied before the donated steps run).
    t_step, t_info = _torch_step(cfg, ids, jax.device_get(state.params), args, device)
    if t_step is None:
      print(f"{style}: PyTorch reference {t_info}")
    t_losses: list[float] = []
    t_matmul_s: list[float] = []
    t_matmul = (torch_reference.matmul_timer(args.matmul_size, args.dtype, t_info["device"])
                if t_step else None)

    def other():
      loss, secs = t_step()
      t_losses.append(float(loss))
      t_matmul_s.append(t_matmul())   # torch's own matmul after each of its steps (warmup too)
      return loss, secs

    train_compiled, train_compile_s = compile_train_step(
        cfg, optimizer, schedule, shard, batch_shard, abstract, abstract_batch)

    # The state is donated, so each step must consume the state the previous one returned.
    carry = {"state": state, "metrics": None, "first_loss": None}

    def train_step():
      carry["state"], carry["metrics"] = train_compiled(carry["state"], batch)
      if carry["first_loss"] is None:  # the loss at the initial weights, as the reference's
        carry["first_loss"] = float(carry["metrics"]["train_loss"])
      return carry["state"], carry["metrics"]

    train_times, train_mm, torch_times = _interleaved(
        train_step, reference, args.steps, args.warmup, other if t_step else None)
    final_loss = float(carry["metrics"]["train_loss"])
    train_memory = common.device_memory(device)
    if args.profile:   # after the timings and the memory figure: tracing is not timed
      by_part = {"growlm": parts.trace_jax(lambda: jax.block_until_ready(train_step()),
                                           train_compiled.as_text(),
                                           os.path.join(args.profile, style)),
                 "reference": (parts.trace_torch(t_step, t_info["device"] == "cuda")
                               if t_step else None)}
    state = carry["state"]

    # Eval step: forward and summed loss, the trainer's Evaluator step.
    eval_jit = jax.jit(eval_lib.make_eval_step(cfg), in_shardings=(shard.params, batch_shard))
    t0 = time.perf_counter()
    eval_compiled = eval_jit.lower(abstract.params, abstract_batch).compile()
    eval_compile_s = time.perf_counter() - t0
    eval_times, eval_mm, _ = _interleaved(lambda: eval_compiled(state.params, batch), reference,
                                          args.steps, args.warmup)

  # Where the arrays actually lived (read back, not assumed): the benchmark is one-device.
  used = sorted({d.id for x in jax.tree.leaves((state, batch)) for d in x.sharding.device_set})
  row = {
      "style": style,
      "size": args.size,
      "model": cfg.to_dict(),
      "params": model_lib.count_params(state.params),
      "matmul_params": flops_lib.matmul_params(cfg),
      "batch": B,
      "seq_len": L,
      "tokens_per_step": tokens,
      "device_ids": used,
      "first_train_loss": carry["first_loss"],
      "final_train_loss": final_loss,
      "train": _part(tokens, fpt_train, train_compile_s, train_times, train_mm, reference,
                     train_compiled, peak),
      "eval": _part(tokens, fpt_eval, eval_compile_s, eval_times, eval_mm, reference,
                    eval_compiled, peak),
      # Allocator statistics after the train steps (before eval): cumulative in the process.
      "device_memory_after_train": train_memory,
  }
  if args.profile:
    row["parts_ms_per_step"] = by_part
  if t_step is None:
    row["torch"] = {"skipped": t_info}
  else:
    row["torch"] = _torch_part(tokens, t_info, torch_times, t_losses)
    row["torch"].update(_torch_matmul(t_matmul_s[-len(torch_times):], reference.flops, fpt_train,
                                      row["torch"]["tokens_per_sec"]))
    row["growlm_over_torch"] = row["train"]["tokens_per_sec"] / row["torch"]["tokens_per_sec"]
    # growlm / reference = (growlm's MFU / the reference's, each against its own library's
    # matmul) x (jax's matmul rate / torch's): step efficiency times kernels.
    row["torch_matmul_over_jax"] = (row["torch"]["matmul_flops_per_sec"]
                                    / row["train"]["matmul_flops_per_sec"])
    row["growlm_over_torch_best"] = (row["train"]["tokens_per_sec_best"]
                                     / row["torch"]["tokens_per_sec_best"])
  return row



def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  """Runs the whole benchmark and returns the result dict (also what is written as JSON)."""
  device = jax.devices()[0]
  check_dtype_runs_on(args.dtype, device.platform, "--dtype")
  # One-device mesh over the first device: a process with several (fake) devices still
  # measures one device, and the train step is jitted exactly as the trainer does it.
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=[device])
  started = time.perf_counter()

  reference = MatmulReference(args.matmul_size, device, args.dtype)
  with parts.fresh_metadata() if args.profile else contextlib.nullcontext():
    rows = [bench_style(style, args, mesh, reference) for style in args.styles]
  # The run's matmul rate: median over every timed matmul (each row's MFU uses its own).
  all_times = [t for r in rows for p in ("train", "eval") for t in r[p]["matmul_seconds"]]
  ref_flops_per_sec = reference.flops / statistics.median(all_times)

  return {
      "benchmark": "growlm throughput",
      "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": bool(args.quick),
      "settings": {k: getattr(args, k) for k in (
          "preset", "size", "styles", "batch", "seq_len", "dtype", "attention", "remat",
          "scan_unroll", "loss_chunk", "logits_dtype", "vocab_size", "steps", "warmup", "matmul_size", "torch",
          "torch_compile", "profile")},
      "machine": {
          "platform": device.platform,
          "device_kind": device.device_kind,
          "devices_visible": jax.device_count(),
          "devices_used": len({i for r in rows for i in r["device_ids"]}),
          "cpus": common.cpus(),
          "processor": platform.processor() or platform.machine(),
          "python": platform.python_version(),
          "jax": jax.__version__,
          "spec_peak_bf16_flops_per_sec": spec_peak_flops(device.device_kind),
      },
      "flops_convention": ("PaLM (Chowdhery et al. 2022, app. B): train FLOPs/token = 6*N + "
                           "12*n_layers*n_heads*head_dim*seq_len, N = matmul parameters "
                           "(output projection in, embedding lookup out); eval = train / 3"),
      "mfu_definition": ("per row and part: achieved model FLOP/s (median step) / "
                         "matmul_flops_per_sec of the reference matmuls timed interleaved with "
                         "those steps (median), both measured in this run"),
      "matmul": {"n": args.matmul_size, "dtype": args.dtype, "precision": "default",
                 "jax_default_matmul_precision": jax.config.jax_default_matmul_precision,
                 "flops_per_matmul": reference.flops, "reps": len(all_times),
                 "gflops": ref_flops_per_sec / 1e9,
                 "gflops_min": reference.flops / max(all_times) / 1e9,
                 "gflops_max": reference.flops / min(all_times) / 1e9},
      "matmul_gflops": ref_flops_per_sec / 1e9,
      "matmul_flops_per_sec": ref_flops_per_sec,
      "rows": rows,
      "device_memory": common.device_memory(device),
      "process_max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      "wall_seconds": time.perf_counter() - started,
  }


def _fmt_table(result: dict[str, Any]) -> str:
  """A plain-text summary (the README's table is in the same units)."""
  mm = result["matmul"]
  m = result["machine"]
  lines = [f"device: {m['device_kind']} ({m['platform']}), jax {m['jax']}; preset "
           f"{result['settings']['preset']}",
           f"reference: jax {mm['dtype']} matmul {mm['n']}^3, {mm['reps']} reps interleaved with "
           f"the steps: median {mm['gflops']:.1f} GFLOP/s (range {mm['gflops_min']:.0f}-"
           f"{mm['gflops_max']:.0f})",
           f"{'style':<6} {'part':<5} {'B x L':>9} {'MFLOP/tok':>9} {'compile s':>9} "
           f"{'tokens/s':>9} {'GFLOP/s':>8} {'matmul GFLOP/s':>14} {'MFU':>6} {'MFU best':>8} "
           f"{'MFU spec':>8}"]
  for r in result["rows"]:
    for part in ("train", "eval"):
      p = r[part]
      spec = f"{p['mfu_spec']:>8.1%}" if p["mfu_spec"] is not None else f"{'-':>8}"
      lines.append(
          f"{r['style']:<6} {part:<5} {r['batch']:>4}x{r['seq_len']:<4} "
          f"{p['flops_per_token'] / 1e6:>9.2f} {p['compile_seconds']:>9.1f} "
          f"{p['tokens_per_sec']:>9.0f} {p['achieved_gflops']:>8.1f} "
          f"{p['matmul_gflops']:>14.1f} {p['mfu']:>6.1%} {p['mfu_best']:>8.1%} {spec}")
  for r in result["rows"]:
    t = r["torch"]
    if "skipped" in t:
      lines.append(f"{r['style']}: PyTorch reference {t['skipped']}")
      continue
    how = "compiled" if t["compiled"] else "eager"
    lines.append(f"{r['style']}: PyTorch reference ({t['device']}, {how}) {t['tokens_per_sec']:.0f} "
                 f"tokens/s; growlm / reference {r['growlm_over_torch']:.2f}x (median steps), "
                 f"{r['growlm_over_torch_best']:.2f}x (fastest steps)")
    lines.append(f"  matmul {mm['n']}^3: torch {t['matmul_flops_per_sec'] / 1e9:.1f} "
                 f"GFLOP/s, {r['torch_matmul_over_jax']:.2f}x jax's; MFU against its own "
                 f"library's matmul: growlm {r['train']['mfu']:.1%}, reference {t['mfu']:.1%}")
    if t["peak_memory_bytes"]:
      lines.append(f"  reference peak memory {t['peak_memory_bytes'] / 2**30:.2f} GiB")
  for r in result["rows"]:
    if "parts_ms_per_step" in r:
      by = r["parts_ms_per_step"]
      lines.append(f"{r['style']}: where a train step's time goes (wall ms per step, profiled)")
      ref_ms = (1e3 * r["torch"]["median_step_seconds"] if "median_step_seconds" in r["torch"]
                else None)
      lines += parts.table(by["growlm"], by["reference"],
                           1e3 * r["train"]["median_step_seconds"], ref_ms)
  dev = result["device_memory"]
  lines.append("peak memory: device " + (dev if isinstance(dev, str) else json.dumps(dev)))
  for r in result["rows"]:
    dm = r["device_memory_after_train"]
    if isinstance(dm, dict) and "peak_bytes_in_use" in dm:
      lines.append(f"  {r['style']}: jax allocator peak after the train steps "
                   f"{dm['peak_bytes_in_use'] / 2**30:.2f} GiB")
    est = {p: r[p]["xla_memory"].get("estimate_bytes") for p in ("train", "eval")}
    if all(v is not None for v in est.values()):
      lines.append(f"  {r['style']}: XLA buffer estimate train {est['train'] / 2**20:.0f} MiB, "
                   f"eval {est['eval'] / 2**20:.0f} MiB")
  lines.append(f"  process max RSS {result['process_max_rss_bytes'] / 2**20:.0f} MiB")
  lines.append(f"wall time {result['wall_seconds']:.0f} s")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; `argv` (without the program name) defaults to sys.argv[1:]."""
  return common.cli(__file__, argv, parse_args, run, _fmt_table)


if __name__ == "__main__":
  main()
