"""lm-evaluation-harness on an in-memory model, over local task YAMLs (no download)."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_lora.config import HarnessConfig
from moe_lora.errors import ConfigError
from moe_lora.eval.generate import greedy_generate
from moe_lora.eval.harness import check_harness, flatten_results, run_harness
from moe_lora.eval.normalize import match_triviaqa


def test_missing_lm_eval_fails_in_one_line_naming_the_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    check_harness(HarnessConfig(tasks=[]))  # nothing asked for: lm-eval not needed
    with pytest.raises(ConfigError) as err:
        check_harness(HarnessConfig(tasks=["arc_easy"]))
    message = str(err.value)
    assert "\n" not in message and "eval.harness.tasks" in message and 'pip install -e ".[eval]"' in message


def test_lm_eval_outside_the_pin_fails_naming_the_extra(monkeypatch) -> None:
    pytest.importorskip("lm_eval")
    monkeypatch.setattr("moe_lora.eval.harness.version", lambda _: "0.3.0")
    with pytest.raises(ConfigError, match=r"lm-eval>=0.4.10,<0.5 but 0.3.0 is installed.*\.\[eval\]"):
        check_harness(HarnessConfig(tasks=["arc_easy"]))
    monkeypatch.setattr("moe_lora.eval.harness.version", lambda _: "0.4.13")
    check_harness(HarnessConfig(tasks=["arc_easy"]))


def test_flatten_results_keeps_numbers_and_stderr_only() -> None:
    raw = {
        "arc_easy": {
            "alias": "arc_easy",
            "acc,none": 0.5,
            "acc_stderr,none": 0.1,
            "acc_norm,none": float("nan"),
            "exact_match,remove_whitespace": 1,
            "exact_match_stderr,remove_whitespace": "N/A",
            "sample_len": 3,
        }
    }
    assert flatten_results(raw) == {
        "arc_easy": {
            "acc": 0.5,
            "acc_stderr": 0.1,
            "acc_norm": None,
            "exact_match,remove_whitespace": 1.0,
            "exact_match_stderr,remove_whitespace": None,
        }
    }


@pytest.fixture(scope="module")
def llama(checkpoints):
    path = checkpoints["llama"]
    return AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_run_harness_scores_local_tasks_on_the_in_memory_model(llama, task_dir, dtype) -> None:
    model, tok = llama
    model = copy.deepcopy(model).to(dtype).train()
    rng = torch.random.get_rng_state()
    cfg = HarnessConfig(tasks=["tiny_mc", "tiny_gen"], limit=4, batch_size=2, include_path=str(task_dir))
    out = run_harness(model, tok, cfg, device="cpu")
    assert set(out) == {"tiny_mc", "tiny_gen"}
    acc, em = out["tiny_mc"]["acc"], out["tiny_gen"]["exact_match,remove_whitespace"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0 and isinstance(out["tiny_mc"]["acc_stderr"], float)
    assert isinstance(em, float) and 0.0 <= em <= 1.0
    assert next(model.parameters()).dtype == dtype and model.training  # not cast, training mode restored
    assert torch.equal(torch.random.get_rng_state(), rng)  # lm-eval's seeding does not leak into the run


def test_generation_matches_lm_eval_generate_until(llama, task_dir) -> None:
    """Our greedy generation + stop cut + triviaqa matching gives lm-eval's filtered responses and
    scores on the same prompts, through HFLM on the same in-memory model."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = llama
    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    out = simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=tok, batch_size=3),
        tasks=["tiny_gen"],
        task_manager=manager,
        log_samples=True,
    )
    samples = sorted(out["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    prompts = [s["arguments"][0][0] for s in samples]  # (context, generation kwargs) per request
    ours = greedy_generate(model, tok, prompts, max_new_tokens=8, stop=("\n", ".", ","), batch_size=2)
    assert [o.strip() for o in ours] == [s["filtered_resps"][0] for s in samples]
    assert any(s["filtered_resps"][0] for s in samples)  # not trivially equal: something was generated
    assert [match_triviaqa(o, s["target"]) for o, s in zip(ours, samples, strict=True)] == [
        bool(s["exact_match"]) for s in samples
    ]


def test_run_harness_scores_an_adapted_t5_with_the_seq2seq_backend(task_dir, tmp_path) -> None:
    from transformers import T5ForConditionalGeneration

    from moe_lora.adapters.inject import inject_adapter
    from moe_lora.recipes.compose import load_config
    from tests.fixtures.checkpoints import make_t5_checkpoint

    # equal stacks: lm-eval's generate builds transformers' cache, which a T5 with more decoder than
    # encoder layers overflows (transformers 5.24; moe_lora's own generation passes its cache)
    path = make_t5_checkpoint(tmp_path / "t5", encoder_layers=2, decoder_layers=2)
    cfg = load_config(["model.source=hub", f"model.name_or_path={path}", "adapter=mov"], check_files=False)
    model = T5ForConditionalGeneration.from_pretrained(path)
    inject_adapter(model, cfg.adapter, cfg.model, cfg.layout)
    seen = []
    model.get_encoder().register_forward_hook(lambda m, a, o: seen.append(1))
    out = run_harness(
        model,
        AutoTokenizer.from_pretrained(path),
        HarnessConfig(tasks=["tiny_mc", "tiny_gen"], limit=3, batch_size=2, include_path=str(task_dir)),
        device="cpu",
    )
    assert 0.0 <= out["tiny_mc"]["acc"] <= 1.0 and 0.0 <= out["tiny_gen"]["exact_match,remove_whitespace"] <= 1.0
    assert seen  # the context went through the encoder
