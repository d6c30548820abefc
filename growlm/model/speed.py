"""What the layer stack's speed knobs stand for: `model.remat` and `model.scan_unroll`.

Both are chosen when the step is traced, for the platform of the mesh in context (else jax's
default backend; growlm.sharding.platform), like `model.attention` (model/attention.py) and
`model.loss_chunk` (train/loss.py). Neither changes what is computed. The measurements behind
each `auto` are in docs/design.md, section 9, and benchmarks/README.md.
"""

from __future__ import annotations

import jax

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
