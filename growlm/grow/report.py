"""The preservation report: how closely the grown model computes the source's function.

Measured on held-out batches, never assumed: max and mean |delta logits|, KL(source || target)
per token, and both models' losses; and, since a dead unit changes no logit, how many of the
growth's new units receive any gradient (grow/dead.py). Every growth prints it and saves it as
growth_report.json.
Both models compute in float32 (float64 for a float64 model) with every matrix product at the
highest precision (float32 products stay float32 on accelerators too), whatever the config's
dtype and the caller's default: the figures measure the growth, not rounding. A model that
trains in bfloat16 or float16 also gets the same comparison in that dtype (`compute_dtype`),
which is what its training sees.
On an H100, an exact tile + identity growth (d_model 256 -> 512, 4 -> 8 layers) showed max
|delta logits| 1.6e-6 in float32 at the highest precision, 3.9e-2 in bfloat16.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp

from growlm import fs, trees
from growlm.grow import core, dead
from growlm.grow.plan import GrowthPlan
from growlm.model import decoder as model_lib
from growlm.model.config import ModelConfig


# The report's matrix products run at full float32 precision on every platform: at JAX's
# default an H100 takes TF32 passes, and an exact tile+identity growth showed max |delta
# logits| 3.2e-2 there. Set while tracing, so the precision is part of the traced computation.
PRECISION = "highest"


def _stats(src_cfg, dst_cfg, src_params, dst_params, batch):
  """Sums over one batch (jitted by preservation_report; every product at PRECISION)."""
  with jax.default_matmul_precision(PRECISION):
    return _batch_stats(src_cfg, dst_cfg, src_params, dst_params, batch)


# The report computes both models' logits a chunk of positions at a time, never the whole
# batch's [B, L, V] (GPT-2's vocabulary on 16 x 1024 tokens: 3.3 GB a tensor in float32, and the
# comparison needs several): at most this many bytes of float32 logits per chunk and model.
CHUNK_BYTES = 64 << 20


def chunk_length(batch: int, seq_len: int, vocab: int) -> int:
  """Positions per chunk: the largest divisor of seq_len whose logits fit CHUNK_BYTES."""
  c = max(1, min(seq_len, CHUNK_BYTES // (4 * batch * vocab)))
  while seq_len % c:
    c -= 1
  return c


def _batch_stats(src_cfg, dst_cfg, src_params, dst_params, batch):
  xs_BxLxD, ws_DxV = model_lib.hidden(src_cfg, src_params, batch["inputs"])
  xd_BxLxE, wd_ExV = model_lib.hidden(dst_cfg, dst_params, batch["inputs"])
  B, L = batch["targets"].shape
  c = chunk_length(B, L, src_cfg.vocab_size)
  # Logits come out as model.apply's do: float32, or float64 for a float64 model.
  acc_s, acc_d = model_lib.acc_dtype(src_cfg.dtype), model_lib.acc_dtype(dst_cfg.dtype)
  chunks = lambda x: jnp.moveaxis(x.reshape(B, L // c, c, *x.shape[2:]), 1, 0)

  def one(acc, xs_xd_t):
    xs_BxCxD, xd_BxCxE, t_BxC = xs_xd_t
    ls = model_lib.project(xs_BxCxD, ws_DxV, preferred_element_type=acc_s)
    ld = model_lib.project(xd_BxCxE, wd_ExV, preferred_element_type=acc_d)
    diff = jnp.abs(ls - ld)
    lps, lpd = jax.nn.log_softmax(ls, -1), jax.nn.log_softmax(ld, -1)
    kl = jnp.sum(jnp.exp(lps) * (lps - lpd), -1)
    tgt = t_BxC[..., None]
    nll_s = -jnp.take_along_axis(lps, tgt, -1)
    nll_d = -jnp.take_along_axis(lpd, tgt, -1)
    part = {"max": diff.max(), "sum_abs": diff.sum(), "kl": kl.sum(), "nll_src": nll_s.sum(),
            "nll_dst": nll_d.sum()}
    return {k: jnp.maximum(acc[k], v) if k == "max" else acc[k] + v
            for k, v in part.items()}, None

  wide = jnp.promote_types(acc_s, acc_d)
  zero = {k: jnp.zeros((), wide) for k in ("max", "sum_abs", "kl", "nll_src", "nll_dst")}
  totals, _ = jax.lax.scan(one, zero, (chunks(xs_BxLxD), chunks(xd_BxLxE),
                                       chunks(batch["targets"])))
  return totals


_STATS = jax.jit(_stats, static_argnums=(0, 1))


def _compare(src_cfg, dst_cfg, src_params, dst_params, batches) -> dict[str, float]:
  """_stats summed over the batches (the max of 'max'), and the counts of tokens and logits."""
  totals: dict[str, float] = {"n_tokens": 0, "n_logits": 0}
  for b in batches:
    for k, v in jax.device_get(_STATS(src_cfg, dst_cfg, src_params, dst_params, b)).items():
      v = float(v)
      totals[k] = max(totals.get(k, 0.0), v) if k == "max" else totals.get(k, 0.0) + v
    totals["n_tokens"] += b["targets"].size   # Python ints: no int32 to overflow
    totals["n_logits"] += b["targets"].size * src_cfg.vocab_size
  return totals


def method_name(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan | None) -> str:
  """The plan's name, naming only the parts that act: 'tile', 'identity' or 'tile+identity'."""
  if plan is None:
    return "none"
  width = any(getattr(src, f) != getattr(dst, f)
              for f in ("d_model", "mlp_dim", "n_heads", "n_kv_heads", "head_dim", "max_len"))
  # layer_ranges acts even when the layer count stays (a reorder or a repeat-and-drop).
  depth = src.n_layers != dst.n_layers or plan.depth == "layer_ranges"
  parts = ([plan.width] if width else []) + ([plan.depth] if depth else [])
  return "+".join(parts) or "none"


def _comparisons(src_cfg: ModelConfig, dst_cfg: ModelConfig
                 ) -> list[tuple[ModelConfig, ModelConfig]]:
  """The (source, target) configs the report compares in: float32 (float64 for a float64
  model, never narrower than float32), then, for a model that trains in a half dtype, its
  own dtype."""
  wide = jnp.dtype(jnp.promote_types(dst_cfg.dtype, jnp.float32)).name
  pairs = [(dataclasses.replace(src_cfg, dtype=wide), dataclasses.replace(dst_cfg, dtype=wide))]
  return pairs + ([(src_cfg, dst_cfg)] if dst_cfg.dtype != wide else [])


def programs(src_cfg: ModelConfig, target: ModelConfig, plan: GrowthPlan,
             loss_fn: dead.LossFn | None = None) -> list[tuple[Callable, Callable]]:
  """The jitted programs preservation_report runs at a growth of `src_cfg` into `target` by
  `plan`, not run (`--compile_for` compiles them), each with how it takes (source params, grown
  params, one batch) as its arguments: each comparison, and the new-unit count's SGD step
  (dead.step_program) when the growth adds units."""
  dst = core.grown_config(src_cfg, target, plan)
  out = [(_STATS, lambda sp, dp, b, s=s, d=d: (s, d, sp, dp, b))
         for s, d in _comparisons(src_cfg, dst)]
  step = dead.step_program(src_cfg, dst, plan, loss_fn)
  if step is not None:
    out.append((step[0], lambda sp, dp, b: step[1](dp, b)))
  return out


def preservation_report(src_cfg: ModelConfig, src_params: Any, dst_cfg: ModelConfig,
                        dst_params: Any, batches: Iterable[dict], plan: GrowthPlan | None = None,
                        extra: dict | None = None, loss_fn: dead.LossFn | None = None
                        ) -> dict[str, Any]:
  """Compares source and grown models on `batches` ({'inputs', 'targets'} [B, L] arrays), and
  counts the new units that train (dead.new_unit_report, with a plan; `loss_fn` is the
  trainer's per-token loss, growlm.train.loss.token_nll, which this layer may not import)."""
  batches = list(batches)   # read twice: the comparison, then the dead-unit steps
  if not batches:
    raise ValueError("preservation_report needs at least one batch")
  (wide_src, wide_dst), *half = _comparisons(src_cfg, dst_cfg)
  wide = wide_dst.dtype
  totals = _compare(wide_src, wide_dst, src_params, dst_params, batches)
  n_tok = totals["n_tokens"]
  low = None
  if half:   # the same comparison in the half dtype the model trains in
    t = _compare(*half[0], src_params, dst_params, batches)
    low = {"dtype": dst_cfg.dtype, "max_abs_logit_diff": t["max"],
           "mean_abs_logit_diff": t["sum_abs"] / t["n_logits"],
           "kl_src_dst": t["kl"] / t["n_tokens"],
           "loss_delta": (t["nll_dst"] - t["nll_src"]) / t["n_tokens"]}
  report = {
      "method": method_name(src_cfg, dst_cfg, plan),
      "plan": plan.to_dict() if plan else None,
      "exact_expected": bool(core.is_exact(src_cfg, dst_cfg, plan)) if plan else None,
      "max_abs_logit_diff": totals["max"],
      "mean_abs_logit_diff": totals["sum_abs"] / totals["n_logits"],
      "kl_src_dst": totals["kl"] / n_tok,
      "loss_src": totals["nll_src"] / n_tok,
      "loss_dst": totals["nll_dst"] / n_tok,
      "loss_delta": (totals["nll_dst"] - totals["nll_src"]) / n_tok,
      "n_tokens": int(n_tok),
      "src_params": trees.count(src_params),
      "dst_params": trees.count(dst_params),
      "dims": core.describe(src_cfg, dst_cfg),
      "dtype": wide,
      "compute_dtype": low,
      "norm_eps": [src_cfg.norm_eps, dst_cfg.norm_eps],
      "matmul_precision": PRECISION,
      "new_units": (dead.new_unit_report(src_cfg, dst_cfg, plan, dst_params, batches, loss_fn)
                    if plan else None),
  }
  report.update(extra or {})
  return report


def format_report(r: dict[str, Any]) -> str:
  """A few lines for the terminal (the last: new units alive after one and two steps)."""
  dims = ", ".join(f"{k} {a}->{b}" for k, (a, b) in r["dims"].items()) or "no change"
  exact = {True: "exact expected", False: "approximate", None: "-"}[r["exact_expected"]]
  return (f"growth {r['method']} ({exact}): {dims}; params {r['src_params']:,} -> "
          f"{r['dst_params']:,}\n"
          f"  max |delta logits| {r['max_abs_logit_diff']:.3e}, mean {r['mean_abs_logit_diff']:.3e}"
          f", KL(src||dst) {r['kl_src_dst']:.3e} nats/token\n"
          f"  held-out loss: source {r['loss_src']:.4f}, grown {r['loss_dst']:.4f} "
          f"(delta {r['loss_delta']:+.3e}) over {r['n_tokens']:,} tokens ({r['dtype']})\n"
          + (f"  in {low['dtype']}, as training computes: max |delta logits| "
             f"{low['max_abs_logit_diff']:.3e}, KL {low['kl_src_dst']:.3e}, loss delta "
             f"{low['loss_delta']:+.3e}\n" if (low := r.get("compute_dtype")) else "")
          + f"  {dead.format_line(r.get('new_units'))}")


def save_report(report: dict[str, Any], directory: str, name: str = "growth_report.json") -> str:
  """Writes the report atomically; returns its path."""
  fs.makedirs(directory)
  path = fs.join(directory, name)
  fs.write_json_atomic(path, report)
  return path
