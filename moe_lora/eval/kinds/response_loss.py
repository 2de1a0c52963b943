"""``response_loss``: mean cross-entropy per response token over a whole set (held-out instruction
data of real sources). Shards add their sums; it writes no prediction records (there is none)."""

from __future__ import annotations

from moe_lora.data.example import EvalSet, Example
from moe_lora.eval.kinds.base import Column, MetricKind, Scoring, SetScore, register_column, register_kind
from moe_lora.eval.metrics import response_loss_sums


def score(s: Scoring, eval_set: EvalSet, examples: list[Example]) -> SetScore:
    sums = response_loss_sums(s.model, s.tok, s.mine(examples), s.max_length, s.eval_cfg.batch_size, s.chat_template)
    total, count = map(sum, zip(*(s.shard.gather(sums) if s.shard else [sums]), strict=True))
    return SetScore({"response_loss": total / count if count else None})


register_kind(MetricKind("response_loss", score, ("response_loss",)))
register_column(
    Column("response_loss", "response loss", "response_loss", by="response_loss_by_source", higher_is_better=False)
)
