"""The package's import graph: no cycles, stages imported only from above, docstrings everywhere.

The graph is built from every import statement in growlm/ (those inside functions too), read with
`ast`, so a late import cannot hide a cycle. docs/design.md explains the layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import REPO

PKG = REPO / "growlm"

# The stages, bottom to top: a unit may import only units on its own or a lower line. A unit is
# a top-level module of growlm (growlm/fs.py -> "fs") or a subpackage (growlm/train/ -> "train").
LAYERS = [
    ("errors",),
    ("trees", "gcs", "fs", "sharding", "optim", "lock", "lease_posix", "lease_gcs", "transfer"),
    ("rundir",),
    ("curves",),
    ("model",),
    ("data",),
    ("grow",),
    ("config",),
    ("interop",),
    ("train",),
    ("init",),
    ("commands",),
    ("experiments",),
    ("cli",),
    ("main", "grow_main", "hf_main", "demo", "prepare", "sample", "worker"),
]
RANK = {unit: i for i, units in enumerate(LAYERS) for unit in units}
MAX_LINES = 400


def _module_name(path: Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
  return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
  """growlm modules that `path` imports: `from growlm.x import y` names module growlm.x.y when
  that is a module, else growlm.x (a name from it)."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.split(".")[0] == "growlm"}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] != "growlm":
        continue
      for a in node.names:
        sub = f"{node.module}.{a.name}"
        out.add(sub if sub in modules else node.module)
  return {m for m in out if m in modules}


def _graph() -> dict[str, set[str]]:
  modules = _modules()
  return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _unit(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "growlm"


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  color: dict[str, int] = {}
  stack: list[str] = []

  def visit(n):
    color[n] = 1
    stack.append(n)
    for m in sorted(graph.get(n, ())):
      if color.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if color.get(m) is None:
        found = visit(m)
        if found:
          return found
    stack.pop()
    color[n] = 2
    return None

  for n in sorted(graph):
    if color.get(n) is None:
      found = visit(n)
      if found:
        return found
  return None


def test_cycle_finder_finds_a_cycle():
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_module_import_cycles():
  cycle = _find_cycle(_graph())
  assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_stage_import_cycles():
  units: dict[str, set[str]] = {}
  for m, deps in _graph().items():
    units.setdefault(_unit(m), set()).update(_unit(d) for d in deps if _unit(d) != _unit(m))
  cycle = _find_cycle(units)
  assert cycle is None, "stage cycle: " + " -> ".join(cycle)


def test_every_unit_has_a_layer():
  units = {_unit(m) for m in _modules()} - {"growlm"}
  assert units == set(RANK), f"units without a layer: {units - set(RANK)}; gone: {set(RANK) - units}"


def test_stages_import_only_from_below():
  bad = []
  for m, deps in _graph().items():
    u = _unit(m)
    if u == "growlm":
      assert not deps, f"growlm/__init__.py imports {deps}"
      continue
    for d in deps:
      if RANK[_unit(d)] > RANK[u]:
        bad.append(f"{m} -> {d}")
  assert not bad, "imports from a higher stage: " + ", ".join(sorted(bad))


def test_trainer_knows_nothing_of_growth():
  """The trainer trains what it is handed: growth, sources and HF reach it only through the
  initialisation seam."""
  for m, deps in _graph().items():
    if _unit(m) == "train":
      assert not {_unit(d) for d in deps} & {"grow", "init", "interop"}, (m, deps)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_every_module_has_a_docstring_and_stays_small(module):
  path = _modules()[module]
  tree = ast.parse(path.read_text())
  assert ast.get_docstring(tree), f"{path} has no module docstring"
  n = len(path.read_text().splitlines())
  assert n <= MAX_LINES, f"{path} has {n} lines; split it (house rule: modules under ~400 lines)"
