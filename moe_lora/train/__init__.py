"""Training as a library: the loop, checkpoints, distributed setup, precision, the schedule, the loss
and preemption. It never imports a recipe (``moe_lora.recipes`` drives it)."""
