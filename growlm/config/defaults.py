"""The run configuration as people write it: an ml_collections ConfigDict with defaults.

Config files in configs/ start from `base_config()` and change what they need; the command line
changes single fields (--config.FIELD=VALUE). Every field has a one-line comment. The code never
reads a ConfigDict: growlm.config.typed.resolve() turns it into a validated, frozen RunConfig.
"""

from __future__ import annotations

import types
from typing import Any

import ml_collections

from growlm import sharding
from growlm.config.files import ArgumentError
from growlm.grow.plan import GrowthPlan
from growlm.model.config import make_model_config


def base_config(size: str = "tiny", style: str = "gpt2") -> ml_collections.ConfigDict:
  """Defaults for every section; `model` is the named size in the named style."""
  c = ml_collections.ConfigDict()
  c.name = "run"                   # run name (shown in logs; the sweep launcher sets it)
  c.sweep_name = ""                # sweep this run belongs to (W&B group; the launcher sets it)
  c.stages = ()                    # growth inside the run: ({"step", "model", "plan", ...},)
  c.model = ml_collections.ConfigDict(make_model_config(size, style).to_dict())  # ModelConfig

  c.data = ml_collections.ConfigDict()
  c.data.tokenizer = "bytes"       # 'bytes', a Hugging Face tokenizer.json or SentencePiece .model
  c.data.train = "stdlib"          # stdlib | site-packages | file:|jsonl:|parquet:GLOB | tfds:NAME | prepared:DIR
  c.data.eval = ml_collections.ConfigDict({"heldout": "train@eval"})  # name -> SOURCE[@SPLIT]
  c.data.eval_fraction = 0.05      # share of each source held out as its eval split
  c.data.max_bytes = 0             # cap on each source's bytes (0: no cap)
  c.data.data_dir = ""             # tensorflow-datasets data_dir for tfds: sources
  c.data.text_field = "text"       # the jsonl: field, parquet: column or tfds: feature of the text
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
  c.train.stop_at = 0              # stop (checkpointed) after this step; 0, >= num_steps: the end

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
  c.init.lr_rescale = "none"       # none | fan_in (muP: matrix LR x fan_in source/target)
  c.init.seed = 0                  # seed of growth noise and new weights
  c.init.continue_schedule = False # go on from the source's step, schedule and data position

  c.wandb = ml_collections.ConfigDict()
  c.wandb.enabled = False          # log to Weights & Biases (off by default)
  c.wandb.project = "growlm"       # W&B project
  c.wandb.entity = ""              # W&B team or user ('': the API key's default entity)
  c.wandb.mode = "online"          # online | offline | disabled (env WANDB_MODE overrides)
  c.wandb.group = ""               # W&B group ('': sweep_name, else name)
  c.wandb.tags = ()                # extra tags; the growth method (or 'scratch') and d{D}-L{L} are added
  return c


def parse_arg(arg: str | None, **defaults: Any) -> types.SimpleNamespace:
  """The config argument with typed defaults (big_vision style): 'size=tiny,runlocal' with
  defaults size='nano', runlocal=False -> namespace(size='tiny', runlocal=True). A bare word is
  True; values take the type of their default; a tuple default lists the accepted words, its
  first the default. An unknown key or a bad value is refused naming the accepted ones (and, by
  growlm.config.files.load, the config file)."""
  out = {k: v[0] if isinstance(v, tuple) else v for k, v in defaults.items()}
  for part in (arg or "").split(","):
    part = part.strip()
    if not part:
      continue
    key, has_value, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ArgumentError(key, ", ".join(sorted(defaults)) or "none", " unknown")
    default = defaults[key]
    words = " or ".join(f"{key}={w}" for w in default) if isinstance(default, tuple) else ""
    if isinstance(default, bool):
      flags = {"": True, "true": True, "1": True, "false": False, "0": False}
      if value.strip().lower() not in flags or (has_value and not value.strip()):
        raise ArgumentError(part, f"{key}, {key}=true or {key}=false")
      out[key] = flags[value.strip().lower()]
    elif not has_value:
      raise ArgumentError(part, words or f"{key}=VALUE", " needs a value")
    elif words:
      if value.strip() not in default:
        raise ArgumentError(part, words)
      out[key] = value.strip()
    elif isinstance(default, int):
      try:
        out[key] = int(value)
      except ValueError:
        raise ArgumentError(part, "an integer") from None
    else:
      out[key] = value.strip()
  return types.SimpleNamespace(**out)


def budget_overrides(base: ml_collections.ConfigDict, factor: int, *, evals: bool = True
                     ) -> dict[str, int]:
  """Sweep overrides for a run of `factor` times `base`'s token budget with its own full
  schedule: steps, warmup and checkpoint interval scaled (and the eval interval when `evals`,
  so the run is evaluated as many times as `base`; left as is, it is evaluated as often)."""
  out = {"train.num_steps": factor * base.train.num_steps,
         "train.warmup_steps": factor * base.train.warmup_steps,
         "checkpoint.every_steps": factor * base.checkpoint.every_steps}
  if evals:
    out["eval.every_steps"] = factor * base.eval.every_steps
  return out
