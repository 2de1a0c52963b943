"""Shared fixtures: offline environment, a tiny pretrained world model, a CLI runner."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"
os.environ["WANDB_SILENT"] = "true"
# One share of the cores per pytest-xdist worker: two workers of two threads each on two cores made
# OpenMP spin against each other (an ALoRA end-to-end run took 44 s instead of 5.5 s). Subprocesses
# (torchrun, the SIGKILL tests) inherit OMP_NUM_THREADS; in-process CLI runs get recipe.threads.
THREADS = max(1, min(2, os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
os.environ["OMP_NUM_THREADS"] = str(THREADS)
torch.set_num_threads(THREADS)

# A world small enough to pretrain in seconds; shared by every end-to-end test through one cache.
TINY = [
    "data.world.num_people=40",
    "data.world.bios_per_person=3",
    "model.hidden_size=64",
    "model.num_layers=2",
    "model.intermediate_size=128",
    "model.num_heads=2",
    "model.num_kv_heads=2",
    "model.pretrain.steps=60",
    "model.pretrain.batch_size=32",
    "data.num_train=200",
    "data.eval_per_task=8",
    "recipe=smoke",
    f"recipe.threads={THREADS}",
]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole run, pytest-xdist's workers included: each world model pretrains once
    (a worker that needs it meanwhile waits on the cache entry's file lock, as parallel sweep jobs do)."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return tmp_path_factory.mktemp("cache")
    shared = tmp_path_factory.getbasetemp().parent / "cache"  # the run's folder above popen-gw0, popen-gw1
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture
def run_cli(cache_dir, tmp_path, capsys):
    """Run ``moe-lora`` in-process; returns (exit code, stdout, stderr)."""
    from moe_lora.cli import main

    def _run(*args: str, tiny: bool = True) -> tuple[int, str, str]:
        extra = [*TINY, f"cache_dir={cache_dir}"] if tiny else []
        code = main([*args, *extra])
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints of the llama, qwen2 and gpt2 families (2 layers, hidden 32), each with
    a tokenizer trained by ``tokenizers``, saved with ``save_pretrained`` (see tests/fixtures)."""
    from tests.fixtures.checkpoints import make_checkpoint

    root = tmp_path_factory.mktemp("checkpoints")
    return {family: make_checkpoint(family, root / family) for family in ("llama", "qwen2", "gpt2")}


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A ``data.root`` holding every built-in source in its hub schema (tests/fixtures/datasets.py)."""
    from tests.fixtures.datasets import write_fixture_sources

    return write_fixture_sources(tmp_path_factory.mktemp("data_root"))


@pytest.fixture(scope="session")
def task_dir(tmp_path_factory) -> Path:
    """lm-eval task YAMLs of tests/fixtures/harness with absolute paths filled in (any working dir)."""
    fixtures = Path(__file__).parent / "fixtures" / "harness"
    root = tmp_path_factory.mktemp("harness_tasks")
    for template in fixtures.glob("*.yaml.in"):
        text = template.read_text().replace("@DATA_DIR@", str(fixtures)).replace("@CACHE_DIR@", str(root / "cache"))
        (root / template.name.removesuffix(".in")).write_text(text)
    return root


def first_fast(values: list) -> list:
    """A parametrization whose first case runs in `make test-fast` and the others only in the whole
    suite (marked slow): the fast loop keeps one case of each code path, CI keeps every case."""
    return [
        v if i == 0 else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.slow)
        for i, v in enumerate(values)
    ]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def family_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Tiny random checkpoints of the families of tests/fixtures/checkpoints.FAMILIES (fused q|k|v,
    fused gate|up, fc1/fc2, other layer paths, an sdpa-refusing architecture), made once per run."""
    from tests.fixtures.checkpoints import FAMILIES, make_checkpoint

    root = tmp_path_factory.mktemp("family_checkpoints")
    return {family: make_checkpoint(family, root / family) for family in FAMILIES}


@pytest.fixture(autouse=True)
def _no_log_handlers_on_closed_streams():
    """Hydra's in-process commands leave logging handlers on a test's captured stream, closed after
    that test: a later test's log record would print "--- Logging error ---" into its stderr."""
    loggers = [logging.root, *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]
    for logger in loggers:
        for handler in list(logger.handlers):
            if getattr(getattr(handler, "stream", None), "closed", False):
                logger.removeHandler(handler)
    yield


@pytest.fixture
def fresh_logging(monkeypatch) -> None:
    """No root handlers left by earlier in-process commands (Hydra's, bound to a closed capture
    stream): a command's warnings reach this test's stderr instead of a "Logging error" block."""
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
