"""Per-example correctness, computed in batches.

For the built-in world's word-level tokenizer, exact match is computed in one teacher-forced
forward pass: greedy decoding reproduces the gold answer iff every gold answer token and the end
token are the model's top prediction. That equals greedy decoding plus normalisation there because
answers are single lower-case words or exact symbol strings (a test checks it on a trained model).
Hub tokenizers use real greedy generation and lm-eval normalisation with the best match over
aliases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_lora.data.collate import IGNORE, collate
from moe_lora.data.example import Example
from moe_lora.eval.normalize import exact_match


def _batches(examples: Sequence[Example], size: int):
    for i in range(0, len(examples), size):
        yield examples[i: i + size]


@torch.no_grad()
def teacher_forced(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
    max_length: int = 64, batch_size: int = 128,
) -> tuple[list[bool], list[bool | None]]:
    """(exact match, candidate choice correct) per example from one forward pass per batch.

    The candidate choice picks the most likely of ``example.candidates`` at the answer's first
    position (single-token candidates); it separates lost knowledge from a lost answer format.
    """
    model.eval()
    device = next(model.parameters()).device
    em: list[bool] = []
    cand: list[bool | None] = []
    for chunk in _batches(examples, batch_size):
        batch = collate(chunk, tok, max_length)
        logits = model(input_ids=batch["input_ids"].to(device),
                       attention_mask=batch["attention_mask"].to(device)).logits.float().cpu()
        pred, target = logits[:, :-1].argmax(-1), batch["labels"][:, 1:]
        em += ((pred == target) | (target == IGNORE)).all(-1).tolist()
        first = (target != IGNORE).int().argmax(-1)  # position predicting the first answer token
        for i, ex in enumerate(chunk):
            cand.append(_candidate_correct(logits[i, first[i]], ex, tok))
    return em, cand


def _candidate_correct(logits: torch.Tensor, ex: Example, tok: PreTrainedTokenizerBase) -> bool | None:
    if not ex.candidates:
        return None
    ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in ex.candidates]
    if any(len(i) != 1 for i in ids):
        return None  # multi-token candidates would need one forward pass each
    scores = logits[[i[0] for i in ids]]
    return ex.candidates[int(scores.argmax())] == ex.answer


@torch.no_grad()
def greedy_em(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, examples: Sequence[Example],
    max_new_tokens: int = 16, batch_size: int = 32, exact: bool = False,
) -> list[bool]:
    """Greedy generation, cut at the end token and the first newline, then lm-eval normalisation
    and the best match over answer + aliases (``exact=True``: no normalisation, for instructions)."""
    model.eval()
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"
    out: list[bool] = []
    try:
        for chunk in _batches(examples, batch_size):
            enc = tok([e.prompt for e in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            gen = model.generate(
                **{k: v.to(device) for k, v in enc.items()}, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
            )
            texts = tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            for text, e in zip(texts, chunk, strict=False):
                text = text.split("\n")[0].strip()
                out.append(text in (e.answer, *e.aliases) if exact else exact_match(text, [e.answer, *e.aliases]))
    finally:
        tok.padding_side = side
    return out
