"""grow/assemble.py: a grown leaf put together by concatenation (and a gather along interleaved
layers) instead of selects, so that a fresh draw is computed only where a new value is written.
Growth does so on a GPU only; these tests turn it on here (the `gpu` fixture).
The parameters are bit for bit those of the select form it replaced, for every plan whose axes
take the new path and for those that keep the select; the source's weights reach the target
without passing through a select; and the pieces agree with a select on random arrays."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from growlm import sharding
from growlm.grow import GrowthPlan, grow, grown_config, layer_sources
from growlm.grow import assemble as asm
from growlm.grow import core as grow_core
from growlm.grow import depth
from growlm.grow.core import AxisMap
from growlm.model import decoder as model

from conftest import XLA_DEFAULT_COMPILE  # pylint: disable=wrong-import-order
from test_grow import _cfg, _random_params  # pylint: disable=wrong-import-order


@pytest.fixture(name="gpu")
def _gpu(monkeypatch):
  """Growth traced as for a GPU: the platform sharding.platform() reports."""
  monkeypatch.setattr(sharding, "platform", lambda: "gpu")


def test_growth_assembles_on_a_gpu_only(monkeypatch):
  """enabled() follows the platform traced for: a CPU (and a TPU) keep the selects, whose
  compiled growth needs no temporaries there; a GPU assembles."""
  assert not asm.enabled()
  for platform, on in (("gpu", True), ("tpu", False), ("cpu", False)):
    monkeypatch.setattr(sharding, "platform", lambda p=platform: p)
    assert asm.enabled() == on


def _select_layers(x, sources, plan, path, grow_width, fresh, identity_new, zeroed_copy=None):
  """The select form assemble_layers replaced: place every layer, grow all, select new ones."""
  return depth.fill_new_layers(grow_width(depth.place_layers(x, sources), fresh), path, sources,
                               plan, identity_new, zeroed_copy)


def _grown(src, dst, plan, select: bool, monkeypatch):
  with monkeypatch.context() as m:
    if select:
      m.setattr(grow_core, "appended", lambda maps, noise: None)
      m.setattr(grow_core, "assemble_layers", _select_layers)
    args = (_random_params(src), jax.random.key(7))
    # Compiled as a user's growth is. At LLVM -O0 (the suite's fast compile) mean_fill's mlp/wi
    # differed between the two programs by up to 4 ulp on 3% of its entries, copied and new
    # alike: the same arithmetic, rounded differently in two programs LLVM did not optimise.
    fn = jax.jit(lambda p, r: grow(p, src, dst, plan, r, scales=False).params).lower(
        *args).compile(compiler_options=XLA_DEFAULT_COMPILE)
    out = fn(*args)
  return {"/".join(k.key for k in p): np.asarray(v) for p, v in
          jax.tree_util.tree_leaves_with_path(out)}


GPT2 = dict(d_model=64, n_heads=2, n_kv_heads=2, head_dim=32, mlp_dim=128, n_layers=2)
LLAMA = dict(d_model=64, n_heads=4, n_kv_heads=2, head_dim=16, mlp_dim=96, n_layers=2)


@pytest.mark.parametrize("style,grown,plan", [
    ("gpt2", dict(d_model=96, n_heads=3, n_kv_heads=3, mlp_dim=192, n_layers=5),
     GrowthPlan("mean_fill")),                                      # interleaved new layers
    ("gpt2", dict(d_model=96, mlp_dim=192, n_layers=4),
     GrowthPlan("mean_fill", depth_position="append")),
    ("gpt2", dict(d_model=96, n_layers=3), GrowthPlan("mean_fill", depth_position="prepend")),
    ("gpt2", dict(mlp_dim=192, n_layers=4), GrowthPlan("noise", new_layer_indices=(0, 2))),
    ("llama", dict(d_model=96, mlp_dim=144, n_layers=4), GrowthPlan("zeros")),
    ("llama", dict(n_heads=8, n_kv_heads=4, n_layers=3), GrowthPlan("zeros")),  # GQA heads
    ("llama", dict(head_dim=32, n_layers=3), GrowthPlan("zeros")),   # RoPE pairs interleave
    ("llama", dict(d_model=96, n_layers=4), GrowthPlan("zeros", "copy", copy_zero_out=True)),
    ("gpt2", dict(d_model=128, n_layers=4), GrowthPlan("tile", "stack")),
])
def test_assembled_growth_equals_the_select_form_bit_for_bit(style, grown, plan, monkeypatch, gpu):
  """Every grown parameter, compared as uint32 (signs of zeros included), between the
  concatenated form and the select form, on plans that take the new path (appended axes,
  identity layers appended, prepended, interleaved or listed) and on plans that keep the select
  for some axes (GQA heads and RoPE pairs interleave; tile copies) or all layers (copy, stack)."""
  src = _cfg(style, **(GPT2 if style == "gpt2" else LLAMA))
  dst = src.replace(**grown)
  got = _grown(src, dst, plan, False, monkeypatch)
  want = _grown(src, dst, plan, True, monkeypatch)
  assert got.keys() == want.keys()
  for path, a in got.items():
    np.testing.assert_array_equal(a.view(np.uint32), want[path].view(np.uint32), err_msg=path)


def _reaches_select(jaxpr, tainted: set) -> bool:
  """Whether a value computed from the `tainted` variables reaches a select_n in `jaxpr`
  (descending into nested jaxprs with the taint of their inputs)."""
  tainted = set(tainted)
  for eqn in jaxpr.eqns:
    hit = [i for i, v in enumerate(eqn.invars) if not isinstance(v, jax.extend.core.Literal)
           and v in tainted]
    if not hit:
      continue
    if eqn.primitive.name == "select_n" and any(i > 0 for i in hit):
      return True
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      if _reaches_select(sub, {sub.invars[i] for i in hit if i < len(sub.invars)}):
        return True
    tainted.update(eqn.outvars)
  return False


@pytest.mark.parametrize("style,grown,plan,leaf,selects", [
    ("gpt2", dict(d_model=96, n_heads=3, n_kv_heads=3, mlp_dim=192, n_layers=5),
     GrowthPlan("mean_fill"), "layers/mlp/wi", False),
    ("gpt2", dict(d_model=96, n_layers=3), GrowthPlan("mean_fill"), "layers/attn/key", False),
    ("llama", dict(d_model=96, n_layers=4), GrowthPlan("zeros"), "layers/attn/query", False),
    ("llama", dict(head_dim=32, n_layers=3), GrowthPlan("zeros"), "layers/attn/query", True),
])
def test_source_weights_reach_the_target_without_a_select(style, grown, plan, leaf, selects, gpu):
  """In the growth's program, the source leaf's values (of a leaf whose new entries are drawn,
  not mean_fill's means of the source) reach its target leaf through slices, concatenations and
  gathers only: no select, which would evaluate the fresh draw beside every copied entry.
  Where the new positions interleave with the old (RoPE's head_dim pairs) the select stays, and
  the walk finds it."""
  src = _cfg(style, **(GPT2 if style == "gpt2" else LLAMA))
  dst = src.replace(**grown)
  params = _random_params(src)
  closed = jax.make_jaxpr(lambda p, r: grow(p, src, dst, plan, r, scales=False).params)(
      params, jax.random.key(0))
  paths = ["/".join(k.key for k in p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
  var = closed.jaxpr.invars[paths.index(leaf)]
  assert _reaches_select(closed.jaxpr, {var}) == selects


def test_assemble_is_a_select_on_appended_axes():
  """assemble(copies, new, cuts) equals where(copied, padded copies, new) for 1-3 grown axes,
  and `appended` recognises appended maps only."""
  rs = np.random.default_rng(0)
  src_shape, dst_shape = (3, 4, 5), (3, 6, 8)
  for cuts in ({1: 4}, {2: 5}, {1: 4, 2: 5}, {0: 3, 1: 4, 2: 5}):
    shape = tuple(dst_shape[i] if i in cuts else src_shape[i] for i in range(3))
    copies = rs.normal(size=tuple(cuts.get(i, shape[i]) for i in range(3))).astype(np.float32)
    new = rs.normal(size=shape).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[tuple(slice(0, n) for n in copies.shape)] = True
    padded = np.zeros(shape, np.float32)
    padded[tuple(slice(0, n) for n in copies.shape)] = copies
    got = np.asarray(asm.assemble(jnp.asarray(copies), jnp.asarray(new), cuts))
    np.testing.assert_array_equal(got, np.where(mask, padded, new), err_msg=str(cuts))
  one = np.ones(6)
  appended = AxisMap(np.array([0, 1, 2, 3, -1, -1]), one, one, np.array([0] * 4 + [2] * 2))
  interleaved = AxisMap(np.array([0, -1, 1, -1, 2, 3]), one, one, np.zeros(6, int))
  assert asm.appended({1: appended}, 0.0) == {1: 4}
  assert asm.appended({1: appended, 2: interleaved}, 0.0) is None
  zero_sum = appended._replace(zero_sum=2)
  assert asm.appended({1: zero_sum}, 0.0) == {1: 4} and asm.appended({1: zero_sum}, 0.1) is None


@pytest.mark.parametrize("extra", [{}, {"depth_position": "append"},
                                   {"depth_position": "prepend"},
                                   {"new_layer_indices": (1, 4)}])
def test_assemble_layers_places_copies_and_new_layers(extra, gpu):
  """Layer k of the result is grow_width(source layer of k) for a copy and identity_new[k] (or
  the scalar) for a new identity layer, whatever the placement; grow_width sees the copies'
  rows of `fresh` only."""
  plan = GrowthPlan("zeros", "identity", **extra)
  sources = layer_sources(3, 5, plan)
  x = jnp.arange(3 * 2, dtype=jnp.float32).reshape(3, 2)
  fresh = 100 + jnp.arange(5 * 4, dtype=jnp.float32).reshape(5, 4)
  width = lambda v, f: jnp.concatenate([v, f[:, :2]], axis=1)   # 2 -> 4 columns
  for new_value in (fresh, 0.0):
    got = np.asarray(asm.assemble_layers(x, sources, plan, ("layers", "mlp", "wi"), width,
                                         fresh, new_value))
    for k, (j, is_new) in enumerate(sources):
      want = (np.asarray(fresh[k]) if new_value is fresh else np.zeros(4)) if is_new else (
          np.concatenate([np.asarray(x[j]), np.asarray(fresh[k, :2])]))
      np.testing.assert_array_equal(got[k], want, err_msg=f"{extra} layer {k}")


def test_assembled_growth_is_born_sharded(n_devices, gpu):
  """Under jit with the target's shardings on a (data 2, fsdp 2, tensor 2) mesh, an assembled
  growth (mean_fill + identity, interleaved layers) equals the unsharded one (to float32
  rounding: mean_fill's means are sums split across devices), each device holds at most half of
  the target, and XLA's temporaries per device stay below half of it too: the concatenations
  and the gather along the layers are partitioned, not gathered."""
  assert n_devices == 8
  src = _cfg("gpt2", **GPT2)
  dst = src.replace(d_model=128, n_heads=4, n_kv_heads=4, mlp_dim=256, n_layers=5)
  plan = GrowthPlan("mean_fill")
  params, rng = _random_params(src), jax.random.key(5)
  fn = lambda p, r: grow(p, src, dst, plan, r, scales=False).params
  unsharded = jax.jit(fn)(params, rng)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shapes, axes = model.abstract_params(grown_config(src, dst, plan))
  shardings = sharding.tree_shardings(axes, shapes, mesh, sharding.DEFAULT_RULES)
  with jax.set_mesh(mesh):
    compiled = jax.jit(fn, out_shardings=shardings).lower(params, rng).compile()
    out = compiled(params, rng)
  total = sum(x.nbytes for x in jax.tree.leaves(out))
  for a, b, s in zip(jax.tree.leaves(out), jax.tree.leaves(unsharded),
                     jax.tree.leaves(shardings), strict=True):
    assert a.sharding.is_equivalent_to(s, a.ndim)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
  assert sharding.max_shard_bytes(out) <= total / 2, (sharding.max_shard_bytes(out), total)
  assert compiled.memory_analysis().temp_size_in_bytes <= total / 2
