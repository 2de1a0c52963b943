"""Acceptance checks that drive the CLI end to end (the GPU check and its stages); they sit above
``moe_lora.cli``, and nothing in the package imports them."""
