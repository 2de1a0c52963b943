"""`moe-lora layout-from-probe RUN_DIR --rule usage|mi|entropy|alpha`: a layout from a short uniform
probe run's router telemetry, a baseline no LoRA-MoE paper sets: experts go where the routers use
them; or, training-free, from the spectra of the run's base weights (AlphaLoRA).

Per layer, the statistics of ``report/telemetry.py`` (usage perplexity, router mutual information,
mean routing entropy) from the final logging window of ``routing.jsonl``, or:

- ``alpha``: AlphaLoRA's PL_Alpha_Hill (Qing et al. 2024): per weight matrix W of the layer (every
  adaptable linear, not only the adapted ones), the Hill estimate of the power-law exponent of the
  eigenvalues of W^T W with xmin at the median eigenvalue, alpha = 1 + m / sum_i ln(lambda_i /
  lambda_xmin) over the m eigenvalues from the median up; mean over the layer's matrices. A heavier
  tail (smaller alpha) marks a better-trained layer, so larger alpha gets more experts, as in
  AlphaLoRA. Only the base model is read (the run folder names it; its routing is not used), in
  float32 on the CPU: seconds for the tiny model, tens of minutes for a 7B one.

Weights stat^beta (``--beta``, 2.5 by default) are projected exactly onto the budget
(``layouts.project``; default: the probe's own total) and written as a layout YAML whose header
records the provenance.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from moe_lora import outputs
from moe_lora.errors import ConfigError
from moe_lora.model.layouts import project
from moe_lora.model.structure import read_structure
from moe_lora.recipes.compose import compose, to_config
from moe_lora.recipes.runner import load_base
from moe_lora.report.telemetry import ROUTER_RULES, layer_statistics
from moe_lora.tracking import read_jsonl
from moe_lora.world.generator import World

RULES = (*ROUTER_RULES, "alpha")


def router_statistics(run_dir: Path, rule: str) -> dict[int, float]:
    """Layer index -> the rule's statistic from the run's routing telemetry."""
    path = run_dir / outputs.ROUTING
    stats = layer_statistics(read_jsonl(path), rule)
    if not stats:
        raise ConfigError(
            f"{path}: no routing rows with expert importance (probe with a routed adapter, e.g. adapter=mola)"
        )
    return stats


def pl_alpha_hill(weight: torch.Tensor) -> float:
    """The Hill estimate of the tail exponent of W^T W's eigenvalues, xmin at the median (see above)."""
    eigs = torch.linalg.svdvals(weight.detach().float().cpu()).square().sort().values
    tail = eigs[len(eigs) // 2 :].clamp_min(torch.finfo(torch.float32).tiny)
    logs = (tail / tail[0]).log().sum().item()
    return 1.0 + len(tail) / logs if logs > 0 else float("inf")


def alpha_statistics(run_dir: Path) -> dict[int, float]:
    """Layer index -> mean PL_Alpha_Hill of its adaptable linears' weights, for the run's base model."""
    path = run_dir / outputs.CONFIG
    if not path.exists():
        raise ConfigError(f"{run_dir} has no {outputs.CONFIG}: not a moe-lora run folder")
    saved = OmegaConf.load(path)
    cfg = to_config(OmegaConf.merge(compose([f"adapter={saved.adapter.name}"]), saved))
    world = World(cfg.data.world) if cfg.model.source == "world" else None
    model, _ = load_base(cfg, world, progress=False)
    structure = read_structure(model, cfg.model.modules)
    modules = dict(model.named_modules())
    return {
        layer: sum(pl_alpha_hill(modules[info.name].weight) for info in infos) / len(infos)
        for layer in range(structure.num_layers)
        if (infos := structure.in_layer(layer))
    }


def probe_layout(run_dir: Path, rule: str, beta: float, total: int | None, lo: int | None, hi: int | None):
    """(experts per layer, per-layer statistics, the budget used)."""
    results_path = run_dir / outputs.RESULTS
    if not results_path.exists():
        raise ConfigError(f"{run_dir} has no {outputs.RESULTS}: not a finished moe-lora run")
    results = json.loads(results_path.read_text())
    stats = alpha_statistics(run_dir) if rule == "alpha" else router_statistics(run_dir, rule)
    adapter = results.get("adapter_config") or {}
    probe = (results.get("budget") or {}).get("experts_per_layer") or [adapter.get("num_experts", 1)] * len(stats)
    if len(probe) != len(stats):
        raise ConfigError(f"{run_dir}: routing rows cover {len(stats)} layers but the run has {len(probe)}")
    lo = lo or max(1, (adapter.get("top_k") or 1) - (adapter.get("num_null_experts") or 0))
    total = total or sum(probe)
    weights = [max(s, 0.0) ** beta for s in stats.values()]
    return project(weights, total, lo, hi or total, key="--budget"), stats, total


def write_layout(path: Path, name: str, experts: list[int], header: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ConfigError(f"--out {path} exists; pass --overwrite to replace it, or choose another file")
    body = (
        f"defaults:\n  - /schema/layout/base@_here_\n  - _self_\nname: {name}\n"
        f"experts: [{', '.join(map(str, experts))}]\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + body)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moe-lora layout-from-probe", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", type=Path, help="a finished probe run (a routed adapter, uniform layout)")
    p.add_argument("--rule", choices=RULES, default="usage")
    p.add_argument("--beta", type=float, default=2.5, help="weights are stat^beta (sharper with larger beta)")
    p.add_argument("--budget", type=int, default=None, help="experts over all layers (default: the probe's)")
    p.add_argument("--min", dest="lo", type=int, default=None, help="experts per layer at least (default top_k)")
    p.add_argument("--max", dest="hi", type=int, default=None, help="experts per layer at most")
    p.add_argument("--name", default=None, help="layout name (default probe_<rule>)")
    p.add_argument("--out", type=Path, default=None, help="YAML to write (default conf/layout/<name>.yaml)")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    name = a.name or f"probe_{a.rule}"
    experts, stats, total = probe_layout(a.run_dir, a.rule, a.beta, a.budget, a.lo, a.hi)
    out = a.out or Path(__file__).resolve().parents[2] / "conf" / "layout" / f"{name}.yaml"
    header = (
        f"# Written by `moe-lora layout-from-probe {a.run_dir} --rule {a.rule} --beta {a.beta:g}`:\n"
        f"# per-layer {a.rule} of the probe's {'base weights' if a.rule == 'alpha' else 'routers'} "
        f"{', '.join(f'{v:.3f}' for v in stats.values())},\n"
        f"# weights stat^{a.beta:g} projected onto {total} experts.\n"
    )
    write_layout(out, name, experts, header, a.overwrite)
    print(f"{a.rule} per layer: {', '.join(f'{v:.3f}' for v in stats.values())}")
    print(f"experts per layer: {experts} (total {sum(experts)})")
    print(f"written: {out} (use it with layout={name})")
    return 0
