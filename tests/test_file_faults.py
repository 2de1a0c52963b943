"""Every file failure is one line (issue 28, item 6): a full disk on any write of a run (adapter,
results, predictions, config, evaluations), a damaged run under `moe-lora eval`, invalid model
folders and missing tokenizers in the precheck, unreadable data files without datasets' own log
line; run files as readable as the rest (0644 under the usual umask). A full disk is injected
(``OSError(ENOSPC)`` from a writer, safetensors' error text) or made real by the kernel (a file-size
limit: ``EFBIG`` from the very write calls safetensors' Rust code makes)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import resource
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from moe_lora import tracking
from moe_lora.errors import ConfigError, OutputError
from moe_lora.recipes import results
from moe_lora.recipes.results import write_adapter
from moe_lora.tracking import write_json_atomic, write_jsonl_atomic, write_text_atomic

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
TENSORS = {"layer.lora_A": torch.arange(12.0).reshape(3, 4), "layer.lora_B": torch.zeros(4, 3)}


pytestmark = pytest.mark.usefixtures("fresh_logging")  # tests/conftest.py: stderr without "Logging error"


def one_line(err: str) -> str:
    """The single ``moe-lora: error:`` line of a command's stderr (fails on a traceback)."""
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith("moe-lora: error: "), err
    return lines[0]


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def writers(folder: Path) -> dict[str, tuple[Path, object]]:
    """Each whole-file writer of a run, with the file it writes."""
    return {
        "results.json": (folder / "results.json", lambda p: write_json_atomic(p, {"metrics": {}})),
        "predictions.jsonl": (folder / "predictions.jsonl", lambda p: write_jsonl_atomic(p, [{"id": 1}])),
        "config.yaml": (folder / "config.yaml", lambda p: write_text_atomic(p, "seed: 0\n")),
        "adapter_model.safetensors": (folder / "adapter_model.safetensors", lambda p: write_adapter(p, TENSORS)),
    }


# ------------------------------------------------------------------------------------- file modes
@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_run_files_get_the_mode_the_umask_gives(tmp_path, mask: int, mode: int) -> None:
    with umask(mask):
        for name, (path, write) in writers(tmp_path).items():
            write(path)
            assert path.stat().st_mode & 0o777 == mode, name
        with open(tmp_path / "metrics.jsonl", "w"):  # what the logs beside them get
            pass
    assert (tmp_path / "metrics.jsonl").stat().st_mode & 0o777 == mode


def test_folders_written_whole_get_the_mode_the_umask_gives(tmp_path) -> None:
    from moe_lora.outputs import atomic_dir

    with umask(0o022), atomic_dir(tmp_path / "report") as tmp:
        (tmp / "index.md").write_text("x")
    assert (tmp_path / "report").stat().st_mode & 0o777 == 0o755  # not mkdtemp's 0700


# --------------------------------------------------------------------------------- a full disk
class HalfThenFull:
    """A text file that writes half of what it is given, then runs out of space."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, text: str) -> int:
        self.f.write(text[: len(text) // 2])
        self.f.flush()
        raise ENOSPC

    def writelines(self, lines) -> None:
        self.write("".join(lines))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()


@pytest.mark.parametrize("name", ["results.json", "predictions.jsonl", "config.yaml"])
def test_a_full_disk_mid_write_is_one_line_and_keeps_the_previous_file(tmp_path, monkeypatch, name) -> None:
    path, write = writers(tmp_path)[name]
    write(path)
    before = path.read_bytes()
    full = lambda p, mode="r": HalfThenFull(open(p, mode))  # noqa: E731, SIM115 (closed by HalfThenFull)
    monkeypatch.setattr(tracking, "open", full, raising=False)
    with pytest.raises(OutputError) as info:
        write(path)
    message = str(info.value)
    assert message == f"cannot write {path}: No space left on device (free space, or choose a writable hydra.run.dir)"
    assert info.value.__cause__ is ENOSPC
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temp file


@pytest.mark.parametrize(
    "text",
    [
        'Error while serializing: I/O error: No space left on device (os error 28) at path "/x/.tmpAb12"',  # >= 0.5
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })',
    ],
)
def test_safetensors_running_out_of_space_is_one_line(tmp_path, monkeypatch, text: str) -> None:
    from safetensors import SafetensorError

    path = tmp_path / "adapter_model.safetensors"
    write_adapter(path, TENSORS)
    before = path.read_bytes()

    def full(tensors, filename, metadata=None) -> None:
        Path(filename).write_bytes(b"\0" * 10)  # an older safetensors writes in place, then fails
        raise SafetensorError(text)

    monkeypatch.setattr(results, "save_file", full)  # where write_adapter looks it up
    with pytest.raises(OutputError, match=re.escape(f"cannot write {path}: No space left on device (")):
        write_adapter(path, {"x": torch.ones(3)})
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_safetensors_errors_that_are_not_io_pass_through(tmp_path) -> None:
    with pytest.raises(Exception, match="contiguous") as info:
        write_adapter(tmp_path / "a.safetensors", {"x": torch.ones(4, 4).t()})
    assert not isinstance(info.value, OutputError) and list(tmp_path.iterdir()) == []


def test_the_adapter_is_renamed_into_place_by_the_project(tmp_path, monkeypatch) -> None:
    """Whatever safetensors does itself (0.8 renames, 0.4 writes in place), the project writes a
    temporary file beside the adapter and renames it: the adapter is whole or absent."""
    replaced: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(tracking.os, "replace", lambda a, b: (replaced.append((str(a), str(b))), real(a, b)))
    path = tmp_path / "adapter_model.safetensors"
    write_adapter(path, TENSORS)
    assert [Path(b) for _, b in replaced][-1] == path
    tmp = Path(replaced[-1][0])
    assert tmp.parent == tmp_path and tmp.name.startswith(".adapter_model.safetensors.") and not tmp.exists()
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["layer.lora_A"], TENSORS["layer.lora_A"])


def test_a_real_write_failure_from_the_kernel_is_one_line(tmp_path) -> None:
    """RLIMIT_FSIZE makes the kernel refuse writes past 64 KiB (EFBIG): the same path as a full disk
    through safetensors' own (Rust) writes and Python's."""
    big = {"w": torch.zeros(64, 1024)}  # 256 KiB
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
    try:
        with pytest.raises(OutputError) as adapter:
            write_adapter(tmp_path / "adapter_model.safetensors", big)
        with pytest.raises(OutputError) as results:
            write_json_atomic(tmp_path / "results.json", {"x": "y" * 200_000})
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    too_large = os.strerror(errno.EFBIG)
    assert str(adapter.value).startswith(f"cannot write {tmp_path / 'adapter_model.safetensors'}: {too_large} (")
    assert str(results.value).startswith(f"cannot write {tmp_path / 'results.json'}: {too_large} (")
    assert list(tmp_path.iterdir()) == []


def test_torch_running_out_of_space_is_an_io_failure() -> None:
    """torch.save reports a full disk as a RuntimeError without an errno; it is still one line."""
    exc = RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0\nfile write failed")
    assert tracking.write_reason(exc) == "the write failed (is the disk full?)"
    assert tracking.write_reason(ValueError("a bug")) is None


@pytest.mark.slow
def test_a_full_disk_at_the_adapter_ends_training_in_one_line(run_cli, tmp_path, monkeypatch, capsys) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    real = safetensors.torch.save_file

    def full_at_the_adapter(tensors, filename, metadata=None) -> None:
        if Path(filename).name.startswith(".adapter_model.safetensors."):
            raise SafetensorError(
                f'Error while serializing: I/O error: No space left on device (os error 28) at path "{filename}"'
            )
        real(tensors, filename, metadata)

    monkeypatch.setattr(results, "save_file", full_at_the_adapter)  # the runner's adapter writer
    with pytest.raises(SystemExit) as exit_info:  # a failed job exits with 1 (its line printed first)
        run_cli("train", "adapter=lora", f"hydra.run.dir={tmp_path / 'run'}")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    adapter = tmp_path / "run" / "adapter_model.safetensors"
    assert "Traceback" not in err  # progress bars above, then the one line
    assert err.strip().splitlines()[-1].startswith(f"moe-lora: error: cannot write {adapter}: No space left on device")
    assert not adapter.exists() and not (tmp_path / "run" / "results.json").exists()
    assert "No space left on device" in json.loads((tmp_path / "run" / "failure.json").read_text())["error"]
    assert not [p for p in (tmp_path / "run").iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------ a damaged run
def damaged_run(folder: Path, config: str | None = "adapter:\n  name: lora\n", adapter: bytes | None = None) -> Path:
    folder.mkdir()
    if config is not None:
        (folder / "config.yaml").write_text(config)
    if adapter is not None:
        (folder / "adapter_model.safetensors").write_bytes(adapter)
    return folder


def whole_adapter(tmp_path: Path) -> bytes:
    write_adapter(tmp_path / "whole.safetensors", TENSORS)
    return (tmp_path / "whole.safetensors").read_bytes()


@pytest.mark.parametrize(
    "case, names",
    [
        ("cut adapter", "adapter_model.safetensors cannot be read (Error while deserializing header"),
        ("empty adapter", "adapter_model.safetensors cannot be read ("),
        ("adapter folder", "has no adapter_model.safetensors"),
        ("no adapter", "has no adapter_model.safetensors"),
        ("no config", "has no config.yaml"),
        ("cut config", "config.yaml cannot be read ("),
        ("foreign config", "config.yaml has no adapter.name"),
    ],
)
def test_eval_on_a_damaged_run_is_one_line_naming_the_file(run_cli, tmp_path, case: str, names: str) -> None:
    good = whole_adapter(tmp_path)
    run = {
        "cut adapter": lambda: damaged_run(tmp_path / "run", adapter=good[: len(good) * 2 // 3]),
        "empty adapter": lambda: damaged_run(tmp_path / "run", adapter=b""),
        "adapter folder": lambda: (damaged_run(tmp_path / "run") / "adapter_model.safetensors").mkdir(),
        "no adapter": lambda: damaged_run(tmp_path / "run"),
        "no config": lambda: damaged_run(tmp_path / "run", config=None, adapter=good),
        "cut config": lambda: damaged_run(tmp_path / "run", config="adapter:\n  name: [lora\n", adapter=good),
        "foreign config": lambda: damaged_run(tmp_path / "run", config="- 1\n- 2\n", adapter=good),
    }[case]
    run()
    code, _, err = run_cli("eval", f"run_dir={tmp_path / 'run'}", tiny=False)
    assert code == 2
    line = one_line(err)
    assert names in line and str(tmp_path / "run") in line
    assert not list((tmp_path / "run").glob("eval-*"))


# ------------------------------------------------------------------------ invalid model folders
def broken_model(checkpoints, tmp_path: Path, how: str) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(checkpoints["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    if how == "wrong field type":  # transformers 5's strict dataclasses: a traceback before
        (folder / "config.json").write_text(json.dumps({**config, "hidden_size": "wide"}))
    elif how == "failed architecture check":
        (folder / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3}))
    elif how == "cut config.json":
        (folder / "config.json").write_text(json.dumps(config)[:40])
    elif how == "no tokenizer":
        for p in folder.glob("tokenizer*"):
            p.unlink()
    elif how == "cut weights":
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


@pytest.mark.parametrize(
    "how, names",
    [
        (
            "wrong field type",
            "config.json cannot be read (Validation error for field 'hidden_size': Field 'hidden_size' expected int",
        ),
        ("failed architecture check", "config.json cannot be read (Class validation error"),
        ("cut config.json", "config.json cannot be read ("),
        ("no tokenizer", "has no tokenizer (none of tokenizer.json, tokenizer_config.json"),
        ("cut weights", "model.safetensors cannot be read (Error while deserializing header"),
    ],
)
def test_an_invalid_model_folder_fails_in_the_precheck_naming_the_file(
    run_cli, checkpoints, tmp_path, how: str, names: str
) -> None:
    folder = broken_model(checkpoints, tmp_path, how)
    run_dir = tmp_path / "run"
    code, _, err = run_cli(
        "train",
        "model.source=hub",
        f"model.name_or_path={folder}",
        f"hydra.run.dir={run_dir}",
        "recipe=smoke",
        tiny=False,
    )
    assert code == 2
    line = one_line(err)
    assert names in line and str(folder) in line
    assert not run_dir.exists()  # the precheck, before Hydra makes the run folder


def test_a_damaged_tokenizer_past_the_precheck_is_one_line(checkpoints, tmp_path) -> None:
    from moe_lora.config import ModelConfig
    from moe_lora.model.load import hub_model

    folder = broken_model(checkpoints, tmp_path, "none")
    text = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match=re.escape(f"the tokenizer in {folder} cannot be loaded (")):
        hub_model(ModelConfig(source="hub", name_or_path=str(folder)))


# --------------------------------------------------------------------------------- data files
@pytest.mark.parametrize(
    "suffix, text, reason",
    [
        (".jsonl", '{"question": "a", "answer": "b"}\n{"question": "a", "ans\n', "JSON parse error"),
        (".csv", 'question,answer\n1,2,3\n"x\n', "Error tokenizing data"),
    ],
)
def test_a_data_file_datasets_cannot_read_is_one_line_without_its_log(tmp_path, capfd, suffix, text, reason) -> None:
    from moe_lora.data.sources import ResolvedSource

    path = tmp_path / f"bad{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        ResolvedSource("alpaca", "files", str(path)).load()
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # datasets' "Failed to load JSON from file '/abs/path'" line is gone
    message = str(info.value)
    assert message.startswith(f"data.sources.alpaca: {path} cannot be read as a dataset (") and reason in message


# ------------------------------------------------------------------------------ resume messages
def test_a_hash_mismatch_with_a_matching_config_yaml_is_not_called_missing(tmp_path) -> None:
    from moe_lora.config import resolved_config
    from moe_lora.recipes.compose import load_config
    from moe_lora.train import checkpoint

    resolved = resolved_config(load_config([], check_files=False))
    run_dir = tmp_path / "run"
    step = run_dir / "checkpoints" / "step-5"
    step.mkdir(parents=True)
    (step / "checkpoint.json").write_text(json.dumps({"step": 5, "config_hash": "0" * 16, "files": {}}))
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    with pytest.raises(ConfigError) as info:
        checkpoint.plan(run_dir, "auto", resolved, sweep=False)
    message = str(info.value)
    assert "missing" not in message and "matches this config" in message
    assert str(step / "checkpoint.json") in message and str(run_dir / "config.yaml") in message
    (run_dir / "config.yaml").unlink()
    with pytest.raises(ConfigError, match=re.escape(f"{run_dir / 'config.yaml'} is missing")):
        checkpoint.plan(run_dir, "auto", resolved, sweep=False)


def test_a_cache_dir_that_cannot_be_written_is_one_line(run_cli, tmp_path, capsys) -> None:
    from tests.conftest import TINY

    (tmp_path / "cache").write_text("a file where the cache folder should be")
    with pytest.raises(SystemExit) as exit_info:
        run_cli("train", *TINY, f"cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", tiny=False)
    assert exit_info.value.code == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"moe-lora: error: cannot write {tmp_path / 'cache'}/world-model-")
    assert line.endswith("(free space, or choose a writable cache_dir)")


def test_a_full_disk_while_caching_the_world_model_is_one_line(tmp_path) -> None:
    from safetensors import SafetensorError

    from moe_lora.tracking import cache_writes

    expected = re.escape(f"cannot write {tmp_path}: No space left on device")
    with pytest.raises(OutputError, match=expected), cache_writes(tmp_path):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with pytest.raises(KeyError), cache_writes(tmp_path):  # not I/O: passes through
        raise KeyError("a bug")
