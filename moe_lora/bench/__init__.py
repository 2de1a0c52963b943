"""Benchmarks: the loop reference the research code uses, and `moe-lora bench`."""
