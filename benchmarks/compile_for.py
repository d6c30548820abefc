"""GPT-2 124M's train step compiled for TPU slices this machine does not have (`--compile_for`,
growlm/train/aot.py): the attention kernel, memory per chip against its HBM, compile time.

    .venv/bin/python benchmarks/compile_for.py                       # the table below
    .venv/bin/python benchmarks/compile_for.py --topologies v5e:2x2 --remats none,full

The shape is throughput.py's `gpt2-124m` preset (d_model 768, 12 layers, vocab 50304, seq_len
1024, bf16 compute, float32 parameters and AdamW), 16 sequences per chip, data parallel over the
slice unless --mesh says otherwise. Nothing runs: the figures are XLA's TPU compiler's memory plan,
which is what the chips would allocate; speed needs a TPU. Results: benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from growlm import commands  # pylint: disable=wrong-import-position
from growlm.config import defaults as config_lib  # pylint: disable=wrong-import-position
from growlm.config import typed  # pylint: disable=wrong-import-position
from growlm.errors import EXIT_USER_ERROR, GrowlmError  # pylint: disable=wrong-import-position
from growlm.train import aot  # pylint: disable=wrong-import-position


def gpt2_124m(style: str, remat: str, per_chip: int, chips: int, mesh: dict[str, int],
              n_layers: int = 12):
  c = config_lib.base_config("base", style)
  c.model.vocab_size, c.model.max_len, c.model.dtype, c.model.remat = 50304, 1024, "bfloat16", remat
  c.model.n_layers = n_layers
  c.data.seq_len, c.data.batch_size = 1024, per_chip * chips
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1, **mesh}
  return c


def main(argv=None) -> list[dict]:
  """The table's rows (a step that does not fit is a row of its own); bad input, such as an
  unknown topology or a knob value the config refuses, exits with one `growlm: error:` line
  before any row."""
  try:
    return _main(argv)
  except GrowlmError as e:
    print(f"growlm: error: {e}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _main(argv) -> list[dict]:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--topologies", default="v5e:2x2,v6e:2x2,v5p:2x2x1,v4:2x2x1")
  p.add_argument("--styles", default="gpt2,llama")
  p.add_argument("--remats", default="auto")
  p.add_argument("--per_chip", type=int, default=16, help="sequences per chip")
  p.add_argument("--mesh", default="", help="e.g. fsdp=4 (the rest: data)")
  p.add_argument("--n_layers", type=int, default=12, help="fewer layers for a quick look")
  p.add_argument("--out", default="runs/bench/compile_for.json")
  args = p.parse_args(argv)
  if args.per_chip <= 0 or args.n_layers <= 0:
    p.error(f"--per_chip and --n_layers must be positive, got {args.per_chip}, {args.n_layers}")
  try:
    mesh = {k: int(v) for k, v in (kv.split("=") for kv in args.mesh.split(",") if kv)}
  except ValueError:
    p.error(f"--mesh={args.mesh!r}; accepted: AXIS=N pairs such as fsdp=4,tensor=2")
  slices = {topo: len(aot.topology_devices(topo, "--topologies"))
            for topo in args.topologies.split(",")}
  for chips in sorted(set(slices.values())):   # every knob's value, before the first compile
    for style in args.styles.split(","):
      for remat in args.remats.split(","):
        typed.resolve(gpt2_124m(style, remat, args.per_chip, chips, mesh, args.n_layers))
  rows = []
  print("| slice | style | remat | attention | GiB per chip (state+batch, temps) | HBM | "
        "compile s |\n| --- | --- | --- | --- | --- | --- | --- |")
  for topo, chips in slices.items():
    for style in args.styles.split(","):
      for remat in args.remats.split(","):
        config = gpt2_124m(style, remat, args.per_chip, chips, mesh, args.n_layers)
        try:
          r = commands.compile_for(config, topo, train_only=True)   # the table's program
        except GrowlmError as e:
          print(f"| {topo} | {style} | {remat} | - | {e} | | |")
          rows.append({"topology": topo, "style": style, "remat": remat, "error": str(e)})
          continue
        s = r["stages"][0]
        print(f"| {topo} | {style} | {s['remat']} | {s['attention']} | "
              f"{s['bytes_per_device'] / aot.GIB:.2f} ({s['argument_bytes'] / aot.GIB:.2f}, "
              f"{s['temp_bytes'] / aot.GIB:.2f}) | {r['hbm_bytes_per_device'] / aot.GIB:.0f} | "
              f"{s['compile_seconds']:.1f} |", flush=True)
        rows.append({**r, "style": style})
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
