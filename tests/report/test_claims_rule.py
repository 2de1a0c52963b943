"""The claims rule's fixes: a tolerance on 'no spread', power at the Holm level for the deciding
test, a bootstrap that holds its level from its cut-off (a simulation), evaluation settings as
confounders, the footer naming the test, each family member's own Holm p, item intervals in
claims.json."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from moe_lora.report import claims
from moe_lora.report.build import build_report
from moe_lora.report.collect import collect
from tests.report.test_claims import CLAIM, _item_run, _result, make_runs

ITEMS = 300


def _counts_runs(root: Path, a: list[int], b: list[int], with_n: bool = True):
    """Runs whose instruction EM is ``count / ITEMS`` (as evaluation computes it), with the item
    count in results.json (``metrics.n_instruction``) where ``with_n``."""
    runs = make_runs(root, {"a": [k / ITEMS for k in a], "b": [k / ITEMS for k in b]})
    if with_n:
        for run in runs:
            run.results["metrics"]["n_instruction"] = ITEMS
    return runs


# ------------------------------------------------------------------------------------- no spread
@pytest.mark.parametrize("with_n", [True, False])
def test_arms_one_item_apart_on_every_seed_are_inconclusive(tmp_path, with_n) -> None:
    b = [150, 131, 77, 203, 119, 168, 96]
    d = [(k + 1) / ITEMS - k / ITEMS for k in b]
    assert statistics.stdev(d) > 0.0  # float rounding: an exact guard would judge this (p ~ 1e-29)
    for bootstrap in (0, 500):
        runs = _counts_runs(tmp_path / str(bootstrap), [k + 1 for k in b], b, with_n)
        r = claims.evaluate(CLAIM, runs, bootstrap)
        assert (r.verdict, r.p, r.lo, r.hi) == ("inconclusive", None, r.mean, r.mean)
        assert r.mean == pytest.approx(1 / ITEMS) and any("no spread across seeds" in n for n in r.notes)


def test_a_real_spread_of_one_item_is_judged(tmp_path) -> None:
    b = [150, 131, 77, 203, 119, 168, 96]
    a = [k + 1 + (i == 3) for i, k in enumerate(b)]  # one seed two items apart: spread
    r = claims.evaluate(CLAIM, _counts_runs(tmp_path, a, b))
    assert r.p is not None and r.lo < r.mean < r.hi and not any("no spread" in n for n in r.notes)


def test_resolution_is_one_item_where_counted_else_relative(tmp_path) -> None:
    runs = _counts_runs(tmp_path / "n", [10, 20], [12, 18])
    pairs = claims._pairs(claims._DEFAULTS | CLAIM, *claims._arm_runs(claims._DEFAULTS | CLAIM, runs))[0]
    assert claims.resolution(claims._DEFAULTS | CLAIM, pairs) == pytest.approx(1 / ITEMS)
    routing = claims._DEFAULTS | CLAIM | {"metric": "routing.cv"}  # fake runs' cv: 0.1
    assert claims.resolution(routing, pairs) == pytest.approx(1e-4)


# ----------------------------------------------------------------------------------------- power
def test_sign_flip_cannot_decide_below_its_floor() -> None:
    assert claims.sign_flip_floor(0.025) == 6 and claims.sign_flip_floor(0.005) == 8
    assert claims.power_seeds(sd=0.01, effect=1.0) == 2  # the t test: 2 pairs
    assert claims.power_for_test(0.01, 1.0, 0.025, bootstrap=0) == 2
    assert claims.power_for_test(0.01, 1.0, 0.025, bootstrap=500) == 6  # sign-flip: 1/2^6 < 0.025
    assert claims.power_for_test(0.01, 1.0, 0.005, bootstrap=500) == 8  # at the first Holm step of five
    assert claims.sign_flip_power(6, 100.0, 0.025) == 1.0 and claims.sign_flip_power(5, 100.0, 0.025) == 0.0
    assert claims.sign_flip_power(10, 0.0, 0.025) <= 0.04  # no effect: about its level


def test_power_is_at_the_holm_level_the_claim_faces(tmp_path) -> None:
    gain = [0.05, 0.03, 0.07, 0.04, 0.06]
    b = [0.5, 0.55, 0.45, 0.52, 0.48]
    named = [CLAIM | {"name": f"c{i}", "than": "b"} for i in range(5)]
    runs = make_runs(tmp_path, {"a": [x + g for x, g in zip(b, gain, strict=True)], "b": b}, named)
    alone = claims.evaluate(named[0], runs)
    results, _ = claims.evaluate_all(runs)
    assert alone.power_level == claims.ALPHA and alone.power_n is not None
    levels = sorted(r.power_level for r in results)
    assert levels[0] == pytest.approx(claims.ALPHA / 5)  # equal p: Holm's first step is one of them
    first = min(results, key=lambda r: r.power_level)
    assert first.power_n > alone.power_n  # a stricter level needs more seeds
    assert first.power_n == claims.power_seeds(statistics.stdev(gain), statistics.fmean(gain), claims.ALPHA / 5)
    assert "(one-sided 0.005)" in first.power_basis and "(the observed one;" in first.power_basis


def test_power_uses_the_declared_effect_or_the_non_inferiority_margin(tmp_path) -> None:
    b = [0.5, 0.55, 0.45, 0.52, 0.48]
    a = [x + g for x, g in zip(b, [0.05, 0.03, 0.07, 0.04, 0.06], strict=True)]
    sd = statistics.stdev([y - x for x, y in zip(b, a, strict=True)])
    declared = claims.evaluate(CLAIM | {"effect": 0.02}, make_runs(tmp_path / "e", {"a": a, "b": b}))
    assert declared.power_effect == 0.02 and declared.power_n == claims.power_seeds(sd, 0.02)
    assert "declared smallest effect" in declared.power_basis
    ni = claims.evaluate(
        CLAIM | {"kind": "non_inferiority", "margin": 0.03}, make_runs(tmp_path / "n", {"a": a, "b": b})
    )
    assert ni.power_effect == 0.0 and ni.power_n == claims.power_seeds(sd, 0.03)  # 0 true difference vs -0.03
    signed = claims.evaluate(CLAIM | {"effect": 0.02}, make_runs(tmp_path / "s", {"a": a, "b": b}), bootstrap=200)
    assert signed.test == "sign-flip" and signed.power_n >= claims.sign_flip_floor(claims.ALPHA)
    assert "sign-flip below 17 pairs" in signed.power_basis


# ------------------------------------------------------------------------ the bootstrap's level
def test_false_held_at_the_bootstrap_cut_off_is_at_most_three_percent() -> None:
    """Equal arms (true mean difference 0), normal differences, exactly the cut-off's pairs: the
    bootstrap-t rejects 'not above' at one-sided 0.025 in at most 3% of 3,000 simulated reports.
    The percentile bootstrap it replaced, at its old 10-pair cut-off, fails the same check."""
    n, reps, b = claims.MIN_BOOTSTRAP_PAIRS, 3000, 399
    rng = np.random.default_rng(2026)
    data = rng.normal(0.0, 0.03, size=(reps, n))
    held = sum(claims.bootstrap_pvalues(list(d), 0.0, b)[0] < claims.ALPHA for d in data)  # as reports resample
    assert held / reps <= 0.03
    old = rng.normal(0.0, 0.03, size=(reps, 10))  # percentile bootstrap's shifted p, vectorised
    idx = rng.integers(0, 10, size=(b, 10))
    means = old[:, idx].mean(axis=2)  # (reps, b)
    shifted = means - old.mean(axis=1, keepdims=True)
    p_old = (1 + (shifted >= old.mean(axis=1, keepdims=True)).sum(axis=1)) / (b + 1)
    assert (p_old < claims.ALPHA).mean() > 0.035


def test_exact_sign_flip_holds_its_level_below_the_cut_off() -> None:
    rng = np.random.default_rng(7)
    data = rng.normal(0.0, 1.0, size=(4000, 10))
    held = sum(claims.sign_flip_pvalues(list(d), 0.0)[0] < claims.ALPHA for d in data)
    assert held / 4000 <= 0.03


# --------------------------------------------------------------------- evaluation confounders
def test_an_eval_num_fewshot_difference_between_arms_is_warned_about(tmp_path) -> None:
    b = [0.5, 0.55, 0.45]
    a = [0.6, 0.62, 0.58]
    make_runs(tmp_path / "a", {"a": a}, config={"eval": {"num_fewshot": 5}, "recipe": {"eval_limit": 100}})
    make_runs(tmp_path / "b", {"b": b}, config={"eval": {"num_fewshot": 0}, "recipe": {"eval_limit": 200}})
    runs = collect([tmp_path])
    r = claims.evaluate(CLAIM, runs)
    [warning] = r.warnings
    assert warning.startswith("arms were evaluated differently, which changes the compared metric:")
    assert "eval.num_fewshot (5 vs 0)" in warning and "recipe.eval_limit (100 vs 200)" in warning
    assert not claims.evaluate(CLAIM | {"differs_in": ["eval", "recipe.eval_limit"]}, runs).warnings
    from moe_lora import outputs

    assert not outputs.changes_training("eval.num_fewshot")  # still out of the checkpoint hash


# ------------------------------------------------------------------------------------- output
def test_the_footer_names_the_test_that_decided() -> None:
    rec = lambda name, test, p=0.01: {"name": name, "test": test, "p": p}  # noqa: E731
    assert claims.decided_by([rec("x", "t")]) == "Decided by the paired t test (t interval)."
    mixed = claims.decided_by([rec("x", "sign-flip"), rec("y", "bootstrap-t"), rec("z", "t", None)], 400)
    assert mixed == (
        "Decided by the exact sign-flip test (t interval shown beside) for x; "
        "the bootstrap-t (bootstrap-t interval, 400 resamples) for y."
    )
    assert claims.decided_by([rec("z", "t", None)]).startswith("No claim was tested")


def test_a_family_with_an_unjudgeable_member_shows_each_members_own_holm_p() -> None:
    lone = [_result("solo_1", 0.001), _result("solo_2", 0.2)]
    ok = _result("fam_ok", 0.004, family="f")
    broken = claims.ClaimResult(claims._DEFAULTS | CLAIM | {"name": "fam_gone", "family": "f"}, "missing metric")
    results = [*lone, ok, broken]
    claims.adjust(results)
    # three tests: solo_1 (0.001) first, x3; solo_2 (0.2) x2; the family (cannot hold: p 1) last, x1
    assert lone[0].p_adjusted == pytest.approx(0.003) and lone[1].p_adjusted == pytest.approx(0.4)
    assert ok.p_adjusted == pytest.approx(0.4) != ok.p  # its own Holm p (running max), not the raw 0.004
    assert ok.verdict == "inconclusive" and broken.verdict == "missing metric" and broken.p_adjusted is None
    assert any("cannot hold" in n for n in ok.notes)
    worse = [_result("g_bad", 0.9, p_below=0.001, family="g"), _result("g_gone", 0.5, family="g")]
    worse[1].p = worse[1].p_adjusted = None
    claims.adjust(worse)  # a member clearly worse: the family is not held even with one unjudged
    assert worse[0].verdict == "not held" and worse[1].verdict == "inconclusive"


def test_item_intervals_reach_claims_json(tmp_path) -> None:
    rng = np.random.default_rng(3)
    for seed in range(3):
        _item_run(tmp_path / "runs" / f"a{seed}", "a", seed, [bool(x) for x in rng.random(40) < 0.7])
        _item_run(tmp_path / "runs" / f"b{seed}", "b", seed, [bool(x) for x in rng.random(40) < 0.4])
    out = build_report([tmp_path / "runs"], tmp_path / "rep", bootstrap=200, items=True)
    [record] = json.loads((out / "claims.json").read_text())["claims"]
    assert record["item_lo"] < record["mean"] < record["item_hi"]
    assert {"power_level", "power_effect", "power_basis", "sd", "test"} <= set(record)


def test_a_claim_declares_its_smallest_effect_of_interest_in_the_schema() -> None:
    from moe_lora.config import ClaimConfig
    from moe_lora.errors import ConfigError

    fields = {k: v for k, v in CLAIM.items() if k in ("name", "metric", "arm", "than")}
    assert ClaimConfig(**fields, effect=0.02).effect == 0.02 and ClaimConfig(**fields).effect is None
    with pytest.raises(ConfigError, match=r"claims\[\]\.effect"):
        ClaimConfig(**fields, effect=float("nan"))
