"""The training loss of a batch, for causal LMs and encoder-decoders alike (the loop, validation).

A causal LM predicts token t+1 at position t (labels shifted inside the model); an encoder-decoder
reads its source in the encoder and predicts the target with the decoder fed the target shifted
right (``decoder_start_token_id`` first), so labels and logits line up without a shift.

``token`` normalisation divides the summed cross-entropy by the label tokens (of the global batch
under data parallelism: ``num_items``), so every token weighs the same; ``sequence`` averages each
sequence's mean over the sequences (``num_sequences`` of the global batch): T5X's per-sequence
loss, which the MoV paper trains with. A causal LM under ``token`` keeps transformers' own loss
(bitwise what earlier runs computed).

:func:`loss_sums` gives the same loss as a (sum, count) pair, so the loss of many batches (the
validation loss, over ranks too) is one division at the end: per label token under ``token``, per
sequence under ``sequence``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_lora.data.collate import IGNORE, decoder_inputs


def label_count(labels: torch.Tensor, seq2seq: bool) -> torch.Tensor:
    """Tokens with a loss: every label of an encoder-decoder, all but each row's first of a causal LM."""
    return ((labels if seq2seq else labels[:, 1:]) != IGNORE).sum()


def normalized_ce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    normalization: str,
    num_items: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """Cross-entropy of aligned logits (B, T, V) and labels (B, T), in float32."""
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    ce = ce.view(labels.shape)
    scored = labels != IGNORE
    if normalization == "token":
        return ce.sum() / (num_items if num_items is not None else scored.sum()).clamp_min(1)
    per_sequence = ce.sum(-1) / scored.sum(-1).clamp_min(1)
    return per_sequence.sum() / (num_sequences or labels.shape[0])


def batch_loss(
    net: nn.Module,
    config,
    batch: dict[str, torch.Tensor],
    *,
    seq2seq: bool,
    normalization: str = "token",
    num_items: torch.Tensor | None = None,
    num_sequences: int | None = None,
) -> torch.Tensor:
    """The batch's training loss through ``net`` (the model, or its DDP / FSDP / compiled wrapper);
    ``config``: the model's transformers config (decoder start and pad ids)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    if not seq2seq and normalization == "token":
        kwargs = {} if num_items is None else {"num_items_in_batch": num_items}
        return net(input_ids=ids, attention_mask=mask, labels=labels, **kwargs).loss
    if seq2seq:
        logits = net(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_inputs(config, labels)).logits
    else:
        logits, labels = net(input_ids=ids, attention_mask=mask).logits[:, :-1], labels[:, 1:]
    return normalized_ce(logits, labels, normalization, num_items, num_sequences)


def loss_sums(
    net: nn.Module, config, batch: dict[str, torch.Tensor], *, seq2seq: bool, normalization: str = "token"
) -> torch.Tensor:
    """``[summed loss, count]`` of a batch in float32: summed cross-entropy and label tokens
    (``token``), or summed per-sequence means and sequences (``sequence``); sum / count is
    :func:`batch_loss` of the batch, and of any number of batches whose pairs are added."""
    labels = batch["labels"]
    total = batch_loss(
        net, config, batch, seq2seq=seq2seq, normalization=normalization, num_items=labels.new_ones(()), num_sequences=1
    )
    count = label_count(labels, seq2seq) if normalization == "token" else labels.new_tensor(labels.shape[0])
    return torch.stack([total.float(), count.float()])
