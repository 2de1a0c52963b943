"""Claims as code: verdicts from fabricated results folders, checked against hand-computed numbers."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_lora.errors import ConfigError
from moe_lora.report import claims
from moe_lora.report.build import build_report
from moe_lora.report.build import main as report_main
from moe_lora.report.collect import Run, collect
from tests.report.test_report import fake_run

ROOT = Path(__file__).resolve().parents[2]
CLAIM = {
    "name": "a_beats_b",
    "metric": "metrics.instruction_em",
    "better": "higher",
    "arm": "a",
    "than": "b",
    "at": {},
    "kind": "superiority",
    "margin": 0.0,
}
B = [0.50, 0.55, 0.45, 0.52, 0.48]
GAIN = [0.05, 0.06, 0.05, 0.04, 0.05]  # A - B per seed: mean 0.05, small spread


def make_runs(
    root: Path,
    values: dict[str, list[float]],
    claim_list: list[dict] | None = None,
    config: dict | None = None,
    seeds: dict[str, list[int]] | None = None,
) -> list[Run]:
    """One fake run per (label, seed) with instruction EM ``values[label][i]``, every run carrying
    the claims as results.json["config"]["claims"] does."""
    for label, vs in values.items():
        for seed, v in zip((seeds or {}).get(label, range(len(vs))), vs, strict=True):
            cfg = {"seed": seed, "claims": claim_list or [CLAIM], **(config or {})}
            fake_run(root / f"{label}_{seed}", "lora", seed, 0.5, v, 0.1, label=label, config=cfg)
    return collect([root])


def judge(root: Path, values: dict[str, list[float]], **claim: object) -> claims.ClaimResult:
    runs = make_runs(root, values, [CLAIM | claim])
    return claims.evaluate(CLAIM | claim, runs)


# ----------------------------------------------------------------------------------- the Done-when cases
@pytest.mark.parametrize(("better", "before", "after"), [("higher", "held", "not held"), ("lower", "not held", "held")])
def test_shifting_one_arm_by_three_sd_flips_the_verdict(tmp_path, better, before, after) -> None:
    a = [b + g for b, g in zip(B, GAIN, strict=True)]
    shift = 3 * statistics.stdev(a)
    assert judge(tmp_path / "0", {"a": a, "b": B}, better=better).verdict == before
    assert judge(tmp_path / "1", {"a": [x - shift for x in a], "b": B}, better=better).verdict == after


@pytest.mark.parametrize("bootstrap", [0, 500])
def test_identical_arms_are_inconclusive(tmp_path, bootstrap) -> None:
    runs = make_runs(tmp_path, {"a": B, "b": B})
    r = claims.evaluate(CLAIM, runs, bootstrap)
    assert (r.verdict, r.n, r.mean, r.lo, r.hi) == ("inconclusive", 5, 0.0, 0.0, 0.0)


def test_non_inferiority_within_its_margin_holds(tmp_path) -> None:
    a = [b - 0.01 + 0.002 * (i % 2) for i, b in enumerate(B)]  # slightly worse, well inside 0.05
    r = judge(tmp_path / "0", {"a": a, "b": B}, kind="non_inferiority", margin=0.05)
    assert r.verdict == "held" and -0.05 < r.lo < r.mean < 0
    assert judge(tmp_path / "1", {"a": a, "b": B}).verdict == "not held"  # as superiority: worse
    far = [x - 0.1 for x in a]
    assert judge(tmp_path / "2", {"a": far, "b": B}, kind="non_inferiority", margin=0.05).verdict == "not held"


# ------------------------------------------------------------------------------------------- the rule
def _interval_reading(lo: float, hi: float, thr: float) -> str:
    return "held" if lo > thr else "not held" if hi < thr else "inconclusive"


@pytest.mark.parametrize(("kind", "margin"), [("superiority", 0.0), ("superiority", 0.05), ("non_inferiority", 0.05)])
def test_for_a_family_of_one_the_t_verdict_is_the_interval_reading(kind, margin) -> None:
    """held iff the whole 95% t interval lies above the threshold (+margin for superiority, -margin
    for non-inferiority), not held iff below: the p-value rule and the interval say the same."""
    import numpy as np

    rng = np.random.default_rng(7)
    thr = claims.threshold({"kind": kind, "margin": margin})
    seen = set()
    for _ in range(400):
        d = list(rng.normal(rng.uniform(-0.15, 0.15), rng.uniform(0.01, 0.1), int(rng.integers(2, 8))))
        lo, hi = claims.interval(d)
        verdict = claims.verdict_from(*claims.t_pvalues(d, thr))
        assert verdict == _interval_reading(lo, hi, thr), (d, lo, hi)
        seen.add(verdict)
    assert seen == {"held", "not held", "inconclusive"}


def test_t_interval_by_hand() -> None:
    half = 4.303 * 1.0 / math.sqrt(3)  # d = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.303
    lo, hi = claims.interval([1.0, 2.0, 3.0])
    assert (lo, hi) == pytest.approx((2 - half, 2 + half), abs=1e-3)
    assert claims.t_quantile(2) == pytest.approx(4.303, abs=1e-3)


def test_bootstrap_t_interval_is_deterministic_and_not_the_t_interval() -> None:
    d = [0.1, 0.3, -0.05, 0.2, 0.15, 0.0]
    first = claims.interval(d, bootstrap=2000)
    assert first == claims.interval(d, bootstrap=2000)
    assert first != claims.interval(d)
    assert min(d) <= first[0] < statistics.fmean(d) < first[1] <= max(d)


# -------------------------------------------------------------------------------------------- metrics
def test_metric_paths() -> None:
    results = {
        "metrics": {"instruction_em": 0.5, "by_task": {"reverse": 0.25}, "flag": True},
        "routing": {
            "m1": {"cv": 0.2, "load": [1, 2], "by_task_type": {"cbqa": {"cv": 0.4}}},
            "m2": {"cv": 0.4, "by_task_type": {"cbqa": {"cv": 0.6}, "instruction": {"cv": 0.1}}},
        },
    }
    value = claims.metric_value
    assert value(results, "metrics.instruction_em") == 0.5
    assert value(results, "metrics.by_task.reverse") == 0.25
    assert value(results, "routing.cv") == pytest.approx(0.3)
    assert value(results, "routing.cv@cbqa") == pytest.approx(0.5)
    assert value(results, "routing.cv@instruction") == pytest.approx(0.1)  # m1 has no instruction tokens
    for missing in (
        "metrics.nope",
        "metrics.by_task.sort",
        "metrics.flag",
        "routing.load",
        "routing.cv@none",
        "params.trainable",
    ):
        assert value(results, missing) is None, missing


def test_missing_metric_is_reported_not_raised(tmp_path) -> None:
    r = judge(tmp_path, {"a": B, "b": B}, metric="metrics.harness.mmlu")
    assert r.verdict == "missing metric" and "metrics.harness.mmlu is missing for seed 0" in r.notes


# ------------------------------------------------------------------------------------ pairing and at
def test_pairs_only_seeds_both_arms_have(tmp_path) -> None:
    runs = make_runs(tmp_path, {"a": [0.6, 0.7, 0.9], "b": [0.5, 0.6]}, seeds={"a": [0, 1, 7], "b": [0, 1]})
    r = claims.evaluate(CLAIM, runs)
    assert r.n == 2 and r.mean == pytest.approx(0.1) and any("[7] lack a partner" in n for n in r.notes)
    assert r.verdict == "inconclusive" and any("no spread across seeds" in n for n in r.notes)  # d = 0.1, 0.1


def test_fewer_than_two_pairs_is_inconclusive(tmp_path) -> None:
    runs = make_runs(tmp_path, {"a": [0.9, 0.9], "b": [0.1, 0.1]}, seeds={"a": [0, 1], "b": [1, 2]})
    r = claims.evaluate(CLAIM, runs)
    assert (r.verdict, r.n) == ("inconclusive", 1) and any("at least 2" in n for n in r.notes)
    r = claims.evaluate(CLAIM | {"than": "nobody"}, runs)
    assert (r.verdict, r.n) == ("inconclusive", 0) and r.notes == ["no runs of nobody"]


def test_at_selects_runs_and_loose_claims_are_not_judged(tmp_path) -> None:
    for steps, a in ((150, [0.1, 0.1, 0.1]), (450, [0.9, 0.8, 0.95])):
        make_runs(tmp_path / str(steps), {"a": a, "b": [0.5, 0.5, 0.55]}, config={"recipe": {"max_steps": steps}})
    runs = collect([tmp_path])
    at450 = claims.evaluate(CLAIM | {"at": {"recipe.max_steps": 450}}, runs)
    assert (at450.verdict, at450.n) == ("held", 3) and at450.mean == pytest.approx(1.1 / 3)
    at150 = claims.evaluate(CLAIM | {"at": {"recipe.max_steps": 150}}, runs)
    assert at150.verdict == "not held" and not at150.warnings
    loose = claims.evaluate(CLAIM, runs)
    assert loose.verdict == "inconclusive" and any("several runs for seed(s) [0, 1, 2]" in n for n in loose.notes)
    assert claims.evaluate(CLAIM | {"at": {"recipe.max_steps": "450"}}, runs).n == 0  # typed, not textual


def test_warns_when_arms_differ_in_a_setting_the_claim_does_not_name(tmp_path) -> None:
    make_runs(tmp_path / "a", {"a": B}, config={"recipe": {"lr": 0.003, "max_steps": 9}, "adapter": {"rank": 4}})
    make_runs(tmp_path / "b", {"b": B}, config={"recipe": {"lr": 0.001, "max_steps": 9}, "adapter": {"rank": 8}})
    r = claims.evaluate(CLAIM, collect([tmp_path]))
    assert r.warnings == [
        "arms differ in settings the claim does not name: adapter.rank (4 vs 8), recipe.lr (0.003 vs 0.001)"
    ]
    assert not claims.evaluate(CLAIM, make_runs(tmp_path / "same", {"a": B, "b": B})).warnings


def test_claims_found_in_runs_are_deduplicated(tmp_path) -> None:
    other = CLAIM | {"name": "other", "than": "c"}
    make_runs(tmp_path / "x", {"a": B}, [CLAIM, other])
    make_runs(tmp_path / "y", {"b": B}, [CLAIM | {"margin": 0.1}])
    found, warnings = claims.claims_in(collect([tmp_path]))
    assert [c["name"] for c in found] == ["a_beats_b", "other"] and found[0]["margin"] == 0.0
    assert len(warnings) == 1 and "'a_beats_b' is defined differently" in warnings[0]


# ------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("field", "value", "key"),
    [
        ("better", "bigger", "claims[].better"),
        ("kind", "equivalence", "claims[].kind"),
        ("margin", -0.1, "claims[].margin"),
        ("metric", "instruction_em", "claims[].metric"),
        ("metric", "params.trainable", "claims[].metric"),
        ("than", "a", "claims[].than"),
        ("name", "", "claims[].name"),
    ],
)
def test_claim_config_errors_name_the_key(field, value, key) -> None:
    from moe_lora.config import ClaimConfig

    ClaimConfig(**CLAIM)
    with pytest.raises(ConfigError, match=f"^{re.escape(key)}="):
        ClaimConfig(**(CLAIM | {field: value}))


def test_claims_are_typed_by_the_train_schema() -> None:
    """`claims:` in a preset is merged into TrainConfig: a misspelt key fails at composition and
    ``to_object`` runs ClaimConfig's checks (the composed presets are tested in tests/test_configs.py)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError

    from moe_lora.config import ClaimConfig, TrainConfig

    schema = OmegaConf.structured(TrainConfig)
    merged = OmegaConf.merge(
        schema,
        OmegaConf.create(
            "claims: [{name: x, metric: routing.cv, arm: a, than: b, better: lower, at: {recipe.max_steps: 450}}]"
        ),
    )
    claim = OmegaConf.to_object(merged.claims[0])
    assert claim == ClaimConfig("x", "routing.cv", "a", "b", "lower", {"recipe.max_steps": 450})
    with pytest.raises(ConfigKeyError, match="bettr"):
        OmegaConf.merge(schema, OmegaConf.create("claims: [{name: x, metric: routing.cv, arm: a, than: b, bettr: 1}]"))
    with pytest.raises(ConfigError, match=r"^claims\[\]\.kind="):
        OmegaConf.to_object(
            OmegaConf.merge(
                schema, OmegaConf.create("claims: [{name: x, metric: routing.cv, arm: a, than: b, kind: equal}]")
            ).claims[0]
        )


def _preset_labels(preset: str) -> set[str]:
    """The report labels a toy preset's sweep produces, read from the YAML files (no composition):
    each `+arm`'s `label:`, or adapter/layout for layout sweeps, through the real Run.label."""
    raw = yaml.safe_load((ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text())
    params = raw["hydra"]["sweeper"]["params"]
    if "+arm" in params:
        return {
            yaml.safe_load((ROOT / "conf" / "arm" / f"{a}.yaml").read_text())["label"]
            for a in params["+arm"].split(",")
        }
    adapter = next(d["override /adapter"] for d in raw["defaults"] if "override /adapter" in d)
    return {
        Run(Path("."), {"adapter": adapter, "layout": layout, "config": {}}).label
        for layout in params["layout"].split(",")
    }


TOY = sorted(
    p.stem
    for p in (ROOT / "conf" / "experiment").glob("*.yaml")
    if not p.stem.endswith("_paper") and "override /hydra/sweeper: optuna" not in p.read_text()
)


@pytest.mark.parametrize("preset", TOY)
def test_preset_claims_name_labels_and_settings_their_sweep_produces(preset) -> None:
    from moe_lora.config import ClaimConfig

    raw = yaml.safe_load((ROOT / "conf" / "experiment" / f"{preset}.yaml").read_text())
    labels, params = _preset_labels(preset), raw["hydra"]["sweeper"]["params"]
    assert raw.get("claims"), f"{preset} states no claims"
    assert len({c["name"] for c in raw["claims"]}) == len(raw["claims"])
    for c in raw["claims"]:
        ClaimConfig(**c)
        assert {c["arm"], c["than"]} <= labels, f"{c['name']}: arms must be among {sorted(labels)}"
        for key, value in c.get("at", {}).items():
            assert str(value) in str(params.get(key, value)).split(","), f"{c['name']}: {key}={value} never runs"


# ----------------------------------------------------------------------------------------- the report
def test_report_writes_claims_md_index_section_and_lines(tmp_path, capsys) -> None:
    lower = CLAIM | {"name": "b_routes_less", "metric": "routing.cv", "better": "lower", "arm": "b", "than": "a"}
    missing = CLAIM | {"name": "gone", "metric": "metrics.nope"}
    a = [b + g for b, g in zip(B, GAIN, strict=True)]
    make_runs(tmp_path / "runs", {"a": a, "b": B}, [CLAIM, lower, missing], config={"recipe": {"lr": 1}})
    out = tmp_path / "rep"
    assert report_main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    md = (out / "claims.md").read_text()
    d = statistics.fmean(GAIN)
    assert f"| a_beats_b | metrics.instruction_em (higher is better) | a vs b | - | superiority | 5 | +{d:.4f} |" in md
    assert "| **held** |" in md and "| **inconclusive** |" in md and "| **missing metric** |" in md
    assert claims.RULE in md and "Decided by the paired t test (t interval)." in md
    assert "- gone: metrics.nope is missing for seed 0" in md
    assert "## Claims (paired by seed)" in (out / "index.md").read_text()
    printed = capsys.readouterr().out.splitlines()
    assert printed[1:] == (out / "claims.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in printed[1:]] == ["claim a_beats_b", "claim b_routes_less", "claim gone"]
    assert printed[1].startswith("claim a_beats_b: HELD (a vs b on metrics.instruction_em")
    build_report([tmp_path / "runs"], out, bootstrap=300)
    md = (out / "claims.md").read_text()  # 5 pairs: the sign-flip test decided, and the footer says so
    assert "Decided by the exact sign-flip test (t interval shown beside)." in md and "percentile" not in md


def test_report_without_claims_says_so(tmp_path) -> None:
    fake_run(tmp_path / "0", "lora", 0, 0.5, 0.5, 0.0)
    out = build_report([tmp_path])
    assert "No claims" in (out / "claims.md").read_text() and (out / "claims.txt").read_text() == ""


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_tables_ends_with_every_claim_line_despite_a_failing_preset(tmp_path) -> None:
    """The real Makefile target with a stand-in `moe-lora`: training is skipped, reports are real."""
    make_runs(tmp_path / "multirun" / "good" / "2024-01-01", {"a": B, "b": B})
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "moe-lora"
    stub.write_text(
        f'#!/bin/sh\n[ "$1" = train ] && exit 0\nshift\nexec {sys.executable} -c '
        "'import sys; from moe_lora.report.build import main; sys.exit(main(sys.argv[1:]))' \"$@\"\n"
    )
    stub.chmod(0o755)
    proc = subprocess.run(
        ["make", "-s", "-f", str(ROOT / "Makefile"), "tables", f"BIN={bin_dir}", "STAMP=", "PRESETS=good broken"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert proc.returncode != 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines()[-2:] == [
        "good: claim a_beats_b: INCONCLUSIVE (a vs b on metrics.instruction_em, "
        "higher is better, superiority, margin 0, at -: n=5, mean diff +0.0000, "
        "95% CI [+0.0000, +0.0000], p -, Holm p -)",
        "broken: no report (see above)",
    ]
    assert (tmp_path / "multirun" / "good" / "2024-01-01" / "report" / "claims.md").exists()


# ------------------------------------------------------------------ multiplicity, small samples, pairs
def _result(name: str, p: float, p_below: float = 0.9, family: str | None = None) -> claims.ClaimResult:
    c = claims._DEFAULTS | CLAIM | {"name": name, "family": family}
    return claims.ClaimResult(c, "held", n=5, p=p, p_below=p_below, p_adjusted=p, p_below_adjusted=p_below)


def test_holm_by_hand_turns_two_small_p_of_ten_inconclusive() -> None:
    raw = [0.0066, 0.013, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    adjusted = claims.holm(raw)
    assert adjusted[:3] == pytest.approx([0.066, 0.117, 1.0])  # 10 x 0.0066; max(0.066, 9 x 0.013); capped
    assert claims.holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])  # step-down, monotone
    family = [_result(f"c{i}", p) for i, p in enumerate(raw)]
    claims.adjust(family)
    assert [r.verdict for r in family[:2]] == ["inconclusive", "inconclusive"]
    assert family[0].p_adjusted == pytest.approx(0.066) and family[0].p == 0.0066
    alone = [_result("only", 0.0066)]
    claims.adjust(alone)
    assert alone[0].verdict == "held"  # a family of one is not corrected


def test_an_intersection_union_family_needs_every_member_and_no_correction() -> None:
    members = [_result(f"beats_{i}", p, family="best_of_all") for i, p in enumerate([0.001, 0.004, 0.02])]
    claims.adjust(members)
    assert {r.verdict for r in members} == {"held"}
    assert [r.p_adjusted for r in members] == pytest.approx([0.001, 0.004, 0.02])  # each its own, uncorrected
    weak = [_result(f"beats_{i}", p, family="best") for i, p in enumerate([0.001, 0.03])]
    claims.adjust(weak)
    assert {r.verdict for r in weak} == {"inconclusive"}
    failing = [_result("x", 0.9, p_below=0.004, family="f"), _result("y", 0.001, family="f")]
    claims.adjust(failing)  # one member clearly worse: the family is not held (Bonferroni over 2: 0.008)
    assert {r.verdict for r in failing} == {"not held"}


def test_equal_arms_at_three_seeds_never_hold_with_the_bootstrap(tmp_path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    for i in range(40):
        b = list(rng.normal(0.5, 0.05, 3))
        a = [x + e for x, e in zip(b, rng.normal(0.0, 0.02, 3), strict=True)]
        r = claims.evaluate(CLAIM, make_runs(tmp_path / str(i), {"a": a, "b": b}), bootstrap=1000)
        assert r.verdict != "held" and r.test == "sign-flip" and r.p >= 0.125
    assert any("smallest attainable p = 1/2^3 = 0.1250" in n for n in r.notes)


def test_sign_flip_p_values_by_hand() -> None:
    assert claims.sign_flip_pvalues([1.0, 2.0, 3.0], 0.0) == (pytest.approx(1 / 8), pytest.approx(1.0))
    # |d| = 1, 2, 3; the eight sign patterns sum to 6, 0, 2, -4, 4, -2, 0, -6; observed sum 2
    p_above, p_below = claims.sign_flip_pvalues([1.0, -2.0, 3.0], 0.0)
    assert p_above == pytest.approx(3 / 8) and p_below == pytest.approx(6 / 8)


def test_t_interval_covers_the_true_mean_95_percent_at_ten_pairs() -> None:
    import numpy as np

    rng = np.random.default_rng(1)
    hits = sum(lo <= 0.3 <= hi for lo, hi in (claims.interval(list(rng.normal(0.3, 1.0, 10))) for _ in range(3000)))
    assert 0.94 <= hits / 3000 <= 0.96


def test_the_superiority_margin_is_applied_inside_evaluate(tmp_path) -> None:
    a = [b + g for b, g in zip(B, GAIN, strict=True)]  # mean gain 0.05
    assert judge(tmp_path / "0", {"a": a, "b": B}, margin=0.0).verdict == "held"
    assert judge(tmp_path / "1", {"a": a, "b": B}, margin=0.05).verdict == "inconclusive"
    r = judge(tmp_path / "2", {"a": a, "b": B}, margin=0.2)
    assert r.verdict == "not held" and r.p > 0.99 and r.p_below < 0.025


def test_non_inferiority_when_lower_is_better(tmp_path) -> None:
    a = [b + 0.01 + 0.002 * (i % 2) for i, b in enumerate(B)]  # a slightly higher loss: worse, inside 0.05
    r = judge(tmp_path / "0", {"a": a, "b": B}, better="lower", kind="non_inferiority", margin=0.05)
    assert r.verdict == "held" and -0.05 < r.lo < r.mean < 0
    far = [x + 0.1 for x in a]
    assert judge(tmp_path / "1", {"a": far, "b": B}, better="lower", kind="non_inferiority", margin=0.05).verdict == (
        "not held"
    )


def test_pairs_are_by_seed_not_by_position(tmp_path) -> None:
    # a lacks seed 0; by position a's seed 1 would meet b's seed 0 and the gain would look negative
    runs = make_runs(
        tmp_path, {"a": [0.31, 0.52, 0.70], "b": [0.9, 0.3, 0.5, 0.69]}, seeds={"a": [1, 2, 3], "b": [0, 1, 2, 3]}
    )
    r = claims.evaluate(CLAIM, runs)
    assert r.n == 3 and r.mean == pytest.approx((0.01 + 0.02 + 0.01) / 3)


def _paired_runs(root: Path, a_cfg: list[dict], b_cfg: list[dict]) -> list[Run]:
    for seed, (ca, cb) in enumerate(zip(a_cfg, b_cfg, strict=True)):
        make_runs(root / f"a{seed}", {"a": [B[seed]]}, config=ca, seeds={"a": [seed]})
        make_runs(root / f"b{seed}", {"b": [B[seed] - 0.1]}, config=cb, seeds={"b": [seed]})
    return collect([root])


def test_a_confounder_swapped_between_pairs_is_warned_about(tmp_path) -> None:
    lr = [{"recipe": {"lr": 0.003}}, {"recipe": {"lr": 0.001}}]
    r = claims.evaluate(CLAIM, _paired_runs(tmp_path, lr, lr[::-1]))  # each arm has both values: sets agree
    assert r.warnings == [
        "arms differ in settings the claim does not name: recipe.lr (seed 0: 0.003 vs 0.001; seed 1: 0.001 vs 0.003)"
    ]


def test_adapter_confounders_warn_harmless_and_declared_keys_do_not(tmp_path) -> None:
    a = [{"adapter": {"name": "loramoe", "dropout": 0.05, "lbc_beta": 0.1}, "recipe": {"threads": 1}}] * 2
    b = [{"adapter": {"name": "lora", "dropout": 0.0}, "recipe": {"threads": 2}, "logger": {"name": "wandb"}}] * 2
    r = claims.evaluate(CLAIM, _paired_runs(tmp_path / "0", a, b))
    assert r.warnings == ["arms differ in settings the claim does not name: adapter.dropout (0.05 vs 0.0)"]
    assert not claims.evaluate(CLAIM | {"differs_in": ["adapter.dropout"]}, _paired_runs(tmp_path / "1", a, b)).warnings
    assert not claims.evaluate(CLAIM | {"differs_in": ["adapter"]}, _paired_runs(tmp_path / "2", a, b)).warnings


def test_arm_at_and_than_at_compare_one_label_at_two_settings(tmp_path) -> None:
    for steps, vs in ((150, [0.9, 0.8, 0.85]), (450, [0.5, 0.45, 0.52])):
        make_runs(tmp_path / str(steps), {"a": vs}, config={"recipe": {"max_steps": steps}})
    claim = CLAIM | {"than": "a", "arm_at": {"recipe.max_steps": 150}, "than_at": {"recipe.max_steps": 450}}
    r = claims.evaluate(claim, collect([tmp_path]))
    assert r.n == 3 and r.verdict == "held" and not r.warnings  # the declared step counts are no confounder
    from moe_lora.config import ClaimConfig

    ClaimConfig(**claim)
    with pytest.raises(ConfigError, match=r"^claims\[\]\.than="):
        ClaimConfig(**(CLAIM | {"than": "a"}))


def test_power_seeds_matches_the_noncentral_t() -> None:
    from scipy.stats import nct, t

    n = claims.power_seeds(sd=1.0, effect=1.0)
    power = lambda k: nct.sf(t.ppf(0.975, k - 1), k - 1, math.sqrt(k))  # noqa: E731
    assert power(n) >= 0.8 > power(n - 1) and n == 10
    assert claims.power_seeds(1.0, -0.1) is None and claims.power_seeds(0.0, 1.0) is None


def test_report_writes_claims_json_with_every_field(tmp_path) -> None:
    a = [b + g for b, g in zip(B, GAIN, strict=True)]
    make_runs(tmp_path / "runs", {"a": a, "b": B})
    out = build_report([tmp_path / "runs"], tmp_path / "rep")
    data = json.loads((out / "claims.json").read_text())
    record = data["claims"][0]
    assert {"name", "n", "mean", "lo", "hi", "p", "p_adjusted", "verdict", "warnings", "power_n"} <= set(record)
    assert record["verdict"] == "held" and record["n"] == 5 and record["p"] < 0.025
    assert f"Holm p {record['p_adjusted']:.3g}" in (out / "claims.txt").read_text()


def _item_run(path: Path, label: str, seed: int, correct: list[bool]) -> None:
    em = sum(correct) / len(correct)
    fake_run(path, "lora", seed, 0.5, em, 0.1, label=label, config={"seed": seed, "claims": [CLAIM]})
    rows = [{"model": "tuned", "task": "instruction", "id": str(i), "correct": c} for i, c in enumerate(correct)]
    rows += [{"model": "base", "task": "instruction", "id": str(i), "correct": False} for i in range(len(correct))]
    (path / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_two_level_bootstrap_resamples_items_and_seeds(tmp_path) -> None:
    import numpy as np

    rng = np.random.default_rng(3)
    for seed in range(4):
        _item_run(tmp_path / f"a{seed}", "a", seed, [bool(x) for x in rng.random(60) < 0.7])
        _item_run(tmp_path / f"b{seed}", "b", seed, [bool(x) for x in rng.random(60) < 0.5])
    runs = collect([tmp_path])
    r = claims.evaluate(CLAIM, runs, bootstrap=500, items=True)
    assert r.item_lo < r.mean < r.item_hi and r.item_hi - r.item_lo > 0.05  # 60 items per seed: wide
    assert any("two-level bootstrap (seeds x items" in n for n in r.notes)
    same = claims.evaluate(CLAIM | {"than": "a"} | {"arm_at": {"seed": 0}}, runs, bootstrap=100, items=True)
    assert same.item_lo is None  # one pair only: no interval
    from moe_lora.report.items import two_level_interval

    pairs = [(0, runs[0], runs[1]), (1, runs[2], runs[3])]
    assert two_level_interval("routing.cv", "higher", pairs, 100) is None  # not a per-item metric


def test_unequal_trainable_parameters_warn_unless_declared(tmp_path) -> None:
    for label, trainable in (("a", 1000), ("b", 1050)):
        for seed in range(2):
            path = tmp_path / f"{label}{seed}"
            fake_run(
                path,
                "lora",
                seed,
                0.5,
                0.5 + 0.1 * (label == "a") + 0.01 * seed,
                0.1,
                label=label,
                config={"seed": seed, "claims": [CLAIM]},
            )
            res = json.loads((path / "results.json").read_text())
            res["params"]["trainable"] = trainable
            res["budget"] = {"expert_slots": 8, "active_expert_rank": 32}
            (path / "results.json").write_text(json.dumps(res))
    runs = collect([tmp_path])
    r = claims.evaluate(CLAIM, runs)
    assert r.warnings == [
        "the arms' trainable parameters differ by 4.8% (1,000 vs 1,050); declare differs_in: "
        "[params] if that is the comparison"
    ]
    assert not claims.evaluate(CLAIM | {"differs_in": ["params"]}, runs).warnings
    from moe_lora.report.tables import aggregate, markdown

    assert "| a | 2 | 1,000 | - | 8 | 32 |" in markdown(aggregate(runs))  # no router count in these files


# --------------------------------------------------- mutants the AST mutation run left alive, killed
def test_t_p_values_by_hand() -> None:
    from scipy.stats import t

    above, below = claims.t_pvalues([1.0, 2.0, 3.0], 0.0)  # t = 2 / (1 / sqrt 3), 2 degrees of freedom
    assert above == pytest.approx(t.sf(2 * math.sqrt(3), 2)) == pytest.approx(0.0370, abs=1e-4)
    assert below == pytest.approx(1 - above)
    assert claims.t_pvalues([1.0, 2.0, 3.0], 2.0) == (pytest.approx(0.5), pytest.approx(0.5))


def test_bootstrap_t_interval_and_p_values_by_hand() -> None:
    import numpy as np

    d = [0.1, 0.3, -0.05, 0.2, 0.15, 0.0, 0.12, 0.4, -0.1, 0.05]
    x = np.asarray(d)
    rng = np.random.default_rng(0)
    xs = x[rng.integers(0, len(x), size=(4000, len(x)))]
    ts = (xs.mean(1) - x.mean()) / (xs.std(1, ddof=1) / math.sqrt(len(x)))
    se = statistics.stdev(d) / math.sqrt(len(d))
    q_lo, q_hi = np.quantile(ts, [0.025, 0.975])
    assert claims.interval(d, bootstrap=4000) == pytest.approx((x.mean() - q_hi * se, x.mean() - q_lo * se))
    above, below = claims.bootstrap_pvalues(d, 0.0, 4000)
    observed = x.mean() / se
    assert above == pytest.approx((1 + (ts >= observed).sum()) / 4001)
    assert below == pytest.approx((1 + (ts <= observed).sum()) / 4001) and below > 0.9
    assert claims.bootstrap_pvalues(d, 0.5, 4000)[1] < 0.01  # far above the mean: 'below' is certain


def test_boundaries_of_the_rule() -> None:
    assert claims.verdict_from(claims.ALPHA, 0.5) == "inconclusive" == claims.verdict_from(0.5, claims.ALPHA)
    assert claims.interval([0.3]) == (0.3, 0.3)
    lo, hi = claims.interval([0.1, 0.3])  # two pairs already give an interval (t with 1 degree of freedom)
    assert (lo, hi) == pytest.approx((0.2 - 12.706 * 0.1, 0.2 + 12.706 * 0.1), abs=1e-3)
    assert claims.sign_flip_pvalues([1.0, 2.0, 3.0], 1.5)[0] == pytest.approx(3 / 8)  # d - 1.5 = -0.5, 0.5, 1.5
    assert claims.power_seeds(sd=0.01, effect=1.0) == 2 and claims.power_seeds(1.0, 0.0) is None


def test_seventeen_pairs_bootstrap_t_sixteen_pairs_exact_sign_flip(tmp_path) -> None:
    values = {"a": [0.51 + 0.01 * i + 0.003 * (i % 3) for i in range(17)], "b": [0.5] * 17}
    runs = make_runs(tmp_path / "17", values)
    assert claims.evaluate(CLAIM, runs, bootstrap=200).test == "bootstrap-t"
    sixteen = make_runs(tmp_path / "16", {k: v[:16] for k, v in values.items()})
    r = claims.evaluate(CLAIM, sixteen, bootstrap=200)
    assert r.test == "sign-flip" and r.p == pytest.approx(1 / 2**16)  # every difference positive: one pattern


def test_lower_is_better_flips_the_sign_and_one_sided_gaps_are_reported(tmp_path) -> None:
    r = judge(tmp_path / "0", {"a": [0.4, 0.5], "b": [0.5, 0.7]}, better="lower")
    assert r.mean == pytest.approx(0.15)  # d = -(a - b)
    make_runs(tmp_path / "1" / "x", {"a": [0.9, 0.95], "b": [0.1, 0.12]})  # judged, this would be held
    make_runs(tmp_path / "1" / "y", {"a": [0.91]})  # a second run of a at seed 0; b has one per seed
    r = claims.evaluate(CLAIM, collect([tmp_path / "1"]))
    assert r.verdict == "inconclusive" and any("a has several runs for seed(s) [0]" in n for n in r.notes)


def test_a_metric_missing_in_one_arm_is_reported(tmp_path) -> None:
    runs = make_runs(tmp_path, {"a": B[:2], "b": B[:2]})
    for run in runs:
        if run.label == "a":
            run.results["metrics"].pop("instruction_em")
    assert claims.evaluate(CLAIM, runs).verdict == "missing metric"


def test_params_tolerance_is_one_percent(tmp_path) -> None:
    def warned(other: int) -> bool:
        runs = make_runs(tmp_path / str(other), {"a": B[:2], "b": B[:2]})
        for run in runs:
            run.results["params"]["trainable"] = 10_000 if run.label == "a" else other
        return bool(
            claims.params_mismatch(
                claims._DEFAULTS | CLAIM,
                claims._pairs(claims._DEFAULTS | CLAIM, *claims._arm_runs(claims._DEFAULTS | CLAIM, runs))[0],
            )
        )

    assert warned(10_150) and not warned(10_050)  # 1.5% (HydraLoRA's 'matched' LoRA) warns, 0.5% does not


def test_a_claim_alone_gets_no_family_note_and_items_default_to_1000_resamples(tmp_path) -> None:
    alone = [_result("only", 0.001)]
    claims.adjust(alone)
    assert not any("family" in n for n in alone[0].notes)
    rng_runs = []
    import numpy as np

    rng = np.random.default_rng(5)
    for seed in range(3):
        _item_run(tmp_path / f"a{seed}", "a", seed, [bool(x) for x in rng.random(30) < 0.7])
        _item_run(tmp_path / f"b{seed}", "b", seed, [bool(x) for x in rng.random(30) < 0.4])
    rng_runs = collect([tmp_path])
    r = claims.evaluate(CLAIM, rng_runs, bootstrap=0, items=True)
    assert r.item_lo is not None and any("1000 resamples" in n for n in r.notes)
