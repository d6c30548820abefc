"""SOLAR-style depth plans (depth='layer_ranges'): the target's layers are chosen half-open ranges
of source layers, concatenated. Checked here: the layer map, bit-for-bit copies of weights,
value/gradient scales and Adam moments (alone and after width growth), exactness only for the
source's own order, the measured deviation in the preservation report, one-line refusals, and
the field arriving through a config file and --config flags.

Dimension letters as in growlm.model: D d_model, N n_layers.
"""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import REPO, one_line_naming
from growlm.config import files
from growlm.config.typed import resolve
from growlm.errors import GrowlmError
from growlm.grow import GrowthPlan, grow, is_exact, layer_sources, validate
from growlm.grow import optimizer as grow_opt
from growlm.grow import report as report_lib
from growlm.model import decoder as model
from growlm.model.config import make_model_config

# Tiny 4-layer sources: gpt2 (LayerNorm, learned positions, tied) and llama (RMSNorm, RoPE, GQA).
_G = dict(d_model=16, n_heads=2, n_kv_heads=2, head_dim=8, mlp_dim=32, n_layers=4)
_LL = dict(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=32, n_layers=4)
RANGES = ((0, 3), (1, 4))        # N 4 -> 6: source layers 0 1 2 then 1 2 3
B, L = 2, 8                      # probe batch and sequence length


def _cfg(style, **overrides):
  base = _G if style == "gpt2" else _LL
  return make_model_config("nano", style, **{"vocab_size": 32, "max_len": 16, **base,
                                             **overrides})


def _ranges(ranges, **kw):
  return GrowthPlan(depth="layer_ranges", layer_ranges=ranges, **kw)


def _random_tree(cfg, seed):
  """A params-shaped tree in which every entry differs (weights or moments alike); numpy-drawn,
  since an init_params compile costs seconds per config."""
  shapes, _ = model.abstract_params(cfg)
  rs = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jnp.asarray(0.3 * rs.normal(size=s.shape) + 0.1, s.dtype),
                      shapes)


def _leaves(tree):
  return {"/".join(k.key for k in p): np.asarray(x)
          for p, x in jax.tree_util.tree_leaves_with_path(tree)}


# --- 1. The layer map.


@pytest.mark.parametrize("n_src,n_dst,ranges,expect", [
    (4, 6, [[0, 3], [1, 4]], [(0, False), (1, False), (2, False), (1, True), (2, True),
                              (3, False)]),
    (4, 4, [[0, 4]], [(0, False), (1, False), (2, False), (3, False)]),
    (4, 4, [[2, 4], [0, 2]], [(2, False), (3, False), (0, False), (1, False)]),
    (2, 5, [[0, 2], [0, 2], [1, 2]], [(0, False), (1, False), (0, True), (1, True), (1, True)]),
])
def test_layer_sources(n_src, n_dst, ranges, expect):
  """Target layer i copies the i-th source layer of the concatenated ranges; a repeat is new."""
  assert layer_sources(n_src, n_dst, _ranges(ranges)) == expect


def test_solar_32_to_48():
  """The SOLAR recipe: 32 layers -> [0, 24) + [8, 32) = 48; layers 8..23 appear twice."""
  out = layer_sources(32, 48, _ranges([[0, 24], [8, 32]]))
  assert [j for j, _ in out] == list(range(24)) + list(range(8, 32))
  assert [i for i, (_, new) in enumerate(out) if new] == list(range(24, 40))


# --- 2. Bit-for-bit copies: weights, scales and Adam moments; alone and after width growth.


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def grown(request):
  """One compile per style: `src` N 4 -> 6 by RANGES (depth only), N 4 -> 4 reordered, tile
  D 16 -> 32 with RANGES, and tile D 16 -> 32 alone (N kept), each with its grown moments."""
  src = _cfg(request.param)
  params, mu, nu = (_random_tree(src, s) for s in (0, 1, 2))
  adam = optax.adam(1e-3)
  state = adam.init(params)
  state = (optax.ScaleByAdamState(count=jnp.asarray(7, jnp.int32), mu=mu, nu=nu),) + state[1:]
  cases = {"ranges": (src.replace(n_layers=6), _ranges(RANGES)),
           "reorder": (src, _ranges([[2, 4], [0, 2]])),
           "tile+ranges": (src.replace(d_model=32, n_layers=6), _ranges(RANGES)),
           "tile": (src.replace(d_model=32), GrowthPlan("tile"))}
  maps = {}

  def fn(p, s, rng):
    out = {}
    for name, (dst, plan) in cases.items():
      g = grow(p, src, dst, plan, rng)
      maps[name] = g.layer_map
      new_state = grow_opt.grow_opt_state(s, g, src, plan, adam)
      out[name] = (g.params, g.value_scale, g.grad_scale, new_state[0].mu, new_state[0].nu,
                   new_state[0].count)
    return out

  out = jax.jit(fn)(params, state, jax.random.key(0))
  return src, params, mu, nu, jax.tree.map(np.asarray, out), maps


@pytest.mark.parametrize("case,n_dst,ranges", [("ranges", 6, RANGES),
                                                ("reorder", 4, ((2, 4), (0, 2)))])
def test_grown_layers_are_the_chosen_source_layers(grown, case, n_dst, ranges):
  """Each target layer is its source layer bit for bit (weights and Adam moments: Adam's next
  step on a copy is the source layer's step), also when no layer is new; every other leaf is
  unchanged; Adam's count is kept."""
  _, params, mu, nu, out, maps = grown
  assert maps[case] == tuple(layer_sources(4, n_dst, _ranges(ranges)))
  index = [j for j, _ in maps[case]]
  p_out, a_out, b_out, mu_out, nu_out, count = out[case]
  assert int(count) == 7
  for want, got in ((params, p_out), (mu, mu_out), (nu, nu_out)):
    want, got = _leaves(want), _leaves(got)
    assert set(want) == set(got)
    for path, x in got.items():
      expect = want[path][index] if path.startswith("layers/") else want[path]
      assert x.dtype == expect.dtype and x.shape == expect.shape, path
      np.testing.assert_array_equal(x, expect, err_msg=path)
  for tree in (a_out, b_out):  # no width growth: every value and gradient scale is 1
    assert all(np.all(x == 1) for x in _leaves(tree).values())


def test_width_first_then_ranges(grown):
  """tile + layer_ranges: target layer i is the tile-grown layer j bit for bit (params, value
  and gradient scales, moments); the unlayered leaves are the tile growth's own."""
  *_, out, maps = grown
  index = [j for j, _ in maps["tile+ranges"]]
  for both, tile in zip(out["tile+ranges"][:5], out["tile"][:5]):
    both, tile = _leaves(both), _leaves(tile)
    assert set(both) == set(tile)
    for path, x in both.items():
      expect = tile[path][index] if path.startswith("layers/") else tile[path]
      np.testing.assert_array_equal(x, expect, err_msg=path)


# --- 3. Exactness: only the source's own order keeps the function, and the report says so.


def test_is_exact_only_for_the_source_order():
  src = _cfg("gpt2")
  assert is_exact(src, src, _ranges([[0, 4]]))
  assert is_exact(src, src, _ranges([[0, 2], [2, 4]]))
  assert is_exact(src, src.replace(d_model=32), _ranges([[0, 4]]))
  assert not is_exact(src, src, _ranges([[2, 4], [0, 2]]))      # same N, reordered
  assert not is_exact(src, src.replace(n_layers=6), _ranges(RANGES))
  validate(src, src, _ranges([[0, 4]], require_exact=True))     # must not refuse
  for dst, ranges in ((src.replace(n_layers=6), RANGES), (src, [[2, 4], [0, 2]])):
    with pytest.raises(GrowlmError) as e:
      validate(src, dst, _ranges(ranges, require_exact=True))
    one_line_naming(e, "layer_ranges", "require_exact")


def test_report_measures_the_deviation():
  """float32 gpt2: tile with [[0, 4]] is exact (max |delta logits| ~1e-6, the float32 rounding
  of the wider tiled sums) and reported so; RANGES is reported approximate with a measured
  deviation, under the method name 'layer_ranges', with the ranges in the plan dict."""
  src = _cfg("gpt2")
  params = _random_tree(src, 0)
  rs = np.random.default_rng(0)
  batches = [{k: jnp.asarray(rs.integers(0, src.vocab_size, (B, L)), jnp.int32)
              for k in ("inputs", "targets")}]
  reports = {}
  for name, dst, plan in (("exact", src.replace(d_model=32), _ranges([[0, 4]])),
                          ("ranges", src.replace(n_layers=6), _ranges(RANGES))):
    g = jax.jit(lambda p, plan=plan, dst=dst: grow(p, src, dst, plan, jax.random.key(0),
                                                   scales=False).params)(params)
    reports[name] = json.loads(json.dumps(report_lib.preservation_report(
        src, params, dst, g, batches, plan)))
  exact, approx = reports["exact"], reports["ranges"]
  print({k: r["max_abs_logit_diff"] for k, r in reports.items()})
  assert exact["exact_expected"] is True
  assert exact["max_abs_logit_diff"] <= 1e-4, exact["max_abs_logit_diff"]
  assert approx["exact_expected"] is False
  assert approx["method"] == "layer_ranges"
  assert approx["plan"]["depth"] == "layer_ranges"
  assert approx["plan"]["layer_ranges"] == [[0, 3], [1, 4]]
  assert approx["max_abs_logit_diff"] > 1e-3, approx["max_abs_logit_diff"]
  assert math.isfinite(approx["kl_src_dst"]) and approx["kl_src_dst"] > 0


# --- 4. Refusals: one line naming the field and what is accepted.

BAD_PLANS = {
    "not-pairs": dict(depth="layer_ranges", layer_ranges=[0, 4]),
    "triple": dict(depth="layer_ranges", layer_ranges=[[0, 2, 4]]),
    "empty-range": dict(depth="layer_ranges", layer_ranges=[[2, 2]]),
    "reversed": dict(depth="layer_ranges", layer_ranges=[[3, 1]]),
    "negative": dict(depth="layer_ranges", layer_ranges=[[-1, 2]]),
    "float": dict(depth="layer_ranges", layer_ranges=[[0, 2.5]]),
    "bool": dict(depth="layer_ranges", layer_ranges=[[False, True]]),
    "string": dict(depth="layer_ranges", layer_ranges="0:4"),
    "no-ranges": dict(depth="layer_ranges"),
    "wrong-depth": dict(depth="copy", layer_ranges=[[0, 4]]),
    "with-new_layer_indices": dict(depth="layer_ranges", layer_ranges=[[0, 4]],
                                   new_layer_indices=[1]),
    "with-depth_position": dict(depth="layer_ranges", layer_ranges=[[0, 4]],
                                depth_position="append"),
}


@pytest.mark.parametrize("name", sorted(BAD_PLANS))
def test_bad_plan_refused(name):
  with pytest.raises(GrowlmError) as e:
    GrowthPlan.from_dict(BAD_PLANS[name])
  one_line_naming(e, "layer_ranges", "accepted")


@pytest.mark.parametrize("ranges,n_dst,says", [
    ([[0, 5], [1, 2]], 6, "past the source's 4 layers"),
    ([[0, 3], [1, 3]], 6, "give 5 layers"),
    ([[0, 4], [0, 4]], 6, "give 8 layers"),
])
def test_ranges_must_fit_the_configs(ranges, n_dst, says):
  """Bounds and the total need both configs: validate and is_exact refuse alike."""
  src = _cfg("llama")
  dst = src.replace(n_layers=n_dst)
  for fn in (validate, is_exact):
    with pytest.raises(GrowlmError) as e:
      fn(src, dst, _ranges(ranges))
    one_line_naming(e, "layer_ranges", says, "accepted")


# --- 5. From a config file and --config flags, and back from config.json.


def test_config_flags_carry_the_ranges():
  cfg = files.load(f"{REPO / 'configs' / 'default.py'}:size=nano,runlocal")
  files.apply_overrides(cfg, {"model.n_layers": "3", "init.plan.depth": "layer_ranges",
                              "init.plan.layer_ranges": "[[0,2],[1,2]]"})
  run = resolve(cfg)
  plan = run.init.plan
  assert plan.layer_ranges == ((0, 2), (1, 2)) and hash(plan)
  assert resolve(json.loads(json.dumps(run.to_json()))).init.plan == plan
  src = run.model.replace(n_layers=2)
  assert layer_sources(2, 3, plan) == [(0, False), (1, False), (1, True)]
  validate(src, run.model, plan)
  files.apply_overrides(cfg, {"init.plan.layer_ranges": "(0,2),(1,3)"})   # tuple spelling
  assert resolve(cfg).init.plan.layer_ranges == ((0, 2), (1, 3))
  files.apply_overrides(cfg, {"init.plan.layer_ranges": "[[0,2,1]]"})
  with pytest.raises(GrowlmError) as e:
    resolve(cfg)
  one_line_naming(e, "layer_ranges=", "accepted")
