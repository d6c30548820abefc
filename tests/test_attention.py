"""model.attention: every implementation that runs on CPU equals the naive reference, and the
choice of kernel per platform, dtype and shape (auto included) is the documented one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import all_eqns
from growlm.errors import GrowlmError
from growlm.grow import GrowthPlan, grow, is_exact
from growlm.model import attention
from growlm.model import decoder as model
from growlm.model.config import make_model_config


def _case(style, kv_heads):
  cfg = make_model_config("nano", style, n_heads=4, n_kv_heads=kv_heads, head_dim=16,
                          max_len=24)
  params = model.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (3, 24), 0, cfg.vocab_size)
  return cfg, params, tokens


@pytest.mark.parametrize("impl,style,kv_heads", [("xla", "gpt2", 4), ("blocked", "gpt2", 1),
                                                 ("xla", "llama", 2), ("blocked", "llama", 2),
                                                 ("auto", "llama", 4)])
def test_cpu_implementations_equal_naive(impl, style, kv_heads):
  """Logits and gradients (float32), learned and rotary positions, MHA, GQA and MQA."""
  cfg, params, tokens = _case(style, kv_heads)
  @functools.partial(jax.jit, static_argnums=0)   # one compile, not an op-by-op dispatch
  def run(c, params):
    f = lambda p: jnp.square(model.apply(c, p, tokens)).mean()
    return model.apply(c, params, tokens), jax.grad(f)(params)
  ref_logits, ref_grads = run(cfg.replace(attention="naive"), params)
  logits, grads = run(cfg.replace(attention=impl), params)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=0, atol=1e-5)
  # Against the largest gradient entry: a key bias's exact gradient is zero (softmax ignores a
  # per-query constant), so its entries are rounding noise on either side.
  scale = max(float(jnp.abs(b).max()) for b in jax.tree.leaves(ref_grads))
  for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)


def test_naive_is_causal_softmax_attention():
  """The reference itself, against a per-head float64 loop over positions."""
  B, L, H, K, E = 2, 5, 4, 2, 8
  q, k, v = (np.asarray(jax.random.normal(jax.random.key(i), (B, L, n, E)), np.float64)
             for i, n in ((0, H), (1, K), (2, K)))
  got = np.asarray(attention.naive(*(jnp.asarray(x, jnp.float32) for x in (q, k, v))))
  want = np.zeros((B, L, H, E))
  for b in range(B):
    for h in range(H):
      for l in range(L):
        s = q[b, l, h] @ k[b, : l + 1, h // 2].T / np.sqrt(E)
        w = np.exp(s - s.max())
        want[b, l, h] = (w / w.sum()) @ v[b, : l + 1, h // 2]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("platform,dtype,head_dim,seq_len,want", [
    ("cpu", "float32", 64, 256, "blocked"),
    ("cpu", "bfloat16", 64, 64, "blocked"),
    ("cpu", "float32", 64, 30, "xla"),         # 30 does not split into 4 blocks
    ("cpu", "float32", 64, 60, "xla"),         # blocks of 15 positions are not worth it
    ("gpu", "bfloat16", 64, 1024, "cudnn"),
    ("gpu", "float16", 128, 100, "cudnn"),
    ("gpu", "float32", 64, 1024, "xla"),       # cuDNN flash attention is half precision only
    ("gpu", "bfloat16", 256, 1024, "xla"),     # head_dim beyond what auto trusts to cuDNN
    ("gpu", "bfloat16", 36, 1024, "xla"),      # head_dim not a multiple of 8
    ("tpu", "bfloat16", 64, 1024, "splash"),
    ("tpu", "float32", 128, 512, "splash"),
    ("tpu", "bfloat16", 64, 100, "xla"),       # splash needs seq_len % 128 == 0
])
def test_auto_picks_the_documented_kernel(platform, dtype, head_dim, seq_len, want):
  assert attention.choose("auto", dtype, head_dim, seq_len, platform) == want


@pytest.mark.parametrize("impl,platform,dtype,seq_len,needs", [
    ("cudnn", "cpu", "bfloat16", 256, "needs an NVIDIA GPU"),
    ("cudnn", "gpu", "float32", 256, "bfloat16 or float16"),
    ("splash", "cpu", "float32", 256, "needs a TPU"),
    ("splash", "tpu", "float32", 200, "multiple of 128"),
    ("blocked", "cpu", "float32", 30, "multiple of 4"),
    ("flash", "cpu", "float32", 256, "accepted"),
])
def test_impossible_choice_is_one_clear_line(impl, platform, dtype, seq_len, needs):
  with pytest.raises(GrowlmError, match=needs) as e:
    attention.choose(impl, dtype, 64, seq_len, platform)
  assert "\n" not in str(e.value)


def test_explicit_choices_pass_through_where_they_run():
  assert attention.choose("naive", "float32", 64, 7, "tpu") == "naive"
  assert attention.choose("blocked", "bfloat16", 64, 1024, "gpu") == "blocked"
  assert attention.choose("xla", "bfloat16", 64, 1024, "gpu") == "xla"
  assert attention.choose("cudnn", "bfloat16", 64, 1024, "gpu") == "cudnn"
  assert attention.choose("splash", "bfloat16", 64, 1024, "tpu") == "splash"


def test_cudnn_on_cpu_fails_at_trace_time_with_the_config_line():
  cfg, params, tokens = _case("gpt2", 4)
  with pytest.raises(GrowlmError, match="model.attention='cudnn'"):
    model.apply(cfg.replace(attention="cudnn"), params, tokens)


def test_exact_growth_holds_with_the_default_attention():
  """tile + identity with attention='auto' (the default): the grown model computes the source's
  logits, as it does with the naive reference. (Every other growth test runs the default too.)"""
  src = make_model_config("nano", "llama", max_len=32)
  assert src.attention == "auto"
  dst = src.replace(d_model=128, n_layers=4, n_heads=4, mlp_dim=src.mlp_dim * 2,
                    n_kv_heads=src.n_kv_heads * 2)
  plan = GrowthPlan("tile", "identity", require_exact=True)
  assert is_exact(src, dst, plan)
  params = model.init_params(src, jax.random.key(3))
  grown = grow(params, src, dst, plan, jax.random.key(4))
  tokens = jax.random.randint(jax.random.key(5), (2, 32), 0, src.vocab_size)
  apply = jax.jit(model.apply, static_argnums=0)
  for impl in ("auto", "naive"):
    a = apply(src.replace(attention=impl), params, tokens)
    b = apply(grown.config.replace(attention=impl), grown.params, tokens)
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=2e-5)


@pytest.mark.parametrize("remat,kept", [("dots_no_batch", True), ("dots", True),
                                        ("full", False)])
def test_blocked_backward_reads_the_kept_output_under_remat(remat, kept):
  """`blocked` writes its gradient out (flash attention's backward, from the saved log-sum-exp);
  under the dots policies its output and log-sum-exp are kept for it (attention.SAVED_NAMES), so
  the backward pass runs no exp over the forward's scores a second time; `full` keeps nothing
  and recomputes them. Its gradient is checked against naive's in the tests above."""
  cfg = make_model_config("nano", "gpt2", max_len=64, attention="blocked", remat=remat)
  params = model.init_params(cfg, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
  loss = lambda p: jnp.square(model.apply(cfg, p, tokens)).mean()
  # Forward: one exp per query block; backward: one more (p from the log-sum-exp); a rerun
  # of the forward would add another.
  exps = sum(eqn.primitive.name == "exp" and eqn.outvars[0].aval.ndim == 5
             for eqn in all_eqns(jax.make_jaxpr(jax.grad(loss))(params).jaxpr))
  per_block = exps // attention.BLOCKS
  assert per_block == (2 if kept else 3), per_block


@pytest.mark.parametrize("impl,platform,forward", [
    ("splash", "tpu", "pallas_call"), ("cudnn", "gpu", "dot_product_attention_fwd_wrapper")])
def test_fused_kernels_forward_is_kept_under_remat(impl, platform, forward, monkeypatch):
  """cuDNN's and splash's backward read what their forward computed (the context and the
  softmax statistics); under the dots policies those outputs are kept (attention.KERNEL_FORWARDS),
  so a grad of the model traces the kernel's forward as often as with no remat at all, where
  `full` traces it once more (the forward rerun in the backward pass). Traced, not run: the
  platform is set by hand, and jax's cuDNN checks of the GPU are stood in for."""
  monkeypatch.setattr(attention, "_platform", lambda: platform)
  if impl == "cudnn":
    # pylint: disable-next=g-import-not-at-top
    from jax._src.cudnn import fused_attention_stablehlo as fa
    monkeypatch.setattr(fa, "check_cudnn_version", lambda: 91000, raising=False)
    monkeypatch.setattr(fa, "check_compute_capability", lambda c: True, raising=False)
    monkeypatch.setattr(fa, "is_cuda_compute_capability_equal", lambda c: False, raising=False)
  base = make_model_config("nano", "gpt2", max_len=128, dtype="bfloat16", attention="xla")
  params = model.init_params(base, jax.random.key(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, base.vocab_size)
  calls = {}
  for remat in ("none", "full", "dots", "dots_no_batch"):
    cfg = base.replace(attention=impl, remat=remat)
    loss = lambda p, cfg=cfg: jnp.square(model.apply(cfg, p, tokens).astype(jnp.float32)).mean()
    jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
    calls[remat] = sum(eqn.primitive.name == forward for eqn in all_eqns(jaxpr))
  assert calls["none"] >= 1, calls
  assert calls["dots"] == calls["dots_no_batch"] == calls["none"], calls
  assert calls["full"] == calls["none"] + 1, calls
