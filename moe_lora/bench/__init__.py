"""Benchmarks: the loop reference the research code uses, `moe-lora bench` and its expert sweep."""
