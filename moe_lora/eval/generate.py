"""Batched greedy generation with the KV cache, stopped and cut at stop strings like lm-eval.

lm-eval's ``HFLM.generate_until`` generates greedily, stops a row once its decoded continuation
holds a stop string (``until``) or EOS, decodes without special tokens and cuts the text at the
first occurrence of each stop string in turn. :func:`greedy_generate` does the same on left-padded
batches sorted by prompt length (less padding), so CBQA exact match can be compared with the
harness's numbers; prompts start with BOS where the model family expects one (``prompt_ids``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    StoppingCriteria,
    StoppingCriteriaList,
)

from moe_lora.data.collate import left_truncate, pad_id, prompt_ids, source_ids
from moe_lora.model.structure import is_encoder_decoder


@contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Dropout off while scoring, and the caller's mode back afterwards (evaluation runs between
    training phases)."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` before the first occurrence of each stop string, applied in order (lm-eval's
    ``postprocess_generated_text``; empty stop strings are ignored as there)."""
    for term in stop:
        if term:
            text = text.split(term)[0]
    return text


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its decoded new tokens contain a stop string.

    EOS is handled by ``generate`` itself. Decoding the whole continuation each step costs little
    next to the forward pass at CBQA lengths, and unlike token-level matching it sees stop strings
    that straddle tokens or hide inside one (" Paris." is often one token)."""

    def __init__(self, tok: PreTrainedTokenizerBase, stop: Sequence[str], prompt_width: int) -> None:
        self.tok, self.stop, self.prompt_width = tok, [s for s in stop if s], prompt_width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        texts = self.tok.batch_decode(input_ids[:, self.prompt_width :], skip_special_tokens=True)
        done = [any(s in t for s in self.stop) for t in texts]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def eos_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a sequence: the tokenizer's EOS plus the model's generation config ones
    (Llama 3 lists two)."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    return list(dict.fromkeys([*([tok.eos_token_id] if tok.eos_token_id is not None else []), *ids]))


def left_pad(rows: Sequence[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) with every row right-aligned, as decoder-only generation needs."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def _seq2seq_cache(seq2seq: bool) -> dict:
    """An empty cache made here for encoder-decoders: the one ``generate`` builds from the config
    sizes the decoder's self-attention cache by the *encoder's* layer count (transformers 5.24), so
    a T5 with more decoder than encoder layers fails with an IndexError."""
    if not seq2seq:
        return {}

    return {"cache": EncoderDecoderCache(DynamicCache(), DynamicCache())}


def _right_padded(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A left-padded batch moved to the right (padding after each row's tokens)."""
    order = torch.argsort(1 - mask, dim=1, stable=True)  # real positions first, in their order
    return ids.gather(1, order), mask.gather(1, order)


def _continuation(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """New tokens up to (without) the first EOS: rows that finished early are padded afterwards."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i]
    return tokens


def context_limit(model: PreTrainedModel, max_new_tokens: int) -> int | None:
    """Prompt tokens that fit beside ``max_new_tokens`` in the model's positions (None: no limit)."""
    positions = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    return max(1, positions - max_new_tokens) if positions else None


@torch.no_grad()
def greedy_generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    stop: tuple[str, ...],
    batch_size: int,
    chat_template: bool = False,
    progress: bool = False,
    max_source: int | None = None,
) -> list[str]:
    """Greedy continuations of ``prompts``, each cut at its first stop string, in input order.

    An encoder-decoder reads each prompt as its source (prompt tokens + EOS, cut to ``max_source``
    as in training, right-padded) and writes the answer from the decoder start token.

    Decoding is pure arg-max whatever a model card's ``generation_config.json`` says: transformers
    fills every field we leave unset from it (Qwen2.5 ships ``do_sample`` and a repetition
    penalty), so the fields that change greedy output are set explicitly.
    """
    device = next(model.parameters()).device
    eos = eos_ids(model, tok)
    seq2seq = is_encoder_decoder(model)
    if seq2seq:
        encoded = [source_ids(tok, p, max_source, chat_template) for p in prompts]
    else:
        limit = context_limit(model, max_new_tokens)
        encoded = [left_truncate(prompt_ids(tok, p, chat_template), limit, tok.bos_token_id) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first, like lm-eval
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        use_cache=True,
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        pad_token_id=pad_id(tok),
        eos_token_id=eos,
    )
    out: list[str] = [""] * len(prompts)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    with eval_mode(model):
        for batch in tqdm(batches, desc="generate", disable=not progress, leave=False):
            ids, mask = left_pad([encoded[i] for i in batch], pad_id(tok), device)
            if seq2seq:  # the encoder reads right-padded sources; the output starts at the decoder start
                ids, mask = _right_padded(ids, mask)
            width = 1 if seq2seq else ids.shape[1]
            gen = model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                stopping_criteria=StoppingCriteriaList([StopOnStrings(tok, stop, width)]),
                **_seq2seq_cache(seq2seq),
            )
            for i, row in zip(batch, gen[:, width:].tolist(), strict=True):
                out[i] = cut_at_stop(tok.decode(_continuation(row, set(eos)), skip_special_tokens=True), stop)
    return out
