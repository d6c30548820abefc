"""Grow command: a source run's checkpoint -> a new run dir holding the grown model at step 0.

  python -m growlm.grow_main --source=runs/small --config=configs/default.py:size=tiny \\
      --config.init.plan.width=tile --out=runs/tiny-grown

SOLAR-style depth up-scaling: a 4-layer source to 6 layers, its layers 0..2 then 1..3:

  python -m growlm.grow_main --source=runs/small --config=configs/default.py:size=small \\
      --config.model.n_layers=6 --config.init.plan.depth=layer_ranges \\
      --config.init.plan.layer_ranges='[[0,3],[1,4]]' --out=runs/small-solar

The output is a complete run directory (config.json, checkpoints/0, growth_report.json,
metrics.jsonl): `python -m growlm.main --config=<same config> --workdir=<out>` trains it on.
It is written under OUT.partial and renamed at the end, so on any error nothing is left at OUT.
"""

from __future__ import annotations


from absl import app, flags

from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError

_SOURCE = flags.DEFINE_string("source", None, "Source run directory (config.json + checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output run directory (must not exist).")


def main(argv):
  del argv
  cli_flags.setup_logging()

  def go():
    if cli_flags.config() is None or not _SOURCE.value or not _OUT.value:
      raise GrowlmError("--config=TARGET_CONFIG, --source=RUN_DIR and --out=DIR are all required")
    from growlm import commands  # pylint: disable=g-import-not-at-top
    commands.grow_into(cli_flags.config(), _SOURCE.value, _OUT.value)

  cli_flags.guarded(go)
  print(f"growlm: grown model written to {_OUT.value}")


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli_flags.flags_only(cli_flags.config_flags_parser))


if __name__ == "__main__":
  run()
