"""One encoding rule for training batches and ``encode_examples``: BOS first, loss on answer + EOS
only, truncation from the left that keeps BOS and the answer, every cut counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lora.data.collate import IGNORE, collate, encode_example, encode_examples
from moe_lora.data.example import Example
from tests.fixtures.checkpoints import train_tokenizer

SHORT = [
    Example("Question: What is the capital of France??\nAnswer:", "Paris", "cbqa", "triviaqa"),
    Example("### Instruction:\nName a fruit.\n\n### Response:\n", "An apple.", "instruction", "alpaca"),
    Example("Q: which river flows through london?\nA:", "the thames", "cbqa", "nq_open"),
]


@pytest.fixture(scope="module")
def llama():
    return train_tokenizer("llama")


@pytest.fixture(scope="module")
def qwen():
    return train_tokenizer("qwen2")


def labelled(batch: dict[str, torch.Tensor], row: int) -> list[int]:
    return batch["labels"][row][batch["labels"][row] != IGNORE].tolist()


def test_bos_first_and_labels_exactly_on_answer_and_eos(llama) -> None:
    enc = encode_examples(SHORT, llama, max_length=256)
    batch = enc.batch([0, 1, 2])
    assert len(enc) == 3 and enc.truncated == 0
    assert batch["task_type"].tolist() == [0, 1, 0]
    for i, ex in enumerate(SHORT):
        assert batch["input_ids"][i, 0] == llama.bos_token_id
        joined = ex.answer if ex.prompt.endswith("\n") else " " + ex.answer  # no space after Alpaca's newline
        context = llama(ex.prompt)["input_ids"]  # lm-eval's rule: the answer's tokens in context
        answer = [*llama(ex.prompt + joined)["input_ids"][len(context) :], llama.eos_token_id]
        assert labelled(batch, i) == answer
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(answer) : n].tolist() == answer  # labels sit on those positions
        assert (batch["labels"][i, : n - len(answer)] == IGNORE).all()
    assert all(torch.equal(batch[k], collate(SHORT, llama, 256)[k]) for k in batch)  # one encoding rule


def test_truncation_keeps_bos_and_answer_and_is_counted(llama) -> None:
    long = Example("Question: " + "the quick brown fox " * 40 + "?\nAnswer:", "Paris", "cbqa", "triviaqa")
    enc = encode_examples([long, SHORT[0]], llama, max_length=32)  # SHORT[0] is 28 tokens with EOS
    batch = enc.batch([0])
    answer = [*llama("Answer: Paris", add_special_tokens=False)["input_ids"][2:], llama.eos_token_id]
    assert batch["input_ids"].shape[1] == 32 and batch["input_ids"][0, 0] == llama.bos_token_id
    assert labelled(batch, 0) == answer and batch["input_ids"][0, -len(answer) :].tolist() == answer
    assert (enc.truncated, enc.answer_cut) == (1, 0)
    tiny = encode_examples([Example("Q:", "word " * 30, "instruction", "x")], llama, max_length=10)
    cut = tiny.batch([0])
    assert (tiny.truncated, tiny.answer_cut) == (1, 1) and cut["input_ids"].shape[1] == 10
    assert cut["input_ids"][0, 0] == llama.bos_token_id and len(labelled(cut, 0)) == 9  # all but BOS


def test_chat_template_wraps_the_prompt_without_extra_bos_or_space(qwen) -> None:
    enc = encode_examples(SHORT[:1], qwen, max_length=256, chat_template=True)
    batch = enc.batch([0])
    text = qwen.decode(batch["input_ids"][0])
    assert text.startswith("<|im_start|>user\nQuestion: What is the capital of France??")
    assert text.endswith("<|im_start|>assistant\nParis<|endoftext|>")
    assert qwen.decode(labelled(batch, 0)) == "Paris<|endoftext|>"


def test_encoded_sets_are_cached_and_parallel_safe(llama, tmp_path: Path, monkeypatch) -> None:
    many = SHORT * 4
    first = encode_examples(many, llama, 64, cache_dir=str(tmp_path), num_proc=2)
    assert [p.name for p in tmp_path.iterdir()] == [f.name for f in tmp_path.glob("encoded-*")]  # no temp left
    assert len(list(tmp_path.glob("encoded-*"))) == 1  # one entry whatever num_proc was
    import datasets

    loads = []
    real = datasets.load_from_disk
    monkeypatch.setattr(datasets, "load_from_disk", lambda p: loads.append(p) or real(p))
    again = encode_examples(many, llama, 64, cache_dir=str(tmp_path))
    assert len(loads) == 1  # the second call read the cache
    parallel = encode_examples(many, llama, 64, num_proc=2)
    other = encode_examples(many, llama, 32, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("encoded-*"))) == 2  # max_length is part of the key
    idx = list(range(len(many)))
    for enc in (again, parallel):
        assert all(torch.equal(first.batch(idx)[k], enc.batch(idx)[k]) for k in ("input_ids", "labels"))
    assert other.batch(idx)["input_ids"].shape[1] <= 32


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
@pytest.mark.parametrize(
    ("prompt", "answer", "sep"),
    [
        ("Question: Who wrote the novel about the white whale?\nAnswer:", "Herman Melville", " "),
        ("### Instruction:\nGive three tips.\n\n### Response:\n", "Eat well, sleep, move.", ""),
    ],
)
def test_answer_tokens_are_those_of_the_joined_text(family, prompt, answer, sep) -> None:
    """lm-eval's _encode_pair: the answer is tokenised in the context of the prompt. With Llama-2's
    SentencePiece-style tokenizer a lone ' Herman' would start with a spurious '▁' token."""
    tok = train_tokenizer(family)
    enc = encode_example(tok, prompt, answer, 256)
    joined = tok(prompt + sep + answer, add_special_tokens=True)["input_ids"]
    assert enc.ids == [*joined, tok.eos_token_id] and not enc.truncated
    assert tok.decode(enc.ids[enc.start : -1]).strip() == answer
