"""Tokenisation of prompt/answer examples and right-padded batching."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from moe_lora.config import TASK_TYPES
from moe_lora.data.example import Example

IGNORE = -100


def adds_bos(tok: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer starts a sequence with BOS by default (Llama: yes; GPT-2, Qwen2: no).

    Prompts are tokenised without special tokens (so nothing is appended at the end) and BOS is
    put in front by hand where the model family expects it."""
    cached = getattr(tok, "_moe_lora_adds_bos", None)
    if cached is None:
        bos = tok.bos_token_id
        cached = bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [bos]
        tok._moe_lora_adds_bos = cached
    return cached


def format_prompt(tok: PreTrainedTokenizerBase, prompt: str, chat_template: bool = False) -> str:
    """The prompt as the model sees it: raw, or wrapped in the tokenizer's chat template (one user
    turn plus the generation prompt)."""
    if not chat_template:
        return prompt
    return tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt at the start of a sequence: BOS where the tokenizer adds one (a chat
    template writes its own), then the prompt without any appended special token."""
    ids = tok(format_prompt(tok, prompt, chat_template), add_special_tokens=False)["input_ids"]
    return [tok.bos_token_id, *ids] if adds_bos(tok) and not chat_template else ids


def encode(ex: Example, tok: PreTrainedTokenizerBase, max_length: int) -> tuple[list[int], int]:
    """Token ids of ``prompt answer <eos>`` and the index where the answer starts.

    Prompt and answer are tokenised separately (answer with a leading space) so that the answer
    boundary is exact for any tokenizer; the prompt is cut from the left if the pair is too long.
    """
    prompt = prompt_ids(tok, ex.prompt)
    answer = tok(" " + ex.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = prompt[-max(1, max_length - len(answer)):]
    return prompt + answer, len(prompt)


def collate(
    examples: Sequence[Example], tok: PreTrainedTokenizerBase, max_length: int, train_on_prompt: bool = False
) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``labels`` on answer tokens only and a ``task_type`` id per example."""
    encoded = [encode(e, tok, max_length) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    mask = torch.zeros_like(input_ids)
    for i, (ids, start) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
        first = 0 if train_on_prompt else start
        labels[i, first: len(ids)] = input_ids[i, first: len(ids)]
    task = torch.tensor([TASK_TYPES.index(e.task_type) for e in examples], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "task_type": task}


def collate_text(texts: Sequence[str], tok: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded language-modelling batch over whole documents (pretraining)."""
    ids = [[*tok(t, add_special_tokens=False)["input_ids"][:max_length - 1], tok.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
