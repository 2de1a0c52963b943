"""Values that validation used to let through (issue 28, item 5): non-finite floats, seeds outside
torch's range, zero or negative counts, ``adapter.alpha=0`` and adapters too large for the machine.
Each fails in one ``moe-lora: error:`` line naming the key, before any run folder exists.

The CLI rows run in-process (``run_cli``) from an empty working directory without a
``hydra.run.dir``: Hydra's default ``outputs/<date>/<time>`` (and ``multirun/...``) would appear
there if the job had started. The generic checks are tested over the registry and the schemas, so
a float added to a variant or a group later is covered without a new row.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing

import pytest
import torch

from moe_lora import config as config_module
from moe_lora.adapters import ADAPTERS
from moe_lora.config import (
    SEED_MAX,
    BaseMoEConfig,
    BudgetConfig,
    ClaimConfig,
    DataConfig,
    FactsConfig,
    HarnessConfig,
    LayoutConfig,
    LowRankConfig,
    PretrainConfig,
    RecipeConfig,
    SourceConfig,
    TrainConfig,
    WorldConfig,
)
from moe_lora.errors import ConfigError

GIB = 2**30

# (overrides, what the one error line must contain)
PROBES = [
    (["adapter.alpha=0"], "adapter.alpha=0.0 must be > 0"),
    (["adapter=lora", "adapter.alpha=-8"], "adapter.alpha=-8.0 must be > 0"),
    (["adapter=melora", "adapter.alpha=0"], "adapter.alpha=0.0 must be > 0"),
    (["adapter=mola", "layout.slope=nan"], "layout.slope=nan must be a finite number"),
    (["adapter=mola", "layout.curvature=-inf"], "layout.curvature=-inf must be a finite number"),
    (["adapter=mola", "layout=custom", "layout.experts=null", "layout.weights=[1,nan,1,1]"], "layout.weights[1]=nan"),
    (["adapter.router_jitter=inf"], "adapter.router_jitter=inf must be a finite number"),
    (["adapter=mov", "adapter.lb_weight=nan"], "adapter.lb_weight=nan must be a finite number"),
    (["adapter.lbc_beta=inf"], "adapter.lbc_beta=inf must be a finite number"),
    (["adapter.dropout=nan"], "adapter.dropout=nan must be a finite number"),
    (["seed=18446744073709551616"], "seed=18446744073709551616 must be in [0, 2**64 - 1]"),
    (["seed=-1"], "seed=-1 must be in [0, 2**64 - 1]"),
    (["data.world.seed=-5"], "data.world.seed=-5 must be in [0, 2**64 - 1]"),
    (["recipe.threads=-1"], "recipe.threads=-1 must be >= 1 or null"),
    (["recipe.threads=0"], "recipe.threads=0 must be >= 1 or null"),
    (["model.pretrain.batch_size=0"], "model.pretrain.batch_size=0 must be >= 1"),
    (["model.pretrain.lr=nan"], "model.pretrain.lr=nan must be a finite number"),
    (["model.hidden_size=0"], "model.hidden_size=0 must be >= 1"),
    (["adapter=alora", "recipe.realloc_val_examples=0"], "recipe.realloc_val_examples=0 must be >= 1"),
    (["adapter=mola", "layout.budget.per_layer_mean=inf"], "layout.budget.per_layer_mean=inf must be a finite"),
    (["adapter.num_experts=100000"], "adapter.num_experts=100000 makes an adapter needing about"),
    (["adapter=mola", "adapter.num_experts=100000"], "adapter.num_experts=100000 makes an adapter needing about"),
    (["recipe.lr=inf"], "recipe.lr=inf must be a finite number"),
    (["recipe.weight_decay=nan"], "recipe.weight_decay=nan must be a finite number"),
    (["recipe.weight_decay=-0.1"], "recipe.weight_decay=-0.1 must be >= 0"),
    (["recipe.max_grad_norm=nan"], "recipe.max_grad_norm=nan must be a finite number"),
    (["data.cbqa_ratio=nan"], "data.cbqa_ratio=nan must be a finite number"),
    (["eval.harness.limit=inf"], "eval.harness.limit=inf must be a finite number"),
    (["data=triviaqa_alpaca", "data.sources.alpaca.eval_examples=0"], "data.sources.<name>.eval_examples=0"),
    (["data.p3.eval_examples=0"], "data.p3.eval_examples=0 must be >= 1 or null"),
    (["-m", "seed=0,-1"], "seed=-1"),  # the bad job of a sweep, before the sweep folder
]


@pytest.fixture
def memory_16gib(monkeypatch) -> None:
    """The memory check compares with this machine's RAM: pin it, so no machine ever runs a row."""
    monkeypatch.setattr("moe_lora.recipes.validate.machine_memory", lambda: 16 * GIB)


@pytest.mark.parametrize(("args", "needle"), PROBES, ids=[" ".join(a) for a, _ in PROBES])
def test_bad_value_fails_in_one_line_before_any_folder(
    run_cli, tmp_path, monkeypatch, memory_16gib, args, needle
) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    code, out, err = run_cli("train", *args, "recipe=smoke", f"cache_dir={tmp_path / 'cache'}", tiny=False)
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in out + err
    assert len(lines) == 1 and lines[0].startswith("moe-lora: error: ") and needle in lines[0], err
    assert list(cwd.iterdir()) == [], "a run or sweep folder was created"


# ------------------------------------------------------------------------------------- the generic check
def float_fields(cls: type) -> list[str]:
    """Fields typed float, Optional[float] or List[float] (the annotations are strings: resolve them)."""
    hints = typing.get_type_hints(cls)

    def has_float(t: object) -> bool:
        return t is float or any(has_float(a) for a in typing.get_args(t))

    return [f.name for f in dataclasses.fields(cls) if has_float(hints[f.name])]


def bad(cls: type, field: str, value: float, **kwargs: object) -> str:
    """The ConfigError message of ``cls(**kwargs, field=value)`` (a list field gets ``[value]``)."""
    hint = typing.get_type_hints(cls)[field]
    is_list = any(typing.get_origin(a) is list for a in (hint, *typing.get_args(hint)))
    with pytest.raises(ConfigError) as info:
        cls(**{**kwargs, field: [value] if is_list else value})
    return str(info.value)


@pytest.mark.parametrize("variant", list(ADAPTERS))
def test_every_float_of_every_variant_must_be_finite(variant: str) -> None:
    cls = ADAPTERS.get(variant).config_cls
    cls()  # the defaults are valid
    for name in float_fields(cls):
        for value in (math.nan, math.inf, -math.inf):
            assert bad(cls, name, value).startswith(f"adapter.{name}={value!r} must be a finite number"), name


# group schema -> (the key prefix its errors use, the fields it needs)
GROUPS: dict[type, tuple[str, dict]] = {
    PretrainConfig: ("model.pretrain", {}),
    BudgetConfig: ("layout.budget", {}),
    LayoutConfig: ("layout", {}),
    WorldConfig: ("data.world", {}),
    SourceConfig: ("data.sources.<name>", {"path": "x"}),
    DataConfig: ("data", {}),
    RecipeConfig: ("recipe", {}),
    HarnessConfig: ("eval.harness", {}),
    ClaimConfig: ("claims[]", {"name": "c", "metric": "metrics.x", "arm": "a", "than": "b"}),
    BaseMoEConfig: ("model.moe", {}),
    FactsConfig: ("data.facts", {}),
}


def test_every_group_schema_with_a_float_is_checked() -> None:
    """A schema of config.py that gains a float field must be listed above (and so be tested)."""
    schemas = [c for _, c in inspect.getmembers(config_module, inspect.isclass) if dataclasses.is_dataclass(c)]
    with_floats = {c for c in schemas if c.__module__ == config_module.__name__ and float_fields(c)}
    adapters = {c for c in with_floats if issubclass(c, config_module.AdapterConfig)}  # tested over the registry
    assert with_floats - adapters == set(GROUPS)


@pytest.mark.parametrize("cls", list(GROUPS), ids=lambda c: c.__name__)
def test_every_float_of_every_group_must_be_finite(cls: type) -> None:
    prefix, needed = GROUPS[cls]
    cls(**needed)
    for name in float_fields(cls):
        for value in (math.nan, math.inf):
            message = bad(cls, name, value, **needed)
            assert message.startswith(f"{prefix}.{name}") and "must be a finite number" in message, message


def test_the_root_walk_names_nested_keys() -> None:
    """What the groups cannot name themselves (a source's name) the root's walk does; a float that
    dodged its group's check (built with validation off) is still caught at the root."""
    source = SourceConfig(path="x")
    source.weight = math.inf  # as if set after validation
    data = DataConfig()
    data.sources = {"triviaqa": source}
    with pytest.raises(ConfigError, match=r"^data\.sources\.triviaqa\.weight=inf must be a finite number$"):
        config_module.check_finite(data, "data")
    recipe = RecipeConfig()
    recipe.lr = math.nan
    with pytest.raises(ConfigError, match=r"^recipe\.lr=nan must be a finite number$"):
        TrainConfig(recipe=recipe)


@pytest.mark.parametrize("variant", [n for n in ADAPTERS if issubclass(ADAPTERS.get(n).config_cls, LowRankConfig)])
def test_alpha_must_be_positive_wherever_there_is_one(variant: str) -> None:
    cls = ADAPTERS.get(variant).config_cls
    for alpha in (0.0, -1.0):
        assert bad(cls, "alpha", alpha).startswith(f"adapter.alpha={alpha!r} must be > 0")
    assert cls(alpha=1e-3).alpha == 1e-3


def test_the_seed_range_is_torchs() -> None:
    torch.manual_seed(SEED_MAX)
    torch.Generator().manual_seed(SEED_MAX)
    with pytest.raises((RuntimeError, ValueError)):
        torch.manual_seed(SEED_MAX + 1)
    assert TrainConfig(seed=SEED_MAX).seed == SEED_MAX and WorldConfig(seed=SEED_MAX).seed == SEED_MAX
    for seed in (SEED_MAX + 1, -1):
        with pytest.raises(ConfigError, match=rf"^seed={seed} must be in \[0, 2\*\*64 - 1\]"):
            TrainConfig(seed=seed)


# ------------------------------------------------------------------------------------- the memory check
def test_the_memory_estimate_counts_weights_gradients_moments_and_buffers(monkeypatch) -> None:
    """MoLA on the tiny world's up projections (4 layers, 128 -> 512), E=8, r=8: per layer A (128 x 64),
    B (64 x 512) and the router (8 x 128), four times each in float32, plus the (8 x 64) float32
    gate_expand and the router's 8 int64 expert types."""
    from moe_lora.recipes.compose import load_config
    from moe_lora.recipes.validate import check_memory, check_targets

    args = ["adapter=mola", "layout=uniform", "adapter.target_modules=[ffn_up]", "adapter.num_experts=8"]
    cfg = load_config([*args, "adapter.rank=8"], check_files=False)
    per_layer = 4 * 4 * (128 * 64 + 64 * 512 + 8 * 128) + 4 * 8 * 64 + 8 * 8
    assert check_targets(cfg) == 4 * per_layer
    monkeypatch.setattr("moe_lora.recipes.validate.machine_memory", lambda: 4 * per_layer)
    check_memory(cfg, check_targets(cfg))  # exactly fits
    monkeypatch.setattr("moe_lora.recipes.validate.machine_memory", lambda: 4 * per_layer - 1)
    with pytest.raises(ConfigError, match=r"^adapter\.num_experts=8 makes an adapter needing about 0\.0 GiB"):
        check_memory(cfg, check_targets(cfg))
    # gate_expand is E x E*r: 64 times the experts, 4,096 times its bytes
    big = load_config([*args[:3], "adapter.num_experts=512", "adapter.rank=8"], check_files=False)
    assert check_targets(big) > 64 * check_targets(cfg)


def test_params_still_counts_an_adapter_too_big_to_train(run_cli, memory_16gib) -> None:
    """``moe-lora params`` builds nothing: it may describe what this machine could not train."""
    code, out, err = run_cli("params", "adapter=mola", "adapter.num_experts=100000", tiny=False)
    assert code == 0, err
    assert "trainable" in out
