"""Batched greedy generation: left padding is invisible, stop strings cut like lm-eval, BOS where due."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from moe_lora.data.collate import prompt_ids
from moe_lora.eval.generate import cut_at_stop, greedy_generate

PROMPTS = [
    "Question: Who wrote the novel about the white whale?\nAnswer:",
    "Q: capital?\nA:",
    "Answer these questions:\n\nQ: which river flows through london?\nA:",
    "The quick brown fox",
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
]


@pytest.fixture(scope="module")
def models(checkpoints) -> dict:
    return {
        f: (AutoModelForCausalLM.from_pretrained(p), AutoTokenizer.from_pretrained(p)) for f, p in checkpoints.items()
    }


def one_by_one(model, tok, prompt: str, max_new_tokens: int) -> str:
    ids = torch.tensor([prompt_ids(tok, prompt)])
    out = model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tok.eos_token_id,
    )
    return tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_batches_equal_one_by_one_generation(models, family: str) -> None:
    model, tok = models[family]
    batched = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, stop=(), batch_size=2)
    assert batched == [one_by_one(model, tok, p, 10) for p in PROMPTS]
    assert all(batched)


def test_model_card_sampling_defaults_do_not_change_greedy_output(models) -> None:
    model, tok = models["qwen2"]
    greedy = greedy_generate(model, tok, PROMPTS, max_new_tokens=10, stop=(), batch_size=5)
    noisy = copy.deepcopy(model)
    noisy.generation_config.update(
        do_sample=True,
        top_k=3,
        temperature=3.0,
        repetition_penalty=10.0,
        no_repeat_ngram_size=2,
        min_new_tokens=8,
        max_new_tokens=2,
    )
    assert greedy_generate(noisy, tok, PROMPTS, max_new_tokens=10, stop=(), batch_size=5) == greedy


def test_stop_strings_cut_and_stop_early(models) -> None:
    model, tok = models["llama"]
    full = greedy_generate(model, tok, PROMPTS, max_new_tokens=12, stop=(), batch_size=5)
    # a character the first continuation reaches half-way (not U+FFFD: a byte-level token sequence
    # can decode to it mid-way and to a real character once complete)
    stop = next(c for c in full[0][len(full[0]) // 2 :] if c != "\ufffd")
    steps = []
    hook = model.register_forward_hook(lambda *_: steps.append(1))
    try:
        cut = greedy_generate(model, tok, PROMPTS[:1], max_new_tokens=12, stop=(stop,), batch_size=1)
    finally:
        hook.remove()
    assert cut == [full[0].split(stop)[0]] and len(cut[0]) < len(full[0])
    assert len(steps) < 12  # generation stopped once the stop string appeared
    many = greedy_generate(model, tok, PROMPTS, max_new_tokens=12, stop=("\n", stop), batch_size=5)
    assert many == [cut_at_stop(f, ("\n", stop)) for f in full]


def test_cut_at_stop_is_lm_eval_postprocessing() -> None:
    postprocess = pytest.importorskip("lm_eval.models.utils").postprocess_generated_text
    stops = [("\n", ".", ","), (",", "."), ("",), ()]
    texts = [" Paris, France.\nNext", " 1.5 million", "\nParis", " no stop here", ""]
    for stop in stops:
        for text in texts:
            assert cut_at_stop(text, stop) == postprocess(text, list(stop), None)


@pytest.mark.parametrize(("family", "starts_with_bos"), [("llama", True), ("gpt2", False), ("qwen2", False)])
def test_prompts_start_with_bos_where_the_family_adds_one(models, family: str, starts_with_bos: bool) -> None:
    model, tok = models[family]
    seen = []
    generate = model.generate

    def spy(**kwargs):
        seen.append(kwargs)
        return generate(**kwargs)

    model.generate = spy
    try:
        greedy_generate(model, tok, PROMPTS[:3], max_new_tokens=2, stop=(), batch_size=3)
    finally:
        del model.generate
    ids, mask = seen[0]["input_ids"], seen[0]["attention_mask"]
    assert mask[:, 0].tolist() == [1, 0, 0]  # left padding: the longest prompt fills the row
    first = [int(row[m.bool()][0]) for row, m in zip(ids, mask, strict=True)]
    assert all((t == tok.bos_token_id) == starts_with_bos for t in first)


def test_long_prompts_are_cut_from_the_left_keeping_bos() -> None:
    from moe_lora.data.collate import left_truncate

    assert left_truncate([0, 1, 2, 3, 4, 5], 4, bos=0) == [0, 3, 4, 5]
    assert left_truncate([1, 2, 3, 4, 5], 3, bos=None) == [3, 4, 5]
    assert left_truncate([1, 2], 4, bos=0) == [1, 2]
