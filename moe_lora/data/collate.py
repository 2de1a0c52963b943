"""Tokenisation of prompt/answer examples and right-padded batching."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from moe_lora.config import TASK_TYPES
from moe_lora.data.example import Example
from moe_lora.outputs import atomic_dir

IGNORE = -100  # the label of positions without loss (prompt, padding), as transformers
# How examples become tokens: an int is a causal LM's total length (prompt + answer in one
# sequence); a (max_source, max_target) pair is an encoder-decoder's source and target lengths.
Lengths = int | tuple[int, int]


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


def _context(tok: PreTrainedTokenizerBase, prompt: str, chat_template: bool) -> tuple[str, list[int], int | None]:
    """The prompt as the model sees it, its tokens without special tokens, and the BOS to put in
    front (where the tokenizer adds one; a chat template writes its own)."""
    text = format_prompt(tok, prompt, chat_template)
    bos = tok.bos_token_id if adds_bos(tok) and not chat_template else None
    return text, tok(text, add_special_tokens=False)["input_ids"], bos


def prompt_ids(tok: PreTrainedTokenizerBase, prompt: str, chat_template: bool = False) -> list[int]:
    """Token ids of a prompt at the start of a sequence: BOS where the tokenizer adds one, then the
    prompt without any appended special token."""
    _, ids, bos = _context(tok, prompt, chat_template)
    return ids if bos is None else [bos, *ids]


@dataclass(frozen=True)
class Encoded:
    """One example's tokens: ``ids[start:]`` is the answer (+ EOS unless the answer was cut)."""

    ids: list[int]
    start: int
    truncated: bool  # anything was cut (prompt from the left, or the answer from the right)
    answer_cut: bool  # the answer alone did not fit


def answer_ids(
    tok: PreTrainedTokenizerBase, context: str, ctx: list[int], answer: str, chat_template: bool
) -> list[int]:
    """Answer tokens + EOS. A space joins prompt and answer unless the boundary already has
    whitespace or a chat template ends the prompt (lm-eval's ``target_delimiter`` rule): ``Answer:``
    + `` Paris``, but Alpaca's ``### Response:\n`` + ``Eat well``.

    The answer's tokens are those of ``prompt + answer`` after the prompt's own tokens (lm-eval's
    ``_encode_pair``): a SentencePiece tokenizer (Llama-2, Mistral) tokenises a lone `` Paris`` as
    ``▁ ▁Paris``, a token pair it never sees after ``Answer:``. Only where the joint tokens do not
    start with the prompt's (a merge across the boundary) is the answer tokenised on its own.
    ``context`` and ``ctx`` are the prompt's text and tokens from :func:`_context`."""
    joined = chat_template or not answer or context[-1:].isspace() or answer[:1].isspace()
    text = answer if joined else " " + answer
    whole = tok(context + text, add_special_tokens=False)["input_ids"]
    ids = whole[len(ctx) :] if whole[: len(ctx)] == ctx else tok(text, add_special_tokens=False)["input_ids"]
    return [*ids, tok.eos_token_id]


def left_truncate(ids: list[int], limit: int | None, bos: int | None) -> list[int]:
    """Cut a prompt from the left to ``limit`` tokens (lm-eval's rule), keeping a leading BOS (the
    model never saw a sequence without one). Training batches and generation share it."""
    if limit is None or len(ids) <= limit:
        return ids
    head = ids[:1] if bos is not None and ids[:1] == [bos] else []
    return head + ids[len(ids) - (limit - len(head)) :]


def fit(prompt: list[int], answer: list[int], max_length: int, bos: int | None) -> Encoded:
    """Cut to ``max_length``: the prompt from the left keeping a leading BOS, the whole answer when
    it fits beside BOS or one prompt token; otherwise the answer from the right."""
    if len(prompt) + len(answer) <= max_length:
        return Encoded(prompt + answer, len(prompt), False, False)
    has_bos = bos is not None and prompt[:1] == [bos]
    prompt = left_truncate(prompt, max(max_length - len(answer), 1), bos if has_bos else None)
    cut = len(prompt) + len(answer) > max_length
    return Encoded(prompt + answer[: max_length - len(prompt)], len(prompt), True, cut)


def encode_seq2seq(
    tok: PreTrainedTokenizerBase, prompt: str, answer: str, lengths: tuple[int, int], chat_template: bool = False
) -> Encoded:
    """An encoder-decoder's example: source = prompt tokens + EOS, target = answer tokens + EOS,
    each cut from the right to its length with EOS kept last (seqio's trim with EOS appended, as
    T5X feeds T0's mixture). ``ids`` is source then target, ``start`` where the target begins; the
    answer is tokenised on its own (the decoder never sees the prompt's text)."""
    max_source, max_target = lengths
    src = tok(format_prompt(tok, prompt, chat_template), add_special_tokens=False)["input_ids"]
    tgt = tok(answer, add_special_tokens=False)["input_ids"]
    source, target = _with_eos(src, max_source, tok.eos_token_id), _with_eos(tgt, max_target, tok.eos_token_id)
    cut = len(tgt) >= max_target
    return Encoded(source + target, len(source), cut or len(src) >= max_source, cut)


def _with_eos(ids: list[int], limit: int | None, eos: int) -> list[int]:
    """``ids`` cut from the right to ``limit`` tokens with EOS last (seqio's trim, EOS appended)."""
    return [*(ids if limit is None else ids[: limit - 1]), eos]


def source_ids(
    tok: PreTrainedTokenizerBase, prompt: str, max_source: int | None, chat_template: bool = False
) -> list[int]:
    """An encoder-decoder's source for generation: the prompt as :func:`encode_seq2seq` encodes it."""
    ids = tok(format_prompt(tok, prompt, chat_template), add_special_tokens=False)["input_ids"]
    return _with_eos(ids, max_source, tok.eos_token_id)


def encode_example(
    tok: PreTrainedTokenizerBase, prompt: str, answer: str, max_length: Lengths, chat_template: bool = False
) -> Encoded:
    """The one encoding rule of training, response loss and ``encode_examples``: the prompt's
    tokens (with BOS) and the answer's tokens in the context of the prompt (:func:`answer_ids`), so
    the answer boundary is exact for any tokenizer. A (source, target) ``max_length`` encodes for
    an encoder-decoder (:func:`encode_seq2seq`)."""
    if isinstance(max_length, tuple):
        return encode_seq2seq(tok, prompt, answer, max_length, chat_template)
    context, ctx, bos = _context(tok, prompt, chat_template)  # the prompt is tokenised once
    prompt_tokens = ctx if bos is None else [bos, *ctx]
    return fit(prompt_tokens, answer_ids(tok, context, ctx, answer, chat_template), max_length, bos)


def encode(ex: Example, tok: PreTrainedTokenizerBase, max_length: Lengths) -> tuple[list[int], int]:
    """Token ids of ``prompt answer <eos>`` and the index where the answer starts."""
    enc = encode_example(tok, ex.prompt, ex.answer, max_length)
    return enc.ids, enc.start


def pad_id(tok: PreTrainedTokenizerBase) -> int:
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def _right_pad(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.as_tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return ids, mask


def decoder_inputs(config, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's inputs: labels shifted right behind ``decoder_start_token_id``, -100 -> pad
    (what T5's ``_shift_right`` and BART's ``shift_tokens_right`` compute)."""
    start = config.decoder_start_token_id
    if start is None:
        raise ValueError(f"{config.model_type} has no decoder_start_token_id: its decoder inputs are unknown")
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == IGNORE, config.pad_token_id or 0)


def pad_seq2seq(
    encoded: Sequence[tuple[list[int], int]], task_types: Sequence[int], pad: int
) -> dict[str, torch.Tensor]:
    """Right-padded sources (``input_ids`` / ``attention_mask``) and targets (``labels``, -100 past
    each end; the model shifts them right into decoder inputs, so there is no causal shift here)."""
    input_ids, mask = _right_pad([ids[:start] for ids, start in encoded], pad)
    targets, target_mask = _right_pad([ids[start:] for ids, start in encoded], pad)
    labels = targets.masked_fill(target_mask == 0, IGNORE)
    task = torch.as_tensor(list(task_types), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "task_type": task}


def pad_batch(
    encoded: Sequence[tuple[list[int], int]],
    task_types: Sequence[int],
    pad: int,
    train_on_prompt: bool = False,
    seq2seq: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask``, ``labels`` from each answer start on
    (``seq2seq``: :func:`pad_seq2seq`)."""
    if seq2seq:
        return pad_seq2seq(encoded, task_types, pad)
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    labels = torch.full_like(input_ids, IGNORE)
    mask = torch.zeros_like(input_ids)
    for i, (ids, start) in enumerate(encoded):
        input_ids[i, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        mask[i, : len(ids)] = 1
        first = 0 if train_on_prompt else start
        labels[i, first : len(ids)] = input_ids[i, first : len(ids)]
    task = torch.as_tensor(list(task_types), dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels, "task_type": task}


def collate(
    examples: Sequence[Example],
    tok: PreTrainedTokenizerBase,
    max_length: Lengths,
    train_on_prompt: bool = False,
    chat_template: bool = False,
) -> dict[str, torch.Tensor]:
    """Right-padded batch with ``labels`` on answer tokens only and a ``task_type`` id per example."""
    encoded = [encode_example(tok, e.prompt, e.answer, max_length, chat_template) for e in examples]
    return pad_batch(
        [(e.ids, e.start) for e in encoded],
        [TASK_TYPES.index(e.task_type) for e in examples],
        pad_id(tok),
        train_on_prompt,
        seq2seq=isinstance(max_length, tuple),
    )


def collate_text(texts: Sequence[str], tok: PreTrainedTokenizerBase, max_length: int) -> dict[str, torch.Tensor]:
    """Right-padded language-modelling batch over whole documents (pretraining)."""
    ids = [[*tok(t, add_special_tokens=False)["input_ids"][: max_length - 1], tok.eos_token_id] for t in texts]
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = 1
    labels = input_ids.masked_fill(mask == 0, IGNORE)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def collate_prefix_lm(
    texts: Sequence[str], tok: PreTrainedTokenizerBase, max_length: int, rng
) -> dict[str, torch.Tensor]:
    """An encoder-decoder's pretraining batch: T5's LM-adapt objective (prefix language modelling),
    each document split at a random word into source and target; a QA line ``... A : answer`` is
    split after ``A :``, so the question is always the source (as the Llama sees it before its answer)."""
    pairs = []
    for text in texts:
        words = text.split()
        if " A : " in text:
            k = words.index("A", words.index("?")) + 2 if "?" in words else len(words) - 1
        else:
            k = rng.randint(1, max(1, len(words) - 1))
        enc = encode_seq2seq(tok, " ".join(words[:k]), " ".join(words[k:]), (max_length, max_length))
        pairs.append((enc.ids, enc.start))
    batch = pad_seq2seq(pairs, [0] * len(pairs), pad_id(tok))
    batch.pop("task_type")
    return batch


# ------------------------------------------------------------------------------ whole sets, cached
@dataclass
class EncodedSet:
    """Encoded examples as flat tensors, so that a training step's batch is a few slices, not a
    ``datasets`` lookup. ``truncated`` counts every example that was cut (reported in results),
    ``answer_cut`` those whose answer itself was cut."""

    flat: torch.Tensor  # every example's ids, concatenated
    offsets: torch.Tensor  # example i is flat[offsets[i]:offsets[i + 1]]
    starts: torch.Tensor  # answer start within each example
    task_type: torch.Tensor
    pad: int
    truncated: int
    answer_cut: int
    seq2seq: bool = False  # ids are source then target (``starts``: where the target begins)

    def __len__(self) -> int:
        return len(self.starts)

    def batch(self, indices: Sequence[int], train_on_prompt: bool = False) -> dict[str, torch.Tensor]:
        """Exactly what :func:`collate` returns for the same examples."""
        encoded = [(self.flat[self.offsets[i] : self.offsets[i + 1]], int(self.starts[i])) for i in indices]
        return pad_batch(encoded, self.task_type[list(indices)].tolist(), self.pad, train_on_prompt, self.seq2seq)


def tokenizer_key(tok: PreTrainedTokenizerBase) -> str:
    """A content hash of the tokenizer (vocabulary, merges, special tokens, chat template)."""
    backend = getattr(tok, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))
    extra = json.dumps(
        [type(tok).__name__, tok.bos_token_id, tok.eos_token_id, adds_bos(tok), getattr(tok, "chat_template", None)],
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()


def encode_examples(
    examples: Sequence[Example],
    tok: PreTrainedTokenizerBase,
    max_length: Lengths,
    *,
    chat_template: bool = False,
    num_proc: int | None = None,
    cache_dir: str | None = None,
) -> EncodedSet:
    """Tokenise a whole set with ``datasets.map`` (``num_proc`` workers). With ``cache_dir`` the result
    is cached in an Arrow file keyed by the tokenizer, the examples, ``max_length`` and
    ``chat_template``, so a rerun or another variant of a sweep skips tokenisation."""
    import datasets

    rows = [{"prompt": e.prompt, "answer": e.answer, "task_type": TASK_TYPES.index(e.task_type)} for e in examples]
    digest = hashlib.sha256(json.dumps([tokenizer_key(tok), max_length, chat_template, rows]).encode()).hexdigest()
    path = Path(cache_dir) / f"encoded-{digest[:32]}" if cache_dir else None

    def fn(row: dict) -> dict:
        enc = encode_example(tok, row["prompt"], row["answer"], max_length, chat_template)
        return {"ids": enc.ids, "start": enc.start, "truncated": enc.truncated, "answer_cut": enc.answer_cut}

    if path is not None and path.exists():
        return _to_set(datasets.load_from_disk(str(path)), pad_id(tok), isinstance(max_length, tuple))
    source = (
        datasets.Dataset.from_list(rows)
        if rows
        else datasets.Dataset.from_dict({"prompt": [], "answer": [], "task_type": []})
    )
    ds = source.map(
        fn,
        num_proc=num_proc if num_proc and num_proc > 1 and len(rows) > 1 else None,
        desc="tokenising",
        remove_columns=["prompt", "answer"],
    )
    if path is not None:  # one folder whatever num_proc was; another job of a sweep may write it first
        with atomic_dir(path, keep_existing=True) as tmp:
            ds.save_to_disk(str(tmp))
    return _to_set(ds, pad_id(tok), isinstance(max_length, tuple))


def _to_set(ds, pad: int, seq2seq: bool = False) -> EncodedSet:
    """Arrow columns -> flat tensors without a Python list per token."""
    if len(ds) == 0:
        empty = torch.zeros(0, dtype=torch.long)
        return EncodedSet(empty, torch.zeros(1, dtype=torch.long), empty, empty, pad, 0, 0, seq2seq)
    table = ds.with_format("arrow")[:]
    ids = table.column("ids").combine_chunks()
    offsets = np.asarray(ids.offsets, dtype=np.int64)

    def col(name: str) -> torch.Tensor:
        return torch.from_numpy(np.array(table.column(name).to_numpy(), dtype=np.int64))

    return EncodedSet(
        torch.from_numpy(np.array(ids.flatten(), dtype=np.int64)),
        torch.from_numpy(offsets - offsets[0]),
        col("start"),
        col("task_type"),
        pad,
        truncated=int(col("truncated").sum()),
        answer_cut=int(col("answer_cut").sum()),
        seq2seq=seq2seq,
    )
