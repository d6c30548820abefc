"""Dead units (grow/dead.py, docs/design.md 5.9): the paper's literal `zeros` growth leaves new
MLP units, head dims and KV heads at a saddle where no gradient reaches them; the exact methods
and symmetry noise make every new unit trainable within two steps; the report carries the counts.

Tiny one-layer models of both styles, random numpy source params (an init compile costs ~2 s),
all plans of one target config grown in one compile, so the file stays near 10 s on 2 cores.
"""

import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from growlm.grow import GrowthPlan, dead, grow, grown_config
from growlm.grow import report as report_lib
from growlm.model import decoder as model
from growlm.model.config import make_model_config
from growlm.train.loss import token_nll

B, L = 2, 8
KINDS = ("mlp", "heads", "kv_heads", "head_dims", "d_model")
SRC = {"gpt2": dict(n_kv_heads=2), "llama": dict(n_kv_heads=1)}
# Every width dimension grows. Llama's G goes 2 -> 3: query head 2 is new in the old KV head's
# group, heads 3-5 read the new KV head 1.
WIDE = {"gpt2": dict(d_model=32, mlp_dim=64, n_heads=4, n_kv_heads=4, head_dim=16),
        "llama": dict(d_model=32, mlp_dim=64, n_heads=6, n_kv_heads=2, head_dim=16)}


def _src(style):
  return make_model_config("nano", style, vocab_size=32, max_len=16, d_model=16, n_heads=2,
                           head_dim=8, mlp_dim=32, n_layers=1, remat="none",
                           loss_chunk=L, **SRC[style])


def _random_params(cfg, seed=0):
  """Source params with every entry nonzero (an exact zero could fake a dead unit)."""
  rs = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(lambda path, s: jnp.asarray(
      (path[-1].key == "scale") + 0.2 * rs.normal(size=s.shape), s.dtype),
      model.abstract_params(cfg)[0])


def _batches(n=2):
  rs = np.random.default_rng(1)
  return [{"inputs": jnp.asarray(rs.integers(0, 32, (B, L)), jnp.int32),
           "targets": jnp.asarray(rs.integers(0, 32, (B, L)), jnp.int32)} for _ in range(n)]


@functools.lru_cache(maxsize=None)
def _grown(style, dst_items, plans):
  """(src, grown config, src params, [grown params per plan]): every plan in one compile."""
  src = _src(style)
  dst = src.replace(**dict(dst_items))
  params = _random_params(src)

  def fn(p, rng):
    return [grow(p, src, dst, plan, rng, scales=False).params for plan in plans]

  rng = jax.random.key(3)
  grown = jax.jit(fn)(params, rng)
  cfgs = {grown_config(src, dst, plan) for plan in plans}
  assert len(cfgs) == 1, cfgs   # one config: the dead-unit step compiles once for all plans
  return src, cfgs.pop(), params, grown


def _units(style, dst, plans):
  src, cfg, _, grown = _grown(style, tuple(sorted(dst.items())), plans)
  return [dead.new_unit_report(src, cfg, plan, p, _batches(), token_nll)
          for plan, p in zip(plans, grown)]


def _alive(r, step):
  return {k: r[k][f"alive_after_{step}"] for k in KINDS}


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_zeros_leaves_new_units_dead_and_symmetry_noise_wakes_them(style):
  """zeros without symmetry noise: no gradient ever reaches a new MLP unit, head dim or KV head
  (0 alive after 0, 1 and 2 SGD steps); the same growth with symmetry noise (and gpt2's
  mean_fill, same config) has every new unit trainable after two steps."""
  plans = (GrowthPlan("zeros"), GrowthPlan("zeros", symmetry_noise=0.1))
  plans += (GrowthPlan("mean_fill"),) if style == "gpt2" else ()
  zeros, *alive = _units(style, WIDE[style], plans)
  F, E, D = 32, 8, 16                              # new MLP units, head dims, coordinates
  H = WIDE[style]["n_heads"] - 2                   # new query heads
  K = WIDE[style]["n_kv_heads"] - SRC[style]["n_kv_heads"]
  assert {k: zeros[k]["new"] for k in KINDS} == dict(mlp=F, heads=H, kv_heads=K, head_dims=E,
                                                      d_model=D)
  for step in range(3):
    a = _alive(zeros, step)
    assert a["mlp"] == a["kv_heads"] == a["head_dims"] == 0, (step, a)
    if style == "gpt2":
      # Each new head reads a new KV head (values 0): silent. LayerNorm reads the new residual
      # coordinates through its mean (0 - mean != 0), so their readers get gradient at once.
      assert a["heads"] == 0 and a["d_model"] == D, (step, a)
    else:
      # Query head 2 is new on the old KV head: zero queries attend uniformly to nonzero values,
      # so its out slice gets gradient; the three on the new KV head do not. RMSNorm leaves the
      # new coordinates at exactly 0: nothing reads them.
      assert a["heads"] == 1 and a["d_model"] == 0, (step, a)
  for r in alive:
    assert _alive(r, 2) == {k: r[k]["new"] for k in KINDS}, r
    assert r["mlp"]["alive_after_0"] == F, r   # wo rows: zero, read fresh nonzero activations


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_exact_methods_train_every_new_unit_within_two_steps(style):
  """tile (with new identity layers: units count per target layer) and mean_fill: every new
  unit, d_model copies included, has a nonzero gradient after two SGD steps. Llama keeps d_model
  (mean_fill is refused under RMSNorm when it grows), so both plans share one config."""
  dst = dict(WIDE[style], n_layers=2)
  plans = (GrowthPlan("tile"),) if style == "gpt2" else (GrowthPlan("tile"),
                                                          GrowthPlan("mean_fill"))
  if style == "llama":
    dst["d_model"] = 16
  for r in _units(style, dst, plans):
    assert r["mlp"]["new"] == 2 * 32 and r["head_dims"]["new"] == 2 * 8, r
    assert r["d_model"]["new"] == dst["d_model"] - 16, r
    assert _alive(r, 2) == {k: r[k]["new"] for k in KINDS}, r


def test_depth_only_growth_has_no_new_width_units():
  """Depth growth adds layers, not units: every count is 0 and no step is taken (params and
  batches are never read)."""
  src = _src("llama")
  dst = grown_config(src, src.replace(n_layers=3), GrowthPlan())
  r = dead.new_unit_report(src, dst, GrowthPlan(), None, [])
  assert set(r) == set(KINDS)
  assert all(v == {"new": 0, "alive_after_0": 0, "alive_after_1": 0, "alive_after_2": 0}
             for v in r.values()), r
  assert dead.format_line(r) == "new units: none (no width growth)"


def test_report_json_and_terminal_carry_the_counts(tmp_path):
  """preservation_report stores the counts under new_units (saved JSON too) and format_report
  prints them in its last line, kinds that grew only."""
  dst = dict(WIDE["llama"], n_layers=2, d_model=16)
  plans = (GrowthPlan("tile"), GrowthPlan("mean_fill"))
  src, cfg, params, grown = _grown("llama", tuple(sorted(dst.items())), plans)
  report = report_lib.preservation_report(src, params, cfg, grown[1], _batches(), plans[1],
                                          loss_fn=token_nll)
  saved = json.loads(open(report_lib.save_report(report, str(tmp_path))).read())
  assert saved["new_units"] == report["new_units"]
  assert saved["new_units"]["mlp"] == {"new": 64, "alive_after_0": 64, "alive_after_1": 64,
                                       "alive_after_2": 64}
  assert saved["new_units"]["d_model"]["new"] == 0
  assert report["max_abs_logit_diff"] < 1e-4 and math.isfinite(report["loss_dst"])
  last = report_lib.format_report(report).splitlines()[-1]
  assert last == ("  new units alive after 1/2 SGD steps: mlp 64/64 of 64, heads 8/8 of 8, "
                  "kv_heads 2/2 of 2, head_dims 16/16 of 16"), last
