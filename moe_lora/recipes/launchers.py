"""Hydra's submitit launchers, requeueing a preempted or timed-out job with ``resume=auto``.

submitit calls ``checkpoint()`` when SLURM signals the time limit (after moe_lora's loop wrote a
checkpoint, see :mod:`moe_lora.train.preempt`); the stock launcher resubmits the same overrides, so
the requeued job would meet a directory with checkpoints and no ``resume``. Here it continues.
"""

from __future__ import annotations

from typing import Any

from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher


def resume_overrides(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith("resume=")] + ["resume=auto"]


class RequeueSlurmLauncher(SlurmLauncher):
    """``hydra/launcher=slurm``."""

    def checkpoint(self, sweep_overrides: list[str], *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, resume_overrides(list(sweep_overrides)), *args, **kwargs)
