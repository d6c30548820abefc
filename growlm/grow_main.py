"""Grow command: a source run's checkpoint -> a new run dir holding the grown model at step 0.

  python -m growlm.grow_main --source=runs/small --config=configs/default.py:size=tiny \\
      --config.init.plan.width=tile --out=runs/tiny-grown

The output is a complete run directory (config.json, checkpoints/0, growth_report.json,
metrics.jsonl): `python -m growlm.main --config=<same config> --workdir=<out>` trains it on.
It is written under OUT.partial and renamed at the end, so on any error nothing is left at OUT.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from growlm.errors import GrowlmError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Target run config (configs/*.py[:arg]).",
                                          lock_config=True)
_SOURCE = flags.DEFINE_string("source", None, "Source run directory (config.json + checkpoints/).")
_OUT = flags.DEFINE_string("out", None, "Output run directory (must not exist).")


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    if _CONFIG.value is None or not _SOURCE.value or not _OUT.value:
      raise GrowlmError("--config=TARGET_CONFIG, --source=RUN_DIR and --out=DIR are all required")
    from growlm import train  # pylint: disable=g-import-not-at-top
    train.grow_into(_CONFIG.value, _SOURCE.value, _OUT.value)
  except GrowlmError as e:
    print(f"growlm: error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"growlm: grown model written to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
