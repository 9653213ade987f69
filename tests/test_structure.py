"""The import graph of the package: no cycles, and no command imports another command.

Commands (console scripts and `python -m` tools) import the library; library modules never
import a command. Checked from the source (every `import` / `from ... import`, also inside
functions), so a late import cannot hide a cycle.
"""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
PKG = ROOT / "openmoe_jax"
COMMANDS = set(re.findall(r"=openmoe_jax\.(\w+):main", (ROOT / "setup.py").read_text())) | {
    "baselines", "inspect_data"}


def _module(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def _graph() -> dict:
  modules = {_module(p): p for p in PKG.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        base = node.module
        targets = [base] + [f"{base}.{a.name}" for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def test_commands_are_found():
  assert {"main", "info", "evaluate", "score", "analyze", "export", "hf_import"} <= COMMANDS


def test_no_command_imports_another_command():
  graph = _graph()
  bad = [(m, d) for m, deps in graph.items() for d in deps
         if d.split(".")[-1] in COMMANDS and d.startswith("openmoe_jax.")
         and d.count(".") == 1 and m != d]
  assert not bad, f"modules importing a command module: {bad}"


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if d == "openmoe_jax":  # the package itself (its __init__) is imported by everything
        continue
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  assert not cycles, cycles
