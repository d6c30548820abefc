"""Compute accounting: training FLOPs per token, PaLM convention (Chowdhery et al., 2022, app. B).

FLOPs per token = 6 * N + 12 * n_layers * (n_heads * head_dim) * seq_len, where N counts the
parameters that take part in matrix products: attention and MLP matrices and the output
projection (the tied embedding counts once, as the output projection), not the embedding
lookup, learned positions, norms or biases. The attention term is PaLM's 12*L*H*Q*T; with the
usual n_heads * head_dim == d_model it is docs/design.md's 12 * n_layers * d_model * seq_len.
"""

from __future__ import annotations

from growlm.model.config import ModelConfig


def matmul_params(cfg: ModelConfig) -> int:
  """N: parameters that take part in matrix products (output projection included)."""
  D, F, E = cfg.d_model, cfg.mlp_dim, cfg.head_dim
  attn = D * E * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
  mlp = D * F * (3 if cfg.mlp == "swiglu" else 2)
  return cfg.n_layers * (attn + mlp) + D * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training (forward + backward) FLOPs for one token at context length `seq_len`."""
  return 6.0 * matmul_params(cfg) + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Forward-only FLOPs per token (a third of training FLOPs under this convention)."""
  return flops_per_token(cfg, seq_len) / 3.0
