"""``python -m moe_lora.checks.hold STEP train ...``: ``moe-lora train`` that stops still right after
writing ``checkpoints/step-<STEP>``, until it is killed.

The GPU check SIGKILLs a training subprocess once a checkpoint exists. A 7B step takes long enough
for the kill to land mid-run; a tiny CPU run could finish between two looks at the folder, so
``--tiny`` starts the run through this wrapper, which makes the moment of the kill certain without
changing anything the run computes or writes.
"""

from __future__ import annotations

import os
import sys
import time

from moe_lora.cli import main as cli_main
from moe_lora.env import set_environment
from moe_lora.train import checkpoint

HOLD_S = 600  # longer than any check waits; the parent kills well before


def hold_after(step: int) -> None:
    """Wrap the runner's checkpoint writer: after ``step-<step>`` is in place, sleep until killed."""
    original = checkpoint.save

    def save(run_dir, n, *args, **kwargs):
        path = original(run_dir, n, *args, **kwargs)
        if n == step:
            print(f"hold: {path} written; pid {os.getpid()} waits to be killed", flush=True)
            time.sleep(HOLD_S)
        return path

    checkpoint.save = save


def main(argv: list[str]) -> int:
    set_environment()
    hold_after(int(argv[0]))
    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
