"""One encoding rule for training batches and ``encode_examples``: BOS first, loss on answer + EOS
only, truncation from the left that keeps BOS and the answer, every cut counted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moe_lora.data.collate import IGNORE, collate, encode_examples
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
        answer = llama(joined, add_special_tokens=False)["input_ids"] + [llama.eos_token_id]
        assert labelled(batch, i) == answer
        n = int(batch["attention_mask"][i].sum())
        assert batch["input_ids"][i, n - len(answer): n].tolist() == answer  # labels sit on those positions
        assert (batch["labels"][i, : n - len(answer)] == IGNORE).all()
    assert all(torch.equal(batch[k], collate(SHORT, llama, 256)[k]) for k in batch)  # one encoding rule


def test_truncation_keeps_bos_and_answer_and_is_counted(llama) -> None:
    long = Example("Question: " + "the quick brown fox " * 40 + "?\nAnswer:", "Paris", "cbqa", "triviaqa")
    enc = encode_examples([long, SHORT[0]], llama, max_length=32)  # SHORT[0] is 28 tokens with EOS
    batch = enc.batch([0])
    answer = llama(" Paris", add_special_tokens=False)["input_ids"] + [llama.eos_token_id]
    assert batch["input_ids"].shape[1] == 32 and batch["input_ids"][0, 0] == llama.bos_token_id
    assert labelled(batch, 0) == answer and batch["input_ids"][0, -len(answer):].tolist() == answer
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


def test_encoded_sets_are_cached_and_parallel_safe(llama, tmp_path: Path) -> None:
    many = SHORT * 4
    first = encode_examples(many, llama, 64, cache_dir=str(tmp_path))
    files = list(tmp_path.glob("encoded-*.arrow"))
    assert len(files) == 1
    again = encode_examples(many, llama, 64, cache_dir=str(tmp_path))
    parallel = encode_examples(many, llama, 64, num_proc=2)
    other = encode_examples(many, llama, 32, cache_dir=str(tmp_path))
    assert len(list(tmp_path.glob("encoded-*.arrow"))) == 2  # max_length is part of the key
    idx = list(range(len(many)))
    for enc in (again, parallel):
        assert all(torch.equal(first.batch(idx)[k], enc.batch(idx)[k]) for k in ("input_ids", "labels"))
    assert other.batch(idx)["input_ids"].shape[1] <= 32
