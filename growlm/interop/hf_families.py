"""Hugging Face model families: config.json fields <-> ModelConfig, read on import, written on
export (the tensors each family holds are in growlm.interop.hf_layout).

  gpt2     LayerNorm, learned positions, GELU (tanh), biases everywhere.
  llama    RMSNorm, RoPE, SwiGLU, GQA; attention_bias (q/k/v and o_proj) and mlp_bias flags.
  qwen2    Llama's layout with biases on q/k/v only (growlm's qkv_bias), none on o_proj, the MLP
           or the norms.
  mistral  Llama's layout without biases, plus a sliding_window growlm does not implement, so
           it is accepted only where the window covers every position (_mistral_fields).

A family growlm cannot compute exactly is refused with one line naming the field; Qwen3 is
refused by name, since its per-head q/k RMSNorm has no growlm counterpart.
"""

from __future__ import annotations

from growlm.errors import GrowlmError
from growlm.model.config import ModelConfig

ARCHITECTURES = {"gpt2": ("GPT2LMHeadModel", "GPT2Model"),
                 "llama": ("LlamaForCausalLM", "LlamaModel"),
                 "qwen2": ("Qwen2ForCausalLM", "Qwen2Model"),
                 "mistral": ("MistralForCausalLM", "MistralModel")}
NAMES = {"gpt2": "GPT-2", "llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}
# Families transformers has that growlm knows it cannot compute, with the reason.
_REFUSED = {"qwen3": "growlm has no per-head RMSNorm of queries and keys (Qwen3's q_norm, k_norm)"}
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
_GPT2_GELUS = ("gelu_new", "gelu_pytorch_tanh")   # growlm's GELU is the tanh approximation


def err(directory: str, msg: str) -> GrowlmError:
  """The one error type, prefixed with the directory."""
  return GrowlmError(f"Hugging Face directory {directory}: {msg}")


# ------------------------------------------------------------------------------ import


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
    why = f": {_REFUSED[model_type]}" if model_type in _REFUSED else ""
    raise err(directory, f"config.json model_type={model_type!r} is not supported{why}; "
              f"accepted: {sorted(ARCHITECTURES)}")
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


def _llama_like_fields(d: str, raw: dict, max_len_default: int) -> dict:
  """The fields Llama, Qwen2 and Mistral share (their biases and windows are the callers')."""
  _refuse(d, raw, "hidden_act", lambda v: v == "silu", "'silu'")
  _refuse(d, raw, "layer_types", lambda v: all(t == "full_attention" for t in v or ()),
          "'full_attention' layers only")
  D = _get(d, raw, "int", ("hidden_size",))
  H = _get(d, raw, "int", ("num_attention_heads",))
  if raw.get("head_dim") is None and D % H:
    raise err(d, f"config.json hidden_size={D} is not a multiple of num_attention_heads={H} "
              "and no head_dim is given")
  return dict(d_model=D, n_heads=H, n_kv_heads=_get(d, raw, "int", ("num_key_value_heads",), H),
              head_dim=_get(d, raw, "int", ("head_dim",), D // H or 1),
              n_layers=_get(d, raw, "int", ("num_hidden_layers",)),
              mlp_dim=_get(d, raw, "int", ("intermediate_size",)),
              max_len=_get(d, raw, "int", ("max_position_embeddings",), max_len_default),
              norm="rmsnorm", norm_eps=_get(d, raw, "float", ("rms_norm_eps",), 1e-6),
              positions="rope", rope_theta=_rope_theta(d, raw), mlp="swiglu",
              tie_embeddings=_get(d, raw, "bool", ("tie_word_embeddings",), False))


def _llama_fields(d: str, raw: dict) -> tuple[dict, set[str]]:
  for field in ("sliding_window", "use_sliding_window"):
    _refuse(d, raw, field, lambda v: not v, "null (no sliding-window attention)")
  biases = set()
  if _get(d, raw, "bool", ("attention_bias",), False):
    biases |= {"qkv", "attn"}
  if _get(d, raw, "bool", ("mlp_bias",), False):
    biases.add("mlp")
  return _llama_like_fields(d, raw, 2048), biases


def _qwen2_fields(d: str, raw: dict) -> tuple[dict, set[str]]:
  """Qwen2 always has q/k/v biases. Its configs store a sliding_window that transformers reads
  only when use_sliding_window is true (then layers from max_window_layers on slide): growlm has
  no sliding-window attention, so that is refused and sliding_window is otherwise ignored."""
  _refuse(d, raw, "use_sliding_window", lambda v: not v,
          "false (growlm has no sliding-window attention)")
  return _llama_like_fields(d, raw, 32768), {"qkv"}


def _mistral_fields(d: str, raw: dict) -> tuple[dict, set[str]]:
  """Mistral attends over the last `sliding_window` positions; growlm has no sliding-window
  attention. A window of at least the sequence length is exactly full causal attention, so a
  null window, or one >= max_position_embeddings, is accepted (max_len = max_position_embeddings).
  A smaller window is refused rather than capping max_len at it: growlm's RoPE models run past
  max_len (only learned positions enforce it), where they would silently compute full attention
  instead of the window."""
  fields = _llama_like_fields(d, raw, 4096 * 32)
  window = raw.get("sliding_window")
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
      raise err(d, f"config.json sliding_window={window!r}; accepted: a positive int or null")
    if window < fields["max_len"]:
      raise err(d, f"config.json sliding_window={window} < max_position_embeddings="
                f"{fields['max_len']}: growlm has no sliding-window attention; accepted: "
                "sliding_window null or >= max_position_embeddings (lower max_position_embeddings "
                f"to {window} to use the model as full attention up to {window} tokens)")
  return fields, set()


def model_fields(directory: str, raw: dict) -> tuple[str, dict, set[str]]:
  """(arch, ModelConfig fields, bias groups the checkpoint holds: hf_layout.BIAS_GROUPS) from a
  parsed config.json. Unknown families and options growlm does not implement raise GrowlmError."""
  arch = _arch(directory, raw)
  if arch == "gpt2":
    fields, biases = _gpt2_fields(directory, raw), {"qkv", "attn", "mlp", "norm"}
  else:
    read = {"llama": _llama_fields, "qwen2": _qwen2_fields, "mistral": _mistral_fields}[arch]
    fields, biases = read(directory, raw)
    # One use_bias flag: a Llama with attention_bias or mlp_bias alone gets zeros for the rest.
    fields["use_bias"] = bool(biases - {"qkv"})
    fields["qkv_bias"] = biases == {"qkv"}
  fields["vocab_size"] = _get(directory, raw, "int", ("vocab_size",))
  fields["init_std"] = float(raw.get("initializer_range") or 0.02)
  return arch, fields, biases


# ------------------------------------------------------------------------------ export


def _checks(cfg: ModelConfig, arch: str) -> list[tuple[bool, str]]:
  """(holds, what fails) for each condition `arch` needs to compute `cfg` exactly."""
  name = NAMES[arch]
  if arch == "gpt2":
    return [(cfg.mlp == "gelu", f"mlp={cfg.mlp!r} (GPT-2 needs 'gelu')"),
            (cfg.norm == "layernorm", f"norm={cfg.norm!r} (GPT-2 needs 'layernorm')"),
            (cfg.positions == "learned", f"positions={cfg.positions!r} (GPT-2 needs 'learned')"),
            (cfg.n_kv_heads == cfg.n_heads, f"n_kv_heads={cfg.n_kv_heads} (GPT-2 needs "
             f"n_kv_heads = n_heads = {cfg.n_heads})"),
            (cfg.head_dim * cfg.n_heads == cfg.d_model, f"head_dim={cfg.head_dim} (GPT-2 needs "
             f"head_dim = d_model / n_heads = {cfg.d_model}/{cfg.n_heads})")]
  out = [(cfg.mlp == "swiglu", f"mlp={cfg.mlp!r} ({name} needs 'swiglu')"),
         (cfg.norm == "rmsnorm", f"norm={cfg.norm!r} ({name} needs 'rmsnorm')"),
         (cfg.positions == "rope", f"positions={cfg.positions!r} ({name} needs 'rope')"),
         (cfg.d_model % cfg.n_heads == 0, f"d_model={cfg.d_model} ({name}'s config needs a "
          f"multiple of n_heads={cfg.n_heads})")]
  if arch == "llama":
    out.append((cfg.use_bias or not cfg.qkv_bias, "qkv_bias=True without use_bias (Llama's "
                "attention_bias biases o_proj too; Qwen2 has q/k/v biases only)"))
  else:
    out.append((not cfg.use_bias, f"use_bias=True ({name} has no o_proj or MLP biases)"))
  if arch == "mistral":
    out.append((not cfg.qkv_bias, "qkv_bias=True (Mistral has no biases)"))
  return out


def hf_architecture(cfg: ModelConfig, arch: str | None = None) -> str:
  """The family export writes `cfg` as: `arch` when given, else 'gpt2' (GELU), 'qwen2' (q/k/v
  biases only) or 'llama'. GrowlmError naming the field when that family cannot express it.

  Mistral is written only when asked (arch='mistral', e.g. the `arch` of an imported Mistral):
  without a sliding window it computes what Llama computes, and every tool loads Llama."""
  if arch is not None:
    if arch not in ARCHITECTURES:
      raise GrowlmError(f"HF export arch={arch!r}; accepted: {sorted(ARCHITECTURES)}")
    failed = [msg for ok, msg in _checks(cfg, arch) if not ok]
    if failed:
      can = [a for a in ARCHITECTURES if all(ok for ok, _ in _checks(cfg, a))]
      raise GrowlmError(f"HF export as {arch}: model.{failed[0]}; accepted for this model: "
                        f"{can or 'none'}")
    return arch
  if cfg.mlp == "gelu":
    arch, other = "gpt2", "Llama needs mlp='swiglu'"
  else:
    arch = "qwen2" if cfg.qkv_bias and not cfg.use_bias else "llama"
    other = "GPT-2 needs mlp='gelu'"
  for ok, msg in _checks(cfg, arch):
    if not ok:
      raise GrowlmError(f"HF export: model.{msg}; {other}, so no Hugging Face architecture "
                        "computes this model")
  return arch


def hf_config(cfg: ModelConfig, arch: str, *, token_ids: dict | None = None,
              dtype: str = "float32") -> dict:
  """The config.json transformers reads for `cfg` written as `arch` (the grown norm_eps too).
  Qwen2 and Mistral are written without a sliding window: growlm computes full attention."""
  common = dict(vocab_size=cfg.vocab_size, tie_word_embeddings=cfg.tie_embeddings,
                initializer_range=cfg.init_std, dtype=dtype, use_cache=True,
                architectures=[ARCHITECTURES[arch][0]], model_type=arch,
                **{k: (token_ids or {}).get(k) for k in TOKEN_ID_FIELDS})
  if arch == "gpt2":
    return dict(n_embd=cfg.d_model,
                n_layer=cfg.n_layers, n_head=cfg.n_heads, n_positions=cfg.max_len,
                n_inner=None if cfg.mlp_dim == 4 * cfg.d_model else cfg.mlp_dim,
                activation_function="gelu_new", layer_norm_epsilon=cfg.norm_eps,
                resid_pdrop=cfg.dropout_rate, embd_pdrop=cfg.dropout_rate, attn_pdrop=0.0,
                scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                reorder_and_upcast_attn=False, add_cross_attention=False, **common)
  family = {"llama": dict(attention_bias=cfg.use_bias, mlp_bias=cfg.use_bias, pretraining_tp=1),
            "qwen2": dict(use_sliding_window=False, sliding_window=None,
                          max_window_layers=cfg.n_layers),
            "mistral": dict(sliding_window=None)}[arch]
  return dict(hidden_size=cfg.d_model,
              intermediate_size=cfg.mlp_dim, num_hidden_layers=cfg.n_layers,
              num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads,
              head_dim=cfg.head_dim, hidden_act="silu", max_position_embeddings=cfg.max_len,
              rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,  # top-level: transformers 4
              rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
              attention_dropout=0.0, **family, **common)
