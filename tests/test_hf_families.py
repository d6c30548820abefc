"""Qwen2 and Mistral against transformers: logits, export back, growth, and what is refused.

Tiny random HF models are built from config objects (nothing is downloaded) with every
parameter randomised (test_hf._randomise), so each tensor mapping shows up in the logits. Needs
the `interop` extra, like test_hf.py; without torch the whole file skips with one line.
"""

import json
import os

import pytest

from test_hf import NO_TORCH

torch = pytest.importorskip("torch", reason=NO_TORCH)
transformers = pytest.importorskip("transformers", reason=NO_TORCH)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from growlm.errors import GrowlmError  # noqa: E402
from growlm.grow import GrowthPlan  # noqa: E402
from growlm.grow.report import preservation_report  # noqa: E402
from growlm.interop import hf  # noqa: E402
from growlm.interop.hf_families import ARCHITECTURES  # noqa: E402
from growlm.model import decoder as model  # noqa: E402
from growlm.model.config import make_model_config  # noqa: E402
from test_hf import TOL, _grow, _load, _randomise, _torch_logits, tt  # noqa: E402,F401
from test_hf_layout import VOCAB, _edit_config, _random_params, random_tokens, tensors  # noqa: E402

_SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64, bos_token_id=0,
              eos_token_id=None, rms_norm_eps=1e-5)


def _hf_configs():
  return {
      "qwen2": transformers.Qwen2Config(num_key_value_heads=2, rope_theta=1e6, **_SIZES),
      "qwen2_tied": transformers.Qwen2Config(num_key_value_heads=4, tie_word_embeddings=True,
                                             **_SIZES),
      "mistral": transformers.MistralConfig(num_key_value_heads=2, sliding_window=None,
                                            **_SIZES),
      # A window as long as max_position_embeddings is full causal attention: accepted.
      "mistral_window": transformers.MistralConfig(num_key_value_heads=1, head_dim=16,
                                                   sliding_window=64, **_SIZES),
  }


@pytest.fixture(scope="module")
def models(tt, tmp_path_factory):
  """name -> (directory, torch model) for each tiny HF model."""
  out = {}
  for i, (name, c) in enumerate(_hf_configs().items()):
    m = _randomise(torch, transformers.AutoModelForCausalLM.from_config(c), seed=10 + i)
    d = tmp_path_factory.mktemp(name)
    m.save_pretrained(d, safe_serialization=True)
    out[name] = (str(d), m)
  # Qwen2 configs on the hub store a sliding_window that use_sliding_window=false switches off.
  _edit_config(out["qwen2"][0], sliding_window=32768, use_sliding_window=False)
  return out


def _growlm_logits(cfg, params, tokens):
  return np.asarray(model.apply(cfg, params, jnp.asarray(tokens, jnp.int32)))


@pytest.mark.parametrize("name", ["qwen2", "qwen2_tied", "mistral", "mistral_window"])
def test_import_matches_transformers_and_exports_back(tt, models, name, tmp_path):
  """Import: growlm's logits are transformers'. Export with the imported family: the same
  tensors bit for bit, and transformers loads the family and computes the same logits."""
  d, m = models[name]
  tokens = random_tokens()
  ref = _torch_logits(tt, m, tokens)
  h = hf.import_hf(d)
  assert h.arch == name.split("_")[0]
  assert (h.config.qkv_bias, h.config.use_bias) == (h.arch == "qwen2", False)
  assert h.config.max_len == 64 and h.config.tie_embeddings == name.endswith("tied")
  assert ref.std() > 0.5                    # the comparison is not between near-zero logits
  assert np.abs(_growlm_logits(h.config, h.params, tokens) - ref).max() < TOL
  assert hf.export_hf(h.params, h.config, str(tmp_path / "out"), arch=h.arch) == h.arch
  src, out = tensors(d), tensors(tmp_path / "out")
  assert sorted(src) == sorted(out)
  assert all(out[k].tobytes() == x.tobytes() for k, x in src.items())
  back = _load(tt, tmp_path / "out")
  assert type(back).__name__ == ARCHITECTURES[h.arch][0]
  assert back.config.sliding_window is None
  assert np.abs(_torch_logits(tt, back, tokens) - ref).max() < TOL


def test_mistral_exports_as_llama_unless_asked(tt, models, tmp_path):
  """Without a window Mistral computes what Llama does: by default export writes Llama, which
  every tool loads; arch='mistral' (an import's own arch) keeps the family."""
  d, m = models["mistral"]
  h = hf.import_hf(d)
  assert hf.export_hf(h.params, h.config, str(tmp_path / "llama")) == "llama"
  conf = json.loads((tmp_path / "llama" / "config.json").read_text())
  assert conf["model_type"] == "llama" and not conf["attention_bias"]
  tokens = random_tokens()
  assert np.abs(_torch_logits(tt, _load(tt, tmp_path / "llama"), tokens)
                - _torch_logits(tt, m, tokens)).max() < TOL


def test_growlm_qkv_bias_model_exports_as_qwen2(tt, tmp_path):
  """A growlm model with q/k/v biases only (RMSNorm, RoPE, SwiGLU) is a Qwen2 to transformers;
  its params hold exactly those biases."""
  cfg = make_model_config("nano", "llama", vocab_size=VOCAB, max_len=64, qkv_bias=True)
  params = _random_params(cfg, seed=3)
  attn = params["layers"]["attn"]
  assert {"query_bias", "key_bias", "value_bias"} <= set(attn) and "out_bias" not in attn
  assert not any(k.endswith("_bias") for k in params["layers"]["mlp"])
  assert hf.export_hf(params, cfg, str(tmp_path / "out")) == "qwen2"
  loaded = _load(tt, tmp_path / "out")
  assert type(loaded).__name__ == "Qwen2ForCausalLM"
  tokens = random_tokens(2, 16)
  want = _growlm_logits(cfg, params, tokens)
  assert want.std() > 0.5
  assert np.abs(_torch_logits(tt, loaded, tokens) - want).max() < TOL
  h = hf.import_hf(str(tmp_path / "out"))
  assert h.config == cfg
  jax.tree.map(np.testing.assert_array_equal, h.params, params)


def test_grown_qwen2_is_exact_and_exports_as_qwen2(tt, models, tmp_path):
  """import -> tile width + identity depth -> the report measures no deviation, and the grown
  model, written as Qwen2, computes the source's logits in transformers."""
  d, m = models["qwen2"]
  h = hf.import_hf(d)
  plan = GrowthPlan(width="tile", depth="identity")
  params, grown = _grow(h, plan, d_model=64, n_heads=8, n_kv_heads=4, mlp_dim=128, n_layers=3)
  assert grown.qkv_bias and params["layers"]["attn"]["query_bias"].shape == (3, 8, 8)
  t = random_tokens(2, 33, seed=4)
  batch = {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])}
  report = preservation_report(h.config, h.params, grown, params, [batch], plan)
  assert report["exact_expected"] and report["max_abs_logit_diff"] < TOL
  assert hf.export_hf(params, grown, str(tmp_path / "grown")) == "qwen2"
  big = _load(tt, tmp_path / "grown")
  assert type(big).__name__ == "Qwen2ForCausalLM" and big.config.num_hidden_layers == 3
  assert np.abs(_torch_logits(tt, big, t) - _torch_logits(tt, m, t)).max() < TOL


BAD = {
    "qwen2 sliding window": ("qwen2", dict(use_sliding_window=True, sliding_window=16),
                             "use_sliding_window=True is not supported; accepted: false"),
    "mistral short window": ("mistral", dict(sliding_window=16),
                             "sliding_window=16 < max_position_embeddings=64"),
    "mistral odd window": ("mistral", dict(sliding_window=0), "sliding_window=0; accepted"),
    "qwen3": ("qwen2", dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]), "q_norm"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_family_config_is_one_clear_error(models, case, tmp_path):
  name, changes, words = BAD[case]
  d = tmp_path / "copy"
  d.mkdir()
  for f in os.listdir(models[name][0]):
    (d / f).write_bytes(open(os.path.join(models[name][0], f), "rb").read())
  _edit_config(str(d), **changes)
  with pytest.raises(GrowlmError) as e:
    hf.import_hf(str(d))
  msg = str(e.value)
  assert words in msg and "accepted" in msg and "\n" not in msg and str(d) in msg, msg


@pytest.mark.parametrize("overrides, arch, words", [
    (dict(qkv_bias=True), "mistral", "qkv_bias=True (Mistral has no biases); accepted for this "
     "model: ['qwen2']"),
    (dict(qkv_bias=True), "llama", "qkv_bias=True without use_bias"),
    (dict(use_bias=True), "qwen2", "use_bias=True (Qwen2 has no o_proj or MLP biases)"),
    (dict(), "bert", "arch='bert'; accepted"),
])
def test_export_refuses_a_family_that_cannot_hold_the_model(overrides, arch, words, tmp_path):
  cfg = make_model_config("nano", "llama", **overrides)
  with pytest.raises(GrowlmError, match="HF export") as e:
    hf.export_hf(_random_params(cfg), cfg, str(tmp_path / "out"), arch=arch)
  assert words in str(e.value) and "\n" not in str(e.value)
  assert not os.listdir(tmp_path)
