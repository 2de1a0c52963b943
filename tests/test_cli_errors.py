"""Bad input: a one-line error naming the key, non-zero exit, no run directory left behind."""

from __future__ import annotations

import sys
import time

import pytest

CASES = [
    (["adapter.num_experts=4", "adapter.top_k=9"], "adapter.top_k=9"),
    (["adapter.lbc_delta=2"], "adapter.lbc_delta"),
    (["adapter=mola_typo"], "adapter/mola_typo"),
    (["adapter=lorra"], "did you mean 'lora'"),
    (["adapter.lbc_deltaa=0.1"], "lbc_deltaa"),
    (["adapter.rank=abc"], "adapter.rank"),
    (["adapter=lora", "adapter.num_experts=4"], "num_experts"),
    (["recipe.max_steps=0"], "recipe.max_steps"),
    (["data.cbqa_ratio=1.5"], "data.cbqa_ratio"),
    (["layout.experts=[2,4,6,8,10]", "model.num_layers=4"], "layout.experts"),
    (["data.instruction_tasks=[reverse,dance]"], "data.instruction_tasks"),
    (["model.source=hub", "model.name_or_path=./no/such/dir"], "model.name_or_path"),
    (["-m", "adapter=lora,loramoe", "adapter.dropout=2"], "adapter.dropout"),
    (["data=cbqa_instruct_hub"], "data.sources.triviaqa"),
    (["recipe.device=cuda:7"], "recipe.device"),
    (["eval.harness.tasks=[arc_easy]", "eval.harness.limit=0"], "eval.harness.limit"),
    (["experiment=loramoe_forgetting_paper"], "model.name_or_path"),
    (["adapter=loramoe", "adapter.expert_compute=grouped"], "needs top-k routing"),
    (["adapter=mola", "adapter.expert_compute=sparse"], "adapter.expert_compute"),
    (["adapter=mola", "adapter.expert_compute=grouped", "adapter.rank=6"], "adapter.rank=6"),
    (["adapter=mola", "adapter.expert_compute=grouped", "recipe.compile=true"], "model.dtype=bfloat16"),
    # settings that used to be ignored (issue 'Claims as code', item 5)
    (["adapter=mov", "adapter.rank=4"], "rank"),
    (["adapter=mov", "adapter.num_null_experts=2"], "num_null_experts"),
    (["adapter=hydralora", "adapter.top_k=2", "adapter.expert_compute=grouped"], "adapter.expert_compute"),
    (["adapter=loramoe", "adapter.lbc_expert_types=[0,1]"], "adapter.lbc_expert_types"),
    (["adapter=mola", "layout=custom", "layout.experts=[2,4,6]"], "layout.experts"),
    (["adapter=ia3", "layout=custom", "layout.experts=null", "layout.rank=[4]"], "layout.rank"),
    (
        [
            "adapter=lora",
            "adapter.target_modules=[lm_head]",
            "layout=custom",
            "layout.experts=null",
            "layout.rank=[4,8]",
        ],
        "lm_head",
    ),
    (["recipe.optimizer=sgd"], "recipe.optimizer"),
    (["recipe.optimizer=adafactor"], "recipe.scheduler"),
    # keys the config does not have: a did-you-mean, the keys there, or the + that adds one
    (["adapter.num_expert=4"], "did you mean adapter.num_experts?"),
    (["eval.harnes.tasks=[a]"], "did you mean eval.harness.tasks?"),
    (["adapterr=lora"], "did you mean adapter?"),
    (["adapter=lora", "adapter.num_experts=4"], "keys of adapter: name, target_modules"),
    (["foo=1"], "use +foo=1"),
    (["arm=lora"], "add it with +arm=lora"),
    (["data.sources.extra.name=x"], "use +data.sources.extra.name=x"),
]


@pytest.mark.parametrize(("args", "needle"), CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_config_fails_with_one_line(run_cli, tmp_path, args, needle) -> None:
    run_dir = tmp_path / "run"
    code, _out, err = run_cli("train", *args, f"hydra.run.dir={run_dir}", f"hydra.sweep.dir={run_dir}", tiny=False)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-lora: error:") and needle in lines[0], err
    assert not run_dir.exists()


def test_uncached_hub_id_fails_fast_offline(run_cli, tmp_path) -> None:
    start = time.time()
    code, _, err = run_cli(
        "train",
        "model.source=hub",
        "model.name_or_path=nobody/no-such-model",
        f"hydra.run.dir={tmp_path / 'r'}",
        tiny=False,
    )
    assert code == 2 and "HF_HUB_OFFLINE=0" in err and "model.name_or_path" in err
    assert time.time() - start < 10


def test_unknown_command_and_help(run_cli) -> None:
    code, _, err = run_cli("trian", tiny=False)
    assert code == 2 and "did you mean 'train'" in err
    code, out, _ = run_cli("--help", tiny=False)
    assert code == 0 and all(c in out for c in ("train", "params", "eval"))


def test_real_data_and_extra_errors_are_one_line(run_cli, tmp_path, data_root, monkeypatch) -> None:
    """A wrong field mapping (on a prepared data.root) and harness tasks without the `eval` extra."""
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "data=triviaqa_alpaca",
        f"data.root={data_root}",
        "data.sources.triviaqa.fields.question=query",
        f"hydra.run.dir={run_dir}",
        tiny=False,
    )
    assert code == 2 and err.count("\n") == 1 and "data.sources.triviaqa.fields.question=query" in err, err
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if `pip install -e ".[eval]"` had not run
    code, _, err = run_cli("train", "eval.harness.tasks=[arc_easy]", f"hydra.run.dir={run_dir}", tiny=False)
    assert code == 2 and err.count("\n") == 1 and "eval.harness.tasks" in err and ".[eval]" in err, err
    assert not run_dir.exists()
