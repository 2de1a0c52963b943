"""GPU proof in one command: the bench, an expert sweep, a 7B-shaped training run killed and
resumed, and FSDP, on a CUDA machine with no internet (``--tiny``: the same on a CPU in seconds).

    python scripts/gpu_check.py                 # -> outputs/gpu_check/<time>/gpu_check.{json,md}
    python scripts/gpu_check.py --tiny --out /tmp/check

The logic is in moe_lora/checks/gpu_check.py; exits non-zero if any stage failed.
"""

from __future__ import annotations

import sys

from moe_lora.env import set_environment

if __name__ == "__main__":
    set_environment()  # offline, before transformers is imported
    from moe_lora.checks.gpu_check import main
    from moe_lora.errors import ConfigError, fail

    try:
        sys.exit(main(sys.argv[1:]))
    except ConfigError as exc:
        sys.exit(fail(str(exc)))
