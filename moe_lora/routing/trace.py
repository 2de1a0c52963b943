"""Per-token routes of a generation (``moe-lora generate --routes``): which experts each generated
token chose in each layer, as a text table and a heatmap (tokens x experts per layer).

While tracing, every router reports to a :class:`RouteTrace` instead of the recorder. A generated
token's route is read where the token was decided: at the last position of the forward that
predicted it (the last prompt position for the first token, then the previous token's position),
so every generated token has a route without an extra forward. A layer's route is the mean router
probability over its adapted modules (per-head routers, MoV's, averaged over heads first); its
choice is the top-k of that mean (k: the routers' top-k, 1 under soft routing).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from moe_lora.routing.router import Router

_LAYER = re.compile(r"\.(\d+)\.")


def layer_of(module: str) -> str:
    """``L<i>`` from the first layer index in a module path (``model.layers.3.mlp.up_proj``)."""
    found = _LAYER.search(f".{module}.")
    return f"L{found.group(1)}" if found else "other"


@dataclass
class Step:
    token: int  # the greedy token this forward decided
    probs: dict[str, torch.Tensor] = field(default_factory=dict)  # module -> (E,) at the last position


class RouteTrace:
    """A routing sink (``router.RoutingSink``) that keeps each router's probabilities at the last
    position of every forward."""

    active = True

    def __init__(self, routers: dict[str, Router]) -> None:
        self.routers = routers
        self.steps: list[Step] = []
        self._pending: dict[str, torch.Tensor] = {}

    def record(self, router: Router, logits: torch.Tensor, probs: torch.Tensor, selected: torch.Tensor | None) -> None:
        p = probs.detach()[0, -1].float()  # batch of one: ([H,] E + null) at the last position
        while p.dim() > 1:
            p = p.mean(0)
        self._pending[router.module_name] = p[: router.num_experts].cpu()

    def end_forward(self, module: nn.Module, args: tuple, output) -> None:
        logits = output.logits if hasattr(output, "logits") else output[0]
        self.steps.append(Step(int(logits[0, -1].argmax()), self._pending))
        self._pending = {}


@contextmanager
def tracing(model: nn.Module) -> Iterator[RouteTrace]:
    """Routers of ``model`` report to a fresh trace inside the block (their recorder is put back)."""
    routers = {m.module_name or n: m for n, m in model.named_modules() if isinstance(m, Router)}
    trace = RouteTrace(routers)
    saved = {name: r.recorder for name, r in routers.items()}
    handle = model.register_forward_hook(trace.end_forward)
    try:
        for r in routers.values():
            r.recorder = trace
        yield trace
    finally:
        handle.remove()
        for name, r in routers.items():
            r.recorder = saved[name]


@dataclass
class Routes:
    layers: list[str]
    probs: torch.Tensor  # (tokens, sum of the layers' experts)
    widths: list[int]  # experts per layer
    top_k: list[int]  # choices per layer


def layer_routes(trace: RouteTrace, steps: list[Step]) -> Routes:
    """Each layer's modules averaged, layers side by side in model order."""
    layers: dict[str, list[str]] = {}
    for name in trace.routers:
        layers.setdefault(layer_of(name), []).append(name)
    blocks, widths, top_k = [], [], []
    for names in layers.values():
        first = trace.routers[names[0]]
        names = [n for n in names if trace.routers[n].num_experts == first.num_experts]
        blocks.append(torch.stack([torch.stack([s.probs[n] for n in names]).mean(0) for s in steps]))
        widths.append(first.num_experts)
        top_k.append(min(first.top_k or 1, first.num_experts))
    return Routes(list(layers), torch.cat(blocks, dim=1), widths, top_k)


def routes_table(tok, trace: RouteTrace, steps: list[Step]) -> str:
    """One row per generated token: per layer, its top-k experts by mean router probability."""
    if not steps or not trace.routers:
        return "(no routed tokens)"
    routes = layer_routes(trace, steps)
    tokens = [repr(tok.decode([s.token])) for s in steps]
    first = max(5, *(len(t) for t in tokens))
    cells = []
    for row in routes.probs:
        parts = []
        for block, k in zip(row.split(routes.widths), routes.top_k, strict=True):
            parts.append(",".join(str(i) for i in block.topk(k).indices.tolist()))
        cells.append(parts)
    col = max(4, *(len(c) for row in cells for c in row))
    head = f"{'token':<{first}}  " + "  ".join(f"{layer:>{col}}" for layer in routes.layers)
    return "\n".join(
        [head]
        + [f"{t:<{first}}  " + "  ".join(f"{c:>{col}}" for c in row) for t, row in zip(tokens, cells, strict=True)]
    )


def routes_heatmap(tok, trace: RouteTrace, steps: list[Step], path: Path, title: str = "") -> Path | None:
    """A PNG of the mean router probabilities: generated tokens (rows) x experts, layer by layer."""
    if not steps or not trace.routers:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    routes = layer_routes(trace, steps)
    n_tokens, n_cols = routes.probs.shape
    fig, ax = plt.subplots(figsize=(min(24.0, 2 + 0.3 * n_cols), min(24.0, 1.5 + 0.3 * n_tokens)))
    im = ax.imshow(routes.probs.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    edges = torch.tensor([0, *routes.widths]).cumsum(0).tolist()
    for edge in edges[1:-1]:
        ax.axvline(edge - 0.5, color="white", linewidth=1)
    ax.set_xticks(range(n_cols), [str(e) for w in routes.widths for e in range(w)], fontsize=6)
    top = ax.secondary_xaxis("top")
    top.set_xticks([(a + b - 1) / 2 for a, b in itertools.pairwise(edges)], routes.layers)
    ax.set_yticks(range(n_tokens), [repr(tok.decode([s.token])) for s in steps], fontsize=7)
    ax.set_xlabel("expert, per layer (mean router probability over the layer's adapted modules)")
    ax.set_ylabel("generated token")
    if title:
        fig.suptitle(title[:80], fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
