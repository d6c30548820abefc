"""The run configuration (ml_collections): sections, defaults, validation, comparison.

Config files in configs/ start from `base_config()` and change what they need; the trainer
reads only validated values. Every field has a one-line comment.
"""

from __future__ import annotations

import json
from typing import Any

import ml_collections

from growlm import sharding
from growlm.errors import GrowlmError
from growlm.grow.plan import GrowthPlan
from growlm.model_config import ModelConfig, make_model_config

# Fields that may differ between a run and its resumption (they do not change what is computed
# up to the resumed step).
RESUMABLE_FIELDS = ("name", "sweep_name", "train.num_steps", "train.stop_at", "eval.every_steps", "log.every_steps",
                    "log.progress_bar", "checkpoint.every_steps", "checkpoint.keep",
                    "checkpoint.async_save", "wandb", "mesh", "sharding_rules")

SPLITS = ("train", "eval", "all")


def base_config(size: str = "tiny", style: str = "gpt2") -> ml_collections.ConfigDict:
  """Defaults for every section; `model` is the named size in the named style."""
  c = ml_collections.ConfigDict()
  c.name = "run"                   # run name (shown in logs; the sweep launcher sets it)
  c.sweep_name = ""                # sweep this run belongs to (W&B group; the launcher sets it)
  c.model = ml_collections.ConfigDict(make_model_config(size, style).to_dict())  # ModelConfig

  c.data = ml_collections.ConfigDict()
  c.data.tokenizer = "bytes"       # 'bytes' or a path to a Hugging Face tokenizer.json
  c.data.train = "stdlib"          # training source: stdlib | file:GLOB[,GLOB] | tfds:NAME[:SPLIT]
  c.data.eval = ml_collections.ConfigDict({"heldout": "train@eval"})  # name -> SOURCE[@SPLIT]
  c.data.eval_fraction = 0.05      # share of each source held out as its eval split
  c.data.max_bytes = 0             # cap on each source's bytes (0: no cap)
  c.data.data_dir = ""             # tensorflow-datasets data_dir for tfds: sources
  c.data.seq_len = 128             # tokens per training sequence
  c.data.batch_size = 16           # global batch in sequences (all processes together)
  c.data.seed = 0                  # seed of the training order

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 1000         # optimizer steps (the schedule's length)
  c.train.lr = 3e-3                # peak learning rate
  c.train.warmup_steps = 100       # linear warmup steps from 0 to lr
  c.train.schedule = "cosine"      # decay after warmup: cosine | linear | constant
  c.train.final_lr_ratio = 0.1     # final lr as a fraction of the peak
  c.train.b1 = 0.9                 # Adam beta1
  c.train.b2 = 0.95                # Adam beta2
  c.train.eps = 1e-8               # Adam epsilon
  c.train.weight_decay = 0.1       # decoupled weight decay (matrices and embeddings only)
  c.train.grad_clip = 1.0          # global-norm gradient clipping (0: off)
  c.train.grad_accum = 1           # microbatches per step (batch_size must be a multiple)
  c.train.seed = 0                 # seed of parameter init and dropout
  c.train.stop_at = 0              # stop (with a checkpoint) after this step; 0: run to the end

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 100         # evaluate every N steps (and at step 0 and at the end)
  c.eval.batches = 8               # eval batches per dataset (global batch size as training)

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500   # save every N steps (and at the end)
  c.checkpoint.keep = 3            # keep the last K steps
  c.checkpoint.async_save = True   # write in the background while training continues

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 10           # write a train line to metrics.jsonl every N steps
  c.log.progress_bar = True        # tqdm bar with loss and ETA on process 0

  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})  # -1: the rest
  c.sharding_rules = sharding.DEFAULT_RULES  # (logical axis, mesh axes) pairs
  c.init = ml_collections.ConfigDict()
  c.init.source = ""               # run dir to start from, grown to this model ('': random init)
  c.init.plan = ml_collections.ConfigDict(GrowthPlan().to_dict())  # growth plan (growlm.grow)
  c.init.optimizer = "fresh"       # fresh (new Adam state, re-warmup) | grow (moments mapped)
  c.init.lr_multipliers = False    # per-entry LR multipliers: grown copies take the small step
  c.init.seed = 0                  # seed of growth noise and new weights

  c.wandb = ml_collections.ConfigDict()
  c.wandb.enabled = False          # log to Weights & Biases (off by default)
  c.wandb.project = "growlm"       # W&B project
  c.wandb.entity = ""              # W&B team or user ('': the API key's default entity)
  c.wandb.mode = "online"          # online | offline | disabled (env WANDB_MODE overrides)
  c.wandb.group = ""               # W&B group ('': sweep_name, else name)
  c.wandb.tags = ()                # extra tags; the growth method (or 'scratch') and d{D}-L{L} are added
  return c


def parse_arg(arg: str | None) -> dict[str, Any]:
  """'size=tiny,style=llama,runlocal' -> {'size': 'tiny', 'style': 'llama', 'runlocal': True}."""
  out: dict[str, Any] = {}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    if "=" in part:
      k, v = part.split("=", 1)
      out[k.strip()] = v.strip()
    else:
      out[part] = True
  return out


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
  return ModelConfig.from_dict(config.model.to_dict())


def parse_eval_spec(spec: str, train_spec: str) -> tuple[str, str]:
  """'SOURCE[@SPLIT]' -> (source, split); the source 'train' means the training source."""
  source, split = spec, "eval"
  if "@" in spec:
    source, split = spec.rsplit("@", 1)
  if split not in SPLITS:
    raise GrowlmError(f"data.eval entry {spec!r}: split {split!r}; accepted: {SPLITS}")
  return (train_spec if source == "train" else source), split


def _positive(config, path: str, allow_zero: bool = False):
  section, field = path.split(".")
  v = config[section][field]
  ok = isinstance(v, int) and not isinstance(v, bool) and (v >= 0 if allow_zero else v > 0)
  if not ok:
    accepted = "an integer >= 0" if allow_zero else "a positive integer"
    raise GrowlmError(f"config {path}={v!r}; accepted: {accepted}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks the fields the trainer reads; raises GrowlmError naming the first bad one."""
  for section in ("model", "data", "train", "eval", "checkpoint", "log", "mesh", "init"):
    if section not in config:
      raise GrowlmError(f"config: missing section {section!r}")
  cfg = model_config(config)
  for p in ("data.seq_len", "data.batch_size", "train.num_steps", "train.grad_accum",
            "eval.every_steps", "eval.batches", "checkpoint.every_steps", "checkpoint.keep",
            "log.every_steps"):
    _positive(config, p)
  for p in ("train.warmup_steps", "train.stop_at", "data.max_bytes", "data.seed", "train.seed"):
    _positive(config, p, allow_zero=True)
  if config.data.seq_len > cfg.max_len and cfg.positions == "learned":
    raise GrowlmError(f"config data.seq_len={config.data.seq_len} exceeds model.max_len="
                      f"{cfg.max_len} (learned positions); accepted: seq_len <= max_len")
  if config.data.batch_size % config.train.grad_accum:
    raise GrowlmError(f"config data.batch_size={config.data.batch_size} is not a multiple of "
                      f"train.grad_accum={config.train.grad_accum}")
  if not 0.0 < config.data.eval_fraction < 1.0:
    raise GrowlmError(f"config data.eval_fraction={config.data.eval_fraction}; accepted: (0, 1)")
  if not config.train.lr > 0:
    raise GrowlmError(f"config train.lr={config.train.lr}; accepted: a positive float")
  for name, spec in config.data.eval.items():
    parse_eval_spec(spec, config.data.train)
  sharding.normalize_rules(config.sharding_rules)
  GrowthPlan.from_dict(config.init.plan.to_dict())


def to_json_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The resolved config as plain JSON types (tuples become lists)."""
  return json.loads(config.to_json())


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: d}


def resume_conflicts(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
  """Fields whose values differ between a run dir's config.json and the new config."""
  a, b = _flatten(saved), _flatten(current)
  def ignored(k):
    return any(k == f or k.startswith(f + ".") for f in RESUMABLE_FIELDS)
  return sorted(k for k in set(a) | set(b) if not ignored(k) and a.get(k) != b.get(k))
