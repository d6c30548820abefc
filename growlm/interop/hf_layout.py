"""Hugging Face checkpoint layouts: config.json fields <-> ModelConfig, tensors <-> growlm leaves.

Pure descriptions (numpy only), read by growlm.hf to import and export directories.

Tensors (HF -> growlm leaf; D d_model, H heads, K kv heads, E head_dim, F mlp_dim, V vocab):
  GPT-2 Conv1D weights are stored (in, out): c_attn (D, 3HE) = [query | key | value], each
  -> [D, H, E]; attn.c_proj (HE, D) -> out [H, E, D]; c_fc (D, F) -> wi; mlp.c_proj (F, D) -> wo;
  wte (V, D) -> embed; wpe (T, D) -> pos_embed; lm_head (V, D) -> head [D, V] when untied.
  Llama nn.Linear weights are stored (out, in): q_proj (HE, D) -> query [D, H, E]; k/v_proj
  (KE, D) -> [D, K, E]; o_proj (D, HE) -> out [H, E, D]; gate/up_proj (F, D) -> wi_gate/wi_up
  [D, F]; down_proj (D, F) -> wo [F, D].
HF Llama's rotate_half and growlm both pair rotary dims (i, i + E/2), so q/k rows map unpermuted;
both put query head h on KV head h // (H / K).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np

from growlm.errors import GrowlmError
from growlm.model.config import ModelConfig

ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"),
                 "llama": ("LlamaForCausalLM", "LlamaModel")}
PREFIX = {"gpt2": "transformer.", "llama": "model."}
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")   # growlm's GELU is the tanh approximation

class Spec(NamedTuple):
  """One HF tensor and the growlm leaves it holds."""
  name: str                              # HF name after the model prefix; '{i}' is the layer
  shape: tuple[int, ...]                 # its HF shape
  paths: tuple[tuple[str, ...], ...]     # growlm leaves (one layer's slice when per-layer)
  to_growlm: Callable[[np.ndarray], tuple]
  to_hf: Callable[..., np.ndarray]
  bias: str = ""                         # attn | mlp | norm: a bias that use_bias governs
  prefixed: bool = True                  # lm_head sits outside the model prefix



def err(directory: str, msg: str) -> GrowlmError:
  """The one error type, prefixed with the directory."""
  return GrowlmError(f"Hugging Face directory {directory}: {msg}")


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
            lambda q, k, v: np.concatenate([x.reshape(H * E) for x in (q, k, v)]), bias="attn"),
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
                           (n, E), bias="attn"))
  for hf, g, shape in (("gate_proj", "wi_gate", (F, D)), ("up_proj", "wi_up", (F, D)),
                       ("down_proj", "wo", (D, F))):
    specs.append(_transposed(f"layers.{{i}}.mlp.{hf}.weight", shape, m + (g,)))
    specs.append(_same(f"layers.{{i}}.mlp.{hf}.bias", shape[:1], m + (g + "_bias",), bias="mlp"))
  if not c.tie_embeddings:
    specs.append(_transposed("lm_head.weight", (V, D), ("head",), prefixed=False))
  return specs


def specs(arch: str, cfg: ModelConfig, biases: set[str]) -> list[Spec]:
  """The tensors of `arch` for `cfg`, keeping only the bias groups in `biases`."""
  out = _gpt2_specs(cfg) if arch == "gpt2" else _llama_specs(cfg)
  return [s for s in out if not s.bias or s.bias in biases]


def names(spec: Spec, prefix: str, n_layers: int) -> list[str]:
  """The HF tensor names `spec` stands for: one, or one per layer."""
  p = prefix if spec.prefixed else ""
  if "{i}" in spec.name:
    return [p + spec.name.format(i=i) for i in range(n_layers)]
  return [p + spec.name]


# ------------------------------------------------------------------------------ config.json


def _get(directory, raw, kind, fields, default=None):
  """The first of `fields` present in config.json, checked to be `kind` (int | float | bool)."""
  name = next((n for n in fields if raw.get(n) is not None), None)
  if name is None:
    if default is None:
      raise err(directory, f"config.json has no {fields[0]}; accepted: a positive {kind}")
    return default
  v = raw[name]
  ok = {"int": isinstance(v, int) and not isinstance(v, bool) and v > 0,
        "float": isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0,
        "bool": isinstance(v, bool)}[kind]
  if not ok:
    accepted = "true or false" if kind == "bool" else f"a positive {kind}"
    raise err(directory, f"config.json {name}={v!r}; accepted: {accepted}")
  return v


def _arch(directory: str, raw: dict) -> str:
  model_type = raw.get("model_type")
  archs = raw.get("architectures") or []
  if model_type is None and archs:
    model_type = next((a for a, classes in ARCHITECTURES.items() if archs[0] in classes),
                      archs[0])
  if model_type not in ARCHITECTURES:
    raise err(directory, f"config.json model_type={model_type!r} is not supported; accepted: "
              f"{sorted(ARCHITECTURES)}")
  for a in archs:
    if a not in ARCHITECTURES[model_type]:
      raise err(directory, f"config.json architectures={archs!r}; accepted: "
                f"{list(ARCHITECTURES[model_type])}")
  return model_type


def _refuse(directory, raw, field, ok, accepted):
  if field in raw and not ok(raw[field]):
    raise err(directory, f"config.json {field}={raw[field]!r} is not supported; accepted: "
              f"{accepted}")


def _gpt2_fields(d: str, raw: dict) -> dict:
  _refuse(d, raw, "activation_function", lambda v: v in _GPT2_GELUS, list(_GPT2_GELUS))
  _refuse(d, raw, "scale_attn_weights", lambda v: v is True, "true")
  _refuse(d, raw, "scale_attn_by_inverse_layer_idx", lambda v: not v, "false")
  _refuse(d, raw, "add_cross_attention", lambda v: not v, "false")
  D = _get(d, raw, "int", ("n_embd", "hidden_size"))
  H = _get(d, raw, "int", ("n_head", "num_attention_heads"))
  if D % H:
    raise err(d, f"config.json n_embd={D} is not a multiple of n_head={H}")
  return dict(d_model=D, n_heads=H, n_kv_heads=H, head_dim=D // H,
              n_layers=_get(d, raw, "int", ("n_layer", "num_hidden_layers")),
              mlp_dim=_get(d, raw, "int", ("n_inner",), 4 * D),
              max_len=_get(d, raw, "int", ("n_positions", "max_position_embeddings")),
              norm="layernorm", norm_eps=_get(d, raw, "float", ("layer_norm_epsilon",), 1e-5),
              positions="learned", mlp="gelu", use_bias=True,
              tie_embeddings=_get(d, raw, "bool", ("tie_word_embeddings",), True))


def _rope_theta(d: str, raw: dict) -> float:
  """rope_theta from transformers 5's rope_parameters or the older top-level fields; any
  scaling variant is refused (growlm implements plain RoPE only)."""
  rope = raw.get("rope_parameters") or {}
  legacy = raw.get("rope_scaling") or {}
  for field, params in (("rope_parameters", rope), ("rope_scaling", legacy)):
    if not isinstance(params, dict):
      raise err(d, f"config.json {field}={params!r}; accepted: a mapping or null")
    kind = params.get("rope_type", params.get("type", "default"))
    if kind != "default":
      raise err(d, f"config.json {field}.rope_type={kind!r} is not supported; accepted: "
                "'default' (plain RoPE, no scaling)")
    extra = sorted(set(params) - {"rope_type", "type", "rope_theta"})
    if extra:
      raise err(d, f"config.json {field} has {extra}, which growlm does not implement; "
                "accepted: rope_type='default' and rope_theta only")
  src = rope if "rope_theta" in rope else raw
  return float(_get(d, src, "float", ("rope_theta",), 10000.0))


def _llama_fields(d: str, raw: dict) -> tuple[dict, set[str]]:
  _refuse(d, raw, "hidden_act", lambda v: v == "silu", "'silu'")
  for field in ("sliding_window", "use_sliding_window"):
    _refuse(d, raw, field, lambda v: not v, "null (no sliding-window attention)")
  _refuse(d, raw, "layer_types", lambda v: all(t == "full_attention" for t in v or ()),
          "'full_attention' layers only")
  D = _get(d, raw, "int", ("hidden_size",))
  H = _get(d, raw, "int", ("num_attention_heads",))
  biases = {g for g, f in (("attn", "attention_bias"), ("mlp", "mlp_bias"))
            if _get(d, raw, "bool", (f,), False)}
  if raw.get("head_dim") is None and D % H:
    raise err(d, f"config.json hidden_size={D} is not a multiple of num_attention_heads={H} "
              "and no head_dim is given")
  fields = dict(d_model=D, n_heads=H, n_kv_heads=_get(d, raw, "int", ("num_key_value_heads",), H),
                head_dim=_get(d, raw, "int", ("head_dim",), D // H or 1),
                n_layers=_get(d, raw, "int", ("num_hidden_layers",)),
                mlp_dim=_get(d, raw, "int", ("intermediate_size",)),
                max_len=_get(d, raw, "int", ("max_position_embeddings",), 2048),
                norm="rmsnorm", norm_eps=_get(d, raw, "float", ("rms_norm_eps",), 1e-6),
                positions="rope", rope_theta=_rope_theta(d, raw), mlp="swiglu",
                use_bias=bool(biases),
                tie_embeddings=_get(d, raw, "bool", ("tie_word_embeddings",), False))
  return fields, biases


def model_fields(directory: str, raw: dict) -> tuple[str, dict, set[str]]:
  """(arch, ModelConfig fields, bias groups the checkpoint holds) from a parsed config.json.
  Unknown architectures and options growlm does not implement raise GrowlmError."""
  arch = _arch(directory, raw)
  if arch == "gpt2":
    fields, biases = _gpt2_fields(directory, raw), {"attn", "mlp", "norm"}
  else:
    fields, biases = _llama_fields(directory, raw)
  fields["vocab_size"] = _get(directory, raw, "int", ("vocab_size",))
  fields["init_std"] = float(raw.get("initializer_range") or 0.02)
  return arch, fields, biases


# ------------------------------------------------------------------------------ export


def hf_architecture(cfg: ModelConfig) -> str:
  """'gpt2' when `cfg` is expressible as GPT-2, else 'llama'; GrowlmError naming the field
  when neither can express it."""
  if cfg.mlp == "gelu":
    checks = ((cfg.norm == "layernorm", f"norm={cfg.norm!r} (GPT-2 needs 'layernorm')"),
              (cfg.positions == "learned", f"positions={cfg.positions!r} (GPT-2 needs 'learned')"),
              (cfg.n_kv_heads == cfg.n_heads, f"n_kv_heads={cfg.n_kv_heads} (GPT-2 needs "
               f"n_kv_heads = n_heads = {cfg.n_heads})"),
              (cfg.head_dim * cfg.n_heads == cfg.d_model, f"head_dim={cfg.head_dim} (GPT-2 needs "
               f"head_dim = d_model / n_heads = {cfg.d_model}/{cfg.n_heads})"))
    other = "Llama needs mlp='swiglu'"
  else:
    checks = ((cfg.norm == "rmsnorm", f"norm={cfg.norm!r} (Llama needs 'rmsnorm')"),
              (cfg.positions == "rope", f"positions={cfg.positions!r} (Llama needs 'rope')"),
              (cfg.d_model % cfg.n_heads == 0, f"d_model={cfg.d_model} (Llama's config needs a "
               f"multiple of n_heads={cfg.n_heads})"))
    other = "GPT-2 needs mlp='gelu'"
  for ok, msg in checks:
    if not ok:
      raise GrowlmError(f"HF export: model.{msg}; {other}, so no Hugging Face architecture "
                        "computes this model")
  return "gpt2" if cfg.mlp == "gelu" else "llama"


def hf_config(cfg: ModelConfig, arch: str, *, token_ids: dict | None = None,
              dtype: str = "float32") -> dict:
  """The config.json transformers reads for `cfg` written as `arch` (the grown norm_eps too)."""
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                initializer_range=cfg.init_std, dtype=dtype, use_cache=True,
                **{k: (token_ids or {}).get(k) for k in TOKEN_ID_FIELDS})
  if arch == "gpt2":
    return dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", n_embd=cfg.d_model,
                n_layer=cfg.n_layers, n_head=cfg.n_heads, n_positions=cfg.max_len,
                n_inner=None if cfg.mlp_dim == 4 * cfg.d_model else cfg.mlp_dim,
                activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=0.0,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, add_cross_attention=False, **common)
  return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=cfg.d_model,
              intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_len,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,  # top-level: transformers 4
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias, attention_dropout=0.0,
              pretraining_tp=1, **common)

