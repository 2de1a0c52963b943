"""`moe-lora pages`: results pages rendered from a report's files, and the check that fails when a
page is out of date with its sources (run here on the repository's own docs/results)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

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
    (folder / "archive.md").write_text("# typed by hand\n")
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
    assert (results_dir / "archive.md").read_text() == "# typed by hand\n"  # hand-written pages are left alone


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
    assert not page.exists() and (results_dir / "archive.md").exists()
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
