"""Numerical checks on whatever device jax runs on: what the CPU tests establish, measured on the
accelerator (cuDNN kernels, TF32 matmul passes) where CI cannot go.

  1. growth exactness: tile + identity (d_model 256 -> 512, 4 -> 8 layers, float32, gpt2 and
     llama) through `growlm.grow` and the preservation report (products at HIGHEST), and the
     same logits compared at jax's default precision, which is what the report once used; then
     the same growth of a bfloat16 model (the report's float32 figures and its bfloat16 ones),
     with each report's seconds, compilation included (the order: 2, 3, then 1);
  2. chunked cross-entropy against the plain full-logits one (float32, and the train step's
     bfloat16 inputs with float32 logits and with bf16 ones): loss and gradients, relative;
  3. attention: every implementation that runs here against the naive reference computed from
     the same inputs upcast to float32; outputs and the gradients of a random projection of
     them, as ||out - ref|| / ||ref||; GQA and not.
References (2 and 3) run on the host CPU at the highest precision.

Prints one line per figure and writes them all as JSON. Thresholds are not asserted here (the
CPU tests assert theirs); the figures are recorded in benchmarks/README.md.

Usage:
  python benchmarks/device_checks.py --out runs/bench/device_checks.json
  .venv/bin/python benchmarks/device_checks.py --quick --out /tmp/c.json
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/common.py

from growlm.grow import GrowthPlan, grow, grown_config  # pylint: disable=wrong-import-position
from growlm.grow import report as report_lib  # pylint: disable=wrong-import-position
from growlm.model import attention as attention_lib  # pylint: disable=wrong-import-position
from growlm.model import decoder as model_lib  # pylint: disable=wrong-import-position
from growlm.model.config import make_model_config  # pylint: disable=wrong-import-position
from growlm.train import loss as loss_lib  # pylint: disable=wrong-import-position

DEFAULT_OUT = os.path.join("runs", "bench", "device_checks.json")
FULL = dict(batch=2, seq_len=1024, loss_batch=4, vocab=50304, growth_seq=256,
            src="small", dst="medium")
QUICK = dict(batch=1, seq_len=64, loss_batch=2, vocab=300, growth_seq=32, src="nano",
             dst="tiny")


def _cpu():
  return jax.devices("cpu")[0]


def _on_cpu():
  """References run on the host CPU: an H100 compiling float32 products at HIGHEST precision
  for the attention reference's gradient took over 90 s (2026-11-27, jax 0.11.2)."""
  return jax.default_device(_cpu())


def rel(a, b) -> float:
  """||a - b|| / ||b|| in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _runnable(impl: str, dtype: str, head_dim: int, seq_len: int) -> bool:
  try:
    attention_lib.choose(impl, dtype, head_dim, seq_len)
    return True
  except Exception:  # pylint: disable=broad-except  # GrowlmError: not on this platform
    return False


def attention_checks(s: dict) -> list[dict[str, Any]]:
  """Each runnable implementation against naive-in-float32-at-highest, outputs and grads."""
  B, L, E = s["batch"], s["seq_len"], 64
  rows = []
  for H, K in ((12, 12), (8, 2)):
    keys = jax.random.split(jax.random.key(H * 100 + K), 4)
    q = jax.random.normal(keys[0], (B, L, H, E), jnp.float32)
    k, v = (jax.random.normal(kk, (B, L, K, E), jnp.float32) for kk in keys[1:3])
    r = jax.random.normal(keys[3], (B, L, H, E), jnp.float32)

    def value_and_grads(impl, q, k, v):
      def f(q, k, v):
        return jnp.sum(attention_lib.attend(q, k, v, impl).astype(jnp.float32) * r)
      out = jax.jit(lambda q, k, v: attention_lib.attend(q, k, v, impl))(q, k, v)
      return out, jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    for dtype in ("float32", "bfloat16"):
      qd, kd, vd = (x.astype(dtype) for x in (q, k, v))
      with _on_cpu(), jax.default_matmul_precision("highest"):
        ref, ref_g = value_and_grads("naive", *(jax.device_put(x.astype(jnp.float32), _cpu())
                                                for x in (qd, kd, vd)))
      for impl in ("naive", "xla", "blocked", "cudnn", "splash", "auto"):
        if not _runnable(impl, dtype, E, L):
          continue
        out, grads = value_and_grads(impl, qd, kd, vd)
        rows.append({"check": "attention", "heads": H, "kv_heads": K, "dtype": dtype,
                     "impl": impl, "resolved": attention_lib.choose(impl, dtype, E, L),
                     "out_rel": rel(out.astype(jnp.float32), ref),
                     "grad_rel": max(rel(g.astype(jnp.float32), rg)
                                     for g, rg in zip(grads, ref_g))})
  return rows


def loss_checks(s: dict) -> list[dict[str, Any]]:
  """Chunked against plain cross-entropy: mean loss and grads of x and w, relative."""
  B, L, D, V = s["loss_batch"], s["seq_len"], 768 if s is FULL else 32, s["vocab"]
  kx, kw, kt = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (B, L, D), jnp.float32)
  w = jax.random.normal(kw, (D, V), jnp.float32) / np.sqrt(D)
  t = jax.random.randint(kt, (B, L), 0, V)
  rows = []
  for dtype in ("float32", "bfloat16"):
    xd, wd = x.astype(dtype), w.astype(dtype)
    with _on_cpu(), jax.default_matmul_precision("highest"):
      plain = jax.jit(jax.value_and_grad(lambda x, w: jnp.mean(loss_lib.cross_entropy(
          jnp.einsum("bld,dv->blv", x, w, preferred_element_type=jnp.float32), t)),
          argnums=(0, 1)))(*(jax.device_put(a, _cpu()) for a in (xd, wd)))
    chunks = sorted({loss_lib.chunk_length(0, B, L, V), max(1, L // 4)})
    halves = (False, True) if dtype == "bfloat16" else (False,)
    for chunk, half in ((c, h) for c in chunks for h in halves):
      got = jax.jit(jax.value_and_grad(lambda x, w, c=chunk, h=half: jnp.mean(
          loss_lib.chunked_cross_entropy(x, w, t, c, h)), argnums=(0, 1)))(xd, wd)
      rows.append({"check": "chunked_loss", "dtype": dtype, "chunk": chunk,
                   "logits": dtype if half else "float32",
                   "loss_rel": abs(float(got[0]) - float(plain[0])) / abs(float(plain[0])),
                   "grad_rel": max(rel(g.astype(jnp.float32), p.astype(jnp.float32))
                                   for g, p in zip(got[1], plain[1]))})
  return rows


def growth_checks(s: dict) -> list[dict[str, Any]]:
  """tile + identity growth: the report (HIGHEST) and the same logits at default precision."""
  rows = []
  for style in ("gpt2", "llama"):
    src = make_model_config(s["src"], style, dtype="float32", max_len=s["growth_seq"])
    dst = make_model_config(s["dst"], style, dtype="float32", max_len=s["growth_seq"])
    dst = dst.replace(n_heads=src.n_heads * 2, n_kv_heads=src.n_kv_heads * 2,
                      head_dim=src.head_dim, mlp_dim=src.mlp_dim * 2)
    plan = GrowthPlan("tile", depth="identity")
    cfg = grown_config(src, dst, plan)
    params = model_lib.init_params(src, jax.random.key(1))
    grown = jax.jit(lambda p: grow(p, src, dst, plan, jax.random.key(2), scales=False).params
                    )(params)
    tokens = jax.random.randint(jax.random.key(3), (2, 4, s["growth_seq"] + 1), 0,
                                src.vocab_size)
    batches = [{"inputs": b[:, :-1], "targets": b[:, 1:]} for b in tokens]
    t0 = time.perf_counter()
    rep = report_lib.preservation_report(src, params, cfg, grown, batches, plan)
    seconds = time.perf_counter() - t0
    # The same growth of a bfloat16 model: the report's float32 figures beside its bfloat16
    # ones, and what the float32 pass adds to a grown run's start (compilation included).
    t0 = time.perf_counter()
    low = report_lib.preservation_report(src.replace(dtype="bfloat16"), params,
                                         cfg.replace(dtype="bfloat16"), grown, batches, plan)
    low_seconds = time.perf_counter() - t0
    default = max(float(jnp.max(jnp.abs(
        jax.jit(lambda p, x: model_lib.apply(src, p, x))(params, b["inputs"])
        - jax.jit(lambda p, x: model_lib.apply(cfg, p, x))(grown, b["inputs"]))))
        for b in batches)
    rows.append({"check": "growth_report", "style": style, "method": rep["method"],
                 "d_model": [src.d_model, cfg.d_model], "n_layers": [src.n_layers, cfg.n_layers],
                 "max_abs_logit_diff_report": rep["max_abs_logit_diff"],
                 "loss_delta_report": rep["loss_delta"],
                 "max_abs_logit_diff_default_precision": default,
                 "report_seconds": seconds,
                 "bf16_model_max_abs_logit_diff_report": low["max_abs_logit_diff"],
                 "bf16_model_max_abs_logit_diff_in_bf16":
                     low["compute_dtype"]["max_abs_logit_diff"],
                 "bf16_model_report_seconds": low_seconds,
                 "attention": attention_lib.choose(cfg.attention, cfg.dtype, cfg.head_dim,
                                                   s["growth_seq"])})
  return rows


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  common.add_output_flags(p, DEFAULT_OUT, {"sizes": "tiny"})
  p.add_argument("--watchdog", type=float, default=0,
                 help="print every thread's Python stack every N seconds (0: off)")
  return p.parse_args(argv)


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  s = QUICK if args.quick else FULL
  if args.watchdog:  # where a stalled check waits, on stderr, then every WATCHDOG seconds
    faulthandler.dump_traceback_later(args.watchdog, repeat=True)
  device = jax.devices()[0]
  rows = []
  # The growth check last: on an H100 (2026-11-28) its float32 HIGHEST programs (the report and
  # the dead-unit steps) took over two minutes to compile, and it has been measured there.
  for fn in (loss_checks, attention_checks, growth_checks):
    for row in fn(s):
      rows.append(row)
      print(_line(row), flush=True)
  return {"benchmark": "growlm device checks", "command": command,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "machine": {"platform": device.platform, "device_kind": device.device_kind,
                      "jax": jax.__version__,
                      "default_matmul_precision": str(jax.config.jax_default_matmul_precision)},
          "sizes": s, "rows": rows}


def _line(r: dict[str, Any]) -> str:
  return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def _fmt(result: dict[str, Any]) -> str:
  m = result["machine"]
  return f"device checks done on {m['device_kind']} ({m['platform']}), jax {m['jax']}"


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.cli(__file__, argv, parse_args, run, _fmt)


if __name__ == "__main__":
  main()
