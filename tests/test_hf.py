"""Hugging Face interop against transformers (PyTorch): logits, round trips, growth, commands.

Needs the `interop` extra (`make test` installs it); without torch the whole file skips with one
line. Tiny random HF models are built locally from configs (nothing is downloaded); all their
parameters are randomised (norm gains and biases too), so every tensor mapping shows up in the
logits, which are O(1). Layout and refusal tests that need no torch are in test_hf_layout.py.
"""

import copy
import json
import os
import sys

import pytest

NO_TORCH = "needs torch + transformers (the `interop` extra: pip install -e '.[interop]')"
torch = pytest.importorskip("torch", reason=NO_TORCH)
transformers = pytest.importorskip("transformers", reason=NO_TORCH)

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from conftest import REPO  # noqa: E402
from growlm import commands  # noqa: E402
from growlm.interop import hf  # noqa: E402
from growlm.model import decoder as model  # noqa: E402
from growlm.grow import GrowthPlan, grow, grown_config  # noqa: E402
from growlm.grow.report import preservation_report  # noqa: E402
from test_hf_layout import VOCAB, cli, random_tokens, tensors  # noqa: E402

TOL = 1e-4          # max |delta logits| against transformers, float32, eval mode


@pytest.fixture(scope="module")
def tt():
  """(torch, transformers), quiet."""
  transformers.logging.set_verbosity_error()
  return torch, transformers


def _hf_configs(transformers):
  gpt2, llama = transformers.GPT2Config, transformers.LlamaConfig
  common = dict(vocab_size=VOCAB, bos_token_id=0, eos_token_id=None)
  return {
      "gpt2": gpt2(n_embd=64, n_layer=2, n_head=2, n_positions=64, **common),
      "gpt2_untied": gpt2(n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=96,
                          layer_norm_epsilon=1e-4, activation_function="gelu_pytorch_tanh",
                          tie_word_embeddings=False, **common),
      "llama_gqa": llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         rope_theta=500.0, rms_norm_eps=1e-5, **common),
      "llama_tied": llama(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                          max_position_embeddings=64, tie_word_embeddings=True,
                          attention_bias=True, mlp_bias=True, **common),
      "llama_attn_bias": llama(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1,
                               max_position_embeddings=64, attention_bias=True, mlp_bias=False,
                               **common),
  }


def _randomise(torch, m, seed):
  """Every parameter random: gains around 1, biases and matrices of O(1) effect."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in m.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if p.ndim == 1 and name.endswith("weight"):
        p.copy_(1 + 0.2 * noise)
      else:
        p.copy_(noise * (0.2 if p.ndim == 1 else 0.15))
  return m.eval()


@pytest.fixture(scope="module")
def hf_models(tt, tmp_path_factory):
  """name -> (directory, torch model) for each tiny HF model."""
  torch, transformers = tt
  out = {}
  for i, (name, c) in enumerate(_hf_configs(transformers).items()):
    m = _randomise(torch, transformers.AutoModelForCausalLM.from_config(c), seed=i)
    d = tmp_path_factory.mktemp(name)
    m.save_pretrained(d, safe_serialization=True)
    out[name] = (str(d), m)
  return out


def _torch_logits(tt, m, tokens):
  torch, _ = tt
  with torch.no_grad():
    return m(torch.as_tensor(tokens)).logits.numpy()


def _load(tt, directory):
  _, transformers = tt
  return transformers.AutoModelForCausalLM.from_pretrained(directory).eval()


def _grow(h, plan, seed=1, **dims):
  """(params, config) of the imported model grown to `dims` (jitted: eager growth is slower)."""
  dst = h.config.replace(**dims)
  run = jax.jit(lambda p, r: grow(p, h.config, dst, plan, r).params)
  return run(h.params, jax.random.key(seed)), grown_config(h.config, dst, plan)


# ------------------------------------------------------------------- against transformers


@pytest.mark.parametrize("name", ["gpt2", "gpt2_untied", "llama_gqa", "llama_tied",
                                  "llama_attn_bias"])
def test_logits_match_transformers(tt, hf_models, name):
  d, m = hf_models[name]
  tokens = random_tokens()
  ref = _torch_logits(tt, m, tokens)
  h = hf.import_hf(d)
  got = np.asarray(model.apply(h.config, h.params, jnp.asarray(tokens, jnp.int32)))
  assert ref.std() > 0.5                    # the comparison is not between near-zero logits
  assert np.abs(got - ref).max() < TOL
  assert h.arch == name.split("_")[0]


@pytest.mark.parametrize("name", ["gpt2", "gpt2_untied", "llama_gqa", "llama_tied"])
def test_import_export_round_trips_bit_for_bit(hf_models, name, tmp_path):
  d, _ = hf_models[name]
  h = hf.import_hf(d)
  hf.export_hf(h.params, h.config, str(tmp_path / "out"), tokenizer_from=d)
  src, out = tensors(d), tensors(tmp_path / "out")
  assert sorted(src) == sorted(out)
  for k, x in src.items():
    assert out[k].dtype == x.dtype and out[k].tobytes() == x.tobytes(), k
  a, b = (json.loads(open(os.path.join(p, "config.json")).read()) for p in (d, tmp_path / "out"))
  skip = {"transformers_version", "attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type",
          "summary_use_proj", "summary_activation", "summary_proj_to_labels",
          "summary_first_dropout", "activation_function"}
  for k, v in a.items():
    if k not in skip:
      assert b.get(k) == v, (k, b.get(k), v)


def test_llama_with_one_bias_flag_imports_zeros_for_the_other(tt, hf_models, tmp_path):
  d, m = hf_models["llama_attn_bias"]
  h = hf.import_hf(d)
  assert h.config.use_bias
  assert not np.any(h.params["layers"]["mlp"]["wi_gate_bias"])
  assert np.abs(h.params["layers"]["attn"]["query_bias"]).min() > 0
  hf.export_hf(h.params, h.config, str(tmp_path / "out"))
  conf = json.loads((tmp_path / "out" / "config.json").read_text())
  assert conf["attention_bias"] and conf["mlp_bias"]
  tokens = random_tokens()
  diff = _torch_logits(tt, _load(tt, tmp_path / "out"), tokens) - _torch_logits(tt, m, tokens)
  assert np.abs(diff).max() < TOL


def test_sharded_bfloat16_checkpoint_round_trips(tt, hf_models, tmp_path):
  torch, _ = tt
  _, m = hf_models["llama_gqa"]
  src = tmp_path / "bf16"
  copy.deepcopy(m).to(torch.bfloat16).save_pretrained(src, max_shard_size="40KB")
  assert (src / "model.safetensors.index.json").exists()
  h = hf.import_hf(str(src))
  assert h.params["embed"].dtype == np.float32
  ref = hf.import_hf(hf_models["llama_gqa"][0])
  np.testing.assert_array_equal(h.params["embed"],
                                ref.params["embed"].astype(jnp.bfloat16).astype(np.float32))
  old_umask = os.umask(0o027)
  try:
    hf.export_hf(h.params, h.config, str(tmp_path / "out"), dtype="bfloat16",
                 max_shard_bytes=40_000)
  finally:
    os.umask(old_umask)
  assert (tmp_path / "out" / "model.safetensors.index.json").exists()
  # every file as open() makes it under the umask (safetensors alone makes its files 0600)
  modes = {f.name: oct(f.stat().st_mode & 0o777) for f in (tmp_path / "out").iterdir()}
  assert len(modes) > 3 and set(modes.values()) == {"0o640"}, modes
  a, b = tensors(src), tensors(tmp_path / "out")
  assert sorted(a) == sorted(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
  loaded = _load(tt, tmp_path / "out")
  assert next(loaded.parameters()).dtype == torch.bfloat16


EXACT = {
    "gpt2": (dict(d_model=128, n_heads=4, n_kv_heads=4, mlp_dim=512, n_layers=4), "tile"),
    "llama_gqa": (dict(d_model=96, n_heads=6, n_kv_heads=3, mlp_dim=192, n_layers=3), "zeros"),
    "llama_tied": (dict(d_model=128, n_heads=8, n_kv_heads=8, mlp_dim=192, n_layers=3), "tile"),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_growth_runs_in_transformers(tt, hf_models, name, tmp_path):
  """import -> exact growth -> export: transformers computes the original model's logits and
  generates the same 20 greedy tokens."""
  torch, _ = tt
  d, m = hf_models[name]
  dims, width = EXACT[name]
  h = hf.import_hf(d)
  params, grown = _grow(h, GrowthPlan(width=width), **dims)
  hf.export_hf(params, grown, str(tmp_path / "grown"), tokenizer_from=d)
  big = _load(tt, tmp_path / "grown")
  assert sum(p.numel() for p in big.parameters()) > 2 * sum(p.numel() for p in m.parameters())
  tokens = random_tokens()
  assert np.abs(_torch_logits(tt, big, tokens) - _torch_logits(tt, m, tokens)).max() < TOL
  eps = big.config.layer_norm_epsilon if name == "gpt2" else big.config.rms_norm_eps
  assert eps == pytest.approx(grown.norm_eps)
  if width == "zeros":  # the padded residual stream rescales eps by D/D'
    assert eps == pytest.approx(m.config.rms_norm_eps * 64 / 96)
  prompt = torch.as_tensor(random_tokens(1, 8, seed=3))
  kw = dict(max_new_tokens=20, do_sample=False, pad_token_id=0,
            attention_mask=torch.ones_like(prompt))
  with torch.no_grad():
    a, b = m.generate(prompt, **kw), big.generate(prompt, **kw)
  assert a.shape == (1, 28)
  assert torch.equal(a, b)


@pytest.mark.parametrize("name, width, dims", [
    ("gpt2", "zeros", dict(d_model=96, mlp_dim=384, n_heads=3, n_kv_heads=3)),
    ("llama_gqa", "noise", dict(d_model=128, mlp_dim=256, n_heads=8, n_kv_heads=4)),
])
def test_approximate_growth_deviation_matches_report(tt, hf_models, name, width, dims,
                                                      tmp_path):
  """zeros under LayerNorm and noise are approximate: the deviation transformers shows between
  the original and the grown model is the one growlm's preservation report measured."""
  d, m = hf_models[name]
  h = hf.import_hf(d)
  plan = GrowthPlan(width=width, noise_scale=0.1)
  params, grown = _grow(h, plan, seed=2, **dims)
  t = random_tokens(2, 33, seed=4)
  batch = {"inputs": jnp.asarray(t[:, :-1]), "targets": jnp.asarray(t[:, 1:])}
  report = preservation_report(h.config, h.params, grown, params, [batch], plan)
  hf.export_hf(params, grown, str(tmp_path / "grown"))
  hf_dev = np.abs(_torch_logits(tt, _load(tt, tmp_path / "grown"), t[:, :-1])
                  - _torch_logits(tt, m, t[:, :-1]))
  assert not report["exact_expected"] and report["max_abs_logit_diff"] > 1e-2
  assert abs(hf_dev.max() - report["max_abs_logit_diff"]) < TOL
  assert hf_dev.mean() == pytest.approx(report["mean_abs_logit_diff"], rel=1e-3)


def _run_config(**overrides):
  sys.path.insert(0, str(REPO))
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config("size=nano,runlocal")
  c.log.progress_bar = False
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  c.checkpoint.async_save = False
  c.eval.batches = 1
  for path, value in overrides.items():
    *parents, last = path.split(".")
    node = c
    for p in parents:
      node = node[p]
    node[last] = value
  return c


def test_grow_into_a_run_then_export_it(tt, hf_models, tmp_path):
  """HF source -> grown orbax run dir (through the init seam) -> HF export: still the source's
  function in transformers."""
  d, m = hf_models["llama_gqa"]
  c = _run_config(**{"model.d_model": 128, "model.n_heads": 8, "model.n_kv_heads": 4,
                     "model.head_dim": 16, "model.mlp_dim": 256, "model.n_layers": 3,
                     "model.max_len": 64, "init.plan.width": "tile"})
  commands.grow_to_run(c, d, str(tmp_path / "run"))
  report = json.loads((tmp_path / "run" / "growth_report.json").read_text())
  assert report["exact_expected"] and report["max_abs_logit_diff"] < TOL
  assert report["source_flops"] == 0 and report["src_params"] < report["dst_params"]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())["model"]
  assert saved["vocab_size"] == VOCAB and saved["norm"] == "rmsnorm"   # taken from the source
  assert c.model.vocab_size != VOCAB and c.model.norm == "layernorm"   # the caller's is unchanged
  assert commands.export_run(str(tmp_path / "run"), str(tmp_path / "hf")) == "llama"
  assert json.loads((tmp_path / "hf" / "config.json").read_text())["bos_token_id"] == 0
  tokens = random_tokens()
  diff = _torch_logits(tt, _load(tt, tmp_path / "hf"), tokens) - _torch_logits(tt, m, tokens)
  assert np.abs(diff).max() < TOL


def test_grow_to_hf_reports_and_writes_a_directory(tt, hf_models, tmp_path, capsys):
  """The library form of `grow --format=hf`: style and vocabulary come from the source, the
  report is printed and saved, and transformers computes the source's function."""
  d, m = hf_models["gpt2"]
  c = _run_config(**{"model.d_model": 128, "model.n_heads": 4, "model.n_kv_heads": 4,
                     "model.mlp_dim": 512, "model.max_len": 64})
  report = commands.grow_to_hf(c, d, str(tmp_path / "grown"))
  out = capsys.readouterr().out
  assert "max |delta logits|" in out and "vocab_size 258 -> 300" in out
  assert sorted(os.listdir(tmp_path / "grown")) == [
      "config.json", "generation_config.json", "growth_report.json", "model.safetensors"]
  assert report["hf_architecture"] == "gpt2" and report["max_abs_logit_diff"] < TOL
  tokens = random_tokens()
  assert np.abs(_torch_logits(tt, _load(tt, tmp_path / "grown"), tokens)
                - _torch_logits(tt, m, tokens)).max() < TOL


@pytest.mark.slow
def test_commands_grow_train_and_export(tt, hf_models, tmp_path):
  """The three commands end to end, as the README shows them."""
  d, m = hf_models["gpt2"]
  r = cli("grow", f"--source={d}", f"--out={tmp_path / 'grown'}",
           "--config=configs/default.py:size=nano,runlocal", "--config.model.d_model=128",
           "--config.model.n_heads=4", "--config.model.n_kv_heads=4",
           "--config.model.mlp_dim=512", "--config.model.max_len=64")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "grown gpt2 model written" in r.stdout
  tokens = random_tokens()
  assert np.abs(_torch_logits(tt, _load(tt, tmp_path / "grown"), tokens)
                - _torch_logits(tt, m, tokens)).max() < TOL
  d, _ = hf_models["llama_tied"]
  r = cli("train", f"--source={d}", "--config=configs/default.py:size=nano,style=llama,runlocal",
           "--as_is", f"--workdir={tmp_path / 'run'}", "--config.train.num_steps=8",
           "--config.log.progress_bar=False")
  assert r.returncode == 0, r.stderr[-3000:]
  saved = json.loads((tmp_path / "run" / "config.json").read_text())
  assert saved["model"]["head_dim"] == 32 and saved["model"]["tie_embeddings"]
  report = json.loads((tmp_path / "run" / "growth_report.json").read_text())
  assert report["method"] == "none" and report["max_abs_logit_diff"] < TOL
  r = cli("export", f"--run={tmp_path / 'run'}", f"--out={tmp_path / 'hf'}", "--dtype=bfloat16")
  assert r.returncode == 0, r.stderr[-3000:]
  conf = json.loads((tmp_path / "hf" / "config.json").read_text())
  assert conf["model_type"] == "llama" and conf["dtype"] == "bfloat16"
  assert _load(tt, tmp_path / "hf").config.tie_word_embeddings
