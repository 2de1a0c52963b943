"""Logs survive their sinks (issue 11, item 6): W&B failing at any point costs the W&B mirror only,
never a JSONL line or the run; an output folder that cannot be written fails with one line naming
the file. W&B runs are fakes here (nothing contacts the network), except for one offline run."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import types
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from moe_lora.config import LoggerConfig, WandbConfig
from moe_lora.errors import ConfigError, OutputError
from moe_lora.tracking import Tracker, write_json_atomic
from tests.conftest import read_jsonl

WANDB = LoggerConfig(name="wandb", wandb=WandbConfig(enabled=True, mode="offline"))
ROWS = [{"step": s, "loss": 1.0 / s, "aux_loss": 0.1, "lr": 1e-3} for s in (1, 2, 3)]
ROUTING = [
    [{"step": s, "module": "m.0", "task_type": t, "cv": 0.5, "entropy": 1.0} for t in ("all", "cbqa")]
    for s in (1, 2, 3)
]
RESULTS = {"metrics": {"cbqa_em": 0.5, "by_set": {"a": 1.0}}}
needs_permissions = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")


class FakeRun:
    """What the Tracker uses of a ``wandb.Run``; ``fail`` names the call that raises."""

    def __init__(self, fail: str | None) -> None:
        self.fail, self.logged, self.finished = fail, [], []
        self.summary = types.SimpleNamespace(update=self._update)

    def _update(self, data: dict) -> None:
        if self.fail == "summary":
            raise RuntimeError("summary upload\nsecond line")
        self.summary_data = data

    def log(self, data: dict, step: int) -> None:
        if self.fail == "log" and step == 2:
            raise ConnectionError("network is unreachable")
        if self.fail == "routing" and any(k.startswith("routing/") for k in data):
            raise OSError(errno.ENOSPC, "No space left on device")
        self.logged.append((step, data))

    def finish(self, exit_code: int | None = None) -> None:
        self.finished.append(exit_code)
        if self.fail == "finish" and exit_code is None:
            raise RuntimeError("wandb service went away")


@pytest.fixture
def fake_wandb(monkeypatch):
    """Replace ``wandb.init`` by a fake; returns a function that sets the failing call and gives the run."""
    state: dict = {"fail": None, "run": None}

    def init(**kwargs) -> FakeRun:
        if state["fail"] == "init":
            raise PermissionError(errno.EACCES, "Permission denied", kwargs["dir"] + "/wandb")
        state["run"] = FakeRun(state["fail"])
        return state["run"]

    import wandb

    monkeypatch.setattr(wandb, "init", init)  # the real package otherwise (transformers looks it up too)

    def arm(fail: str | None) -> dict:
        state["fail"] = fail
        return state

    return arm


def drive(run_dir: Path, cfg: LoggerConfig = WANDB) -> Tracker:
    tracker = Tracker(run_dir, cfg, {"seed": 0}, name="run")
    for row, routing in zip(ROWS, ROUTING, strict=True):
        tracker.log(row)
        tracker.log_routing(routing)
    tracker.finish(RESULTS)
    return tracker


def assert_logs_whole(run_dir: Path) -> None:
    assert read_jsonl(run_dir / "metrics.jsonl") == ROWS
    assert read_jsonl(run_dir / "routing.jsonl") == [r for rows in ROUTING for r in rows]


def test_healthy_wandb_mirrors_the_jsonl(fake_wandb, tmp_path, caplog) -> None:
    state = fake_wandb(None)
    drive(tmp_path)
    assert_logs_whole(tmp_path)
    run = state["run"]
    assert [s for s, d in run.logged if "train/loss" in d] == [1, 2, 3]
    assert run.logged[1] == (1, {"routing/cv/m.0": 0.5, "routing/entropy/m.0": 1.0})
    assert run.summary_data == {"metrics/cbqa_em": 0.5} and run.finished == [None]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.parametrize(
    ("fail", "what", "last_step"),
    [
        ("init", "wandb.init", None),  # offline folder unwritable, online without network
        ("log", "wandb.log", 1),  # mid-run
        ("routing", "wandb.log", 1),
        ("summary", "wandb.finish", 3),
        ("finish", "wandb.finish", 3),
    ],
)
def test_wandb_failing_keeps_every_jsonl_line(fake_wandb, tmp_path, caplog, fail, what, last_step) -> None:
    state = fake_wandb(fail)
    drive(tmp_path)  # no exception: the run goes on
    assert_logs_whole(tmp_path)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1, warnings  # once, however many calls follow
    assert warnings[0].startswith(f"{what} failed") and "\n" not in warnings[0] and str(tmp_path) in warnings[0]
    run = state["run"]
    if run is not None:  # nothing is sent after the failure; a failed run's process is ended once
        assert max((s for s, _ in run.logged), default=None) == last_step
        assert run.finished == ([None] if what == "wandb.finish" else [1])


def test_real_wandb_with_an_unwritable_offline_folder(tmp_path, caplog, monkeypatch) -> None:
    """The real package, offline (no network): a file where its folder should go makes init raise."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    (tmp_path / "wandb").write_text("not a folder")
    drive(tmp_path)
    assert_logs_whole(tmp_path)
    warnings = [
        r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "moe_lora.tracking"
    ]
    assert len(warnings) == 1 and warnings[0].startswith("wandb.init failed"), warnings


def test_offline_wandb_prints_its_folder_and_the_sync_command(tmp_path, capsys, monkeypatch) -> None:
    """The real package, offline: the run's folder and `wandb sync <folder>` end the run's output."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    drive(tmp_path)
    note = capsys.readouterr().out.strip().splitlines()[-1]
    folder = re.fullmatch(r"W&B run saved offline in (\S+); upload it with: wandb sync (\S+)", note)
    assert folder and folder.group(1) == folder.group(2), note
    assert Path(folder.group(1)).parent == tmp_path / "wandb" and Path(folder.group(1)).name.startswith("offline-run-")
    assert any(Path(folder.group(1)).glob("*.wandb"))  # what `wandb sync` uploads


def test_online_and_fake_runs_print_no_offline_note() -> None:
    from moe_lora.tracking import offline_note

    assert offline_note(FakeRun(None)) is None
    assert offline_note(types.SimpleNamespace(offline=False, dir="/r/wandb/run-1/files")) is None
    offline = types.SimpleNamespace(offline=True, dir="/r/wandb/offline-run-1/files")  # no settings: dir's parent
    assert offline_note(offline) == (
        "W&B run saved offline in /r/wandb/offline-run-1; upload it with: wandb sync /r/wandb/offline-run-1"
    )


def test_training_goes_on_when_wandb_fails_mid_run(fake_wandb, run_cli, tmp_path) -> None:
    fake_wandb("log")
    run_dir = tmp_path / "run"
    code, _, err = run_cli("train", "adapter=lora", "logger=wandb", "recipe.threads=1", f"hydra.run.dir={run_dir}")
    assert code == 0, err
    assert json.loads((run_dir / "results.json").read_text())["adapter"] == "lora"
    losses = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r]
    assert losses and losses[-1] == OmegaConf.load(run_dir / "config.yaml").recipe.max_steps
    assert (run_dir / "train.log").read_text().count("wandb.log failed") == 1


# ------------------------------------------------------------------------------ the output folder
def test_full_disk_fails_with_one_line_naming_the_file(tmp_path) -> None:
    (tmp_path / "metrics.jsonl").symlink_to("/dev/full")  # every write: ENOSPC
    tracker = Tracker(tmp_path, LoggerConfig(), {}, name="run")
    with pytest.raises(OutputError) as info:
        tracker.log(ROWS[0])
    message = str(info.value)
    assert isinstance(info.value, ConfigError)  # the CLI prints it as `moe-lora: error: ...`
    assert "\n" not in message and str(tmp_path / "metrics.jsonl") in message and "No space left" in message
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    tracker.log_routing(ROUTING[0])  # the other file is unaffected
    tracker.finish()  # closing does not raise again
    assert read_jsonl(tmp_path / "routing.jsonl") == ROUTING[0]


class HalfThenFull:
    """A raw file that writes half of what it is given, then runs out of space."""

    def __init__(self, raw) -> None:
        self.raw, self.calls = raw, 0

    def write(self, data) -> int:
        self.calls += 1
        if self.calls > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return self.raw.write(data[: len(data) // 2])

    def fileno(self) -> int:
        return self.raw.fileno()

    def close(self) -> None:
        self.raw.close()


def test_a_write_cut_by_a_full_disk_leaves_whole_lines(tmp_path) -> None:
    tracker = Tracker(tmp_path, LoggerConfig(), {}, name="run")
    tracker.log(ROWS[0])
    tracker._metrics._file = HalfThenFull(tracker._metrics._file)
    with pytest.raises(OutputError, match=re.escape("metrics.jsonl")):
        tracker.log(ROWS[1])
    tracker.finish()
    assert (tmp_path / "metrics.jsonl").read_bytes() == (json.dumps(ROWS[0]) + "\n").encode()


def test_a_file_where_the_run_folder_should_be(tmp_path) -> None:
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(OutputError, match=re.escape(f"cannot write {tmp_path / 'taken' / 'run'}: ")):
        Tracker(tmp_path / "taken" / "run", LoggerConfig(), {}, name="run")
    with pytest.raises(OutputError, match=re.escape("results.json")):
        write_json_atomic(tmp_path / "taken" / "results.json", {})


@needs_permissions
def test_read_only_run_folder(tmp_path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    run_dir.chmod(0o500)
    try:
        expected = f"cannot write {run_dir / 'metrics.jsonl'}: Permission denied"
        with pytest.raises(OutputError, match=re.escape(expected)):
            Tracker(run_dir, LoggerConfig(), {}, name="run")
        with pytest.raises(OutputError, match=re.escape("results.json: Permission denied")):
            write_json_atomic(run_dir / "results.json", {})
    finally:
        run_dir.chmod(0o700)


def test_a_failed_atomic_write_keeps_the_previous_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "results.json"
    write_json_atomic(path, {"earlier": True})
    before = path.read_bytes()

    def full(*_args) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OutputError, match=re.escape(f"cannot write {path}: No space left on device")):
        write_json_atomic(path, {"later": True})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["results.json"]
