"""Hugging Face directories without torch: growlm <-> HF layouts, refusals, command errors.

Directories here are written by growlm's own exporter from random params; the comparisons with
transformers itself are in test_hf.py (they need the `interop` extra).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from conftest import REPO, run_config, user_env
from growlm.config.typed import resolve
from growlm.interop import hf
from growlm.model import decoder as model
from growlm.init import source as warmstart
from growlm.errors import GrowlmError
from growlm.model.config import make_model_config

VOCAB = 300


def random_tokens(n=2, length=48, seed=0):
  """Random token ids [n, length] below VOCAB."""
  return np.random.RandomState(seed).randint(0, VOCAB, (n, length))


def tensors(directory):
  """Every tensor of a directory's *.safetensors files, by name."""
  out = {}
  for f in sorted(os.listdir(directory)):
    if f.endswith(".safetensors"):
      with safe_open(os.path.join(directory, f), "np") as st:
        out.update({k: st.get_tensor(k) for k in st.keys()})
  return out


def cli(*args):
  """Runs `python -m growlm.hf_main ARGS` (one CPU device, as a user would)."""
  env = user_env()
  return subprocess.run([sys.executable, "-m", "growlm.hf_main", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=300)


def _random_params(cfg, seed=0):
  """Random params in numpy (no compilation: these tests are about layouts)."""
  shapes, _ = model.abstract_params(cfg)
  rng = np.random.RandomState(seed)
  def leaf(path, s):
    gain = 1.0 if path[-1].key == "scale" else 0.0   # norm gains around 1
    return (gain + rng.standard_normal(s.shape) * 0.2).astype(s.dtype)
  return jax.tree_util.tree_map_with_path(leaf, shapes)


def _growlm_dir(tmp_path, style="gpt2", name="src", **overrides):
  """An HF directory written by growlm itself from random params (no torch needed)."""
  cfg = make_model_config("nano", style, vocab_size=VOCAB, max_len=64, **overrides)
  params = _random_params(cfg)
  d = tmp_path / name
  hf.export_hf(params, cfg, str(d), token_ids={"bos_token_id": 0, "eos_token_id": 0})
  return str(d), cfg, params


@pytest.mark.parametrize("style, overrides", [
    ("gpt2", {}), ("llama", {}), ("llama", dict(tie_embeddings=True, use_bias=True))])
def test_growlm_export_import_is_exact(tmp_path, style, overrides):
  d, cfg, params = _growlm_dir(tmp_path, style, **overrides)
  h = hf.import_hf(d)
  assert h.config == cfg
  jax.tree.map(np.testing.assert_array_equal, h.params, params)


def test_bias_free_layernorm_model_exports_as_gpt2_with_zero_biases(tmp_path):
  d, cfg, params = _growlm_dir(tmp_path, "gpt2", use_bias=False, tie_embeddings=False)
  h = hf.import_hf(d)
  assert h.arch == "gpt2" and h.config == cfg.replace(use_bias=True)
  assert not np.any(h.params["layers"]["mlp"]["wi_bias"])
  assert not np.any(h.params["final_norm"]["bias"])
  tokens = jnp.asarray(random_tokens(2, 16))
  got, want = model.apply(h.config, h.params, tokens), model.apply(cfg, params, tokens)
  assert float(jnp.std(want)) > 0.5
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_import_needs_no_torch(tmp_path):
  d, _, _ = _growlm_dir(tmp_path, "llama")
  code = ("import sys; sys.modules['torch'] = None; from growlm.interop import hf; "
          f"h = hf.import_hf({d!r}); hf.export_hf(h.params, h.config, {str(tmp_path / 'o')!r}); "
          "print(h.arch)")
  env = user_env()
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                     cwd=REPO, timeout=120)
  assert r.returncode == 0 and r.stdout.strip() == "llama", r.stderr[-2000:]


def _edit_config(d, **changes):
  path = os.path.join(d, "config.json")
  with open(path) as f:
    conf = json.load(f)
  conf.update(changes)
  with open(path, "w") as f:
    json.dump(conf, f)


def _rewrite_tensor(d, name, fn):
  path = os.path.join(d, "model.safetensors")
  all_tensors = tensors(d)
  all_tensors[name] = fn(all_tensors[name])
  save_file(all_tensors, path, metadata={"format": "pt"})


def _write_index(d, weight_map):
  with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
    json.dump({"weight_map": weight_map}, f)


BAD_DIRS = {
    "no config": ("gpt2", lambda d: os.remove(os.path.join(d, "config.json")), "no config.json"),
    "bert": ("gpt2", lambda d: _edit_config(d, model_type="bert", architectures=["BertModel"]),
             "model_type='bert'"),
    "rope scaling": ("llama", lambda d: _edit_config(
        d, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
        "rope_parameters.rope_type='linear'"),
    "legacy rope scaling": ("llama", lambda d: _edit_config(
        d, rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling.rope_type='dynamic'"),
    "sliding window": ("llama", lambda d: _edit_config(d, sliding_window=16), "sliding_window"),
    "activation": ("llama", lambda d: _edit_config(d, hidden_act="gelu"), "hidden_act"),
    "exact gelu": ("gpt2", lambda d: _edit_config(d, activation_function="gelu"),
                   "activation_function"),
    "shape": ("gpt2", lambda d: _edit_config(d, n_inner=128), "has shape (64, 256)"),
    "missing layer": ("gpt2", lambda d: _edit_config(d, n_layer=3), "tensor transformer.h.2."),
    "extra layer": ("llama", lambda d: _edit_config(d, num_hidden_layers=1), "unexpected tensors"),
    "int tensor": ("gpt2", lambda d: _rewrite_tensor(d, "transformer.wte.weight",
                                                     lambda x: x.astype(np.int32)), "dtype I32"),
    "nan": ("llama", lambda d: _rewrite_tensor(d, "model.norm.weight", lambda x: x * np.nan),
            "NaN"),
    "no safetensors": ("gpt2", lambda d: os.remove(os.path.join(d, "model.safetensors")),
                       "no *.safetensors"),
    "bad index": ("gpt2", lambda d: _write_index(d, {"transformer.wte.weight": "model-2.st"}),
                  "model-2.st, which is missing"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRS))
def test_bad_directory_is_one_clear_error(tmp_path, case):
  style, break_it, words = BAD_DIRS[case]
  d, _, _ = _growlm_dir(tmp_path, style)
  break_it(d)
  with pytest.raises(GrowlmError) as e:
    hf.import_hf(d)
  msg = str(e.value)
  assert words in msg and "\n" not in msg and d in msg, msg


@pytest.mark.parametrize("overrides, words", [
    (dict(d_model=96), "head_dim=32 (GPT-2 needs head_dim = d_model / n_heads = 96/2)"),
    (dict(positions="rope"), "positions='rope'"),
    (dict(n_kv_heads=1), "n_kv_heads=1"),
    (dict(style="llama", d_model=63, n_heads=2), "d_model=63"),
    (dict(style="llama", norm="layernorm"), "norm='layernorm'"),
])
def test_export_refuses_what_hf_cannot_express(tmp_path, overrides, words):
  style = overrides.pop("style", "gpt2")
  cfg = make_model_config("nano", style, **overrides)
  with pytest.raises(GrowlmError, match="HF export") as e:
    hf.export_hf(_random_params(cfg), cfg, str(tmp_path / "out"))
  assert words in str(e.value) and "\n" not in str(e.value)
  assert not os.listdir(tmp_path)


def test_hf_source_refuses_grown_optimizer_and_long_sequences(tmp_path):
  d, _, _ = _growlm_dir(tmp_path, "gpt2")
  c = resolve(run_config(**{"init.source": d, "init.optimizer": "grow", "data.seq_len": 32}))
  with pytest.raises(GrowlmError, match="no optimizer state"):
    warmstart.check_init(c, warmstart.read_source(d))
  c = resolve(run_config(**{"init.source": d, "data.seq_len": 128}))
  with pytest.raises(GrowlmError, match="seq_len=128 exceeds the source's max_len=64"):
    warmstart.check_init(c, warmstart.read_source(d))
  src = warmstart.read_source(d)
  assert src.hf and src.model.vocab_size == VOCAB and src.meta == {"flops": 0}


@pytest.mark.parametrize("args, words", [
    (["grow", "--config=configs/default.py:size=nano,runlocal"], "--source"),
    (["export", "--run=RUN"], "--out"),
    (["shrink"], "accepted: one of"),
])
def test_cli_usage_errors_are_one_line(args, words):
  r = cli(*args)
  err = [l for l in r.stderr.splitlines() if l.startswith("growlm: error:")]
  assert r.returncode == 2 and len(err) == 1 and words in err[0], r.stderr[-2000:]


def test_cli_bad_source_writes_nothing(tmp_path):
  d, _, _ = _growlm_dir(tmp_path, "gpt2")
  _edit_config(d, n_embd=96)
  for fmt in ("hf", "run"):
    r = cli("grow", f"--source={d}", f"--out={tmp_path / 'out'}", f"--format={fmt}",
             "--config=configs/default.py:size=nano,runlocal")
    err = [l for l in r.stderr.splitlines() if l.startswith("growlm: error:")]
    assert r.returncode == 2 and len(err) == 1 and "has shape" in err[0], r.stderr[-2000:]
    assert sorted(os.listdir(tmp_path)) == ["src"]
