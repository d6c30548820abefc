"""`python -m growlm.worker --plan=PATH_OR_URL --worker=W`: the program a remote backend
starts on every host; the library is growlm/experiments/worker.py."""

from __future__ import annotations

import sys

from absl import app, flags

from growlm import fs
from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError
from growlm.experiments import worker as worker_lib

_PLAN = flags.DEFINE_string("plan", None, "The launch plan (JSON), a path or gs:// URL.")
_WORKER = flags.DEFINE_string("worker", "0", "This host's name in log and heartbeat files.")
_ONLY = flags.DEFINE_list("only", [], "Run only these runs of the plan.")
_HEARTBEAT_S = flags.DEFINE_float("heartbeat_s", 30.0, "Seconds between heartbeats.")
_LOGS = flags.DEFINE_string("logs", "~/growlm-logs", "Local directory for the runs' output.")


def main(argv):
  del argv
  cli_flags.setup_logging()

  def go():
    if not _PLAN.value:
      raise GrowlmError("--plan=PATH_OR_URL is required (the launcher writes it)")
    plan = fs.read_json_object(_PLAN.value, "launch plan")
    return worker_lib.drive(plan, _WORKER.value, tuple(_ONLY.value), _LOGS.value, _HEARTBEAT_S.value)

  sys.exit(cli_flags.guarded(go))


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli_flags.flags_only(cli_flags.plain_flags_parser))


if __name__ == "__main__":
  run()
