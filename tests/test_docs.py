"""The documentation stays honest: macros, gin files, command flags and links in docs/ exist.

* every macro defined (`NAME = ...`) or referenced (`%NAME`) in a gin file under gin/, and every
  gin file, is named in docs/configuration.md;
* every `--flag` written after an openmoe-* command (or `python -m openmoe_jax.X`) in docs/*.md
  or README.md is a flag of that command's real argument parser, and every `--gin.MACRO=` /
  `--gin.train.param=` / `--gin.ModelConfig.field=` override names something that exists;
* every relative markdown link (and its #anchor) in docs/*.md and README.md resolves.
Fast: no subprocess, no TensorFlow; the parsers are taken from the commands' own `main`.
"""
import argparse
import dataclasses
import importlib
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIN_DIR = ROOT / "gin"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
CONFIG_DOC = ROOT / "docs" / "configuration.md"

# command as written in the docs -> module whose main(argv) builds its parser
COMMANDS = {
    "openmoe-train": "openmoe_jax.main", "openmoe-eval": "openmoe_jax.commands.evaluate",
    "openmoe-info": "openmoe_jax.commands.info", "openmoe-score": "openmoe_jax.commands.score",
    "openmoe-analyze": "openmoe_jax.analyze", "openmoe-export": "openmoe_jax.commands.export",
    "openmoe-import": "openmoe_jax.commands.import_model", "openmoe-infer": "openmoe_jax.commands.infer",
}
for _name in ("main", "analyze", "inspect_data", "baselines", "data.corpus",
              *(f"commands.{c}" for c in ("train", "evaluate", "info", "score", "analyze", "export",
                                          "import_model", "infer", "inspect_data", "baselines"))):
  COMMANDS[f"openmoe_jax.{_name}"] = f"openmoe_jax.{_name}"
_COMMAND_RE = re.compile(r"(?<![\w./-])(openmoe-(?:train|eval|info|score|analyze|export|import|infer))"
                         r"(?![\w-])|-m\s+(openmoe_jax\.[\w.]+\w)")
# `--gin.X=` in the docs that name nothing on purpose: placeholders, and the typos that
# troubleshooting.md / configuration.md show as examples.
PLACEHOLDERS_AND_DELIBERATE_TYPOS = {"NAME", "ModelConfig.F", "EVAL_PERIODS", "train.log_periods"}
_FENCE_RE = re.compile(r"^[ \t]*```.*?^[ \t]*```[ \t]*$", re.M | re.S)
_INLINE_RE = re.compile(r"`([^`\n]+)`")


# --------------------------------------------------------------------------- gin macros
def _strip_gin_comments(text: str) -> str:
  return "\n".join(line.split("#", 1)[0] for line in text.splitlines())


def gin_macros(gin_dir: pathlib.Path = GIN_DIR) -> dict:
  """{macro: sorted gin files defining or referencing it} over every gin file under gin_dir."""
  found = {}
  for path in sorted(gin_dir.rglob("*.gin")):
    text = _strip_gin_comments(path.read_text())
    names = set(re.findall(r"^\s*([A-Za-z_]\w*)\s*=", text, re.M))  # NAME = ... (no dot: a macro)
    names |= {n for n in re.findall(r"%([A-Za-z_][\w.]*)", text) if not n.startswith("gin.")}
    for name in names:
      found.setdefault(name, []).append(str(path.relative_to(gin_dir)))
  return found


def missing_macros(doc_text: str, macros) -> list:
  """Macros not named in the doc as `NAME` (backticked, so MODEL_DIR is not found in X_MODEL_DIR)."""
  return sorted(m for m in macros if f"`{m}`" not in doc_text)


def test_gin_macros_are_found():
  macros = gin_macros()
  assert {"MODEL_DIR", "TRAIN_STEPS", "NUM_EXPERTS", "EXPERT_MLP_DIM", "UMT5_SPM_PATH",
          "INITIAL_CHECKPOINT_DIR", "EVAL_SPLIT"} <= set(macros)
  assert "gin" not in macros and "REQUIRED" not in macros  # %gin.REQUIRED is not a macro


def test_every_gin_macro_is_documented_in_configuration_md():
  macros = gin_macros()
  missing = missing_macros(CONFIG_DOC.read_text(), macros)
  assert not missing, ("macros used in gin/ but not documented in docs/configuration.md: "
                       + ", ".join(f"{m} ({', '.join(macros[m])})" for m in missing))


def test_the_macro_check_fails_when_a_macro_is_missing(tmp_path):
  text, macros = CONFIG_DOC.read_text(), gin_macros()
  before = set(missing_macros(text, macros))
  after = missing_macros(text.replace("`BATCH_SIZE`", "BATCH_SIZE"), macros)
  assert set(after) - before == {"BATCH_SIZE"}
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "x.gin").write_text(
      "include 'models/architecture.gin'\nBRAND_NEW_MACRO = 3  # %NOT_A_MACRO\n"
      "ModelConfig.group_size = %ANOTHER_NEW_ONE\n")
  assert missing_macros(text, gin_macros(tmp_path)) == ["ANOTHER_NEW_ONE", "BRAND_NEW_MACRO"]


def test_every_gin_file_is_documented_in_configuration_md():
  text = CONFIG_DOC.read_text()
  files = sorted(str(p.relative_to(GIN_DIR)) for p in GIN_DIR.rglob("*.gin"))
  assert files and not [f for f in files if f"`{f}`" not in text]


# --------------------------------------------------------------------------- command flags
class _Parsed(BaseException):  # not an Exception: the commands' `except Exception` let it pass

  def __init__(self, parser):
    super().__init__()
    self.parser = parser


def _parser_of(module_name: str) -> argparse.ArgumentParser:
  """The ArgumentParser a command's main() builds, caught at its parse_args call."""
  main = importlib.import_module(module_name).main
  real = argparse.ArgumentParser.parse_args

  def capture(self, *args, **kwargs):
    raise _Parsed(self)

  argparse.ArgumentParser.parse_args = capture
  try:
    main([])
  except _Parsed as e:
    return e.parser
  finally:
    argparse.ArgumentParser.parse_args = real
  raise AssertionError(f"{module_name}.main([]) returned without parsing arguments")


def _command_texts(text: str):
  """Yields (command, text after it) for commands in code blocks and inline code."""
  snippets = []
  for block in _FENCE_RE.findall(text):
    body = re.sub(r"\\\n", " ", block)  # shell line continuations
    snippets += body.splitlines()
  snippets += _INLINE_RE.findall(_FENCE_RE.sub("", text))
  for snippet in snippets:
    snippet = re.split(r"\s#\s", snippet)[0]  # shell comment
    for piece in re.split(r"\s(?:\|\|?|&&|;)\s", snippet):
      matches = list(_COMMAND_RE.finditer(piece))
      for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(piece)
        yield m.group(1) or m.group(2), piece[m.end():end]


def test_command_flags_in_docs_exist():
  parsers, problems, checked = {}, [], 0
  for doc in DOCS:
    for command, rest in _command_texts(doc.read_text()):
      if command not in COMMANDS:
        continue
      if command not in parsers:
        parsers[command] = set(_parser_of(COMMANDS[command])._option_string_actions)
      for flag in re.findall(r"(?<![\w-])(--[A-Za-z][\w.-]*)", rest):
        checked += 1
        if not flag.startswith("--gin.") and flag not in parsers[command]:
          problems.append(f"{doc.relative_to(ROOT)}: {command} has no flag {flag}")
  assert checked > 50, checked  # the extraction still finds the commands
  assert not problems, "\n".join(problems)


def test_the_flag_check_catches_an_unknown_flag():
  found = list(_command_texts("run `openmoe-info --gin_file=x --no_such_flag` then\n```bash\n"
                              "openmoe-export --model_dir=D \\\n  --outptu_dir=O  # --ignored\n```"))
  found = [(command, rest.split()) for command, rest in found]
  assert ("openmoe-export", ["--model_dir=D", "--outptu_dir=O"]) in found
  assert ("openmoe-info", ["--gin_file=x", "--no_such_flag"]) in found
  flags = set(_parser_of("openmoe_jax.commands.export")._option_string_actions)
  assert "--output_dir" in flags and "--outptu_dir" not in flags


def test_gin_overrides_in_docs_name_real_things():
  from openmoe_jax.training import loop as train
  from openmoe_jax.model.config import ModelConfig
  macros = set(gin_macros())
  train_params = set(inspect.signature(inspect.unwrap(train.train)).parameters)
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  problems = []
  for doc in DOCS:
    for target in re.findall(r"--gin\.([\w.]+)=", doc.read_text()):
      head, _, param = target.rpartition(".")
      if target in PLACEHOLDERS_AND_DELIBERATE_TYPOS:
        continue
      if not head and target.isupper() and target not in macros:
        problems.append(f"{doc.name}: --gin.{target}= is not a macro of any gin file")
      elif head == "train" and param not in train_params:
        problems.append(f"{doc.name}: train has no parameter {param}")
      elif head in ("ModelConfig", "openmoe_jax.ModelConfig") and param not in fields:
        problems.append(f"{doc.name}: ModelConfig has no field {param}")
  assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- links
def _slug(heading: str) -> str:
  """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: pathlib.Path) -> set:
  anchors, seen = set(), {}
  for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _FENCE_RE.sub("", path.read_text()),
                            re.M):
    slug = _slug(heading)
    anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


def _links(text: str):
  text = _INLINE_RE.sub("", _FENCE_RE.sub("", text))
  yield from re.findall(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text)
  # Reference definitions `[label]: target`; they cannot interrupt a paragraph, so a line like
  # "[16, 256]: each expert..." inside one is text, not a link.
  previous = ""
  for line in text.splitlines():
    m = re.match(r"^ {0,3}\[[^\]]+\]:\s*(\S+)", line)
    if m and not previous.strip():
      yield m.group(1)
    previous = line


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
  problems = []
  for target in _links(doc.read_text()):
    if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
      continue
    path, _, anchor = target.partition("#")
    dest = (doc.parent / path).resolve() if path else doc
    if not dest.exists():
      problems.append(f"{target}: no such file")
    elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
      problems.append(f"{target}: no heading with anchor #{anchor} in {dest.name}")
  assert not problems, f"{doc.relative_to(ROOT)}: " + "; ".join(problems)


def test_the_link_check_sees_links_and_anchors():
  text = "[a](quickstart.md) ![f](figures/x.png) `[not](a-link.md)`\n```\n[no](x.md)\n```\n[r]: ref.md"
  assert list(_links(text)) == ["quickstart.md", "figures/x.png", "ref.md"]
  assert _slug("Choosing NUM_EXPERT_PARTITIONS and NUM_MODEL_PARTITIONS for a slice") == \
      "choosing-num_expert_partitions-and-num_model_partitions-for-a-slice"
  assert _slug("`loss is nan at step N`") == "loss-is-nan-at-step-n"
  assert "registering-your-own-task" in _anchors(ROOT / "docs" / "data.md")


def test_nothing_points_outside_the_repository():
  """Code and docs cite OpenMoE's paper and code, never notes a clone does not have."""
  import re
  # Built from parts so this file does not itself name the notes it looks for.
  notes = ["OPENMOE_" + "SPEC", "PEERS" + r"\.md", "STACK" + r"\.md", "STYLE" + r"\.md"]
  bad = re.compile("|".join([r"\.\./" + "shared", "shared/" + "reference", "spec" + " §",
                             *notes]))
  hits = []
  for path in ROOT.rglob("*"):
    if (path.suffix in (".py", ".md", ".gin", ".txt", ".sh", ".cfg", ".toml") and ".venv" not in
        path.parts and ".git" not in path.parts):
      for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if bad.search(line):
          hits.append(f"{path.relative_to(ROOT)}:{i}")
  assert not hits, hits
