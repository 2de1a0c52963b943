"""A word-level tokenizer for the built-in world, built locally (no download)."""

from __future__ import annotations

from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import PreTrainedTokenizerFast


def word_tokenizer(vocab: list[str]) -> PreTrainedTokenizerFast:
    """One token per whitespace-separated word; ``<pad>``, ``<eos>``, ``<unk>`` come first."""
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.padding_side = "right"
    return fast
