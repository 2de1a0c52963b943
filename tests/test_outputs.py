"""outputs.atomic_dir: a folder appears whole or not at all, and a failure leaves the old one."""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_lora.outputs import atomic_dir


def _write(folder: Path, text: str) -> None:
    (folder / "a.txt").write_text(text)


def test_new_and_replaced_folders_appear_whole(tmp_path: Path) -> None:
    final = tmp_path / "sub" / "out"
    with atomic_dir(final) as tmp:
        _write(tmp, "one")
        assert not final.exists() and tmp.parent == final.parent
    assert (final / "a.txt").read_text() == "one"
    with atomic_dir(final) as tmp:
        _write(tmp, "two")
    assert (final / "a.txt").read_text() == "two"
    assert sorted(p.name for p in final.parent.iterdir()) == ["out"]  # no temporary or old folder left


def test_a_failed_write_leaves_the_previous_folder(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        _write(tmp, "one")
    with pytest.raises(RuntimeError), atomic_dir(final, tmp_path / ".fixed") as tmp:
        _write(tmp, "half")
        raise RuntimeError("disk full")
    assert (final / "a.txt").read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_keep_existing_keeps_the_first_writer(tmp_path: Path) -> None:
    final = tmp_path / "cache"
    with atomic_dir(final, keep_existing=True) as tmp:
        _write(tmp, "first")
        with atomic_dir(final, keep_existing=True) as other:  # a concurrent job finishes first
            _write(other, "second")
    assert (final / "a.txt").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["cache"]
