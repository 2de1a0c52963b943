"""The built-in world: its generator, word tokenizer, the two fine-tuning mixtures over it (world
and world_t0), the tiny base model pretrained on its text, and that model's cache."""
