"""Evaluation: CBQA exact match (lm-eval normalisation), candidate accuracy, instruction accuracy."""
