"""Data: examples, real sources (TriviaQA, Alpaca, P3 ... in their own schemas), prompt templates and
collation. The built-in world's data is in ``moe_lora.world``."""
