"""Model configuration: one decoder family, two styles (GPT-2 and Llama), named sizes.

`ModelConfig` is a frozen dataclass with no JAX dependency, so configs, growth plans and
analysis can read it cheaply. `make_model_config(size, style, **overrides)` is the one place
where named sizes and styles are defined.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping


from growlm.errors import GrowlmError, strict_fields

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")
MLPS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16", "float16", "float64")
ATTENTIONS = ("auto", "xla", "cudnn", "splash", "naive", "blocked")  # growlm.model.attention
# Rematerialisation of each block in the backward pass (docs/design.md section 9): none keeps
# every activation; full keeps only the block's input; dots keeps every matmul result;
# dots_no_batch keeps the projections' and MLP's results and recomputes attention's; auto is
# dots_no_batch (measured fastest on a 2-core CPU and on an H100).
REMATS = ("auto", "none", "full", "dots", "dots_no_batch")
# The dtype the train step stores each loss chunk's logits in (train/loss.py): float32, or the
# compute dtype (`dtype`), as PyTorch's bf16 autocast does; the softmax still runs in float32.
# auto: the compute dtype on a GPU, float32 elsewhere (model/speed.py). Eval always uses float32.
LOGITS_DTYPES = ("auto", "float32", "compute")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Hyperparameters of the decoder. Every field is one line of documentation."""

  vocab_size: int = 258        # token vocabulary (bytes tokenizer: 256 bytes + eot + pad)
  d_model: int = 128           # width of the residual stream
  n_layers: int = 2            # number of pre-norm blocks, stacked on the `layers` axis and scanned
  n_heads: int = 4             # query heads
  n_kv_heads: int = 4          # key/value heads (GQA when < n_heads; must divide n_heads)
  head_dim: int = 32           # per-head width, independent of d_model / n_heads
  mlp_dim: int = 512           # hidden width of the MLP
  max_len: int = 256           # longest sequence (size of the learned position table)
  norm: str = "layernorm"      # layernorm | rmsnorm
  norm_eps: float = 1e-5       # epsilon inside the norm (growth may rescale it, docs/design.md 5.2)
  positions: str = "learned"   # learned (absolute table) | rope (rotary, half-split pairs)
  rope_theta: float = 10000.0  # rotary base frequency
  mlp: str = "gelu"            # gelu (tanh approximation, GPT-2) | swiglu (Llama)
  use_bias: bool = True        # biases in every linear layer and in LayerNorm
  qkv_bias: bool = False       # q/k/v projections carry biases even when use_bias is false (Qwen2)
  tie_embeddings: bool = True  # output head reuses the token embedding table
  dtype: str = "float32"       # compute dtype (bfloat16 for speed; norms and softmax stay >= f32)
  param_dtype: str = "float32"  # storage dtype of parameters
  dropout_rate: float = 0.0    # off by default: growth exactness is checked with it off
  init_std: float = 0.02       # std of embedding initialisation
  remat: str = "auto"          # auto | none | full | dots | dots_no_batch: kept for the backward
  attention: str = "auto"      # auto | xla | cudnn | splash | blocked | naive (model.attention)
  scan_unroll: int = 0         # layers per scan iteration; 0: auto (all on GPU, else 1; speed.py)
  loss_chunk: int = 0          # positions per chunk of output layer + loss; 0: auto (train/loss.py)
  logits_dtype: str = "auto"   # auto | float32 | compute: the train step's stored logits (speed.py)

  def __post_init__(self):
    validate(self)

  def replace(self, **changes: Any) -> "ModelConfig":
    """A copy with some fields changed (validated)."""
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from a mapping; unknown keys are an error, not silently dropped.

    `remat` written as a bool (run dirs from before the policies existed) reads as
    'full' (True) or 'none' (False)."""
    fields = strict_fields("model config", d, {f.name for f in dataclasses.fields(cls)})
    if isinstance(fields.get("remat"), bool):
      fields = dict(fields, remat="full" if fields["remat"] else "none")
    return cls(**fields)

  @property
  def q_per_kv(self) -> int:
    """Query heads that share one KV head."""
    return self.n_heads // self.n_kv_heads


def _real(v: Any) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check(cond: bool, msg: str):
  if not cond:
    raise GrowlmError(f"model config: {msg}")


def validate(cfg: ModelConfig):
  """Raises GrowlmError naming the first bad field and its accepted values."""
  for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim",
               "mlp_dim", "max_len"):
    v = getattr(cfg, name)
    # Token ids, positions and every dimension are int32 inside XLA's programs.
    _check(isinstance(v, int) and not isinstance(v, bool) and 0 < v < 2**31,
           f"{name}={v!r}; accepted: a positive integer below 2**31")
  _check(cfg.norm in NORMS, f"norm={cfg.norm!r}; accepted: {NORMS}")
  _check(cfg.positions in POSITIONS, f"positions={cfg.positions!r}; accepted: {POSITIONS}")
  _check(cfg.mlp in MLPS, f"mlp={cfg.mlp!r}; accepted: {MLPS}")
  _check(cfg.dtype in DTYPES, f"dtype={cfg.dtype!r}; accepted: {DTYPES}")
  _check(cfg.param_dtype in DTYPES, f"param_dtype={cfg.param_dtype!r}; accepted: {DTYPES}")
  _check(cfg.n_heads % cfg.n_kv_heads == 0,
         f"n_kv_heads={cfg.n_kv_heads} must divide n_heads={cfg.n_heads}")
  _check(cfg.positions != "rope" or cfg.head_dim % 2 == 0,
         f"head_dim={cfg.head_dim} must be even with positions='rope'")
  for name in ("use_bias", "qkv_bias", "tie_embeddings"):
    v = getattr(cfg, name)
    _check(isinstance(v, bool), f"{name}={v!r}; accepted: true or false")
  for name in ("norm_eps", "rope_theta", "init_std"):
    v = getattr(cfg, name)
    _check(_real(v) and 0 < v < math.inf, f"{name}={v!r}; accepted: a positive finite number")
  _check(_real(cfg.dropout_rate) and 0.0 <= cfg.dropout_rate < 1.0,
         f"dropout_rate={cfg.dropout_rate!r}; accepted: a number in [0, 1)")
  _check(cfg.remat in REMATS, f"remat={cfg.remat!r}; accepted: {REMATS}")
  _check(cfg.attention in ATTENTIONS, f"attention={cfg.attention!r}; accepted: {ATTENTIONS}")
  _check(cfg.logits_dtype in LOGITS_DTYPES,
         f"logits_dtype={cfg.logits_dtype!r}; accepted: {LOGITS_DTYPES}")
  for name in ("scan_unroll", "loss_chunk"):
    v = getattr(cfg, name)
    _check(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
           f"{name}={v!r}; accepted: an integer >= 0 (0: auto)")


# Styles fix the architecture family (docs/design.md, section 2).
STYLES: dict[str, dict[str, Any]] = {
    "gpt2": dict(norm="layernorm", norm_eps=1e-5, positions="learned", mlp="gelu",
                 use_bias=True, tie_embeddings=True),
    "llama": dict(norm="rmsnorm", norm_eps=1e-6, positions="rope", mlp="swiglu",
                  use_bias=False, tie_embeddings=False),
}

# Named sizes: the only place sizes are defined. Llama style takes n_kv_heads = n_heads / 2 (GQA).
SIZES: dict[str, dict[str, int]] = {
    "nano": dict(d_model=64, n_layers=2, n_heads=2, head_dim=32, mlp_dim=256),
    "tiny": dict(d_model=128, n_layers=4, n_heads=4, head_dim=32, mlp_dim=512),
    "small": dict(d_model=256, n_layers=4, n_heads=4, head_dim=64, mlp_dim=1024),
    "medium": dict(d_model=512, n_layers=8, n_heads=8, head_dim=64, mlp_dim=2048),
    "base": dict(d_model=768, n_layers=12, n_heads=12, head_dim=64, mlp_dim=3072),
}


def check_dtype_runs_on(dtype: str, platform: str, what: str = "model.dtype",
                        computes: bool = True) -> None:
  """GrowlmError unless `dtype` can run here, on `platform` (jax's name: cpu, gpu, tpu): XLA's
  CPU backend has no float16 matrix product accumulating in float32 (when `computes`: a storage
  dtype is cast first), and without 64-bit jax (JAX_ENABLE_X64) a float64 array is silently a
  float32 one."""
  import jax  # pylint: disable=g-import-not-at-top  (the dataclass above needs no JAX)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if dtype == "float64" and jax.dtypes.canonicalize_dtype(jnp.float64) != jnp.float64:
    raise GrowlmError(f"{what}='float64' needs 64-bit jax (without it jax computes in float32); "
                      "accepted: float32, bfloat16, float16, or float64 with JAX_ENABLE_X64=1 "
                      "in the environment")
  if computes and dtype == "float16" and platform == "cpu":
    raise GrowlmError(f"{what}='float16' does not run on a CPU (XLA's CPU backend has no float16 "
                      "matrix product accumulating in float32); accepted here: float32, "
                      "bfloat16, float64 (float16 runs on a GPU or TPU)")


def make_model_config(size: str = "tiny", style: str = "gpt2", **overrides: Any) -> ModelConfig:
  """The named `size` in the named `style`, with field overrides applied last."""
  if size not in SIZES:
    raise GrowlmError(f"model size {size!r} unknown; accepted: {sorted(SIZES)}")
  if style not in STYLES:
    raise GrowlmError(f"model style {style!r} unknown; accepted: {sorted(STYLES)}")
  fields: dict[str, Any] = dict(STYLES[style])
  fields.update(SIZES[size])
  # GQA in Llama style where the head count allows it.
  heads = fields["n_heads"]
  fields["n_kv_heads"] = heads // 2 if style == "llama" and heads % 2 == 0 else heads
  if style == "llama":
    # SwiGLU has three matrices: keep the MLP's parameter count close to the GELU MLP's.
    fields["mlp_dim"] = int(fields["mlp_dim"] * 2 / 3 + 15) // 16 * 16
  fields.update(overrides)
  return ModelConfig.from_dict(fields)
