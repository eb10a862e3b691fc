"""The package's import structure (issue #20): nothing imports another module's `_private` name,
and imports point one way between the layers.

Layers, top to bottom (a module may import its own layer's package and any layer below):
  main                       the binary;
  phases                     one module per phase, wiring the library;
  training, evaluation       losses, steps, the train loop; evaluation of trained systems;
  models, data               the Flax model, decoding, HF interop; records, batching, pairs;
  errors, sharding, checkpoints   the base modules.
The base modules are ordered too: checkpoints -> sharding -> errors.
Same-layer imports that are allowed, one way only: evaluation -> training (it measures policies
with PPO's scoring and KL to the reference; training never imports evaluation) and models -> data
(the one generation path batches prompts with `data.batching`; data never imports models: pair
building gets the policy sampler as a callable). One exception: checkpoints reads the model config
and HF files (models), kept because every layer above needs its one checkpoint helper.
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rlhf_jax"

# The layer of each top-level part of the package (higher imports lower).
# The config files (rlhf_jax.configs) are read by the binary only: nothing in the package imports
# them (they sit above everything).
LAYERS = {"configs": 7, "main": 6, "phases": 5, "training": 4, "evaluation": 4, "models": 3,
          "data": 3, "checkpoints": 2, "sharding": 1, "errors": 0, "__init__": 0}
SAME_LAYER_ALLOWED = {("evaluation", "training"), ("models", "data")}
# Base-module imports of a higher layer, each with its reason (see the module docstring).
EXCEPTIONS = {("checkpoints", "models")}


def _modules() -> dict[str, pathlib.Path]:
  modules = {}
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    modules[name] = path
  return modules


def _imports(path: pathlib.Path, module: str) -> list[tuple[str, str | None, int]]:
  """(imported module, imported name or None, line) of every import in the file."""
  found = []
  package = module if path.name == "__init__.py" else module.rpartition(".")[0]
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      found += [(alias.name, None, node.lineno) for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parent = package.split(".")[:len(package.split(".")) - node.level + 1]
        base = ".".join(parent + ([base] if base else []))
      found += [(base, alias.name, node.lineno) for alias in node.names]
  return found


def _part(module: str) -> str:
  """`rlhf_jax.training.ppo` -> `training`; `rlhf_jax.sharding` -> `sharding`."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 else "__init__"


MODULES = _modules()


def _project_imports():
  for module, path in MODULES.items():
    for imported, name, line in _imports(path, module):
      if imported == "rlhf_jax" or imported.startswith("rlhf_jax."):
        if name is not None and f"{imported}.{name}" in MODULES:  # `from pkg import module`
          imported, name = f"{imported}.{name}", None
        yield module, path, imported, name, line


def test_the_walk_sees_the_package():
  assert {"rlhf_jax.phases", "rlhf_jax.phases.ppo", "rlhf_jax.training.loop",
          "rlhf_jax.models.decode", "rlhf_jax.data.preferences"} <= set(MODULES)
  assert all(_part(m) in LAYERS for m in MODULES), sorted(
      m for m in MODULES if _part(m) not in LAYERS)


def test_no_module_imports_another_modules_private_name():
  private = [f"{path.relative_to(PACKAGE.parent)}:{line}: {imported}.{name}"
             for module, path, imported, name, line in _project_imports()
             if name is not None and name.startswith("_") and imported != module]
  assert not private, "\n".join(private)


def test_no_module_reads_another_modules_private_attribute():
  """`module._name` through an imported module is the same breach as importing `_name`."""
  bad = []
  for module, path in MODULES.items():
    imported = {alias for target, alias in _aliases(path, module) if target != module}
    for node in ast.walk(ast.parse(path.read_text())):
      if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
          and node.value.id in imported and node.attr.startswith("_")
          and not node.attr.startswith("__")):
        bad.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: "
                   f"{node.value.id}.{node.attr}")
  assert not bad, "\n".join(bad)


def _aliases(path: pathlib.Path, module: str):
  """(project module, local name) of every `import rlhf_jax.x as y` / `from rlhf_jax.x import y`
  that binds a module."""
  tree = ast.parse(path.read_text())
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rlhf_jax"):
      for alias in node.names:
        target = f"{node.module}.{alias.name}"
        if target in MODULES:
          yield target, alias.asname or alias.name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name in MODULES and alias.asname:
          yield alias.name, alias.asname


def test_imports_point_one_way():
  wrong = []
  for module, path, imported, _, line in _project_imports():
    source, target = _part(module), _part(imported)
    if source == target or target == "__init__":
      continue
    upward = LAYERS[target] > LAYERS[source]
    same_layer = LAYERS[target] == LAYERS[source] and (source, target) not in SAME_LAYER_ALLOWED
    if (upward or same_layer) and (source, target) not in EXCEPTIONS:
      wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {source} imports {target} "
                   f"({imported})")
  assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("phase", ["init", "hf_io", "generate", "sft", "reward", "ppo", "eval",
                                   "pipeline"])
def test_every_phase_has_its_module_with_run(phase):
  tree = ast.parse(MODULES[f"rlhf_jax.phases.{phase}"].read_text())
  functions = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
  assert {"run_import", "run_export"} <= functions if phase == "hf_io" else "run" in functions


def test_the_phase_table_names_existing_functions():
  from rlhf_jax import phases
  for name, target in phases.PHASES.items():
    module, function = target.split(":")
    tree = ast.parse(MODULES[f"rlhf_jax.phases.{module}"].read_text())
    assert function in {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}, name


def _readme_layout() -> dict[str, str]:
  """The README's layout block, split by package directory: {"": the top-level lines,
  "phases": that entry's lines, ...}."""
  readme = (PACKAGE.parent / "README.md").read_text()
  block = readme.split("## Layout", 1)[1].split("```", 2)[1]
  sections, current = {"": ""}, ""
  for line in block.splitlines():
    stripped = line.strip()
    if line.startswith("  ") and not line.startswith("   ") and stripped.split()[0].endswith("/"):
      current = stripped.split()[0].rstrip("/")
      sections[current] = ""
    elif not line.startswith(" ") and stripped:
      # The package's own line starts the top-level entry; configs/, launch/, ... are outside it.
      current = "" if stripped.startswith("rlhf_jax/") else None
    if current is not None:
      sections[current] += line + "\n"
  return sections


def test_the_readme_layout_names_every_module_and_only_existing_ones():
  """The README's layout section matches the tree (issue #20): each module of the package is
  named, as NAME.py, in its directory's entry, and each NAME.py an entry names exists there."""
  import re
  sections = _readme_layout()
  for path in sorted(PACKAGE.rglob("*.py")):
    if path.name == "__init__.py":
      continue
    directory = path.parent.relative_to(PACKAGE).as_posix()
    section = sections.get("" if directory == "." else directory)
    assert section is not None, f"README layout has no entry for rlhf_jax/{directory}/"
    assert re.search(rf"(?<![\w/]){re.escape(path.name)}\b", section), (
        f"README layout does not name rlhf_jax/{path.relative_to(PACKAGE)}")
  for directory, section in sections.items():
    for name in re.findall(r"(?<![\w/])(\w+\.py)\b", section):
      assert (PACKAGE / directory / name).is_file(), (
          f"README layout names {name} under rlhf_jax/{directory}, which does not exist")
