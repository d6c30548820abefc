"""Parameter trees as nested dicts of arrays: paths, reads, writes, counts, and one strict check.

growlm's parameter trees are plain nested dicts (Flax `params` collections). A *path* is the tuple
of keys from the root to a leaf, e.g. ("layers", "attn", "query"). Growth, Hugging Face interop
and the trainer all address leaves this way, so the helpers live here once.
"""

from __future__ import annotations

from typing import Any

import jax

from growlm.errors import GrowlmError

Path = tuple[str, ...]


def paths(tree: Any) -> list[Path]:
  """The path of every leaf, in jax's (sorted-key) leaf order."""
  return [tuple(getattr(k, "key", getattr(k, "name", k)) for k in p)
          for p, _ in jax.tree_util.tree_leaves_with_path(tree)]


def get(tree: Any, path: Path) -> Any:
  """The leaf (or subtree) at `path`; KeyError if absent."""
  for k in path:
    tree = tree[k]
  return tree


def put(tree: dict, path: Path, value: Any) -> None:
  """Sets the leaf at `path`, creating the dicts on the way."""
  for k in path[:-1]:
    tree = tree.setdefault(k, {})
  tree[path[-1]] = value


def has(tree: Any, path: Path) -> bool:
  """True if `path` leads somewhere in `tree`."""
  try:
    get(tree, path)
  except (KeyError, TypeError, IndexError):
    return False
  return True


def count(tree: Any) -> int:
  """Number of scalars in all leaves (arrays or ShapeDtypeStructs)."""
  total = 0
  for x in jax.tree.leaves(tree):
    n = 1
    for s in x.shape:
      n *= int(s)
    total += n
  return total


def flatten(d: Any, sep: str = ".", prefix: str = "") -> dict[str, Any]:
  """A nested dict as {'a.b.c': leaf}; non-dict values (lists included) are leaves."""
  if isinstance(d, dict):
    out: dict[str, Any] = {}
    for k, v in d.items():
      out.update(flatten(v, sep, f"{prefix}{k}{sep}"))
    return out
  return {prefix[:-len(sep)] if prefix else prefix: d}


def _fmt(ps) -> list[str]:
  return ["/".join(p) for p in sorted(ps)]


def check_like(tree: Any, reference: Any, what: str, *, shapes: bool = True) -> None:
  """Refuses `tree` unless it has exactly the leaves of `reference` (and their shapes): one
  GrowlmError whose message lists what is missing, what is unexpected and the first shape that
  differs, so nothing is ever dropped or zero-filled silently."""
  want, got = set(paths(reference)), set(paths(tree))
  if want != got:
    missing, extra = _fmt(want - got), _fmt(got - want)
    raise GrowlmError(f"{what}: params do not match the config (missing {missing[:5]}"
                      f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                      f"{' ...' if len(extra) > 5 else ''})")
  if shapes:
    for p in sorted(want):
      a, b = tuple(get(tree, p).shape), tuple(get(reference, p).shape)
      if a != b:
        raise GrowlmError(f"{what}: param {'/'.join(p)} has shape {a}, the config implies {b}")
