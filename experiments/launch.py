"""Launch a sweep: `python experiments/launch.py --config=configs/quickstart.py --sweep_dir=DIR`.

Runs every run of the config's sweep(add) in dependency order (sources before the runs grown
from them), skips finished runs, resumes unfinished ones, then writes results.md,
results.json and loss_curves.png in DIR. --dry_run prints the commands instead. With
--tpu=NAME --zone=ZONE [--project=P] each run becomes a `gcloud compute tpus tpu-vm ssh
--worker=all` command that starts the same program on every host of the slice.
"""

from __future__ import annotations


from absl import app, flags

from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError

_CONFIG = flags.DEFINE_string("config", None, "Sweep config file, configs/<file>.py[:arg].")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's run dirs.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command, run nothing.")
_ONLY = flags.DEFINE_list("only", [], "Run only these run names.")
_TPU = flags.DEFINE_string("tpu", None, "Cloud TPU VM name (multi-host launch via gcloud).")
_ZONE = flags.DEFINE_string("zone", None, "Cloud TPU zone.")
_PROJECT = flags.DEFINE_string("project", None, "Google Cloud project.")
_ANALYZE = flags.DEFINE_bool("analyze", True, "Write results.md/json and loss_curves.png after.")


def main(argv):
  del argv
  cli_flags.setup_logging()
  from growlm.experiments import analysis, sweep  # pylint: disable=g-import-not-at-top

  def go():
    if not _CONFIG.value or not _SWEEP_DIR.value:
      raise GrowlmError("--config=configs/FILE.py[:ARG] and --sweep_dir=DIR are both required")
    sweep.launch(_CONFIG.value, _SWEEP_DIR.value, dry_run=_DRY_RUN.value, tpu=_TPU.value,
                 zone=_ZONE.value, project=_PROJECT.value, only=tuple(_ONLY.value))
    if _ANALYZE.value and not _DRY_RUN.value and not _TPU.value:
      analysis.analyze(_SWEEP_DIR.value)
      print(f"growlm: results in {_SWEEP_DIR.value}/results.md and loss_curves.png")

  cli_flags.guarded(go)


if __name__ == "__main__":
  app.run(main)
