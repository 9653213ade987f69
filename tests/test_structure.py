"""The import graph of openmoe_jax/, tasks/ and launch/: no cycles, and no command imports
another command or the library a command's plumbing.

Commands (`openmoe_jax/commands/`, the console scripts and `python -m` tools) import the
library; library modules never import a command; launchers import only each other. Checked from
the source (every `import` / `from ... import`, also inside functions), so a late import cannot
hide a cycle. A package's own `__init__` and its old-path alias modules (the thin top-level
modules kept for users) are not edges of the graph.
"""
import ast
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCANNED = ("openmoe_jax", "tasks", "launch")
SCRIPTS = re.findall(r"=(openmoe_jax\.[\w.]+):main", (ROOT / "setup.py").read_text())
# Top-level modules that are old import paths: each only re-binds its new module.
ALIASES = {"openmoe_jax.checkpoint", "openmoe_jax.moe", "openmoe_jax.routing",
           "openmoe_jax.decoding", "openmoe_jax.export", "openmoe_jax.train",
           "openmoe_jax.optimizer", "openmoe_jax.vocab", "openmoe_jax.main",
           "openmoe_jax.baselines", "openmoe_jax.inspect_data", "openmoe_jax.analyze",
           "openmoe_jax.evaluate"}


def _module(path: pathlib.Path) -> str:
  rel = path.relative_to(ROOT).with_suffix("")
  parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
  return ".".join(parts)


def _modules() -> dict:
  return {_module(p): p for d in SCANNED for p in (ROOT / d).rglob("*.py")}


def _graph() -> dict:
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module:
        base = node.module
        subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
        targets = subs or [base]  # `from pkg import submodule` is an edge to the submodule
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    # a package's __init__ is run by any import of its modules: not an edge
    graph[name] = {d for d in deps if not name.startswith(d + ".")}
  return graph


def _is_command(m: str) -> bool:
  return m.startswith("openmoe_jax.commands.")


def test_every_console_script_is_a_command_and_every_alias_is_thin():
  assert len(SCRIPTS) == 8 and all(_is_command(s) for s in SCRIPTS), SCRIPTS
  modules = _modules()
  for alias in ALIASES:
    source = modules[alias].read_text()
    assert "sys.modules[__name__] = importlib.import_module(" in source, alias
    assert len(source.splitlines()) <= 10, alias


def test_library_modules_never_import_commands():
  graph = _graph()
  bad = [(m, d) for m, deps in graph.items() for d in deps
         if _is_command(d) and not _is_command(m) and m not in ALIASES]
  assert not bad, f"library modules importing a command module: {bad}"


def test_no_command_imports_another_command():
  plumbing = {"openmoe_jax.commands.cli", "openmoe_jax.commands.compile_only",
              "openmoe_jax.commands.configurables"}
  graph = _graph()
  bad = [(m, d) for m, deps in graph.items() for d in deps
         if _is_command(m) and _is_command(d) and d not in plumbing]
  assert not bad, f"commands importing another command: {bad}"


def test_tasks_and_launchers_stay_on_their_side():
  graph = _graph()
  bad = [(m, d) for m, deps in graph.items() for d in deps
         if (m.startswith("tasks") and _is_command(d))
         or (m.startswith("openmoe_jax.") and d.startswith("tasks") and not _is_command(m))
         or (m.startswith("launch") and not d.startswith("launch"))]
  assert not bad, f"edges across the layout: {bad}"


def _cycles(graph) -> list:
  state, stack, cycles = {}, [], []

  def visit(m):
    state[m] = "open"
    stack.append(m)
    for d in sorted(graph.get(m, ())):
      if state.get(d) == "open":
        cycles.append(stack[stack.index(d):] + [d])
      elif d not in state:
        visit(d)
    stack.pop()
    state[m] = "done"

  for m in sorted(graph):
    if m not in state:
      visit(m)
  return cycles


def test_the_cycle_finder_finds_a_cycle():
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]
  assert not _cycles({"a": {"b"}, "b": {"c"}})


def test_the_import_graph_has_no_cycle():
  graph = _graph()
  assert {"tasks", "tasks.downstream", "launch.local", "openmoe_jax.model.moe"} <= set(graph)
  assert not _cycles(graph), _cycles(graph)


# Modules of ours that load TensorFlow, seqio, torch or transformers when imported: a late
# import of one of them keeps that cost (and their start-up noise) off the paths that do not
# need it. Checked below against their own top-level imports, so the list cannot go stale.
HEAVY = {"openmoe_jax.data.vocab": "seqio", "openmoe_jax.data.ul2": "seqio",
         "openmoe_jax.interop.hf.modeling_openmoe": "torch",
         "openmoe_jax.interop.hf.tokenization_openmoe": "sentencepiece"}


def _top_level_imports(path: pathlib.Path) -> set:
  out = set()
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.Import):
      out |= {a.name.split(".")[0] for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module.split(".")[0])
  return out


def test_late_imports_of_our_modules_each_have_a_reason():
  """An import inside a function of an openmoe_jax or tasks module is either of a module that
  loads a heavy library (tasks: TensorFlow and seqio; HEAVY) or says why on its line
  (`late: ...` in its comment, e.g. JAX loads after a command's flags parse: a quick --help)."""
  modules = _modules()
  for name, dep in HEAVY.items():
    assert dep in _top_level_imports(modules[name]), (name, dep)
  unexplained = []
  for name, path in modules.items():
    if not name.startswith("openmoe_jax.") or name in ALIASES or path.name == "__init__.py":
      continue
    lines = path.read_text().splitlines()
    for fn in ast.walk(ast.parse(path.read_text())):
      if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        continue
      for node in ast.walk(fn):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
          targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
          targets = [a.name for a in node.names]
        else:
          continue
        if not any(t.split(".")[0] in ("openmoe_jax", "tasks") for t in targets):
          continue
        heavy = any(t.split(".")[0] == "tasks" or t in HEAVY for t in targets)
        comment = lines[node.lineno - 1].partition("#")[2]
        if not heavy and "late:" not in comment:
          unexplained.append(f"{path.relative_to(ROOT)}:{node.lineno}: {lines[node.lineno - 1].strip()}")
  assert not unexplained, "\n".join(sorted(set(unexplained)))
