"""multibox.io: atomic writes keep the previous file on failure and leave no temporary file."""
from __future__ import annotations

import io
import os
import stat
import sys

import pytest

from multibox.io import atomic_path, atomic_write_bytes, atomic_write_text, progress_bar, remove_leftover_temporaries


class Boom(Exception):
    pass


def test_writes_the_content_and_returns_the_path(tmp_path):
    path = tmp_path / "a.json"
    assert atomic_write_text(path, "héllo\n") == path
    assert path.read_bytes() == "héllo\n".encode("utf-8")
    assert atomic_write_bytes(path, b"\x00\x01") == path    # replaces
    assert path.read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_plain_file_permissions_not_mkstemp_private(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o644


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_failed_write_keeps_previous_and_leaves_no_temp(tmp_path, monkeypatch, error):
    path = tmp_path / "eval.json"
    path.write_text("previous")
    real_fdopen = os.fdopen

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(bytes(data)[:3])   # part of the data reaches the disk, then the write fails
            raise error

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Failing(real_fdopen(fd, mode)))
    with pytest.raises(type(error)):
        atomic_write_bytes(path, b"new content")
    monkeypatch.undo()
    assert path.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_failed_rename_leaves_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def no_replace(src, dst):
        raise OSError(18, "Invalid cross-device link")
    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_path_renames_on_success(tmp_path):
    path = tmp_path / "model.onnx"
    with atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.onnx.") and tmp.suffix == ".tmp"
        assert not path.exists()
        tmp.write_bytes(b"graph")
    assert path.read_bytes() == b"graph"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


@pytest.mark.parametrize("error", [Boom("export failed"), KeyboardInterrupt()])
def test_atomic_path_failure_keeps_previous_and_leaves_no_temp(tmp_path, error):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous")
    with pytest.raises(type(error)):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a gra")
            raise error
    assert path.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


class _Console(io.StringIO):
    def __init__(self, terminal: bool):
        super().__init__()
        self.terminal = terminal

    def isatty(self) -> bool:
        return self.terminal


@pytest.mark.parametrize("terminal, enabled, drawn", [(True, True, True), (False, True, False), (True, False, False)])
def test_progress_bar_draws_on_a_terminal_only(monkeypatch, terminal, enabled, drawn):
    console = _Console(terminal)
    monkeypatch.setattr(sys, "stderr", console)
    bar = progress_bar(range(5), enabled, desc="epoch 1/2", file=console, mininterval=0)
    assert list(bar) == [0, 1, 2, 3, 4]   # iterates whether it draws or not
    bar.set_postfix(loss="0.5")
    bar.close()
    assert ("epoch 1/2" in console.getvalue()) is drawn


def test_leftover_temporaries_are_removed_and_nothing_else(tmp_path):
    names = ["last.pt", ".last.pt.k3j2.tmp", ".manifest.json.x9.tmp", "shard-00000.arrow", ".hidden", "a.tmp"]
    for name in names:
        (tmp_path / name).write_text(name)
    remove_leftover_temporaries(tmp_path, "*.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(set(names) - {".last.pt.k3j2.tmp"})
    remove_leftover_temporaries(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "a.tmp", "last.pt", "shard-00000.arrow"]
