"""Hugging Face interop: a local `config.json` + `*.safetensors` directory <-> growlm config and
params (the codec; the commands built on it are in growlm.commands). No torch: tensors are read
and written with `safetensors` in numpy.

Import (`import_hf`) accepts GPT-2, Llama, Qwen2 and Mistral checkpoints, single-file or
sharded with `model.safetensors.index.json`, in float32/float16/bfloat16/float64. Export
(`export_hf`) writes `config.json` + `model.safetensors` that
`transformers.AutoModelForCausalLM.from_pretrained` loads: GPT-2 when the growlm config is
expressible as GPT-2, Qwen2 for q/k/v-only biases (qkv_bias), Llama otherwise, or the family
asked for (arch='mistral'). Anything either side cannot express is refused with one line naming
the field; families are in growlm.interop.hf_families, tensor layouts in growlm.interop.hf_layout.
growlm has one `use_bias` flag: a Llama with only one of attention_bias / mlp_bias is imported
with the other biases set to zero (the same function) and exported with both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import stat
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes  # noqa: F401  registers bfloat16 with numpy, so safetensors can return BF16
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from growlm.interop import hf_families as families
from growlm.interop import hf_layout as layout
from growlm.model import decoder as model_lib
from growlm import fs, transfer, trees
from growlm import lock as lock_lib
from growlm.errors import GrowlmError, first_line
from growlm.interop.hf_families import hf_architecture, hf_config  # noqa: F401  (public API)
from growlm.model.config import DTYPES, ModelConfig

_err = families.err
_FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
# Buffers some checkpoints carry that are not parameters (GPT-2's causal mask, old RoPE tables).
_BUFFERS = re.compile(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$|\.rotary_emb\.inv_freq$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")
_INDEX = "model.safetensors.index.json"


@dataclasses.dataclass
class HFModel:
  """An imported checkpoint: growlm config and params (numpy, growlm layout)."""
  config: ModelConfig
  params: dict
  arch: str                 # gpt2 | llama | qwen2 | mistral (export_hf(arch=...) keeps it)
  hf_config: dict           # config.json as read
  directory: str


# ------------------------------------------------------------------------------ config.json


def _read_json(directory: str, name: str) -> dict:
  path = os.path.join(directory, name)
  try:
    with open(path) as f:
      out = json.load(f)
  except (OSError, ValueError) as e:
    raise _err(directory, f"cannot read {name} ({type(e).__name__}: {e})".splitlines()[0]) from e
  if not isinstance(out, dict):
    raise _err(directory, f"{name} is not a JSON object")
  return out


def is_hf_dir(directory: str) -> bool:
  """True for a Hugging Face model directory (config.json names a model_type or architectures
  and there is no growlm checkpoints/); says nothing about whether it is importable."""
  if fs.is_url(directory):
    try:
      raw = json.loads(fs.read_bytes(fs.join(directory, "config.json")))
    except (OSError, ValueError):
      return False
    return (isinstance(raw, dict) and ("model_type" in raw or "architectures" in raw)
            and not fs.isdir(fs.join(directory, "checkpoints")))
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path) or os.path.isdir(os.path.join(directory, "checkpoints")):
    return False
  try:
    with open(path) as f:
      raw = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(raw, dict) and ("model_type" in raw or "architectures" in raw)


def read_hf_config(directory: str, *, param_dtype: str = "float32", dtype: str = "float32"
                   ) -> tuple[str, ModelConfig, dict, set[str]]:
  """(arch, growlm config, raw config.json, bias groups in the file) of an HF directory; no
  tensors are read. Unknown architectures and unsupported options raise GrowlmError."""
  for name, v in (("param_dtype", param_dtype), ("dtype", dtype)):
    if v not in DTYPES:
      raise GrowlmError(f"HF import {name}={v!r}; accepted: {DTYPES}")
  directory = transfer.mirror(directory)   # gs://: read from a local copy (safetensors needs files)
  if not os.path.isfile(os.path.join(directory, "config.json")):
    raise _err(directory, "no config.json; accepted: a directory saved by save_pretrained")
  raw = _read_json(directory, "config.json")
  arch, fields, biases = families.model_fields(directory, raw)
  try:
    cfg = ModelConfig(**fields, dtype=dtype, param_dtype=param_dtype, dropout_rate=0.0)
  except GrowlmError as e:
    raise _err(directory, f"config.json maps to an invalid growlm config ({e})") from e
  return arch, cfg, raw, biases


# ------------------------------------------------------------------------------ tensors


def _tensor_index(directory: str) -> dict[str, tuple[str, tuple[int, ...], str]]:
  """name -> (file, shape, safetensors dtype) from the files' headers (no data read)."""
  index_path = os.path.join(directory, _INDEX)
  if os.path.isfile(index_path):
    weight_map = _read_json(directory, _INDEX).get("weight_map")
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(v, str) for v in weight_map.values())):
      raise _err(directory, f"{_INDEX} has no weight_map of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    for f in files:
      if not os.path.isfile(os.path.join(directory, f)):
        raise _err(directory, f"{_INDEX} names {f}, which is missing")
  else:
    weight_map = None
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    if not files:
      others = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".h5", ".msgpack"))]
      raise _err(directory, "no *.safetensors files" + (f" (found {others[:3]})" if others else "")
                 + "; accepted: safetensors weights (save_pretrained(safe_serialization=True))")
  out: dict[str, tuple[str, tuple[int, ...], str]] = {}
  for f in files:
    try:
      with safe_open(os.path.join(directory, f), "np") as st:
        for k in st.keys():
          sl = st.get_slice(k)
          if k in out:
            raise _err(directory, f"tensor {k} is in both {out[k][0]} and {f}")
          out[k] = (f, tuple(sl.get_shape()), sl.get_dtype())
    except (SafetensorError, OSError) as e:
      raise _err(directory, f"cannot read {f} ({first_line(e)})") from e
  for k, f in (weight_map or {}).items():
    if out.get(k, (f,))[0] != f:
      raise _err(directory, f"{_INDEX} puts {k} in {f}, but it is in {out[k][0]}")
    if k not in out:
      raise _err(directory, f"{_INDEX} lists {k} in {f}, which does not hold it")
  return out


def _prefix(arch: str, names) -> str:
  """The model prefix (`transformer.` / `model.`), or '' for a checkpoint of the base model."""
  p = layout.PREFIX[arch]
  return p if any(n.startswith(p) for n in names) else ""


def _check_tensors(directory, arch, cfg, raw, biases, index) -> tuple[list[layout.Spec], str]:
  """Every expected tensor present with its shape and a float dtype; nothing unexplained."""
  specs = layout.specs(arch, cfg, biases)
  prefix = _prefix(arch, index)
  expected = set()
  for spec in specs:
    for name in layout.names(spec, prefix, cfg.n_layers):
      expected.add(name)
      if name not in index:
        raise _err(directory, f"tensor {name} is missing (config.json: {arch}, "
                   f"{cfg.n_layers} layers, tie_word_embeddings={cfg.tie_embeddings})")
      f, shape, dt = index[name]
      if shape != spec.shape:
        raise _err(directory, f"{f}: tensor {name} has shape {shape}, config.json implies "
                   f"{spec.shape}")
      if dt not in _FLOAT_DTYPES:
        raise _err(directory, f"{f}: tensor {name} has dtype {dt}; accepted: {_FLOAT_DTYPES}")
  extra = sorted(n for n in set(index) - expected if not _BUFFERS.search(n)
                 and not (n == "lm_head.weight" and cfg.tie_embeddings))
  if extra:
    raise _err(directory, f"unexpected tensors {extra[:4]}{' ...' if len(extra) > 4 else ''} "
               f"for a {arch} model with {cfg.n_layers} layers (config.json: {_fields_str(raw)})")
  return specs, prefix


def _fields_str(raw: dict) -> str:
  keys = ("n_layer", "num_hidden_layers", "attention_bias", "mlp_bias", "tie_word_embeddings")
  return ", ".join(f"{k}={raw[k]}" for k in keys if k in raw)


def check_hf_dir(directory: str, **dtypes) -> tuple[str, ModelConfig, dict]:
  """Validates config.json and the tensors' names, shapes and dtypes (headers only, no data):
  (arch, growlm config, raw config.json). One GrowlmError for anything wrong."""
  directory = transfer.mirror(directory)
  arch, cfg, raw, biases = read_hf_config(directory, **dtypes)
  _check_tensors(directory, arch, cfg, raw, biases, _tensor_index(directory))
  return arch, cfg, raw


def import_hf(directory: str, *, param_dtype: str = "float32", dtype: str = "float32"
              ) -> HFModel:
  """Reads an HF GPT-2, Llama, Qwen2 or Mistral directory into growlm params (numpy,
  `param_dtype`) and config (compute `dtype`). Refuses, with one line naming the field, anything
  it cannot map exactly."""
  directory = transfer.mirror(directory)
  arch, cfg, raw, biases = read_hf_config(directory, param_dtype=param_dtype, dtype=dtype)
  index = _tensor_index(directory)
  specs, prefix = _check_tensors(directory, arch, cfg, raw, biases, index)
  np_dtype = jnp.dtype(param_dtype)
  params: dict = {}
  with contextlib.ExitStack() as stack:
    handles: dict[str, Any] = {}

    def read(name):
      f = index[name][0]
      if f not in handles:
        handles[f] = stack.enter_context(safe_open(os.path.join(directory, f), "np"))
      x = handles[f].get_tensor(name)
      if not np.isfinite(x).all():
        raise _err(directory, f"{f}: tensor {name} holds NaN or Inf values")
      return x.astype(np_dtype)

    for spec in specs:
      per_layer = [spec.to_growlm(read(n)) for n in layout.names(spec, prefix, cfg.n_layers)]
      for j, path in enumerate(spec.paths):
        parts = [p[j] for p in per_layer]
        trees.put(params, path, np.stack(parts) if path[0] == "layers" else parts[0])
    if cfg.tie_embeddings and "lm_head.weight" in index:
      if not np.array_equal(read("lm_head.weight"), params["embed"]):
        raise _err(directory, "lm_head.weight differs from the token embeddings although "
                   "tie_word_embeddings is true")
  shapes, _ = model_lib.abstract_params(cfg)
  for path in trees.paths(shapes):
    # Biases the file does not hold (a Llama with only one of attention_bias / mlp_bias): zero
    # computes what the HF model computes.
    if path[-1].endswith("_bias"):
      try:
        trees.get(params, path)
      except KeyError:
        trees.put(params, path, np.zeros(trees.get(shapes, path).shape, np_dtype))
  _check_params(params, cfg, f"import of {directory}")
  return HFModel(cfg, params, arch, raw, directory)


def _check_params(params, cfg: ModelConfig, what: str) -> None:
  trees.check_like(params, model_lib.abstract_params(cfg)[0], what)


# ------------------------------------------------------------------------------ export


def _host(x) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def to_hf_tensors(params, cfg: ModelConfig, arch: str | None = None,
                  dtype: str | None = None) -> dict[str, np.ndarray]:
  """growlm params -> {HF tensor name: array} for `arch` (default: hf_architecture(cfg)).
  Biases the family always has but the model lacks (GPT-2's in a use_bias=False model, Qwen2's
  q/k/v ones in a bias-free model) are written as zeros."""
  arch = hf_architecture(cfg, arch)
  _check_params(params, cfg, "HF export")
  np_dtype = None if dtype is None else jnp.dtype(dtype)
  out = {}
  held = layout.held_biases(cfg)
  for spec in layout.specs(arch, cfg, layout.hf_biases(arch, cfg)):
    if spec.bias and spec.bias not in held:
      leaves = None
    else:
      leaves = [_host(trees.get(params, p)) for p in spec.paths]
    for i, name in enumerate(layout.names(spec, layout.PREFIX[arch], cfg.n_layers)):
      if leaves is None:
        x = np.zeros(spec.shape, np.dtype(params["embed"].dtype))
      else:
        x = spec.to_hf(*[v[i] if p[0] == "layers" else v for v, p in zip(leaves, spec.paths)])
      out[name] = np.ascontiguousarray(x if np_dtype is None else x.astype(np_dtype))
  return out


def _write_tensors(tensors: dict[str, np.ndarray], directory: str, max_shard_bytes: int,
                   mode: int):
  """Writes the safetensors file(s) (and their index when sharded) with permission bits `mode`:
  safetensors creates its files owner-only (0600), which a group sharing the directory, or a
  server reading it as another user, could not read."""
  meta = {"format": "pt"}   # transformers refuses safetensors files without a known format

  def save(names, fname):
    path = os.path.join(directory, fname)
    save_file({n: tensors[n] for n in names}, path, metadata=meta)
    os.chmod(path, mode)

  shards, size = [[]], 0
  for name, x in tensors.items():
    if shards[-1] and size + x.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += x.nbytes
  if len(shards) == 1:
    save(shards[0], "model.safetensors")
    return
  weight_map = {}
  for k, names in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    save(names, fname)
    weight_map.update({n: fname for n in names})
  index = {"metadata": {"total_size": int(sum(x.nbytes for x in tensors.values()))},
           "weight_map": weight_map}
  with open(os.path.join(directory, _INDEX), "w") as f:
    json.dump(index, f, indent=2, sort_keys=True)


def copy_tokenizer_files(src: str, dst: str) -> list[str]:
  """Copies the tokenizer (and generation config) files `src` has into `dst`; returns them.
  `src` may also be a tokenizer.json file."""
  if os.path.isfile(src):
    shutil.copy(src, os.path.join(dst, "tokenizer.json"))
    return ["tokenizer.json"]
  copied = [f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(src, f))]
  for f in copied:
    shutil.copy(os.path.join(src, f), os.path.join(dst, f))
  return copied


def export_hf(params, cfg: ModelConfig, out: str, *, tokenizer_from: str | None = None,
              token_ids: dict | None = None, dtype: str | None = None,
              extra_json: dict | None = None, max_shard_bytes: int = 4 << 30,
              arch: str | None = None) -> str:
  """Writes `out` (config.json, model.safetensors, tokenizer files of `tokenizer_from`, and
  `extra_json` {filename: object}) for transformers; returns the architecture written: `arch`
  (e.g. an imported model's own, to write a Mistral back as Mistral) or hf_architecture's
  choice (gpt2 | qwen2 | llama).

  Atomic: built under OUT.partial and renamed, so on any error nothing is left at `out`.
  Special token ids come from `token_ids`, else from `tokenizer_from`'s config.json.
  `dtype` (float32 | bfloat16 | float16 | float64) defaults to the params' own dtype.
  """
  arch = hf_architecture(cfg, arch)
  if dtype is not None and dtype not in DTYPES:
    raise GrowlmError(f"HF export dtype={dtype!r}; accepted: {DTYPES}")
  if fs.exists(out):
    raise GrowlmError(f"HF export: out={out} exists; accepted: a path that does not exist yet")
  if tokenizer_from and not fs.exists(tokenizer_from):
    raise GrowlmError(f"HF export: tokenizer_from={tokenizer_from!r} does not exist")
  tokenizer_from = tokenizer_from and transfer.mirror(tokenizer_from)
  if token_ids is None and tokenizer_from and os.path.isfile(
      os.path.join(tokenizer_from, "config.json")):
    src = _read_json(tokenizer_from, "config.json")
    token_ids = {k: src.get(k) for k in families.TOKEN_ID_FIELDS}
  tensors = to_hf_tensors(params, cfg, arch, dtype)
  written = str(next(iter(tensors.values())).dtype)
  conf = hf_config(cfg, arch, token_ids=token_ids, dtype=written)
  if jax.process_index() != 0:
    return arch
  if fs.is_url(out):   # built locally, then uploaded with config.json (what readers check) last
    with tempfile.TemporaryDirectory(prefix="growlm-export-") as tmp:
      _write_hf_dir(os.path.join(tmp, "out"), conf, tensors, tokenizer_from, extra_json,
                    max_shard_bytes)
      fs.rename(os.path.join(tmp, "out"), out, last="config.json")
    return arch
  _write_hf_dir(out, conf, tensors, tokenizer_from, extra_json, max_shard_bytes)
  return arch


def _write_hf_dir(out: str, conf: dict, tensors: dict, tokenizer_from: str | None,
                  extra_json: dict | None, max_shard_bytes: int) -> None:
  """Builds `out` under OUT.partial, held by a lease (growlm.lock) while it is written, so a
  second export to the same `out` is refused rather than let to delete this one's; renames it."""
  partial = out.rstrip("/") + ".partial"
  lock_lib.clear_leftover(partial, f"out={out}")
  lease = lock_lib.RunLock(partial).acquire()   # creates the directory
  try:
    with open(os.path.join(partial, "config.json"), "w") as f:
      json.dump(conf, f, indent=2, sort_keys=True)
    # the mode open() gave config.json (0666 less the umask) for the weights too
    mode = stat.S_IMODE(os.stat(os.path.join(partial, "config.json")).st_mode)
    _write_tensors(tensors, partial, max_shard_bytes, mode)
    if tokenizer_from:
      copy_tokenizer_files(tokenizer_from, partial)
    for name, obj in (extra_json or {}).items():
      with open(os.path.join(partial, name), "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
    lease.release()
    if os.path.exists(out):
      raise GrowlmError(f"HF export: out={out} was written by another launch while this one ran; "
                        f"this one's result is discarded")
    os.rename(partial, out)
  except BaseException:
    if lease.held:
      lease.release()
    shutil.rmtree(partial, ignore_errors=True)
    raise
