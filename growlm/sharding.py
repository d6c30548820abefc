"""Device mesh and logical-to-mesh sharding rules.

The mesh has three axes: `data` (pure data parallelism), `fsdp` (data parallelism whose
parameters and optimizer state are sharded too) and `tensor` (model parallelism inside layers).
Model code names logical axes only (growlm.model.AXES); the rules here, set from the config,
map each logical axis to zero or more mesh axes. A parameter dimension that a mesh axis does not
divide is replicated on that axis instead of failing, so any model fits any mesh.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from growlm.errors import GrowlmError

MESH_AXES = ("data", "fsdp", "tensor")

# Default rules: batch over (data, fsdp); parameters' embed axis over fsdp (ZeRO-3 style);
# heads, kv heads, MLP and vocab over tensor (Megatron style). Others are replicated.
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("layers", None),
    ("pos", None),
)

# The axes a parameter may declare (growlm.model.AXES is this tuple), and every logical axis a
# rule may name: those and the batch.
PARAM_AXES = ("vocab", "embed", "mlp", "heads", "kv_heads", "head_dim", "layers", "pos")
LOGICAL_AXES = ("batch",) + PARAM_AXES


def platform() -> str:
  """The platform the step being traced will run on: that of the devices of the mesh in
  context (`jax.set_mesh`), else jax's default backend. So a step traced on a CPU host for a
  TPU slice (growlm/train/aot.py) picks the TPU's kernels."""
  device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def make_mesh(shape: dict[str, int] | Sequence[int], devices: Sequence[Any] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh over all (global) devices; one size may be -1 (the rest)."""
  if isinstance(shape, dict) or hasattr(shape, "items"):
    unknown = sorted(set(shape) - set(MESH_AXES))
    if unknown:
      raise GrowlmError(f"mesh: unknown axis {unknown}; accepted axes: {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
  else:
    sizes = [int(s) for s in shape]
  shape_list = list(sizes)
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise GrowlmError(f"mesh: shape {dict(zip(MESH_AXES, sizes))} invalid; accepted: positive "
                      "sizes, at most one -1")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise GrowlmError(f"mesh: {n} devices not divisible by fixed axes product {known}; "
                        f"accepted: fixed axes whose product divides {n}")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) > n or (-1 not in shape_list and n % math.prod(sizes)):
    raise GrowlmError(f"mesh: shape {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} "
                      f"devices, have {n}; accepted: a shape whose product divides {n}")
  # A smaller mesh takes the first devices (e.g. a 1-device baseline in a multi-device test),
  # but never leaves a process out: it would have no share of the step to run.
  left_out = sorted({d.process_index for d in devices}
                    - {d.process_index for d in devices[:math.prod(sizes)]})
  if left_out:
    raise GrowlmError(f"mesh: shape {dict(zip(MESH_AXES, sizes))} takes {math.prod(sizes)} of "
                      f"the {n} devices, none of process(es) {left_out}; accepted: a shape that "
                      f"uses every process's devices (all {n}: a -1 axis takes the rest)")
  devices = devices[:math.prod(sizes)]
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                       devices=devices)


def normalize_rules(rules: Iterable[Sequence[Any]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Rules as (logical name, tuple of mesh axes); validates the mesh axis names."""
  if isinstance(rules, (str, bytes)) or not isinstance(rules, Iterable):
    raise GrowlmError(f"sharding_rules={rules!r}; accepted: a sequence of (logical_axis, "
                      "mesh_axes or None) pairs")
  out = []
  for rule in rules:
    if (isinstance(rule, (str, bytes)) or not isinstance(rule, Sequence) or len(rule) != 2
        or not isinstance(rule[0], str) or not (rule[1] is None or isinstance(rule[1], Sequence))):
      raise GrowlmError(f"sharding rule {rule!r}; accepted: (logical_axis, mesh_axes or None)")
    name, axes = rule
    if axes is None:
      axes = ()
    elif isinstance(axes, str):
      axes = (axes,)
    axes = tuple(axes)
    bad = [a for a in axes if a not in MESH_AXES]
    if bad:
      raise GrowlmError(f"sharding rule for {name!r} names mesh axes {bad}; accepted: {MESH_AXES}")
    if len(set(axes)) < len(axes):
      raise GrowlmError(f"sharding rule for {name!r} names a mesh axis twice ({list(axes)}); "
                        "accepted: each mesh axis at most once")
    if name not in LOGICAL_AXES:   # a misspelt axis would leave the real one replicated
      raise GrowlmError(f"sharding rule for {name!r}: no such logical axis; accepted: "
                        f"{', '.join(LOGICAL_AXES)}")
    if any(n == name for n, _ in out):   # the later one would silently win
      raise GrowlmError(f"sharding rules name {name!r} twice; accepted: one rule per logical axis")
    out.append((name, axes))
  return tuple(out)


def spec_for(names: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
             rules: Iterable[Sequence[Any]]) -> P:
  """PartitionSpec for one array from its logical axis names.

  A mesh axis is used at most once per array (first dimension wins), and only where it divides
  the dimension: otherwise that dimension is replicated over it.
  """
  table = dict(normalize_rules(rules))
  used: set[str] = set()
  parts = []
  for name, size in zip(names, shape):
    chosen = []
    for axis in table.get(name, ()) if name is not None else ():
      if axis in used:
        continue
      denom = math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]
      if size % denom == 0:
        chosen.append(axis)
    used.update(chosen)
    parts.append(None if not chosen else chosen[0] if len(chosen) == 1 else tuple(chosen))
  return P(*parts)


def tree_shardings(axes_tree: Any, shapes_tree: Any, mesh: Mesh, rules) -> Any:
  """NamedSharding for each leaf, from trees of logical names and of shapes (or arrays)."""
  is_names = lambda x: isinstance(x, tuple) and all(isinstance(n, (str, type(None))) for n in x)
  return jax.tree.map(lambda names, s: NamedSharding(mesh, spec_for(names, s.shape, mesh, rules)),
                      axes_tree, shapes_tree, is_leaf=is_names)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
  """Sharding of a [B, L] batch: B over the mesh axes that the `batch` rule names."""
  axes = dict(normalize_rules(rules)).get("batch", ())
  return NamedSharding(mesh, P(axes if axes else None, None))


def batch_shards(mesh: Mesh, rules) -> int:
  """How many ways the batch dimension is split (global batch must be a multiple)."""
  return math.prod(mesh.shape[a] for a in dict(normalize_rules(rules)).get("batch", ()))


def global_batch_from_local(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict:
  """Assembles the global batch from each process's rows (works on one or many hosts)."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def max_shard_bytes(tree: Any) -> int:
  """Largest number of bytes any single device holds for `tree` (for no-device-holds-all checks)."""
  per_device: dict[Any, int] = {}
  for leaf in jax.tree.leaves(tree):
    for shard in leaf.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values()) if per_device else 0
