"""Claims as code: each preset states its paper's claims in ``claims:`` (``config.ClaimConfig``),
every results.json carries them, and this module judges them from results files only.

One rule for every claim (:data:`RULE`, printed under the table): runs of the two arms are paired
by seed (same init and data order), the per-seed differences are oriented so that positive favours
the claimed arm, and the 95% interval of their mean (t distribution, or a percentile bootstrap) is
set against the margin. A verdict is never a judgement call made in prose after the fact.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moe_lora import outputs
from moe_lora.report.collect import Run

RULE = (
    "Rule: runs of `arm` and `than` are paired by seed (only seeds both have count); "
    "d = arm - than per seed, sign flipped when lower is better, so d > 0 favours `arm`. "
    "The 95% interval of mean(d) is a t interval (n - 1 degrees of freedom; a percentile bootstrap "
    "with --bootstrap N). The threshold is +margin for superiority and -margin for non-inferiority: "
    "held if the whole interval lies above it, not held if the whole interval lies below it, "
    "otherwise inconclusive (always so with fewer than 2 pairs, or when an arm has several runs "
    "for one seed: `at` must name the setting that separates them)."
)

# Keys that never make two arms different settings; adapter.* and layout.* are what arms compare.
_ARM_PREFIXES = ("adapter.", "layout.", "claims", "hydra.")
# 97.5% quantiles of Student's t (two-sided 95%) for df 1..30, used when scipy is not installed.
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
_DEFAULTS = {"better": "higher", "at": {}, "kind": "superiority", "margin": 0.0}


@dataclass
class ClaimResult:
    """One claim with its numbers; ``mean``, ``lo`` and ``hi`` are in oriented units (> 0 favours
    ``arm``)."""

    claim: dict[str, Any]
    verdict: str
    n: int = 0
    mean: float | None = None
    lo: float | None = None
    hi: float | None = None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------ statistics
def t_quantile(df: int) -> float:
    """The 97.5% quantile of Student's t: scipy's when installed, else a table (normal beyond 30)."""
    try:
        from scipy.stats import t
    except ImportError:
        return _T975[df - 1] if df <= len(_T975) else 1.96
    return float(t.ppf(0.975, df))


def interval(d: list[float], bootstrap: int = 0, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(d). With zero spread the interval is the point itself: identical arms
    give [0, 0], which clears no threshold of a superiority claim."""
    mean = statistics.fmean(d)
    if len(d) < 2 or statistics.stdev(d) == 0.0:
        return mean, mean
    if bootstrap:
        rng = np.random.default_rng(seed)  # fixed: the same files always give the same verdict
        means = np.asarray(d)[rng.integers(0, len(d), size=(bootstrap, len(d)))].mean(axis=1)
        lo, hi = np.percentile(means, [2.5, 97.5])
        return float(lo), float(hi)
    half = t_quantile(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return mean - half, mean + half


def decide(lo: float, hi: float, kind: str, margin: float) -> str:
    """The one rule (see :data:`RULE`): held, not held or inconclusive."""
    threshold = margin if kind == "superiority" else -margin
    if lo > threshold:
        return "held"
    if hi < threshold:
        return "not held"
    return "inconclusive"


# --------------------------------------------------------------------------------------------- metrics
def _number(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def _mean(values: list[Any]) -> float | None:
    nums = [v for v in map(_number, values) if v is not None]
    return statistics.fmean(nums) if nums else None


def metric_value(results: dict, path: str) -> float | None:
    """``metrics.<key>`` (dots reach nested keys), ``routing.<stat>`` (mean over modules of the
    final window) or ``routing.<stat>@<task type>``; None where the run does not have it."""
    head, _, rest = path.partition(".")
    if head == "metrics":
        node: Any = results.get("metrics", {})
        for key in rest.split("."):
            node = node.get(key) if isinstance(node, dict) else None
        return _number(node)
    if head == "routing":
        stat, _, task = rest.partition("@")
        modules = results.get("routing", {}).values()
        if task:
            return _mean([m.get("by_task_type", {}).get(task, {}).get(stat) for m in modules])
        return _mean([m.get(stat) for m in modules])
    return None


# ------------------------------------------------------------------------------------------------ runs
def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config -> ``{"recipe.max_steps": 450, ...}`` with values as JSON typed them."""
    return outputs.flatten(d, prefix, keep_empty=True)


def _config(run: Run) -> dict[str, Any]:
    return flatten((run.results or {}).get("config") or {})


_ABSENT = object()  # a config key the run lacks: equal to no YAML value


def select(runs: list[Run], label: str, at: dict[str, Any]) -> list[Run]:
    """Finished runs of one report label whose config has every ``at`` value."""
    return [
        r
        for r in runs
        if r.results is not None and r.label == label and all(_config(r).get(k, _ABSENT) == v for k, v in at.items())
    ]


def _by_seed(runs: list[Run]) -> tuple[dict[int, Run], list[int]]:
    """seed -> run, and the seeds with more than one run (the claim's ``at`` is too loose)."""
    out: dict[int, Run] = {}
    twice = set()
    for run in runs:
        seed = run.results.get("seed")
        if seed in out:
            twice.add(seed)
        out[seed] = run
    return out, sorted(twice)


def _differing(a: list[Run], b: list[Run], skip: set[str]) -> list[str]:
    """Config keys outside the arms' own adapter/layout whose values differ between the arms."""

    def values(runs: list[Run]) -> dict[str, set[str]]:
        acc: dict[str, set[str]] = {}
        for run in runs:
            for k, v in _config(run).items():
                acc.setdefault(k, set()).add(json.dumps(v, sort_keys=True))
        return acc

    va, vb = values(a), values(b)
    # the seed pairs the arms; settings that never change training (outputs.NOT_TRAINING) are not confounders
    keys = sorted(k for k in (set(va) | set(vb)) - skip - {"seed"} if outputs.changes_training(k))
    return [
        f"{k} ({'/'.join(sorted(va.get(k, {'-'})))} vs {'/'.join(sorted(vb.get(k, {'-'})))})"
        for k in keys
        if not k.startswith(_ARM_PREFIXES) and va.get(k) != vb.get(k)
    ]


# ---------------------------------------------------------------------------------------------- claims
def claims_in(runs: list[Run]) -> tuple[list[dict[str, Any]], list[str]]:
    """The claims the runs' configs carry, first definition of each name, in first-seen order; plus
    a warning per name defined differently by different runs (a preset edited between runs)."""
    found: dict[str, dict[str, Any]] = {}
    warnings: dict[str, str] = {}
    for run in runs:
        for c in ((run.results or {}).get("config") or {}).get("claims") or []:
            c = _DEFAULTS | c
            first = found.setdefault(c["name"], c)
            if first != c and c["name"] not in warnings:
                warnings[c["name"]] = (
                    f"claim {c['name']!r} is defined differently in {run.path}; the first definition is used"
                )
    return list(found.values()), list(warnings.values())


def _differences(claim: dict[str, Any], a: list[Run], b: list[Run]) -> tuple[list[float] | None, list[str], bool]:
    """Oriented per-seed differences over the seeds both arms have (None: the metric is missing),
    notes for the reader, and whether the pairs can be judged at all."""
    (sa, twice_a), (sb, twice_b) = _by_seed(a), _by_seed(b)
    notes = [
        f"{label} has several runs for seed(s) {twice}: name the setting that separates them in `at`"
        for label, twice in ((claim["arm"], twice_a), (claim["than"], twice_b))
        if twice
    ]
    notes += [
        f"no runs of {label}" + (f" at {_at(claim)}" if claim["at"] else "")
        for label, runs in ((claim["arm"], a), (claim["than"], b))
        if not runs
    ]
    unpaired = sorted(set(sa) ^ set(sb))
    if unpaired and a and b:
        notes.append(f"seed(s) {unpaired} lack a partner run and are left out")
    sign = 1.0 if claim["better"] == "higher" else -1.0
    d = []
    for seed in sorted(set(sa) & set(sb)):
        va, vb = metric_value(sa[seed].results, claim["metric"]), metric_value(sb[seed].results, claim["metric"])
        if va is None or vb is None:
            return None, [*notes, f"{claim['metric']} is missing for seed {seed}"], False
        d.append(sign * (va - vb))
    return d, notes, not (twice_a or twice_b)


def evaluate(claim: dict[str, Any], runs: list[Run], bootstrap: int = 0) -> ClaimResult:
    """Judge one claim over the runs (see :data:`RULE`)."""
    claim = _DEFAULTS | claim
    a, b = select(runs, claim["arm"], claim["at"]), select(runs, claim["than"], claim["at"])
    d, notes, usable = _differences(claim, a, b)
    extra = _differing(a, b, set(claim["at"]))
    warnings = [f"arms differ in settings the claim does not name: {', '.join(extra)}"] if extra else []
    result = ClaimResult(claim, "missing metric" if d is None else "inconclusive", notes=notes, warnings=warnings)
    if not d:
        return result
    result.n, result.mean = len(d), statistics.fmean(d)
    result.lo, result.hi = interval(d, bootstrap)
    if len(d) < 2:
        result.notes.append(f"{len(d)} seed pair: at least 2 are needed for a verdict")
    elif usable:
        result.verdict = decide(result.lo, result.hi, claim["kind"], float(claim["margin"]))
    return result


def evaluate_all(runs: list[Run], bootstrap: int = 0) -> tuple[list[ClaimResult], list[str]]:
    """Every claim the runs carry, judged; plus warnings about the claims themselves."""
    claims, warnings = claims_in(runs)
    return [evaluate(c, runs, bootstrap) for c in claims], warnings


# ---------------------------------------------------------------------------------------------- output
def _at(claim: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in claim["at"].items()) or "-"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def _ci(r: ClaimResult) -> str:
    return "-" if r.lo is None else f"[{r.lo:+.4f}, {r.hi:+.4f}]"


def _kind(c: dict[str, Any]) -> str:
    return "non-inferiority" if c["kind"] == "non_inferiority" else "superiority"


def markdown(results: list[ClaimResult], warnings: list[str], bootstrap: int = 0) -> str:
    """claims.md: the table, the rule under it, then notes and warnings per claim."""
    if not results:
        return "No claims: the runs' configs declare none (`claims:` in the experiment preset).\n"
    lines = [
        "| claim | metric | arm vs than | at | kind | n pairs | mean diff | 95% CI | margin | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        c = r.claim
        lines.append(
            f"| {c['name']} | {c['metric']} ({c['better']} is better) | {c['arm']} vs {c['than']} | "
            f"{_at(c)} | {_kind(c)} | {r.n} | {_num(r.mean)} | {_ci(r)} | {c['margin']:g} | **{r.verdict}** |"
        )
    interval_kind = f"percentile bootstrap, {bootstrap} resamples" if bootstrap else "t interval"
    lines += ["", RULE, f"Intervals here: {interval_kind}.", ""]
    remarks = [f"- {r.claim['name']}: {m}" for r in results for m in r.notes + r.warnings]
    if remarks or warnings:
        lines += ["### Notes and warnings", "", *remarks, *(f"- {w}" for w in warnings), ""]
    return "\n".join(lines)


def summary_line(r: ClaimResult) -> str:
    """One line per claim for the end of `make tables`."""
    c = r.claim
    line = (
        f"claim {c['name']}: {r.verdict.upper()} ({c['arm']} vs {c['than']} on {c['metric']}, "
        f"{c['better']} is better, {_kind(c)}, margin {c['margin']:g}, at {_at(c)}: "
        f"n={r.n}, mean diff {_num(r.mean)}, 95% CI {_ci(r)})"
    )
    return line + (" [warning: see claims.md]" if r.warnings else "")
