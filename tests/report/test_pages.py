"""`moe-lora pages`: results pages rendered from a report's files or a bench JSON, and the check that
fails when a page is out of date with its sources (run here on the repository's own docs/results)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from moe_lora.bench import measure, sweep
from moe_lora.bench.run import parse as bench_args
from moe_lora.report import pages
from moe_lora.report.build import build_report
from tests.report.test_claims import CLAIM, GAIN, B, make_runs

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def report(tmp_path) -> Path:
    """A real report (the project's own report code) over fabricated runs: arm a beats b by GAIN."""
    runs = tmp_path / "sweep"
    make_runs(runs, {"a": [b + g for b, g in zip(B, GAIN, strict=True)], "b": B})
    return build_report([runs])


@pytest.fixture
def results_dir(tmp_path) -> Path:
    folder = tmp_path / "docs" / "results"
    folder.mkdir(parents=True)
    (folder / "notes.md").write_text("# typed by hand\n")
    return folder


def test_the_repository_pages_are_up_to_date() -> None:
    """CI's check: every committed page equals what its committed sources render."""
    assert pages.main(["--check", "--dir", str(ROOT / "docs" / "results")]) == 0


def test_a_page_shows_the_report_numbers_and_verdicts(report, results_dir, capsys) -> None:
    assert pages.main(["--dir", str(results_dir), "--from", f"demo={report}"]) == 0
    text = (results_dir / "demo.md").read_text()
    verdicts = json.loads((report / "claims.json").read_text())["claims"]
    assert verdicts[0]["verdict"] == "held"  # GAIN is five times its spread
    row = next(line for line in text.splitlines() if line.startswith(f"| {CLAIM['name']} "))
    assert "**held**" in row and f"{verdicts[0]['mean']:+.4f}" in row and "a vs b" in row
    assert "1 claims: 1 held, 0 not held, 0 inconclusive." in text
    arm_a = next(line for line in text.splitlines() if line.startswith("| a |"))
    assert "0.550 ± " in arm_a  # instruction EM of a: mean of B + GAIN
    index = (results_dir / "index.md").read_text()
    assert "| [demo](demo.md) | 1 | 1 | 0 | 0 |" in index
    assert pages.main(["--check", "--dir", str(results_dir)]) == 0
    assert (results_dir / "notes.md").read_text() == "# typed by hand\n"  # hand-written pages are left alone


def test_check_fails_on_an_edited_page_changed_sources_or_orphans(report, results_dir, capsys) -> None:
    pages.main(["--dir", str(results_dir), "--from", f"demo={report}"])
    page = results_dir / "demo.md"
    page.write_text(page.read_text().replace("**held**", "**not held**"))  # a verdict typed over
    assert pages.main(["--check", "--dir", str(results_dir)]) == 1
    assert f"{page}: out of date" in capsys.readouterr().out

    pages.main(["--dir", str(results_dir)])
    claims_file = results_dir / "sources" / "demo" / "claims.json"
    data = json.loads(claims_file.read_text())
    data["claims"][0]["verdict"] = "inconclusive"  # sources refreshed, pages not regenerated
    claims_file.write_text(json.dumps(data))
    assert pages.main(["--check", "--dir", str(results_dir)]) == 1
    assert "demo.md: out of date" in capsys.readouterr().out

    pages.main(["--dir", str(results_dir)])
    for f in (results_dir / "sources" / "demo").iterdir():
        f.unlink()
    assert pages.main(["--check", "--dir", str(results_dir)]) == 1
    assert "demo.md: generated, but its sources are gone" in capsys.readouterr().out
    pages.main(["--dir", str(results_dir)])
    assert not page.exists() and (results_dir / "notes.md").exists()
    assert pages.main(["--check", "--dir", str(results_dir)]) == 0


def test_missing_page_and_bad_arguments(report, results_dir, capsys) -> None:
    pages.main(["--dir", str(results_dir), "--from", f"demo={report}"])
    (results_dir / "index.md").unlink()
    assert pages.main(["--check", "--dir", str(results_dir)]) == 1
    assert "index.md: missing" in capsys.readouterr().out
    assert pages.main(["--dir", str(results_dir), "--from", f"x={results_dir}"]) == 2
    assert "holds no report" in capsys.readouterr().out
    assert pages.main(["--dir", str(results_dir), "--from", f"index={report}"]) == 2
    assert pages.main(["--dir", str(results_dir / "nope")]) == 2
    with pytest.raises(SystemExit):
        pages.main(["--check", "--dir", str(results_dir), "--from", f"demo={report}"])


def test_the_cli_dispatches_pages(results_dir, capsys) -> None:
    from moe_lora.cli import main

    assert main(["pages", "--dir", str(results_dir)]) == 0
    assert main(["pages", "--check", "--dir", str(results_dir)]) == 0
    assert "| (none yet) |" in (results_dir / "index.md").read_text()


def test_item_intervals_get_a_column_only_when_the_report_has_them() -> None:
    claim = {"metric": "metrics.cbqa_em", "arm": "a", "than": "b", "kind": "superiority", "margin": 0.0}
    record = {"name": "c", "claim": claim, "verdict": "held", "n": 3, "mean": 0.1, "lo": 0.05, "hi": 0.15}
    without = pages.claims_table({"claims": [record]})
    assert "seeds x items" not in without
    with_items = pages.claims_table({"claims": [record | {"item_lo": 0.02, "item_hi": 0.18, "power_n": 4}]})
    head, rule, row = with_items.splitlines()[:3]
    assert "seeds x items" in head and head.count("|") == rule.count("|") == row.count("|")
    assert "| [+0.0500, +0.1500] | [+0.0200, +0.1800] |" in row and "| 4 | **held** |" in row


# ------------------------------------------------------------------------------------ bench pages
VARIANTS = ["peft_lora", "base", "lora", "loramoe", "loramoe_no_telemetry", "mola", "mola_grouped", "loop_loramoe"]


def fake_raw(rounds: int, scale: float = 1.0) -> dict:
    """What ``measure.measure`` returns, with made-up times: loop_loramoe's rounds spread wide (IQR)."""
    times = {v: [scale * (0.1 + 0.01 * i + 0.001 * r) for r in range(rounds)] for i, v in enumerate(VARIANTS)}
    times["loop_loramoe"][0] *= 3
    return {
        "median_s": {v: statistics.median(t) for v, t in times.items()},
        "round_s": times,
        "memory_bytes": {v: (10 + i) * 2**20 for i, v in enumerate(VARIANTS)},
        "flops": {v: (2 + i) * 10**9 for i, v in enumerate(VARIANTS) if v != "mola_grouped"},
        "spread": {v: measure.time_spread(t) for v, t in times.items()},
    }


def bench_file(tmp_path: Path, rounds: int = 6, *flags: str) -> tuple[Path, dict]:
    """A JSON as `moe-lora bench --out` writes it: the bench's own ``report`` over fabricated times."""
    a = bench_args(["--rounds", str(rounds), "--device", "cpu", "--large", "none", *flags])
    res = measure.report(fake_raw(rounds), a)
    path = tmp_path / f"bench_{rounds}{''.join(flags)}.json"
    path.write_text(json.dumps(res))
    return path, res


def sweep_file(tmp_path: Path) -> tuple[Path, dict]:
    """An expert sweep's JSON, assembled by the sweep's own code from fabricated counts."""
    a = bench_args(["--rounds", "6", "--device", "cpu", "--experts", "2,4", "--variants", ",".join(VARIANTS)])
    by_count = {}
    for n in a.experts:
        res = measure.report(fake_raw(6, scale=n), sweep.at_count(a, n))
        res.pop("settings"), res.pop("versions")
        by_count[n] = res
    res = sweep.assemble(by_count, VARIANTS, a)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(res))
    return path, res


def test_a_bench_page_has_every_variant_its_settings_and_the_index_links_it(tmp_path, results_dir) -> None:
    path, res = bench_file(tmp_path)
    assert pages.main(["--dir", str(results_dir), "--bench", f"speed={path}"]) == 0
    text = (results_dir / "speed.md").read_text()
    for v in VARIANTS:
        row = next(line for line in text.splitlines() if line.startswith(f"| {v} |"))
        assert f"| {res['median_step_ms'][v]:.1f} | " in row and f"| {res['memory_mb'][v]:.1f} |" in row
    lora = next(line for line in text.splitlines() if line.startswith("| lora |"))
    low, high = res["ratio_interval_vs_peft_lora"]["lora"]
    assert f"| {res['ratio_vs_peft_lora']['lora']:.2f} | [{low:.2f}, {high:.2f}] |" in lora
    assert f"| {res['step_time_iqr_over_median']['lora']:.1%} |" in lora
    loop = next(line for line in text.splitlines() if line.startswith("| loop_loramoe |"))
    assert f"| {res['median_step_ms']['loop_loramoe'] / res['median_step_ms']['peft_lora']:.2f}* |" in loop
    assert "- * loop_loramoe: IQR/median of the rounds loop_loramoe" in text  # the run's own reason
    assert f"on / off (loramoe): {res['telemetry_overhead']:.3f}x" in text
    assert f"| torch version | {res['versions']['torch']} |" in text and "| rounds | 6 |" in text
    index = (results_dir / "index.md").read_text()
    assert "| [speed](speed.md) | variant table | tiny_world | cpu, float32 | 6 |" in index
    assert pages.main(["--check", "--dir", str(results_dir)]) == 0


def test_a_sweep_page_has_a_row_per_count_and_variant(tmp_path, results_dir) -> None:
    path, res = sweep_file(tmp_path)
    assert pages.main(["--dir", str(results_dir), "--bench", f"experts={path}"]) == 0
    text = (results_dir / "experts.md").read_text()
    for i, n in enumerate(res["experts"]):
        for v in VARIANTS:
            assert f"| {n} | {v} | {res['series'][v]['median_step_ms'][i]:.1f} | " in text
    grouped = res["grouped_over_dense"]["mola"]
    assert f"| 2 | {grouped[0]:.2f} |" in text and f"| 4 | {grouped[1]:.2f} |" in text
    assert "| [experts](experts.md) | expert sweep (experts 2, 4) |" in (results_dir / "index.md").read_text()
    assert "plot.png" not in text  # this sweep drew no plot


def test_a_sweep_plot_travels_with_its_json_and_leaves_with_it(tmp_path, results_dir) -> None:
    path, _ = sweep_file(tmp_path)
    path.with_suffix(".png").write_bytes(b"\x89PNG drawn")  # where bench puts it beside --out
    assert pages.main(["--dir", str(results_dir), "--bench", f"experts={path}"]) == 0
    plot = results_dir / "sources" / "experts" / "plot.png"
    assert plot.read_bytes() == b"\x89PNG drawn"
    assert "](sources/experts/plot.png)" in (results_dir / "experts.md").read_text()
    assert pages.main(["--check", "--dir", str(results_dir)]) == 0
    path.with_suffix(".png").unlink()  # the same name from a JSON without a plot: the old one goes
    assert pages.main(["--dir", str(results_dir), "--bench", f"experts={path}"]) == 0
    assert not plot.exists() and "plot.png" not in (results_dir / "experts.md").read_text()


def test_too_few_rounds_withhold_the_ratios_or_flag_every_one(tmp_path, results_dir) -> None:
    path, res = bench_file(tmp_path, rounds=3)
    assert not res["ratios_shown"]
    pages.main(["--dir", str(results_dir), "--bench", f"few={path}"])
    text = (results_dir / "few.md").read_text()
    assert "| lora | " in text and "- step-time ratios withheld: 3 rounds" in text
    lora = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert lora.split(" | ")[2:4] == ["-", "-"]  # x peft LoRA and its interval
    path, res = bench_file(tmp_path, 3, "--force")
    pages.main(["--dir", str(results_dir), "--bench", f"forced={path}"])
    text = (results_dir / "forced.md").read_text()
    lora = next(line for line in text.splitlines() if line.startswith("| lora |"))
    assert f"| {res['ratio_vs_peft_lora']['lora']:.2f}* |" in lora and "marked *: 3 rounds (forced)" in text


def test_check_fails_when_the_bench_json_changes(tmp_path, results_dir, capsys) -> None:
    path, res = bench_file(tmp_path)
    pages.main(["--dir", str(results_dir), "--bench", f"speed={path}"])
    source = results_dir / "sources" / "speed" / "bench.json"
    res["median_step_ms"]["lora"] += 1.0  # a rerun copied in by hand, the page not regenerated
    source.write_text(json.dumps(res))
    assert pages.main(["--check", "--dir", str(results_dir)]) == 1
    assert "speed.md: out of date" in capsys.readouterr().out
    assert pages.main(["--dir", str(results_dir)]) == 0
    assert pages.main(["--check", "--dir", str(results_dir)]) == 0


def test_a_file_that_is_no_bench_json_fails_in_one_line(tmp_path, results_dir, report, capsys) -> None:
    for bad, why in [
        (report / "claims.json", "not a `moe-lora bench --out` JSON"),
        (tmp_path / "rows.json", "a `--experts-vs-peft` JSON"),
        (report / "results.csv", "not a readable JSON file"),
    ]:
        if bad.name == "rows.json":
            bad.write_text(json.dumps({"settings": {}, "rows": []}))
        assert pages.main(["--dir", str(results_dir), "--bench", f"x={bad}"]) == 2
        out = capsys.readouterr().out.strip().splitlines()
        assert len(out) == 1 and out[0].startswith(f"moe-lora: error: {bad}: {why}"), out
    assert not (results_dir / "sources" / "x").exists()
    path, _ = bench_file(tmp_path)
    pages.main(["--dir", str(results_dir), "--from", f"demo={report}"])
    assert pages.main(["--dir", str(results_dir), "--bench", f"demo={path}"]) == 2  # one page, one kind of source
    assert "holds results.csv, claims.json" in capsys.readouterr().out
