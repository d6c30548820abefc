"""Command line: `python -m growlm.main --config=configs/default.py[:ARG] --workdir=DIR`.

Thin by design: flags in, one library call (growlm.train.train) out. Bad input exits with one
line naming the field and the accepted values.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from growlm.errors import GrowlmError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (jax.distributed)"
    "; on Cloud TPU VMs use --distributed instead.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with no arguments (TPU VMs).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None,
                                    "Number of CPU devices per process (testing sharding on CPU).")


def init_distributed() -> None:
  """Starts jax.distributed when the flags ask for it (before any other JAX call)."""
  import jax  # pylint: disable=g-import-not-at-top
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _COORDINATOR.value:
    if _NUM_PROCESSES.value is None or _PROCESS_ID.value is None:
      raise GrowlmError("--coordinator_address needs --num_processes and --process_id")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value, initialization_timeout=120)
  elif _DISTRIBUTED.value:
    jax.distributed.initialize()


def main(argv):
  del argv
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)  # orbax logs every file it writes
  try:
    if _CONFIG.value is None or not _WORKDIR.value:
      raise GrowlmError("--config=configs/FILE.py[:ARG] and --workdir=DIR are both required")
    init_distributed()
    from growlm import train  # pylint: disable=g-import-not-at-top
    summary = train.train(_CONFIG.value, _WORKDIR.value)
  except GrowlmError as e:
    print(f"growlm: error: {e}", file=sys.stderr)
    sys.exit(2)
  except FloatingPointError as e:  # training diverged; the last good checkpoint is kept
    print(f"growlm: diverged: {e}", file=sys.stderr)
    sys.exit(3)
  print("growlm: done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in summary.items()))


if __name__ == "__main__":
  app.run(main)
