"""Growth on device against the bandwidth floor: time and memory of one jitted growth.

What one run measures (one device, the first one):
  1. the growth: `growlm.grow.core.grow` (scales off, as `init.source.grow_state` runs it) of a
     source into a target, jitted, compile time apart, median of `--runs` timed runs waited for
     with `jax.block_until_ready`; with `--opt_state grow` Adam's moments are grown in the same
     jitted function (`grow.optimizer.grow_moments`, as `init.optimizer=grow` does);
  2. the copy rate of this device, measured in the same run: a jitted `x + 0` over a float32
     buffer of the target's size, bytes read + written / its time, one copy timed just before
     each timed growth (a shared machine's load drifts; both medians sample the same stretch);
  3. the floor: (bytes read + bytes written) / copy rate, where growth must read the source
     (params, and the moments if grown) and write the target; ratio = growth time / floor;
  4. the draw: the target's own init of the leaves the growth reads it for
     (`grow.fresh.fresh_leaves`, bit for bit `init_params`'), timed alone after each growth (in
     the growth XLA fuses it into the writes), as a ratio to the floor and a share of the
     growth; and one flat truncated-normal draw of as many values through `jax.random`'s own
     generator (on a CPU, jax's Threefry loop: growlm.model.prng draws the same bits faster);
  5. memory: XLA's `memory_analysis()` of the compiled growth (arguments + outputs - aliased +
     temporaries; the CPU client keeps no runtime peak) against the bound source + target + one
     target-sized buffer (the target's params), and the device allocator's peak where the
     runtime keeps one (GPU/TPU: `peak_bytes_in_use`, process-wide since start).

Usage:
  .venv/bin/python benchmarks/growth.py                          # cpu preset: 256/4 -> 512/8
  .venv/bin/python benchmarks/growth.py --preset gpt2-124m       # 124M -> 355M shapes
  .venv/bin/python benchmarks/growth.py --quick --out /tmp/g.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # pylint: disable=wrong-import-position  # benchmarks/; this checkout's growlm
from growlm import trees
from growlm.grow import core, fresh as grow_fresh
from growlm.grow import optimizer as grow_opt
from growlm.grow.depth import DEPTH_WRITERS
from growlm.grow.plan import (DEPTH_METHODS, FREE, NOISE, NORM_LEAVES, WIDTH_METHODS, GrowthPlan,
                              layer_sources)
from growlm.model import decoder as model_lib
from growlm.model.config import STYLES, ModelConfig, make_model_config


DEFAULT_OUT = os.path.join("runs", "bench", "growth.json")


def _shape(style: str, **dims: int) -> ModelConfig:
  return ModelConfig.from_dict({**STYLES[style], **dims})


# (source, target) per preset; `quick` is the cpu preset shrunk for tests.
PRESETS: dict[str, Callable[[str], tuple[ModelConfig, ModelConfig]]] = {
    "cpu": lambda style: (make_model_config("small", style), make_model_config("medium", style)),
    "gpt2-124m": lambda style: (
        _shape(style, vocab_size=50304, max_len=1024, d_model=768, n_layers=12, n_heads=12,
               n_kv_heads=12, head_dim=64, mlp_dim=3072),
        _shape(style, vocab_size=50304, max_len=1024, d_model=1024, n_layers=24, n_heads=16,
               n_kv_heads=16, head_dim=64, mlp_dim=4096)),
    "quick": lambda style: (make_model_config("nano", style), make_model_config("tiny", style)),
}
QUICK = dict(preset="quick", runs=2, warmup=1)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--preset", default="cpu", choices=[k for k in PRESETS if k != "quick"],
                 help="source and target shapes: cpu (d_model 256/4 layers -> 512/8) or "
                 "gpt2-124m (GPT-2 124M -> 355M shapes, vocab 50304, max_len 1024)")
  p.add_argument("--style", default="gpt2", choices=sorted(STYLES), help="model style")
  p.add_argument("--width", default=None, choices=WIDTH_METHODS,
                 help="width method (default: mean_fill under LayerNorm, zeros under RMSNorm, "
                 "where mean_fill is refused)")
  p.add_argument("--depth", default="identity", help="depth method",
                 choices=[d for d in DEPTH_METHODS if d != "layer_ranges"])  # ranges: no flag
  p.add_argument("--opt_state", default="none", choices=("none", "grow"),
                 help="grow: also grow Adam's moments (mu, nu) in the same jitted function")
  p.add_argument("--runs", type=int, default=5, help="timed growths (one copy timed before each)")
  p.add_argument("--warmup", type=int, default=1, help="untimed growths after compiling")
  p.add_argument("--seed", type=int, default=0)
  common.add_output_flags(p, DEFAULT_OUT, QUICK, "tiny sizes for tests (nano -> tiny)")
  args = p.parse_args(argv)
  common.apply_quick(args, QUICK, p, argv)
  if args.runs <= 0 or args.warmup < 0:
    p.error(f"--runs must be > 0 and --warmup >= 0, got {args.runs} and {args.warmup}")
  if args.width is None:
    args.width = default_width(args.style)
  return args


def default_width(style: str) -> str:
  """The width method a growth of `style` is benchmarked with: mean_fill under LayerNorm, zeros
  under RMSNorm (where mean_fill is refused)."""
  return "mean_fill" if STYLES[style]["norm"] == "layernorm" else "zeros"


def nbytes(tree: Any) -> int:
  return int(sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def growth_fn(src: ModelConfig, dst: ModelConfig, plan: GrowthPlan, opt_state: str) -> Callable:
  """The function benchmarked: (params, rng[, (mu, nu)]) -> grown params [, (mu, nu)]."""
  def fn(params, rng, moments=None):
    g = core.grow(params, src, dst, plan, rng, scales=False)
    if opt_state == "none":
      return g.params
    mu, nu = moments
    return g.params, (grow_opt.grow_moments(mu, g, src, plan, 1),
                      grow_opt.grow_moments(nu, g, src, plan, 2))
  return fn


def fresh_written(specs: dict, paths: tuple, plan: GrowthPlan, sources: list) -> int:
  """How many target entries a growth writes from the fresh draw of the leaves at `paths`
  (grow.core.leaf_specs' `specs`): noise and free entries of every layer (a norm's new entries
  are constants, not drawn), and the whole leaf in new identity layers but for the residual
  writers, which start at zero. The other drawn values are never read; where grow/assemble.py
  builds the leaf, the fused program evaluates the draw at these entries alone."""
  n_new = sum(n for _, n in sources) if plan.depth == "identity" else 0
  total = 0
  for p in paths:
    spec, t, _ = specs[p]
    drawn = np.isin(spec.fill, (NOISE, FREE)) & (p[-1] not in NORM_LEAVES)
    if p[0] == "layers":
      per_layer = int(np.broadcast_to(drawn, (1,) + t.shape[1:]).sum())
      whole = 0 if p[-1] in DEPTH_WRITERS else int(np.prod(t.shape[1:]))
      total += (t.shape[0] - n_new) * per_layer + n_new * whole
    else:
      total += int(np.broadcast_to(drawn, t.shape).sum())
  return total


def _timed(fn: Callable[[], Any]) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - t0


def run(args: argparse.Namespace, command: str = "") -> dict[str, Any]:
  """Runs the benchmark and returns the result dict (also what is written as JSON)."""
  device = jax.devices()[0]
  started = time.perf_counter()
  src, dst = PRESETS[args.preset](args.style)
  plan = GrowthPlan(width=args.width, depth=args.depth)
  cfg = core.grown_config(src, dst, plan)
  with jax.default_device(device):
    params = model_lib.init_params(src, jax.random.key(args.seed))
    inputs = [params, jax.random.key(args.seed + 1)]
    if args.opt_state == "grow":   # moments of the source's shapes (their values do not matter)
      inputs.append((jax.tree.map(lambda x: x * 0.1, params),
                     jax.tree.map(lambda x: x * x, params)))
    jax.block_until_ready(inputs)
    t0 = time.perf_counter()
    compiled = jax.jit(growth_fn(src, dst, plan, args.opt_state)).lower(*inputs).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(*inputs)
    jax.block_until_ready(out)
    target_params = out if args.opt_state == "none" else out[0]
    bytes_read, bytes_written = nbytes(inputs[0::2]), nbytes(out)
    target_param_bytes = nbytes(target_params)
    del out, target_params

    # The draw alone: the target's own init of the leaves this growth reads it for, as grow()
    # builds it (a jitted call of its own; inside the growth XLA may fuse it differently).
    specs = core.leaf_specs(src, cfg, plan, params)   # {path: (spec, target shape, source)}
    sources = layer_sources(src.n_layers, dst.n_layers, plan)
    fresh = grow_fresh.fresh_paths(specs, plan, sources)
    layers = grow_fresh.fresh_layers(fresh, specs, plan, sources)
    draw = lambda: grow_fresh.fresh_leaves(cfg, inputs[1], fresh, layers) if fresh else []
    fresh_values = int(sum(specs[p][1].size for p in fresh))   # each draws a whole target leaf
    written = fresh_written(specs, fresh, plan, sources)
    # The device's own random-number rate: as many truncated normals drawn as one flat array.
    flat = jax.jit(lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (max(fresh_values, 1),)))

    # The copy: a float32 buffer of the target's size, read once and written once.
    buf = jnp.ones(max(bytes_written // 4, 1), jnp.float32)
    copy = jax.jit(lambda x: x + 0).lower(buf).compile()
    buffer_bytes = nbytes(buf)
    for _ in range(args.warmup + 1):   # the first draw compiles it
      _timed(lambda: copy(buf))
      _timed(lambda: compiled(*inputs))
      _timed(draw)
      _timed(lambda: flat(inputs[1]))
    copy_s, growth_s, draw_s, flat_s = [], [], [], []
    for _ in range(args.runs):
      copy_s.append(_timed(lambda: copy(buf)))
      growth_s.append(_timed(lambda: compiled(*inputs)))
      draw_s.append(_timed(draw))
      flat_s.append(_timed(lambda: flat(inputs[1])))

  copy_rate = 2 * buffer_bytes / statistics.median(copy_s)
  floor_s = (bytes_read + bytes_written) / copy_rate
  median_s = statistics.median(growth_s)
  memory = common.xla_memory(compiled)
  bound = bytes_read + bytes_written + target_param_bytes
  if memory:
    memory["bound_bytes"] = bound
    memory["estimate_over_bound"] = memory["estimate_bytes"] / bound
  return {
      "benchmark": "growlm growth",
      "command": command,
      "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "quick": bool(args.quick),
      "settings": {k: getattr(args, k) for k in ("preset", "style", "width", "depth",
                                                "opt_state", "runs", "warmup", "seed")},
      "plan": plan.to_dict(),
      "exact_expected": core.is_exact(src, dst, plan),
      "source": src.to_dict(),
      "target": cfg.to_dict(),
      "source_params": trees.count(params),
      "target_params": trees.count(model_lib.abstract_params(cfg)[0]),
      "machine": {"platform": device.platform, "device_kind": device.device_kind,
                  "devices_visible": jax.device_count(), "jax": jax.__version__},
      "bytes_read": bytes_read,
      "bytes_written": bytes_written,
      "target_param_bytes": target_param_bytes,
      "compile_seconds": compile_s,
      "growth_seconds": growth_s,
      "median_growth_seconds": median_s,
      "copy": {"buffer_bytes": buffer_bytes, "seconds": copy_s,
               "median_seconds": statistics.median(copy_s), "bytes_per_second": copy_rate},
      "floor_seconds": floor_s,
      "ratio_to_floor": median_s / floor_s,
      # The fastest growth against the fastest copy: under intermittent load the steadier pair.
      "ratio_to_floor_best": min(growth_s) * 2 * buffer_bytes / (
          min(copy_s) * (bytes_read + bytes_written)),
      # What the draw costs: the leaves growth reads from the target's own init (bit for bit
      # init_params'), their value count and how many of them the target takes (fresh_written),
      # that draw timed alone (its share of the growth), and one flat truncated-normal draw of
      # as many values (the device's random-number rate).
      "fresh": {"paths": ["/".join(p) for p in fresh], "values": fresh_values,
                "written": written,
                "seconds": draw_s, "median_seconds": statistics.median(draw_s),
                "ratio_to_floor": statistics.median(draw_s) / floor_s,
                "share_of_growth": statistics.median(draw_s) / median_s,
                "flat_seconds": flat_s, "flat_median_seconds": statistics.median(flat_s)},
      "xla_memory": memory,
      "memory_bound_definition": ("source (bytes_read) + target (bytes_written) + one "
                                  "target-sized buffer (target_param_bytes)"),
      "device_memory": common.device_memory(device),
      "wall_seconds": time.perf_counter() - started,
  }


def _summary(r: dict[str, Any]) -> str:
  mib = lambda b: f"{b / 2**20:.1f} MiB"
  s = r["settings"]
  lines = [
      f"growth {s['preset']} {s['style']} {r['plan']['width']}+{r['plan']['depth']} "
      f"(opt_state {s['opt_state']}): {r['source_params']:,} -> {r['target_params']:,} params "
      f"on {r['machine']['device_kind']}",
      f"  read {mib(r['bytes_read'])}, written {mib(r['bytes_written'])}; copy rate "
      f"{r['copy']['bytes_per_second'] / 1e9:.2f} GB/s -> floor {r['floor_seconds'] * 1e3:.2f} ms",
      f"  growth median {r['median_growth_seconds'] * 1e3:.2f} ms over {len(r['growth_seconds'])}"
      f" runs (compile {r['compile_seconds']:.1f} s): {r['ratio_to_floor']:.2f}x the floor "
      f"(best pair {r['ratio_to_floor_best']:.2f}x)"]
  f = r["fresh"]
  lines.append(f"  the target's own init it reads ({len(f['paths'])} leaves, "
               f"{f['values']:,} values, {f['written']:,} of them written) drawn alone: "
               f"{f['median_seconds'] * 1e3:.2f} ms = "
               f"{f['ratio_to_floor']:.2f}x the floor, {f['share_of_growth']:.0%} of the growth;"
               f" one flat draw of as many: {f['flat_median_seconds'] * 1e3:.2f} ms")
  m = r["xla_memory"]
  if m:
    lines.append(f"  XLA memory: args {mib(m['argument_size_in_bytes'])} + out "
                 f"{mib(m['output_size_in_bytes'])} - alias {mib(m['alias_size_in_bytes'])} + "
                 f"temp {mib(m['temp_size_in_bytes'])} = {mib(m['estimate_bytes'])}; bound "
                 f"{mib(m['bound_bytes'])} (ratio {m['estimate_over_bound']:.3f})")
  dev = r["device_memory"]
  lines.append("  device allocator: " + (dev if isinstance(dev, str) else json.dumps(dev)))
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Command-line entry point; `argv` (without the program name) defaults to sys.argv[1:]."""
  return common.cli(__file__, argv, parse_args, run, _summary)


if __name__ == "__main__":
  main()
