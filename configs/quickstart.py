"""Quickstart sweep (what `make demo` runs): grow a small model, compare with from scratch.

  python experiments/launch.py --config=configs/quickstart.py --sweep_dir=runs/demo
  python experiments/launch.py --config=configs/quickstart.py:runlocal --sweep_dir=/tmp/q

Runs, on the embedded default corpus (Python's stdlib source, byte tokens):
  source        small GPT-2-style model (d_model 64, 2 layers), trained first
  grown_tile    the source grown to d_model 128, 4 layers with the exact method (tile+identity)
  grown_zeros   the same growth with the seed paper's zero padding (zeros+identity)
  scratch       the target size trained from a random init: the baseline
The grown runs and the baseline share the token budget and schedule. `runlocal` is a tiny
variant (seconds) that tests reuse.
"""

from growlm.config import defaults as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config("nano", "gpt2")
  c.name = "quickstart"
  c.data.seq_len = 64
  c.data.batch_size = 16
  c.data.max_bytes = 4_000_000
  c.train.num_steps = 300
  c.train.warmup_steps = 30
  c.train.lr = 3e-3
  c.eval.every_steps = 50
  c.eval.batches = 8
  c.checkpoint.every_steps = 300
  c.log.every_steps = 10
  c.log.progress_bar = True
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  if args.runlocal:
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.data.max_bytes = 300_000
    c.train.num_steps = 12
    c.train.warmup_steps = 2
    c.eval.every_steps = 4
    c.eval.batches = 2
    c.checkpoint.every_steps = 12
    c.log.every_steps = 4
    c.log.progress_bar = False
  return c


def sweep(add):
  target = {"model.d_model": 128, "model.n_layers": 4, "model.n_heads": 4,
            "model.mlp_dim": 512}
  add(name="source")
  add(name="grown_tile", **target, **{"init.source": "@source", "init.plan.width": "tile",
                                      "init.plan.depth": "identity"})
  add(name="grown_zeros", **target, **{"init.source": "@source", "init.plan.width": "zeros",
                                       "init.plan.depth": "identity"})
  add(name="scratch", **target)
