"""`moe-lora report` over damaged run files (issue 28, item 6): a results, routing, failure or
predictions file cut short, a damaged adapter or study database is named in one place, never a
traceback, and the rest of the report is written."""

from __future__ import annotations

import errno
import json
import logging
from pathlib import Path

import pytest

from moe_lora.cli import main
from moe_lora.report.collect import collect
from tests.report.test_report import fake_run


def cut(path: Path, keep: float = 0.5) -> None:
    """The file cut short, as a full disk or a killed copy leaves it."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def damaged(tmp_path) -> Path:
    """Two good runs, one with a cut results.json, one with a cut routing.jsonl, one whose
    failure.json is cut."""
    fake_run(tmp_path / "0", "lora", 0, 0.6, 0.5, 0.0)
    fake_run(tmp_path / "1", "lora", 1, 0.8, 0.7, 0.0)
    fake_run(tmp_path / "2", "loramoe", 0, 0.9, 0.4, 0.2)
    fake_run(tmp_path / "3", "mola", 0, 0.5, 0.5, 0.4)
    cut(tmp_path / "2" / "results.json")
    cut(tmp_path / "3" / "routing.jsonl", 0.7)
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "failure.json").write_text('{"error": "RuntimeError: bo')
    return tmp_path


def test_collect_lists_damaged_runs_as_unreadable_naming_the_file(damaged, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        runs = {r.path.name: r for r in collect([damaged])}
    assert runs["0"].results is not None and runs["1"].results is not None and not runs["0"].unreadable
    for name, file in (("2", "results.json"), ("3", "routing.jsonl"), ("4", "failure.json")):
        run = runs[name]
        assert run.results is None and run.unreadable, name
        assert str(damaged / name / file) in run.error and "\n" not in run.error
    last = len((damaged / "3" / "routing.jsonl").read_text().splitlines())
    assert f"routing.jsonl (line {last}: " in runs["3"].error  # the first bad line: the cut one
    assert sum("unreadable run file" in r.message for r in caplog.records) == 3


def test_report_over_damaged_runs_writes_everything_else(damaged, capsys, fresh_logging) -> None:
    out = damaged.parent / f"{damaged.name}-report"
    code = main(["report", str(damaged), "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    assert "Traceback" not in stdout + stderr, stderr
    index = (out / "index.md").read_text()
    assert "2 finished runs, 3 failed." in index
    for name, file in (("2", "results.json"), ("3", "routing.jsonl"), ("4", "failure.json")):
        assert f"`{damaged / name}`: unreadable: {damaged / name / file} (" in index
    table = (out / "results.md").read_text()
    assert "| lora |" in table and "loramoe" not in table and "mola" not in table
    assert (out / "cv_over_training.png").exists()  # plots of the readable runs still drawn


@pytest.mark.parametrize(
    "text, why",
    [("[1, 2]", "not a JSON object"), ('{"adapter": "lora"}', "no metrics, params, seed, wall_s"), ("\xff", "")],
)
def test_foreign_results_files_are_unreadable(tmp_path, text: str, why: str) -> None:
    fake_run(tmp_path / "0", "lora", 0, 0.6, 0.5, 0.0)
    (tmp_path / "0" / "results.json").write_bytes(text.encode("latin-1"))
    (run,) = collect([tmp_path])
    assert run.unreadable and str(tmp_path / "0" / "results.json") in run.error and why in run.error


def test_cut_predictions_cost_only_the_item_level_interval(tmp_path, caplog) -> None:
    from moe_lora.report.items import item_table

    fake_run(tmp_path / "0", "lora", 0, 0.6, 0.5, 0.0)
    rows = [{"model": "tuned", "task": "capital", "id": i, "correct": i % 2 == 0} for i in range(4)]
    path = tmp_path / "0" / "predictions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run,) = collect([tmp_path])
    assert item_table(run, "metrics.instruction_em") == {"capital": {"0": True, "1": False, "2": True, "3": False}}
    cut(path, 0.6)
    with caplog.at_level(logging.WARNING):
        assert item_table(run, "metrics.instruction_em") is None
    assert any(str(path) in r.message for r in caplog.records)


def test_a_damaged_adapter_leaves_the_run_out_of_the_asymmetry_analysis(tmp_path, caplog) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    from moe_lora.report import asymmetry

    for task in ("reverse", "sort", "upper"):
        run = tmp_path / task
        fake_run(run, "lora", 0, 0.5, 0.5, 0.0)
        res = json.loads((run / "results.json").read_text())
        res["config"] = {"data": {"instruction_tasks": [task]}}
        (run / "results.json").write_text(json.dumps(res))
        save_file(
            {"m.lora_A": np.ones((2, 3), np.float32), "m.lora_B": np.ones((3, 2), np.float32)},
            str(run / "adapter_model.safetensors"),
        )
    cut(tmp_path / "upper" / "adapter_model.safetensors", 0.9)
    with caplog.at_level(logging.WARNING):
        groups = asymmetry.task_loras(collect([tmp_path]))
    assert groups == {0: {"reverse": tmp_path / "reverse", "sort": tmp_path / "sort"}}
    assert any(str(tmp_path / "upper" / "adapter_model.safetensors") in r.message for r in caplog.records)
    assert asymmetry.similarities(groups)[0]["cos_A"] == pytest.approx(1.0)


def test_a_damaged_study_database_is_left_out_with_a_warning(tmp_path, caplog) -> None:
    from moe_lora.report.search import read_studies

    fake_run(tmp_path / "sweep" / "0", "lora", 0, 0.5, 0.5, 0.0)
    (tmp_path / "sweep" / "study.db").write_bytes(b"not a sqlite database" * 10)
    with caplog.at_level(logging.WARNING):
        assert read_studies(collect([tmp_path / "sweep"])) == []
    assert any("study.db" in r.message for r in caplog.records)


def test_a_full_disk_while_writing_the_report_is_one_line_and_keeps_the_earlier_report(
    damaged, capsys, monkeypatch, fresh_logging
) -> None:
    out = damaged.parent / f"{damaged.name}-report"
    assert main(["report", str(damaged), "--out", str(out)]) == 0
    before = (out / "index.md").read_text()
    capsys.readouterr()

    write_text = Path.write_text

    def full_at_results_tex(self: Path, text: str, *args, **kwargs) -> int:
        if self.name == "results.tex":  # a write in the middle of the report
            write_text(self, text[: len(text) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_at_results_tex)
    code = main(["report", str(damaged), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if not line.startswith("unreadable run file: ")]
    assert len(errors) == 1 and errors[0].startswith(f"moe-lora: error: cannot write {out}: No space left on device")
    assert errors[0].endswith("(free space, or choose a writable --out)")
    assert (out / "index.md").read_text() == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")) == []


def test_a_results_path_that_is_a_folder_is_unreadable(tmp_path) -> None:
    fake_run(tmp_path / "0", "lora", 0, 0.6, 0.5, 0.0)
    (tmp_path / "0" / "results.json").unlink()
    (tmp_path / "0" / "results.json").mkdir()
    (run,) = collect([tmp_path])
    assert run.error == f"unreadable: {tmp_path / '0' / 'results.json'} (Is a directory)"
