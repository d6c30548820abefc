"""growlm.model.splash: the Pallas splash kernel (interpret mode on CPU) against an einsum
reference, forward and gradients, directly and under jit with a sharded 8-device mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from growlm import sharding
from growlm.errors import GrowlmError
from growlm.model import splash

L = 128   # the kernel's smallest sequence length (its lane width)
E = 64


def reference(q_BxLxHxE, k_BxSxKxE, v_BxSxKxE):
  """Causal softmax attention, scale 1/sqrt(E), query head h reads kv head h // G; float32."""
  B, L_, H, E_ = q_BxLxHxE.shape
  K = k_BxSxKxE.shape[2]
  q_BxLxKxGxE = q_BxLxHxE.astype(jnp.float32).reshape(B, L_, K, H // K, E_)
  logits = jnp.einsum("blkge,bske->bkgls", q_BxLxKxGxE, k_BxSxKxE.astype(jnp.float32),
                      precision="highest") / np.sqrt(E_)
  logits = jnp.where(jnp.tril(jnp.ones((L_, L_), bool)), logits, -jnp.inf)
  probs = jax.nn.softmax(logits, axis=-1)
  ctx = jnp.einsum("bkgls,bske->blkge", probs, v_BxSxKxE.astype(jnp.float32),
                   precision="highest")
  return ctx.reshape(B, L_, H, E_)


def inputs(B, H, K, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, L, H, E), dtype), jax.random.normal(kk, (B, L, K, E), dtype),
          jax.random.normal(kv, (B, L, K, E), dtype))


def kernel(q, k, v):
  return splash.splash_attention(q, k, v, interpret=True)


@jax.jit
def reference_and_grads(q, k, v, weights):
  """The reference's output and the gradients of sum(out * weights) w.r.t. q, k, v."""
  f = lambda q, k, v: (jnp.sum(reference(q, k, v) * weights), reference(q, k, v))
  (_, out), grads = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
  return out, grads


def kernel_and_grads(q, k, v, weights):
  """Like reference_and_grads, by the splash kernel (under jit, one compilation)."""
  def f(q, k, v):
    out = kernel(q, k, v)
    return jnp.sum(out.astype(jnp.float32) * weights), out
  (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return out, grads


@pytest.mark.parametrize("K", [2, 4])
def test_forward_and_grads_match_reference(K):
  q, k, v = inputs(2, 4, K)
  weights = jax.random.normal(jax.random.key(9), q.shape)
  out, grads = kernel_and_grads(q, k, v, weights)
  want_out, want_grads = reference_and_grads(q, k, v, weights)
  assert out.shape == q.shape and out.dtype == q.dtype
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
  for name, g, w in zip("qkv", grads, want_grads):
    assert g.shape == w.shape, name
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_bfloat16_in_bfloat16_out():
  q, k, v = inputs(1, 4, 2, jnp.bfloat16)
  out = jax.jit(kernel)(q, k, v)
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(jnp.float32), reference(q, k, v), atol=3e-2)


@pytest.mark.parametrize("mesh_shape,H,K", [
    ({"data": 2, "fsdp": 2, "tensor": 2}, 4, 2),    # kv heads split over tensor
    ({"data": 2, "fsdp": 1, "tensor": 4}, 8, 2),    # kv replicated, each shard slices its kv
    ({"data": 2, "fsdp": 1, "tensor": 4}, 12, 3),   # groups cut by shard edges: per-head kv
])
def test_sharded_under_jit_matches_reference(mesh_shape, H, K):
  mesh = sharding.make_mesh(mesh_shape)
  B = mesh_shape["data"] * mesh_shape["fsdp"]
  kq, kk, kv = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(kq, (B, L, H, E))
  k, v = jax.random.normal(kk, (B, L, K, E)), jax.random.normal(kv, (B, L, K, E))
  heads_spec = P(("data", "fsdp"), None, "tensor", None)
  kv_spec = heads_spec if K % mesh_shape["tensor"] == 0 else P(("data", "fsdp"), None, None, None)
  q = jax.device_put(q, NamedSharding(mesh, heads_spec))
  k, v = (jax.device_put(x, NamedSharding(mesh, kv_spec)) for x in (k, v))
  weights = jax.random.normal(jax.random.key(9), (B, L, H, E))

  want_out, want_grads = reference_and_grads(*(np.asarray(x) for x in (q, k, v, weights)))
  with jax.set_mesh(mesh):
    assert "shard_map" in str(jax.make_jaxpr(kernel)(q, k, v))
    out, grads = kernel_and_grads(q, k, v, weights)
  assert out.sharding.is_equivalent_to(NamedSharding(mesh, heads_spec), 4)
  np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
  for name, g, w in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-5, err_msg=f"d{name}")


def test_shard_map_specs():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  split = P(("data", "fsdp"), None, "tensor", None)
  assert splash._specs(mesh, 4, 4, 2) == (split, split, False)
  assert splash._specs(mesh, 4, 4, 1) == (split, P(("data", "fsdp"), None, None, None), True)
  assert splash._specs(mesh, 4, 3, 3) == (P(("data", "fsdp"), None, None, None),) * 2 + (False,)


def test_block_sizes():
  assert [splash.block_size(n) for n in (128, 256, 384, 512, 640, 1024, 4096)] == [
      128, 256, 128, 512, 128, 512, 512]


@pytest.mark.parametrize("bad", [
    dict(L=100), dict(L=64), dict(S=256), dict(K=3), dict(dtype=jnp.float16)])
def test_bad_inputs_raise_growlm_error(bad):
  Lq, S, K, dt = bad.get("L", L), bad.get("S", bad.get("L", L)), bad.get("K", 2), bad.get(
      "dtype", jnp.float32)
  q = jax.ShapeDtypeStruct((1, Lq, 4, E), dt)
  kv = jax.ShapeDtypeStruct((1, S, K, E), dt)
  with pytest.raises(GrowlmError, match="splash attention needs") as info:
    jax.eval_shape(kernel, q, kv, kv)
  assert "\n" not in str(info.value)
  if "L" in bad:
    assert "multiple of 128" in str(info.value)
