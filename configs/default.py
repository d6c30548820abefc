"""Train one decoder LM from scratch on the embedded default corpus (Python's stdlib source).

Run:
  python -m growlm.main --config=configs/default.py:size=tiny,style=gpt2 --workdir=runs/tiny
  python -m growlm.main --config=configs/default.py:runlocal --workdir=/tmp/r   # seconds, CPU

Arguments (comma separated): size=nano|tiny|small|medium|base, style=gpt2|llama,
runlocal (a tiny, fast variant that tests reuse). Any field can also be set with
--config.FIELD=VALUE, e.g. --config.train.num_steps=200.
"""

from growlm.config import defaults as config_lib


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, size="tiny", style="gpt2", runlocal=False)
  c = config_lib.base_config(args.size, args.style)
  c.name = f"{args.size}-{args.style}"
  if args.runlocal:
    c.model.n_layers = 2
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.data.max_bytes = 300_000
    c.train.num_steps = 20
    c.train.warmup_steps = 5
    c.eval.every_steps = 10
    c.eval.batches = 2
    c.checkpoint.every_steps = 10
    c.log.every_steps = 5
  return c
