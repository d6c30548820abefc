"""Launch a sweep: `python experiments/launch.py --config=configs/quickstart.py --sweep_dir=DIR`.

  --backend=local (default)  trains every run here, in dependency order (sources before the runs
                             grown from them), skipping finished runs and resuming unfinished
                             ones, then writes results.md, results.json and loss_curves.png in DIR
  --backend=gcloud           hands the sweep to an existing Cloud TPU VM (--tpu, --zone,
                             [--project], [--spot --accelerator_type=v4-32]); docs/tpu.md
  --backend=skypilot         one SkyPilot managed job per run (--accelerators=tpu-v4-32 or H100:8,
                             [--num_nodes], [--spot]); docs/gpu-cluster.md
Remote backends need a gs:// --sweep_dir and return at once; --wait follows the sweep until it
ends (then analyses it). `--config.FIELD=VALUE` applies to every run. Also:

  python experiments/launch.py status --sweep_dir=DIR      the runs' states, read from DIR
  python experiments/launch.py --analyze_only --sweep_dir=DIR
  python experiments/launch.py ... --dry_run               print what would run, touch nothing
  python experiments/launch.py ... --seeds=3               every run over 3 seeds (NAME-sK)
  python experiments/launch.py ... --compile_for=v4-32     every run's programs compiled for
                                                           that TPU slice here (no TPU): fit?
"""

from __future__ import annotations

import logging
import re

from absl import app, flags

from growlm.cli import flags as cli_flags
from growlm.errors import GrowlmError

_CONFIG = flags.DEFINE_string("config", None, "Sweep config file, configs/<file>.py[:arg]; "
                              "--config.FIELD=VALUE sets a field of every run.")
_SWEEP_DIR = flags.DEFINE_string("sweep_dir", None, "Directory of the sweep's run dirs (or gs://).")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print every command, run nothing.")
_ONLY = flags.DEFINE_list("only", [], "Run only these run names.")
_SEEDS = flags.DEFINE_integer("seeds", 1, "Repeat every run over this many seeds (NAME-s0, "
                              "NAME-s1, ...; train/data/init seeds offset by 0, 1, ...); the "
                              "analysis reports mean and spread.")
_BACKEND = flags.DEFINE_enum("backend", "local", ["local", "gcloud", "skypilot"],
                             "Where the runs train.")
_TPU = flags.DEFINE_string("tpu", None, "gcloud: Cloud TPU VM name.")
_ZONE = flags.DEFINE_string("zone", None, "gcloud: the TPU's zone; skypilot: a zone to use.")
_PROJECT = flags.DEFINE_string("project", None, "gcloud: Google Cloud project.")
_SPOT = flags.DEFINE_bool("spot", False, "Spot capacity (gcloud: a queued resource).")
_ACCEL_TYPE = flags.DEFINE_string("accelerator_type", None,
                                  "gcloud --spot: TPU type to request, e.g. v4-32.")
_RUNTIME = flags.DEFINE_string("runtime_version", None, "TPU VM image (tpu-ubuntu2204-base).")
_ACCELERATORS = flags.DEFINE_string("accelerators", None,
                                    "skypilot: e.g. tpu-v4-32 or H100:8 (none: CPU nodes).")
_NUM_NODES = flags.DEFINE_integer("num_nodes", None, "skypilot: nodes of a GPU cluster.")
_CLOUD = flags.DEFINE_string("cloud", None, "skypilot: one cloud (gcp, aws, ...).")
_REGION = flags.DEFINE_string("region", None, "skypilot: one region.")
_WAIT = flags.DEFINE_bool("wait", False, "Remote: follow the sweep until it ends, then analyse.")
_POLL_S = flags.DEFINE_float("poll_s", 30.0, "Seconds between reads of the sweep dir (--wait).")
_ANALYZE = flags.DEFINE_bool("analyze", True, "Write results.md/json and loss_curves.png after.")
_COMPILE_FOR = flags.DEFINE_string(
    "compile_for", None, "Compile every run's train and eval steps (and growths, with their "
    "preservation reports) for this TPU slice (a topology, v5e:2x4, or an accelerator type, "
    "v4-32) with no TPU, print their memory per chip, refuse a sweep whose programs do not "
    "fit; launches nothing.")
_ANALYZE_ONLY = flags.DEFINE_bool("analyze_only", False,
                                  "Only write results.md/json and loss_curves.png of --sweep_dir.")

_FIELD = re.compile(r"^--?(no)?config\.([^=]+)(?:=(.*))?$", re.S)
_OVERRIDES: dict[str, str | bool] = {}


def parse(argv: list[str]) -> list[str]:
  """absl `flags_parser`: `--config.FIELD=VALUE` (or a bare bool `--config.FIELD`,
  `--noconfig.FIELD`) kept for every run; the other flags by absl, errors as one line."""
  rest = [argv[0]]
  try:
    for arg in argv[1:]:
      m = _FIELD.match(arg)
      if not m:
        rest.append(arg)
        continue
      no, field, value = m.groups()
      if no and value is not None:
        raise GrowlmError(f"{arg}: a value after --noconfig.{field}; accepted: "
                          f"--config.{field}=VALUE or --noconfig.{field}")
      _OVERRIDES.pop(field, None)
      _OVERRIDES[field] = (not no) if value is None else value
    return flags.FLAGS(rest)
  except flags.Error as e:
    cli_flags.fail(GrowlmError(f"{str(e).strip()}; accepted: the flags that --helpfull lists"))
  except GrowlmError as e:
    cli_flags.fail(e)


def _remote_flags() -> dict:
  given = {"tpu": _TPU.value, "zone": _ZONE.value, "project": _PROJECT.value,
           "spot": _SPOT.value, "accelerator_type": _ACCEL_TYPE.value,
           "runtime_version": _RUNTIME.value, "accelerators": _ACCELERATORS.value,
           "num_nodes": _NUM_NODES.value, "cloud": _CLOUD.value, "region": _REGION.value}
  if _BACKEND.value == "local":
    return given
  return dict(given, wait=_WAIT.value, poll_s=_POLL_S.value)


def main(argv):
  cli_flags.setup_logging()
  from growlm.experiments import analysis, launcher, status, sweep  # pylint: disable=g-import-not-at-top

  def go():
    words = argv[1:]
    if words not in ([], ["status"]):
      raise GrowlmError(f"unknown command {' '.join(words)!r}; accepted: `status`, or none "
                        "(launch)")
    if not _SWEEP_DIR.value:
      raise GrowlmError("--sweep_dir=DIR is required")
    sweep_dir = _SWEEP_DIR.value
    if _WAIT.value and _BACKEND.value == "local":
      raise GrowlmError("--wait follows a remote sweep; accepted: --backend=gcloud or skypilot "
                        "(the local backend trains in this process and returns when it is done)")
    if words == ["status"] or _ANALYZE_ONLY.value:
      logging.getLogger().setLevel(logging.WARNING)   # only the table or the results line
    if words == ["status"]:
      if _CONFIG.value:
        runs = sweep.manifest(_CONFIG.value, sweep.expand(_CONFIG.value, sweep_dir, _OVERRIDES,
                                                          _SEEDS.value),
                              _OVERRIDES, "", {}, _SEEDS.value)["runs"]
      else:
        runs = status.load_manifest(sweep_dir)["runs"]
      print(status.table(status.read(runs)))
      return
    if _ANALYZE_ONLY.value:
      analysis.analyze(sweep_dir)
      print(f"growlm: results in {sweep_dir}/results.md, results.json and loss_curves.png")
      return
    if not _CONFIG.value:
      raise GrowlmError("--config=configs/FILE.py[:ARG] and --sweep_dir=DIR are both required")
    if _COMPILE_FOR.value is not None:
      sweep.compile_for(_CONFIG.value, sweep_dir, _COMPILE_FOR.value, overrides=_OVERRIDES,
                        only=tuple(_ONLY.value), seeds=_SEEDS.value)
      return
    launcher.launch(_CONFIG.value, sweep_dir, backend=_BACKEND.value, overrides=_OVERRIDES,
                    dry_run=_DRY_RUN.value, only=tuple(_ONLY.value), seeds=_SEEDS.value,
                    **_remote_flags())
    finished_here = _BACKEND.value == "local" or _WAIT.value
    if _ANALYZE.value and not _DRY_RUN.value and finished_here:
      analysis.analyze(sweep_dir)
      print(f"growlm: results in {sweep_dir}/results.md, results.json and loss_curves.png")

  cli_flags.guarded(go)


if __name__ == "__main__":
  app.run(main, flags_parser=parse)
