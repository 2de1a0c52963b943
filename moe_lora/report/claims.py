"""Claims as code: each preset states its paper's claims in ``claims:`` (``config.ClaimConfig``),
every results.json carries them, and this module judges them from results files only.

One rule for every claim (:data:`RULE`, printed under the table): runs of the two arms are paired
by seed (same init and data order), the per-seed differences are oriented so that positive favours
the claimed arm, and the 95% interval of their mean (t distribution, or bootstrap-t) is set against
the margin. A verdict is never a judgement call made in prose after the fact.
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
from moe_lora.report.items import two_level_interval

ALPHA = 0.025  # one-sided level of each verdict (the two-sided 95% interval's tail)
RULE = (
    "Rule: runs of `arm` and `than` are paired by seed (only seeds both have count); "
    "d = arm - than per seed, sign flipped when lower is better, so d > 0 favours `arm`. "
    "The threshold is +margin for superiority and -margin for non-inferiority. Each claim gets two "
    "one-sided p-values from a paired t test (it assumes the per-seed differences are roughly normal): "
    "p for 'mean(d) is above the threshold' and p for 'below'. Over the family (every claim of the "
    "report, one preset's sweep under `make tables`; claims sharing a `family:` count as one "
    "intersection-union claim, held only if every member is), both are Holm-adjusted; held if the "
    "adjusted p for 'above' is under 0.025, not held if the adjusted p for 'below' is, otherwise "
    "inconclusive (always so with fewer than 2 pairs, with no spread across seeds (differences equal "
    "to within a millionth of the metric's resolution, 1/n items where the results count them), or "
    "when an arm has several runs for one seed: `at` must name the setting that separates them). "
    "With --bootstrap N, p comes from an exact sign-flip test (all 2^n sign patterns) up to 16 pairs, "
    "which cannot decide below 6 pairs (8 at the first Holm step of five claims), and from a "
    "bootstrap-t (studentized, N resamples) at 17 pairs or more, with its interval. The 95% interval "
    "of mean(d) is shown beside. Seeds for 80% power: the fewest pairs at which the test that would "
    "decide reaches 80% power at the Holm level the claim faces, for the declared smallest effect "
    "(`effect`), else no true difference for non-inferiority (the margin), else the observed "
    "difference; each claim's note names which."
)

_EXEMPT = ("claims", "hydra.", "adapter.name")  # what an arm *is*: never a confounder
_DEFAULTS = {
    "better": "higher",
    "at": {},
    "arm_at": {},
    "than_at": {},
    "kind": "superiority",
    "margin": 0.0,
    "differs_in": [],
    "family": None,
    "effect": None,
}
MIN_BOOTSTRAP_PAIRS = 17  # below: the exact sign-flip test (2^16 patterns at most); from here bootstrap-t
SPREAD_RESOLUTION_SHARE = 1e-6  # per-seed differences closer than this share of the metric's resolution: no spread
RELATIVE_RESOLUTION = 1e-3  # the resolution of a metric the results give no item count for, relative to its size


@dataclass
class ClaimResult:
    """One claim with its numbers; ``mean``, ``lo`` and ``hi`` are in oriented units (> 0 favours
    ``arm``). ``p`` / ``p_below``: one-sided p for 'above' / 'below' the threshold, ``p_adjusted``
    / ``p_below_adjusted`` after Holm over the family; ``power_n``: the seed pairs at which the
    deciding test would have 80% power at the claim's Holm level (``power_level``) for the true
    difference ``power_effect`` (oriented), chosen as ``power_basis`` says; ``sd``: of the
    per-seed differences; ``item_lo`` / ``item_hi``: the two-level (seeds x items) interval."""

    claim: dict[str, Any]
    verdict: str
    n: int = 0
    mean: float | None = None
    lo: float | None = None
    hi: float | None = None
    p: float | None = None
    p_below: float | None = None
    p_adjusted: float | None = None
    p_below_adjusted: float | None = None
    power_n: int | None = None
    power_level: float | None = None
    power_effect: float | None = None
    power_basis: str | None = None
    sd: float | None = None
    item_lo: float | None = None  # the two-level (seeds x items) bootstrap interval, with --items
    item_hi: float | None = None
    test: str = "t"
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def record(self) -> dict[str, Any]:
        """claims.json's entry (what claims.md and claims.txt are rendered from)."""
        keys = (
            "verdict",
            "n",
            "mean",
            "lo",
            "hi",
            "p",
            "p_adjusted",
            "p_below",
            "p_below_adjusted",
            "power_n",
            "power_level",
            "power_effect",
            "power_basis",
            "sd",
            "item_lo",
            "item_hi",
            "test",
            "notes",
            "warnings",
        )
        return {"name": self.claim["name"], "claim": self.claim, **{k: getattr(self, k) for k in keys}}


# ------------------------------------------------------------------------------------------ statistics
def t_quantile(df: int, q: float = 0.975) -> float:
    from scipy.stats import t

    return float(t.ppf(q, df))


def threshold(claim: dict[str, Any]) -> float:
    return float(claim["margin"]) if claim["kind"] == "superiority" else -float(claim["margin"])


def interval(d: list[float], bootstrap: int = 0, seed: int = 0) -> tuple[float, float]:
    """95% interval of mean(d): t, or bootstrap-t (studentized: the resampled t statistics' 2.5% and
    97.5% quantiles scale the observed standard error). With zero spread the interval is the point
    itself (and the claim is inconclusive: see :func:`evaluate`)."""
    mean = statistics.fmean(d)
    if len(d) < 2 or statistics.stdev(d) == 0.0:
        return mean, mean
    se = statistics.stdev(d) / math.sqrt(len(d))
    if bootstrap:
        lo_q, hi_q = np.quantile(_resampled_t(d, bootstrap, seed), [0.025, 0.975])
        return float(mean - hi_q * se), float(mean - lo_q * se)
    half = t_quantile(len(d) - 1) * se
    return mean - half, mean + half


def _resampled_t(d: list[float], bootstrap: int, seed: int = 0) -> np.ndarray:
    """Bootstrap t statistics ``(mean* - mean) / se*`` of ``bootstrap`` resamples of the pairs. A
    resample without spread (every pair drawn the same value) gives +-inf, the limit of its ratio,
    so discrete differences never drop resamples."""
    x = np.asarray(d, dtype=float)
    rng = np.random.default_rng(seed)  # fixed: the same files always give the same verdict
    xs = x[rng.integers(0, len(x), size=(bootstrap, len(x)))]
    means, ses = xs.mean(axis=1), xs.std(axis=1, ddof=1) / math.sqrt(len(x))
    gap = means - x.mean()
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(ses > 0, gap / np.where(ses > 0, ses, 1.0), np.sign(gap) * np.inf)


def t_pvalues(d: list[float], thr: float) -> tuple[float, float]:
    """One-sided paired-t p-values for 'mean(d) > thr' and 'mean(d) < thr' (spread > 0)."""
    from scipy.stats import t

    stat = (statistics.fmean(d) - thr) / (statistics.stdev(d) / math.sqrt(len(d)))
    return float(t.sf(stat, len(d) - 1)), float(t.cdf(stat, len(d) - 1))


def sign_patterns(n: int) -> np.ndarray:
    """All 2^n patterns of n signs (+1 / -1), one per row."""
    return 1.0 - 2.0 * ((np.arange(2**n)[:, None] >> np.arange(n)) & 1)


def sign_flip_pvalues(d: list[float], thr: float) -> tuple[float, float]:
    """Exact one-sided p-values of the sign-flip (randomisation) test on d - thr: every one of the
    2^n sign patterns is equally likely under 'no difference from the threshold'. The smallest
    attainable p is 1 / 2^n (0.125 at 3 pairs), so few seeds can never decide a claim."""
    x = np.asarray(d) - thr
    means, observed = sign_patterns(len(x)) @ np.abs(x) / len(x), x.mean()
    eps = 1e-12 * max(1.0, float(np.abs(x).max()))
    return float((means >= observed - eps).mean()), float((means <= observed + eps).mean())


def bootstrap_pvalues(d: list[float], thr: float, bootstrap: int, seed: int = 0) -> tuple[float, float]:
    """Bootstrap-t p-values: the observed t statistic against the resampled ones (which are centred
    on the observed mean, so they stand for the null's distribution of t)."""
    stat = (statistics.fmean(d) - thr) / (statistics.stdev(d) / math.sqrt(len(d)))
    ts = _resampled_t(d, bootstrap, seed)
    return float((1 + (ts >= stat).sum()) / (bootstrap + 1)), float((1 + (ts <= stat).sum()) / (bootstrap + 1))


def power_seeds(sd: float, effect: float, alpha: float = ALPHA, power: float = 0.8, most: int = 1000) -> int | None:
    """The fewest seed pairs whose one-sided paired t test at ``alpha`` has ``power`` when the true
    mean difference beyond the threshold is ``effect`` with per-pair sd ``sd`` (noncentral t);
    None when the effect does not favour the claim or more than ``most`` would be needed."""
    from scipy.stats import nct, t

    def enough(n: int) -> bool:
        return nct.sf(t.ppf(1 - alpha, n - 1), n - 1, effect * math.sqrt(n) / sd) >= power

    if effect <= 0 or sd <= 0 or not enough(most):
        return None
    lo, hi = 1, most  # power grows with n: bisect for the first n that is enough
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def sign_flip_floor(alpha: float) -> int:
    """The fewest pairs at which the exact sign-flip test can reach p < ``alpha`` (1 / 2^n < alpha):
    6 at 0.025, 8 at 0.005 (the first Holm step of five claims)."""
    return math.floor(math.log2(1 / alpha)) + 1


def sign_flip_power(n: int, effect_sd: float, alpha: float, reps: int = 400, seed: int = 0) -> float:
    """Power of the exact sign-flip test at ``alpha`` with n pairs when the differences are normal
    with mean ``effect_sd`` beyond the threshold in units of their sd (simulated, fixed seed)."""
    x = np.random.default_rng(seed).normal(effect_sd, 1.0, size=(n, reps))
    signs = sign_patterns(n).astype(np.float32)
    hits = 0
    for chunk in np.array_split(np.arange(reps), max(1, (2**n * reps) // 2**22)):
        means = signs @ np.abs(x[:, chunk]).astype(np.float32)  # (patterns, chunk), sums not means
        observed = x[:, chunk].sum(axis=0).astype(np.float32)
        eps = 1e-5 * np.abs(x[:, chunk]).sum(axis=0)
        hits += int((((means >= observed - eps).mean(axis=0)) < alpha).sum())
    return hits / reps


def power_for_test(
    sd: float, effect: float, alpha: float, bootstrap: int, power: float = 0.8, most: int = 1000
) -> int | None:
    """The fewest pairs at which the test that would decide has ``power`` at level ``alpha``: the
    paired t test; or, with ``bootstrap``, the exact sign-flip test below :data:`MIN_BOOTSTRAP_PAIRS`
    pairs (simulated; never below :func:`sign_flip_floor`) and bootstrap-t from there (its noncentral
    t approximation). None when the effect does not favour the claim or more than ``most`` are needed."""
    n_t = power_seeds(sd, effect, alpha, power, most)
    if not bootstrap or n_t is None:
        return n_t
    for n in range(max(n_t, sign_flip_floor(alpha)), MIN_BOOTSTRAP_PAIRS):  # the t test's power bounds it
        if sign_flip_power(n, effect / sd, alpha) >= power:
            return n
    return max(n_t, MIN_BOOTSTRAP_PAIRS)


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order."""
    return [adjusted for adjusted, _, _ in holm_steps(ps)]


def holm_steps(ps: list[float]) -> list[tuple[float, int, float]]:
    """Per p, in the input order: its Holm-adjusted p, its multiplier (tests left at its step, so
    its level is 0.025 / multiplier) and the largest adjusted p of the steps before it."""
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    out: list[tuple[float, int, float]] = [(0.0, 0, 0.0)] * len(ps)
    running = 0.0
    for rank, i in enumerate(order):
        before, running = running, max(running, min(1.0, (len(ps) - rank) * ps[i]))
        out[i] = (running, len(ps) - rank, before)
    return out


def verdict_from(p_above: float, p_below: float) -> str:
    """The rule (see :data:`RULE`) on the family's adjusted p-values: held, not held or inconclusive.
    For a family of one under the t test it reads like the interval: held iff the 95% interval lies
    wholly above the threshold, not held iff wholly below."""
    if p_above < ALPHA:
        return "held"
    if p_below < ALPHA:
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


def _declared(key: str, entries: list[str]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


PARAMS_TOLERANCE = 0.01  # trainable parameters of a claim's arms may differ by this share silently


def params_mismatch(claim: dict[str, Any], pairs: list[tuple[int, Run, Run]]) -> str | None:
    """A warning when the arms' trainable parameters differ by more than 1% and the claim does not
    declare it (``differs_in: [params]``): an unequal budget decides many comparisons by itself."""
    if "params" in claim["differs_in"] or not pairs:
        return None
    _, ra, rb = pairs[0]
    a, b = ((r.results or {}).get("params", {}).get("trainable") for r in (ra, rb))
    if not a or not b or abs(a - b) <= PARAMS_TOLERANCE * max(a, b):
        return None
    return (
        f"the arms' trainable parameters differ by {abs(a - b) / max(a, b):.1%} ({a:,} vs {b:,}); "
        "declare differs_in: [params] if that is the comparison"
    )


EVALUATION = ("eval", "recipe.eval_limit")  # keys outside training that change the compared metric


def changes_metric(key: str) -> bool:
    """Whether a dotted config key changes how the metric is measured (not training: it stays out
    of the checkpoint hash, ``outputs.NOT_TRAINING``): few-shot count, generation length, the
    evaluated subset."""
    return any(key == e or key.startswith(e + ".") for e in EVALUATION)


def confounders(claim: dict[str, Any], pairs: list[tuple[int, Run, Run]], evaluation: bool = False) -> list[str]:
    """Settings the two runs of a seed pair differ in that the claim does not declare
    (``differs_in``, its ``at`` keys), pair by pair. A key only one arm has is that method's own
    field (LoRAMoE's ``lbc_beta``); keys that never change training (``outputs.NOT_TRAINING``) and
    the adapter's name are what an arm is or how it was run, never confounders. ``evaluation``:
    instead the evaluation keys (:data:`EVALUATION`), which change the metric compared, not training."""
    declared = [*claim["differs_in"], *claim["at"], *claim["arm_at"], *claim["than_at"]]
    found: dict[str, list[tuple[int, str, str]]] = {}
    for seed, ra, rb in pairs:
        ca, cb = _config(ra), _config(rb)
        for key in sorted(set(ca) & set(cb)):
            if key == "seed" or key.startswith(_EXEMPT):
                continue
            if not (changes_metric(key) if evaluation else outputs.changes_training(key)):
                continue
            if ca[key] != cb[key] and not _declared(key, declared):
                found.setdefault(key, []).append((seed, json.dumps(ca[key]), json.dumps(cb[key])))
    out = []
    for key, diffs in found.items():
        if len({(a, b) for _, a, b in diffs}) == 1 and len(diffs) == len(pairs):
            out.append(f"{key} ({diffs[0][1]} vs {diffs[0][2]})")
        else:
            out.append(f"{key} ({'; '.join(f'seed {s}: {a} vs {b}' for s, a, b in diffs)})")
    return out


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


def _arm_runs(claim: dict[str, Any], runs: list[Run]) -> tuple[list[Run], list[Run]]:
    at = claim["at"]
    return select(runs, claim["arm"], at | claim["arm_at"]), select(runs, claim["than"], at | claim["than_at"])


def _pairs(claim: dict[str, Any], a: list[Run], b: list[Run]) -> tuple[list[tuple[int, Run, Run]], list[str], bool]:
    """The seed pairs, notes for the reader, and whether the pairs can be judged at all."""
    (sa, twice_a), (sb, twice_b) = _by_seed(a), _by_seed(b)
    notes = [
        f"{label} has several runs for seed(s) {twice}: name the setting that separates them in `at`"
        for label, twice in ((claim["arm"], twice_a), (claim["than"], twice_b))
        if twice
    ]
    notes += [
        f"no runs of {label}" + (f" at {_at(claim)}" if _at(claim) != "-" else "")
        for label, runs in ((claim["arm"], a), (claim["than"], b))
        if not runs
    ]
    unpaired = sorted(set(sa) ^ set(sb))
    if unpaired and a and b:
        notes.append(f"seed(s) {unpaired} lack a partner run and are left out")
    return [(s, sa[s], sb[s]) for s in sorted(set(sa) & set(sb))], notes, not (twice_a or twice_b)


def _differences(claim: dict[str, Any], pairs: list[tuple[int, Run, Run]]) -> tuple[list[float] | None, str]:
    """Oriented per-seed differences (None and a note when the metric is missing)."""
    sign = 1.0 if claim["better"] == "higher" else -1.0
    d = []
    for seed, ra, rb in pairs:
        va, vb = metric_value(ra.results, claim["metric"]), metric_value(rb.results, claim["metric"])
        if va is None or vb is None:
            return None, f"{claim['metric']} is missing for seed {seed}"
        d.append(sign * (va - vb))
    return d, ""


def resolution(claim: dict[str, Any], pairs: list[tuple[int, Run, Run]]) -> float:
    """The smallest step the claim's metric can take: one item of the largest evaluation the runs
    count (``metrics.n_<task type>`` for a ``metrics.<task type>_...`` key), else a thousandth of the
    metric's largest magnitude in the runs (a relative resolution, for routing statistics, ratios and
    per-set keys). Zero when every value is zero."""
    key = claim["metric"].partition(".")[2]
    task = key.split("_", 1)[0]
    counts = [_number((r.results.get("metrics") or {}).get(f"n_{task}")) for _, *runs in pairs for r in runs]
    if claim["metric"].startswith("metrics.") and "." not in key and counts and all(c and c > 0 for c in counts):
        return 1.0 / max(counts)
    values = [metric_value(r.results, claim["metric"]) or 0.0 for _, *runs in pairs for r in runs]
    return RELATIVE_RESOLUTION * max((abs(v) for v in values), default=0.0)


def no_spread(d: list[float], tolerance: float) -> bool:
    """Whether the per-seed differences are equal to within ``tolerance`` (their range): one item
    apart on every seed is no spread, whatever the float rounding of the subtractions."""
    return max(d) - min(d) <= tolerance


def _test(result: ClaimResult, d: list[float], bootstrap: int) -> None:
    """Interval, the two one-sided p-values and the power of a claim with spread (at level
    :data:`ALPHA`; :func:`adjust` recomputes the power at the claim's Holm level)."""
    thr = threshold(result.claim)
    if bootstrap and len(d) < MIN_BOOTSTRAP_PAIRS:
        result.test = "sign-flip"
        result.lo, result.hi = interval(d)
        result.p, result.p_below = sign_flip_pvalues(d, thr)
        result.notes.append(
            f"{len(d)} pairs: below {MIN_BOOTSTRAP_PAIRS} an exact sign-flip test decides (smallest attainable "
            f"p = 1/2^{len(d)} = {0.5 ** len(d):.4f}); the interval shown is t"
        )
    elif bootstrap:
        result.test = "bootstrap-t"
        result.lo, result.hi = interval(d, bootstrap)
        result.p, result.p_below = bootstrap_pvalues(d, thr, bootstrap)
    else:
        result.lo, result.hi = interval(d)
        result.p, result.p_below = t_pvalues(d, thr)
    result.sd = statistics.stdev(d)
    set_power(result, ALPHA)


TEST_NAMES = {"t": "paired t test", "sign-flip": "exact sign-flip test", "bootstrap-t": "bootstrap-t"}


def planning_effect(claim: dict[str, Any], observed: float) -> tuple[float, str]:
    """The true (oriented) difference power is computed for, and where it comes from: the claim's
    declared smallest effect of interest (``effect``), else for non-inferiority no true difference
    (power to stay inside the declared margin), else the observed mean difference."""
    if claim.get("effect") is not None:
        return float(claim["effect"]), "the declared smallest effect of interest, claims[].effect"
    if claim["kind"] == "non_inferiority":
        return 0.0, "no true difference, inside the declared margin"
    return observed, "the observed one; the claim declares no effect"


def set_power(result: ClaimResult, level: float) -> None:
    """``power_n`` and what it means: the deciding test's 80% power at ``level`` (the claim's Holm
    level) for :func:`planning_effect`'s difference, with the observed per-seed sd."""
    if result.sd is None or result.mean is None:
        return
    effect, basis = planning_effect(result.claim, result.mean)
    bootstrap = int(result.test != "t")
    result.power_n = power_for_test(result.sd, effect - threshold(result.claim), level, bootstrap)
    result.power_level, result.power_effect = level, effect
    test = "sign-flip below 17 pairs, bootstrap-t from there" if bootstrap else TEST_NAMES["t"]
    result.power_basis = (
        f"{test}, at its Holm level (one-sided {level:.3g}), for a true difference of {effect:+.4f} ({basis}) "
        f"with per-seed sd {result.sd:.4f}"
    )


def _items(result: ClaimResult, pairs: list[tuple[int, Run, Run]], bootstrap: int) -> None:
    """The two-level bootstrap interval beside the verdict (it does not decide it)."""
    c = result.claim
    found = two_level_interval(c["metric"], c["better"], pairs, bootstrap or 1000)
    if found is None:
        result.notes.append("no two-level interval: the metric is not per-item, or a run lacks predictions.jsonl")
        return
    result.item_lo, result.item_hi = found
    result.notes.append(
        f"two-level bootstrap (seeds x items, {bootstrap or 1000} resamples): 95% interval "
        f"[{found[0]:+.4f}, {found[1]:+.4f}]; shown beside the verdict, which the rule decides"
    )


def evaluate(claim: dict[str, Any], runs: list[Run], bootstrap: int = 0, items: bool = False) -> ClaimResult:
    """Judge one claim over the runs as a family of one (see :data:`RULE`); :func:`evaluate_all`
    adjusts the verdicts over the family. ``items``: add the two-level (seeds x items) interval."""
    claim = _DEFAULTS | claim
    a, b = _arm_runs(claim, runs)
    pairs, notes, usable = _pairs(claim, a, b)
    extra, evaluated = confounders(claim, pairs), confounders(claim, pairs, evaluation=True)
    warnings = [f"arms differ in settings the claim does not name: {', '.join(extra)}"] if extra else []
    if evaluated:
        warnings.append(
            f"arms were evaluated differently, which changes the compared metric: {', '.join(evaluated)}; "
            "declare differs_in if that is the comparison"
        )
    if mismatch := params_mismatch(claim, pairs):
        warnings.append(mismatch)
    d, missing = _differences(claim, pairs)
    result = ClaimResult(claim, "inconclusive", notes=notes, warnings=warnings)
    if d is None:
        result.verdict, result.notes = "missing metric", [*notes, missing]
        return result
    if not d:
        return result
    result.n, result.mean = len(d), statistics.fmean(d)
    if len(d) < 2:
        result.lo = result.hi = result.mean
        result.notes.append(f"{len(d)} seed pair: at least 2 are needed for a verdict")
    elif no_spread(d, tolerance := SPREAD_RESOLUTION_SHARE * resolution(claim, pairs)):
        result.lo = result.hi = result.mean
        result.notes.append(
            "no spread across seeds: the same difference every seed (to within "
            f"{tolerance:.2g}, a millionth of the metric's resolution) gives no interval to judge by"
        )
    else:
        _test(result, d, bootstrap)
        if items:
            _items(result, pairs, bootstrap)
        if usable:
            result.p_adjusted, result.p_below_adjusted = result.p, result.p_below
            result.verdict = verdict_from(result.p, result.p_below)
    return result


def _units(results: list[ClaimResult]) -> list[list[ClaimResult]]:
    """The tests of the family: each claim alone, or the members of one ``family:`` together."""
    groups: dict[str, list[ClaimResult]] = {}
    units = []
    for r in results:
        if r.claim.get("family"):
            if r.claim["family"] not in groups:
                groups[r.claim["family"]] = []
                units.append(groups[r.claim["family"]])
            groups[r.claim["family"]].append(r)
        else:
            units.append([r])
    return units


def _judged(r: ClaimResult) -> bool:
    return r.p is not None and r.p_adjusted is not None


def adjust(results: list[ClaimResult]) -> None:
    """Holm over the family's tests; an intersection-union group is held when every member is
    (its p is the largest member p, no correction inside) and not held when any member is not
    (the smallest member p for 'below', Bonferroni over the members). A group with a member that
    cannot be judged stays a test of the family but cannot be held (its p for 'above' is 1). Each
    member shows its own Holm p: its p times the group's Holm multiplier, never below the p of a
    step before it; the group's verdict follows the group's adjusted p. The power of every judged
    claim is recomputed at its Holm level (0.025 over the group's multiplier)."""
    units = [u for u in _units(results) if any(_judged(r) for r in u)]
    above = holm_steps([max(r.p if _judged(r) else 1.0 for r in u) for u in units])
    below = holm_steps([min(1.0, len(u) * min(r.p_below for r in u if _judged(r))) for u in units])
    for unit, (pa, step_a, before_a), (pb, step_b, before_b) in zip(units, above, below, strict=True):
        complete = all(_judged(r) for r in unit)
        for r in unit:
            if len(unit) > 1:
                r.notes.append(
                    f"verdict of family {r.claim['family']!r} ({len(unit)} claims, all must hold)"
                    if complete
                    else f"family {r.claim['family']!r} has a member that cannot be judged, so it cannot hold"
                )
            if not _judged(r):
                continue
            r.p_adjusted = max(before_a, min(1.0, step_a * r.p))
            r.p_below_adjusted = max(before_b, min(1.0, step_b * len(unit) * r.p_below))
            r.verdict = verdict_from(pa, pb)
            set_power(r, ALPHA / step_a)
        for r in unit:  # unjudged members: inconclusive (or missing metric), whatever the group's p
            if not _judged(r) and r.verdict not in ("missing metric", "inconclusive"):
                r.verdict = "inconclusive"


def evaluate_all(runs: list[Run], bootstrap: int = 0, items: bool = False) -> tuple[list[ClaimResult], list[str]]:
    """Every claim the runs carry, judged and Holm-adjusted over the family; plus warnings about
    the claims themselves."""
    claims, warnings = claims_in(runs)
    results = [evaluate(c, runs, bootstrap, items) for c in claims]
    adjust(results)
    return results, warnings


# ---------------------------------------------------------------------------------------------- output
def _at(claim: dict[str, Any]) -> str:
    parts = [f"{k}={v}" for k, v in claim["at"].items()]
    parts += [f"{claim['arm']}: {k}={v}" for k, v in claim.get("arm_at", {}).items()]
    parts += [f"{claim['than']}: {k}={v}" for k, v in claim.get("than_at", {}).items()]
    return ", ".join(parts) or "-"


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:+.4f}"


def _p(x: float | None) -> str:
    return "-" if x is None else f"{x:.3g}"


def _ci(r: dict[str, Any]) -> str:
    return "-" if r["lo"] is None else f"[{r['lo']:+.4f}, {r['hi']:+.4f}]"


def _kind(c: dict[str, Any]) -> str:
    return "non-inferiority" if c["kind"] == "non_inferiority" else "superiority"


def markdown(records: list[dict[str, Any]], warnings: list[str], bootstrap: int = 0) -> str:
    """claims.md from claims.json's records: the table, the rule under it, then notes and warnings."""
    if not records:
        return (
            "No claims: the runs' configs declare none (`claims:` in an experiment preset). To judge your own "
            "comparison, add one to the sweep's command line, e.g. `'claims=[{name: b_beats_a, metric: "
            "metrics.instruction_em, arm: b, than: a}]'` with the runs' report labels as arm and than: "
            'docs/claims.md, "Ad-hoc claims for your own comparison".\n'
        )
    lines = [
        "| claim | metric | arm vs than | at | kind | n pairs | mean diff | 95% CI | margin | p | Holm p | "
        "seeds for 80% power | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        c = r["claim"]
        lines.append(
            f"| {c['name']} | {c['metric']} ({c['better']} is better) | {c['arm']} vs {c['than']} | "
            f"{_at(c)} | {_kind(c)} | {r['n']} | {_num(r['mean'])} | {_ci(r)} | {c['margin']:g} | {_p(r['p'])} | "
            f"{_p(r['p_adjusted'])} | {r['power_n'] or '-'} | **{r['verdict']}** |"
        )
    lines += [
        "",
        RULE,
        f"{decided_by(records, bootstrap)} p: one-sided, for 'above the threshold'; Holm p: each claim's own, "
        "adjusted over the family. Seeds for 80% power: for the test that would decide, at the claim's "
        "Holm level, for the difference its note names.",
        "",
    ]
    remarks = [f"- {r['name']}: {m}" for r in records for m in r["notes"] + r["warnings"]]
    remarks += [
        f"- {r['name']}: 80% power needs {r['power_n']} pairs: {r['power_basis']}" for r in records if r.get("power_n")
    ]
    if remarks or warnings:
        lines += ["### Notes and warnings", "", *remarks, *(f"- {w}" for w in warnings), ""]
    return "\n".join(lines)


def decided_by(records: list[dict[str, Any]], bootstrap: int = 0) -> str:
    """The footer's sentence naming the test that decided each judged claim and its interval."""
    intervals = {
        "t": "t interval",
        "sign-flip": "t interval shown beside",
        "bootstrap-t": f"bootstrap-t interval, {bootstrap} resamples",
    }
    tests: dict[str, list[str]] = {}
    for r in records:
        if r.get("p") is not None:
            tests.setdefault(r.get("test", "t"), []).append(r["name"])
    if not tests:
        return "No claim was tested (too few pairs, no spread or no metric)."
    if len(tests) == 1:
        (test,) = tests
        return f"Decided by the {TEST_NAMES[test]} ({intervals[test]})."
    parts = [f"the {TEST_NAMES[t]} ({intervals[t]}) for {', '.join(names)}" for t, names in tests.items()]
    return f"Decided by {'; '.join(parts)}."


def summary_line(r: dict[str, Any]) -> str:
    """One line per claim for the end of `make tables` (from claims.json's record)."""
    c = r["claim"]
    line = (
        f"claim {c['name']}: {r['verdict'].upper()} ({c['arm']} vs {c['than']} on {c['metric']}, "
        f"{c['better']} is better, {_kind(c)}, margin {c['margin']:g}, at {_at(c)}: "
        f"n={r['n']}, mean diff {_num(r['mean'])}, 95% CI {_ci(r)}, p {_p(r['p'])}, Holm p {_p(r['p_adjusted'])})"
    )
    return line + (" [warning: see claims.md]" if r["warnings"] else "")
