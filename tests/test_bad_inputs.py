"""Bad inputs, end to end: every one stops with one `growlm: error:` line, exit code 2, no
traceback, and nothing written or changed (the reliability issue, item 6).

Two kinds of cases:

* In process (most of them): the library call a command makes (growlm.commands.*, the sweep
  launcher) must raise GrowlmError with a one-line message naming the field; the CLI's own
  `fail()` must turn it into exactly one `growlm: error:` line and exit code 2; and the files
  under the case's directory, the shared trained run and the shared sources must be byte-for-byte
  the same listing (paths, types, sizes, mtimes) as before the call.
* Subprocess (the command lines themselves, run concurrently from one module fixture): exit code
  2, exactly one non-log stderr line and it starts with `growlm: error:`, no `Traceback`, and
  nothing written under the case's directory or the shared run.

One tiny run (nano on a small text file, its step-0 checkpoint) is made once per module and
copied where a case damages it. No case trains or compiles a model: every refusal comes first.
Bytecode writing is on (PYTHONDONTWRITEBYTECODE off), so a config file compiled into a
__pycache__/ next to it counts as something written.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import numpy as np
import pytest

from conftest import REPO, run_config, user_env
from growlm import commands
from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError
from growlm.experiments import sweep
from test_hf_layout import _edit_config, _growlm_dir, _rewrite_tensor, _write_index

VOCAB_HF = 300   # the vocabulary of the HF directories test_hf_layout writes

# The trained run every run-dir, checkpoint and growth case starts from (seconds to train).
RUN_FIELDS = {"train.num_steps": 2, "train.warmup_steps": 1, "eval.every_steps": 2,
              "eval.batches": 1, "checkpoint.every_steps": 2, "log.every_steps": 1,
              "data.max_bytes": 0}
CORPUS = "".join(f"line {i}: the quick brown fox jumps over the lazy dog {i * 7 % 13}\n"
                 for i in range(1200))

# ------------------------------------------------------------------------------------------
# Helpers.


def _snapshot(*roots: str) -> dict[str, tuple]:
  """Every path under `roots` (roots included) with its type, size and mtime."""
  out = {}
  for root in roots:
    if not os.path.lexists(root):
      out[root] = None
      continue
    paths = [root]
    for dirpath, dirnames, filenames in os.walk(root):
      paths += [os.path.join(dirpath, n) for n in dirnames + filenames]
    for p in paths:
      st = os.lstat(p)
      kind = stat.S_IFMT(st.st_mode)
      out[p] = (kind, None if stat.S_ISDIR(st.st_mode) else st.st_size, st.st_mtime_ns)
  return out


def _diff(before: dict, after: dict) -> list[str]:
  """What changed between two snapshots, as readable lines (empty: nothing)."""
  out = [f"new: {p}" for p in sorted(set(after) - set(before))]
  out += [f"removed: {p}" for p in sorted(set(before) - set(after))]
  out += [f"changed: {p} {before[p]} -> {after[p]}" for p in sorted(set(before) & set(after))
          if before[p] != after[p]]
  return out


def _default_module():
  if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
  from configs import default  # pylint: disable=g-import-not-at-top
  return default


def _cfg(style: str = "gpt2", **dotted):
  """run_config (nano, runlocal, one device) in `style`, with RUN_FIELDS and `dotted` set."""
  fields = {**RUN_FIELDS, **dotted}
  if style == "gpt2":
    return run_config(**fields)
  from growlm.config import files  # pylint: disable=g-import-not-at-top
  c = _default_module().get_config(f"size=nano,style={style},runlocal")
  c.log.progress_bar = False   # as run_config does
  c.mesh = {"data": 1, "fsdp": 1, "tensor": 1}
  c.checkpoint.async_save = False
  for k, v in fields.items():
    files.set_field(c, k, v, what="test")
  return c


def _set(d: dict, dotted: str, value: Any) -> None:
  *head, last = dotted.split(".")
  for p in head:
    d = d.setdefault(p, {})
  d[last] = value


class Ctx:
  """What a case builds its bad input in: its own directory, the shared run and corpus."""

  def __init__(self, tmp: Path, run_dir: str, corpus: str):
    self.tmp, self.run_dir, self.corpus = tmp, run_dir, corpus

  def path(self, name: str) -> str:
    return str(self.tmp / name)

  def write(self, name: str, content: str | bytes) -> str:
    p = self.tmp / name
    p.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
      p.write_bytes(content)
    else:
      p.write_text(content)
    return str(p)

  def run_copy(self, name: str = "run") -> str:
    """A copy of the trained run, to damage."""
    return shutil.copytree(self.run_dir, self.tmp / name, symlinks=True).as_posix()

  def hf(self, style: str = "gpt2", name: str = "hf") -> str:
    """A small HF directory (d_model 64, vocab 300) written by growlm's exporter."""
    return _growlm_dir(self.tmp, style, name)[0]

  def cfg(self, style: str = "gpt2", **dotted):
    """The shared run's config (same data), with `dotted` set."""
    return _cfg(style, **{"data.train": f"file:{self.corpus}", **dotted})

  def raw(self, **dotted) -> dict:
    """The config as a plain dict (as config.json or a Python caller gives it), `dotted` set
    without the ConfigDict's type checks."""
    d = self.cfg().to_dict()
    for k, v in dotted.items():
      _set(d, k, v)
    return d


@dataclasses.dataclass(frozen=True)
class Case:
  """One in-process bad input: `make(ctx)` builds it and returns the call that must refuse it."""
  id: str
  says: tuple[str, ...]                 # words the one error line must contain
  make: Callable[[Ctx], Callable[[], Any]]


def _train(cfg_fn, workdir: str = "new") -> Callable[[Ctx], Callable[[], Any]]:
  """A case that runs `commands.train(cfg_fn(ctx), ctx.path(workdir))`."""
  return lambda ctx: (lambda c=cfg_fn(ctx), w=ctx.path(workdir): commands.train(c, w))


def cfg_case(id_: str, says, **dotted) -> Case:
  """A bad field value, set through the ConfigDict as a config file or flag would."""
  return Case(id_, tuple(says), _train(lambda ctx: ctx.cfg(**dotted)))


def raw_case(id_: str, says, **dotted) -> Case:
  """A bad field value given as plain data (config.json, a Python caller): no ConfigDict."""
  return Case(id_, tuple(says), _train(lambda ctx: ctx.raw(**dotted)))


def _no_run(*_):
  raise AssertionError("the launcher started a run on a bad sweep")


# ------------------------------------------------------------------------------------------
# In-process cases.

CASES: list[Case] = []

# --- Config values (growlm.config.typed.resolve, through commands.train).
CASES += [
    cfg_case("cfg-warmup-exceeds-steps", ["train.warmup_steps", "train.num_steps"],
             **{"train.num_steps": 10, "train.warmup_steps": 20}),
    cfg_case("cfg-num-steps-zero", ["train.num_steps"], **{"train.num_steps": 0}),
    cfg_case("cfg-num-steps-negative", ["train.num_steps"], **{"train.num_steps": -5}),
    cfg_case("cfg-warmup-negative", ["train.warmup_steps"], **{"train.warmup_steps": -1}),
    cfg_case("cfg-eval-fraction-0", ["data.eval_fraction"], **{"data.eval_fraction": 0.0}),
    cfg_case("cfg-eval-fraction-1", ["data.eval_fraction"], **{"data.eval_fraction": 1.0}),
    cfg_case("cfg-lr-zero", ["train.lr"], **{"train.lr": 0.0}),
    cfg_case("cfg-lr-negative", ["train.lr"], **{"train.lr": -1e-3}),
    cfg_case("cfg-lr-nan", ["train.lr"], **{"train.lr": math.nan}),
    cfg_case("cfg-lr-inf", ["train.lr"], **{"train.lr": math.inf}),
    cfg_case("cfg-adam-eps-zero", ["train.eps=0.0", "(0.0, inf)"], **{"train.eps": 0.0}),
    cfg_case("cfg-batch-not-multiple-of-accum", ["data.batch_size", "train.grad_accum"],
             **{"train.grad_accum": 3}),
    cfg_case("cfg-seq-len-over-max-len", ["data.seq_len", "model.max_len"],
             **{"data.seq_len": 512}),
    cfg_case("cfg-schedule-name", ["train.schedule", "cosine"], **{"train.schedule": "cosinus"}),
    raw_case("cfg-mesh-unknown-axis", ["mesh.pipe"], **{"mesh.pipe": 2}),
    cfg_case("cfg-mesh-size-0", ["mesh.data"], **{"mesh.data": 0}),
    cfg_case("cfg-mesh-too-many-devices", ["mesh", "devices"], **{"mesh.tensor": 64}),
    cfg_case("cfg-sharding-rule-axis", ["sharding rule", "pipeline"],
             sharding_rules=(("embed", "pipeline"),)),
    cfg_case("cfg-sharding-rule-shape", ["sharding rule"], sharding_rules=(("embed",),)),
    cfg_case("cfg-sharding-rule-none", ["sharding rule None", "logical_axis"],
             sharding_rules=(None,)),
    cfg_case("cfg-sharding-rule-number-name", ["sharding rule (5, 'data')"],
             sharding_rules=((5, "data"),)),
    cfg_case("cfg-sharding-rule-number-axes", ["sharding rule ('embed', 5)"],
             sharding_rules=(("embed", 5),)),
    raw_case("cfg-sharding-rules-number", ["sharding_rules=5", "pairs"], sharding_rules=5),
    cfg_case("cfg-sharding-rule-unknown-logical-axis", ["'embedding'", "no such logical axis",
                                                        "embed"],
             sharding_rules=(("embedding", "fsdp"),)),
    cfg_case("cfg-sharding-rule-axis-twice", ["'mlp' twice", "one rule per logical axis"],
             sharding_rules=(("mlp", "tensor"), ("mlp", None))),
    cfg_case("cfg-sharding-rule-mesh-axis-twice", ["'batch'", "mesh axis twice"],
             sharding_rules=(("batch", ("data", "data")),)),
    cfg_case("cfg-init-std-zero", ["init_std=0.0", "positive finite"], **{"model.init_std": 0.0}),
    cfg_case("cfg-init-std-negative", ["init_std=-0.02"], **{"model.init_std": -0.02}),
    raw_case("cfg-norm-eps-string", ["norm_eps='1e-5'", "positive finite"],
             **{"model.norm_eps": "1e-5"}),
    raw_case("cfg-use-bias-string", ["use_bias='no'", "true or false"],
             **{"model.use_bias": "no"}),
    cfg_case("cfg-vocab-size-beyond-int32", ["vocab_size=3000000000", "below 2**31"],
             **{"model.vocab_size": 3_000_000_000}),
    cfg_case("cfg-model-beyond-memory", ["d_model=100000000", "GiB per device", "mesh.fsdp"],
             **{"model.d_model": 100_000_000}),
    cfg_case("cfg-eval-split", ["data.eval", "valid"], **{"data.eval.heldout": "train@valid"}),
    cfg_case("cfg-eval-empty", ["data.eval"], **{"data.eval": {}}),
    cfg_case("cfg-wandb-mode", ["wandb.mode", "offline"], **{"wandb.mode": "sometimes"}),
    cfg_case("cfg-batch-size-zero", ["data.batch_size"], **{"data.batch_size": 0}),
    cfg_case("cfg-d-model-zero", ["d_model"], **{"model.d_model": 0}),
    cfg_case("cfg-init-optimizer", ["init.optimizer", "fresh"], **{"init.optimizer": "adam"}),
    cfg_case("cfg-model-norm", ["norm", "layernorm"], **{"model.norm": "batchnorm"}),
    cfg_case("cfg-float16-on-a-cpu", ["model.dtype='float16'", "CPU", "bfloat16"],
             **{"model.dtype": "float16"}),
    cfg_case("cfg-float64-without-x64", ["model.dtype='float64'", "JAX_ENABLE_X64=1"],
             **{"model.dtype": "float64"}),
    cfg_case("cfg-float64-params-without-x64", ["model.param_dtype='float64'", "JAX_ENABLE_X64"],
             **{"model.param_dtype": "float64"}),
    raw_case("cfg-unknown-section-field", ["train.learning_rate", "'lr'"],
             **{"train.learning_rate": 0.1}),
    raw_case("cfg-num-steps-string", ["train.num_steps"], **{"train.num_steps": "100"}),
]

# --- Config-file arguments (--config=PATH:ARG): the refusal names the argument as typed and
# the file, not the field the file sets from it (stages[0].optimizer).
def _load_case(id_: str, says, spec: str) -> Case:
  """`commands.train` of `files.load(spec)`, spec relative to the checkout."""
  def call(workdir):
    from growlm.config import files  # pylint: disable=g-import-not-at-top
    return commands.train(files.load(str(REPO / spec)), workdir)
  return Case(id_, tuple(says), lambda ctx: (lambda w=ctx.path("new"): call(w)))


CASES += [
    _load_case("cfg-arg-word-not-accepted", ["config argument 'optimizer=adam' of",
                                             "configs/staged.py;",
                                             "accepted: optimizer=grow or optimizer=fresh"],
               "configs/staged.py:optimizer=adam"),
    _load_case("cfg-arg-negative-steps", ["config argument 'rewarm=-3' of", "configs/staged.py;",
                                          "rewarm=N with N >= 0"],
               "configs/staged.py:runlocal,rewarm=-3"),
]

# --- Data (the trainer reads it before anything is written).
CASES += [
    cfg_case("data-pattern-matches-nothing", ["nomatch"],
             **{"data.train": "file:/nonexistent/nomatch*.txt"}),
    Case("data-empty-file", ("is empty",), _train(
        lambda ctx: ctx.cfg(**{"data.train": "file:" + ctx.write("empty.txt", "")}))),
    Case("data-directory", ("matches only directories",), _train(
        lambda ctx: ctx.cfg(**{"data.train": "file:" + os.path.dirname(
            ctx.write("d/a.txt", "x"))}))),
    Case("data-binary-file", ("not UTF-8",), _train(
        lambda ctx: ctx.cfg(**{"data.train": "file:" + ctx.write(
            "bin.txt", bytes(range(128, 256)) * 64)}))),
    Case("data-tokenizer-missing", ("tokenizer",), _train(
        lambda ctx: ctx.cfg(**{"data.tokenizer": ctx.path("missing/tokenizer.json")}))),
    Case("data-tokenizer-corrupt", ("tokenizer", "not a readable"), _train(
        lambda ctx: ctx.cfg(**{"data.tokenizer": ctx.write("tok/tokenizer.json", "{not json")}))),
    Case("data-tfds-not-prepared", ("nope_ds", "not prepared"), _train(
        lambda ctx: ctx.cfg(**{"data.train": "tfds:nope_ds", "data.data_dir": ctx.path("tfds")}))),
    cfg_case("data-vocab-larger-than-model", ["vocab_size"], **{"model.vocab_size": 100}),
    cfg_case("data-unknown-source", ["source spec", "hdfs"], **{"data.train": "hdfs:x"}),
    cfg_case("data-eval-file-missing", ["nothere"],
             **{"data.eval.extra": "file:/nonexistent/nothere.txt@all"}),
]


def _damaged_run(damage: Callable[[str], Any], **dotted):
  """A case: relaunch a copy of the trained run, damaged by `damage(run_dir)`."""
  def make(ctx):
    run = ctx.run_copy()
    damage(run)
    return lambda c=ctx.cfg(**dotted): commands.train(c, run)
  return make


def _write(rel: str, content: str | bytes):
  def damage(run):
    p = os.path.join(run, rel)
    if os.path.isdir(p):
      shutil.rmtree(p)
    with open(p, "wb" if isinstance(content, bytes) else "w") as f:
      f.write(content)
  return damage


def _replace_with_dir(rel: str):
  def damage(run):
    p = os.path.join(run, rel)
    if os.path.isdir(p):
      shutil.rmtree(p)
    elif os.path.exists(p):
      os.remove(p)
    os.makedirs(os.path.join(p, "x"))
  return damage


def _truncate_config(run):
  p = os.path.join(run, "config.json")
  text = open(p).read()
  open(p, "w").write(text[: len(text) // 2])


# --- Run dirs (relaunching a run dir that is not what it should be).
CASES += [
    Case("rundir-is-a-file", ("not a directory",), lambda ctx: (
        lambda w=ctx.write("afile", "x"), c=ctx.cfg(): commands.train(c, w))),
    Case("rundir-config-empty", ("config.json",), _damaged_run(_write("config.json", ""))),
    Case("rundir-config-truncated", ("config.json",), _damaged_run(_truncate_config)),
    Case("rundir-config-not-object", ("config.json", "not a JSON object"),
         _damaged_run(_write("config.json", "[]"))),
    Case("rundir-config-deleted", ("no config.json", "checkpoints"),
         _damaged_run(lambda run: os.remove(os.path.join(run, "config.json")))),
    Case("rundir-config-is-dir", ("config.json",), _damaged_run(_replace_with_dir("config.json"))),
    Case("rundir-metrics-is-dir", ("metrics.jsonl",),
         _damaged_run(_replace_with_dir("metrics.jsonl"))),
    Case("rundir-metrics-binary", ("metrics.jsonl",),
         _damaged_run(_write("metrics.jsonl", bytes(range(256)) * 8))),
    Case("rundir-checkpoints-is-file", ("checkpoints",),
         _damaged_run(lambda run: (shutil.rmtree(os.path.join(run, "checkpoints")),
                                   _write("checkpoints", "x")(run)))),
    Case("rundir-changed-config", ("train.lr", "another config"),
         _damaged_run(lambda run: None, **{"train.lr": 1e-4})),
    Case("rundir-changed-model", ("model.d_model",),
         _damaged_run(lambda run: None, **{"model.d_model": 128})),
]


def _source_case(id_, says, make_source, **dotted) -> Case:
  """A fresh run whose init.source is `make_source(ctx)`."""
  return Case(id_, tuple(says), _train(
      lambda ctx: ctx.cfg(**{"init.source": make_source(ctx), **dotted})))


def _bare_run(ctx):
  """A copy of the trained run without its checkpoints/."""
  run = ctx.run_copy("src")
  shutil.rmtree(os.path.join(run, "checkpoints"))
  return run


def _source_with_config(text: str):
  """A source: a copy of the trained run whose config.json holds `text`."""
  def make(ctx):
    run = ctx.run_copy("src")
    _write("config.json", text)(run)
    return run
  return make


# --- Checkpoints (init.source, export --run).
CASES += [
    _source_case("ckpt-source-no-checkpoints", ["init.source", "no checkpoint"], _bare_run),
    _source_case("ckpt-source-not-a-run", ["init.source", "no config.json"],
                 lambda ctx: os.path.dirname(ctx.write("notrun/readme.txt", "hello"))),
    _source_case("ckpt-source-missing", ["init.source", "/nonexistent/src"],
                 lambda ctx: "/nonexistent/src"),
    _source_case("ckpt-source-corrupt-config", ["config.json"],
                 _source_with_config("{\"model\": ")),
    _source_case("ckpt-source-config-no-model", ["init.source", "model"],
                 _source_with_config("{\"train\": {}}")),
    Case("ckpt-export-run-missing", ("--run",), lambda ctx: (
        lambda o=ctx.path("out"): commands.export_run("/nonexistent/run", o))),
    Case("ckpt-export-out-exists", ("--out",), lambda ctx: (
        lambda o=os.path.dirname(ctx.write("out/x", "x")), r=ctx.run_dir: commands.export_run(
            r, o))),
    Case("ckpt-export-run-is-hf", ("--run", "Hugging Face"), lambda ctx: (
        lambda h=ctx.hf(), o=ctx.path("out"): commands.export_run(h, o))),
]


def _unwritable(directory: str, call: Callable[[], Any]) -> Callable[[], Any]:
  """`call` with os.access saying that `directory` cannot be written, as on a read-only mount (a
  chmod would not do: root, as in CI, writes whatever the mode bits say)."""
  real = os.access

  def access(path, mode, *args, **kw):
    if os.path.abspath(path) == directory and mode & os.W_OK:
      return False
    return real(path, mode, *args, **kw)

  def run():
    with mock.patch.object(os, "access", access):
      return call()
  return run


# --- Outputs that cannot be written: refused before any growth or training.
CASES += [
    Case("out-read-only-grow", ("--out", "cannot write"), lambda ctx: _unwritable(
        str(ctx.tmp), lambda c=ctx.cfg(**{"model.n_layers": 3}), r=ctx.run_dir,
        o=ctx.path("deep/out"): commands.grow_into(c, r, o))),
    Case("out-read-only-export", ("--out", "cannot write"), lambda ctx: _unwritable(
        str(ctx.tmp), lambda r=ctx.run_dir, o=ctx.path("hf"): commands.export_run(r, o))),
    Case("out-read-only-workdir", ("--workdir", "cannot write"), lambda ctx: _unwritable(
        str(ctx.tmp), lambda c=ctx.cfg(**{"init.source": ctx.run_dir, "model.n_layers": 3}),
        w=ctx.path("grown"): commands.train(c, w))),
]


def _grow_case(id_, says, style="gpt2", source="run", **dotted) -> Case:
  """A fresh run grown from the trained run (gpt2 nano) or an HF dir of `style`."""
  def make(ctx):
    src = ctx.run_dir if source == "run" else ctx.hf(style)
    extra = {} if source == "run" else {"model.vocab_size": VOCAB_HF, "model.max_len": 64}
    c = ctx.cfg(style, **{"init.source": src, **extra, **dotted})
    return lambda: commands.train(c, ctx.path("grown"))
  return Case(id_, tuple(says), make)


def _plan_case(id_, field, value) -> Case:
  """A plan field given as plain data (a Python caller, a config.json)."""
  return Case(id_, (f"{field}=",), _train(lambda ctx: ctx.raw(**{
      "init.source": ctx.run_dir, "model.d_model": 128, f"init.plan.{field}": value})))


# --- Growth plans.
CASES += [
    _plan_case("plan-noise-scale-str", "noise_scale", "0.1"),
    _plan_case("plan-noise-scale-none", "noise_scale", None),
    _plan_case("plan-noise-scale-inf", "noise_scale", math.inf),
    _plan_case("plan-symmetry-noise-none", "symmetry_noise", None),
    _plan_case("plan-symmetry-noise-inf", "symmetry_noise", math.inf),
    _plan_case("plan-new-layers-int", "new_layer_indices", 5),
    _plan_case("plan-new-layers-repeat", "new_layer_indices", [2, 2, 3]),
    _plan_case("plan-new-layers-float", "new_layer_indices", [1.5]),
    _plan_case("plan-new-layers-bool", "new_layer_indices", [True]),
    _plan_case("plan-require-exact-str", "require_exact", "false"),
    _plan_case("plan-width-bogus", "width", "bogus"),
    _plan_case("plan-depth-bogus", "depth", "bogus"),
    Case("plan-unknown-field", ("nosie_scale",), _train(lambda ctx: ctx.raw(**{
        "init.source": ctx.run_dir, "init.plan.nosie_scale": 0.1}))),
    _grow_case("plan-shrink-d-model", ["d_model", "64 -> 32"],
               **{"model.d_model": 32}),
    _grow_case("plan-shrink-layers", ["n_layers"], **{"model.n_layers": 1}),
    _grow_case("plan-vocab-change", ["vocab_size"], **{"model.vocab_size": 300}),
    _grow_case("plan-tile-non-integer", ["tile", "integer"],
               **{"model.d_model": 96, "init.plan.width": "tile"}),
    _grow_case("plan-require-exact-zeros-layernorm", ["require_exact", "zeros"],
               **{"model.d_model": 128, "init.plan.width": "zeros",
                  "init.plan.require_exact": True}),
    _grow_case("plan-new-layers-wrong-count", ["new_layer_indices"],
               **{"model.n_layers": 4, "init.plan.new_layer_indices": (0,)}),
    _grow_case("plan-rope-theta-differs", ["rope_theta"], style="llama", source="hf",
               **{"model.rope_theta": 500000.0}),
    _grow_case("plan-mean-fill-rmsnorm", ["mean_fill", "RMSNorm"], style="llama", source="hf",
               **{"model.d_model": 128, "init.plan.width": "mean_fill"}),
    _grow_case("plan-optimizer-grow-from-hf", ["init.optimizer", "fresh"], source="hf",
               **{"init.optimizer": "grow"}),
]


def _hf_case(id_, says, damage, style="gpt2", call="grow") -> Case:
  """An HF directory damaged by `damage(dir)`, given to `hf_main grow` (or `train`)."""
  def make(ctx):
    d = ctx.hf(style)
    damage(d)
    c = ctx.cfg(style, **{"model.max_len": 64})
    if call == "grow":
      return lambda: commands.grow_to_hf(c, d, ctx.path("out"))
    return lambda: commands.train_from_hf(c, d, ctx.path("run"))
  return Case(id_, tuple(says), make)


def _rm(name):
  return lambda d: os.remove(os.path.join(d, name))


def _put(name, content):
  return lambda d: open(os.path.join(d, name), "w").write(content)


# --- Hugging Face directories.
CASES += [
    _hf_case("hf-no-config", ["no config.json"], _rm("config.json")),
    _hf_case("hf-config-not-json", ["config.json"], _put("config.json", "{oops")),
    _hf_case("hf-config-not-object", ["config.json"], _put("config.json", "[1, 2]")),
    _hf_case("hf-unknown-model-type", ["model_type='bert'"],
             lambda d: _edit_config(d, model_type="bert", architectures=["BertModel"])),
    _hf_case("hf-no-safetensors", ["no *.safetensors"], _rm("model.safetensors")),
    _hf_case("hf-tensor-shape", ["has shape"], lambda d: _edit_config(d, n_inner=128)),
    _hf_case("hf-nan-tensor", ["NaN"], lambda d: _rewrite_tensor(
        d, "model.norm.weight", lambda x: x * np.nan), style="llama"),
    _hf_case("hf-index-missing-shard", ["model-2.st", "missing"],
             lambda d: _write_index(d, {"transformer.wte.weight": "model-2.st"})),
    _hf_case("hf-train-sliding-window", ["sliding_window"],
             lambda d: _edit_config(d, sliding_window=16), style="llama", call="train"),
    Case("hf-out-exists", ("--out",), lambda ctx: (
        lambda h=ctx.hf(), o=os.path.dirname(ctx.write("out/x", "x")),
        c=ctx.cfg(**{"model.max_len": 64}): commands.grow_to_hf(c, h, o))),
]


def _sweep_case(id_, says, body: str, only=(), files=()) -> Case:
  """A sweep config file whose sweep(add) is `body` (None: no sweep function), and `files`
  ((name, text), written beside it)."""
  head = ("from growlm.config import defaults\n"
          "def get_config(arg=None):\n"
          "  return defaults.base_config('nano')\n")

  def make(ctx):
    for name, text in files:
      ctx.write(name, text)
    path = ctx.write("sweep_cfg.py", head + ("" if body is None else
                                             "def sweep(add):\n" + body))
    return lambda: sweep.launch(path, ctx.path("sweep"), only=only, run_fn=_no_run,
                                echo=lambda _: None)
  return Case(id_, tuple(says), make)


# --- The sweep launcher.
CASES += [
    _sweep_case("sweep-no-sweep-function", ["sweep(add)"], None),
    _sweep_case("sweep-missing-source", ["@missing", "names no run"],
                "  add(name='a')\n  add(name='b', **{'init.source': '@missing'})\n"),
    _sweep_case("sweep-duplicate-names", ["'a'", "used twice"],
                "  add(name='a')\n  add(name='a')\n"),
    _sweep_case("sweep-unknown-field", ["train.num_step", "train.num_steps"],
                "  add(name='a', **{'train.num_step': 3})\n"),
    _sweep_case("sweep-circular", ["circular"],
                "  add(name='a', **{'init.source': '@b'})\n"
                "  add(name='b', **{'init.source': '@a'})\n"),
    _sweep_case("sweep-slash-in-name", ["'a/b'", "without '/'"], "  add(name='a/b')\n"),
    _sweep_case("sweep-wrong-type", ["train.num_steps", "integer"],
                "  add(name='a', **{'train.num_steps': 'ten'})\n"),
    _sweep_case("sweep-only-unknown", ["--only", "'c'"], "  add(name='a')\n", only=("c",)),
    _sweep_case("sweep-raises", ["sweep(add)", "ZeroDivisionError"], "  add(name='a')\n  1 / 0\n"),
    _sweep_case("sweep-bad-run-value", ["sweep run 'a'", "train.lr"],
                "  add(name='a', **{'train.lr': -1.0})\n"),
    _sweep_case("sweep-adds-no-runs", ["added no runs"], "  pass\n"),
    _sweep_case("sweep-later-run-data-missing", ["sweep run 'b'", "matches no file"],
                "  add(name='a')\n  add(name='b', **{'data.train': 'file:/nonexistent/x.txt'})\n"),
    _sweep_case("sweep-later-run-eval-field", ["sweep run 'b'", "no field 'text'", "body"],
                "  add(name='a')\n  add(name='b', **{'data.eval.rows': 'jsonl:' + __file__[:-3] "
                "+ '.jsonl@all'})\n", files=(("sweep_cfg.jsonl", '{"body": "x"}\n'),)),
    Case("sweep-dir-is-a-file", ("--sweep_dir", "is a file"), lambda ctx: (
        lambda d=ctx.write("afile", "x"): sweep.launch(
            str(REPO / "configs" / "quickstart.py"), d, run_fn=_no_run, echo=lambda _: None))),
]

# ------------------------------------------------------------------------------------------
# Subprocess cases: the command lines.


@dataclasses.dataclass(frozen=True)
class Sub:
  """One command line: `args` may name {tmp} (the case's own directory), {run} (the trained
  run) and {corpus}; `files` are written under {tmp} first."""
  id: str
  cmd: tuple[str, ...]
  args: tuple[str, ...]
  says: tuple[str, ...]
  files: tuple[tuple[str, str], ...] = ()


MAIN = ("-m", "growlm.main")
NANO = "--config=configs/default.py:size=nano,runlocal"
W = "--workdir={tmp}/run"
SUBS: list[Sub] = [
    Sub("cli-cpu-devices-0", MAIN, (NANO, W, "--cpu_devices=0"), ("--cpu_devices",)),
    Sub("cli-cpu-devices-negative", MAIN, (NANO, W, "--cpu_devices=-1"), ("--cpu_devices",)),
    Sub("cli-num-processes-without-id", MAIN,
        (NANO, W, "--coordinator_address=localhost:1", "--num_processes=2"), ("--process_id",)),
    Sub("cli-process-id-out-of-range", MAIN,
        (NANO, W, "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=2"),
        ("--process_id",)),
    Sub("cli-join-timeout-0", MAIN,
        (NANO, W, "--coordinator_address=localhost:1", "--num_processes=2", "--process_id=1",
         "--join_timeout=0"), ("--join_timeout=0.0", "a positive number of seconds")),
    Sub("cli-missing-workdir", MAIN, (NANO,), ("--workdir",)),
    Sub("cli-missing-config", MAIN, (W,), ("--config",)),
    Sub("cli-unknown-flag", MAIN, (NANO, W, "--wrokdir=x"), ("wrokdir",)),
    Sub("cli-config-missing-file", MAIN, ("--config={tmp}/nothere.py", W), ("no such file",)),
    Sub("cli-config-syntax-error", MAIN, ("--config={tmp}/bad.py", W), ("syntax error",),
        files=(("bad.py", "def get_config(:\n"),)),
    Sub("cli-config-raises", MAIN, ("--config={tmp}/raises.py", W), ("KeyError",),
        files=(("raises.py", "def get_config(arg=None):\n  return {}['x']\n"),)),
    Sub("cli-unknown-field-hint", MAIN, (NANO, W, "--config.train.num_stesp=5"),
        ("did you mean 'train.num_steps'",)),
    Sub("cli-wrong-type", MAIN, (NANO, W, "--config.train.num_steps=abc"),
        ("train.num_steps", "integer")),
    Sub("cli-bad-bool", MAIN, (NANO, W, "--config.checkpoint.async_save=maybe"),
        ("checkpoint.async_save", "bool")),
    Sub("cli-unknown-size", MAIN, ("--config=configs/default.py:size=huge", W), ("'huge'",)),
    Sub("cli-unknown-style", MAIN, ("--config=configs/default.py:style=gpt3", W), ("'gpt3'",)),
    Sub("cli-unknown-config-arg", MAIN, ("--config=configs/default.py:sise=nano", W),
        ("'sise'",)),
    Sub("cli-config-arg-not-accepted", MAIN, ("--config=configs/staged.py:optimizer=adam", W),
        ("config argument 'optimizer=adam' of configs/staged.py; accepted: optimizer=grow or "
         "optimizer=fresh",)),
    Sub("cli-warmup-exceeds-steps", MAIN, (NANO, W, "--config.train.num_steps=3"),
        ("train.warmup_steps",)),
    Sub("cli-plan-new-layers-float", MAIN,
        (NANO, W, "--config.init.source={run}", "--config.init.plan.new_layer_indices=(1.5,)"),
        ("new_layer_indices",)),
    Sub("cli-workdir-is-file", MAIN, (NANO, "--workdir={tmp}/afile"), ("not a directory",),
        files=(("afile", "x"),)),
    Sub("cli-data-missing-file", MAIN, (NANO, W, "--config.data.train=file:{tmp}/none.txt"),
        ("matches no file",)),
    Sub("hf-cli-unknown-command", ("-m", "growlm.hf_main"), ("shrink",), ("accepted: one of",)),
    Sub("hf-cli-export-run-missing", ("-m", "growlm.hf_main"),
        ("export", "--run={tmp}/missing", "--out={tmp}/out"), ("--run",)),
    Sub("hf-cli-bad-dtype", ("-m", "growlm.hf_main"),
        ("export", "--run={run}", "--out={tmp}/out", "--dtype=int8"), ("dtype",)),
    Sub("grow-cli-out-exists", ("-m", "growlm.grow_main"),
        ("--source={run}", "--out={tmp}/out", NANO + ",size=small"), ("--out",),
        files=(("out/keep.txt", "x"),)),
    Sub("grow-cli-missing-source", ("-m", "growlm.grow_main"),
        ("--out={tmp}/out", NANO), ("--source",)),
    Sub("launch-missing-sweep-dir", ("experiments/launch.py",),
        ("--config=configs/quickstart.py",), ("--sweep_dir",)),
    Sub("launch-tpu-without-zone", ("experiments/launch.py",),
        ("--config=configs/quickstart.py", "--sweep_dir={tmp}/sw", "--tpu=my-tpu"), ("--zone",)),
    Sub("launch-only-unknown", ("experiments/launch.py",),
        ("--config=configs/quickstart.py", "--sweep_dir={tmp}/sw", "--only=nope"),
        ("--only", "nope")),
    Sub("launch-config-not-a-sweep", ("experiments/launch.py",),
        ("--config=configs/default.py", "--sweep_dir={tmp}/sw"), ("sweep(add)",)),
    Sub("demo-bad-config", ("-m", "growlm.demo"),
        ("--config={tmp}/nothere.py", "--workdir={tmp}/demo"), ("no such file",)),
    # Flags absl parses, in every command, and positional words where only flags are accepted.
    Sub("demo-unknown-flag", ("-m", "growlm.demo"), ("--workdir={tmp}/demo", "--wrokdir=x"),
        ("wrokdir",)),
    Sub("sample-bad-int", ("-m", "growlm.sample"),
        ("--workdir={run}", "--prompt=x", "--max_new_tokens=abc"), ("--max_new_tokens", "abc")),
    Sub("sample-unknown-flag", ("-m", "growlm.sample"), ("--workdir={run}", "--promt=x"),
        ("promt",)),
    Sub("sample-positional", ("-m", "growlm.sample"), ("--workdir={run}", "--prompt=x", "y"),
        ("unexpected arguments", "'y'")),
    Sub("prepare-unknown-flag", ("-m", "growlm.prepare"),
        ("--source=site-packages", "--out={tmp}/tok", "--tokeniser=bytes"), ("tokeniser",)),
    Sub("worker-bad-float", ("-m", "growlm.worker"),
        ("--plan={tmp}/plan.json", "--heartbeat_s=often"), ("--heartbeat_s",)),
    Sub("cli-positional", MAIN, (NANO, W, "train.num_steps=5"),
        ("unexpected arguments", "train.num_steps=5")),
    Sub("grow-cli-positional", ("-m", "growlm.grow_main"),
        ("--source={run}", "--out={tmp}/out", NANO + ",size=small", "tile"),
        ("unexpected arguments", "'tile'")),
]

_LOG_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ ")   # absl / glog prefix


def _env() -> dict[str, str]:
  env = user_env()
  env.pop("PYTHONDONTWRITEBYTECODE", None)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", PYTHONWARNINGS="ignore")
  return env


# ------------------------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
  """(the run, the corpus file), made once: nano on a small text file, written as the grow
  command writes a run (step-0 eval and checkpoint, no train step to compile)."""
  root = tmp_path_factory.mktemp("shared")
  corpus = root / "corpus.txt"
  corpus.write_text(CORPUS)
  run = str(root / "run")
  commands.train(_cfg(**{"data.train": f"file:{corpus}"}), run, stop_after_init=True)
  assert os.path.isdir(os.path.join(run, "checkpoints", "0"))
  return run, str(corpus)


@pytest.fixture(scope="module")
def sub_results(shared, tmp_path_factory):
  """Every Sub case run concurrently: id -> (returncode, stderr, changes)."""
  run, corpus = shared
  jobs = {}
  for case in SUBS:
    tmp = tmp_path_factory.mktemp(case.id)
    for rel, content in case.files:
      (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
      (tmp / rel).write_text(content)
    args = [a.format(tmp=tmp, run=run, corpus=corpus) for a in case.args]
    jobs[case.id] = (str(tmp), [sys.executable, *case.cmd, *args])
  before = {i: _snapshot(tmp, run) for i, (tmp, _) in jobs.items()}

  def one(argv):
    return subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=_env(),
                          timeout=240)

  with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
    futures = {i: pool.submit(one, argv) for i, (_, argv) in jobs.items()}
    done = {i: f.result() for i, f in futures.items()}
  return {i: (p.returncode, p.stderr, _diff(before[i], _snapshot(jobs[i][0], run)))
          for i, p in done.items()}


# ------------------------------------------------------------------------------------------
# Tests.


def test_at_least_60_distinct_bad_inputs():
  ids = [c.id for c in CASES] + [c.id for c in SUBS]
  assert len(ids) == len(set(ids)), sorted(i for i in ids if ids.count(i) > 1)
  assert len(ids) >= 60, len(ids)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_in_process(case, shared, tmp_path, capsys, monkeypatch):
  run, corpus = shared
  monkeypatch.setattr(sys, "dont_write_bytecode", False)
  ctx = Ctx(tmp_path, run, corpus)
  call = case.make(ctx)
  roots = (str(tmp_path), run, os.path.dirname(corpus))
  before = _snapshot(*roots)
  with pytest.raises(GrowlmError) as e:
    call()
  msg = str(e.value)
  assert "\n" not in msg, msg
  for word in case.says:
    assert word in msg, (word, msg)
  assert _diff(before, _snapshot(*roots)) == [], msg
  capsys.readouterr()
  with pytest.raises(SystemExit) as exit_:
    cli_flags.fail(e.value)
  err = capsys.readouterr().err
  assert exit_.value.code == 2
  assert err.count("\n") == 1 and err.startswith("growlm: error: "), err


@pytest.mark.parametrize("case", SUBS, ids=[c.id for c in SUBS])
def test_bad_input_command_line(case, sub_results):
  code, stderr, changes = sub_results[case.id]
  assert "Traceback" not in stderr, stderr[-3000:]
  lines = [l for l in stderr.splitlines() if l.strip() and not _LOG_LINE.match(l)]
  assert len(lines) == 1 and lines[0].startswith("growlm: error: "), stderr[-3000:]
  for word in case.says:
    assert word in lines[0], (word, lines[0])
  assert code == 2, (code, stderr[-3000:])
  assert changes == [], changes


def test_first_line_of_a_native_error():
  """Native libraries' and compilers' messages span lines; a growlm: error: line takes one."""
  from growlm.errors import first_line
  assert first_line(RuntimeError("\n  INVALID_ARGUMENT: bad shape\n  at frame 3\n")) == (
      "INVALID_ARGUMENT: bad shape")
  assert first_line(OSError()) == "OSError"
