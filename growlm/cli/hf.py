"""Hugging Face commands: grow an HF model, train from one, export a growlm run to HF.

  # grow a local HF directory (GPT-2 or Llama) into an HF directory, or into a run dir
  python -m growlm.hf_main grow --source=HF_DIR --config=configs/default.py:size=small \\
      --config.init.plan.width=tile --out=OUT --format=hf|run
  # train from an HF directory: grown to the config's sizes, or as it is (--as_is)
  python -m growlm.hf_main train --source=HF_DIR --config=configs/default.py \\
      --workdir=RUN [--as_is]
  # export any growlm run's newest checkpoint to an HF directory
  python -m growlm.hf_main export --run=RUN_DIR --out=HF_DIR [--tokenizer_from=DIR] [--dtype=...]

The model's style (norm, positions, MLP, biases, tied head, rope_theta) and vocabulary always come
from the HF source, since growth keeps them; its sizes (d_model, n_layers, heads, ...) come from
the config, or from the source with --as_is. Every output is built under OUT.partial and renamed
at the end, so on any error nothing is left at OUT.
"""

from __future__ import annotations


from absl import app, flags

from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError

_SOURCE = flags.DEFINE_string("source", None, "Source Hugging Face directory (grow, train).")
_OUT = flags.DEFINE_string("out", None, "Output directory, must not exist (grow, export).")
_FORMAT = flags.DEFINE_enum("format", "hf", ["hf", "run"], "grow: write an HF directory or a "
                            "growlm run dir at step 0.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (train; resumed if it exists).")
_AS_IS = flags.DEFINE_bool("as_is", False, "grow, train: keep the source's sizes too (no growth).")
_RUN = flags.DEFINE_string("run", None, "Run directory to export (export).")
_TOKENIZER_FROM = flags.DEFINE_string(
    "tokenizer_from", None, "export: copy tokenizer files from this directory (default: the "
    "run's HF source, else its data.tokenizer path).")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16", "float64"],
                           "export: tensor dtype (default: the params' dtype).")

COMMANDS = ("grow", "train", "export")


def _require(command: str, **values):
  missing = [f"--{k}" for k, v in values.items() if not v]
  if missing:
    raise GrowlmError(f"{command} needs {', '.join(missing)}; usage: see "
                      "`python -m growlm.hf_main --help`")


def run_command(command: str) -> str:
  """Runs one command from the flags; returns the line to print on success."""
  from growlm import commands as hf  # pylint: disable=g-import-not-at-top  (after flags: jax is slow)
  if command == "export":
    _require(command, run=_RUN.value, out=_OUT.value)
    arch = hf.export_run(_RUN.value, _OUT.value, tokenizer_from=_TOKENIZER_FROM.value,
                         dtype=_DTYPE.value)
    return f"growlm: {arch} model written to {_OUT.value}"
  _require(command, source=_SOURCE.value, config=cli_flags.config() is not None)
  config, source, as_is = cli_flags.config(), _SOURCE.value, _AS_IS.value
  if command == "train":
    _require(command, workdir=_WORKDIR.value)
    summary = hf.train_from_hf(config, source, _WORKDIR.value, as_is=as_is)
    return "growlm: done: " + ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items())
  _require(command, out=_OUT.value)
  if _FORMAT.value == "hf":
    report = hf.grow_to_hf(config, source, _OUT.value, as_is=as_is)
    return f"growlm: grown {report['hf_architecture']} model written to {_OUT.value}"
  hf.grow_to_run(config, source, _OUT.value, as_is=as_is)
  return (f"growlm: grown run written to {_OUT.value}; train it on with the same arguments and "
          f"`train --workdir={_OUT.value}`")


def main(argv):
  cli_flags.setup_logging()

  def go():
    if len(argv) != 2 or argv[1] not in COMMANDS:
      raise GrowlmError(f"command {' '.join(argv[1:])!r}; accepted: one of {COMMANDS}")
    return run_command(argv[1])

  print(cli_flags.guarded(go))


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli_flags.config_flags_parser)


if __name__ == "__main__":
  run()
