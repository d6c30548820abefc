"""An accelerator-sized growth experiment: one H100-class GPU, about 7 minutes, fair baselines.

Once, the larger local corpus (every .py file of this Python's site-packages, byte tokens):

  python -m growlm.prepare --source=site-packages --tokenizer=bytes --out=runs/data/site-packages

then, on the GPU machine:

  python experiments/launch.py --config=configs/scale.py --seeds=3 --sweep_dir=runs/scale
  python experiments/launch.py --config=configs/scale.py:runlocal --sweep_dir=/tmp/s   # CPU check

or, as it was run for docs/results.md (the corpus prepared, the three seeds side by side on the
one GPU, each seed's runs in order): `bash benchmarks/gpu_session.sh scale`, then
`python experiments/launch.py --analyze_only --sweep_dir=DIR` on the run dirs it copies out.

Runs, per seed (NAME-s0, -s1, -s2 with --seeds=3):
  source            GPT-2 style, d_model 256, 4 layers (3.5M parameters), 300 steps
  grown_tile        the source grown to d_model 512, 8 layers (23.8M) exactly (tile + identity)
  grown_mean_fill   the same growth with mean_fill (exact under LayerNorm at any ratio)
  grown_zeros       the seed paper's zero padding (+ identity layers), not exact
  scratch           the target from a random init, the same 300 steps (9.8M tokens)
  scratch_2x/_4x    the target from scratch at 2x and 4x the tokens, each with its own full
                    schedule: with `scratch` they make the compute frontier of the analysis
Every run has batch 32 x 1024 byte tokens, AdamW at lr 1e-3 with cosine decay, bf16 compute,
and is evaluated every 50 steps: the frontier is interpolated between evaluations, and the loss
can drop steeply between two of them. (The run in docs/results.md evaluated its 2x and 4x runs
every 100 and 200 steps; evaluation does not change training, so only the curves' resolution
differs.)
Evaluated on the corpus's held-out files (`heldout`, never trained on) and on the Python
standard library (`stdlib`: another corpus, which site-packages does not contain).

Compute (PaLM FLOPs, growlm.model.flops): 1.9e16 per seed, 5.7e16 for three seeds. Measured on
one H100 on 2026-11-28 with `bash benchmarks/gpu_session.sh scale`: 8 s to prepare the corpus,
6 min 32 s for the 21 runs (three seeds side by side). The results table and plot are in
docs/results.md ("At accelerator size"), the per-seed table in docs/scale_results.md.
"""

from growlm.config import defaults as config_lib

TARGET = {"model.d_model": 512, "model.n_layers": 8, "model.n_heads": 8, "model.mlp_dim": 2048}
CORPUS = "prepared:runs/data/site-packages"


def get_config(arg: str | None = None):
  args = config_lib.parse_arg(arg, runlocal=False)
  c = config_lib.base_config("small", "gpt2")       # d_model 256, 4 layers, heads of 64
  c.name = "scale"
  c.model.dtype = "bfloat16"
  c.model.max_len = 1024
  c.data.train = CORPUS
  c.data.seq_len = 1024
  c.data.batch_size = 32
  with c.unlocked():
    c.data.eval.stdlib = "stdlib@all"
  c.train.num_steps = 300
  c.train.warmup_steps = 30
  c.train.lr = 1e-3
  c.eval.every_steps = 50
  c.eval.batches = 8
  c.checkpoint.every_steps = 150
  c.log.every_steps = 10
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  if args.runlocal:   # seconds on a CPU: the embedded corpus in memory, tiny shapes
    c.model.dtype = "float32"
    c.model.max_len = 32
    c.data.train = "stdlib"
    c.data.max_bytes = 300_000
    c.data.eval.stdlib = "stdlib@eval"
    c.data.seq_len = 32
    c.data.batch_size = 8
    c.train.num_steps = 8
    c.train.warmup_steps = 2
    c.eval.every_steps = 4
    c.eval.batches = 1
    c.checkpoint.every_steps = 8
    c.log.every_steps = 4
    c.log.progress_bar = False
  return c


def sweep(add, arg=None, base=None):
  """`base`: the config with the command line's fields (growlm.experiments.sweep.expand), which
  the budget runs scale."""
  base = base if base is not None else get_config(arg)
  add(name="source")
  for width in ("tile", "mean_fill", "zeros"):
    add(name=f"grown_{width}", **TARGET, **{"init.source": "@source", "init.plan.width": width,
                                            "init.plan.depth": "identity"})
  add(name="scratch", **TARGET)
  for b in (2, 4):   # evaluated every 50 steps like the others (the frontier's resolution)
    add(name=f"scratch_{b}x", **TARGET, **config_lib.budget_overrides(base, b, evals=False))
