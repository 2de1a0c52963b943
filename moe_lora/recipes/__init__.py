"""Recipes: everything that orchestrates a run or a command, and the only package that imports
across the library below it (composition and validation, the launch and the job, the fine-tuning
recipe, results writing, re-evaluation, params, probe, search-confirm, the Hydra plugin glue, and
using a trained run: load, generate, export)."""
