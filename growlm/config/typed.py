"""The run configuration as typed, frozen objects: resolved once, validated once, never mutated.

`resolve(config)` turns the ml_collections ConfigDict that a config file and the command line
built into a `RunConfig`. Every field is checked here, so a bad value stops the run before any
work with one line naming the field and what is accepted. Library functions take a RunConfig;
changing one means building a new one (`dataclasses.replace` / `RunConfig.replace_model`), so a
caller's config is never rewritten behind its back.

`RunConfig.to_json()` is the run dir's config.json; growlm.config.resume compares two of them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from typing import Any, Mapping

from growlm import sharding
from growlm.errors import GrowlmError
from growlm.config import stages as stages_lib
from growlm.grow.plan import GrowthPlan
from growlm.model.config import ModelConfig

SPLITS = ("train", "eval", "all")
SCHEDULES = ("cosine", "linear", "constant")
OPTIMIZER_INIT = ("fresh", "grow")
WANDB_MODES = ("online", "offline", "disabled")
MAX_TAG_LEN = 64  # W&B rejects longer tags at init, after the run has started
SECTIONS = ("model", "data", "train", "eval", "checkpoint", "log", "mesh", "init")


def _int(path: str, v: Any, minimum: int = 1) -> int:
  if not (isinstance(v, int) and not isinstance(v, bool) and v >= minimum):
    accepted = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    raise GrowlmError(f"config {path}={v!r}; accepted: {accepted}")
  return v


def _float(path: str, v: Any, *, lo: float | None = None, lo_open: bool = False,
           hi: float | None = None, hi_open: bool = False) -> float:
  ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
  if ok and lo is not None:
    ok = v > lo if lo_open else v >= lo
  if ok and hi is not None:
    ok = v < hi if hi_open else v <= hi
  if not ok:
    rng = ""
    if lo is not None or hi is not None:
      # An open end is shown as such: the number must be finite ('(0.0, inf)', not 'inf]').
      rng = (f" in {'(' if lo_open or lo is None else '['}{'-inf' if lo is None else lo}, "
             f"{'inf' if hi is None else hi}{')' if hi_open or hi is None else ']'}")
    raise GrowlmError(f"config {path}={v!r}; accepted: a finite number{rng}")
  return float(v)


def _bool(path: str, v: Any) -> bool:
  if not isinstance(v, bool):
    raise GrowlmError(f"config {path}={v!r}; accepted: True or False")
  return v


def _str(path: str, v: Any, choices: tuple[str, ...] | None = None) -> str:
  if not isinstance(v, str) or (choices is not None and v not in choices):
    raise GrowlmError(f"config {path}={v!r}; accepted: "
                      f"{'a string' if choices is None else choices}")
  return v


def _first_unknown(given, known) -> tuple[str | None, str | None]:
  """(the first name of `given` not in `known`, the closest known name or None)."""
  unknown = sorted(set(given) - set(known))
  if not unknown:
    return None, None
  hint = difflib.get_close_matches(unknown[0], sorted(known), n=1)
  return unknown[0], (hint[0] if hint else None)


def _fields(section: str, d: Mapping[str, Any], cls) -> dict[str, Any]:
  """`d` as a dict, refusing unknown fields and filling absent ones with the class defaults."""
  known = {f.name for f in dataclasses.fields(cls)}
  unknown, hint = _first_unknown(d, known)
  if unknown:
    raise GrowlmError(f"config {section}.{unknown}: unknown field"
                      + (f"; did you mean {section}.{hint}?" if hint else
                         f"; accepted: {sorted(known)}"))
  return dict(d)


def parse_eval_spec(spec: str, train_spec: str) -> tuple[str, str]:
  """'SOURCE[@SPLIT]' -> (source, split); the source 'train' means the training source."""
  if not isinstance(spec, str) or not spec:
    raise GrowlmError(f"data.eval entry {spec!r}; accepted: 'SOURCE[@SPLIT]'")
  source, split = spec, "eval"
  if "@" in spec:
    source, split = spec.rsplit("@", 1)
  if split not in SPLITS:
    raise GrowlmError(f"data.eval entry {spec!r}: split {split!r}; accepted: {SPLITS}")
  return (train_spec if source == "train" else source), split


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """What the run reads (growlm.config.defaults documents each field)."""
  tokenizer: str = "bytes"
  train: str = "stdlib"
  eval: tuple[tuple[str, str], ...] = (("heldout", "train@eval"),)   # (name, SOURCE[@SPLIT])
  eval_fraction: float = 0.05
  max_bytes: int = 0
  data_dir: str = ""
  text_field: str = "text"
  seq_len: int = 128
  batch_size: int = 16
  seed: int = 0

  def __post_init__(self):
    _str("data.tokenizer", self.tokenizer)
    _str("data.train", self.train)
    _str("data.data_dir", self.data_dir)
    if not _str("data.text_field", self.text_field):
      raise GrowlmError("config data.text_field=''; accepted: a field name (e.g. 'text')")
    _float("data.eval_fraction", self.eval_fraction, lo=0.0, lo_open=True, hi=1.0, hi_open=True)
    for p in ("seq_len", "batch_size"):
      _int(f"data.{p}", getattr(self, p))
    for p in ("max_bytes", "seed"):
      _int(f"data.{p}", getattr(self, p), minimum=0)
    if not self.eval:
      raise GrowlmError("config data.eval is empty; accepted: at least one NAME: SOURCE[@SPLIT]")
    for name, spec in self.eval:
      parse_eval_spec(spec, self.train)

  def eval_sources(self) -> list[tuple[str, str, str]]:
    """(name, source, split) of every eval dataset, in config order."""
    return [(name, *parse_eval_spec(spec, self.train)) for name, spec in self.eval]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimizer and schedule (growlm.config.defaults documents each field)."""
  num_steps: int = 1000
  lr: float = 3e-3
  warmup_steps: int = 100
  schedule: str = "cosine"
  final_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  grad_clip: float = 1.0
  grad_accum: int = 1
  seed: int = 0
  stop_at: int = 0

  def __post_init__(self):
    _int("train.num_steps", self.num_steps)
    _int("train.grad_accum", self.grad_accum)
    for p in ("warmup_steps", "seed", "stop_at"):
      _int(f"train.{p}", getattr(self, p), minimum=0)
    _float("train.lr", self.lr, lo=0.0, lo_open=True)
    _str("train.schedule", self.schedule, SCHEDULES)
    _float("train.final_lr_ratio", self.final_lr_ratio, lo=0.0, hi=1.0)
    _float("train.b1", self.b1, lo=0.0, hi=1.0, hi_open=True)
    _float("train.b2", self.b2, lo=0.0, hi=1.0, hi_open=True)
    _float("train.eps", self.eps, lo=0.0, lo_open=True)   # 0: 0/0 where a gradient is 0
    _float("train.weight_decay", self.weight_decay, lo=0.0)
    _float("train.grad_clip", self.grad_clip, lo=0.0)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  every_steps: int = 100
  batches: int = 8

  def __post_init__(self):
    _int("eval.every_steps", self.every_steps)
    _int("eval.batches", self.batches)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
  every_steps: int = 500
  keep: int = 3
  async_save: bool = True

  def __post_init__(self):
    _int("checkpoint.every_steps", self.every_steps)
    _int("checkpoint.keep", self.keep)
    _bool("checkpoint.async_save", self.async_save)


@dataclasses.dataclass(frozen=True)
class LogConfig:
  every_steps: int = 10
  progress_bar: bool = True

  def __post_init__(self):
    _int("log.every_steps", self.every_steps)
    _bool("log.progress_bar", self.progress_bar)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Sizes of the (data, fsdp, tensor) mesh axes; -1 takes the remaining devices."""
  data: int = -1
  fsdp: int = 1
  tensor: int = 1

  def __post_init__(self):
    for p in sharding.MESH_AXES:
      v = getattr(self, p)
      if not (isinstance(v, int) and not isinstance(v, bool) and (v >= 1 or v == -1)):
        raise GrowlmError(f"config mesh.{p}={v!r}; accepted: a positive integer or -1")

  def to_dict(self) -> dict[str, int]:
    return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class InitConfig:
  """Where a fresh run starts: a source grown by `plan`, or a random init (source '')."""
  source: str = ""
  plan: GrowthPlan = GrowthPlan()
  optimizer: str = "fresh"
  lr_multipliers: bool = False
  lr_rescale: str = "none"
  seed: int = 0
  continue_schedule: bool = False

  def __post_init__(self):
    _str("init.source", self.source)
    _str("init.optimizer", self.optimizer, OPTIMIZER_INIT)
    _bool("init.lr_multipliers", self.lr_multipliers)
    _str("init.lr_rescale", self.lr_rescale, ("none", "fan_in"))
    _int("init.seed", self.seed, minimum=0)
    _bool("init.continue_schedule", self.continue_schedule)

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "plan": self.plan.to_dict()}


@dataclasses.dataclass(frozen=True)
class WandbConfig:
  """Weights & Biases logging (off by default)."""
  enabled: bool = False
  project: str = "growlm"
  entity: str = ""
  mode: str = "online"
  group: str = ""
  tags: tuple[str, ...] = ()

  def __post_init__(self):
    _bool("wandb.enabled", self.enabled)
    for k in ("project", "entity", "group"):
      _str(f"wandb.{k}", getattr(self, k))
    if not self.project:
      raise GrowlmError("config wandb.project is empty; accepted: a W&B project name")
    _str("wandb.mode", self.mode, WANDB_MODES)
    tags = self.tags
    if isinstance(tags, str):  # a comma-separated flag value
      tags = tuple(t.strip() for t in tags.split(",") if t.strip())
    if not (isinstance(tags, (tuple, list))
            and all(isinstance(t, str) and 0 < len(t) <= MAX_TAG_LEN for t in tags)):
      raise GrowlmError(f"config wandb.tags={self.tags!r}; accepted: a tuple of non-empty "
                        f"strings of at most {MAX_TAG_LEN} characters")
    object.__setattr__(self, "tags", tuple(tags))


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One run, resolved: the typed sections of growlm.config.defaults.base_config()."""
  model: ModelConfig
  data: DataConfig = DataConfig()
  train: TrainConfig = TrainConfig()
  eval: EvalConfig = EvalConfig()
  checkpoint: CheckpointConfig = CheckpointConfig()
  log: LogConfig = LogConfig()
  mesh: MeshConfig = MeshConfig()
  sharding_rules: tuple = sharding.DEFAULT_RULES
  init: InitConfig = InitConfig()
  wandb: WandbConfig = WandbConfig()
  name: str = "run"
  sweep_name: str = ""
  stages: tuple = ()                       # growth inside the run (growlm.config.stages)

  def __post_init__(self):
    _str("name", self.name)
    object.__setattr__(self, "stages", stages_lib.parse(self.stages))
    stages_lib.check(self.stages, self.model, self.train.num_steps)
    _str("sweep_name", self.sweep_name)
    sharding.normalize_rules(self.sharding_rules)
    d, m = self.data, self.model
    if d.seq_len > m.max_len and m.positions == "learned":
      raise GrowlmError(f"config data.seq_len={d.seq_len} exceeds model.max_len={m.max_len} "
                        "(learned positions); accepted: seq_len <= max_len")
    if self.train.warmup_steps > self.train.num_steps:
      raise GrowlmError(f"config train.warmup_steps={self.train.warmup_steps} exceeds "
                        f"train.num_steps={self.train.num_steps}; accepted: 0 <= warmup_steps <= "
                        "num_steps (set train.warmup_steps too when lowering num_steps)")
    if d.batch_size % self.train.grad_accum:
      raise GrowlmError(f"config data.batch_size={d.batch_size} is not a multiple of "
                        f"train.grad_accum={self.train.grad_accum}; accepted: a batch_size that "
                        "grad_accum divides")

  def replace(self, **changes: Any) -> "RunConfig":
    """A copy with whole sections or top-level fields replaced (validated again)."""
    return dataclasses.replace(self, **changes)

  def replace_model(self, **changes: Any) -> "RunConfig":
    """A copy with some model fields changed."""
    return dataclasses.replace(self, model=self.model.replace(**changes))

  def to_json(self) -> dict[str, Any]:
    """The config.json form: plain JSON types, the same sections and fields as the ConfigDict."""
    out = {
        "name": self.name, "sweep_name": self.sweep_name, "model": self.model.to_dict(),
        "data": {**dataclasses.asdict(self.data), "eval": dict(self.data.eval)},
        "train": dataclasses.asdict(self.train), "eval": dataclasses.asdict(self.eval),
        "checkpoint": dataclasses.asdict(self.checkpoint), "log": dataclasses.asdict(self.log),
        "mesh": self.mesh.to_dict(), "sharding_rules": self.sharding_rules,
        "init": self.init.to_dict(), "wandb": dataclasses.asdict(self.wandb)}
    if self.stages:   # absent without stages: config.json of runs without them is unchanged
      out["stages"] = [s.to_dict() for s in self.stages]
    return json.loads(json.dumps(out))   # tuples -> lists, as config.json holds them


def _as_dict(x: Any) -> dict[str, Any]:
  if hasattr(x, "to_dict"):
    return x.to_dict()
  if isinstance(x, Mapping):
    return dict(x)
  raise GrowlmError(f"config section {x!r}; accepted: a section of fields")


def resolve(config: Any) -> RunConfig:
  """The ConfigDict (or a config.json dict) as a validated RunConfig; the input is not changed.
  A RunConfig is returned as it is."""
  if isinstance(config, RunConfig):
    return config
  c = _as_dict(config)
  for section in SECTIONS:
    if section not in c:
      raise GrowlmError(f"config: missing section {section!r}")
  top = {"name", "sweep_name", "sharding_rules", "wandb", "stages", *SECTIONS}
  unknown, hint = _first_unknown(c, top)
  if unknown:
    raise GrowlmError(f"config field {unknown!r} does not exist"
                      + (f"; did you mean {hint!r}?" if hint else f"; accepted: {sorted(top)}"))
  sections = {name: resolve_section(name, c[name], cls) for name, cls in _SECTION_TYPES.items()
              if name in c}
  sections["model"] = ModelConfig.from_dict(_as_dict(c["model"]))
  rules = c.get("sharding_rules", sharding.DEFAULT_RULES)
  return RunConfig(**sections, sharding_rules=_freeze(rules), name=c.get("name", "run"),
                   sweep_name=c.get("sweep_name", ""), stages=c.get("stages") or ())


_SECTION_TYPES = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig,
                  "checkpoint": CheckpointConfig, "log": LogConfig, "mesh": MeshConfig,
                  "init": InitConfig, "wandb": WandbConfig}


def resolve_section(name: str, section: Any, cls: type) -> Any:
  """One section (a ConfigDict or a dict) as its typed object; absent fields take defaults."""
  fields = _fields(name, _as_dict(section or {}), cls)
  if cls is DataConfig and "eval" in fields:
    fields["eval"] = tuple((str(k), v) for k, v in _as_dict(fields["eval"]).items())
  if cls is InitConfig and "plan" in fields:
    fields["plan"] = GrowthPlan.from_dict(_as_dict(fields["plan"]))
  return cls(**fields)


def _freeze(x: Any) -> Any:
  if isinstance(x, (list, tuple)):
    return tuple(_freeze(v) for v in x)
  return x
