"""Data: the built-in world, tokenisation, the fine-tuning mixture and collation."""
