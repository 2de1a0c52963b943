"""Per-example scores, computed in batches on the model's device: teacher-forced exact match,
generated exact match, response loss, the log-probabilities of answer choices.

Teacher-forced exact match (the built-in world) takes one forward pass: greedy decoding reproduces
the gold answer iff every gold answer token and the end token are the model's top prediction. That
equals greedy generation plus matching there because world answers are single lower-case words or
exact symbol strings and the word-level tokenizer has no stop string inside a token (a test checks
it on a trained model). Everything else generates (``eval/generate.py``) and matches with the set's
lm-eval rules (``eval/normalize.py``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.modeling_outputs import BaseModelOutput

from moe_lora.data.collate import IGNORE, Lengths, collate, decoder_inputs
from moe_lora.data.example import Example
from moe_lora.eval.generate import eval_mode, greedy_generate
from moe_lora.eval.normalize import MATCHERS
from moe_lora.model.structure import is_encoder_decoder as is_seq2seq


def batches(examples: Sequence[Example], size: int) -> Iterator[Sequence[Example]]:
    for i in range(0, len(examples), size):
        yield examples[i : i + size]


def answers(ex: Example) -> list[str]:
    """Every accepted answer: the training target first, then its aliases."""
    return [ex.answer, *ex.aliases]


def aligned_logits(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, labels) of a right-padded batch on the model's device, in eval mode, position t of
    the logits predicting label t: a causal LM's shifted by one, an encoder-decoder's decoder fed
    the labels shifted right."""
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    with eval_mode(model):
        if is_seq2seq(model):
            return model(
                input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs(model.config, labels)
            ).logits, labels
        return model(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]


class TeacherForced(NamedTuple):
    """Per example: exact match, candidate choice correct (None without single-token candidates),
    and the decoded arg-max tokens at the answer positions (equal to the greedy output whenever
    ``em`` is true; after a first wrong token it is no longer what greedy decoding would write, so
    evaluation generates the wrong examples' predictions: ``eval/kinds/exact_match.py``)."""

    em: list[bool]
    candidate: list[bool | None]
    prediction: list[str]


@torch.no_grad()
def teacher_forced(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: Lengths = 64,
    batch_size: int = 128,
    chat_template: bool = False,
) -> TeacherForced:
    """One forward pass per batch gives exact match, the candidate choice and a prediction.

    The candidate choice picks the most likely of ``example.candidates`` at the answer's first
    position (single-token candidates); it separates lost knowledge from a lost answer format.
    """
    out = TeacherForced([], [], [])
    for chunk in batches(examples, batch_size):
        logits, target = aligned_logits(model, collate(chunk, tok, max_length, chat_template=chat_template))
        logits, target = logits.float().cpu(), target.cpu()
        pred = logits.argmax(-1)
        answer = target != IGNORE
        out.em.extend(((pred == target) | ~answer).all(-1).tolist())
        first = answer.int().argmax(-1)  # position predicting the first answer token
        for i, ex in enumerate(chunk):
            out.candidate.append(_candidate_correct(logits[i, first[i]], ex, tok))
            out.prediction.append(tok.decode(pred[i][answer[i]].tolist(), skip_special_tokens=True).strip())
    return out


def _candidate_correct(logits: torch.Tensor, ex: Example, tok: PreTrainedTokenizerBase) -> bool | None:
    if not ex.candidates:
        return None
    ids = [tok(" " + c, add_special_tokens=False)["input_ids"] for c in ex.candidates]
    if any(len(i) != 1 for i in ids):
        return None  # multi-token candidates would need one forward pass each
    scores = logits[[i[0] for i in ids]]
    return ex.candidates[int(scores.argmax())] == ex.answer


def generated_em(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    *,
    match: str,
    stop: tuple[str, ...],
    max_new_tokens: int,
    batch_size: int,
    chat_template: bool = False,
    progress: bool = False,
    max_source: int | None = None,
) -> tuple[list[str], list[bool]]:
    """(prediction, correct) per example: greedy generation cut at ``stop``, then ``MATCHERS[match]``
    against the answer and its aliases (the best match, as lm-eval scores multiple targets)."""
    preds = greedy_generate(
        model,
        tok,
        [e.prompt for e in examples],
        max_new_tokens=max_new_tokens,
        stop=stop,
        batch_size=batch_size,
        chat_template=chat_template,
        progress=progress,
        max_source=max_source,
    )
    matcher = MATCHERS[match]
    return preds, [matcher(p, answers(e)) for p, e in zip(preds, examples, strict=True)]


@torch.no_grad()
def response_loss(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: Lengths,
    batch_size: int,
    chat_template: bool = False,
) -> float | None:
    """Mean cross-entropy per response token (answer + EOS) over the whole set, so long responses
    weigh by their length as in training; None for an empty set."""
    total, count = response_loss_sums(model, tok, examples, max_length, batch_size, chat_template)
    return total / count if count else None


def answer_logprobs(model: PreTrainedModel, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-probability of every answer token of a collated batch (flattened, float32) and the
    batch row of each. Only answer positions get a log-softmax: B x T x V in float32 would not fit
    at paper scale."""
    with torch.no_grad():
        return label_logprobs(*aligned_logits(model, batch))


def label_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the labelled positions of aligned logits (float32), and their rows."""
    scored = labels != IGNORE
    logp = -F.cross_entropy(logits[scored].float(), labels[scored], reduction="none")
    return logp, scored.nonzero()[:, 0]


def response_loss_sums(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: Lengths,
    batch_size: int,
    chat_template: bool = False,
) -> tuple[float, int]:
    """(summed cross-entropy, response tokens): shards of a set add up."""
    total, count = 0.0, 0
    for chunk in batches(examples, batch_size):
        logp, _ = answer_logprobs(model, collate(chunk, tok, max_length, chat_template=chat_template))
        total, count = total - float(logp.sum()), count + logp.numel()
    return total, count


def choice_logprobs(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    examples: Sequence[Example],
    max_length: Lengths,
    batch_size: int,
    chat_template: bool = False,
    normalize: bool = False,
) -> list[list[float]]:
    """Per example, per choice: the summed log-probability of the choice's tokens plus EOS after
    the prompt (lm-eval's loglikelihood of a continuation; the tokens as training sees an answer,
    :func:`~moe_lora.data.collate.answer_ids`), divided by their count with ``normalize``. Every
    (example, choice) pair is one row of at most ``batch_size``; a causal LM reads the prompt once
    per choice, an encoder-decoder encodes it once per example (T0's way) and decodes each choice."""
    pairs = [replace(e, answer=c) for e in examples for c in e.choices]
    owner = [i for i, e in enumerate(examples) for _ in e.choices]
    scores: list[float] = []
    for start in range(0, len(pairs), batch_size):
        chunk, rows_of = pairs[start : start + batch_size], owner[start : start + batch_size]
        batch = collate(chunk, tok, max_length, chat_template=chat_template)
        if is_seq2seq(model):
            logp, rows = _seq2seq_answer_logprobs(model, batch, rows_of)
        else:
            logp, rows = answer_logprobs(model, batch)
        sums = torch.zeros(len(chunk), device=logp.device).index_add_(0, rows, logp)
        if normalize:
            sums = sums / torch.bincount(rows, minlength=len(chunk)).clamp_min(1)
        scores += sums.tolist()
    out, i = [], 0
    for e in examples:
        out.append(scores[i : i + len(e.choices)])
        i += len(e.choices)
    return out


@torch.no_grad()
def _seq2seq_answer_logprobs(
    model: PreTrainedModel, batch: dict[str, torch.Tensor], owners: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`answer_logprobs` of an encoder-decoder whose rows repeat sources: each distinct source
    (consecutive rows of one ``owners`` entry) is encoded once and its states reused for every choice."""
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    own = torch.as_tensor(owners, device=device)
    first = torch.cat([own.new_ones(1, dtype=torch.bool), own[1:] != own[:-1]])  # one row per source
    expand = torch.cumsum(first.long(), 0) - 1  # pair row -> its source's encoded row
    with eval_mode(model):
        hidden = model.get_encoder()(input_ids=ids[first], attention_mask=mask[first]).last_hidden_state
        logits = model(
            encoder_outputs=BaseModelOutput(last_hidden_state=hidden[expand]),
            attention_mask=mask,
            decoder_input_ids=decoder_inputs(model.config, labels),
        ).logits
    return label_logprobs(logits, labels)
