"""The JAX, orbax and etils APIs growlm calls, each exercised the way growlm calls it.

setup.cfg admits jax >= 0.10.2, < 0.12 (CI installs 0.10.2, constraints/cpu.txt; the GPU image
has 0.11.x). These APIs moved in 2025-26 (shard_map left jax.experimental, set_mesh replaced
`with mesh`, make_mesh grew axis_types, check_rep became check_vma), so each one growlm depends on
is called here, on whichever release is installed: `pytest tests/test_jax_api.py` is the check
to run first on a new jax (it is in the GPU device script, benchmarks/README.md)."""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


def _version(v: str) -> tuple[int, ...]:
  return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


def test_installed_jax_is_in_the_supported_range():
  assert (0, 10, 2) <= _version(jax.__version__) < (0, 12), jax.__version__


def test_make_mesh_axis_types_and_set_mesh():
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3,
                       devices=jax.devices()[:8])
  with jax.set_mesh(mesh):
    abstract = jax.sharding.get_abstract_mesh()
    assert tuple(abstract.axis_names) == ("data", "fsdp", "tensor")
    x = jax.device_put(jnp.arange(16.0).reshape(8, 2), NamedSharding(mesh, P(("data", "fsdp"))))
    assert x.sharding.spec == P(("data", "fsdp"))


def test_shard_map_with_check_vma():
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  f = jax.shard_map(lambda a: a * jax.lax.axis_index("data"), mesh=mesh, in_specs=P("data"),
                    out_specs=P("data"), check_vma=False)
  np.testing.assert_array_equal(f(jnp.ones(8)), np.arange(8.0))


def test_dot_product_attention_xla_and_make_array_from_callback():
  q = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
  out = jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="xla")
  assert out.shape == (1, 4, 2, 8)
  mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
  host = np.arange(8.0)
  arr = jax.make_array_from_callback((8,), NamedSharding(mesh, P("data")), lambda i: host[i])
  np.testing.assert_array_equal(np.asarray(arr), host)


def test_distributed_internals_used_for_preemption():
  # growlm.train.signals reads jax._src.distributed.global_state (no public API says whether the
  # preemption sync manager runs); its two fields must exist, None without jax.distributed.
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  assert distributed.global_state.client is None
  assert distributed.global_state.preemption_sync_manager is None
  params = inspect.signature(jax.distributed.initialize).parameters
  assert {"coordinator_address", "num_processes", "process_id"} <= set(params)


def test_multihost_utils_single_process():
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  out = multihost_utils.process_allgather(np.int32(3))
  assert np.asarray(out).ravel().tolist() == [3]


def test_orbax_and_epath_entry_points(tmp_path):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  mgr = ocp.CheckpointManager(str(tmp_path), options=ocp.CheckpointManagerOptions(
      max_to_keep=1, create=True, enable_async_checkpointing=False),
      item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})
  mgr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave({"w": jnp.ones(3)}),
                                      data=ocp.args.JsonSave({"i": 1})))
  mgr.wait_until_finished()
  out = mgr.restore(1, args=ocp.args.Composite(
      state=ocp.args.StandardRestore({"w": jax.ShapeDtypeStruct((3,), jnp.float32)}),
      data=ocp.args.JsonRestore()))
  assert out["data"] == {"i": 1} and float(out["state"]["w"].sum()) == 3.0
  mgr.close()
  assert str(epath.Path("gs://b/x") / "y") == "gs://b/x/y"   # URLs stay URLs (growlm.fs)


@pytest.mark.parametrize("name", ["jax[cuda]", "jax[tpu]"])
def test_accelerator_extras_use_jax_extras_in_the_same_range(name):
  import configparser  # pylint: disable=g-import-not-at-top
  from conftest import REPO  # pylint: disable=g-import-not-at-top
  cfg = configparser.ConfigParser()
  cfg.read(REPO / "setup.cfg")
  extras = cfg["options.extras_require"]
  key = name[4:-1]
  assert extras[key].split() == [f"{name}>=0.10.2,<0.12"]
  assert "jax>=0.10.2,<0.12" in cfg["options"]["install_requires"].split()
  pins = (REPO / "constraints" / "cpu.txt").read_text().split()
  assert f"jax=={jax.__version__}" in pins or _version(jax.__version__) >= (0, 11)
