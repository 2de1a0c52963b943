"""``python -m moe_lora COMMAND ...``: the console script, for launchers that run a module
(``torchrun --nproc-per-node N -m moe_lora train ...``)."""

import sys

from moe_lora.cli import main

sys.exit(main())
