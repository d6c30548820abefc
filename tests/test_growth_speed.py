"""benchmarks/growth.py in --quick mode: the JSON's fields, its arithmetic, and the memory bound.

No timing thresholds: only that times are positive and finite, and that every derived number
(copy rate, floor, ratios, the memory estimate and bound) follows from the measured ones. XLA's
buffer sizes are deterministic, so the growth's memory bound (source + target + one target-sized
buffer) is checked, and so is that growth outputs the target alone (no multiplier trees).
"""

import statistics

import jax
import numpy as np
import pytest

from conftest import REPO, load_benchmark, positive_finite
from growlm import trees
from growlm.grow import GrowthPlan, grow, grown_config, layer_sources
from growlm.grow import core as grow_core
from growlm.grow import fresh as grow_fresh
from growlm.model import decoder as model
from growlm.model.config import ModelConfig, make_model_config

SCRIPT = REPO / "benchmarks" / "growth.py"


def _bytes(cfg: ModelConfig) -> int:
  shapes, _ = model.abstract_params(cfg)
  return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(shapes))


@pytest.mark.parametrize("opt_state", ["none", "grow"])
def test_quick_growth_benchmark(tmp_path, monkeypatch, opt_state):
  """--quick (gpt2 nano -> tiny, mean_fill + identity) in process: every figure recomputed."""
  mod = load_benchmark("growth")
  out = tmp_path / "growth.json"
  r = mod.main(["--quick", "--opt_state", opt_state, "--out", str(out)])
  assert out.exists() and r["quick"] is True
  src, dst = ModelConfig.from_dict(r["source"]), ModelConfig.from_dict(r["target"])
  plan = GrowthPlan.from_dict(r["plan"])
  assert (plan.width, plan.depth) == ("mean_fill", "identity")
  assert grown_config(src, dst, plan) == dst and r["exact_expected"] is True
  # Bytes: the source's params (and Adam's two moments) read, the target's written.
  moments = 3 if opt_state == "grow" else 1
  assert r["bytes_read"] == moments * _bytes(src)
  assert r["bytes_written"] == moments * _bytes(dst)
  assert r["target_param_bytes"] == _bytes(dst)
  runs = r["settings"]["runs"]
  assert len(r["growth_seconds"]) == runs and len(r["copy"]["seconds"]) == runs
  assert all(positive_finite(t) for t in r["growth_seconds"] + r["copy"]["seconds"])
  assert positive_finite(r["compile_seconds"])
  # The copy moves a float32 buffer of the target's size: read once, written once.
  copy = r["copy"]
  assert copy["buffer_bytes"] == r["bytes_written"] // 4 * 4
  assert copy["median_seconds"] == pytest.approx(statistics.median(copy["seconds"]), rel=1e-12)
  assert copy["bytes_per_second"] == pytest.approx(
      2 * copy["buffer_bytes"] / copy["median_seconds"], rel=1e-12)
  floor = (r["bytes_read"] + r["bytes_written"]) / copy["bytes_per_second"]
  assert r["floor_seconds"] == pytest.approx(floor, rel=1e-12)
  median = statistics.median(r["growth_seconds"])
  assert r["median_growth_seconds"] == pytest.approx(median, rel=1e-12)
  assert r["ratio_to_floor"] == pytest.approx(median / floor, rel=1e-12)
  best = min(r["growth_seconds"]) / (
      (r["bytes_read"] + r["bytes_written"]) / (2 * copy["buffer_bytes"] / min(copy["seconds"])))
  assert r["ratio_to_floor_best"] == pytest.approx(best, rel=1e-12)
  # The draw: exactly the leaves grow() builds from the target's own init (asked of a spy),
  # their value count, and the figures derived from its times.
  f, asked = r["fresh"], []
  real = grow_core.fresh_leaves
  monkeypatch.setattr(grow_core, "fresh_leaves",
                      lambda c, k, paths, layers=None: (asked.append(paths),
                                                        real(c, k, paths, layers))[1])
  jax.eval_shape(lambda p, k: grow(p, src, dst, plan, k, scales=False).params,
                 model.abstract_params(src)[0], jax.random.key(0))
  assert f["paths"] == ["/".join(p) for p in asked[0]] and "layers/mlp/wi" in f["paths"]
  shapes = model.abstract_params(dst)[0]
  assert f["values"] == sum(int(np.prod(trees.get(shapes, tuple(p.split("/"))).shape))
                           for p in f["paths"])
  assert len(f["seconds"]) == len(f["flat_seconds"]) == runs
  assert all(positive_finite(t) for t in f["seconds"] + f["flat_seconds"])
  assert f["median_seconds"] == pytest.approx(statistics.median(f["seconds"]), rel=1e-12)
  assert f["ratio_to_floor"] == pytest.approx(f["median_seconds"] / floor, rel=1e-12)
  assert f["share_of_growth"] == pytest.approx(f["median_seconds"] / median, rel=1e-12)
  assert f["flat_median_seconds"] == pytest.approx(statistics.median(f["flat_seconds"]))
  # Memory: XLA's estimate and the bound, then the bound itself (deterministic).
  m = r["xla_memory"]
  assert m["estimate_bytes"] == (m["argument_size_in_bytes"] + m["output_size_in_bytes"]
                                 - m["alias_size_in_bytes"] + m["temp_size_in_bytes"])
  assert m["bound_bytes"] == r["bytes_read"] + r["bytes_written"] + r["target_param_bytes"]
  assert m["estimate_over_bound"] == pytest.approx(m["estimate_bytes"] / m["bound_bytes"])
  # The target alone, no scale trees (XLA adds one 8-byte pointer per output buffer).
  n_out = moments * len(jax.tree.leaves(model.abstract_params(dst)[0]))
  assert 0 <= m["output_size_in_bytes"] - r["bytes_written"] <= 8 * (n_out + 1), m
  assert m["estimate_bytes"] <= m["bound_bytes"], m
  if r["machine"]["platform"] == "cpu":
    assert isinstance(r["device_memory"], str)
  for key in ("created", "command", "machine", "wall_seconds", "memory_bound_definition"):
    assert key in r, key


@pytest.mark.parametrize("style,grown,plan", [
    ("gpt2", dict(d_model=96, n_heads=3, n_kv_heads=3, mlp_dim=192, n_layers=5),
     GrowthPlan("mean_fill")),
    ("llama", dict(d_model=96, mlp_dim=144, n_layers=3), GrowthPlan("zeros")),
    ("gpt2", dict(mlp_dim=192, n_layers=3), GrowthPlan("noise", depth_position="append")),
    ("llama", dict(d_model=96, n_layers=4), GrowthPlan("zeros", "copy", copy_zero_out=True)),
])
def test_fresh_written_counts_the_entries_taken_from_the_draw(style, grown, plan, monkeypatch):
  """growth.py's `written`: with every drawn value replaced by NaN, exactly that many target
  entries come out NaN (a noise or free entry, 0 * NaN included, or a new identity layer's)."""
  mod = load_benchmark("growth")
  src = make_model_config("nano", style, vocab_size=32, max_len=16, d_model=64, n_heads=2,
                          n_kv_heads=2, head_dim=32, mlp_dim=128, n_layers=2)
  dst = src.replace(**grown)
  params = jax.tree.map(jax.numpy.ones_like, model.abstract_params(src)[0])
  real = grow_core.fresh_leaves
  monkeypatch.setattr(grow_core, "fresh_leaves", lambda *a: [
      jax.numpy.full_like(x, np.nan) for x in real(*a)])
  out = jax.jit(lambda p, k: grow(p, src, dst, plan, k, scales=False).params)(
      params, jax.random.key(0))
  nans = sum(int(np.isnan(np.asarray(x)).sum()) for x in jax.tree.leaves(out))
  cfg = grown_config(src, dst, plan)
  specs = grow_core.leaf_specs(src, cfg, plan, params)
  sources = layer_sources(src.n_layers, dst.n_layers, plan)
  paths = grow_fresh.fresh_paths(specs, plan, sources)
  assert paths and nans == mod.fresh_written(specs, paths, plan, sources) > 0
