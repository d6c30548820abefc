"""Hugging Face tensor layouts: HF tensor names and shapes <-> growlm leaves, per family.

Pure descriptions (numpy only), read by growlm.hf to import and export directories; the
config.json side of each family is growlm.interop.hf_families.

Tensors (HF -> growlm leaf; D d_model, H heads, K kv heads, E head_dim, F mlp_dim, V vocab):
  GPT-2 Conv1D weights are stored (in, out): c_attn (D, 3HE) = [query | key | value], each
  -> [D, H, E]; attn.c_proj (HE, D) -> out [H, E, D]; c_fc (D, F) -> wi; mlp.c_proj (F, D) -> wo;
  wte (V, D) -> embed; wpe (T, D) -> pos_embed; lm_head (V, D) -> head [D, V] when untied.
  Llama nn.Linear weights are stored (out, in): q_proj (HE, D) -> query [D, H, E]; k/v_proj
  (KE, D) -> [D, K, E]; o_proj (D, HE) -> out [H, E, D]; gate/up_proj (F, D) -> wi_gate/wi_up
  [D, F]; down_proj (D, F) -> wo [F, D]. Qwen2 and Mistral use Llama's names and layout.
HF Llama's rotate_half and growlm both pair rotary dims (i, i + E/2), so q/k rows map unpermuted;
both put query head h on KV head h // (H / K).

Biases come in groups (BIAS_GROUPS): qkv (the query/key/value biases), attn (the attention
output's), mlp, norm (LayerNorm's). A family holds some groups (hf_biases), a growlm config
others (held_biases); export writes zeros for a group the family has and the model lacks.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from growlm.model.config import ModelConfig

PREFIX = {"gpt2": "transformer.", "llama": "model.", "qwen2": "model.", "mistral": "model."}
BIAS_GROUPS = ("qkv", "attn", "mlp", "norm")


class Spec(NamedTuple):
  """One HF tensor and the growlm leaves it holds."""
  name: str                              # HF name after the model prefix; '{i}' is the layer
  shape: tuple[int, ...]                 # its HF shape
  paths: tuple[tuple[str, ...], ...]     # growlm leaves (one layer's slice when per-layer)
  to_growlm: Callable[[np.ndarray], tuple]
  to_hf: Callable[..., np.ndarray]
  bias: str = ""                         # its bias group (BIAS_GROUPS), or '' for a weight
  prefixed: bool = True                  # lm_head sits outside the model prefix



# ------------------------------------------------------------------------------ tensors


def _c(x):
  return np.ascontiguousarray(x)


def _same(name, shape, path, **kw) -> Spec:
  return Spec(name, shape, (path,), lambda w: (w,), lambda a: a, **kw)


def _transposed(name, shape, path, **kw) -> Spec:
  return Spec(name, shape, (path,), lambda w: (_c(w.T),), lambda a: _c(a.T), **kw)


def _reshaped(name, shape, path, g_shape, **kw) -> Spec:
  return Spec(name, shape, (path,), lambda w: (w.reshape(g_shape),),
               lambda a: a.reshape(shape), **kw)


def _gpt2_specs(c: ModelConfig) -> list[Spec]:
  D, H, E, F, V = c.d_model, c.n_heads, c.head_dim, c.mlp_dim, c.vocab_size
  a, m = ("layers", "attn"), ("layers", "mlp")
  qkv = tuple(a + (n,) for n in ("query", "key", "value"))
  qkv_b = tuple(a + (n + "_bias",) for n in ("query", "key", "value"))
  specs = [
      _same("wte.weight", (V, D), ("embed",)),
      _same("wpe.weight", (c.max_len, D), ("pos_embed",)),
      _same("ln_f.weight", (D,), ("final_norm", "scale")),
      _same("ln_f.bias", (D,), ("final_norm", "bias"), bias="norm"),
      Spec("h.{i}.attn.c_attn.weight", (D, 3 * H * E), qkv,
            lambda w: tuple(x.reshape(D, H, E) for x in np.split(w, 3, axis=1)),
            lambda q, k, v: np.concatenate([x.reshape(D, H * E) for x in (q, k, v)], axis=1)),
      Spec("h.{i}.attn.c_attn.bias", (3 * H * E,), qkv_b,
            lambda b: tuple(x.reshape(H, E) for x in np.split(b, 3)),
            lambda q, k, v: np.concatenate([x.reshape(H * E) for x in (q, k, v)]), bias="qkv"),
      _reshaped("h.{i}.attn.c_proj.weight", (H * E, D), a + ("out",), (H, E, D)),
      _same("h.{i}.attn.c_proj.bias", (D,), a + ("out_bias",), bias="attn"),
      _same("h.{i}.mlp.c_fc.weight", (D, F), m + ("wi",)),
      _same("h.{i}.mlp.c_fc.bias", (F,), m + ("wi_bias",), bias="mlp"),
      _same("h.{i}.mlp.c_proj.weight", (F, D), m + ("wo",)),
      _same("h.{i}.mlp.c_proj.bias", (D,), m + ("wo_bias",), bias="mlp"),
  ]
  for hf, g in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
    specs.append(_same(f"h.{{i}}.{hf}.weight", (D,), ("layers", g, "scale")))
    specs.append(_same(f"h.{{i}}.{hf}.bias", (D,), ("layers", g, "bias"), bias="norm"))
  if not c.tie_embeddings:
    specs.append(_transposed("lm_head.weight", (V, D), ("head",), prefixed=False))
  return specs


def _llama_specs(c: ModelConfig) -> list[Spec]:
  D, H, K, E, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_dim, c.vocab_size
  a, m = ("layers", "attn"), ("layers", "mlp")
  specs = [
      _same("embed_tokens.weight", (V, D), ("embed",)),
      _same("norm.weight", (D,), ("final_norm", "scale")),
      _same("layers.{i}.input_layernorm.weight", (D,), ("layers", "attn_norm", "scale")),
      _same("layers.{i}.post_attention_layernorm.weight", (D,), ("layers", "mlp_norm", "scale")),
      Spec("layers.{i}.self_attn.o_proj.weight", (D, H * E), (a + ("out",),),
            lambda w: (_c(w.reshape(D, H, E).transpose(1, 2, 0)),),
            lambda o: _c(o.transpose(2, 0, 1).reshape(D, H * E))),
      _same("layers.{i}.self_attn.o_proj.bias", (D,), a + ("out_bias",), bias="attn"),
  ]
  for hf, g, n in (("q_proj", "query", H), ("k_proj", "key", K), ("v_proj", "value", K)):
    specs.append(Spec(f"layers.{{i}}.self_attn.{hf}.weight", (n * E, D), (a + (g,),),
                       lambda w, n=n: (_c(w.reshape(n, E, D).transpose(2, 0, 1)),),
                       lambda x, n=n: _c(x.transpose(1, 2, 0).reshape(n * E, D))))
    specs.append(_reshaped(f"layers.{{i}}.self_attn.{hf}.bias", (n * E,), a + (g + "_bias",),
                           (n, E), bias="qkv"))
  for hf, g, shape in (("gate_proj", "wi_gate", (F, D)), ("up_proj", "wi_up", (F, D)),
                       ("down_proj", "wo", (D, F))):
    specs.append(_transposed(f"layers.{{i}}.mlp.{hf}.weight", shape, m + (g,)))
    specs.append(_same(f"layers.{{i}}.mlp.{hf}.bias", shape[:1], m + (g + "_bias",), bias="mlp"))
  if not c.tie_embeddings:
    specs.append(_transposed("lm_head.weight", (V, D), ("head",), prefixed=False))
  return specs


def specs(arch: str, cfg: ModelConfig, biases: set[str]) -> list[Spec]:
  """The tensors of `arch` (Qwen2 and Mistral: Llama's) for `cfg`, keeping only the bias groups
  in `biases`."""
  out = _gpt2_specs(cfg) if arch == "gpt2" else _llama_specs(cfg)
  return [s for s in out if not s.bias or s.bias in biases]


def names(spec: Spec, prefix: str, n_layers: int) -> list[str]:
  """The HF tensor names `spec` stands for: one, or one per layer."""
  p = prefix if spec.prefixed else ""
  if "{i}" in spec.name:
    return [p + spec.name.format(i=i) for i in range(n_layers)]
  return [p + spec.name]


def held_biases(cfg: ModelConfig) -> set[str]:
  """The bias groups growlm parameters of `cfg` hold (growlm.model.decoder creates them)."""
  out = {"qkv"} if cfg.use_bias or cfg.qkv_bias else set()
  if cfg.use_bias:
    out |= {"attn", "mlp"} | ({"norm"} if cfg.norm == "layernorm" else set())
  return out


def hf_biases(arch: str, cfg: ModelConfig) -> set[str]:
  """The bias groups an `arch` checkpoint of `cfg` holds: GPT-2 all of them, Qwen2 qkv only,
  Mistral none, Llama q/k/v, o_proj and MLP ones iff use_bias (export writes both flags)."""
  if arch == "gpt2":
    return set(BIAS_GROUPS)
  if arch == "qwen2":
    return {"qkv"}
  return {"qkv", "attn", "mlp"} if arch == "llama" and cfg.use_bias else set()
