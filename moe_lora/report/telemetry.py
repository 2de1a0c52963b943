"""Per-layer router statistics from ``routing.jsonl`` rows (the recorder's windows): what
``moe-lora layout-from-probe`` allocates by and what the layout report draws under its heatmap.

With q a module's expert-importance share over the final logging window (all tokens), averaged over
the layer's adapted linears:

- ``usage``: exp(H(q)), the usage perplexity: how many experts the layer really spreads over;
- ``mi``: H(q) - mean_t H(p_t), the router's mutual information between tokens and experts (how
  much the choice depends on the token);
- ``entropy``: mean_t H(p_t), the mean per-token routing entropy.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict

ROUTER_RULES = ("usage", "mi", "entropy")
_LAYER = re.compile(r"\.(\d+)\.")


def _entropy(q: list[float]) -> float:
    total = sum(q)
    return -sum(x / total * math.log(x / total) for x in q if x > 0) if total > 0 else 0.0


def statistic(row: dict, rule: str) -> float:
    """One module's statistic from its routing row."""
    h_q = _entropy(row["importance"])
    if rule == "usage":
        return math.exp(h_q)
    if rule == "mi":
        return max(0.0, h_q - row["entropy"])
    return row["entropy"]


def usable_rows(rows: list[dict]) -> list[dict]:
    """The all-token rows that carry expert importance (routed adapters)."""
    return [r for r in rows if r.get("task_type") == "all" and r.get("importance")]


def layer_indices(modules) -> dict[str, int]:
    """Module -> layer index over all stacks, as injection counts them: one stack's own index for a
    causal LM; an encoder-decoder's encoder layers first, then its decoder's (``encoder.block.1``
    is 1, ``decoder.block.1`` is ``encoder layers + 1``). Modules outside the layers are left out."""
    found = {}
    for module in modules:
        m = _LAYER.search(module)
        if m:
            found[module] = (module[: m.start()], int(m.group(1)))
    order = sorted({s for s, _ in found.values()}, key=lambda s: (not s.startswith("encoder"), s))
    offsets, total = {}, 0
    for stack in order:
        offsets[stack] = total
        total += 1 + max(i for s, i in found.values() if s == stack)
    return {module: offsets[s] + i for module, (s, i) in found.items()}


def layer_statistics(rows: list[dict], rule: str) -> dict[int, float]:
    """Layer index -> the rule's statistic, mean over the layer's modules, final window, all tokens
    ({} without usable rows)."""
    rows = usable_rows(rows)
    if not rows:
        return {}
    last = max(r["step"] for r in rows)
    per_layer: dict[int, list[float]] = defaultdict(list)
    index = layer_indices({r["module"] for r in rows})
    for r in rows:
        if r["step"] == last and r["module"] in index:
            per_layer[index[r["module"]]].append(statistic(r, rule))
    return {layer: sum(v) / len(v) for layer, v in sorted(per_layer.items())}
