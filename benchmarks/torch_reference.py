"""A PyTorch reference trainer for growlm's GPT-2-style decoder, for throughput comparisons.

`benchmarks/throughput.py` reports growlm's training speed as a ratio to this reference, run on
the same machine, with the same model, batch and optimizer. It is plain PyTorch written for this
purpose (no transformers, nothing copied), and it computes the same function as growlm:

  model      `GPT(cfg)` from a growlm `ModelConfig` in gpt2 style: token embedding plus a learned
             position table, pre-norm residual blocks (LayerNorm with bias and `cfg.norm_eps`,
             causal attention with biases, GELU-tanh MLP with biases), a final LayerNorm and
             logits = h @ embed^T (tied). Attention has `n_heads` query heads of `head_dim`
             (independent of d_model / n_heads) and `n_kv_heads` key/value heads (GQA: query head
             h reads kv head h // (n_heads / n_kv_heads)), through
             `torch.nn.functional.scaled_dot_product_attention(is_causal=True)` (flash or
             memory-efficient kernels on GPU). q, k and v are one fused projection.
  weights    `load_growlm_params(model, params)` copies a growlm parameter tree (per-layer leaves
             stacked on a leading layers axis) into the model; the tests check both give the same
             logits to 1e-5, and the same losses and parameters after AdamW steps.
  loss       mean per-token cross-entropy, logits in float32 (growlm.train.loss).
  optimizer  torch.optim.AdamW (fused on CUDA, foreach on CPU) with growlm's defaults (lr 3e-3,
             b1 0.9, b2 0.95, eps 1e-8, weight decay 0.1, clipping at global norm 1.0). Decay
             applies to matrices and embedding tables, never to biases or LayerNorm parameters,
             as growlm.optim.decay_mask does. Both compute p -= lr * (m^ / (sqrt(v^) + eps) +
             wd * p) with the pre-step p. Clipping differs only by torch's 1e-6 added to the norm.
  step       forward + backward + clipping + optimizer, waited for (torch.cuda.synchronize),
             timed one by one after untimed warmup steps; tokens/sec uses the median, like
             benchmarks/throughput.py. The model is `torch.compile`d when asked and when that
             works (the failure is recorded and the run goes on eager otherwise).

Precision: parameters are float32; dtype='bfloat16' runs the forward under autocast (CUDA, or
CPU where allowed). On CUDA, float32 matmuls may use TF32 (`float32_matmul_precision='high'`, the
default here), as XLA's default precision does on GPU for growlm's einsums.

torch is optional: this module imports without it, and `available()` says why it cannot run.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from typing import Any, Mapping

import numpy as np

try:
  import torch
  import torch.nn.functional as F
  import torch.utils.checkpoint
  _IMPORT_ERROR = None
except Exception as e:  # pylint: disable=broad-except  # any failure to import means "no torch"
  torch = None
  F = None
  _IMPORT_ERROR = f"{type(e).__name__}: {e}"

# growlm's train defaults (growlm/config/defaults.py, `train` section; a test keeps them equal).
DEFAULTS = dict(lr=3e-3, b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=1.0)

# The gpt2 style, field by field: what this reference implements.
_REQUIRED = dict(norm="layernorm", positions="learned", mlp="gelu", use_bias=True,
                 tie_embeddings=True, dropout_rate=0.0, param_dtype="float32")

_Module = torch.nn.Module if torch is not None else object
# scaled_dot_product_attention(enable_gqa=True) exists from torch 2.5; before, kv heads repeat.
_HAS_ENABLE_GQA = torch is not None and torch.__version__ >= "2.5"


def available() -> str | None:
  """None when torch imports (the reference can run), else a message saying why not."""
  if torch is None:
    return f"torch is not importable ({_IMPORT_ERROR}); the PyTorch reference is skipped"
  return None


def _require_torch():
  reason = available()
  if reason is not None:
    raise RuntimeError(reason)


def check_config(cfg) -> None:
  """Raises ValueError naming the first field of `cfg` this reference does not implement.

  Fields that choose how growlm computes, not what (attention kernel, scan unrolling, loss
  chunking), are not read. `dtype` is not read either: train_throughput's `dtype` decides."""
  for name, want in _REQUIRED.items():
    got = getattr(cfg, name)
    if got != want:
      raise ValueError(f"torch reference: model config {name}={got!r} is not supported; "
                       f"accepted: {name}={want!r} (gpt2 style only)")
  _full_remat(cfg)


def _full_remat(cfg) -> bool:
  """Whether blocks are recomputed in the backward pass: only for growlm's remat 'full' (or
  True, the older boolean field). growlm's selective policies (auto, dots, dots_no_batch) are
  its own speed choices: the plain reference keeps its activations, as a plain trainer does."""
  return getattr(cfg, "remat", False) in (True, "full")


def _fan_in_init_(w, scale: float, fan_in: int):
  """growlm's variance_scaling(scale, 'fan_in', 'truncated_normal') for a torch weight."""
  std = (scale / fan_in) ** 0.5 / 0.87962566103423978  # std of a unit normal truncated at 2
  torch.nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


class Block(_Module):
  """Pre-norm residual block: x + attn(ln(x)), then x + mlp(ln(x))."""

  def __init__(self, cfg):
    super().__init__()
    D, H, K, E, F_ = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    self.n_heads, self.n_kv_heads, self.head_dim = H, K, E
    self.attn_norm = torch.nn.LayerNorm(D, eps=cfg.norm_eps)
    self.qkv = torch.nn.Linear(D, (H + 2 * K) * E)     # rows: q (H*E), k (K*E), v (K*E)
    self.out = torch.nn.Linear(H * E, D)
    self.mlp_norm = torch.nn.LayerNorm(D, eps=cfg.norm_eps)
    self.wi = torch.nn.Linear(D, F_)
    self.wo = torch.nn.Linear(F_, D)
    with torch.no_grad():
      _fan_in_init_(self.qkv.weight, 1.0, D)
      _fan_in_init_(self.out.weight, 1.0 / (2 * cfg.n_layers), H * E)
      _fan_in_init_(self.wi.weight, 1.0, D)
      _fan_in_init_(self.wo.weight, 1.0 / (2 * cfg.n_layers), F_)
      for lin in (self.qkv, self.out, self.wi, self.wo):
        lin.bias.zero_()

  def attention(self, x):
    B, L, _ = x.shape
    H, K, E = self.n_heads, self.n_kv_heads, self.head_dim
    q, k, v = self.qkv(x).split([H * E, K * E, K * E], dim=-1)
    q = q.view(B, L, H, E).transpose(1, 2)                 # [B, H, L, E]
    k = k.view(B, L, K, E).transpose(1, 2)                 # [B, K, L, E]
    v = v.view(B, L, K, E).transpose(1, 2)
    if K == H:
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    elif _HAS_ENABLE_GQA:
      # Query head h reads kv head h // (H / K), as growlm's [K, G] split of the query heads.
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    else:
      y = F.scaled_dot_product_attention(q, k.repeat_interleave(H // K, dim=1),
                                         v.repeat_interleave(H // K, dim=1), is_causal=True)
    return self.out(y.transpose(1, 2).reshape(B, L, H * E))

  def forward(self, x):
    x = x + self.attention(self.attn_norm(x))
    return x + self.wo(F.gelu(self.wi(self.mlp_norm(x)), approximate="tanh"))


class GPT(_Module):
  """growlm's gpt2-style decoder in PyTorch: tokens [B, L] -> float32 logits [B, L, V], or the
  mean cross-entropy when `targets` [B, L] is given (one graph for torch.compile)."""

  def __init__(self, cfg):
    _require_torch()
    check_config(cfg)
    super().__init__()
    self.cfg = cfg
    self.embed = torch.nn.Embedding(cfg.vocab_size, cfg.d_model)
    self.pos_embed = torch.nn.Parameter(torch.empty(cfg.max_len, cfg.d_model))
    self.blocks = torch.nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
    self.final_norm = torch.nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)
    self.remat = _full_remat(cfg)
    with torch.no_grad():
      torch.nn.init.normal_(self.embed.weight, std=cfg.init_std)
      torch.nn.init.normal_(self.pos_embed, std=cfg.init_std / 2)

  def forward(self, tokens, targets=None):
    L = tokens.shape[1]
    x = self.embed(tokens) + self.pos_embed[:L]
    for block in self.blocks:
      if self.remat and self.training:
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
      else:
        x = block(x)
    logits = F.linear(self.final_norm(x), self.embed.weight).float()   # tied output head
    if targets is None:
      return logits
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _leaf(params: Mapping[str, Any], path: str) -> np.ndarray:
  node: Any = params
  for key in path.split("/"):
    try:
      node = node[key]
    except (KeyError, TypeError):
      raise ValueError(f"growlm params: no leaf {path!r}") from None
  return np.asarray(node, dtype=np.float32)


def load_growlm_params(model, params: Mapping[str, Any]) -> None:
  """Copies a growlm parameter tree (growlm.model.init_params layout, numpy or jax arrays) into
  `model` (a GPT, or its torch.compile wrapper), in place. Shapes are checked leaf by leaf."""
  _require_torch()
  model = getattr(model, "_orig_mod", model)
  cfg = model.cfg
  N, D, H, K, E = cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim

  def get(path, shape):
    x = _leaf(params, path)
    if x.shape != tuple(shape):
      raise ValueError(f"growlm params: {path} has shape {x.shape}, the torch model needs "
                       f"{tuple(shape)}")
    return x

  def put(dst, x):
    x = np.array(x, dtype=np.float32, order="C")  # a writable copy: torch shares its memory
    dst.copy_(torch.from_numpy(x).to(dst.device, dst.dtype))

  layers = {name: get("layers/" + name, (N,) + shape) for name, shape in {
      "attn_norm/scale": (D,), "attn_norm/bias": (D,),
      "attn/query": (D, H, E), "attn/key": (D, K, E), "attn/value": (D, K, E),
      "attn/query_bias": (H, E), "attn/key_bias": (K, E), "attn/value_bias": (K, E),
      "attn/out": (H, E, D), "attn/out_bias": (D,),
      "mlp_norm/scale": (D,), "mlp_norm/bias": (D,),
      "mlp/wi": (D, cfg.mlp_dim), "mlp/wi_bias": (cfg.mlp_dim,),
      "mlp/wo": (cfg.mlp_dim, D), "mlp/wo_bias": (D,)}.items()}
  with torch.no_grad():
    put(model.embed.weight, get("embed", (cfg.vocab_size, D)))
    put(model.pos_embed, get("pos_embed", (cfg.max_len, D)))
    put(model.final_norm.weight, get("final_norm/scale", (D,)))
    put(model.final_norm.bias, get("final_norm/bias", (D,)))
    for i, b in enumerate(model.blocks):
      p = {name: x[i] for name, x in layers.items()}
      put(b.attn_norm.weight, p["attn_norm/scale"])
      put(b.attn_norm.bias, p["attn_norm/bias"])
      # growlm's [D, heads, E] -> torch's [out = heads * E, in = D], q then k then v.
      w = [p["attn/" + n].reshape(D, -1) for n in ("query", "key", "value")]
      put(b.qkv.weight, np.concatenate(w, axis=1).T)
      put(b.qkv.bias, np.concatenate([p[f"attn/{n}_bias"].reshape(-1)
                                      for n in ("query", "key", "value")]))
      put(b.out.weight, p["attn/out"].reshape(H * E, D).T)
      put(b.out.bias, p["attn/out_bias"])
      put(b.mlp_norm.weight, p["mlp_norm/scale"])
      put(b.mlp_norm.bias, p["mlp_norm/bias"])
      put(b.wi.weight, p["mlp/wi"].T)
      put(b.wi.bias, p["mlp/wi_bias"])
      put(b.wo.weight, p["mlp/wo"].T)
      put(b.wo.bias, p["mlp/wo_bias"])


def param_groups(model, weight_decay: float) -> list[dict]:
  """AdamW groups like growlm.optim.decay_mask: decay on matrices and the embedding tables
  (every parameter of rank >= 2), none on biases and LayerNorm gains and biases (rank 1)."""
  model = getattr(model, "_orig_mod", model)
  decay = [p for p in model.parameters() if p.ndim >= 2]
  no_decay = [p for p in model.parameters() if p.ndim < 2]
  return [{"params": decay, "weight_decay": weight_decay},
          {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model, *, lr: float, b1: float, b2: float, eps: float, weight_decay: float,
                   device: str):
  """torch.optim.AdamW over `param_groups`: fused kernels on CUDA, foreach on CPU."""
  kind = {"fused": True} if device == "cuda" else {"foreach": True}
  return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(b1, b2), eps=eps,
                           **kind)


def make_step(model, optimizer, inputs, targets, *, grad_clip: float, autocast_dtype=None):
  """A closure running one training step (forward, backward, clipping, AdamW) on the fixed
  batch; it returns the step's loss (a detached 0-d tensor, the loss before the update)."""
  device_type = inputs.device.type
  params = [p for g in optimizer.param_groups for p in g["params"]]

  def step():
    optimizer.zero_grad(set_to_none=True)
    ctx = (torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    with ctx:
      loss = model(inputs, targets)
    loss.backward()
    if grad_clip and grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    optimizer.step()
    return loss.detach()

  return step


def _one_line(e: BaseException, limit: int = 300) -> str:
  text = f"{type(e).__name__}: {e}".strip()
  first = text.splitlines()[0] if text else type(e).__name__
  return first if len(first) <= limit else first[:limit] + "..."


def prepare(cfg, tokens: np.ndarray, *, dtype: str = "float32", device: str = "cpu",
            compile: bool = True, lr: float = DEFAULTS["lr"], b1: float = DEFAULTS["b1"],
            b2: float = DEFAULTS["b2"], eps: float = DEFAULTS["eps"],
            weight_decay: float = DEFAULTS["weight_decay"],
            grad_clip: float = DEFAULTS["grad_clip"], params: Any = None, seed: int = 0,
            compile_mode: str | None = None):
  """(step, info): `step()` runs one training step on `tokens` [B, L+1] (inputs tokens[:, :-1],
  targets tokens[:, 1:]), waits for it and returns (loss tensor, seconds). The first step has
  already run (it compiles when `compile`): info holds first_step_seconds, compiled,
  compile_error and the first loss. Used by `train_throughput` and, step by step interleaved
  with growlm's, by benchmarks/throughput.py."""
  _require_torch()
  check_config(cfg)
  if dtype not in ("float32", "bfloat16"):
    raise ValueError(f"torch reference: dtype={dtype!r}; accepted: 'float32', 'bfloat16'")
  if device not in ("cpu", "cuda"):
    raise ValueError(f"torch reference: device={device!r}; accepted: 'cpu', 'cuda'")
  if device == "cuda" and not torch.cuda.is_available():
    raise ValueError("torch reference: device='cuda' but torch sees no CUDA device")
  tokens = np.asarray(tokens)
  if tokens.ndim != 2 or tokens.shape[1] < 2 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"torch reference: tokens must be an integer array [B, L+1], got "
                     f"{tokens.dtype}{list(tokens.shape)}")
  L = tokens.shape[1] - 1
  if L > cfg.max_len:
    raise ValueError(f"torch reference: seq_len {L} > model max_len {cfg.max_len}")
  cuda = device == "cuda"
  torch.manual_seed(seed)
  model = GPT(cfg)
  if params is not None:
    load_growlm_params(model, params)
  model.to(device).train()
  ids = torch.from_numpy(tokens.astype(np.int64)).to(device)
  inputs, targets = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
  autocast_dtype = torch.bfloat16 if dtype == "bfloat16" else None
  opt_kw = dict(lr=lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, device=device)
  sync = torch.cuda.synchronize if cuda else (lambda: None)

  def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0

  compiled, compile_error = False, None
  if compile:
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    optimizer = make_optimizer(model, **opt_kw)
    try:
      fast = torch.compile(model, mode=compile_mode)
      step = make_step(fast, optimizer, inputs, targets, grad_clip=grad_clip,
                       autocast_dtype=autocast_dtype)
      loss, first_s = timed(step)
      compiled = True
    except Exception as e:  # pylint: disable=broad-except  # any compiler failure: go eager
      compile_error = _one_line(e)
      print(f"torch reference: torch.compile failed, running eager: {compile_error}")
      torch._dynamo.reset()  # pylint: disable=protected-access
      model.load_state_dict(start)
  if not compiled:
    optimizer = make_optimizer(model, **opt_kw)
    step = make_step(model, optimizer, inputs, targets, grad_clip=grad_clip,
                     autocast_dtype=autocast_dtype)
    loss, first_s = timed(step)
  info = {"first_step_seconds": first_s, "compiled": compiled, "compile_error": compile_error,
          "first_loss": loss}
  return (lambda: timed(step)), info


def matmul_timer(n: int, dtype: str = "float32", device: str = "cpu"):
  """A function that times one torch [n, n] @ [n, n] in `dtype` on `device`, waited for, in
  seconds: the reference's own dense rate. Beside jax's rate for the same product it splits
  growlm / reference into the two libraries' kernels and what each step makes of them."""
  _require_torch()
  tdt = torch.bfloat16 if dtype == "bfloat16" else torch.float32
  gen = torch.Generator().manual_seed(0)
  a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=tdt) for _ in range(2))
  sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

  def time_one() -> float:
    t0 = time.perf_counter()
    torch.mm(a, b)
    sync()
    return time.perf_counter() - t0

  for _ in range(2):   # first touch of the buffers and the thread pool
    time_one()
  return time_one


def train_throughput(cfg, tokens: np.ndarray, *, steps: int, warmup: int,
                     dtype: str = "float32", device: str = "cpu", compile: bool = True,
                     lr: float = DEFAULTS["lr"], b1: float = DEFAULTS["b1"],
                     b2: float = DEFAULTS["b2"], eps: float = DEFAULTS["eps"],
                     weight_decay: float = DEFAULTS["weight_decay"],
                     grad_clip: float = DEFAULTS["grad_clip"], params: Any = None,
                     seed: int = 0, compile_mode: str | None = None,
                     float32_matmul_precision: str = "high") -> dict[str, Any]:
  """Training tokens/sec of the PyTorch reference on `tokens` [B, L+1] (inputs tokens[:, :-1],
  targets tokens[:, 1:]), with growlm's model and optimizer.

  One first step (which triggers compilation when `compile`), then `warmup` untimed steps, then
  `steps` timed steps, each waited for. Parameters are float32, initialised like growlm's (a
  torch draw from `seed`), or copied from the growlm tree `params` when given. dtype='bfloat16'
  runs the forward under autocast. `float32_matmul_precision` is applied on CUDA only (for the
  run, then restored). If torch.compile fails the run goes on eager: 'compiled' is False and
  'compile_error' says why (also printed, one line).

  Returns tokens_per_sec (B * L / median step seconds), step_seconds, median_step_seconds,
  compile_seconds (the first step's seconds when compiled, else 0.0), first_step_seconds,
  compiled, compile_error, peak_memory_bytes (CUDA allocator peak, None on CPU), final_loss,
  losses (every step's loss, first step included), torch, threads, device, device_name, dtype,
  batch, seq_len.
  """
  _require_torch()
  if steps <= 0 or warmup < 0:
    raise ValueError(f"torch reference: steps={steps}, warmup={warmup}; accepted: steps > 0, "
                     "warmup >= 0")
  cuda = device == "cuda"
  old_precision = torch.get_float32_matmul_precision()
  if cuda and torch.cuda.is_available():
    torch.set_float32_matmul_precision(float32_matmul_precision)
    torch.cuda.reset_peak_memory_stats()
  try:
    step, info = prepare(cfg, tokens, dtype=dtype, device=device, compile=compile, lr=lr, b1=b1,
                         b2=b2, eps=eps, weight_decay=weight_decay, grad_clip=grad_clip,
                         params=params, seed=seed, compile_mode=compile_mode)
    B, L = np.asarray(tokens).shape[0], np.asarray(tokens).shape[1] - 1
    first_s, compiled, compile_error = (info["first_step_seconds"], info["compiled"],
                                        info["compile_error"])
    losses = [info["first_loss"]]
    for _ in range(warmup):
      losses.append(step()[0])
    step_s = []
    for _ in range(steps):
      loss, s = step()
      losses.append(loss)
      step_s.append(s)
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
  finally:
    torch.set_float32_matmul_precision(old_precision)

  median = statistics.median(step_s)
  losses = [float(x) for x in losses]
  return {
      "tokens_per_sec": B * L / median,
      "step_seconds": step_s,
      "median_step_seconds": median,
      "compile_seconds": first_s if compiled else 0.0,
      "first_step_seconds": first_s,
      "compiled": compiled,
      "compile_error": compile_error,
      "peak_memory_bytes": peak,
      "final_loss": losses[-1],
      "losses": losses,
      "torch": torch.__version__,
      "threads": torch.get_num_threads(),
      "device": device,
      "device_name": torch.cuda.get_device_name() if cuda else "cpu",
      "dtype": dtype,
      "batch": B,
      "seq_len": L,
  }
