"""What the speed knobs stand for: `model.remat`, `model.scan_unroll` and `model.logits_dtype`.

Each is chosen when the step is traced, for the platform of the mesh in context (else jax's
default backend; growlm.sharding.platform), like `model.attention` (model/attention.py) and
`model.loss_chunk` (train/loss.py). remat and scan_unroll do not change what is computed;
logits_dtype rounds the train step's logits to the compute dtype, as PyTorch's autocast does.
The measurements behind each `auto` are in docs/design.md, section 9, and benchmarks/README.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from growlm import sharding
from growlm.model import attention
from growlm.model.config import ModelConfig

_CP = jax.checkpoint_policies
# A layer norm's row statistics ([B, L, 1] float32 each), named by model/decoder.py's Norm.
NORM_NAMES = ("norm_mean", "norm_rstd")
_DOTS = {"dots": _CP.checkpoint_dots, "dots_no_batch": _CP.dots_with_no_batch_dims_saveable}


def remat_policy(remat: str, platform: str | None = None) -> str:
  """The policy `model.remat` stands for (auto: dots_no_batch, measured fastest on a 2-core CPU
  and on an H100, where it ran GPT-2 124M 16% faster than none in 40% of the memory;
  benchmarks/README.md, "Speed knobs"). `platform` is kept for a per-platform choice."""
  del platform
  if remat != "auto":
    return remat
  return "dots_no_batch"


def checkpoint_policy(remat: str, platform: str | None = None):
  """The jax.checkpoint policy of each block for a resolved `remat` (not none or auto); None
  saves nothing but the block's input (`full`). The dots policies also keep attention's output
  and softmax statistics (`blocked`'s by name, cuDNN's and splash's as their kernels' forward
  outputs), so that its backward pass (a custom VJP) does not rerun its forward. On a GPU they
  keep attention's inputs as well (attention.INPUT_NAMES; same plan, 2.7 GB less traffic per
  GPT-2 124M step for an H100; XLA's TPU compiler planned 0.56-0.84 GiB more per v5e chip with
  them) and layer norms' row statistics (NORM_NAMES: recomputed, XLA fused them into the
  kernel writing float32 dy * x-hat for d scale's column sum; kept, x-hat is elementwise and
  that product fuses into the sum: 2.7 GB less; RMSNorm's alone changed little, so it is not
  named). Elsewhere, unmeasured, these are recomputed as before."""
  if remat == "full":
    return None
  names = attention.SAVED_NAMES
  if (platform or sharding.platform()) == "gpu":
    names += attention.INPUT_NAMES + NORM_NAMES
  keep = _CP.save_from_both_policies(_CP.save_only_these_names(*names),
                                     attention.kernel_forward_saveable)
  return _CP.save_from_both_policies(_DOTS[remat], keep)


def layers_per_iteration(cfg: ModelConfig, platform: str | None = None) -> int:
  """The layers per iteration of the scanned stack that `model.scan_unroll` stands for, at most
  all of them. 0 (auto): all of them on a GPU, where no loop is then left and the scan's stacks
  of kept activations, their zero fills and the copies into and out of them go (a fifth of
  GPT-2 124M's memory traffic outside products and attention on an H100, with a smaller memory
  plan); one elsewhere (the CPU measured no gain; a TPU keeps the loop untried)."""
  if cfg.scan_unroll:
    return min(cfg.scan_unroll, cfg.n_layers)
  return cfg.n_layers if (platform or sharding.platform()) == "gpu" else 1


def guards_recompute(cfg: ModelConfig, platform: str | None = None) -> bool:
  """Whether remat's recomputation must be fenced off from the forward's values (jax.checkpoint's
  prevent_cse). A loop between the forward and the backward already keeps XLA from merging the
  two; with every layer unrolled none is left, and XLA would keep the forward's values alive
  for the backward instead of recomputing them, undoing the policy (1.1 GiB more in XLA's plan
  for GPT-2 124M on an H100)."""
  return layers_per_iteration(cfg, platform) == cfg.n_layers


def one_pass_variance(dtype, platform: str | None = None) -> bool:
  """Whether layer norm, given inputs of `dtype`, takes its variance as E[x^2] - E[x]^2 (both
  sums in float32), whose two sums XLA reduces in one read of x beside the residual add, rather
  than as E[(x - E[x])^2], a second read (Flax's LayerNorm does the former by default). On a GPU
  for half-precision inputs: 1.4 GB less per GPT-2 124M step compiled for an H100, each layer
  norm and its recomputation one pass lighter. Its rounding grows with mean^2 / variance: in
  float32, 9e-6 of the output at a mean of 3 spreads (against float64), far below a bf16
  output's 4e-3, but at a mean of 3000 spreads nothing is left. So float32 models (and
  growth reports, computed in float32) keep two passes, and so do a CPU, whose step is bound by
  compute, and a TPU, unmeasured."""
  half = jnp.promote_types(dtype, jnp.float32) != jnp.dtype(dtype)
  return half and (platform or sharding.platform()) == "gpu"


def half_logits(cfg: ModelConfig, platform: str | None = None) -> bool:
  """Whether the train step stores each loss chunk's logits in the compute dtype (a half dtype)
  rather than float32 (`model.logits_dtype`; train/loss.py). The product still accumulates in
  float32 and the softmax runs in float32 on the rounded logits, as under PyTorch's bf16 autocast.
  auto: on a GPU only, where the loss is bound by memory traffic: 6 GB less per GPT-2 124M step
  compiled for an H100, and 0.6 GiB less in XLA's plan. A CPU's step is bound by compute; for a
  v5e XLA's TPU compiler planned more memory with them (9.86 GiB per chip against 9.28, not
  traced further), and its speed is unmeasured. A float32 (or float64) model has nothing to
  round."""
  if jnp.promote_types(cfg.dtype, jnp.float32) == jnp.dtype(cfg.dtype):
    return False
  if cfg.logits_dtype != "auto":
    return cfg.logits_dtype == "compute"
  return (platform or sharding.platform()) == "gpu"


def stored_logits_dtype(cfg: ModelConfig, platform: str | None = None) -> str:
  """The dtype's name the train step stores its logits in: the compute dtype where
  `half_logits`, else float32 (what reports print, and what auto loss chunks are sized by)."""
  return cfg.dtype if half_logits(cfg, platform) else "float32"
