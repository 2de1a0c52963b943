"""Checkpoints hold data, not code, and are verified before a resume: a pickled payload is refused
without running, a same-size corruption is named before anything starts, an older checkpoint
(numpy arrays in its RNG file, no SHA-256s) still resumes bitwise, and a full disk mid-write ends
in one line with the previous checkpoint intact."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lora.errors import ConfigError
from moe_lora.train import checkpoint
from tests.train.forked import in_child, main
from tests.train.test_checkpoint import _snapshot, kill_after_checkpoint

RUN = ["adapter=lora", "recipe.max_steps=6", "recipe.save_every=3", "recipe.log_every=3", "recipe.threads=1"]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory, cache_dir) -> Path:
    """A run killed just after its step-3 checkpoint (read-only: tests copy it)."""
    run_dir = tmp_path_factory.mktemp("safety") / "run"
    assert in_child([*RUN, f"hydra.run.dir={run_dir}"], cache_dir, kill_after_checkpoint(3)) == -9
    return run_dir


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir) -> Path:
    run_dir = tmp_path_factory.mktemp("safety_ref") / "run"
    assert main([*RUN, f"hydra.run.dir={run_dir}"], cache_dir) == 0
    return run_dir


def train(cache_dir, capsys, *args: str) -> tuple[int, str]:
    """``moe-lora train``'s exit code and stderr, whether it returns or exits."""
    capsys.readouterr()
    try:
        code = main(list(args), cache_dir)
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def step(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "step-3"


def rewrite_meta(folder: Path, drop_hashes: bool = False) -> None:
    """What a crafted checkpoint does: sizes and SHA-256s that fit its files."""
    meta = json.loads((folder / "checkpoint.json").read_text())
    names = sorted(meta["files"])
    meta["files"] = {n: (folder / n).stat().st_size for n in names}
    meta["sha256"] = {n: checkpoint.sha256(folder / n) for n in names}
    if drop_hashes:
        del meta["sha256"]
    (folder / "checkpoint.json").write_text(json.dumps(meta))


class Payload:
    """Unpickling it runs a shell command that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_files_are_data_with_their_sizes_and_hashes(checkpointed) -> None:
    folder = step(checkpointed)
    meta = json.loads((folder / "checkpoint.json").read_text())
    names = sorted(n for n in os.listdir(folder) if n != "checkpoint.json")
    assert sorted(meta["sha256"]) == sorted(meta["files"]) == names
    for name, digest in meta["sha256"].items():
        assert checkpoint.sha256(folder / name) == digest
        if name.endswith(".pt"):  # no allow-list needed: tensors and plain values only
            assert torch.serialization.get_unsafe_globals_in_checkpoint(str(folder / name)) == []
            torch.load(folder / name, weights_only=True)


@pytest.mark.parametrize("name", ["trainer.pt", "optimizer.pt", "rng-rank0.pt"])
def test_a_pickled_payload_is_refused_and_never_runs(name, checkpointed, cache_dir, capsys, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    folder, marker = step(run_dir), tmp_path / "ran"
    state = torch.load(folder / name, weights_only=True)
    torch.save({**state, "extra": Payload(marker)}, folder / name)
    rewrite_meta(folder)  # the sizes and hashes fit: only the contents betray it
    before = _snapshot(run_dir)
    code, err = train(cache_dir, capsys, *RUN, "resume=auto", f"hydra.run.dir={run_dir}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"checkpoint file {folder / name} holds code, not only data (it would call posix.system)" in err
    with pytest.raises(ConfigError, match="holds code"):  # the load itself refuses it too
        checkpoint._read(folder / name, "state")
    assert not marker.exists()
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("name", ["adapter.safetensors", "optimizer.pt"])
def test_same_size_corruption_is_named_before_anything_starts(name, checkpointed, cache_dir, capsys, tmp_path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    damaged = step(run_dir) / name
    data = bytearray(damaged.read_bytes())
    data[len(data) * 3 // 4] ^= 0x01  # one bit inside the tensor data: the file still parses
    damaged.write_bytes(bytes(data))
    before = _snapshot(run_dir)
    code, err = train(cache_dir, capsys, *RUN, "resume=auto", f"hydra.run.dir={run_dir}")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert f"checkpoint file {damaged} is damaged (its SHA-256 differs" in err
    assert _snapshot(run_dir) == before


def test_an_older_checkpoint_still_resumes_bitwise(checkpointed, reference, cache_dir, tmp_path) -> None:
    """Written before this format: the RNG file holds numpy's key array as an ndarray (loaded
    through the allow-listed numpy reconstructors), checkpoint.json sizes only."""
    run_dir = tmp_path / "run"
    shutil.copytree(checkpointed, run_dir)
    folder = step(run_dir)
    rng = torch.load(folder / "rng-rank0.pt", weights_only=True)
    kind, keys, *rest = rng["numpy"]
    torch.save({**rng, "numpy": (kind, np.array(keys, dtype=np.uint32), *rest)}, folder / "rng-rank0.pt")
    assert "numpy.ndarray" in torch.serialization.get_unsafe_globals_in_checkpoint(str(folder / "rng-rank0.pt"))
    rewrite_meta(folder, drop_hashes=True)
    assert main([*RUN, "resume=auto", f"hydra.run.dir={run_dir}"], cache_dir) == 0
    assert (run_dir / "adapter_model.safetensors").read_bytes() == (
        reference / "adapter_model.safetensors"
    ).read_bytes()


def _full_disk_torch(target: str):
    real = torch.save

    def save(obj, path, *args, **kwargs):
        if str(path).endswith(target):  # what torch raises when the disk fills mid-file
            Path(path).write_bytes(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
        return real(obj, path, *args, **kwargs)

    return save


def _full_disk_safetensors(target: str):
    from safetensors import SafetensorError

    real = checkpoint.save_file

    def save_file(tensors, path, *args, **kwargs):
        if str(path).endswith(target):  # what safetensors raises on ENOSPC
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, path, *args, **kwargs)

    return save_file


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_previous(
    writer, cache_dir, capsys, monkeypatch, tmp_path
) -> None:
    run_dir = tmp_path / "run"
    if writer == "torch":
        monkeypatch.setattr(torch, "save", _full_disk_torch(".tmp-step-6/optimizer.pt"))
    else:
        monkeypatch.setattr(checkpoint, "save_file", _full_disk_safetensors(".tmp-step-6/adapter.safetensors"))
    code, err = train(cache_dir, capsys, *RUN, f"hydra.run.dir={run_dir}")
    assert code == 1 and err.count("moe-lora: error:") == 1 and "Traceback" not in err, err
    line = err.split("moe-lora: error:")[1].splitlines()[0]  # after the progress bars
    assert f"cannot write checkpoint {run_dir / 'checkpoints' / 'step-6'}" in line
    assert "MiB free there" in line and "the previous checkpoint is intact" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-3"]
    checkpoint.read_meta(step(run_dir))  # sizes and hashes as written
    monkeypatch.undo()
    assert train(cache_dir, capsys, *RUN, "resume=auto", f"hydra.run.dir={run_dir}")[0] == 0


def test_resume_of_a_folder_without_checkpoints_points_to_resume_auto(tmp_path) -> None:
    with pytest.raises(ConfigError, match="resume=auto continues where there is one"):
        checkpoint.plan(tmp_path, str(tmp_path), {}, sweep=False)
