"""What storing the train step's logits in bf16 (`model.logits_dtype=compute`) does to training.

    .venv/bin/python benchmarks/logits_precision.py              # about 7 minutes on 2 CPU cores
    .venv/bin/python benchmarks/logits_precision.py --vocab 50304 --steps 200 --train_on 0

On a GPU growlm's bf16 train step stores each loss chunk's logits in bf16 by default, as
PyTorch's bf16 autocast does (docs/design.md section 9): the head's product still accumulates in
float32 and the softmax runs in float32, on logits rounded to bf16. This measures what that
rounding costs beside the rounding bf16 compute already brings, on a model with trained logits:

1. A GPT-2-style model is trained in float32 on the stdlib corpus (bytes) for --steps.
2. On --batches held-out batches, the loss and its gradient are computed three ways: float32
   (the reference), bf16 compute with float32 logits, bf16 compute with bf16 logits. Reported:
   the mean |loss difference| of each bf16 way from float32 (and between the two), and the
   gradient's relative error, |g - g_f32| / |g_f32| over all parameters.
3. From the trained weights, --train_on more steps three ways (float32, and bf16 with each logits
   dtype) on the same batches; reported: each run's held-out loss at the end (float32 logits:
   eval never rounds them) and the largest gap between two runs' train losses along the way,
   bf16 logits against float32 logits beside bf16 against float32 (how far any rounding takes
   two runs apart).

It runs on any platform; `logits_dtype` is set explicitly, so no `auto` is involved.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/common.py

from growlm import model  # pylint: disable=wrong-import-position
from growlm.data import sources, tokenizers  # pylint: disable=wrong-import-position
from growlm.train import loss as loss_lib  # pylint: disable=wrong-import-position

DEFAULT_OUT = os.path.join("runs", "bench", "logits_precision.json")
QUICK = {"size": "nano", "batch": 2, "seq_len": 32, "steps": 3, "batches": 2, "train_on": 2,
         "corpus_bytes": 200_000}
WAYS = ("f32", "bf16, f32 logits", "bf16, bf16 logits")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--size", default="small", help="growlm named model size (GPT-2 style)")
  p.add_argument("--vocab", type=int, default=258,
                 help="vocabulary size (bytes use 258 ids; more pads the head like GPT-2's)")
  p.add_argument("--batch", type=int, default=16, help="sequences per batch")
  p.add_argument("--seq_len", type=int, default=256, help="tokens per sequence")
  p.add_argument("--steps", type=int, default=300, help="float32 training steps first")
  p.add_argument("--lr", type=float, default=1e-3, help="AdamW's learning rate")
  p.add_argument("--batches", type=int, default=8, help="held-out batches compared")
  p.add_argument("--train_on", type=int, default=100,
                 help="bf16 steps after, once per logits dtype (0: none)")
  p.add_argument("--corpus_bytes", type=int, default=4_000_000,
                 help="bytes of the stdlib corpus read (train and eval)")
  common.add_output_flags(p, DEFAULT_OUT, QUICK)
  args = p.parse_args(argv)
  common.apply_quick(args, QUICK, p, argv)
  for name in ("vocab", "batch", "seq_len", "steps", "batches", "corpus_bytes"):
    if getattr(args, name) <= 0:
      p.error(f"--{name} must be a positive integer, got {getattr(args, name)}")
  if args.vocab < tokenizers.ByteTokenizer.vocab_size:
    p.error(f"--vocab must be >= {tokenizers.ByteTokenizer.vocab_size} (the bytes "
            f"tokenizer's ids), got {args.vocab}")
  if args.train_on < 0:
    p.error(f"--train_on must be >= 0, got {args.train_on}")
  return args


def _tokens(split: str, max_bytes: int) -> np.ndarray:
  corpus = sources.load_corpus("stdlib", split, max_bytes=max_bytes)
  tok = tokenizers.ByteTokenizer()
  return np.concatenate([np.append(tok.encode(d), tok.eot_id) for d in corpus.documents])


def _batches(tokens: np.ndarray, n: int, batch: int, seq_len: int, seed: int) -> list[tuple]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    starts = rng.integers(0, len(tokens) - seq_len - 1, batch)
    rows = np.stack([tokens[s:s + seq_len + 1] for s in starts])
    out.append((jnp.asarray(rows[:, :-1]), jnp.asarray(rows[:, 1:])))
  return out


def _loss_fn(cfg):
  return lambda params, x, y: loss_lib.token_nll(cfg, params, x, y).mean()


def _train(cfg, params, batches, lr: float) -> tuple[Any, list[float]]:
  opt = optax.adamw(lr, weight_decay=0.0)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(_loss_fn(cfg))(params, x, y)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  state, losses = opt.init(params), []
  for x, y in batches:
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  return params, losses


def _flat(tree) -> jax.Array:
  return jnp.concatenate([jnp.ravel(a).astype(jnp.float32) for a in jax.tree.leaves(tree)])


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  t0 = time.perf_counter()
  train = _tokens("train", args.corpus_bytes)
  held = _tokens("eval", args.corpus_bytes)
  cfg = model.make_model_config(args.size, "gpt2", vocab_size=args.vocab, max_len=args.seq_len)
  params = model.init_params(cfg, jax.random.key(0))
  params, f32_losses = _train(cfg, params, _batches(train, args.steps, args.batch,
                                                    args.seq_len, 1), args.lr)
  ways = [cfg, cfg.replace(dtype="bfloat16", logits_dtype="float32"),
          cfg.replace(dtype="bfloat16", logits_dtype="compute")]
  grad_fns = [jax.jit(jax.value_and_grad(_loss_fn(c))) for c in ways]
  losses, grads = [[] for _ in ways], [[] for _ in ways]
  eval_batches = _batches(held, args.batches, args.batch, args.seq_len, 2)
  for x, y in eval_batches:
    for i, fn in enumerate(grad_fns):
      loss, g = fn(params, x, y)
      losses[i].append(float(loss))
      grads[i].append(_flat(g))
  losses = np.array(losses)
  rel = lambda a, b: float(np.mean([jnp.linalg.norm(ga - gb) / jnp.linalg.norm(g0)
                                    for ga, gb, g0 in zip(grads[a], grads[b], grads[0])]))
  logits = model.apply(cfg, params, eval_batches[0][0])
  result = {
      "benchmark": "growlm logits precision", "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": bool(args.quick),
      "settings": {k: getattr(args, k) for k in ("size", "vocab", "batch", "seq_len", "steps",
                                                 "lr", "batches", "train_on", "corpus_bytes")},
      "device": jax.devices()[0].device_kind,
      "f32_train_loss_last": f32_losses[-1],
      "logits_std": float(jnp.std(logits)), "logits_max_abs": float(jnp.max(jnp.abs(logits))),
      "eval_loss_f32": float(losses[0].mean()),
      "loss_abs_diff": {"bf16 f32 logits vs f32": float(np.abs(losses[1] - losses[0]).mean()),
                        "bf16 bf16 logits vs f32": float(np.abs(losses[2] - losses[0]).mean()),
                        "bf16 logits vs f32 logits": float(np.abs(losses[2] - losses[1]).mean())},
      "grad_rel_err": {"bf16 f32 logits vs f32": rel(1, 0), "bf16 bf16 logits vs f32": rel(2, 0),
                       "bf16 logits vs f32 logits": rel(2, 1)},
  }
  if args.train_on:
    more = _batches(train, args.train_on, args.batch, args.seq_len, 3)
    after, curves = {}, {}
    for name, c in zip(WAYS, ways):
      trained, curves[name] = _train(c, params, more, args.lr)
      nll = jax.jit(lambda p, x, y, c=c: loss_lib.token_nll(c, p, x, y).mean())
      after[name] = float(np.mean([nll(trained, x, y) for x, y in eval_batches]))
    gap = lambda a, b: float(np.max(np.abs(np.subtract(curves[a], curves[b]))))
    result["training"] = {
        "eval_loss_after": after,
        "max_train_loss_gap": {"bf16 logits vs f32 logits": gap(WAYS[2], WAYS[1]),
                               "bf16 vs f32": gap(WAYS[1], WAYS[0])},
        "train_loss_last": {k: v[-1] for k, v in curves.items()}}
  result["wall_seconds"] = time.perf_counter() - t0
  return result


def summary(r: dict[str, Any]) -> str:
  s = r["settings"]
  lines = [f"{r['device']}: gpt2 {s['size']}, vocab {s['vocab']}, {s['batch']} x {s['seq_len']}; "
           f"after {s['steps']} float32 steps the held-out loss is {r['eval_loss_f32']:.4f}, "
           f"logits std {r['logits_std']:.2f}, max |logit| {r['logits_max_abs']:.1f}",
           "", "| compared | mean abs loss difference | gradient relative error |",
           "| --- | --- | --- |"]
  for k in r["loss_abs_diff"]:
    lines.append(f"| {k} | {r['loss_abs_diff'][k]:.2e} | {r['grad_rel_err'][k]:.2e} |")
  t = r.get("training")
  if t:
    gaps = t["max_train_loss_gap"]
    lines += ["", f"{s['train_on']} more steps each way: held-out loss "
              + ", ".join(f"{v:.4f} ({k})" for k, v in t["eval_loss_after"].items())
              + "; largest train-loss gap along the way "
              + ", ".join(f"{v:.2e} ({k})" for k, v in gaps.items())]
  lines.append(f"wall time {r['wall_seconds']:.0f} s")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  return common.cli(__file__, argv, parse_args, run, summary)


if __name__ == "__main__":
  main()
