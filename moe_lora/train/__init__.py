"""Training: the plain fine-tuning loop and the built-in world's pretraining."""
