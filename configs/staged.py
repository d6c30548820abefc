"""Growth inside one run: the paper sweep's source model grows twice under one schedule.

  python -m growlm.main --config=configs/staged.py --workdir=runs/staged            # ~3 min
  python -m growlm.main --config=configs/staged.py:runlocal --workdir=/tmp/staged   # seconds

The run starts as configs/paper.py's source (GPT-2 style, d_model 64, 2 layers; the same
batches, evals and learning rate) and trains 1000 steps of one warmup + cosine schedule. After
step 250 it grows in width (d_model 128, 4 heads, MLP 512; `tile`, exact) and after step 500 in
depth (4 layers; `identity`, exact), keeping Adam's moments (mapped by the growth) and its place
on the schedule. Each growth prints its
preservation report, saves it as growth_stageN.json and adds a growth line to metrics.jsonl;
the FLOPs column counts each step at the size that took it. Arguments: runlocal (16 steps),
optimizer=grow|fresh (Adam's state at each growth), rewarm=N (ramp the learning rate from 0 again
over N steps after each growth).

A stage is {"step", "model" (the fields that change), "plan", "optimizer", "rewarm_steps"};
docs/design.md section 4.1 has the rules (step convention, resuming, FLOPs).
"""

import os

from growlm.config import defaults as config_lib
from growlm.config import files

# configs/paper.py's run settings (its source model, batches, schedule and evals), by path.
_PAPER = files.load_module(os.path.join(os.path.dirname(os.path.abspath(__file__)), "paper.py"))


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False, optimizer=("grow", "fresh"), rewarm=0)
  if args.rewarm < 0:
    raise files.ArgumentError(f"rewarm={args.rewarm}", "rewarm=N with N >= 0 (steps)")
  c = _PAPER.get_config("runlocal" if args.runlocal else None)
  c.name = "staged"
  c.train.num_steps *= 2               # the source's steps, then as many after growth
  width, depth = (1, 2) if args.runlocal else (250, 500)
  common = {"optimizer": args.optimizer, "rewarm_steps": args.rewarm}
  c.stages = (
      {"step": width, "model": {"d_model": 128, "n_heads": 4, "mlp_dim": 512},
       "plan": {"width": "tile"}, **common},
      {"step": depth, "model": {"n_layers": 4}, "plan": {"depth": "identity"}, **common},
  )
  return c
