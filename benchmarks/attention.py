"""growlm's attention kernels alone, forward and forward + backward, beside PyTorch's SDPA.

At the shapes of a throughput preset (batch, seq_len, heads, head_dim, dtype), each of growlm's
`model.attention` implementations that runs on this device (model/attention.py) is jitted as
the causal attention of one layer, and timed: the forward, then the gradient of
sum(output * cotangent) with respect to q, k and v (forward and backward, as a train step runs
it). PyTorch's `scaled_dot_product_attention(is_causal=True)` on the same device and dtype is
timed the same way where torch is installed. Reported per implementation: median ms per call
and the ratio to SDPA's. throughput.py --profile shows attention's share of a whole step;
this script shows what the kernel alone costs, so a change to it can be measured in seconds.

Usage:
  .venv/bin/python benchmarks/attention.py                 # preset cpu on CPU
  .venv/bin/python benchmarks/attention.py --preset gpt2-124m --impls cudnn,xla
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/common.py
import throughput  # pylint: disable=wrong-import-position  # benchmarks/throughput.py
import torch_reference  # pylint: disable=wrong-import-position

from growlm.errors import GrowlmError  # pylint: disable=wrong-import-position
from growlm.model import attention as attention_lib  # pylint: disable=wrong-import-position
from growlm.model.config import make_model_config  # pylint: disable=wrong-import-position

DEFAULT_OUT = os.path.join("runs", "bench", "attention.json")
QUICK = dict(size="nano", batch=2, seq_len=64, steps=2, warmup=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", choices=sorted(throughput.PRESETS), default=None,
                 help="throughput.py's presets (default: cpu on a CPU, else gpt2-124m)")
  p.add_argument("--style", default="gpt2", help="model style (its heads and kv heads)")
  p.add_argument("--impls", default="",
                 help="comma-separated implementations (default: every one that runs here)")
  p.add_argument("--steps", type=int, default=20, help="timed calls of each")
  p.add_argument("--warmup", type=int, default=3, help="untimed calls after compiling")
  common.add_output_flags(p, DEFAULT_OUT, QUICK)
  args = p.parse_args(argv)
  args.preset = args.preset or throughput.default_preset()
  for k in ("size", "batch", "seq_len", "dtype"):
    setattr(args, k, throughput.PRESETS[args.preset][k])
  common.apply_quick(args, QUICK, p, argv)
  if args.steps <= 0 or args.warmup < 0:
    p.error(f"--steps must be >= 1 and --warmup >= 0, got {args.steps}, {args.warmup}")
  return args


def _median_ms(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def runnable(impls: Sequence[str], dtype: str, head_dim: int, seq_len: int) -> list[str]:
  """The implementations of `impls` that run on this platform at these shapes ("auto" left
  out: it is one of the others, named in the result)."""
  out = []
  for impl in impls:
    try:
      attention_lib.choose(impl, dtype, head_dim, seq_len)
    except GrowlmError:
      continue
    out.append(impl)
  return out


def bench_jax(impl: str, q, k, v, g, steps: int, warmup: int) -> dict[str, float]:
  """Median ms of the forward and of forward + backward (gradients of q, k, v)."""
  fwd = jax.jit(lambda q, k, v: attention_lib.attend(q, k, v, impl))
  grad = jax.jit(jax.grad(
      lambda q, k, v: jnp.sum(attention_lib.attend(q, k, v, impl).astype(jnp.float32) * g),
      argnums=(0, 1, 2)))
  jax.block_until_ready((fwd(q, k, v), grad(q, k, v)))   # compile both
  return {"forward_ms": _median_ms(lambda: jax.block_until_ready(fwd(q, k, v)), steps, warmup),
          "forward_backward_ms": _median_ms(lambda: jax.block_until_ready(grad(q, k, v)),
                                            steps, warmup)}


def bench_torch(arrays: Sequence[np.ndarray], dtype: str, device: str, steps: int,
                warmup: int) -> dict[str, Any]:
  """SDPA's median ms on the same inputs, heads-major as torch takes them; or why not run."""
  why = torch_reference.available()
  if why:
    return {"skipped": f"torch is not importable ({why})"}
  torch = torch_reference.torch
  F = torch.nn.functional
  tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  q, k, v, g = (torch.tensor(np.asarray(a, np.float32)).to(device=device, dtype=tdt)
                .transpose(1, 2).contiguous() for a in arrays)
  H, K = q.shape[1], k.shape[1]
  kw = {"enable_gqa": True} if H != K else {}
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def forward():
    with torch.no_grad():
      F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    sync()

  leaves = [x.detach().requires_grad_() for x in (q, k, v)]

  def forward_backward():
    out = F.scaled_dot_product_attention(*leaves, is_causal=True, **kw)
    torch.autograd.grad((out.float() * g.float()).sum(), leaves)
    sync()

  return {"device": device, "forward_ms": _median_ms(forward, steps, warmup),
          "forward_backward_ms": _median_ms(forward_backward, steps, warmup)}


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  device = jax.devices()[0]
  cfg = make_model_config(args.size, args.style, max_len=args.seq_len, dtype=args.dtype)
  B, L, H, K, E = args.batch, args.seq_len, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  rng = np.random.default_rng(0)
  host = [rng.standard_normal(s).astype(np.float32) for s in
          ((B, L, H, E), (B, L, K, E), (B, L, K, E), (B, L, H, E))]
  q, k, v, g = (jax.device_put(jnp.asarray(a, args.dtype), device) for a in host)
  g = g.astype(jnp.float32)
  names = ([s.strip() for s in args.impls.split(",") if s.strip()] if args.impls else
           [i for i in attention_lib.IMPLEMENTATIONS if i != "auto"])
  bad = [n for n in names if n not in attention_lib.IMPLEMENTATIONS or n == "auto"]
  if bad:
    raise GrowlmError(f"--impls names {bad}; accepted: "
                      f"{[i for i in attention_lib.IMPLEMENTATIONS if i != 'auto']}")
  impls = runnable(names, args.dtype, E, L)
  rows = {impl: bench_jax(impl, q, k, v, g, args.steps, args.warmup) for impl in impls}
  tdev = {"cpu": "cpu", "gpu": "cuda"}.get(device.platform)
  ref = (bench_torch(host, args.dtype, tdev, args.steps, args.warmup) if tdev else
         {"skipped": f"no PyTorch device for platform {device.platform}"})
  for row in rows.values():
    if "skipped" not in ref:
      row["over_sdpa"] = row["forward_backward_ms"] / ref["forward_backward_ms"]
  return {
      "benchmark": "growlm attention kernels",
      "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "shape": {"batch": B, "seq_len": L, "heads": H, "kv_heads": K, "head_dim": E,
                "dtype": args.dtype, "preset": args.preset, "size": args.size},
      "machine": {"platform": device.platform, "device_kind": device.device_kind,
                  "jax": jax.__version__},
      "auto": attention_lib.choose("auto", args.dtype, E, L),
      "skipped": [n for n in names if n not in impls],
      "rows": rows,
      "sdpa": ref,
  }


def _summary(result: dict[str, Any]) -> str:
  s, ref = result["shape"], result["sdpa"]
  lines = [f"attention of one layer: B {s['batch']}, L {s['seq_len']}, heads {s['heads']} "
           f"(kv {s['kv_heads']}) x {s['head_dim']}, {s['dtype']}, on "
           f"{result['machine']['device_kind']}; auto = {result['auto']}",
           f"    {'impl':<8} {'forward ms':>10} {'fwd+bwd ms':>10} {'fwd+bwd / SDPA':>14}"]
  for impl, row in result["rows"].items():
    ratio = f"{row['over_sdpa']:>14.2f}" if "over_sdpa" in row else f"{'-':>14}"
    lines.append(f"    {impl:<8} {row['forward_ms']:>10.2f} {row['forward_backward_ms']:>10.2f}"
                 f" {ratio}")
  if "skipped" in ref:
    lines.append(f"    PyTorch SDPA: {ref['skipped']}")
  else:
    lines.append(f"    {'SDPA':<8} {ref['forward_ms']:>10.2f} {ref['forward_backward_ms']:>10.2f}"
                 f" {1.0:>14.2f}")
  if result["skipped"]:
    lines.append(f"    not run here: {', '.join(result['skipped'])}")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; `argv` (without the program name) defaults to sys.argv[1:]."""
  return common.cli(__file__, argv, parse_args, run, _summary)


if __name__ == "__main__":
  main()
