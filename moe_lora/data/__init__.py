"""Data: examples, real sources (TriviaQA, Alpaca, P3 ... in their own schemas), prompt templates and
collation, and the registry of data kinds (``kinds.py``: what a run trains and evaluates on, each
with its checks and builder). The built-in world's data, and its kinds, are in ``moe_lora.world``."""
