"""Sampling: the cached decoder equals the full one, the sampler's rules, transformers' greedy
output on the same weights, exact growth keeps greedy text, and the command line."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO, run_config
from growlm import commands, model
from growlm.errors import GrowlmError
from growlm.grow import GrowthPlan, grow
from growlm.model import generate as gen


def _model(style, **kw):
  cfg = model.make_model_config("nano", style).replace(**kw)
  return cfg, model.init_params(cfg, jax.random.key(0))


CASES = {
    "gpt2": dict(),
    "gpt2_untied": dict(tie_embeddings=False),
    "llama_gqa": dict(n_heads=4, n_kv_heads=2, head_dim=16),
    "llama_mqa_bias": dict(n_heads=4, n_kv_heads=1, head_dim=16, use_bias=True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cached_steps_give_the_full_models_logits(name):
  """Prefill 5 tokens, then one token per step: every position's logits equal `model.apply` on
  the whole sequence (float32)."""
  cfg, params = _model(name.split("_")[0], **CASES[name])
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, cfg.vocab_size)
  full = np.asarray(model.apply(cfg, params, tokens))
  cache = gen.init_cache(cfg, 2, 12)
  forward = jax.jit(gen.forward, static_argnums=0)   # one compile per input length
  logits, cache = forward(cfg, params, cache, tokens[:, :5], 0)
  steps = [logits]
  for t in range(5, 12):
    logits, cache = forward(cfg, params, cache, tokens[:, t:t + 1], t)
    steps.append(logits)
  got = np.asarray(jnp.concatenate(steps, axis=1))
  assert full.std() > 0.05
  np.testing.assert_allclose(got, full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_greedy_generation_equals_argmax_of_the_full_model(style):
  cfg, params = _model(style)
  prompt = jax.random.randint(jax.random.key(2), (3, 4), 0, cfg.vocab_size)
  out = np.asarray(gen.generate(cfg, params, prompt, jax.random.key(0), max_new_tokens=8))
  seq = np.zeros((3, 12), np.int32)   # one shape: a causal model ignores the zeros after t
  seq[:, :4] = prompt
  apply = jax.jit(lambda s: model.apply(cfg, params, s))   # one shape, one compile
  for t in range(4, 12):
    seq[:, t] = np.argmax(np.asarray(apply(jnp.asarray(seq)))[:, t - 1], -1)
  np.testing.assert_array_equal(out, seq[:, 4:])
  # top_k=1 and a vanishing top_p leave only the argmax, whatever the temperature.
  for kw in (dict(temperature=1.5, top_k=1), dict(temperature=1.5, top_p=1e-6)):
    np.testing.assert_array_equal(np.asarray(gen.generate(
        cfg, params, prompt, jax.random.key(5), max_new_tokens=8, **kw)), out)


def test_sampler_draws_only_from_the_kept_tokens_and_is_seeded():
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(1, 50)) * 3, jnp.float32)
  keys = jax.random.split(jax.random.key(0), 400)
  top5 = set(np.argsort(-np.asarray(logits[0]))[:5].tolist())
  assert set(np.asarray(jax.vmap(lambda k: gen.sample_logits(logits, k, 1.0, top_k=5)[0])(
      keys)).tolist()) <= top5
  probs = np.asarray(jax.nn.softmax(logits[0]))
  order = np.argsort(-probs)
  nucleus = set(order[:np.searchsorted(np.cumsum(probs[order]), 0.6) + 1].tolist())
  got = set(np.asarray(jax.vmap(lambda k: gen.sample_logits(logits, k, 1.0, top_p=0.6)[0])(
      keys)).tolist())
  assert got <= nucleus and len(got) >= min(2, len(nucleus))
  plain = np.asarray(jax.vmap(lambda k: gen.sample_logits(logits, k, 1.0)[0])(keys))
  assert len(set(plain.tolist())) > 5            # a real draw, not the argmax
  again = np.asarray(jax.vmap(lambda k: gen.sample_logits(logits, k, 1.0)[0])(keys))
  np.testing.assert_array_equal(plain, again)    # the same keys, the same tokens


def test_exactly_grown_model_writes_the_same_greedy_text():
  """tile + identity growth preserves the function, so greedy decoding is unchanged."""
  cfg, params = _model("llama", n_heads=4, n_kv_heads=2, head_dim=16)
  big = cfg.replace(d_model=2 * cfg.d_model, mlp_dim=2 * cfg.mlp_dim, n_heads=8, n_kv_heads=4,
                    n_layers=2 * cfg.n_layers)
  g = jax.jit(lambda p: grow(p, cfg, big, GrowthPlan(width="tile", depth="identity"),
                             jax.random.key(3)).params)(params)
  prompt = jax.random.randint(jax.random.key(4), (2, 6), 0, cfg.vocab_size)
  a = gen.generate(cfg, params, prompt, jax.random.key(0), max_new_tokens=16)
  b = gen.generate(big, g, prompt, jax.random.key(0), max_new_tokens=16)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory):
  """Tiny random GPT-2 and Llama (GQA) models saved by transformers, and the models."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  transformers.logging.set_verbosity_error()
  common = dict(vocab_size=300, bos_token_id=0, eos_token_id=None)
  configs = {
      "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=2, n_positions=64, **common),
      "llama": transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, max_position_embeddings=64,
                                        **common),
  }
  out = {}
  for i, (name, c) in enumerate(configs.items()):
    torch.manual_seed(i)
    m = transformers.AutoModelForCausalLM.from_config(c).eval()
    with torch.no_grad():
      for p in m.parameters():
        if p.ndim > 1:
          p.mul_(8.0)     # sharper logits than the default init: no near-ties in the argmax
    d = tmp_path_factory.mktemp(name)
    m.save_pretrained(d, safe_serialization=True)
    out[name] = (str(d), m)
  return torch, out


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_greedy_equals_transformers_generate(tiny_hf, name):
  from growlm.interop import hf
  torch, models = tiny_hf
  d, m = models[name]
  prompt = np.random.default_rng(7).integers(0, 300, size=(2, 6))
  with torch.no_grad():
    ref = m.generate(torch.as_tensor(prompt), max_new_tokens=20, do_sample=False,
                     pad_token_id=0, attention_mask=torch.ones(2, 6, dtype=torch.long))
  h = hf.import_hf(d)
  got = gen.generate(h.config, h.params, jnp.asarray(prompt, jnp.int32), jax.random.key(0),
                     max_new_tokens=20)
  assert ref.shape == (2, 26)
  np.testing.assert_array_equal(np.asarray(got), ref[:, 6:].numpy())


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  run = tmp_path_factory.mktemp("sample") / "run"
  commands.train(run_config(), str(run))
  return str(run)


def test_sample_command_library_and_cli(trained_run):
  texts = commands.sample(["def ", "import"], workdir=trained_run, max_new_tokens=12)
  assert len(texts) == 2 and all(len(t) == 1 and isinstance(t[0], str) for t in texts)
  drawn = commands.sample(["def "], workdir=trained_run, max_new_tokens=12, temperature=1.0,
                          num_samples=3, seed=1)[0]
  assert len(drawn) == 3 and len(set(drawn)) > 1
  assert commands.sample(["def "], workdir=trained_run, max_new_tokens=12, temperature=1.0,
                         num_samples=3, seed=1)[0] == drawn
  out = subprocess.run([sys.executable, "-m", "growlm.sample", f"--workdir={trained_run}",
                        "--prompt=def ", "--max_new_tokens=12"], cwd=REPO, capture_output=True,
                       text=True)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.splitlines()[0] == "--- prompt: 'def '"
  assert "def " + texts[0][0] in out.stdout


@pytest.mark.parametrize("kw, message", [
    (dict(), "give one of --workdir=RUN and --hf=HF_DIR"),
    (dict(max_new_tokens=10_000), "exceeds the model's max_len"),
    (dict(top_p=0.0), "top_p=0.0; accepted"),
    (dict(temperature=-1.0), "temperature=-1.0; accepted"),
    (dict(top_k=-2), "top_k=-2; accepted"),
    (dict(num_samples=0), "num_samples=0; accepted"),
])
def test_bad_sampling_requests_are_one_line(trained_run, kw, message):
  kw = dict(kw)
  where = {} if message.startswith("give one") else {"workdir": trained_run}
  with pytest.raises(GrowlmError, match=message):
    commands.sample(["x"], **where, **kw)
