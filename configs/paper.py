"""The seed paper's experiment (Zhang, 2021) on this CPU: grow, train on, compare with scratch.

  python experiments/launch.py --config=configs/paper.py --sweep_dir=runs/paper   # ~30 min, 2 cores
  python experiments/launch.py --config=configs/paper.py:runlocal --sweep_dir=/tmp/p  # seconds
  python experiments/launch.py --config=configs/paper.py:budgets=1+2+4 --seeds=3 \
      --sweep_dir=runs/paper3           # fair baselines: 3 seeds, scratch at 1x, 2x, 4x tokens
  python experiments/launch.py --config=configs/paper.py:budgets=1+2+4,mup --seeds=3 \
      --sweep_dir=runs/paper3mup        # also width-grown runs with init.lr_rescale='fan_in'

A small GPT-2-style source (d_model 64, 2 layers) is trained on the embedded corpus, then grown
three ways -- 2x d_model and 2x layers, width only, depth only -- with the paper's `zeros` and
`noise` (small initialization values) methods and with growlm's exact methods, and each grown
model trains on with the same token budget and schedule as a from-scratch model of its size.
With `mup`, the tile and zeros runs that grow d_model are repeated with init.lr_rescale='fan_in'
(`*_mup`: each grown matrix's learning rate times fan_in source/target, docs/design.md 5.11),
compared with the same scratch runs. With `staged`, `both_staged` trains the source's model and
grows it (tile + identity, Adam's moments mapped) inside one run at the source's last step, under
one schedule over both phases (configs/staged.py's mechanism): the paper's two runs as one.
Every run is evaluated on the corpus's held-out split and, when ../shared/datasets is present,
on Tiny Shakespeare (last 10%) and WikiText-2 test. Other datasets: add
`c.data.eval.NAME = "file:PATH@all"` or `"tfds:NAME"` (with data.data_dir).
"""

import os

from growlm.config import defaults as config_lib
from growlm.errors import GrowlmError

_DATASETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared",
                         "datasets")


def _args(arg):
  return config_lib.parse_arg(arg, runlocal=False, budgets="1", mup=False, staged=False)


def get_config(arg: str | None = None):
  args = _args(arg)
  c = config_lib.base_config("nano", "gpt2")
  c.name = "paper"
  c.data.seq_len = 128
  c.data.batch_size = 16
  c.data.max_bytes = 0
  c.train.num_steps = 500
  c.train.warmup_steps = 50
  c.train.lr = 3e-3
  c.eval.every_steps = 50
  c.eval.batches = 8
  c.checkpoint.every_steps = 250
  c.log.every_steps = 10
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  shakespeare = os.path.join(_DATASETS, "tinyshakespeare", "input.txt")
  wikitext = os.path.join(_DATASETS, "wikitext-2", "test.txt")
  with c.unlocked():
    if os.path.exists(shakespeare):
      c.data.eval.shakespeare = f"file:{os.path.normpath(shakespeare)}@eval"
    if os.path.exists(wikitext):
      c.data.eval.wikitext2 = f"file:{os.path.normpath(wikitext)}@all"
  if args.runlocal:
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.data.max_bytes = 200_000
    c.train.num_steps = 8
    c.train.warmup_steps = 2
    c.eval.every_steps = 4
    c.eval.batches = 1
    c.checkpoint.every_steps = 8
    c.log.every_steps = 4
    c.log.progress_bar = False
  return c


def _budgets(arg) -> list[int]:
  text = _args(arg).budgets
  try:
    out = [int(b) for b in text.split("+")]
  except ValueError:
    out = []
  if not out or any(b < 1 for b in out):
    raise GrowlmError(f"config argument budgets={text!r}; accepted: multiples of the token "
                      "budget joined by '+', e.g. budgets=1+2+4")
  return out


def sweep(add, arg=None, base=None):
  """The runs; `budgets=1+2+4` adds scratch runs of the `both` target at 2x and 4x the token
  budget, each with its own full schedule (warmup, cosine decay, evals and checkpoints scaled),
  so the analysis can compare growth with the best scratch run of any budget (the frontier);
  `mup` adds the width-grown tile and zeros runs again with init.lr_rescale='fan_in'; `staged`
  adds both_staged (source then `both` target in one run of twice the steps). `base`: the config
  with the command line's fields (growlm.experiments.sweep.expand), whose steps these scale."""
  base = base if base is not None else get_config(arg)
  wide = {"model.d_model": 128, "model.n_heads": 4, "model.mlp_dim": 512}
  deep = {"model.n_layers": 4}
  add(name="source")
  targets = {"both": {**wide, **deep}, "width": wide, "depth": deep}
  methods = {
      "both": [("zeros", "identity"), ("noise", "identity"), ("tile", "identity"),
               ("mean_fill", "identity")],
      "width": [("zeros", "identity"), ("noise", "identity"), ("tile", "identity")],
      "depth": [("tile", "identity"), ("tile", "copy"), ("tile", "stack")],
  }
  for target, dims in targets.items():
    for width, depth in methods[target]:
      label = width if target != "depth" else depth
      add(name=f"{target}_{label}", **dims, **{
          "init.source": "@source", "init.plan.width": width, "init.plan.depth": depth,
          "init.plan.copy_zero_out": True})
    add(name=f"{target}_scratch", **dims)
    for width in (("tile", "zeros") if _args(arg).mup and target != "depth" else ()):
      add(name=f"{target}_{width}_mup", **dims, **{
          "init.source": "@source", "init.plan.width": width, "init.plan.depth": "identity",
          "init.plan.copy_zero_out": True, "init.lr_rescale": "fan_in"})
  t = base.train
  if _args(arg).staged:
    grow = {k.split(".", 1)[1]: v for k, v in targets["both"].items()}
    add(name="both_staged", **{
        "train.num_steps": 2 * t.num_steps, "train.warmup_steps": t.warmup_steps,
        "stages": ({"step": t.num_steps, "model": grow, "optimizer": "grow",
                    "plan": {"width": "tile", "depth": "identity", "copy_zero_out": True}},)})
  for b in _budgets(arg):
    if b != 1:
      add(name=f"both_scratch_{b}x", **targets["both"], **config_lib.budget_overrides(base, b))
