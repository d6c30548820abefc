"""Command line: `python -m growlm.main --config=configs/default.py[:ARG] --workdir=DIR`.

With `--compile_for=TOPOLOGY` (e.g. v5e:2x4) instead of --workdir, the config's train and eval
steps (each stage's), its growths (between stages, and from init.source, read from its config)
and their preservation reports are compiled for that TPU slice without one, and the kernel and
memory per device are printed (growlm.train.aot); nothing is written.

Thin by design: flags in, one library call (growlm.commands.train) out. Bad input exits with one
line naming the field and the accepted values.
"""

from __future__ import annotations


from absl import app, flags

from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError
from growlm.train import peers

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (created; resumed if it exists).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for a multi-process run (jax.distributed)"
    "; on Cloud TPU VMs use --distributed instead.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (0-based).")
_DISTRIBUTED = flags.DEFINE_bool("distributed", False,
                                 "Call jax.distributed.initialize() with no arguments (TPU VMs).")
_JOIN_TIMEOUT = flags.DEFINE_float(
    "join_timeout", peers.DEFAULT_JOIN_TIMEOUT_S, "Multi-process runs: seconds for every process "
    "to join before each one that is waiting stops with one error line (hosts of a pod or "
    "cluster may start minutes apart).")
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, "Compile the train and eval steps (and growths, with their "
    "preservation reports) for this TPU slice (a topology, v5e:2x4, or an accelerator type, "
    "v4-32) with no TPU, print their attention kernel and memory per device, and exit (needs "
    "libtpu; --workdir not used).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", None,
                                    "Number of CPU devices per process (testing sharding on CPU).")


def check_process_flags() -> None:
  """Refuses device and process flags that would be ignored or hang (no JAX needed)."""
  cpu, n, i = _CPU_DEVICES.value, _NUM_PROCESSES.value, _PROCESS_ID.value
  if cpu is not None and cpu < 1:
    raise GrowlmError(f"--cpu_devices={cpu}; accepted: a positive integer (CPU devices per "
                      "process)")
  if not _JOIN_TIMEOUT.value > 0:
    raise GrowlmError(f"--join_timeout={_JOIN_TIMEOUT.value}; accepted: a positive number of "
                      "seconds")
  if not _COORDINATOR.value:
    if n is not None or i is not None:
      raise GrowlmError("--num_processes and --process_id need --coordinator_address=HOST:PORT; "
                        "accepted: all three together, or none")
    return
  if n is None or i is None:
    raise GrowlmError("--coordinator_address needs --num_processes and --process_id")
  if n < 1 or not 0 <= i < n:
    raise GrowlmError(f"--num_processes={n} --process_id={i}; accepted: num_processes >= 1 and "
                      f"0 <= process_id < num_processes")


def init_distributed() -> None:
  """Starts jax.distributed when the flags ask for it (before any other JAX call)."""
  check_process_flags()
  import jax  # pylint: disable=g-import-not-at-top
  if _CPU_DEVICES.value:
    jax.config.update("jax_num_cpu_devices", _CPU_DEVICES.value)
  if _COORDINATOR.value:
    peers.initialize(_JOIN_TIMEOUT.value, coordinator_address=_COORDINATOR.value,
                     num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    peers.initialize(_JOIN_TIMEOUT.value)


def main(argv):
  del argv
  cli_flags.setup_logging()

  if _COMPILE_FOR.value is not None:
    from growlm import commands  # pylint: disable=g-import-not-at-top
    from growlm.train import aot  # pylint: disable=g-import-not-at-top

    def plan():
      if cli_flags.config() is None:
        raise GrowlmError("--compile_for needs --config=configs/FILE.py[:ARG]")
      if _WORKDIR.value:
        raise GrowlmError("--compile_for compiles and trains nothing, so --workdir has no use "
                          "with it; accepted: --compile_for=TOPOLOGY or --workdir=DIR, not both")
      return commands.compile_for(cli_flags.config(), _COMPILE_FOR.value)
    print("\n".join(aot.format_report(cli_flags.guarded(plan))))
    return

  def go():
    if cli_flags.config() is None or not _WORKDIR.value:
      raise GrowlmError("--config=configs/FILE.py[:ARG] and --workdir=DIR are both required")
    from growlm.config.typed import resolve  # pylint: disable=g-import-not-at-top
    # A bad config fails before this process joins the others (resolving starts no JAX backend):
    # they are then told by the join timer, not left waiting for it in their first collective.
    config = resolve(cli_flags.config())
    init_distributed()
    from growlm import commands  # pylint: disable=g-import-not-at-top  (after jax.distributed)
    return commands.train(config, _WORKDIR.value)

  summary = cli_flags.guarded(go)
  print("growlm: done: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in summary.items()))


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli_flags.flags_only(cli_flags.config_flags_parser))


if __name__ == "__main__":
  run()
