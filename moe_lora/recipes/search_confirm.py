"""`moe-lora search-confirm SWEEP_DIR --top N`: the second fidelity of a layout search.

The sweeper has no pruner, so a search screens many layouts cheaply (few steps, one seed) and this
command turns its best trials into a preset that reruns them beside the named shapes, uniform and
any ``--with`` layouts (the probe heuristics) at full steps and several seeds, with claims the
report judges by its paired rule: each top trial beats every other layout (one intersection-union
family per trial), each ``--with`` layout beats uniform. It writes one layout YAML per top trial
(``conf/layout/<study>_top<i>.yaml``: its slope, curvature and budget) and the preset
(``conf/experiment/<study>_confirm.yaml``, or ``--preset NAME``); ``--conf-dir`` writes them elsewhere (then pass
``hydra.searchpath=[file://<dir>]``). Trials are ranked by the study's objective as results.json
holds it (``recipe.objective``, or the first of ``recipe.objectives``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from moe_lora import outputs
from moe_lora.errors import ConfigError
from moe_lora.recipes.job import objective_value
from moe_lora.report.search import is_trial

NAMED = ("triangle", "inverted_triangle", "hourglass", "rectangle", "diamond")


def top_trials(sweep: Path, top: int) -> tuple[list[dict[str, Any]], str]:
    """The ``top`` finished trials by their objective (best first) and the objective's path."""
    trials = [json.loads(p.read_text()) for p in sorted(sweep.glob(f"*/{outputs.RESULTS}"))]
    trials = [t for t in trials if is_trial(str((t.get("config") or {}).get("layout", {}).get("name")))]
    if not trials:
        raise ConfigError(f"{sweep}: no finished trials of layout=searched* (a layout_search sweep folder)")
    recipe = trials[0]["config"]["recipe"]
    objective = (recipe.get("objectives") or [recipe.get("objective") or "metrics.instruction_em"])[0]
    scored = [(v, t) for t in trials if (v := objective_value(t, objective)) is not None]
    scored.sort(key=lambda vt: -vt[0])
    return [t for _, t in scored[:top]], objective


def layout_yaml(name: str, layout: dict[str, Any], provenance: str) -> str:
    budget = layout.get("budget") or {}
    lines = [provenance, "defaults:", "  - /schema/layout/base@_here_", "  - _self_", f"name: {name}"]
    if layout.get("weights"):  # a trial of the free per-group space (experiment=layout_search_free)
        lines.append(f"weights: [{', '.join(f'{w:.6g}' for w in layout['weights'])}]")
    else:
        lines += [f"slope: {layout.get('slope') or 0.0}", f"curvature: {layout.get('curvature') or 0.0}"]
    lines.append("budget:")
    lines += [f"  {k}: {v}" for k, v in budget.items() if v is not None] or ["  {}"]
    lines += [f"granularity: {layout.get('granularity', 'group')}", f"groups: {layout.get('groups', 4)}"]
    return "\n".join(lines) + "\n"


def _label(layout: str) -> str:
    return "mola" if layout == "uniform" else f"mola/{layout}"


def preset_yaml(
    study: str,
    names: list[str],
    seeds: int,
    steps: int,
    objective: str,
    num_experts: int,
    extra: list[str],
    preset: str | None = None,
) -> str:
    """The confirmation preset: top trials, the named shapes, uniform and ``extra`` layouts (e.g. the
    probe heuristics); each trial claimed to beat every other layout (one family per trial), each
    extra layout to beat uniform."""
    preset = preset or f"{study}_confirm"
    metric = objective if objective.startswith(("metrics.", "routing.")) else "metrics.instruction_em"
    others = [*NAMED, "uniform", *extra]
    claims = [
        f"  - {{name: {n}_beats_{o}, metric: {metric}, arm: {_label(n)}, than: {_label(o)}, "
        f"differs_in: [layout], family: {n}_beats_every_layout}}"
        for n in names
        for o in others
    ]
    claims += [
        f"  - {{name: {e}_beats_uniform, metric: {metric}, arm: {_label(e)}, than: mola, differs_in: [layout]}}"
        for e in extra
    ]
    return (
        "\n".join(
            [
                "# @package _global_",
                f"# Written by `moe-lora search-confirm`: the top trials of study {study!r} beside the named shapes,",
                f"# {steps} steps x {seeds} seeds, each trial claimed to beat every other layout (one family per trial).",
                f"# Run: moe-lora train -m experiment={preset} && moe-lora report multirun/{preset}",
                "defaults:",
                "  - override /adapter: mola",
                "adapter:",
                f"  num_experts: {num_experts}",
                "recipe:",
                f"  max_steps: {steps}",
                "claims:",
                *claims,
                "hydra:",
                "  sweep:",
                f"    dir: multirun/{preset}/${{now:%Y-%m-%d_%H-%M-%S}}_${{moe_lora.uid:}}",
                "    subdir: ${hydra.job.num}_${layout.name}_seed${seed}",
                "  sweeper:",
                "    params:",
                f"      layout: {','.join([*names, *others])}",
                f"      seed: {','.join(map(str, range(seeds)))}",
            ]
        )
        + "\n"
    )


def _write(path: Path, text: str, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} exists; pass --overwrite to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="moe-lora search-confirm", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", type=Path, help="a layout_search sweep folder (multirun/layout_search/study)")
    p.add_argument("--top", type=int, default=2)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--study", default=None, help="name of the files (default: the sweep folder's parent)")
    p.add_argument(
        "--with",
        dest="extra",
        default="",
        help="more layouts to compare (comma-separated), e.g. the "
        "layout-from-probe heuristics; each is also claimed to beat uniform",
    )
    p.add_argument("--preset", default=None, help="the preset's name (default <study>_confirm)")
    p.add_argument("--conf-dir", type=Path, default=Path(__file__).resolve().parents[2] / "conf")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    trials, objective = top_trials(a.sweep, a.top)
    study = a.study or a.sweep.resolve().parent.name
    names = [f"{study}_top{i + 1}" for i in range(len(trials))]
    for name, trial in zip(names, trials, strict=True):
        provenance = (
            f"# Trial of {a.sweep} ranked by {objective} = {objective_value(trial, objective):.4f}, written by "
            "`moe-lora search-confirm`"
        )
        _write(
            a.conf_dir / "layout" / f"{name}.yaml",
            layout_yaml(name, trial["config"]["layout"], provenance),
            a.overwrite,
        )
    experts = trials[0]["config"]["adapter"].get("num_experts", 5)
    preset = a.preset or f"{study}_confirm"
    extra = [x for x in a.extra.split(",") if x]
    _write(
        a.conf_dir / "experiment" / f"{preset}.yaml",
        preset_yaml(study, names, a.seeds, a.steps, objective, experts, extra, preset),
        a.overwrite,
    )
    for name, trial in zip(names, trials, strict=True):
        print(
            f"{name}: {objective} {objective_value(trial, objective):.4f}, experts per layer "
            f"{(trial.get('budget') or {}).get('experts_per_layer')}"
        )
    print(f"written: {a.conf_dir / 'experiment' / f'{preset}.yaml'} (moe-lora train -m experiment={preset})")
    return 0
