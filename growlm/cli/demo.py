"""`make demo`: train a small model, grow it two ways, train on, train the scratch baseline,
write the comparison (results.md, results.json) and the plot (loss_curves.png).

  python -m growlm.demo --workdir=runs/demo [--config=configs/quickstart.py]

A few minutes on 2 CPU cores, on the embedded default corpus (no download). Relaunching skips
finished runs and resumes unfinished ones.
"""

from __future__ import annotations

import logging
import os

from absl import app, flags

from growlm.cli import flags as cli_flags

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Sweep directory.")
_CONFIG = flags.DEFINE_string("config", None, "Sweep config (default: configs/quickstart.py "
                              "next to this package).")


def _default_config() -> str:
  repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  return os.path.join(repo, "configs", "quickstart.py")


def summary_lines(results: dict) -> list[str]:
  """Three lines: loss after growth vs scratch, final losses, savings."""
  lines = []
  for g in results["grown"]:
    if not g.get("baseline") or not g["datasets"]:
      continue
    ds, d = next(iter(g["datasets"].items()))
    sav = "not reached" if d["savings"] is None else f"{d['savings']:.1%}"
    sav_src = ("not reached" if d["savings_with_source"] is None
               else f"{d['savings_with_source']:.1%}")
    lines.append(f"{g['run']} ({g['method']}, {ds}): loss right after growth "
                 f"{d['loss_after_growth']:.3f} vs scratch at step 0 {d['scratch_loss_step0']:.3f}"
                 f"; final {d['final_loss']:.3f} vs scratch {d['scratch_final_loss']:.3f}; "
                 f"compute saved {sav} ({sav_src} counting the source's training)")
  return lines


def main(argv):
  del argv
  cli_flags.setup_logging(logging.WARNING)
  from growlm.experiments import analysis, sweep  # pylint: disable=g-import-not-at-top

  def go():
    sweep.launch(_CONFIG.value or _default_config(), _WORKDIR.value)
    return analysis.analyze(_WORKDIR.value)

  results = cli_flags.guarded(go)
  print()
  print(f"results: {os.path.join(_WORKDIR.value, 'results.md')}")
  print(f"plot:    {os.path.join(_WORKDIR.value, 'loss_curves.png')}")
  for line in summary_lines(results):
    print(line)


def run() -> None:
  """The console entry point."""
  app.run(main, flags_parser=cli_flags.flags_only(cli_flags.plain_flags_parser))


if __name__ == "__main__":
  run()
