"""CPU numerics: why another machine lands elsewhere, and the measured spread the summary quotes.

The cross-CPU facts are measured, not assumed: a world-model pretraining repeats bitwise in one
configuration, and ATen's scalar kernels (what a CPU without AVX2 runs) give other weights from the
initialisation on. The spread file, its run records and the docs table are checked to be one
generation of each other, so none of them can be edited by hand without the suite noticing.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from transformers import LlamaForCausalLM

from moe_lora.config import resolved_config
from moe_lora.env import PORTABLE_NUMERICS, set_numerics
from moe_lora.recipes.compose import load_config
from moe_lora.recipes.results import summary_table
from moe_lora.world.generator import World
from moe_lora.world.model import cache_key, world_model_config
from moe_lora.world.pretrain import pretrain
from moe_lora.world.spread import (
    SPREAD_FILE,
    config_differences,
    config_leaves,
    hydra_overrides,
    load_spread,
    number_overrides,
    numerics,
    render_table,
    run_overrides,
    spread_rows,
    summarise,
)
from moe_lora.world.tokenizer import word_tokenizer
from tests.conftest import TINY

REPO = Path(__file__).resolve().parent.parent


def pretrained_hash(steps: int = 3) -> str:
    """sha256 of a tiny world model's weights after ``steps`` pretraining steps (its init included;
    more than one: Adam's first step moves every weight by about lr times the gradient's sign,
    which hides differences in the gradients)."""
    cfg = load_config([*TINY, f"model.pretrain.steps={steps}"], check_files=False)
    world = World(cfg.data.world)
    torch.manual_seed(world.cfg.seed)
    model = LlamaForCausalLM(world_model_config(cfg.model, len(world.vocab)))
    pretrain(model, word_tokenizer(world.vocab), world.pretraining_corpus(), cfg.model.pretrain, world.cfg.seed, False)
    return hashlib.sha256(b"".join(v.numpy().tobytes() for _, v in sorted(model.state_dict().items()))).hexdigest()


def _hashes_in_subprocesses(*envs: dict[str, str]) -> list[str]:
    """``pretrained_hash()`` in one fresh process per environment, run side by side; each process
    sets the project's environment first, as ``moe-lora`` does before torch runs an op."""
    code = (
        "from moe_lora.env import set_environment; set_environment()\n"
        "from tests.test_numerics import pretrained_hash; print(pretrained_hash())"
    )
    base = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env={**base, **env}, cwd=REPO, stdout=subprocess.PIPE, text=True)
        for env in envs
    ]
    outs = [p.communicate()[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [out.strip().splitlines()[-1] for out in outs]


@pytest.mark.slow  # four fresh processes: about 40 CPU-seconds
def test_one_cpu_repeats_bitwise_other_kernels_do_not_and_portable_numerics_pin_them():
    """The premise of docs/reproducibility.md: one machine, one kernel set, one thread count gives
    the same weights in every process; the same code under another CPU's kernels (ATen's scalar
    ones, what a CPU without AVX2 picks) does not, from the initial weights on. Under
    MOE_LORA_NUMERICS=portable the kernels the CPU would pick no longer count."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("this CPU already runs ATen's scalar kernels: there is no other kernel set to compare")
    scalar = {"ATEN_CPU_CAPABILITY": "default"}
    portable = {"MOE_LORA_NUMERICS": "portable"}
    again, other, pinned, pinned_other = _hashes_in_subprocesses({}, scalar, portable, {**portable, **scalar})
    here = pretrained_hash()
    assert again == here
    assert other != here
    assert pinned == pinned_other
    assert pinned != here  # MKL's COMPATIBLE branch is not this CPU's own: the pin did take effect


def test_portable_numerics_set_the_pins_refuse_a_typo_and_key_their_own_world_model(monkeypatch):
    cfg = load_config(TINY, check_files=False)
    native_key = cache_key(cfg.data.world, cfg.model)
    for name in PORTABLE_NUMERICS:  # restored after the test: later subprocesses inherit os.environ
        monkeypatch.setenv(name, "unset")
    monkeypatch.setenv("MOE_LORA_NUMERICS", "portable")
    set_numerics()
    assert {k: os.environ[k] for k in PORTABLE_NUMERICS} == PORTABLE_NUMERICS
    assert cache_key(cfg.data.world, cfg.model) != native_key  # a native cache is not reused
    monkeypatch.setenv("MOE_LORA_NUMERICS", "portabel")
    with pytest.raises(SystemExit, match="MOE_LORA_NUMERICS='portabel': native \\(the default\\) or portable"):
        set_numerics()


def _results(tmp_path: Path, *overrides: str, lr: float = 3e-3, **metrics) -> dict:
    """A run's record whose run folder holds Hydra's overrides.yaml, as `moe-lora train` leaves it."""
    run_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides) or "[]\n")
    cfg = {"recipe": {"lr": lr, "threads": None}, "run_dir": str(run_dir), "cache_dir": "/x", "seed": 0}
    return {"config": cfg, "metrics": metrics}


def _spread(tmp_path: Path, *values: float) -> dict:
    runs = []
    for i, v in enumerate(values):
        run = _results(tmp_path, f"recipe.threads={i + 1}", f"cache_dir=/c{i}")
        runs.append(
            {
                "name": f"cpu{i}",
                "config": run["config"] | {"recipe": {"lr": 3e-3, "threads": i + 1}},
                "overrides": run_overrides(run["config"]["run_dir"]),
                "metrics": {"cbqa_em": v},
                "numerics": {"capability": "AVX2", "mkl_cbwr": None, "threads": i + 1},
            }
        )
    return summarise(runs)


def test_overrides_that_change_no_number_are_not_a_configuration(tmp_path):
    run = _results(tmp_path, "recipe.threads=4", "cache_dir=/c", "label=x", "hydra.run.dir=/r", "recipe.lr=1e-3")
    assert run_overrides(run["config"]["run_dir"]) == ["recipe.lr=1e-3"]
    assert run_overrides(tmp_path / "absent") is None


def test_a_schema_change_is_not_a_config_difference():
    """The drift check's rule: a field added since, or made null where it changes nothing."""
    reference = config_leaves({"recipe": {"lr": 3e-3, "threads": 1}, "model": {"moe": {"top_k": 2}}})
    now = {"recipe": {"lr": 3e-3, "threads": 8, "val_every": 0}, "model": {"moe": {"top_k": None}}}
    assert config_differences(now, reference) == []
    assert config_differences(now | {"recipe": {"lr": 1e-3}}, reference) == ["recipe.lr"]


def test_spread_places_a_run_within_below_or_above(tmp_path):
    spread = _spread(tmp_path, 0.80, 0.86, 0.83)
    assert spread["overrides"] == []
    assert spread["spread"]["cbqa_em"] == pytest.approx({"min": 0.80, "max": 0.86, "range": 0.06, "n": 3})
    rows = dict(spread_rows(_results(tmp_path, "recipe.threads=2", cbqa_em=0.82), spread))
    assert rows["cross-CPU spread"].startswith("3 emulated CPUs")
    assert rows["  cbqa_em"] == "0.820 vs 0.800..0.860: within it"
    assert dict(spread_rows(_results(tmp_path, cbqa_em=0.75), spread))["  cbqa_em"].endswith("0.050 below it")
    assert dict(spread_rows(_results(tmp_path, cbqa_em=0.9), spread))["  cbqa_em"].endswith("0.040 above it")
    other = dict(spread_rows(_results(tmp_path, "recipe.lr=1e-3", cbqa_em=0.82), spread))
    assert other["cross-CPU spread"] == "not measured for this configuration (recipe.lr=1e-3; docs/reproducibility.md)"


def test_a_train_run_is_matched_by_the_overrides_it_recorded(tmp_path, monkeypatch):
    """results.json's own ``overrides`` (recorded inside the Hydra job) decide before the folder's."""
    spread = _spread(tmp_path, 0.80, 0.86)
    run = _results(tmp_path, "recipe.lr=1e-3", cbqa_em=0.9)
    assert dict(spread_rows(run | {"overrides": []}, spread))["  cbqa_em"].endswith("0.040 above it")
    assert number_overrides(["recipe.threads=2", "seed=1", "+hydra.job.x=1", "adapter=lora"]) == [
        "adapter=lora",
        "seed=1",
    ]
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # an in-process CLI test before leaves it set
    assert hydra_overrides() is None  # outside a Hydra job


def test_runs_of_different_configurations_make_no_spread(tmp_path):
    (first,) = _spread(tmp_path, 0.8)["runs"]
    first |= {"config": _results(tmp_path)["config"], "overrides": []}
    with pytest.raises(ValueError, match=r"one configuration; other differs in \['recipe.lr'\]"):
        summarise([first, first | {"name": "other", "config": _results(tmp_path, lr=1e-3)["config"]}])
    with pytest.raises(ValueError, match="share their overrides; other has"):
        summarise([first, first | {"name": "other", "overrides": ["recipe.lr=1e-3"]}])


def test_summary_prints_the_numerics_and_the_spread():
    results = {
        "adapter": "loramoe",
        "model": "tiny_world",
        "seed": 0,
        "wall_s": 1.0,
        "metrics": {"cbqa_em_base": 0.99, "cbqa_em": 0.8},
        "numerics": numerics(),
        "config": {"seed": 0},
    }
    OmegaConf.create(results)  # the sweep objective reads results through OmegaConf: primitives only
    text = summary_table(results)
    assert f"{numerics()['capability']} kernels" in text
    assert f"{torch.get_num_threads()} threads" in text


def test_spread_file_page_and_run_records_are_one_generation():
    """spread.json is summarise() of docs/reproducibility/runs/*.json, and the page's table is
    render_table() of spread.json: rerun ``python scripts/numerics_spread.py --write-only``."""
    records = [json.loads(p.read_text()) for p in sorted((REPO / "docs/reproducibility/runs").glob("*.json"))]
    assert len(records) >= 2, "the spread needs at least two emulated CPUs"
    keys = ("name", "env", "overrides", "metrics", "numerics", "wall_s", "config")
    spread = load_spread(SPREAD_FILE)
    assert spread == json.loads(json.dumps(summarise([{k: r[k] for k in keys} for r in records])))
    assert spread["overrides"] == [], "the spread is of the default run (`make run`, no overrides)"
    assert render_table(spread) in (REPO / "docs/reproducibility.md").read_text()


def test_the_default_run_is_the_configuration_the_spread_was_measured_on():
    """`make run` (no overrides) gets the spread's rows: a changed default that changes numbers (a
    learning rate, a world size) fails here, and the spread must be measured again."""
    cfg = load_config([], check_files=False)
    assert config_differences(resolved_config(cfg), load_spread(SPREAD_FILE)["config"]) == []


def test_the_readme_quotes_the_measured_spread() -> None:
    """The quickstart's ranges are spread.json's, rounded as printed: a re-measured spread that
    moves them fails here until the README says the new numbers."""
    spread = json.loads((REPO / "moe_lora" / "world" / "spread.json").read_text())["spread"]
    readme = " ".join((REPO / "README.md").read_text().split())
    for metric, name in (("instruction_em", "instruction EM"), ("cbqa_em", "CBQA EM")):
        s = spread[metric]
        assert f"{name} {s['min']:.3f} to {s['max']:.3f}" in readme, (metric, s)
