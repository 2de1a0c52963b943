"""The house plan, checked: no import cycle among moe_lora's modules nor among its packages (an
independent check beside import-linter's contracts in pyproject.toml, which hold the layer order;
`make lint` runs them), the project's own modules imported at the top of files, a root package of at
most ten modules, variants only in ``adapters/variants``, and every conf/adapter/*.yaml restating its
dataclass defaults faithfully (the dataclass is the one source of a variant's defaults)."""

from __future__ import annotations

import ast
from dataclasses import fields
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lora.adapters import ADAPTERS
from moe_lora.recipes.compose import CONF_DIR


def test_no_import_cycle_among_modules() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("moe_lora")
    cycles = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            if graph.chain_exists(importer=imported, imported=module):
                cycles.append((module, imported))
    assert not cycles, cycles


PACKAGE = Path(__file__).resolve().parents[1] / "moe_lora"
# the dispatchers: `moe-lora --help` and `import moe_lora` stay instant, a subcommand imports what it runs
LAZY_OWN_IMPORTS = {"cli.py", "__init__.py"}


def _package(module: str) -> str:
    """``moe_lora.recipes.job`` -> ``moe_lora.recipes``; a root module is its own unit."""
    return ".".join(module.split(".")[:2])


def test_no_import_cycle_among_packages() -> None:
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("moe_lora")
    edges: dict[str, set[str]] = {}
    for module in graph.modules:
        for imported in graph.find_modules_directly_imported_by(module):
            a, b = _package(module), _package(imported)
            if a != b and a != "moe_lora" and b != "moe_lora":
                edges.setdefault(a, set()).add(b)
    cycles = []
    for start in edges:
        stack, seen = list(edges[start]), set()
        while stack:
            node = stack.pop()
            if node == start:
                cycles.append(start)
                break
            if node not in seen:
                seen.add(node)
                stack.extend(edges.get(node, ()))
    assert not cycles, f"packages on an import cycle: {sorted(cycles)}"


def _lazy_own_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                names = [inner.module or ""] if isinstance(inner, ast.ImportFrom) else []
                names += [a.name for a in inner.names] if isinstance(inner, ast.Import) else []
                if any(n == "moe_lora" or n.startswith("moe_lora.") for n in names) or getattr(inner, "level", 0):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{inner.lineno}")
    return found


def test_own_modules_are_imported_at_the_top() -> None:
    lazy = [
        hit for f in sorted(PACKAGE.rglob("*.py")) if f.name not in LAZY_OWN_IMPORTS for hit in _lazy_own_imports(f)
    ]
    assert not lazy, f"function-level imports of moe_lora modules (move them to the top): {lazy}"


def test_the_lazy_check_finds_a_lazy_import(tmp_path) -> None:
    (tmp_path / "m.py").write_text("def f():\n    from moe_lora.errors import fail\n    return fail\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "pkg"
    try:
        assert _lazy_own_imports(tmp_path / "m.py") == ["m.py:2"]
    finally:
        PACKAGE = saved


def test_root_package_holds_at_most_ten_modules() -> None:
    root = sorted(f.name for f in PACKAGE.glob("*.py"))
    assert len(root) <= 10, root


def test_variants_live_in_their_own_package() -> None:
    """Every registered variant is defined in ``adapters/variants``; nothing there is infrastructure."""
    for name in ADAPTERS:
        module = ADAPTERS.get(name).config_cls.__module__
        assert module == f"moe_lora.adapters.variants.{name}", (name, module)
    assert {f.stem for f in (PACKAGE / "adapters" / "variants").glob("*.py")} - {"__init__"} == set(ADAPTERS)


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_yaml_restates_its_dataclass_defaults(name: str) -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "adapter" / f"{name}.yaml"))
    yaml.pop("defaults", None)
    defaults = ADAPTERS.get(name).config_cls()
    known = {f.name for f in fields(defaults)}
    assert set(yaml) <= known, set(yaml) - known
    for key, value in yaml.items():
        assert getattr(defaults, key) == value, (name, key, value, getattr(defaults, key))


def test_the_contributing_page_counts_the_tree() -> None:
    """docs/contributing.md's size line is the tree's: modules, lines (to the thousand), test files
    and each conf/ group."""
    import re

    root = PACKAGE.parent
    text = " ".join((root / "docs" / "contributing.md").read_text().split())
    line = text[text.index("Size on") :]
    modules = list(PACKAGE.rglob("*.py"))
    lines = sum(len(p.read_text().splitlines()) for p in modules)
    assert f"{len(modules)} Python modules" in line
    assert f"about {round(lines, -3):,} lines" in line
    assert f"{len(list((root / 'tests').rglob('test_*.py')))} test files" in line
    groups = {"adapters": "adapter", "arms": "arm", "data mixes": "data", "experiment presets": "experiment"}
    groups |= {"layouts": "layout", "models": "model", "recipes": "recipe", "data sources": "source"}
    for words, folder in groups.items():
        count = len(list((root / "conf" / folder).glob("*.yaml")))
        assert re.search(rf"\b{count} {words}\b", line), (words, count)
