"""init.lr_rescale='fan_in': per-matrix learning-rate factors fan_in(source)/fan_in(target)
after growth (docs/design.md 5.11), kept in the optimizer state and composed across growths."""

import copy
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, run_config
from growlm import commands, optim, sharding
from growlm.config import defaults
from growlm.config.resume import resume_conflicts
from growlm.config.typed import resolve
from growlm.errors import GrowlmError
from growlm.experiments import sweep
from growlm.grow import GrowthPlan
from growlm.grow.optimizer import fan_in_ratios, with_lr_rescale
from growlm.init import source as source_lib
from growlm.model import decoder as model
from growlm.model.config import make_model_config
from growlm.train.state import TrainState, state_shardings

MATRICES = ("layers/attn/query", "layers/attn/key", "layers/attn/value", "layers/attn/out",
            "layers/mlp/wi", "layers/mlp/wi_gate", "layers/mlp/wi_up", "layers/mlp/wo", "head")


def _flat(tree) -> dict[str, float]:
  return {"/".join(k.key for k in path): float(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _train_cfg(**kw):
  base = dict(lr=1e-2, warmup_steps=0, num_steps=10, schedule="constant", final_lr_ratio=1.0,
              b1=0.9, b2=0.95, eps=1e-8, weight_decay=0.5, grad_clip=0.0)
  return ml_collections.ConfigDict({**base, **kw})


def _wide(cfg):
  return cfg.replace(d_model=2 * cfg.d_model, n_heads=2 * cfg.n_heads,
                     n_kv_heads=2 * cfg.n_kv_heads, mlp_dim=2 * cfg.mlp_dim)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_fan_in_ratios(style):
  """gpt2 (tied, biases, learned positions) 64->128 d_model, 2->4 heads, 256->512 mlp; llama
  (untied head, swiglu, GQA): every weight matrix 0.5, everything else 1 (embed keeps 1 also
  where it is the tied output layer)."""
  src = make_model_config("nano", style)
  dst = _wide(src)
  shapes, _ = model.abstract_params(dst)
  r = _flat(fan_in_ratios(src, dst, shapes))
  assert ("head" in r) == (style == "llama") and ("pos_embed" in r) == (style == "gpt2")
  for name, v in r.items():
    assert v == (0.5 if name in MATRICES else 1.0), (name, v)
  assert {n for n in r if r[n] == 0.5} == {n for n in MATRICES if n in r}


def test_fan_in_ratios_per_matrix():
  """Each matrix's own fan-in: mlp_dim only moves wo, n_heads*head_dim only moves out."""
  src = make_model_config("nano", "gpt2")
  dst = src.replace(mlp_dim=1024, n_heads=4)
  r = _flat(fan_in_ratios(src, dst, model.abstract_params(dst)[0]))
  assert r["layers/mlp/wo"] == 0.25 and r["layers/attn/out"] == 0.5
  assert all(v == 1.0 for n, v in r.items() if n not in ("layers/mlp/wo", "layers/attn/out"))


def test_depth_only_growth_gives_ones():
  src = make_model_config("nano", "llama")
  dst = src.replace(n_layers=4)
  assert set(_flat(fan_in_ratios(src, dst, model.abstract_params(dst)[0])).values()) == {1.0}


def test_optimizer_without_the_option_is_unchanged():
  """No LeafScaleState unless asked (old checkpoints restore); with it, one float32 per leaf."""
  p = model.init_params(make_model_config("nano", "gpt2"), jax.random.key(0))
  plain = optim.make_optimizer(_train_cfg()).init(p)
  assert optim.leaf_scales(plain, p) is None
  assert len(plain) == 3    # scale_by_adam, add_decayed_weights, scale_by_learning_rate
  state = optim.make_optimizer(_train_cfg(), lr_rescale=True).init(p)
  assert len(state) == 4
  scales = optim.leaf_scales(state, p)
  assert set(_flat(scales).values()) == {1.0}
  assert state[2].scales.shape == (len(jax.tree.leaves(p)),)
  assert state[2].scales.dtype == jnp.float32


def test_leaf_scales_are_replicated_on_a_sharded_mesh():
  """The factors are one small vector, replicated whatever the parameters' shardings are."""
  cfg = make_model_config("nano", "gpt2")
  opt = optim.make_optimizer(_train_cfg(), lr_rescale=True)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  abstract, shard = state_shardings(cfg, opt, mesh, sharding.DEFAULT_RULES)
  assert shard.opt_state[2].scales.spec == sharding.replicated(mesh).spec
  assert abstract.opt_state[2].scales.shape == (len(jax.tree.leaves(abstract.params)),)


def test_update_is_scaled_including_weight_decay():
  """One step with factor f on a leaf is f times the step without, decoupled weight decay
  included (a large part of this step: weight_decay=0.5); other leaves are untouched."""
  k = jax.random.split(jax.random.key(0), 3)
  p = {"embed": jax.random.normal(k[0], (8, 4)), "final_norm": {"scale": jnp.ones(4)},
       "layers": {"mlp": {"wi": jax.random.normal(k[1], (2, 4, 6)), "wi_bias": jnp.ones((2, 6))}}}
  g = jax.tree.map(lambda x: 1e-3 * jax.random.normal(k[2], x.shape), p)
  plain = optim.make_optimizer(_train_cfg())
  u0, _ = plain.update(g, plain.init(p), p)
  opt = optim.make_optimizer(_train_cfg(), lr_rescale=True)
  factors = jax.tree_util.tree_map_with_path(
      lambda path, _: 0.25 if path[-1].key == "wi" else 1.0, p)
  state = optim.set_leaf_scales(opt.init(p), factors)
  u1, state2 = opt.update(g, state, p)
  wi0, wi1 = u0["layers"]["mlp"]["wi"], u1["layers"]["mlp"]["wi"]
  undecayed = optim.make_optimizer(_train_cfg(weight_decay=0.0))
  no_decay = undecayed.update(g, undecayed.init(p), p)[0]["layers"]["mlp"]["wi"]
  assert float(jnp.abs(wi0 - no_decay).max()) > 1e-4    # decay is part of the step
  np.testing.assert_allclose(wi1, 0.25 * wi0, rtol=1e-6)
  np.testing.assert_array_equal(u1["embed"], u0["embed"])
  np.testing.assert_array_equal(state2[2].scales, state[2].scales)


def _source(cfg, optimizer, scales=None) -> source_lib.Source:
  p = model.init_params(cfg, jax.random.key(0))
  opt_state = optimizer.init(p)
  if scales is not None:
    opt_state = optim.set_leaf_scales(opt_state, scales)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=opt_state,
                     rng=jax.random.PRNGKey(0))
  return source_lib.Source(directory="", config={}, model=cfg, state=state)


def _grow(src, target, optimizer, grow_optimizer):
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
  _, shard = state_shardings(target, optimizer, mesh, sharding.DEFAULT_RULES)
  state, _ = source_lib.grow_state(src, target, GrowthPlan(width="tile"), optimizer, shard,
                                   seed=0, train_seed=0, grow_optimizer=grow_optimizer)
  return state


@pytest.mark.parametrize("grow_optimizer", [False, True])
@pytest.mark.parametrize("source_rescaled", [False, True])
def test_grow_state_sets_the_factors(grow_optimizer, source_rescaled):
  """source.grow_state, fresh or grown Adam state, from a source optimizer with or without
  factors: the grown state's factors are the fan-in ratios (the source's are all ones)."""
  src_cfg = make_model_config("nano", "gpt2")
  dst = _wide(src_cfg)
  src = _source(src_cfg, optim.make_optimizer(_train_cfg(), lr_rescale=source_rescaled))
  opt = optim.make_optimizer(_train_cfg(), lr_rescale=True)
  state = _grow(src, dst, opt, grow_optimizer)
  got = _flat(optim.leaf_scales(state.opt_state, state.params))
  assert got == _flat(fan_in_ratios(src_cfg, dst, state.params))
  assert got["layers/mlp/wi"] == 0.5 and got["embed"] == 1.0


def test_grow_state_without_the_option_has_no_factors():
  src_cfg = make_model_config("nano", "gpt2")
  src = _source(src_cfg, optim.make_optimizer(_train_cfg(), lr_rescale=True))
  state = _grow(src, _wide(src_cfg), optim.make_optimizer(_train_cfg()), True)
  assert optim.leaf_scales(state.opt_state, state.params) is None


def test_factors_compose_across_growths():
  """A source grown before (factors 0.5) grown again 2x: 0.25, whether its Adam state is
  grown or started afresh (the factors are relative to the first model's width)."""
  src_cfg = make_model_config("nano", "gpt2")
  dst = _wide(src_cfg)
  shapes = model.abstract_params(src_cfg)[0]
  half = fan_in_ratios(src_cfg.replace(d_model=32, n_heads=1, n_kv_heads=1, mlp_dim=128),
                       src_cfg, shapes)
  assert set(_flat(half).values()) == {0.5, 1.0}
  opt = optim.make_optimizer(_train_cfg(), lr_rescale=True)
  src = _source(src_cfg, opt, half)
  grown = _flat(optim.leaf_scales(_grow(src, dst, opt, True).opt_state,
                                  model.abstract_params(dst)[0]))
  fresh = _flat(optim.leaf_scales(_grow(src, dst, opt, False).opt_state,
                                  model.abstract_params(dst)[0]))
  for name in grown:
    assert grown[name] == (0.25 if name in MATRICES else 1.0), name
    assert fresh[name] == (0.25 if name in MATRICES else 1.0), name


def test_with_lr_rescale_is_a_no_op_without_leaf_scales():
  cfg = make_model_config("nano", "gpt2")
  p = model.init_params(cfg, jax.random.key(0))
  state = optim.make_optimizer(_train_cfg()).init(p)
  assert with_lr_rescale(state, cfg, _wide(cfg), p) is state


def test_source_optimizer_rebuilds_the_factors():
  src = source_lib.Source(directory="", config={"train": {}, "init": {"lr_rescale": "fan_in"}},
                          model=make_model_config("nano", "gpt2"))
  p = model.init_params(src.model, jax.random.key(0))
  assert optim.leaf_scales(source_lib.source_optimizer(src).init(p), p) is not None
  src = source_lib.Source(directory="", config={"train": {}, "init": {}}, model=src.model)
  assert optim.leaf_scales(source_lib.source_optimizer(src).init(p), p) is None


def test_bad_value_is_refused():
  c = defaults.base_config("nano")
  c.init.lr_rescale = "mup"
  with pytest.raises(GrowlmError, match=r"init.lr_rescale='mup'; accepted: \('none', 'fan_in'\)"):
    resolve(c)


def test_a_run_dir_written_before_the_field_existed_still_resumes():
  current = resolve(defaults.base_config("nano")).to_json()
  old = copy.deepcopy(current)
  del old["init"]["lr_rescale"]
  assert resume_conflicts(old, current) == []
  changed = copy.deepcopy(current)
  changed["init"]["lr_rescale"] = "fan_in"
  assert resume_conflicts(old, changed) == ["init.lr_rescale"]


def test_grown_run_keeps_its_factors_through_a_checkpoint(tmp_path):
  """End to end: a 2-step source, grown 2x wide with lr_rescale (the grow command's path);
  the report says so and the checkpoint restores (source_optimizer) with factors 0.5."""
  src_dir, out = tmp_path / "src", tmp_path / "grown"
  fast = {"train.num_steps": 2, "train.warmup_steps": 0, "eval.batches": 1}
  commands.train(run_config(**fast), str(src_dir))
  wide = {"model.d_model": 128, "model.n_heads": 4, "model.mlp_dim": 512}
  commands.grow_into(run_config(**wide, **fast, **{"init.lr_rescale": "fan_in",
                                                   "init.optimizer": "grow"}),
                     str(src_dir), str(out))
  assert json.loads((out / "growth_report.json").read_text())["lr_rescale"] == "fan_in"
  src = source_lib.read_source(str(out))
  src = source_lib.restore_source(src, sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}),
                                  sharding.DEFAULT_RULES)
  got = _flat(optim.leaf_scales(src.state.opt_state, src.state.params))
  assert {n for n, v in got.items() if v == 0.5} == {n for n in MATRICES if n in got}


def test_paper_sweep_mup_adds_the_rescaled_width_runs(tmp_path):
  """configs/paper.py:mup: tile and zeros runs that grow d_model, again with fan_in, each the
  same model as its scratch baseline; without `mup` none."""
  paper = str(REPO / "configs" / "paper.py")
  by = {r.name: r.config for r in sweep.expand(paper + ":runlocal,mup", str(tmp_path / "m"))}
  mup = sorted(n for n, c in by.items() if c.init.lr_rescale == "fan_in")
  assert mup == ["both_tile_mup", "both_zeros_mup", "width_tile_mup", "width_zeros_mup"]
  for name in mup:
    plain = by[name[:-len("_mup")]]
    assert by[name].model == plain.model and by[name].init.plan == plain.init.plan
    assert by[name].model == by[name.split("_")[0] + "_scratch"].model
  assert not any(r.config.init.lr_rescale != "none"
                 for r in sweep.expand(paper + ":runlocal", str(tmp_path / "p")))
