"""One module a variant: each registers itself and its config schema on import (see
``moe_lora.adapters``)."""
