"""Every command shown in README.md runs, with tiny settings, so a README example cannot break
silently.

The commands are extracted from README.md itself (```sh blocks; backslash continuations joined,
`# ...` comments dropped; every line starting with `.venv/bin/python`, `python` or `make` is a
command), so a command added to the README fails here until CASES says how to run it tiny.
Each command runs as a subprocess, as a user would run it from the repository root: in a
temporary copy of that root (configs/ and experiments/ linked in; runs/ inside it), with
`../shared/datasets/...` replaced by small text files at that relative path, and `HF_DIR` a tiny
random GPT-2 Hugging Face directory with a tokenizer.json (written with numpy; no torch).
The rewrite rules that make a command tiny are listed in RULES; anything a case changes beyond
them (a flag added, a placeholder filled in, a command not run) is in CASES with its reason.
The README's ```python blocks run too, each with the small prelude/checks of PYTHON_BLOCKS.

The commands run WORKERS at a time, prerequisites first, sharing one JAX compilation cache (runs
of the same shapes compile once): about 170 CPU-seconds in all, hence `slow`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import shlex
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import REPO, byte_level_bpe, user_env

README = REPO / "README.md"
MAKEFILE = REPO / "Makefile"
WORKERS = 2           # subprocesses at once (2 CPU cores: compiling is mostly single-threaded)
TIMEOUT_S = 600       # per command (a loaded CI machine can take minutes for `make demo`)
STEPS = 4             # training steps of every tiny run
# Flags that make every training (or growing) command tiny; they replace the command's own value.
TINY_FLAGS = {"--config.train.num_steps": str(STEPS), "--config.eval.every_steps": str(STEPS),
              "--config.train.warmup_steps": "1",
              "--config.checkpoint.every_steps": str(STEPS), "--config.log.every_steps": "2",
              "--config.log.progress_bar": "False"}
CONFIG_TAKERS = ("growlm.main", "growlm.grow_main", "growlm.hf_main")   # take --config.F=V
QUICK_RUNS = ("source", "grown_tile", "grown_zeros", "scratch")   # configs/quickstart.py's sweep
QUICK_STEPS = 12                                                   # its `runlocal` num_steps


# ------------------------------------------------------------------------------ extraction

def code_blocks(text: str, lang: str) -> list[str]:
  """The bodies of the markdown code blocks fenced with ```lang."""
  return [m.group(1) for m in re.finditer(rf"^```{lang}[ \t]*\n(.*?)^```[ \t]*$", text,
                                          re.M | re.S)]


def readme_commands(text: str) -> list[str]:
  """Every command line of the ```sh blocks: continuations joined, comments dropped, spaces
  collapsed; a line is a command when it starts with `.venv/bin/python`, `python` or `make`."""
  out = []
  for block in code_blocks(text, "sh"):
    for line in re.sub(r"\\\n", " ", block).splitlines():
      line = " ".join(re.sub(r"(^|\s)#.*$", "", line).split())
      if re.match(r"(\.venv/bin/python|python3?|make)(\s|$)", line):
        out.append(line)
  return out


def makefile_vars(text: str) -> dict[str, str]:
  """`NAME ?= value`, `NAME := value` and `NAME = value` assignments of a Makefile."""
  return {m.group(1): m.group(2).strip()
          for m in re.finditer(r"^([A-Z_]+)\s*[?:]?=\s*(.*)$", text, re.M)}


def makefile_recipe(target: str, text: str | None = None) -> list[str]:
  """The recipe lines of `target`, with $(VAR)s expanded from the Makefile's own defaults."""
  text = MAKEFILE.read_text() if text is None else text
  variables = makefile_vars(text)
  m = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)*)", text, re.M)
  assert m, f"Makefile has no target {target!r}"

  def expand(s: str) -> str:
    while (new := re.sub(r"\$\((\w+)\)", lambda v: variables.get(v.group(1), ""), s)) != s:
      s = new
    return s
  return [expand(line.strip()) for line in m.group(1).splitlines() if line.strip()]


def test_readme_commands_are_extracted():
  """The extractor joins continuations, drops comments and ignores other blocks and lines."""
  text = ("```sh\nmake demo   # a comment\n# only a comment\n.venv/bin/python -m a \\\n"
          "    --x=1 \\\n    --y=2    # trailing\nexport A=1\n```\n"
          "```python\npython -m not_a_shell_command\n```\n```sh\npython3 b.py\n```\n")
  assert readme_commands(text) == ["make demo", ".venv/bin/python -m a --x=1 --y=2",
                                   "python3 b.py"]
  assert len(readme_commands(README.read_text())) >= 15


def test_makefile_recipe_expands_variables():
  """Recipes come back with the Makefile's default variable values substituted."""
  text = "A ?= x\nB := $(A)/y\n\nt: dep\n\t$(B) -m m --w=$(A)\n\t@echo done\n\nu:\n\tno\n"
  assert makefile_recipe("t", text) == ["x/y -m m --w=x", "@echo done"]


# ------------------------------------------------------------------------------ rewriting

def _set_flag(argv: list[str], flag: str, value: str | None) -> list[str]:
  """argv with `flag=value` replacing any `flag=...` (appended if absent); a bare `flag` when
  value is None."""
  kept = [a for a in argv if a != flag and not a.startswith(flag + "=")]
  return kept + [flag if value is None else f"{flag}={value}"]


def _python(argv: list[str]) -> list[str]:
  """`.venv/bin/python` and `python` -> this interpreter (the same venv in a checkout)."""
  return [sys.executable, *argv[1:]] if re.fullmatch(r"(\.venv/bin/)?python3?", argv[0]) else argv


def _runlocal(argv: list[str]) -> list[str]:
  """`--config=configs/{default,quickstart,staged}.py[:ARG]` -> ARG plus `runlocal` (the
  configs' tiny, seconds-long variant: 2 layers, seq_len 32, batch 8)."""
  def one(a: str) -> str:
    m = re.fullmatch(r"--config=(configs/(?:default|quickstart|staged)\.py)(?::(.*))?", a)
    if not m:
      return a
    return f"--config={m.group(1)}:" + ",".join(p for p in (m.group(2), "runlocal") if p)
  return [one(a) for a in argv]


def _tiny_steps(argv: list[str]) -> list[str]:
  """Commands that take a run config (train, grow) train STEPS steps, evaluate and save at the
  end only."""
  if not set(argv) & set(CONFIG_TAKERS) or not any(a.startswith("--config=") for a in argv):
    return argv
  for flag, value in TINY_FLAGS.items():
    argv = _set_flag(argv, flag, value)
  return argv


RULES: tuple[Callable[[list[str]], list[str]], ...] = (_python, _runlocal, _tiny_steps)


@dataclasses.dataclass(frozen=True)
class Case:
  """How one README command runs tiny, and what it must have done."""
  key: str                                    # test id, and the name prerequisites refer to
  check: Callable[["Result", Path], None]     # asserts the command's effects (ws = its root)
  after: tuple[str, ...] = ()                 # keys of cases that must have run first
  subs: tuple[tuple[str, str], ...] = ()      # text replacements before RULES (placeholders)
  flags: tuple[tuple[str, str | None], ...] = ()  # flags set after RULES
  argv: Callable[[], list[str]] | None = None     # a replacement command (make targets)
  run: bool = True                            # False: checked statically, never run
  reason: str = ""                            # why the command is not run exactly as written

  def command(self, readme_command: str) -> list[str]:
    """The argv that runs `readme_command` tiny."""
    if self.argv is not None:
      argv = self.argv()
    else:
      text = readme_command
      for old, new in self.subs:
        assert old in text, f"{self.key}: {old!r} is no longer in the README command"
        text = text.replace(old, new)
      argv = shlex.split(text)
    for rule in RULES:
      argv = rule(argv)
    for flag, value in self.flags:
      argv = _set_flag(argv, flag, value)
    return argv


def test_rules_make_a_command_tiny():
  """The rules change the interpreter, the config arg and the step flags, and nothing else."""
  argv = Case("x", lambda r, w: None).command(
      ".venv/bin/python -m growlm.main --config=configs/default.py:size=tiny --workdir=runs/t "
      "--config.train.num_steps=300 --config.model.dtype=bfloat16")
  assert argv[:5] == [sys.executable, "-m", "growlm.main",
                      "--config=configs/default.py:size=tiny,runlocal", "--workdir=runs/t"]
  assert argv.count(f"--config.train.num_steps={STEPS}") == 1
  assert "--config.model.dtype=bfloat16" in argv and not any("=300" in a for a in argv)
  launch = Case("y", lambda r, w: None, flags=(("--dry_run", None),)).command(
      "python experiments/launch.py --config=configs/quickstart.py --sweep_dir=runs/q")
  assert launch == [sys.executable, "experiments/launch.py",
                    "--config=configs/quickstart.py:runlocal", "--sweep_dir=runs/q", "--dry_run"]


# ------------------------------------------------------------------------------ checks

@dataclasses.dataclass
class Result:
  argv: list[str]
  returncode: int | None = None
  stdout: str = ""
  stderr: str = ""
  seconds: float = 0.0
  not_run: str = ""         # why it did not run (a prerequisite failed)
  check_error: str = ""     # the case's check, run as soon as the command ended

  @property
  def ok(self) -> bool:
    return not self.not_run and self.returncode == 0 and "Traceback" not in self.stderr

  def describe(self) -> str:
    if self.not_run:
      return f"not run: {self.not_run}"
    return (f"$ {shlex.join(self.argv)}\nexit {self.returncode} after {self.seconds:.0f} s\n"
            f"--- stdout (tail)\n{self.stdout[-1500:]}\n--- stderr (tail)\n{self.stderr[-3000:]}")


def _json(path: Path) -> dict:
  return json.loads(path.read_text())


def _metrics(run: Path) -> list[dict]:
  return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _checkpoints(run: Path) -> set[str]:
  return {p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()}


def _check_trained(run: Path, steps: int = STEPS, evals: tuple[str, ...] = ("heldout",)) -> list:
  """A complete run dir trained to `steps`: files, final checkpoint, finite train and eval
  losses at the end. Returns its metrics lines."""
  for f in ("config.json", "data_manifest.json", "metrics.jsonl"):
    assert (run / f).is_file(), f"{run} has no {f}"
  assert str(steps) in _checkpoints(run), f"{run}: no checkpoint at step {steps}"
  lines = _metrics(run)
  train = [l for l in lines if "train_loss" in l]
  assert train and train[-1]["step"] == steps and math.isfinite(train[-1]["train_loss"])
  last_eval = [l for l in lines if any(k.startswith("eval_loss/") for k in l)][-1]
  assert last_eval["step"] == steps
  for name in evals:
    assert math.isfinite(last_eval[f"eval_loss/{name}"]), (name, last_eval)
  return lines


def _check_growth(report: dict, method: str = "tile"):
  """An exact growth: the report says so and measured a preserved function."""
  assert report["method"].startswith(method) and report["exact_expected"], report["method"]
  assert report["max_abs_logit_diff"] < 1e-4, report["max_abs_logit_diff"]


def _safetensors_dtypes(path: Path) -> set[str]:
  """The tensor dtypes in a safetensors file's header (numpy cannot read bfloat16 tensors)."""
  with open(path, "rb") as f:
    header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
  return {v["dtype"] for k, v in header.items() if k != "__metadata__"}


def check_main_tiny(r: Result, ws: Path):
  """A tiny GPT-2-style run trained to the end on the embedded corpus."""
  run = ws / "runs/tiny"
  _check_trained(run)
  model = _json(run / "config.json")["model"]
  assert (model["d_model"], model["norm"], model["positions"]) == (128, "layernorm", "learned")
  assert f"growlm: done: step={STEPS}" in r.stdout


def check_main_staged(r: Result, ws: Path):
  """configs/staged.py: two growths inside one run, each reported and logged."""
  run = ws / "runs/staged"
  lines = _check_trained(run)
  growths = [l for l in lines if l.get("event") == "growth"]
  assert [(g["stage"], g["step"]) for g in growths] == [(1, 1), (2, 2)], growths
  assert all(g["max_abs_logit_diff"] < 1e-4 for g in growths)   # tile, identity: exact
  assert (run / "growth_stage1.json").is_file() and (run / "growth_stage2.json").is_file()
  assert r.stdout.count("growlm: growth stage") == 2


def check_main_llama(r: Result, ws: Path):
  """The Llama style (RMSNorm, RoPE, SwiGLU, GQA, untied head) in bf16 compute."""
  run = ws / "runs/tiny-llama"
  _check_trained(run)
  model = _json(run / "config.json")["model"]
  assert (model["norm"], model["positions"], model["mlp"], model["dtype"]) == (
      "rmsnorm", "rope", "swiglu", "bfloat16")
  assert model["n_kv_heads"] < model["n_heads"] and not model["tie_embeddings"]


def check_main_files(r: Result, ws: Path):
  """Trained on the text file, evaluated on the held-out tail and on the second file."""
  run = ws / "runs/shakespeare"
  _check_trained(run, evals=("heldout", "wiki"))
  manifest = json.dumps(_json(run / "data_manifest.json"))
  assert "tinyshakespeare/input.txt" in manifest and "wikitext-2/test.txt" in manifest


def check_prepare_corpus(r: Result, ws: Path):
  """Token shards and a manifest of the corpus (stdlib here: the same code path, 20x smaller)."""
  manifest = _json(ws / "runs/data/site-packages/manifest.json")
  assert manifest["source"] == "stdlib" and manifest["dtype"] == "uint16"
  assert manifest["splits"]["train"]["n_tokens"] > 10_000_000
  assert "--config.data.train=prepared:runs/data/site-packages" in r.stdout


def check_train_prepared(r: Result, ws: Path):
  """Trained on the prepared shards, evaluated on their eval split."""
  run = ws / "runs/sp"
  _check_trained(run)
  manifest = _json(run / "data_manifest.json")
  assert manifest["train"]["spec"] == "prepared:runs/data/site-packages"
  assert manifest["eval/heldout"]["split"] == "eval"


def check_prepare_jsonl(r: Result, ws: Path):
  """The JSONL rows' `content`, tokenized with HF_DIR's tokenizer.json."""
  import hashlib  # pylint: disable=g-import-not-at-top
  manifest = _json(ws / "runs/data/corpus/manifest.json")
  tok = (ws / "HF_DIR" / "tokenizer.json").read_bytes()
  assert manifest["tokenizer"]["sha256"] == hashlib.sha256(tok).hexdigest()
  assert sum(manifest["splits"][s]["n_documents"] for s in ("train", "eval")) == 300


def check_sample_run(r: Result, ws: Path):
  """The prompt and its greedy continuation, printed."""
  lines = r.stdout.splitlines()
  assert lines[0] == "--- prompt: 'def main('" and lines[1].startswith("def main(")


def check_sample_hf(r: Result, ws: Path):
  """Three sampled continuations of the prompt from the HF directory."""
  heads = [l for l in r.stdout.splitlines() if l.startswith("--- prompt")]
  assert heads == [f"--- prompt (sample {i} of 3): 'import os'" for i in (1, 2, 3)]


def check_grow_main(r: Result, ws: Path):
  """An exactly grown run dir at step 0 with its preservation report."""
  run = ws / "runs/tiny-grown"
  assert _checkpoints(run) == {"0"} and not (ws / "runs/tiny-grown.partial").exists()
  _check_growth(_json(run / "growth_report.json"))
  assert _json(run / "config.json")["model"]["d_model"] == 256
  assert "growlm: grown model written to runs/tiny-grown" in r.stdout


def check_train_grown(r: Result, ws: Path):
  """The grown run dir trained on, its growth line and source FLOPs kept."""
  lines = _check_trained(ws / "runs/tiny-grown")
  assert lines[0]["event"] == "growth" and lines[0]["step"] == 0   # kept from the grow command
  assert lines[-1]["flops_with_source"] > lines[-1]["flops"] > 0


def check_main_init_source(r: Result, ws: Path):
  """Grown from runs/tiny (Adam state mapped) and trained in one go."""
  run = ws / "runs/small-grown"
  lines = _check_trained(run)
  report = _json(run / "growth_report.json")
  _check_growth(report)
  assert report["optimizer_init"] == "grow"
  assert [l["event"] for l in lines if "event" in l] == ["growth"]
  assert lines[-1]["flops_with_source"] > lines[-1]["flops"] > 0


def _check_quick_sweep(ws: Path):
  sweep = ws / "runs/demo"
  for f in ("results.md", "results.json", "loss_curves.png"):
    assert (sweep / f).is_file(), f"runs/demo has no {f}"
  for name in QUICK_RUNS:
    _check_trained(sweep / name, steps=QUICK_STEPS)
  grown = {g["run"] for g in _json(sweep / "results.json")["grown"]}
  assert grown == {"grown_tile", "grown_zeros"}, grown


def check_make_demo(r: Result, ws: Path):
  """The quickstart sweep trained, compared, plotted and summarised."""
  _check_quick_sweep(ws)
  assert "results: runs/demo/results.md" in r.stdout
  assert r.stdout.count("compute saved") == 2, r.stdout[-1500:]


def check_make_test(r: Result, ws: Path):
  """`make test` runs pytest over tests/ (so this file) after installing."""
  del r, ws
  recipe = " ".join(makefile_recipe("test"))
  assert re.search(r"-m pytest\b.*\btests\b", recipe), recipe     # so it collects this file
  assert re.search(r"^test:.*\binstall\b", MAKEFILE.read_text(), re.M)


def check_make_install(r: Result, ws: Path):
  """`make install` installs the exact CPU set of constraints/cpu.txt, which pins jax."""
  del r, ws
  recipe = " ".join(makefile_recipe("$(STAMP)"))
  assert "pip install -q -c constraints/cpu.txt -e" in recipe, recipe
  assert "jax==" in (REPO / "constraints" / "cpu.txt").read_text()


def check_jax_devices(r: Result, ws: Path):
  del ws
  assert re.search(r"\[CpuDevice\(id=0\)", r.stdout), r.stdout


def check_jax_api_file(r: Result, ws: Path):
  del r, ws
  assert (REPO / "tests" / "test_jax_api.py").is_file()
  assert re.search(r"-m pytest\b.*\btests\b", " ".join(makefile_recipe("test")))


def check_launch(r: Result, ws: Path):
  """A relaunch skips the finished runs and writes the comparison again."""
  _check_quick_sweep(ws)
  for name in QUICK_RUNS:
    assert f"[{name}] finished, skipped" in r.stdout, r.stdout[-1500:]
  assert "growlm: results in runs/demo/results.md" in r.stdout


def check_compile_for(r: Result, ws: Path):
  """The step compiled for 8 v5e chips with splash attention; it fits (that it writes nothing
  is tests/test_aot.py's: this workspace is shared with the commands that write runs/)."""
  head, stage, evaluation = r.stdout.strip().splitlines()
  assert head.startswith("growlm: compiled for v5e:2x4: 8 x TPU v5 lite (2 host(s), 16 GiB"), head
  assert "mesh data=1 fsdp=4 tensor=2" in head, head
  assert re.search(r"stage 0: .* \(bfloat16\), attention splash \(3 Pallas kernels\).* fits;",
                   stage), stage
  assert re.match(r"growlm: stage 0 eval step: [\d.]+ GiB per device .* fits;", evaluation), \
      evaluation
  del ws


def check_dry_run(r: Result, ws: Path):
  """The dry run prints one growlm.main command per run, sources first."""
  runs = {}
  for line in r.stdout.splitlines():
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "growlm.main"], line      # only commands are printed
    workdir = next(a for a in argv if a.startswith("--workdir=runs/demo/"))
    runs[workdir.rsplit("/", 1)[1]] = argv
  assert list(runs) == list(QUICK_RUNS), list(runs)                 # the source first
  for name, argv in runs.items():
    assert ("--config.init.source=runs/demo/source" in argv) == name.startswith("grown"), argv


def check_paper_seeds(r: Result, ws: Path):
  """Three seeds of every paper run (14) plus scratch at 2x and 4x the budget: 48 growlm.main
  commands, each grown run growing the source of its own seed, and nothing written."""
  runs = {}
  for line in r.stdout.splitlines():
    argv = shlex.split(line)
    assert argv[:3] == ["python", "-m", "growlm.main"], line
    runs[next(a for a in argv if a.startswith("--workdir=")).rsplit("/", 1)[1]] = argv
  assert len(runs) == 48 and list(runs)[:3] == ["source-s0", "source-s1", "source-s2"]
  for k in range(3):
    assert f"--config.train.seed={k}" in runs[f"both_tile-s{k}"]
    assert f"--config.init.source=runs/paper3/source-s{k}" in runs[f"both_tile-s{k}"]
    assert "--config.train.num_steps=2000" in runs[f"both_scratch_4x-s{k}"]
  assert not (ws / "runs" / "paper3").exists()


def check_tpu(r: Result, ws: Path):
  """describe the TPU, copy the checkout to every worker, set up and start each worker detached;
  the plan lists every run, and nothing is run or written locally."""
  gcloud = [shlex.split(l) for l in r.stdout.splitlines() if l.startswith("gcloud ")]
  assert [a[4] for a in gcloud] == ["describe", "scp", "ssh", "ssh"], r.stdout[-2000:]
  for argv in gcloud:
    assert argv[:4] == ["gcloud", "compute", "tpus", "tpu-vm"]
    assert {"--zone=us-central2-b", "--project=my-project"} <= set(argv)
  assert all("--worker=all" in a for a in gcloud[1:]) and "--distributed" in r.stdout
  plan = [l for l in r.stdout.splitlines() if l.startswith("#   python -m growlm.main")]
  assert len(plan) == len(QUICK_RUNS)
  assert not (ws / "gs:").exists()


def check_hf_grow(r: Result, ws: Path):
  """An HF GPT-2 directory grown exactly to the config's sizes, tokenizer copied."""
  out = ws / "HF_OUT"
  assert {"config.json", "model.safetensors", "tokenizer.json", "growth_report.json"} <= {
      p.name for p in out.iterdir()}
  config = _json(out / "config.json")
  assert (config["model_type"], config["n_embd"], config["n_positions"]) == ("gpt2", 256, 1024)
  _check_growth(_json(out / "growth_report.json"))
  assert "growlm: grown gpt2 model written to HF_OUT" in r.stdout


def check_hf_grow_run(r: Result, ws: Path):
  """A growlm run dir at step 0 grown from the HF directory."""
  run = ws / "runs/grown"
  assert _checkpoints(run) == {"0"}
  _check_growth(_json(run / "growth_report.json"))
  config = _json(run / "config.json")
  assert config["init"]["source"] == "HF_DIR" and config["model"]["max_len"] == 1024
  assert "growlm: grown run written to runs/grown" in r.stdout


def check_hf_train(r: Result, ws: Path):
  """The same arguments to `train` resume that run dir and train it."""
  lines = _check_trained(ws / "runs/grown")
  assert lines[0]["event"] == "growth"         # resumed what `grow --format=run` wrote
  assert _checkpoints(ws / "runs/grown") >= {"0", str(STEPS)}
  assert f"growlm: done: step={STEPS}" in r.stdout


def check_hf_as_is(r: Result, ws: Path):
  """Trained at the HF model's own sizes, on its own tokenizer."""
  run = ws / "runs/hf"
  _check_trained(run)
  config = _json(run / "config.json")
  hf_config = _json(ws / "HF_DIR" / "config.json")
  assert (config["model"]["d_model"], config["model"]["vocab_size"]) == (
      hf_config["n_embd"], hf_config["vocab_size"])
  assert config["data"]["tokenizer"] == "HF_DIR"
  assert _json(run / "data_manifest.json")["train"]["vocab_size"] == hf_config["vocab_size"]


def check_hf_export(r: Result, ws: Path):
  """The trained run exported as a bf16 GPT-2 directory with HF_DIR's tokenizer."""
  out = ws / "HF_OUT2"
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
  config = _json(out / "config.json")
  assert (config["model_type"], config["n_embd"]) == ("gpt2", 256)
  assert _safetensors_dtypes(out / "model.safetensors") == {"BF16"}
  assert (out / "tokenizer.json").read_bytes() == (ws / "HF_DIR" / "tokenizer.json").read_bytes()
  assert "growlm: gpt2 model written to HF_OUT2" in r.stdout


def _make_demo_argv() -> list[str]:
  """The Makefile's demo recipe (without its `install` prerequisite) with demo's default
  config named (RULES make it the `runlocal` variant)."""
  recipe = makefile_recipe("demo")
  assert len(recipe) == 1 and " -m growlm.demo " in f"{recipe[0]} ", recipe
  demo_src = (REPO / "growlm" / "cli" / "demo.py").read_text()
  assert re.search(r'"configs",\s*"quickstart\.py"', demo_src), "demo's default config moved"
  return shlex.split(recipe[0]) + ["--config=configs/quickstart.py"]


_CMD = ".venv/bin/python -m growlm."
_LAUNCH = ".venv/bin/python experiments/launch.py --config=configs/quickstart.py --sweep_dir="
_SMALL = "--config=configs/default.py:size=small"
# README command (as readme_commands returns it) -> how it runs tiny.
CASES: dict[str, Case] = {
    "make demo": Case(
        "make-demo", check_make_demo, argv=_make_demo_argv,
        reason="the Makefile's recipe without `install` (the venv exists), on "
               "configs/quickstart.py:runlocal (12 steps per run) instead of minutes"),
    "make install": Case(
        "make-install", check_make_install, run=False,
        reason="`make test` and `make demo` run it first; here: its recipe is checked"),
    ".venv/bin/python -c 'import jax; print(jax.devices())'": Case("jax-devices",
                                                                   check_jax_devices),
    ".venv/bin/python -m pytest -q tests/test_jax_api.py": Case(
        "jax-api", check_jax_api_file, run=False,
        reason="`make test` runs tests/test_jax_api.py; here: it exists and is collected"),
    "make test": Case(
        "make-test", check_make_test, run=False,
        reason="the test suite itself (recursion, ~10 min): its recipe is checked instead"),
    _CMD + "main --config=configs/default.py:size=tiny,style=gpt2 --workdir=runs/tiny": Case(
        "main-tiny", check_main_tiny),
    _CMD + "main --config=configs/staged.py --workdir=runs/staged": Case(
        "main-staged", check_main_staged),
    (_CMD + "main --config=configs/default.py:size=tiny,style=llama --workdir=runs/tiny-llama "
     "--config.train.num_steps=300 --config.model.dtype=bfloat16"): Case(
         "main-llama", check_main_llama),
    (_CMD + "main --config=configs/default.py:size=nano --workdir=runs/shakespeare "
     "--config.data.train=file:../shared/datasets/tinyshakespeare/input.txt "
     "--config.data.eval.wiki=file:../shared/datasets/wikitext-2/test.txt@all"): Case(
         "main-files", check_main_files,
         reason="../shared/datasets/ holds small generated text files"),
    (_CMD + f"grow_main --source=runs/tiny --out=runs/tiny-grown {_SMALL} "
     "--config.init.plan.width=tile"): Case(
         "grow-main", check_grow_main, after=("main-tiny",)),
    _CMD + f"main {_SMALL} --workdir=runs/tiny-grown": Case(
        "main-train-grown", check_train_grown, after=("grow-main",)),
    (_CMD + f"main {_SMALL} --workdir=runs/small-grown --config.init.source=runs/tiny "
     "--config.init.plan.width=tile --config.init.optimizer=grow"): Case(
         "main-init-source", check_main_init_source, after=("main-tiny",)),
    _LAUNCH + "runs/demo": Case(
        "launch", check_launch, after=("make-demo",),
        reason="after `make demo` wrote runs/demo: every run is finished, skipped, re-analysed"),
    _LAUNCH + "runs/demo --dry_run": Case("launch-dry-run", check_dry_run),
    (_CMD + "main --config=configs/default.py:size=base --compile_for=v5e:2x4 "
     "--config.model.dtype=bfloat16 --config.data.batch_size=64 --config.mesh.fsdp=4 "
     "--config.mesh.tensor=2"): Case(
         "compile-for", check_compile_for, flags=(("--config.data.seq_len", "128"),),
         reason="runlocal's seq_len 32 set back to 128, splash attention's smallest length"),
    (".venv/bin/python experiments/launch.py --config=configs/paper.py:budgets=1+2+4 --seeds=3 "
     "--sweep_dir=runs/paper3"): Case(
        "launch-paper-seeds", check_paper_seeds, flags=(("--dry_run", None),),
        reason="--dry_run added: its 48 runs take hours here; the dry run shows each command"),
    (_LAUNCH + "gs://my-bucket/sweeps/q --backend=gcloud --tpu=my-v4-32 --zone=us-central2-b "
     "--project=my-project"): Case(
        "launch-tpu", check_tpu, flags=(("--dry_run", None),),
        reason="--dry_run added: prints the gcloud commands instead of running them"),
    (_CMD + f"hf_main grow --source=HF_DIR --out=HF_OUT {_SMALL} --config.model.max_len=1024 "
     "--config.data.tokenizer=HF_DIR --config.init.plan.width=tile"): Case("hf-grow",
                                                                           check_hf_grow),
    (_CMD + f"hf_main grow --format=run --source=HF_DIR --out=runs/grown {_SMALL} "
     "--config.model.max_len=1024 --config.data.tokenizer=HF_DIR"): Case("hf-grow-run",
                                                                         check_hf_grow_run),
    (_CMD + f"hf_main train --source=HF_DIR --workdir=runs/grown {_SMALL} "
     "--config.model.max_len=1024 --config.data.tokenizer=HF_DIR"): Case(
         "hf-train", check_hf_train, after=("hf-grow-run",)),
    (_CMD + "hf_main train --as_is --source=HF_DIR --workdir=runs/hf "
     "--config=configs/default.py --config.data.tokenizer=HF_DIR"): Case(
         "hf-train-as-is", check_hf_as_is),
    (_CMD + "hf_main export --run=runs/grown --out=HF_OUT2 --tokenizer_from=HF_DIR "
     "--dtype=bfloat16"): Case("hf-export", check_hf_export, after=("hf-train",)),
    (_CMD + "prepare --source=site-packages --tokenizer=bytes "
     "--out=runs/data/site-packages"): Case(
         "prepare-corpus", check_prepare_corpus, subs=(("site-packages --", "stdlib --"),),
         reason="the stdlib corpus (12 MB, the same code path) instead of 275 MB"),
    (_CMD + "main --config=configs/default.py:size=small --workdir=runs/sp "
     "--config.data.train=prepared:runs/data/site-packages"): Case(
         "main-prepared", check_train_prepared, after=("prepare-corpus",),
         flags=(("--config.data.max_bytes", "0"),),
         reason="runlocal caps in-memory sources with data.max_bytes, which prepared data "
                "refuses; set back to 0"),
    (_CMD + "sample --workdir=runs/tiny --prompt='def main(' --max_new_tokens=80"): Case(
        "sample-run", check_sample_run, after=("main-tiny",)),
    (_CMD + "sample --hf=HF_DIR --prompt='import os' --temperature=0.8 --top_p=0.95 "
     "--num_samples=3 --max_new_tokens=40"): Case("sample-hf", check_sample_hf),
    (_CMD + "prepare --source='jsonl:corpus/*.jsonl' --text_field=content --tokenizer=HF_DIR "
     "--out=runs/data/corpus"): Case("prepare-jsonl", check_prepare_jsonl),
}
BY_KEY = {c.key: c for c in CASES.values()}
# Longest first, so the slowest chain starts at once.
PRIORITY = ("make-demo", "main-tiny", "py:python-api", "hf-grow-run", "main-init-source",
            "grow-main")


def test_every_readme_command_is_covered():
  """Each README command has a case and each case a README command (no stale entries)."""
  commands = readme_commands(README.read_text())
  missing = [c for c in commands if c not in CASES]
  assert not missing, "README command not exercised by tests/test_readme.py: " + missing[0]
  stale = [c for c in CASES if c not in commands]
  assert not stale, "tests/test_readme.py covers a command no longer in README.md: " + stale[0]
  assert len({c.key for c in CASES.values()}) == len(CASES)
  for case in CASES.values():
    assert set(case.after) <= set(BY_KEY), case.key
    assert case.run or case.reason, f"{case.key}: a command not run needs a reason"


# ------------------------------------------------------------------------------ workspace

def _write_text(path: Path, n_lines: int, seed: int):
  """Deterministic pseudo-English lines (a stand-in for a dataset file)."""
  words = ("the king shall speak to thee of love and war my good lord when night falls on "
           "this fair town where all men sleep").split()
  rng = np.random.RandomState(seed)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("\n".join(" ".join(rng.choice(words, 12)) for _ in range(n_lines)) + "\n")


def _write_hf_dir(path: Path, n_layer: int = 2, d: int = 64, n_head: int = 2,
                  n_positions: int = 64):
  """A tiny random GPT-2 Hugging Face directory as `save_pretrained` lays it out (config.json,
  model.safetensors), with its own BPE tokenizer.json; written with numpy, no torch."""
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  tok = byte_level_bpe(["def f(x):\n  return x + 1\n", "import os, sys\n"] * 20, vocab_size=320)
  # The vocabulary covers the byte tokenizer's 258 ids too (the grow/train examples use bytes).
  vocab = max(tok.get_vocab_size(), 258)
  rng = np.random.RandomState(0)
  shapes = {"wte.weight": (vocab, d), "wpe.weight": (n_positions, d), "ln_f.weight": (d,),
            "ln_f.bias": (d,)}
  for i in range(n_layer):
    shapes.update({f"h.{i}.{k}": v for k, v in {
        "ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,),
        "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
        "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
        "mlp.c_fc.weight": (d, 4 * d), "mlp.c_fc.bias": (4 * d,),
        "mlp.c_proj.weight": (4 * d, d), "mlp.c_proj.bias": (d,)}.items()})
  tensors = {"transformer." + k: ((k.endswith("ln_1.weight") or k.endswith("ln_2.weight")
                                   or k == "ln_f.weight") + 0.02 * rng.standard_normal(s)
                                  ).astype(np.float32) for k, s in shapes.items()}
  path.mkdir()
  save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
  (path / "config.json").write_text(json.dumps({
      "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": vocab,
      "n_positions": n_positions, "n_embd": d, "n_layer": n_layer, "n_head": n_head,
      "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
      "tie_word_embeddings": True, "bos_token_id": 1, "eos_token_id": 1, "pad_token_id": 0},
      indent=2))
  tok.save(str(path / "tokenizer.json"))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
  """A stand-in for the repository root: configs/ and experiments/ linked, HF_DIR, and
  ../shared/datasets/ files the README names."""
  base = tmp_path_factory.mktemp("readme")
  ws = base / "repo"
  ws.mkdir()
  for name in ("configs", "experiments"):
    (ws / name).symlink_to(REPO / name)
  _write_text(base / "shared/datasets/tinyshakespeare/input.txt", 800, seed=0)
  _write_text(base / "shared/datasets/wikitext-2/test.txt", 200, seed=1)
  _write_hf_dir(ws / "HF_DIR")
  (ws / "corpus").mkdir()
  for part in range(3):
    _write_text(ws / "corpus" / "lines.txt", 100, seed=10 + part)
    lines = (ws / "corpus" / "lines.txt").read_text().splitlines()
    (ws / "corpus" / f"part-{part}.jsonl").write_text(
        "".join(json.dumps({"id": i, "content": line}) + "\n" for i, line in enumerate(lines)))
  (ws / "corpus" / "lines.txt").unlink()
  return ws


def _env(ws: Path) -> dict[str, str]:
  """The user's environment: one CPU device (conftest.user_env), this checkout's growlm; and a
  JAX compilation cache shared by these commands only (runs of the same shapes compile once)."""
  env = user_env()
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
  env.setdefault("WANDB_MODE", "offline")
  env["JAX_COMPILATION_CACHE_DIR"] = str(ws.parent / "jax_cache")
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
  return env


def _run(argv: list[str], ws: Path, stdin: str | None = None,
         check: Callable[[Result, Path], None] | None = None) -> Result:
  """Runs argv in ws; then `check`, at once (later commands may change what it looks at)."""
  t = time.perf_counter()
  try:
    p = subprocess.run(argv, cwd=ws, env=_env(ws), capture_output=True, text=True, input=stdin,
                       timeout=TIMEOUT_S)
    r = Result(argv, p.returncode, p.stdout, p.stderr)
  except subprocess.TimeoutExpired as e:
    r = Result(argv, None, str(e.stdout or ""), f"timed out after {TIMEOUT_S} s")
  r.seconds = time.perf_counter() - t
  if check is not None and r.ok:
    try:
      check(r, ws)
    except AssertionError as e:
      r.check_error = f"{type(e).__name__}: {e}"
  return r


def run_cases(keys: set[str], ws: Path, scripts: dict[str, str] | None = None,
              workers: int = WORKERS) -> dict[str, Result]:
  """Runs the cases `keys` and their prerequisites, WORKERS at a time, each after the cases it
  needs (a case whose prerequisite failed is not run), and the python `scripts` (name -> code,
  run with stdin) beside them."""
  command = {c.key: cmd for cmd, c in CASES.items()}
  scripts = scripts or {}
  todo = set()
  stack = list(keys)
  while stack:
    k = stack.pop()
    if k not in todo:
      todo.add(k)
      stack.extend(BY_KEY[k].after)
  pending = sorted([k for k in todo if BY_KEY[k].run] + list(scripts),
                   key=lambda k: (PRIORITY.index(k) if k in PRIORITY else len(PRIORITY), k))
  results: dict[str, Result] = {}
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    running: dict[concurrent.futures.Future, str] = {}
    while pending or running:
      for k in list(pending):
        if len(running) >= workers:
          break
        if k in scripts:
          pending.remove(k)
          running[pool.submit(_run, [sys.executable, "-"], ws, scripts[k])] = k
          continue
        case = BY_KEY[k]
        if not all(d in results for d in case.after):
          continue
        pending.remove(k)
        argv = case.command(command[k])
        failed = [d for d in case.after if not results[d].ok]
        if failed:
          results[k] = Result(argv, not_run=f"prerequisite {failed[0]} failed")
        else:
          running[pool.submit(_run, argv, ws, None, case.check)] = k
      assert running or not pending, f"cases waiting on nothing: {pending}"
      done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
      for f in done:
        results[running.pop(f)] = f.result()
  return results


# ------------------------------------------------------------------------------ python blocks

@dataclasses.dataclass(frozen=True)
class PyBlock:
  """How a README ```python block runs: code before it, replacements in it, checks after it."""
  key: str
  prelude: str = ""
  subs: tuple[tuple[str, str], ...] = ()
  checks: str = ""


PYTHON_BLOCKS: dict[str, PyBlock] = {   # first line of the block -> how it runs
    "from growlm.interop import hf": PyBlock(
        "hf-api",
        # `params, cfg` stand for any growlm model: a random Llama-style nano one.
        prelude=("import json, os, jax\nfrom growlm import model\n"
                 "cfg = model.make_model_config('nano', 'llama')\n"
                 "params = model.init_params(cfg, jax.random.key(0))\n"),
        subs=(('"HF_OUT"', '"HF_OUT_PY"'),),   # HF_OUT is the hf_main grow example's output
        checks=("src = json.load(open('HF_DIR/config.json'))\n"
                "assert (m.config.d_model, m.config.vocab_size) == (src['n_embd'], "
                "src['vocab_size'])\n"
                "assert m.params['embed'].shape == (src['vocab_size'], src['n_embd'])\n"
                "out = json.load(open('HF_OUT_PY/config.json'))\n"
                "assert out['model_type'] == 'llama' and out['hidden_size'] == cfg.d_model\n"
                "assert os.path.isfile('HF_OUT_PY/tokenizer.json')\n")),
    "import jax": PyBlock(
        "python-api",
        prelude="import numpy as np\n",
        checks=("assert logits.shape == (2, 8, 258) and logits.dtype == np.float32\n"
                "assert run_config.model.d_model == 64 and run_config.data.seq_len == 32\n"
                "np.testing.assert_allclose(logits_big, logits, atol=1e-4)\n"
                "assert g.config.d_model == 128 and g.config.n_layers == 4\n"
                "assert summary['step'] == config.train.num_steps and "
                "np.isfinite(summary['train_loss'])\n"
                "import os\nassert os.path.isdir(f'runs/api/checkpoints/{summary[\"step\"]}')\n")),
}
_PY_BLOCKS = code_blocks(README.read_text(), "python")


def _py_key(block: str) -> str:
  """A python block's name in PYTHON_BLOCKS: its first line."""
  return block.strip().splitlines()[0].split("#")[0].strip()


def python_block_script(block: str) -> str:
  """The script that runs a README python block: prelude, the block (substituted), checks."""
  key = _py_key(block)
  assert key in PYTHON_BLOCKS, f"README python block not exercised by tests/test_readme.py: {key}"
  spec = PYTHON_BLOCKS[key]
  for old, new in spec.subs:
    assert old in block, f"{spec.key}: {old!r} is no longer in the README block"
    block = block.replace(old, new)
  return spec.prelude + block + "\n" + spec.checks


# ------------------------------------------------------------------------------ running

@pytest.fixture(scope="module")
def readme_runs(request, workspace) -> dict[str, Result]:
  """Runs the README commands and python blocks this session selected (and what they need),
  once, WORKERS at a time."""
  commands, scripts = set(), {}
  for item in request.session.items:
    params = getattr(item, "callspec", None) and item.callspec.params
    if getattr(getattr(item, "module", None), "__name__", None) != __name__ or not params:
      continue
    if params.get("command") in CASES:
      commands.add(CASES[params["command"]].key)
    if "block" in params and _py_key(params["block"]) in PYTHON_BLOCKS:
      scripts["py:" + PYTHON_BLOCKS[_py_key(params["block"])].key] = python_block_script(
          params["block"])
  t = time.perf_counter()
  results = run_cases(commands, workspace, scripts)
  times = ", ".join(f"{k} {r.seconds:.0f}s" for k, r in results.items() if not r.not_run)
  print(f"\nREADME commands ({time.perf_counter() - t:.0f} s on {WORKERS} workers): {times}")
  return results


def _ids(commands: list[str]) -> list[str]:
  return [CASES[c].key if c in CASES else f"uncovered-{i}" for i, c in enumerate(commands)]


_COMMANDS = readme_commands(README.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("command", _COMMANDS, ids=_ids(_COMMANDS))
def test_readme_command(command, readme_runs, workspace):
  """The README command, run tiny, exits 0 without a traceback and does what the README says."""
  assert command in CASES, "README command not exercised by tests/test_readme.py: " + command
  case = CASES[command]
  if not case.run:
    case.check(None, workspace)
    return
  r = readme_runs[case.key]
  assert r.ok, f"README command failed: {command}\n{r.describe()}"
  assert not r.check_error, (f"README command did not do what it says: {command}\n"
                             f"{r.check_error}\n{r.describe()}")


@pytest.mark.slow
@pytest.mark.parametrize("block", _PY_BLOCKS, ids=[
    PYTHON_BLOCKS[_py_key(b)].key if _py_key(b) in PYTHON_BLOCKS else f"uncovered-{i}"
    for i, b in enumerate(_PY_BLOCKS)])
def test_readme_python_block(block, readme_runs):
  """The README python block runs (after its prelude) and computes what its comments say
  (the checks after it)."""
  key = _py_key(block)
  assert key in PYTHON_BLOCKS, f"README python block not exercised by tests/test_readme.py: {key}"
  r = readme_runs["py:" + PYTHON_BLOCKS[key].key]
  assert r.ok, f"README python block failed:\n{python_block_script(block)}\n{r.describe()}"


def test_make_targets_named_in_readme_exist():
  """Every `make TARGET` the README names (in code blocks or in the text) is a Makefile target,
  and `make bench` runs the benchmark script (tests/test_benchmark.py runs it --quick)."""
  text = README.read_text()
  targets = set(re.findall(r"(?:^|`)make ([\w-]+)", text, re.M))
  assert {"demo", "test", "bench"} <= targets, targets
  makefile = MAKEFILE.read_text()
  for t in targets:
    assert re.search(rf"^{re.escape(t)}:", makefile, re.M), f"README names `make {t}`: no target"
  assert any("benchmarks/throughput.py" in line for line in makefile_recipe("bench"))
  assert (REPO / "benchmarks" / "throughput.py").is_file()
