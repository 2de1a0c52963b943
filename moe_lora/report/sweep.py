"""What a set of runs varies in (variants, layouts, seeds, training steps, models): the report
writes the sections that fit. A LoRA-against-LoRAMoE sweep is not a layout study, so it gets no
Pareto front of two points both called ``uniform``; a single run gets its curves, not a comparison.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from moe_lora import outputs
from moe_lora.report.collect import Run
from moe_lora.report.search import is_trial

STEPS = "recipe.max_steps"


@dataclass(frozen=True)
class Varies:
    runs: int  # finished runs
    variants: bool  # adapters or labels
    layouts: bool  # layout names or settings, or a layout search's trials
    seeds: bool
    steps: bool  # recipe.max_steps
    models: bool

    def names(self) -> list[str]:
        """The dimensions that vary, in the report's words."""
        return [n for n in ("variants", "layouts", "seeds", "steps", "models") if getattr(self, n)]


def config_value(run: Run, dotted: str) -> object:
    """A dotted key of the run's stored config (None when absent)."""
    value: object = (run.results or {}).get("config") or {}
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def model_of(run: Run) -> str:
    """The run's model: its config's ``model.name``, else results.json's ``model``."""
    return str(config_value(run, "model.name") or (run.results or {}).get("model") or "?")


def _layout(run: Run) -> str:
    """The run's layout name with its settings (a custom list, a budget), comparable as text."""
    settings = outputs.flatten(config_value(run, "layout") or {})
    return json.dumps([str((run.results or {}).get("layout")), settings], sort_keys=True, default=str)


def what_varies(runs: list[Run]) -> Varies:
    """Which dimensions take two or more values over the finished runs."""
    done = [r for r in runs if r.results is not None]

    def several(key) -> bool:
        return len({key(r) for r in done}) > 1

    return Varies(
        runs=len(done),
        variants=several(lambda r: (r.results.get("adapter"), config_value(r, "label"))),
        layouts=several(_layout) or any(is_trial(str(r.results.get("layout"))) for r in done),
        seeds=several(lambda r: r.results.get("seed")),
        steps=several(lambda r: config_value(r, STEPS)),
        models=several(model_of),
    )


def summary(v: Varies) -> str:
    """One line for the top of the report: what the runs compare."""
    if v.runs <= 1:
        return "One run: its scores, loss curves and routing."
    varied = v.names()
    if not varied:
        return f"{v.runs} runs of one setting (same variant, layout, seed, steps and model)."
    return f"{v.runs} runs that vary in: {', '.join(varied)}."
