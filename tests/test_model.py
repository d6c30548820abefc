"""The decoder: causality, both styles, GQA, scan vs loop, RoPE, FLOPs accounting, validation."""

import math

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.ad_checkpoint import checkpoint_name

from conftest import all_eqns
from growlm import trees
from growlm import sharding
from growlm.model import activations, attention, flops, prng, speed
from growlm.model import decoder as model
from growlm.errors import GrowlmError
from growlm.model.config import ModelConfig, make_model_config

STYLES = ("gpt2", "llama")


def _tokens(cfg, B=2, L=16, seed=1):
  return jax.random.randint(jax.random.key(seed), (B, L), 0, cfg.vocab_size)


@pytest.mark.parametrize("style", STYLES)
def test_causality(style):
  """Changing token t changes no logits before t, and does change logits at t."""
  cfg = make_model_config("nano", style)
  params = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  t = 9
  changed = tokens.at[:, t].set((tokens[:, t] + 7) % cfg.vocab_size)
  a, b = model.apply(cfg, params, tokens), model.apply(cfg, params, changed)
  np.testing.assert_array_equal(np.asarray(a[:, :t]), np.asarray(b[:, :t]))
  assert float(jnp.abs(a[:, t:] - b[:, t:]).max()) > 1e-6


@pytest.mark.parametrize("style", STYLES)
def test_forward_both_styles(style):
  cfg = make_model_config("nano", style)
  params = model.init_params(cfg, jax.random.key(0))
  logits = model.apply(cfg, params, _tokens(cfg))
  assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
  assert bool(jnp.isfinite(logits).all())
  # A freshly initialised model is near uniform over the vocabulary.
  logp = jax.nn.log_softmax(logits)
  assert abs(float(-logp.mean()) - math.log(cfg.vocab_size)) < 0.3
  # The style decides the parameter tree.
  has = lambda *path: _get(params, path) is not None
  if style == "gpt2":
    assert has("pos_embed") and has("final_norm", "bias") and not has("head")
    assert has("layers", "mlp", "wi") and has("layers", "attn", "query_bias")
  else:
    assert has("head") and not has("pos_embed") and not has("final_norm", "bias")
    assert has("layers", "mlp", "wi_gate") and not has("layers", "attn", "query_bias")
    assert cfg.n_kv_heads < cfg.n_heads


def _get(tree, path):
  for k in path:
    if not isinstance(tree, dict) or k not in tree:
      return None
    tree = tree[k]
  return tree


def test_jit_matches_eager():
  cfg = make_model_config("nano", "llama")
  params = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  eager = model.apply(cfg, params, tokens)
  jitted = jax.jit(lambda p, t: model.apply(cfg, p, t))(params, tokens)
  np.testing.assert_allclose(np.asarray(eager), np.asarray(jitted), rtol=1e-5, atol=1e-5)


def _reference_attention(cfg, p, x):
  """Plain per-head attention in numpy (float64), for the model's attention block."""
  x = np.asarray(x, np.float64)
  B, L, _ = x.shape
  G = cfg.n_heads // cfg.n_kv_heads
  out = np.zeros_like(x)
  for h in range(cfg.n_heads):
    q = x @ np.asarray(p["query"][:, h], np.float64)
    k = x @ np.asarray(p["key"][:, h // G], np.float64)
    v = x @ np.asarray(p["value"][:, h // G], np.float64)
    s = q @ k.transpose(0, 2, 1) / math.sqrt(cfg.head_dim)
    s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    out += (w @ v) @ np.asarray(p["out"][h], np.float64)
  return out


@pytest.mark.parametrize("kv", [1, 2, 4])
def test_attention_matches_per_head_reference(kv):
  cfg = make_model_config("nano", "gpt2", n_heads=4, n_kv_heads=kv, use_bias=False)
  attn = model.Attention(cfg)
  x = jax.random.normal(jax.random.key(2), (2, 12, cfg.d_model))
  p = attn.init(jax.random.key(3), x)["params"]
  p = jax.tree.map(lambda a: a.unbox() if hasattr(a, "unbox") else a, p,
                   is_leaf=lambda a: hasattr(a, "unbox"))
  got = np.asarray(attn.apply({"params": p}, x))
  np.testing.assert_allclose(got, _reference_attention(cfg, p, x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_gqa_equals_mha_with_repeated_kv(style):
  """A GQA model equals the multi-head model (n_kv_heads == n_heads) whose KV weights are the
  GQA ones repeated per query group."""
  gqa = make_model_config("nano", style, n_heads=4, n_kv_heads=2)
  mha = gqa.replace(n_kv_heads=4)
  p = model.init_params(gqa, jax.random.key(0))
  G = gqa.q_per_kv
  attn = dict(p["layers"]["attn"])
  for name in ("key", "value"):
    attn[name] = jnp.repeat(attn[name], G, axis=2)   # [N, D, K, E] -> [N, D, H, E]
    if name + "_bias" in attn:
      attn[name + "_bias"] = jnp.repeat(attn[name + "_bias"], G, axis=1)
  p_mha = {**p, "layers": {**p["layers"], "attn": attn}}
  tokens = _tokens(gqa)
  np.testing.assert_allclose(np.asarray(model.apply(gqa, p, tokens)),
                             np.asarray(model.apply(mha, p_mha, tokens)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("style", STYLES)
def test_scan_equals_unrolled_loop(style):
  """The scanned stack equals applying one Block per layer slice in a Python loop."""
  cfg = make_model_config("nano", style, n_layers=3)
  p = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  x = jnp.take(p["embed"], tokens, axis=0)
  if cfg.positions == "learned":
    x = x + p["pos_embed"][: tokens.shape[1]]
  block = model.Block(cfg)
  for i in range(cfg.n_layers):
    x, _ = block.apply({"params": jax.tree.map(lambda a, i=i: a[i], p["layers"])}, x)
  x = model.Norm(cfg).apply({"params": p["final_norm"]}, x)
  head = p["embed"].T if cfg.tie_embeddings else p["head"]
  np.testing.assert_allclose(np.asarray(x @ head), np.asarray(model.apply(cfg, p, tokens)),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("knob", [dict(remat="full"), dict(remat="dots"), dict(remat="auto"),
                                  dict(remat="dots_no_batch"), dict(scan_unroll=2),
                                  dict(scan_unroll=3, remat="full"),
                                  dict(scan_unroll=5, remat="dots_no_batch")])
def test_speed_knobs_do_not_change_logits_or_grads(knob):
  """Remat policies and scan unrolling trade memory and speed, never the function."""
  cfg = make_model_config("nano", "llama", n_layers=3, remat="none")
  p = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  loss = lambda c: jax.value_and_grad(lambda q: jnp.square(model.apply(c, q, tokens)).mean())(p)
  (l0, g0), (l1, g1) = loss(cfg), loss(cfg.replace(**knob))
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("xs, ws, spec, n_in", [
    ((2, 5, 6), (6, 3, 4), "bld,dhe->blhe", 1), ((2, 5, 3, 4), (3, 4, 6), "blhe,hed->bld", 2),
    ((3, 7), (7, 9), "td,df->tf", 1), ((0, 5, 6), (6, 2), "bld,df->blf", 1)])
def test_project_is_the_einsum(xs, ws, spec, n_in):
  """The flat projection computes the einsum it replaces, value and gradients, and keeps a
  requested accumulation dtype."""
  kx, kw = jax.random.split(jax.random.key(3))
  x, w = jax.random.normal(kx, xs), jax.random.normal(kw, ws)
  np.testing.assert_allclose(model.project(x, w, n_in), jnp.einsum(spec, x, w), rtol=1e-6,
                             atol=1e-6)
  c = jax.random.normal(kw, jnp.einsum(spec, x, w).shape)
  g0 = jax.grad(lambda x, w: jnp.sum(jnp.einsum(spec, x, w) * c), (0, 1))(x, w)
  g1 = jax.grad(lambda x, w: jnp.sum(model.project(x, w, n_in) * c), (0, 1))(x, w)
  for a, b in zip(g0, g1):
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
  half = model.project(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), n_in,
                       preferred_element_type=jnp.float32)
  assert half.dtype == jnp.float32 and half.shape == jnp.einsum(spec, x, w).shape


@pytest.mark.parametrize("style,dtype", [("gpt2", "float32"), ("llama", "float32"),
                                         ("gpt2", "bfloat16")])
def test_train_step_products_contract_one_dim(style, dtype):
  """Every product without batch dims in a train step, forward and backward, contracts exactly
  one dim: the weight gradients contract the tokens as one dim, not batch and position as
  two, which XLA's CPU backend lowered through a transposing copy of the larger operand
  (benchmarks/README.md, "Flat projections"). Attention's products have batch dims."""
  from growlm.train import loss as loss_lib
  cfg = make_model_config("nano", style, dtype=dtype, loss_chunk=8)
  p = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  step = jax.grad(lambda q: loss_lib.token_nll(cfg, q, tokens, tokens).mean())
  jaxpr = jax.make_jaxpr(step)(p).jaxpr

  found = [(len(lc), len(rc), len(lb)) for eqn in all_eqns(jaxpr)
           if eqn.primitive.name == "dot_general"
           for (lc, rc), (lb, _) in [eqn.params["dimension_numbers"]]]
  plain = [d for d in found if d[2] == 0]
  # Forward, recomputed and backward products of q, k, v, out, the MLP and the head.
  assert len(plain) >= 3 * (6 if style == "gpt2" else 7) + 3, found
  assert all(d[:2] == (1, 1) for d in plain), found


@pytest.mark.parametrize("knob", [dict(remat="full"), dict(remat="dots_no_batch"),
                                  dict(scan_unroll=3), dict(attention="xla"), dict(loss_chunk=4)])
def test_speed_knobs_do_not_change_the_init_bits(knob):
  """A run's seed gives the same parameters whatever its speed knobs, bit for bit. Flax derives
  each parameter's key from its module path and a per-module counter that keeps counting across
  traces of the layer scan, so a knob that changed the modules or how that scan is traced could
  change every weight (grow.fresh.fresh_leaves relies on this; benchmarks/README.md, growth)."""
  cfg = make_model_config("nano", "gpt2", n_layers=3, remat="none")
  a = model.init_params(cfg, jax.random.key(5))
  b = model.init_params(cfg.replace(**knob), jax.random.key(5))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x).view(np.uint32), np.asarray(y).view(np.uint32))


def _bits(x):
  x = np.asarray(x)
  return x.reshape(-1).view(np.dtype(f"uint{8 * x.dtype.itemsize}"))


@pytest.mark.parametrize("style,param_dtype", [("gpt2", "float32"), ("llama", "float32"),
                                               ("gpt2", "bfloat16")])
def test_init_leaves_are_init_params_bit_for_bit(style, param_dtype):
  """init_leaves draws each leaf alone, outside the layer scan, from the keys flax derives for
  init_params: every leaf, for typed and raw (legacy uint32) keys, equals init_params' bit for
  bit; `layers` picks layers of a per-layer leaf, repeats and order kept."""
  cfg = make_model_config("nano", style, n_layers=3, param_dtype=param_dtype)
  for rng in (jax.random.key(7), jax.random.PRNGKey(8)):
    full = model.init_params(cfg, rng)
    paths = tuple(trees.paths(full))
    drawn = model.init_leaves(cfg, rng, paths)
    for path, x in zip(paths, drawn, strict=True):
      np.testing.assert_array_equal(_bits(x), _bits(trees.get(full, path)), err_msg=str(path))
    wi = ("layers", "mlp", "wi") if style == "gpt2" else ("layers", "mlp", "wi_gate")
    some = model.init_leaves(cfg, rng, (wi, ("embed",)), ((2, 0, 0), (1,)))
    np.testing.assert_array_equal(_bits(some[0]), _bits(trees.get(full, wi)[np.array([2, 0, 0])]))
    np.testing.assert_array_equal(_bits(some[1]), _bits(full["embed"]))


def _primitives(jaxpr, inside_scan=False):
  """(primitive name, whether it runs inside a scan) for every equation, nested ones too."""
  for eqn in jaxpr.eqns:
    yield eqn.primitive.name, inside_scan
    nested = inside_scan or eqn.primitive.name == "scan"
    for v in eqn.params.values():
      for j in v if isinstance(v, (list, tuple)) else [v]:
        sub = getattr(j, "jaxpr", j)   # a ClosedJaxpr's jaxpr, or a Jaxpr
        if hasattr(sub, "eqns"):
          yield from _primitives(sub, nested)


def test_init_leaves_draw_outside_the_layer_scan():
  """init_params draws every layer's weights inside the scan over layers (one layer after
  another); init_leaves only derives keys there and draws each leaf in one vmapped pass (what
  lets XLA fuse a growth's draw into its writes: benchmarks/README.md, growth)."""
  cfg = make_model_config("nano", "gpt2", n_layers=3)
  rng = jax.random.key(0)
  paths = (("layers", "mlp", "wi"), ("layers", "attn", "query"))
  full = list(_primitives(jax.make_jaxpr(lambda r: model.init_params(cfg, r))(rng).jaxpr))
  some = list(_primitives(jax.make_jaxpr(lambda r: model.init_leaves(cfg, r, paths))(rng).jaxpr))
  assert ("random_bits", True) in full, sorted(set(full))
  assert ("random_bits", True) not in some and ("random_bits", False) in some, sorted(set(some))


@pytest.mark.parametrize("shape", [(), (3,), (5, 7, 3), (2, 0, 4), (300, 257)])
def test_straight_threefry_draws_jax_threefry_bits(shape):
  """growlm.model.prng's Threefry hash (straight-line arithmetic) gives jax's own bits: raw bits
  of every width (64 with float64 on), uniform and truncated normal floats, per key under vmap
  (counters past 2**16 in the last shape); a key that is not jax's partitionable Threefry draws
  through its own generator."""
  key = jax.random.key(11)
  ours = prng.like_key(jax.random.key_data(key), key)
  assert str(ours.dtype) != str(key.dtype)   # it is growlm's generator that draws
  for width in (8, 16, 32):
    np.testing.assert_array_equal(jax.random.bits(ours, shape, f"uint{width}"),
                                  jax.random.bits(key, shape, f"uint{width}"))
  with jax.enable_x64(True):
    np.testing.assert_array_equal(jax.random.bits(ours, shape, "uint64"),
                                  jax.random.bits(key, shape, "uint64"))
  for dt in (jnp.float32, jnp.bfloat16):
    np.testing.assert_array_equal(_bits(jax.random.truncated_normal(ours, -2, 2, shape, dt)),
                                  _bits(jax.random.truncated_normal(key, -2, 2, shape, dt)))
  keys = jax.random.split(key, 3)
  np.testing.assert_array_equal(
      _bits(jax.vmap(lambda d: jax.random.uniform(prng.like_key(d, key), shape))(
          jax.random.key_data(keys))),
      _bits(jax.vmap(lambda k: jax.random.uniform(k, shape))(keys)))
  raw = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(jax.random.bits(prng.like_key(raw, raw), shape),
                                jax.random.bits(raw, shape))
  rbg = jax.random.key(5, impl="rbg")
  same = prng.like_key(jax.random.key_data(rbg), rbg)
  assert str(same.dtype) == str(rbg.dtype)
  np.testing.assert_array_equal(jax.random.bits(same, shape), jax.random.bits(rbg, shape))
  with jax.threefry_partitionable(False):   # jax's other counter layout: its own hash, its bits
    np.testing.assert_array_equal(jax.random.bits(ours, shape), jax.random.bits(key, shape))


def test_straight_threefry_hash_matches_the_published_test_vectors():
  """Threefry-2x32 with 20 rounds, against the Random123 known-answer vectors (also in jax's
  own tests): zero key and counter; all-ones; and the digits of pi."""
  vectors = [((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
  for (k0, k1), (x0, x1), want in vectors:
    u = lambda v: jnp.asarray(v, jnp.uint32)
    got = prng.threefry2x32(u(k0), u(k1), u([x0]), u([x1]))
    assert [int(g[0]) for g in got] == list(want)


def test_remat_auto_and_explicit_policies():
  # auto: dots_no_batch, measured fastest on the 2-core CPU and on an H100 (benchmarks/README.md)
  for platform in ("cpu", "gpu", "tpu"):
    assert speed.remat_policy("auto", platform) == "dots_no_batch"
  assert speed.remat_policy("full", "cpu") == "full"
  assert speed.remat_policy("none", "gpu") == "none"


def test_scan_unroll_auto_unrolls_every_layer_on_a_gpu_only():
  cfg = make_model_config("nano", "gpt2", n_layers=6)
  assert cfg.scan_unroll == 0   # the default is auto
  assert [speed.layers_per_iteration(cfg, p) for p in ("gpu", "cpu", "tpu")] == [6, 1, 1]
  assert speed.layers_per_iteration(cfg) == 1   # these tests run on a CPU
  for n, want in ((1, 1), (4, 4), (6, 6), (9, 6)):   # explicit, at most every layer
    assert speed.layers_per_iteration(cfg.replace(scan_unroll=n), "gpu") == want
  # Only with no loop left is remat's recomputation fenced off from the forward's values.
  assert [speed.guards_recompute(cfg, p) for p in ("gpu", "cpu")] == [True, False]
  assert not speed.guards_recompute(cfg.replace(scan_unroll=3), "gpu")


def _squared(jaxpr):
  """What each squaring in `jaxpr` squares: the primitive that made its operand."""
  made = {v: e.primitive.name for e in all_eqns(jaxpr) for v in e.outvars}
  return {made.get(e.invars[0], "input") for e in all_eqns(jaxpr)
          if e.primitive.name in ("integer_pow", "square")}


@pytest.mark.parametrize("platform", ["gpu", "cpu", "tpu"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_layer_norm_variance_in_one_pass_for_a_gpus_half_inputs(monkeypatch, platform, dtype):
  """On a GPU, for bf16 inputs, layer norm's variance is E[x^2] - E[x]^2: it squares x itself
  (cast to float32), not x - E[x] (speed.one_pass_variance), and normalises rows centred as a
  transformer's are (mean 3 spreads) as two passes do, up to one bf16 rounding of the output.
  float32 inputs, a CPU and a TPU keep two passes; so float32's rounding there is unchanged."""
  monkeypatch.setattr(sharding, "platform", lambda: platform)
  cfg = make_model_config("nano", "gpt2", dtype=dtype)
  norm = model.Norm(cfg)
  x = (jax.random.normal(jax.random.key(4), (4, 9, cfg.d_model)) + 3.0).astype(dtype)
  params = norm.init(jax.random.key(0), x)
  one = platform == "gpu" and dtype == "bfloat16"
  assert speed.one_pass_variance(x.dtype, platform) == one
  squared = _squared(jax.make_jaxpr(lambda x: norm.apply(params, x))(x).jaxpr)
  # One pass squares x and the (checkpoint-named) mean; two square x - mean.
  assert squared == ({"convert_element_type", "name"} if one else {"sub"})
  wide = np.asarray(x, np.float64)
  want = (wide - wide.mean(-1, keepdims=True)) / np.sqrt(wide.var(-1, keepdims=True)
                                                          + cfg.norm_eps)
  got = np.asarray(norm.apply(params, x), np.float64)
  np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 if dtype == "bfloat16" else 1e-5)


def test_logits_dtype_auto_rounds_a_gpus_half_logits_only():
  """auto: a bf16 (or fp16) model's train step stores half logits on a GPU and float32 ones on a
  CPU or TPU; explicit values hold everywhere; a float32 model never rounds them."""
  cfg = make_model_config("nano", "gpt2", dtype="bfloat16")
  assert cfg.logits_dtype == "auto"   # the default
  assert [speed.half_logits(cfg, p) for p in ("gpu", "cpu", "tpu")] == [True, False, False]
  assert not speed.half_logits(cfg)   # these tests run on a CPU
  for p in ("gpu", "cpu", "tpu"):
    assert speed.half_logits(cfg.replace(logits_dtype="compute"), p)
    assert not speed.half_logits(cfg.replace(logits_dtype="float32"), p)
    assert speed.half_logits(cfg.replace(dtype="float16", logits_dtype="compute"), p)
    for dtype in ("float32", "float64"):
      assert not speed.half_logits(cfg.replace(dtype=dtype, logits_dtype="compute"), p)
  assert speed.guards_recompute(cfg.replace(scan_unroll=6), "cpu")


def test_gpu_choices_compute_the_same_function(monkeypatch, request):
  """On a GPU, auto unrolls every layer (fenced) and the dots policies keep attention's inputs:
  traced as for a GPU (xla attention, which runs here), the loss and gradients are the CPU's."""
  cfg = make_model_config("nano", "gpt2", n_layers=3, attention="xla")
  p = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  request.addfinalizer(model.apply.clear_cache)   # no trace made "for a GPU" outlives the test

  def run():   # a new function each time: jax caches traces by function
    loss = jax.value_and_grad(lambda q: jnp.square(model.apply(cfg, q, tokens)).mean())
    model.apply.clear_cache()
    lowered = jax.jit(loss).lower(p)
    return lowered.compile()(p), lowered.as_text()
  (l0, g0), text = run()
  assert "optimization_barrier" not in text and "while" in text
  monkeypatch.setattr(sharding, "platform", lambda: "gpu")
  (l1, g1), text = run()
  assert "optimization_barrier" in text and "while" not in text
  assert float(l0) == pytest.approx(float(l1), rel=1e-6)
  for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("platform, kept", [("gpu", True), ("cpu", False), ("tpu", False)])
def test_dots_policies_keep_attention_inputs_on_a_gpu_only(platform, kept, capsys):
  """Kept, the backward does not redo the bias adds and RoPE before attention, nor a layer
  norm's statistics (benchmarks/gpu_traffic.py measured both); on a TPU attention's inputs
  cost XLA's plan 0.56-0.84 GiB per v5e chip (benchmarks/README.md), so there they are not."""
  def f(x):
    q = checkpoint_name(jnp.sin(x), attention.INPUT_NAMES[0])
    ctx = checkpoint_name(jnp.cos(q), attention.SAVED_NAMES[0])
    rstd = checkpoint_name(jnp.tanh(ctx), speed.NORM_NAMES[1])
    return jnp.sin(rstd).sum()
  for remat in ("dots", "dots_no_batch"):
    jax.ad_checkpoint.print_saved_residuals(
        jax.checkpoint(f, policy=speed.checkpoint_policy(remat, platform)), jnp.ones(3))
    out = capsys.readouterr().out
    assert attention.SAVED_NAMES[0] in out
    assert (attention.INPUT_NAMES[0] in out) == kept == (speed.NORM_NAMES[1] in out)
  assert speed.checkpoint_policy("full", platform) is None


@pytest.mark.parametrize("unroll, fenced", [(1, False), (2, False), (3, True), (8, True)])
def test_fully_unrolled_remat_keeps_its_recomputation(unroll, fenced):
  """Without a loop between forward and backward, XLA would merge remat's recomputation with
  the forward's values and keep those alive (the policy undone): jax.checkpoint's prevent_cse
  puts an optimization barrier in the way, then and only then."""
  cfg = make_model_config("nano", "gpt2", n_layers=3, remat="full", attention="naive",
                          scan_unroll=unroll)
  p = model.init_params(cfg, jax.random.key(0))
  grad = jax.grad(lambda q: jnp.square(model.apply(cfg, q, _tokens(cfg))).mean())
  text = jax.jit(grad).lower(p).as_text()
  assert ("optimization_barrier" in text) == fenced


def test_remat_written_as_bool_reads_as_policy():
  """config.json files from before the policies existed said remat: true/false."""
  base = make_model_config("nano", "gpt2").to_dict()
  assert ModelConfig.from_dict(dict(base, remat=True)).remat == "full"
  assert ModelConfig.from_dict(dict(base, remat=False)).remat == "none"
  with pytest.raises(GrowlmError, match="remat='some'"):
    ModelConfig.from_dict(dict(base, remat="some"))


def test_rope_scores_depend_only_on_relative_position():
  E = 16
  q, k = jax.random.normal(jax.random.key(0), (2, E))
  def score(m, n):
    pos = jnp.array([m, n])
    cos, sin = model.rope_tables(pos, E, 10000.0, jnp.float32)
    r = model.apply_rope(jnp.stack([q, k])[None, :, None, :], cos, sin)[0, :, 0]
    return float(r[0] @ r[1])
  assert score(3, 1) == pytest.approx(score(10, 8), rel=1e-4)
  assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def test_bf16_compute_close_to_f32():
  cfg = make_model_config("nano", "gpt2")
  p = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  f32 = model.apply(cfg, p, tokens)
  bf16 = model.apply(cfg.replace(dtype="bfloat16"), p, tokens)
  assert bf16.dtype == jnp.float32  # logits are returned in f32 for the loss
  assert float(jnp.abs(f32 - bf16).max()) < 0.05


def test_dropout_active_only_with_rng():
  cfg = make_model_config("nano", "gpt2", dropout_rate=0.5)
  p = model.init_params(cfg, jax.random.key(0))
  tokens = _tokens(cfg)
  a = model.apply(cfg, p, tokens)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(model.apply(cfg, p, tokens)))
  b = model.apply(cfg, p, tokens, dropout_rng=jax.random.key(5))
  assert float(jnp.abs(a - b).max()) > 1e-3


@pytest.mark.parametrize("style", STYLES)
def test_logical_axes_cover_every_param(style):
  cfg = make_model_config("nano", style)
  shapes, axes = model.abstract_params(cfg)
  is_names = lambda x: isinstance(x, tuple)
  pairs = jax.tree.leaves(jax.tree.map(lambda n, s: (n, s.shape), axes, shapes, is_leaf=is_names),
                          is_leaf=is_names)
  for names, shape in pairs:
    assert len(names) == len(shape) and set(names) <= set(model.AXES)
  layer_leaves = jax.tree.leaves(axes["layers"], is_leaf=is_names)
  assert all(n[0] == "layers" for n in layer_leaves)


@pytest.mark.parametrize("style", STYLES)
def test_matmul_params_match_the_tree(style):
  """N in the FLOPs formula = matrices in the blocks + the output projection."""
  cfg = make_model_config("tiny", style)
  p = model.init_params(cfg, jax.random.key(0))
  leaves = jax.tree_util.tree_leaves_with_path(p["layers"])
  mats = sum(x.size for path, x in leaves
             if not path[-1].key.endswith("bias") and path[-1].key != "scale")
  head = p["head"].size if "head" in p else p["embed"].size
  assert flops.matmul_params(cfg) == mats + head
  L = 64
  assert flops.flops_per_token(cfg, L) == 6 * (mats + head) + 12 * cfg.n_layers * \
      cfg.n_heads * cfg.head_dim * L


@pytest.mark.parametrize("bad, field", [
    (dict(norm="batchnorm"), "norm"), (dict(n_kv_heads=3), "n_kv_heads"),
    (dict(positions="rope", head_dim=7), "head_dim"), (dict(d_model=0), "d_model"),
    (dict(mlp="relu"), "mlp"), (dict(dtype="int8"), "dtype"), (dict(attention="flash"), "attention"),
    (dict(remat=True), "remat"), (dict(scan_unroll=-1), "scan_unroll"),
    (dict(loss_chunk=-1), "loss_chunk"),
    (dict(logits_dtype="bfloat16"), "logits_dtype")])
def test_bad_model_config_is_one_clear_line(bad, field):
  with pytest.raises(GrowlmError) as e:
    ModelConfig(**bad)
  assert field in str(e.value) and "\n" not in str(e.value)


def test_unknown_size_style_and_field_refused():
  for kwargs, word in ((dict(size="huge"), "huge"), (dict(style="bert"), "bert")):
    with pytest.raises(GrowlmError, match=word):
      make_model_config(**kwargs)
  with pytest.raises(GrowlmError, match="colour"):
    ModelConfig.from_dict({"colour": 1})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gelu_backward_equals_autodiff(dtype):
  """model/activations.py: jax's GELU bit for bit forward. Its written-out derivative equals
  float32 autodiff's (of the same inputs) within 1e-5 of the largest gradient in float32 (near
  x = -4, where 1 - tanh^2 cancels, each is 3.5e-6 from the float64 value), and in bfloat16
  within one bf16 rounding (it computes in float32; bf16 autodiff, which rounds its
  intermediates, is 1.7% off there). A dropped term is off by 0.1 or more. Inputs span the
  curve's bend and tails."""
  x = jnp.linspace(-8.0, 8.0, 4001).reshape(1, 4001).astype(dtype)
  g = jnp.cos(jnp.arange(4001.0) * 0.37).reshape(1, 4001).astype(dtype)
  y0 = jax.nn.gelu(x, approximate=True)
  y1, vjp1 = jax.vjp(activations.gelu_tanh, x)
  np.testing.assert_array_equal(np.asarray(y1, np.float32), np.asarray(y0, np.float32))
  (b,) = vjp1(g)
  assert b.dtype == jnp.dtype(dtype)
  (a,) = jax.vjp(lambda x: jax.nn.gelu(x, approximate=True), x.astype(jnp.float32))[1](
      g.astype(jnp.float32))
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  tol = 1e-5 if dtype == "float32" else 2 ** -8
  np.testing.assert_allclose(b, a, rtol=0, atol=tol * np.abs(a).max())
  # The slope itself: gelu'(0) = 1/2, gelu'(x) -> 1 for large x, -> 0 for very negative x.
  slope = jax.grad(activations.gelu_tanh)
  assert float(slope(0.0)) == 0.5
  assert abs(float(slope(8.0)) - 1.0) < 1e-6 and abs(float(slope(-8.0))) < 1e-6


def test_init_leaves_derive_their_keys_without_a_loop():
  """init_leaves traces the init's layer scan fully unrolled: its keys come out of straight-line
  code, not a loop of one tiny iteration per layer (compiled for an H100, the gpt2-124m growth's
  key loop was 120 of its 155 kernel launches). The keys, and so the draws, are the same
  (test_init_leaves_are_init_params_bit_for_bit). On a CPU jax's own Threefry hash of a key
  stays a loop; the layers' loop is the one named after the Decoder's scan."""
  cfg = make_model_config("nano", "gpt2", n_layers=3)
  paths = (("layers", "mlp", "wi"), ("layers", "attn", "query"))
  layer_loops = lambda fn: re.findall(r" while\(.*op_name=\"[^\"]*/Decoder/while\"",
                                      jax.jit(fn).lower(jax.random.key(0)).compile().as_text())
  assert not layer_loops(lambda r: model.init_leaves(cfg, r, paths))
  assert len(layer_loops(lambda r: model.init_params(cfg, r))) == 1   # the scan init_params runs


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_layer_weights_cast_once_per_stack_same_bits(style, monkeypatch):
  """A bf16 model casts each stacked layer weight to bf16 once, outside the layer scan (one
  convert of the whole [layers, ...] leaf, none of norm gains, which stay float32), and the
  loss, its gradients and the logits are bit for bit those of casting each layer's slice where
  it is used (the former program, rebuilt by turning the stack cast off)."""
  from growlm.train import loss as loss_lib  # pylint: disable=import-outside-toplevel
  cfg = make_model_config("nano", style, n_layers=3, vocab_size=64, max_len=32, dtype="bfloat16")
  params = model.init_params(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 17), 0, 64)
  weights = [x for path, x in jax.tree_util.tree_leaves_with_path(params["layers"])
             if not any("norm" in str(getattr(k, "key", "")) for k in path)]
  jaxpr = jax.make_jaxpr(lambda p: model.hidden(cfg, p, toks))(params).jaxpr
  casts = [e for e in all_eqns(jaxpr) if e.primitive.name == "convert_element_type"
           and e.invars[0].aval.dtype == jnp.float32 and e.params["new_dtype"] == jnp.bfloat16
           and e.invars[0].aval.shape in {x.shape for x in weights}]
  assert len(casts) == len(weights), (len(casts), len(weights))

  def run():
    f = lambda p: loss_lib.token_nll(cfg, p, toks[:, :-1], toks[:, 1:]).mean()
    loss, grads = jax.jit(jax.value_and_grad(f))(params)
    return [loss, jax.jit(lambda p: model.apply(cfg, p, toks))(params)] + jax.tree.leaves(grads)
  once = run()
  monkeypatch.setattr(model, "_in_compute_dtype", lambda cfg, layers: layers)
  per_layer = run()
  for a, b in zip(once, per_layer, strict=True):
    np.testing.assert_array_equal(_bits(a), _bits(b))


def test_sharding_rules_accept_every_logical_axis_the_model_names():
  """A rule for an axis the model declares must not be refused as unknown, and the vocabulary
  the rules check holds nothing else but the batch."""
  assert set(sharding.LOGICAL_AXES) == set(model.AXES) | {"batch"}
  _, axes = model.abstract_params(make_model_config("nano", "llama"))
  named = {a for names in jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, tuple))
           for a in names if a is not None}
  assert named <= set(model.AXES)
