"""Generation: the decoder's parameters run with a key/value cache, jitted, and token sampling.

`forward(cfg, params, cache, tokens_BxL, pos0)` runs L new tokens at positions pos0 ..
pos0 + L - 1 and returns their logits and the cache with their keys and values written in: the
same function as `decoder.apply` on the whole sequence (tests/test_sample.py checks the logits
step by step), computed with the decoder's own Norm and Mlp modules and attention projections
(`attention_inputs`, `attention_output`), and `attention.cached` over the cache. `generate`
prefills the prompt in one call and then decodes one token per step inside a `lax.scan`, all
under one jit.

Sampling (`sample_logits`): temperature 0 is greedy (argmax); otherwise logits / temperature,
optionally restricted to the top_k largest and to the smallest set whose probability reaches
top_p (nucleus), then a categorical draw.

Extra shape letters: P prompt length, T cache slots (P + new tokens), N layers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from growlm.errors import GrowlmError
from growlm.model import attention
from growlm.model.config import ModelConfig
from growlm.model.decoder import Mlp, Norm, attention_inputs, attention_output

Array = jax.Array


def init_cache(cfg: ModelConfig, batch: int, slots: int) -> dict:
  """Zero keys and values, [N, B, T, K, E] each, in the compute dtype."""
  shape = (cfg.n_layers, batch, slots, cfg.n_kv_heads, cfg.head_dim)
  return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype)}


def _attention(cfg: ModelConfig, p: dict, x_BxLxD: Array, k_BxTxKxE: Array, v_BxTxKxE: Array,
               positions_L: Array) -> tuple[Array, Array, Array]:
  """One layer's attention on new tokens; returns (output, updated k cache, updated v cache)."""
  q_BxLxHxE, k_BxLxKxE, v_BxLxKxE = attention_inputs(cfg, p, x_BxLxD, positions_L)
  start = (0, positions_L[0], 0, 0)
  k_BxTxKxE = jax.lax.dynamic_update_slice(k_BxTxKxE, k_BxLxKxE.astype(k_BxTxKxE.dtype), start)
  v_BxTxKxE = jax.lax.dynamic_update_slice(v_BxTxKxE, v_BxLxKxE.astype(v_BxTxKxE.dtype), start)
  ctx_BxLxHxE = attention.cached(q_BxLxHxE, k_BxTxKxE, v_BxTxKxE, positions_L)
  return attention_output(cfg, p, ctx_BxLxHxE), k_BxTxKxE, v_BxTxKxE


def forward(cfg: ModelConfig, params: dict, cache: dict, tokens_BxL: Array, pos0
            ) -> tuple[Array, dict]:
  """Logits [B, L, V] (>= float32) of L new tokens at positions pos0.., and the updated cache."""
  dt = jnp.dtype(cfg.dtype)
  L = tokens_BxL.shape[1]
  positions_L = pos0 + jnp.arange(L)
  x_BxLxD = jnp.take(params["embed"], tokens_BxL, axis=0).astype(dt)
  if cfg.positions == "learned":
    pos_LxD = jax.lax.dynamic_slice(params["pos_embed"], (pos0, 0), (L, cfg.d_model))
    x_BxLxD = x_BxLxD + pos_LxD.astype(dt)
  norm, mlp = Norm(cfg), Mlp(cfg)

  def layer(x, xs):
    p, k, v = xs
    h = norm.apply({"params": p["attn_norm"]}, x)
    a, k, v = _attention(cfg, p["attn"], h, k, v, positions_L)
    x = x + a
    x = x + mlp.apply({"params": p["mlp"]}, norm.apply({"params": p["mlp_norm"]}, x))
    return x, (k, v)

  x_BxLxD, (k, v) = jax.lax.scan(layer, x_BxLxD, (params["layers"], cache["k"], cache["v"]))
  x_BxLxD = norm.apply({"params": params["final_norm"]}, x_BxLxD)
  out_DxV = (params["embed"].T if cfg.tie_embeddings else params["head"]).astype(dt)
  acc = jnp.promote_types(dt, jnp.float32)
  logits = jnp.einsum("bld,dv->blv", x_BxLxD, out_DxV, preferred_element_type=acc)
  return logits.astype(acc), {"k": k, "v": v}


def sample_logits(logits_BxV: Array, rng: Array, temperature: float = 0.0, top_k: int = 0,
                  top_p: float = 1.0) -> Array:
  """Next tokens [B] (int32): greedy at temperature 0, else a draw after top-k/top-p filtering."""
  if temperature == 0.0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits = logits_BxV.astype(jnp.float32) / temperature
  low = jnp.finfo(jnp.float32).min
  if top_k:
    kth_B1 = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_B1, low, logits)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs, axis=-1) - probs       # mass of the tokens ranked above
    kept = jnp.where(before_BxV < top_p, sorted_BxV, jnp.inf)
    cutoff_B1 = jnp.min(kept, axis=-1, keepdims=True)     # the smallest logit still kept
    logits = jnp.where(logits < cutoff_B1, low, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def check_request(cfg: ModelConfig, prompt_len: int, max_new_tokens: int, temperature: float,
                  top_k: int, top_p: float) -> None:
  """Refuses a request the model or the sampler cannot serve, in one line."""
  if prompt_len < 1:
    raise GrowlmError("the prompt encodes to no tokens; accepted: a non-empty prompt")
  if max_new_tokens < 1:
    raise GrowlmError(f"max_new_tokens={max_new_tokens}; accepted: an int >= 1")
  if cfg.positions == "learned" and prompt_len + max_new_tokens > cfg.max_len:
    raise GrowlmError(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                      f"the model's max_len={cfg.max_len} (learned positions); accepted: at "
                      f"most {cfg.max_len} tokens in all")
  if not temperature >= 0.0:
    raise GrowlmError(f"temperature={temperature}; accepted: >= 0 (0 is greedy)")
  if top_k < 0 or top_k > cfg.vocab_size:
    raise GrowlmError(f"top_k={top_k}; accepted: 0 (off) to vocab_size={cfg.vocab_size}")
  if not 0.0 < top_p <= 1.0:
    raise GrowlmError(f"top_p={top_p}; accepted: 0 < top_p <= 1 (1 is off)")


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p"))
def generate(cfg: ModelConfig, params: dict, prompt_BxP: Array, rng: Array, *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0) -> Array:
  """The next `max_new_tokens` tokens [B, max_new_tokens] after each prompt row (all rows the
  same length P): the prompt in one prefill call, then one cached step per token."""
  B, P = prompt_BxP.shape
  cache = init_cache(cfg, B, P + max_new_tokens)
  logits_BxPxV, cache = forward(cfg, params, cache, prompt_BxP, 0)
  keys = jax.random.split(rng, max_new_tokens)
  first_B = sample_logits(logits_BxPxV[:, -1], keys[0], temperature, top_k, top_p)

  def step(carry, xs):
    token_B, cache = carry
    i, key = xs
    logits_Bx1xV, cache = forward(cfg, params, cache, token_B[:, None], P + i)
    nxt_B = sample_logits(logits_Bx1xV[:, 0], key, temperature, top_k, top_p)
    return (nxt_B, cache), nxt_B

  _, rest_NxB = jax.lax.scan(step, (first_B, cache),
                             (jnp.arange(max_new_tokens - 1), keys[1:]))
  return jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)
