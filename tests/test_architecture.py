"""The house plan, checked: no import cycle among moe_lora's modules (import-linter's contracts in
pyproject.toml hold the layer rules, `make lint` runs them), and every conf/adapter/*.yaml restates
its dataclass defaults faithfully (the dataclass is the one source of a variant's defaults)."""

from __future__ import annotations

from dataclasses import fields

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


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_adapter_yaml_restates_its_dataclass_defaults(name: str) -> None:
    yaml = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "adapter" / f"{name}.yaml"))
    yaml.pop("defaults", None)
    defaults = ADAPTERS.get(name).config_cls()
    known = {f.name for f in fields(defaults)}
    assert set(yaml) <= known, set(yaml) - known
    for key, value in yaml.items():
        assert getattr(defaults, key) == value, (name, key, value, getattr(defaults, key))
