"""Growth inputs: bad plan values and mismatched configs are refused with one GrowlmError line
naming the field, and is_exact never answers for a growth that grow() refuses.

No growth is computed here: refusals happen before any array work, and the one check that
needs grow()'s output config traces it abstractly (jax.eval_shape), so the file stays fast.
"""

import dataclasses
import math

import jax
import numpy as np
import pytest

from conftest import one_line_naming

from growlm.errors import GrowlmError
from growlm.grow import GrowthPlan, grow, grown_config, is_exact, validate
from growlm.grow import core
from growlm.model import decoder as model
from growlm.model.config import ModelConfig, make_model_config

# Tiny sources, as in test_grow.py: gpt2 (LayerNorm, learned positions, tied) and llama
# (RMSNorm, RoPE, GQA with 2 query heads per KV head, untied).
_G = dict(d_model=16, n_heads=2, n_kv_heads=2, head_dim=8, mlp_dim=32, n_layers=2)
_LL = dict(d_model=16, n_heads=4, n_kv_heads=2, head_dim=8, mlp_dim=32, n_layers=2)


def _cfg(style, **overrides):
  """A nano config with a small vocabulary and position table, `overrides` last."""
  base = _G if style == "gpt2" else _LL
  return make_model_config("nano", style, **{"vocab_size": 32, "max_len": 16, **base,
                                             **overrides})


def _grow_abstract(src, dst, plan):
  """grow() traced without running (jax.eval_shape): its refusals and its output config."""
  configs = []

  def fn(params, rng):
    g = grow(params, src, dst, plan, rng)
    configs.append(g.config)
    return g.params

  jax.eval_shape(fn, model.abstract_params(src)[0], jax.random.key(0))
  return configs[0]


# --- 1. Bad plan values: refused at construction (GrowthPlan(...) and from_dict alike).

BAD_PLAN_VALUES = [
    ("width", "Tile"), ("width", None), ("width", ["tile"]), ("width", ""),
    ("depth", "copies"), ("depth", None),
    ("depth_position", "middle"), ("depth_position", 1),
    ("noise_scale", "0.1"), ("noise_scale", None), ("noise_scale", math.inf),
    ("noise_scale", math.nan), ("noise_scale", -0.1), ("noise_scale", True),
    ("noise_scale", np.array([0.1, 0.2])),
    ("symmetry_noise", None), ("symmetry_noise", "0"), ("symmetry_noise", -math.inf),
    ("symmetry_noise", math.inf), ("symmetry_noise", math.nan), ("symmetry_noise", -1e-3),
    ("symmetry_noise", False),
    ("new_layer_indices", 5), ("new_layer_indices", "12"), ("new_layer_indices", None),
    ("new_layer_indices", (2, 2, 3)), ("new_layer_indices", (1.5,)),
    ("new_layer_indices", (1.0,)), ("new_layer_indices", (True,)),
    ("new_layer_indices", (-1,)), ("new_layer_indices", (0, None)),
    ("copy_zero_out", "false"), ("copy_zero_out", 0), ("copy_zero_out", None),
    ("require_exact", "false"), ("require_exact", 1), ("require_exact", np.bool_(True)),
]


@pytest.mark.parametrize("build", ["init", "from_dict"])
@pytest.mark.parametrize("field,value", BAD_PLAN_VALUES,
                         ids=[f"{f}={v!r}" for f, v in BAD_PLAN_VALUES])
def test_bad_plan_value_refused(field, value, build):
  """Every field is checked by type and value: one line naming the field and its value."""
  with pytest.raises(GrowlmError) as e:
    if build == "init":
      GrowthPlan(**{field: value})
    else:
      GrowthPlan.from_dict({field: value})
  one_line_naming(e, f"{field}=", "accepted")


def test_good_plan_values_are_normalised():
  """Accepted spellings become one canonical, hashable plan (jit takes plans as static)."""
  plan = GrowthPlan(noise_scale=1, symmetry_noise=np.float32(0.5),
                    new_layer_indices=[3, np.int64(0)])
  assert plan.noise_scale == 1.0 and isinstance(plan.noise_scale, float)
  assert plan.symmetry_noise == 0.5 and isinstance(plan.symmetry_noise, float)
  assert plan.new_layer_indices == (3, 0)
  assert all(type(i) is int for i in plan.new_layer_indices)
  assert hash(plan) == hash(GrowthPlan(noise_scale=1.0, symmetry_noise=0.5,
                                       new_layer_indices=(3, 0)))
  assert GrowthPlan.from_dict(plan.to_dict()) == plan
  assert GrowthPlan(require_exact=True, copy_zero_out=False).require_exact is True


def test_unknown_plan_field_still_refused():
  with pytest.raises(GrowlmError) as e:
    GrowthPlan.from_dict({"width": "tile", "nosie_scale": 0.1})
  one_line_naming(e, "nosie_scale")


# --- 2. Config fields: each is a size, kept, computed by growth, or the target's own.


def test_every_model_config_field_is_decided():
  """A new ModelConfig field must be classified in growlm.grow.core before growth accepts it."""
  # pylint: disable=protected-access
  groups = [core._SIZE_FIELDS, core._KEPT_FIELDS, core._COMPUTED_FIELDS, core._TARGET_FIELDS]
  # pylint: enable=protected-access
  names = [f for g in groups for f in g]
  assert len(names) == len(set(names)), names
  assert set(names) == {f.name for f in dataclasses.fields(ModelConfig)}


# One change per kept field, on a source where that field is read (rope_theta: RoPE).
KEPT_CHANGES = [
    ("llama", dict(rope_theta=500000.0), "rope_theta 10000.0 -> 500000.0"),
    ("llama", dict(vocab_size=64), "vocab_size 32 -> 64"),
    ("llama", dict(norm="layernorm"), "norm 'rmsnorm' -> 'layernorm'"),
    ("llama", dict(positions="learned"), "positions 'rope' -> 'learned'"),
    ("llama", dict(mlp="gelu"), "mlp 'swiglu' -> 'gelu'"),
    ("llama", dict(use_bias=True), "use_bias False -> True"),
    ("llama", dict(qkv_bias=True), "qkv_bias False -> True"),
    ("llama", dict(tie_embeddings=True), "tie_embeddings False -> True"),
    ("gpt2", dict(norm="rmsnorm"), "norm 'layernorm' -> 'rmsnorm'"),
    ("gpt2", dict(positions="rope"), "positions 'learned' -> 'rope'"),
    ("gpt2", dict(mlp="swiglu"), "mlp 'gelu' -> 'swiglu'"),
    ("gpt2", dict(use_bias=False), "use_bias True -> False"),
    ("gpt2", dict(tie_embeddings=False), "tie_embeddings True -> False"),
]


@pytest.mark.parametrize("style,change,says", KEPT_CHANGES,
                         ids=[f"{s}-{next(iter(c))}" for s, c, _ in KEPT_CHANGES])
def test_kept_field_mismatch_refused(style, change, says):
  """A target that changes a field the copied weights depend on is refused, also alongside a
  growth that would otherwise be exact, by validate, grown_config, grow and is_exact alike."""
  src = _cfg(style)
  dst = src.replace(d_model=32, **change)
  plan = GrowthPlan("tile", require_exact=True)
  validate(src, src.replace(d_model=32), plan)    # the same growth without the change is fine
  field = next(iter(change))
  for call in (lambda: validate(src, dst, plan), lambda: grown_config(src, dst, plan),
               lambda: _grow_abstract(src, dst, plan), lambda: is_exact(src, dst, plan)):
    with pytest.raises(GrowlmError) as e:
      call()
    one_line_naming(e, says, field)


def test_rope_theta_is_free_under_learned_positions():
  """Learned positions never read rope_theta, so a differing value changes nothing: accepted."""
  src = _cfg("gpt2")
  dst = src.replace(d_model=32, rope_theta=500000.0)
  assert is_exact(src, dst, GrowthPlan("tile"))


def test_target_fields_are_the_targets_own():
  """dtype, param_dtype, dropout_rate, init_std, remat, attention, scan_unroll, loss_chunk and
  logits_dtype do not change the grown function (in exact arithmetic, at eval): the target may
  set them, and the grown config keeps its values."""
  src = _cfg("llama")
  own = dict(dtype="bfloat16", param_dtype="bfloat16", dropout_rate=0.1, init_std=0.05,
             remat="full", attention="naive", scan_unroll=2, loss_chunk=64,
             logits_dtype="compute")
  assert set(own) == set(core._TARGET_FIELDS)  # pylint: disable=protected-access
  dst = src.replace(d_model=32, n_layers=3, **own)
  plan = GrowthPlan("tile", require_exact=True)
  assert is_exact(src, dst, plan)
  cfg = grown_config(src, dst, plan)
  assert {f: getattr(cfg, f) for f in own} == own


@pytest.mark.parametrize("style,width,d_model,eps", [
    ("llama", "tile", 32, 1e-6),               # tile keeps the norm statistics: source eps
    ("llama", "zeros", 32, 1e-6 * 16 / 32),     # padding D 16 -> 32: eps * D/D'
    ("gpt2", "mean_fill", 24, 1e-5 * 16 / 24),
    ("gpt2", "tile", 16, 1e-5),                 # no d_model growth: source eps
])
def test_norm_eps_is_computed_by_growth(style, width, d_model, eps):
  """The target's own norm_eps is replaced by the one growth needs; grow() returns (and builds
  its params for) that config."""
  src = _cfg(style)
  dst = src.replace(d_model=d_model, mlp_dim=48, norm_eps=1e-3)
  plan = GrowthPlan(width)
  cfg = grown_config(src, dst, plan)
  assert math.isclose(cfg.norm_eps, eps, rel_tol=1e-12), cfg.norm_eps
  assert _grow_abstract(src, dst, plan) == cfg
  # preservation_report asks is_exact about the grown config: same answer as for the target.
  assert is_exact(src, cfg, plan) == is_exact(src, dst, plan)


# --- 3. is_exact refuses exactly what grow() refuses, with the same message.

REFUSED_GROWTHS = {
    "tile-non-integer-ratio": ("gpt2", dict(d_model=24), GrowthPlan("tile")),
    "mean_fill-under-rmsnorm": ("llama", dict(d_model=24), GrowthPlan("mean_fill")),
    "rope-head_dim-non-integer": ("llama", dict(head_dim=12), GrowthPlan("tile")),
    "shrinking": ("gpt2", dict(mlp_dim=16), GrowthPlan("tile")),
    "gqa-group-shrinks": ("llama", dict(n_kv_heads=4), GrowthPlan("tile")),
    "require_exact-zeros-layernorm": ("gpt2", dict(d_model=24),
                                      GrowthPlan("zeros", require_exact=True)),
    "require_exact-stack": ("gpt2", dict(n_layers=4),
                            GrowthPlan(depth="stack", require_exact=True)),
    "new_layer_indices-out-of-range": ("gpt2", dict(n_layers=4),
                                       GrowthPlan(new_layer_indices=(1, 4))),
    "new_layer_indices-with-stack": ("gpt2", dict(n_layers=4),
                                     GrowthPlan(depth="stack", new_layer_indices=(2, 3))),
}


@pytest.mark.parametrize("name", sorted(REFUSED_GROWTHS))
def test_is_exact_refuses_what_grow_refuses(name):
  """Asking whether an impossible growth is exact is a mistake: is_exact raises grow()'s error
  instead of answering True (tile at 16 -> 24 used to be 'exact')."""
  style, change, plan = REFUSED_GROWTHS[name]
  src = _cfg(style)
  dst = src.replace(**change)
  with pytest.raises(GrowlmError) as grow_e:
    _grow_abstract(src, dst, plan)
  with pytest.raises(GrowlmError) as exact_e:
    is_exact(src, dst, plan)
  assert str(exact_e.value) == one_line_naming(grow_e)


def test_is_exact_still_answers_for_accepted_growths():
  """Approximate but accepted growths get False, exact ones True."""
  src = _cfg("gpt2")
  assert not is_exact(src, src.replace(d_model=24), GrowthPlan("zeros"))
  assert not is_exact(src, src.replace(n_layers=4), GrowthPlan(depth="stack"))
  assert is_exact(src, src.replace(d_model=24), GrowthPlan("mean_fill"))
  assert is_exact(src, src.replace(d_model=32, n_layers=3), GrowthPlan("tile"))
