"""The library form of every command: what the command line does, callable from a notebook.

  train(config, workdir)                 python -m growlm.main
  check_relaunch(config, workdir)        (the sweep launcher, before it skips a finished run)
  compile_for(config, topology)          python -m growlm.main --compile_for=TOPOLOGY
  grow_into(config, source, out)         python -m growlm.grow_main
  grow_to_hf / grow_to_run / train_from_hf / export_run
                                         python -m growlm.hf_main grow | train | export
  sample(prompts, workdir= | hf=)        python -m growlm.sample

Each takes a ConfigDict or a RunConfig (resolved here, once; the caller's config is never
changed) and composes the stages: the initialisation seam (resume | grow | fresh) in front of
the trainer, or growth and the Hugging Face codec. Outputs are built under OUT.partial and
renamed at the end, so on any error nothing is left at OUT.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable

import jax

from growlm import data as data_lib
from growlm import fs, rundir, sharding
from growlm import lock as lock_lib
from growlm.config import stages as config_stages
from growlm.config.typed import RunConfig, resolve
from growlm.errors import GrowlmError
from growlm.grow import core as grow_core
from growlm.grow import optimizer as grow_optimizer
from growlm.grow import report as report_lib
from growlm.init import seam
from growlm.init import source as source_lib
from growlm.interop import hf as hf_lib
from growlm.model import generate as generate_lib
from growlm.train import aot
from growlm.train import aot_programs
from growlm.train import loss as loss_lib
from growlm.train import trainer

# Fields growth keeps (growlm.grow.core), so they are the source's whatever the config says.
SOURCE_FIELDS = ("vocab_size", "norm", "norm_eps", "positions", "rope_theta", "mlp", "use_bias",
                 "qkv_bias", "tie_embeddings")
SIZE_FIELDS = ("d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "mlp_dim", "max_len")


def train(config: Any, workdir: str, *, params_fn: Callable[[Any], Any] | None = None,
          stop_after_init: bool = False) -> dict[str, Any]:
  """Trains (or resumes) the run in `workdir`; returns the last train and eval metrics.

  With `init.source` set, a fresh run starts from that source grown to this config's model by
  `init.plan` (the preservation report is printed, saved as growth_report.json and logged).
  `params_fn(param_shardings)` supplies the starting parameters of a fresh run instead (tests).
  """
  config, source = seam.prepare(resolve(config), workdir)
  return trainer.train(config, workdir, seam.initializer(source, params_fn=params_fn),
                       stop_after_init=stop_after_init, grow_stage=seam.grow_stage)


def check_relaunch(config: Any, workdir: str) -> None:
  """What `train(config, workdir)` would refuse about the run already in `workdir` (one of
  another config), checked without starting it: the sweep launcher checks each run it would skip
  as finished, so that changed flags are refused rather than given the old results."""
  if fs.exists(rundir.config_path(workdir)):
    config, _ = seam.prepare(resolve(config), workdir)
    trainer.check_run_dir(workdir, config.to_json())


# The growth's and the preservation report's programs, for aot (which imports no growth).
GROWTH = aot_programs.Growth(grow_optimizer.state_growth, report_lib.programs)


def compile_for(config: Any, topology: str, train_only: bool = False, *,
                source: RunConfig | None = None,
                steps_of: dict[str, Any] | None = None) -> dict[str, Any]:
  """Compiles the run's programs for the TPU slice `topology` without a TPU: each stage's train
  and eval steps, each growth between stages and, with init.source, the growth of the source
  into the first state (the seam's, growlm.grow.optimizer), each growth with its preservation
  report, with the attention kernel and the memory per device against the chip's HBM
  (growlm.train.aot); with train_only, the train steps alone. The source is read from its
  config (no weights), or is `source`: the config of a sweep's run that has not trained yet.
  `steps_of`: aot.compile_for's. Nothing runs, nothing is written."""
  config = resolve(config)
  src = None
  if config.init.source and not train_only:
    config, src = _source_of(config, source)
  return aot.compile_for(config, topology, growth=GROWTH, train_only=train_only, source=src,
                         steps_of=steps_of)


def _source_of(config: RunConfig, run: RunConfig | None
               ) -> tuple[RunConfig, aot_programs.Source]:
  """(the config as the run starts it, its init.source as aot grows it): read and checked as a
  launch would (seam.prepare: headers only), or the sweep run `run`'s last model."""
  if run is None:
    src = source_lib.read_source(config.init.source)
    source_lib.check_init(config, src)
  else:
    model = config_stages.models(run.model, run.stages)[-1]
    src = source_lib.Source(config.init.source, run.to_json(), model)
  grown = grow_core.grown_config(src.model, config.model, config.init.plan)
  return (config.replace_model(norm_eps=grown.norm_eps),
          aot_programs.Source(src.model, lambda mesh, rules: source_lib.abstract_state(
              src, mesh, rules)))


def _check_out(out: str) -> None:
  """The early checks of a command that builds `out` under OUT.partial, before any work."""
  fs.check_writable(out, "--out")
  if fs.exists(out):
    raise GrowlmError(f"--out={out} exists; accepted: a path that does not exist yet")
  lock_lib.check_leftover(out.rstrip("/") + ".partial", f"--out={out}")


def grow_into(config: Any, source: str, out: str) -> dict[str, Any]:
  """The grow command: `source` grown to `config`'s model, written as the run dir `out` at
  step 0 (checkpoint, growth report, step-0 eval). Built under OUT.partial, renamed at the end."""
  _check_out(out)
  config = resolve(config)
  config = config.replace(init=dataclasses.replace(config.init, source=source))
  partial = out.rstrip("/") + ".partial"
  if jax.process_index() == 0:
    lock_lib.clear_leftover(partial, f"--out={out}")
  try:
    summary = train(config, partial, stop_after_init=True)
    if jax.process_index() == 0:
      if fs.exists(out):   # a second launch into the same --out that finished first
        raise GrowlmError(f"--out={out} was written by another launch while this one ran; "
                          f"this one's result is discarded")
      fs.rename(partial, out, last=rundir.CONFIG)   # on gs://: config.json, what marks a run, last
  except BaseException:
    if jax.process_index() == 0:
      with contextlib.suppress(Exception):
        lock_lib.remove_unless_live(partial)
    raise
  return summary


def apply_source(config: Any, source: str, *, as_is: bool = False) -> RunConfig:
  """The config pointed at the HF `source` (checked, headers only): init.source, and the model
  fields that must be the source's (all sizes too with `as_is`), printing each one changed."""
  config = resolve(config)
  _, src, _ = hf_lib.check_hf_dir(source)
  changes = {}
  for f in SOURCE_FIELDS + (SIZE_FIELDS if as_is else ()):
    if getattr(config.model, f) != getattr(src, f):
      print(f"growlm: model.{f} {getattr(config.model, f)} -> {getattr(src, f)} (from the source)")
      changes[f] = getattr(src, f)
  config = config.replace(model=config.model.replace(**changes),
                          init=dataclasses.replace(config.init, source=source))
  source_lib.check_seq_len(src, config.data.seq_len)
  return config


def _first_eval_batches(config: RunConfig, vocab_size: int) -> tuple[str, list[dict]]:
  """The first eval dataset's batches, as the trainer's evaluator would take them."""
  d = config.data
  tokenizer = data_lib.make_tokenizer(d.tokenizer)
  if tokenizer.vocab_size > vocab_size:
    raise GrowlmError(f"data.tokenizer has {tokenizer.vocab_size} tokens, more than the source "
                      f"model's vocab_size={vocab_size}; accepted: the source's own tokenizer")
  name, source, split = d.eval_sources()[0]
  stream = data_lib.token_stream(source, split, tokenizer, eval_fraction=d.eval_fraction,
                                 max_bytes=d.max_bytes, data_dir=d.data_dir or None,
                                 text_field=d.text_field,
                                 max_tokens=data_lib.eval_tokens(d.seq_len, d.batch_size,
                                                                 config.eval.batches))
  return name, data_lib.eval_batches(stream, d.seq_len, d.batch_size, config.eval.batches)


def grow_to_hf(config: Any, source: str, out: str, *, as_is: bool = False) -> dict:
  """`grow --format=hf`: imports `source`, grows it to the config's model (style and vocabulary
  from the source, see apply_source) by `init.plan`, measures the preservation report on the
  first eval dataset, and writes the HF directory `out` (with growth_report.json and the
  source's tokenizer files). Returns the report."""
  _check_out(out)
  config = apply_source(config, source, as_is=as_is)
  if config.init.optimizer == "grow":
    raise GrowlmError("init.optimizer='grow' with --format=hf: an HF directory holds no "
                      "optimizer state; accepted: 'fresh'")
  plan = config.init.plan
  src = hf_lib.import_hf(source, dtype=config.model.dtype)
  target = config.model
  grown_cfg = grow_core.grown_config(src.config, target, plan)   # refuses what growth cannot do
  hf_lib.hf_architecture(grown_cfg)                              # refuses what HF cannot hold
  name, batches = _first_eval_batches(config, src.config.vocab_size)

  def run(params, rng):
    return grow_core.grow(params, src.config, target, plan, rng).params

  params = jax.jit(run)(src.params, jax.random.PRNGKey(config.init.seed))
  report = report_lib.preservation_report(
      src.config, src.params, grown_cfg, params, batches, plan,
      extra={"source": fs.absolute(source), "source_step": 0, "source_flops": 0.0,
             "eval_dataset": name}, loss_fn=loss_lib.token_nll)
  print(report_lib.format_report(report), flush=True)
  arch = hf_lib.export_hf(params, grown_cfg, out, tokenizer_from=source,
                          extra_json={"growth_report.json": report})
  report["hf_architecture"] = arch
  return report


def grow_to_run(config: Any, source: str, out: str, *, as_is: bool = False) -> dict:
  """`grow --format=run`: the run dir `out` at step 0 (checkpoint, report), grown from the HF
  `source` as `train_from_hf` would start it."""
  return grow_into(apply_source(config, source, as_is=as_is), source, out)


def train_from_hf(config: Any, source: str, workdir: str, *, as_is: bool = False) -> dict:
  """`train`: trains (or resumes) `workdir` from the HF `source`, grown to the config's sizes,
  or as it is with `as_is`. The same call resumes: the config derived from the source is the
  same each time."""
  return train(apply_source(config, source, as_is=as_is), workdir)


def _tokenizer_source(run_cfg: dict) -> str | None:
  """Where a run's tokenizer files are: its HF source, else its data.tokenizer path."""
  source = (run_cfg.get("init") or {}).get("source") or ""
  if source and hf_lib.is_hf_dir(source):
    return source
  tok = (run_cfg.get("data") or {}).get("tokenizer", "bytes")
  return tok if tok != "bytes" and fs.exists(tok) else None


def export_run(run: str, out: str, *, tokenizer_from: str | None = None,
               dtype: str | None = None) -> str:
  """`export`: the run's newest checkpoint -> HF directory `out`; returns the architecture
  written (gpt2 | qwen2 | llama)."""
  if hf_lib.is_hf_dir(run):
    raise GrowlmError(f"--run={run} is a Hugging Face directory; accepted: a growlm run dir")
  _check_out(out)
  src = source_lib.read_source(run, what="--run")
  hf_lib.hf_architecture(src.model)   # refuse before reading any arrays
  tokenizer_from = tokenizer_from or _tokenizer_source(src.config)
  token_ids = None
  if not (tokenizer_from and fs.isfile(fs.join(tokenizer_from, "config.json"))):
    try:
      tok = _run_tokenizer(src.config)
      token_ids = {"bos_token_id": tok.eot_id, "eos_token_id": tok.eot_id,
                   "pad_token_id": tok.pad_id}
    except GrowlmError:
      pass  # the run's tokenizer file is gone: the ids are left unset, the weights still export
  src = _restore_here(src)
  return hf_lib.export_hf(src.state.params, src.model, out, tokenizer_from=tokenizer_from,
                          token_ids=token_ids, dtype=dtype)


def _run_tokenizer(run_cfg: dict):
  """The tokenizer a run trained with (its data.tokenizer)."""
  return data_lib.make_tokenizer((run_cfg.get("data") or {}).get("tokenizer", "bytes"))


def _restore_here(src: source_lib.Source) -> source_lib.Source:
  """The source's newest checkpoint restored onto all of this process's devices."""
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  return source_lib.restore_source(src, mesh, sharding.DEFAULT_RULES)


def load_for_sampling(*, workdir: str | None = None, hf: str | None = None):
  """(ModelConfig, params, tokenizer) of a run's newest checkpoint or of an HF directory."""
  if bool(workdir) == bool(hf):
    raise GrowlmError("give one of --workdir=RUN and --hf=HF_DIR")
  if hf:
    if not hf_lib.is_hf_dir(hf):
      raise GrowlmError(f"--hf={hf} is not a Hugging Face model directory (config.json with a "
                        "model_type, model.safetensors)")
    imported = hf_lib.import_hf(hf)
    return imported.config, imported.params, data_lib.make_tokenizer(hf)
  if hf_lib.is_hf_dir(workdir):
    raise GrowlmError(f"--workdir={workdir} is a Hugging Face directory; accepted: --hf={workdir}")
  src = source_lib.read_source(workdir, what="--workdir")
  tokenizer = _run_tokenizer(src.config)
  src = _restore_here(src)
  return src.model, jax.device_get(src.state.params), tokenizer


def sample(prompts: list[str], *, workdir: str | None = None, hf: str | None = None,
           max_new_tokens: int = 100, temperature: float = 0.0, top_k: int = 0,
           top_p: float = 1.0, num_samples: int = 1, seed: int = 0) -> list[list[str]]:
  """`sample`: for each prompt, `num_samples` continuations (text after the prompt, up to the
  first end-of-text). A prompt starts a new document, as training data does: the tokenizer's
  end-of-text id goes first. Greedy at temperature 0 (all samples then agree)."""
  cfg, params, tok = load_for_sampling(workdir=workdir, hf=hf)
  if num_samples < 1:
    raise GrowlmError(f"num_samples={num_samples}; accepted: an int >= 1")
  if not prompts:
    raise GrowlmError("no prompt; accepted: one or more --prompt=TEXT")
  out = []
  for i, prompt in enumerate(prompts):
    ids = [tok.eot_id] + [int(t) for t in tok.encode(prompt)]
    generate_lib.check_request(cfg, len(ids), max_new_tokens, temperature, top_k, top_p)
    prompt_BxP = jax.numpy.asarray([ids] * num_samples, jax.numpy.int32)
    new_BxN = jax.device_get(generate_lib.generate(
        cfg, params, prompt_BxP, jax.random.fold_in(jax.random.key(seed), i),
        max_new_tokens=max_new_tokens, temperature=float(temperature), top_k=int(top_k),
        top_p=float(top_p)))
    texts = []
    for row in new_BxN.tolist():
      row = row[:row.index(tok.eot_id)] if tok.eot_id in row else row
      texts.append(tok.decode(row))
    out.append(texts)
  return out
