"""The chunked loss: same loss and gradients as the plain one, and no whole-batch float32
[B, L, V] logits anywhere in the train or eval step."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import all_eqns
from growlm import optim, sharding
from growlm.config import defaults as config_defaults
from growlm.config.typed import resolve
from growlm.model import decoder as model
from growlm.model.config import make_model_config
from growlm.train import evaluate, loss, state as state_lib, trainer

# Distinct sizes, so a [B, L, V] shape cannot be something else by coincidence.
B, L = 3, 40


def _setup(style, **overrides):
  cfg = make_model_config("nano", style, max_len=L, vocab_size=263, **overrides)
  params = model.init_params(cfg, jax.random.key(0))
  ids = jax.random.randint(jax.random.key(1), (B, L + 1), 0, cfg.vocab_size)
  return cfg, params, ids[:, :-1], ids[:, 1:]


@pytest.mark.parametrize("style,chunk", [("gpt2", 0), ("llama", 7), ("gpt2", 40)])
def test_chunked_equals_plain_loss_and_gradients(style, chunk):
  """Within 1e-6 relative (float32): the loss, and every gradient against its largest entry.
  0 is auto (2 chunks of 20 here; tied embeddings); 7 does not divide 40 and is rounded down
  to 5 (8 chunks; untied head); 40 is one chunk."""
  cfg, params, inputs, targets = _setup(style, loss_chunk=chunk)
  plain = lambda p: loss.cross_entropy(model.apply(cfg, p, inputs), targets).mean()
  chunked = lambda p: loss.token_nll(cfg, p, inputs, targets).mean()
  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(f))(params) for f in (plain, chunked))
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g0), jax.tree.leaves(g1)):
    scale = float(jnp.abs(a).max())
    if jax.tree_util.keystr(path).endswith("['key_bias']"):
      # Its exact gradient is zero (softmax ignores a per-query constant): compare to the rest.
      scale = max(float(jnp.abs(x).max()) for x in jax.tree.leaves(g0))
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_per_token_values_match():
  cfg, params, inputs, targets = _setup("llama", loss_chunk=8)
  want = loss.cross_entropy(model.apply(cfg, params, inputs), targets)
  got = loss.token_nll(cfg, params, inputs, targets)
  assert got.shape == (B, L) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("requested,batch,seq_len,vocab,platform,want", [
    (0, 16, 1024, 50304, "cpu", 16),   # auto: 64 MiB / (4 B * 16 * 50304) = 20 -> divisor 16
    (0, 16, 1024, 50304, "gpu", 256),  # accelerators: 1 GiB / (4 B * 16 * 50304) = 333 -> 256
    (0, 32, 1024, 50304, "tpu", 128),
    (0, 8, 256, 258, "cpu", 128),      # auto, tiny vocab: at most half the sequence
    (0, 1, 1, 258, "gpu", 1),
    (100, 4, 256, 258, "cpu", 64),     # rounded down to a divisor of seq_len
    (512, 4, 256, 258, "gpu", 256),    # capped at seq_len: one chunk
])
def test_chunk_length(requested, batch, seq_len, vocab, platform, want):
  assert loss.chunk_length(requested, batch, seq_len, vocab, platform) == want


def test_auto_chunks_are_sized_to_the_logits_stored():
  """GPT-2 124M's step on a GPU stores bf16 logits (model.logits_dtype auto): its auto chunks
  are twice as long as float32's (1 GiB / (2 B * 16 * 50304) = 667 -> 512); elsewhere, float32
  logits, as before."""
  cfg = make_model_config("nano", "gpt2", vocab_size=50304, max_len=1024, dtype="bfloat16")
  assert loss.model_chunk(cfg, 16, 1024, "gpu") == 512
  assert loss.model_chunk(cfg, 16, 1024, "tpu") == 256
  assert loss.model_chunk(cfg.replace(logits_dtype="float32"), 16, 1024, "gpu") == 256
  assert loss.model_chunk(cfg.replace(dtype="float32"), 16, 1024, "gpu") == 256
  assert loss.model_chunk(cfg.replace(loss_chunk=64), 16, 1024, "gpu") == 64
  # eval keeps float32 logits, so its auto chunks are float32's
  assert loss.model_chunk(cfg, 16, 1024, "gpu", train=False) == 256
  assert loss.model_chunk(cfg.replace(loss_chunk=64), 16, 1024, "gpu", train=False) == 64


def test_eval_step_chunks_its_float32_logits_to_the_budget(monkeypatch):
  """On a GPU a bf16 model's train step stores bf16 logits in chunks of 512 positions (16 x 1024,
  vocab 50304); the eval step, whose logits stay float32, takes chunks of 256, so its largest
  logits buffer is 0.82 GB (1 GiB budget: loss.AUTO_CHUNK_BYTES), not 1.65."""
  monkeypatch.setattr(sharding, "platform", lambda: "gpu")
  cfg = make_model_config("nano", "gpt2", vocab_size=50304, max_len=1024, dtype="bfloat16",
                          attention="xla")
  params = jax.eval_shape(lambda: model.init_params(cfg, jax.random.key(0)))
  batch = {k: jax.ShapeDtypeStruct((16, 1024), jnp.int32) for k in ("inputs", "targets")}
  text = jax.jit(evaluate.make_eval_step(cfg)).lower(params, batch).as_text()
  assert _logit_dots(text, (16 * 256, 50304)) == {"f32"}
  assert not _logit_dots(text, (16 * 512, 50304))
  train = jax.jit(jax.grad(lambda p, x, y: loss.token_nll(cfg, p, x, y).mean())).lower(
      params, batch["inputs"], batch["targets"]).as_text()
  assert _logit_dots(train, (16 * 512, 50304)) == {"bf16"}


def _logit_dots(text, shape):
  """The element types of the lowered module's products whose result has `shape`."""
  dims = "x".join(map(str, shape))
  return {t for d, t in re.findall(r"stablehlo\.dot_general.*-> tensor<([0-9x]+)x(\w+)>", text)
          if d == dims}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_half_logits_round_only_the_train_steps_logits(style):
  """model.logits_dtype=compute in a bfloat16 model: the head's product in the gradient's pass
  gives bfloat16 logits (float32 otherwise); the loss and gradients move by their rounding only
  (the train step's softmax, a float32 computation, sees bf16-rounded logits, as under PyTorch's
  autocast), measurably; eval's loss (no gradient) is bit for bit float32 logits'. A float32
  model has nothing to round: the setting changes nothing there."""
  cfg, params, inputs, targets = _setup(style, dtype="bfloat16", loss_chunk=8)
  params = jax.tree.map(lambda a: a * 8.0, params)   # logits of a trained model's spread
  f = lambda c: lambda p: loss.token_nll(c, p, inputs, targets).mean()
  half, full = cfg.replace(logits_dtype="compute"), cfg.replace(logits_dtype="float32")
  (l0, g0), (l1, g1) = (jax.jit(jax.value_and_grad(f(c)))(params) for c in (full, half))
  logits = (B * 8, cfg.vocab_size)   # one chunk's, tokens flattened (decoder.project)
  assert _logit_dots(jax.jit(jax.grad(f(half))).lower(params).as_text(), logits) == {"bf16"}
  assert _logit_dots(jax.jit(jax.grad(f(full))).lower(params).as_text(), logits) == {"f32"}
  assert _logit_dots(jax.jit(f(half)).lower(params).as_text(), logits) == {"f32"}
  assert float(l1) != float(l0) and float(l1) == pytest.approx(float(l0), rel=1e-3)
  flat = lambda g: np.concatenate([np.ravel(np.asarray(a, np.float64)) for a in jax.tree.leaves(g)])
  a, b = flat(g0), flat(g1)
  assert 0 < np.linalg.norm(b - a) / np.linalg.norm(a) < 2e-2
  assert float(f(half)(params)) == float(f(full)(params))   # not differentiated: eval's path
  f32 = cfg.replace(dtype="float32")
  (l2, g2), (l3, g3) = (jax.value_and_grad(f(f32.replace(logits_dtype=v)))(params)
                        for v in ("float32", "compute"))
  assert float(l2) == float(l3)
  for x, y in zip(jax.tree.leaves(g2), jax.tree.leaves(g3)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("chunk", [8, 40])
def test_half_precision_chunks_match_plain_autodiff(chunk):
  """bfloat16 x and w (the train step's): the fused half-precision chunk gives the plain
  loss's value (same float32 logits) and gradients that differ from plain autodiff's only by
  rounding the logits' gradient to bfloat16 (~2^-9 relative); a wrong scale, sign or transpose
  would be off by O(1). With a token mask, so the incoming cotangent differs per token."""
  D, V = 24, 263
  kx, kw, kt, km = jax.random.split(jax.random.key(5), 4)
  x = jax.random.normal(kx, (B, L, D)).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (D, V)) / np.sqrt(D)).astype(jnp.bfloat16)
  t = jax.random.randint(kt, (B, L), 0, V)
  m = jax.random.bernoulli(km, 0.7, (B, L)).astype(jnp.float32)
  plain = lambda x, w: jnp.sum(loss.cross_entropy(jnp.einsum(
      "bld,dv->blv", x, w, preferred_element_type=jnp.float32), t) * m) / jnp.sum(m)
  fused = lambda x, w: jnp.sum(loss.chunked_cross_entropy(x, w, t, chunk) * m) / jnp.sum(m)
  (l0, g0), (l1, g1) = (jax.value_and_grad(f, (0, 1))(x, w) for f in (plain, fused))
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  for a, b in zip(g0, g1):
    assert a.dtype == b.dtype == jnp.bfloat16
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-2


def test_half_precision_train_step_keeps_vocab_products_in_half():
  """In a bfloat16 model's train step no product with a vocab-sized operand takes a float32
  operand (on an H100 those ran as TF32 and cost 8.4 ms of a 66 ms GPT-2 step), and no float32
  [..., V] tensor spans the whole batch (the bfloat16 logit gradient may)."""
  cfg, params, inputs, targets = _setup("gpt2", dtype="bfloat16", loss_chunk=10)
  schedule = optax.constant_schedule(1e-3)
  opt = optim.make_optimizer(resolve(config_defaults.base_config()).train, schedule)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=opt.init(params), rng=jax.random.PRNGKey(2))
  jaxpr = jax.make_jaxpr(trainer.make_train_step(cfg, opt, schedule))(
      state, {"inputs": inputs, "targets": targets}).jaxpr
  V = cfg.vocab_size

  dots = [tuple(str(a.dtype) for a in avals) for eqn in all_eqns(jaxpr)
          if eqn.primitive.name == "dot_general"
          for avals in [[v.aval for v in eqn.invars]] if any(V in a.shape for a in avals)]
  assert len(dots) >= 3, dots          # forward, and the two backward products
  assert all(d == ("bfloat16", "bfloat16") for d in dots), dots
  wide = [s for s in _logits_like(_shapes(jaxpr), V) if s[1] == "float32"]
  assert wide == []


def _shapes(jaxpr):
  """Every (shape, dtype) an equation of `jaxpr` or its sub-jaxprs produces."""
  return [(tuple(v.aval.shape), str(v.aval.dtype)) for eqn in all_eqns(jaxpr)
          for v in eqn.outvars if hasattr(v.aval, "shape")]


def _logits_like(shapes, vocab):
  return [s for s in shapes if s[0][-1:] == (vocab,) and len(s[0]) >= 2
          and int(np.prod(s[0][:-1])) == B * L]


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_no_whole_batch_logits_in_train_or_eval_step(style):
  cfg, params, inputs, targets = _setup(style)
  schedule = optax.constant_schedule(1e-3)
  opt = optim.make_optimizer(resolve(config_defaults.base_config()).train, schedule)
  state = state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                               opt_state=opt.init(params), rng=jax.random.PRNGKey(2))
  batch = {"inputs": inputs, "targets": targets}
  train_step = trainer.make_train_step(cfg, opt, schedule)
  eval_step = evaluate.make_eval_step(cfg)
  train_shapes = _shapes(jax.make_jaxpr(train_step)(state, batch).jaxpr)
  eval_shapes = _shapes(jax.make_jaxpr(eval_step)(params, batch).jaxpr)
  assert _logits_like(train_shapes, cfg.vocab_size) == []
  assert _logits_like(eval_shapes, cfg.vocab_size) == []
  # The checker does see them where they exist: the plain loss on full logits.
  plain = lambda p: loss.cross_entropy(model.apply(cfg, p, inputs), targets).mean()
  assert _logits_like(_shapes(jax.make_jaxpr(jax.grad(plain))(params).jaxpr), cfg.vocab_size)


def test_logsumexp_one_pass_equals_two_passes():
  """Random rows, rows far from zero (so a max-free sum would overflow), rows with -inf entries
  and a row of -inf only (log-sum-exp -inf, not NaN)."""
  x = jax.random.normal(jax.random.key(3), (4, 7, 301)) * 30.0
  x = x.at[1].add(500.0).at[2, :, ::3].set(-jnp.inf).at[3, 0].set(-jnp.inf)
  want, got = jax.nn.logsumexp(x, axis=-1), jax.jit(loss.logsumexp_one_pass)(x)
  assert got.shape == want.shape == (4, 7) and got.dtype == jnp.float32
  assert float(got[3, 0]) == -np.inf
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-6, atol=0)


@pytest.mark.parametrize("platform", ["cpu", "gpu", "tpu"])
@pytest.mark.parametrize("chunk", [5, 2])   # 8 chunks: one loop (not on a TPU); 20: a scan
def test_half_precision_loss_paths_agree(monkeypatch, platform, chunk):
  """The half-precision loss as accelerators run it (one-pass log-sum-exp, chosen by the mesh's
  platform; on a TPU always a scan over the chunks) and as the CPU does, unrolled and scanned:
  the same loss and gradients to float32 rounding of the logits' statistics."""
  D, V = 24, 263
  kx, kw, kt = jax.random.split(jax.random.key(7), 3)
  x = jax.random.normal(kx, (B, L, D)).astype(jnp.bfloat16)
  w = (jax.random.normal(kw, (D, V)) / np.sqrt(D)).astype(jnp.bfloat16)
  t = jax.random.randint(kt, (B, L), 0, V)
  f = lambda x, w: jnp.mean(loss.chunked_cross_entropy(x, w, t, chunk))
  l0, g0 = jax.value_and_grad(f, (0, 1))(x, w)
  monkeypatch.setattr(loss.sharding, "platform", lambda: platform)
  jaxpr = jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr
  reduces = [e for e in all_eqns(jaxpr) if e.primitive.name == "reduce"]
  assert (len(reduces) > 0) == (platform != "cpu")          # the one-pass reduction
  scans = [e for e in all_eqns(jaxpr) if e.primitive.name == "scan"]
  assert (len(scans) > 0) == (L // chunk > loss.MAX_UNROLLED_CHUNKS or platform == "tpu")
  l1, g1 = jax.value_and_grad(f, (0, 1))(x, w)
  assert float(l1) == pytest.approx(float(l0), rel=1e-6)
  for a, b in zip(g0, g1):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.linalg.norm(b - a) / np.linalg.norm(a) < 1e-2


def test_half_precision_chunks_run_in_order():
  """One chunk's float32 logits live at a time: each chunk's product waits, through an
  optimization barrier, for the previous chunk's gradient (for an H100, XLA's plan for GPT-2
  124M's step without them held 0.47 GB more; a CPU schedules in order anyway, so the barriers
  are what is checked). In the loss alone, the previous chunk's NLL is what it waits for."""
  Bb, Lb, D, V, chunk = 2, 16, 8, 32, 4
  x = jnp.zeros((Bb, Lb, D), jnp.bfloat16)
  w = jnp.zeros((D, V), jnp.bfloat16)
  t = jnp.zeros((Bb, Lb), jnp.int32)
  f = lambda x, w: jnp.mean(loss.chunked_cross_entropy(x, w, t, chunk))
  for jaxpr, waits_for in ((jax.make_jaxpr(jax.grad(f, (0, 1)))(x, w).jaxpr, (Bb, chunk, V)),
                           (jax.make_jaxpr(f)(x, w).jaxpr, (Bb, chunk))):
    barriers = [e for e in all_eqns(jaxpr) if e.primitive.name == "optimization_barrier"]
    assert len(barriers) == Lb // chunk - 1
    for e in barriers:
      assert [tuple(v.aval.shape) for v in e.invars] == [(Bb, chunk, D), waits_for]
