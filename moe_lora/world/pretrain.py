"""Pretraining of the tiny world model on biographies + trained people's QA (cached by hash)."""

from __future__ import annotations

import random

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from moe_lora.config import PretrainConfig
from moe_lora.data.collate import collate_prefix_lm, collate_text
from moe_lora.model.structure import is_encoder_decoder
from moe_lora.train.schedule import adamw_with_schedule


def pretrain(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    corpus: list[str],
    cfg: PretrainConfig,
    seed: int,
    progress: bool = True,
) -> list[float]:
    """Plain causal-LM training over shuffled documents (an encoder-decoder: prefix LM, T5's
    LM-adapt objective); returns the loss per step."""
    seq2seq = is_encoder_decoder(model)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    opt, sched = adamw_with_schedule(
        list(model.parameters()), cfg.lr, cfg.weight_decay, "cosine", cfg.warmup_steps, cfg.steps
    )
    model.train()
    order: list[int] = []
    losses = []
    bar = tqdm(range(cfg.steps), desc="pretrain world model", disable=not progress, mininterval=1.0)
    for _ in bar:
        if len(order) < cfg.batch_size:
            fresh = list(range(len(corpus)))
            rng.shuffle(fresh)
            order += fresh
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        texts = [corpus[i] for i in idx]
        batch = collate_prefix_lm(texts, tok, 128, rng) if seq2seq else collate_text(texts, tok, max_length=128)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    model.eval()
    return losses
