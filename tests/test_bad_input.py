"""Bad input, catalogued (issue 11, item 7): one row per class of bad input across the CLI, configs,
model and data paths and output folders. Each row must exit non-zero with exactly one
``moe-lora: error:`` line naming the key or file, print no traceback, and leave the temporary
folder (the run directory, an earlier run's results, the fixture files) byte for byte as it was.

Most rows run in-process (``moe_lora.cli.main``, through the ``run_cli`` fixture: the same code
path without the ~4 s of importing torch); one row each for a model path, a data path and an output
folder runs the console script in a subprocess, as a user would. Checkpoint rows use hand-made
checkpoint folders; resumes with a changed config and corrupt (not truncated) checkpoint files are
in ``tests/train/test_checkpoint.py``, next to the real checkpoints they need.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

# If a row's input were ever accepted, the run it starts is tiny (and its tokenised cache goes to cache_dir).
SMALL = (
    "recipe=smoke",
    "recipe.threads=1",
    "recipe.max_steps=1",
    "data.num_train=4",
    "recipe.eval_limit=1",
    "eval.max_new_tokens=1",
)
HUB = ("model.source=hub", "model.name_or_path={llama}")
REAL = (*HUB, "data=triviaqa_alpaca", "data.root={data}")


def alpaca_from(file: str) -> tuple[str, ...]:
    """The TriviaQA fixture, and Alpaca read from ``file`` (under tmp) instead of the fixture."""
    return (
        *HUB,
        "data=triviaqa_alpaca",
        "data.root=null",
        "data.sources.triviaqa.path={data}/triviaqa",
        f"data.sources.alpaca.path={{tmp}}/{file}",
    )


@dataclass(frozen=True)
class Bad:
    name: str
    args: tuple[str, ...]  # {llama}, {data}, {tmp} are filled in
    names: str  # what the error line must name: the key or the file
    subprocess: bool = False
    setup: Callable[[Path], None] | None = None  # writes the row's files under tmp
    run_dir: str = "run"  # hydra.run.dir, under tmp
    xfail: str | None = None


def no_config_json(tmp: Path) -> None:
    (tmp / "model").mkdir()
    (tmp / "model" / "tokenizer.json").write_text("{}")


def corrupt_config_json(tmp: Path) -> None:
    no_config_json(tmp)
    (tmp / "model" / "config.json").write_text("{not json")


def empty_jsonl(tmp: Path) -> None:
    (tmp / "empty.jsonl").write_text("")


def empty_targets(tmp: Path) -> None:
    rows = [{"instruction": f"task {i}", "input": "", "output": ""} for i in range(10)]
    (tmp / "no_outputs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def junk_data_root(tmp: Path) -> None:
    (tmp / "root" / "triviaqa").mkdir(parents=True)
    (tmp / "root" / "triviaqa" / "README.txt").write_text("not a dataset")


def file_in_the_way(tmp: Path) -> None:
    (tmp / "taken").write_text("a file where the output folder should go")


def earlier_results(tmp: Path) -> None:
    (tmp / "earlier").mkdir()
    (tmp / "earlier" / "results.json").write_text('{"adapter": "lora", "metrics": {"cbqa_em": 0.25}}\n')


def checkpointed(tmp: Path, folder: str = "run") -> None:
    step = tmp / folder / "checkpoints" / "step-5"
    step.mkdir(parents=True)
    (step / "optimizer.pt").write_bytes(b"x" * 1000)
    (step / "checkpoint.json").write_text('{"step": 5, "config_hash": "0", "files": {"optimizer.pt": 1000}}')


def truncated_checkpoint(tmp: Path) -> None:
    checkpointed(tmp, "ckpt")
    (tmp / "ckpt" / "checkpoints" / "step-5" / "optimizer.pt").write_bytes(b"x" * 10)


ROWS = [
    # --- the command line and config composition (in-process)
    Bad("unknown command", ("trian",), "'trian'"),
    Bad("unknown key", ("train", "adapter.lbc_deltaa=0.1"), "lbc_deltaa"),
    Bad("wrong type", ("train", "adapter.rank=abc"), "adapter.rank"),
    Bad("unknown group option", ("train", "adapter=lorra"), "adapter/lorra"),
    Bad("malformed override", ("train", "adapter.rank=[1,"), "adapter.rank"),
    Bad("value outside its choices", ("train", "logger=wandb", "logger.wandb.mode=sometimes"), "logger.wandb.mode"),
    Bad("top_k > experts", ("train", "adapter.num_experts=4", "adapter.top_k=9"), "adapter.top_k=9"),
    Bad("layout not fitting depth", ("train", "layout.experts=[2,4,6,8,10]", "model.num_layers=4"), "layout.experts"),
    Bad("delta out of range", ("train", "adapter.lbc_delta=2"), "adapter.lbc_delta"),
    Bad("device not present", ("train", "recipe.device=cuda:7"), "recipe.device"),
    # values validation once let through to the run (issue 28, item 5; more in tests/test_value_checks.py)
    Bad("non-finite float", ("train", "recipe.lr=inf"), "recipe.lr=inf"),
    Bad("alpha that trains nothing", ("train", "adapter=lora", "adapter.alpha=0"), "adapter.alpha=0.0"),
    Bad("seed beyond torch's range", ("train", "seed=18446744073709551616"), "seed=18446744073709551616"),
    Bad("one bad job in a sweep", ("train", "-m", "adapter=lora,loramoe", "adapter.dropout=2"), "adapter.dropout"),
    # --- model paths (subprocess)
    Bad(
        "uncached hub model offline",
        ("train", "model.source=hub", "model.name_or_path=nobody/no-such-model"),
        "model.name_or_path",
    ),
    Bad(
        "missing model folder",
        ("train", "model.source=hub", "model.name_or_path={tmp}/no_such_model"),
        "{tmp}/no_such_model",
        subprocess=True,
    ),
    Bad(
        "model folder without config.json",
        ("train", "model.source=hub", "model.name_or_path={tmp}/model"),
        "without config.json",
        setup=no_config_json,
    ),
    Bad(
        "corrupt config.json",
        ("train", "model.source=hub", "model.name_or_path={tmp}/model"),
        "{tmp}/model/config.json",
        setup=corrupt_config_json,
    ),
    Bad(
        "target_modules matching nothing",
        ("train", *HUB, "adapter=lora", "adapter.target_modules=[nope]"),
        "adapter.target_modules",
    ),
    # --- data paths (subprocess)
    Bad(
        "missing dataset",
        ("train", *alpaca_from("no_such.jsonl")),
        "data.sources.alpaca.path='{tmp}/no_such.jsonl'",
        subprocess=True,
    ),
    Bad(
        "data.root without the dataset",
        ("train", *REAL, "data.root={tmp}/root"),
        "{tmp}/root/triviaqa",
        setup=junk_data_root,
    ),
    Bad(
        "missing field",
        ("train", *REAL, "data.sources.triviaqa.fields.question=query"),
        "data.sources.triviaqa.fields.question=query",
    ),
    Bad("unknown split", ("train", *REAL, "data.sources.triviaqa.split=nope"), "data.sources.triviaqa.split"),
    Bad("empty dataset", ("train", *alpaca_from("empty.jsonl")), "{tmp}/empty.jsonl", setup=empty_jsonl),
    Bad(
        "split slice selecting no rows",
        ("train", *alpaca_from("no_outputs.jsonl")),
        "data.sources.alpaca.eval_split='train[98%:]' selects no rows",
        setup=empty_targets,
    ),
    Bad(
        "every target empty",
        (
            "train",
            *alpaca_from("no_outputs.jsonl"),
            "data.sources.alpaca.split=train",
            "data.sources.alpaca.eval_split=null",
        ),
        "data.sources.alpaca.split: all 10 rows taken from {tmp}/no_outputs.jsonl",
        setup=empty_targets,
    ),
    Bad("max_length shorter than every prompt", ("train", *REAL, "data.max_length=8"), "data.max_length"),
    # --- output folders (subprocess; adapter=none: whatever the adapter, and no meta-device model to build)
    Bad(
        "unwritable output folder",
        ("train", "adapter=none"),
        "{tmp}/taken/run",
        subprocess=True,
        setup=file_in_the_way,
        run_dir="taken/run",
    ),
    # --- checkpoints (a run killed after its step-5 checkpoint, as the resume tests make them)
    Bad("checkpoints present without resume=", ("train", "adapter=none"), "resume=", setup=checkpointed),
    Bad(
        "truncated checkpoint",
        ("train", "adapter=none", "resume=auto"),
        "{tmp}/ckpt/checkpoints/step-5/optimizer.pt",
        setup=truncated_checkpoint,
        run_dir="ckpt",
    ),
    Bad("resume into another directory", ("train", "adapter=none", "resume={tmp}/elsewhere"), "resume="),
    Bad(
        "run directory that already holds results",
        ("train", *REAL, "adapter=none"),
        "{tmp}/earlier",
        setup=earlier_results,
        run_dir="earlier",
    ),
]


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every folder (None) and file (its bytes) under ``root``."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes() for p in sorted(root.rglob("*"))}


def console_script() -> list[str]:
    script = Path(sys.executable).parent / "moe-lora"
    return [str(script)] if script.exists() else [sys.executable, "-m", "moe_lora.cli"]


def marks(row: Bad) -> list[pytest.MarkDecorator]:
    """Subprocess rows cost 4-12 s each (torch import, some load a model): slow."""
    return ([pytest.mark.slow] if row.subprocess else []) + (
        [pytest.mark.xfail(strict=True, reason=row.xfail)] if row.xfail else []
    )


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name, marks=marks(r)) for r in ROWS])
def test_bad_input(row: Bad, tmp_path, run_cli, cache_dir, monkeypatch, request, capsys) -> None:
    fill = {"tmp": str(tmp_path)}  # the session's fixture checkpoints and datasets, built only for rows that use them
    if any("{llama}" in a for a in row.args):
        fill["llama"] = str(request.getfixturevalue("checkpoints")["llama"])
    if any("{data}" in a for a in row.args):
        fill["data"] = str(request.getfixturevalue("data_root"))
    args = [a.format(**fill) for a in row.args]
    args += [
        *SMALL,
        f"cache_dir={cache_dir}",
        f"hydra.run.dir={tmp_path / row.run_dir}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    cwd = tmp_path / "cwd"  # anything written relative to the working directory shows in the snapshot
    cwd.mkdir()
    if row.setup is not None:
        row.setup(tmp_path)
    before = snapshot(tmp_path)
    if row.subprocess:
        env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
        proc = subprocess.run([*console_script(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    else:
        monkeypatch.chdir(cwd)
        capsys.readouterr()  # what building the fixtures printed
        code, out, err = run_cli(*args, tiny=False)
    assert code != 0, f"exit 0\n{err[-3000:]}"
    assert "Traceback" not in out + err, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-lora: error: "), err[-3000:]
    assert row.names.format(**fill) in lines[0], lines[0]
    assert snapshot(tmp_path) == before, "files were written, changed or removed"


def test_the_catalogue_has_twenty_classes() -> None:
    assert len({r.name for r in ROWS}) == len(ROWS) >= 20
