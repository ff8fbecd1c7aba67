"""mtpkit.paths' atomic writers: a reader never sees half a file or directory, and a failure leaves nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mtpkit.paths import atomic_dir, atomic_entries, atomic_file, atomic_write


def _names(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_atomic_write_failure_mid_write_leaves_no_file_and_no_temp(tmp_path, monkeypatch):
    write_bytes = Path.write_bytes

    def half_then_disk_full(self, data):
        write_bytes(self, data[: len(data) // 2])
        raise OSError(28, "No space left on device")

    atomic_write(tmp_path / "sub" / "a.json", "{}")  # makes the parent
    assert (tmp_path / "sub" / "a.json").read_text() == "{}"
    monkeypatch.setattr(Path, "write_bytes", half_then_disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "b.bin", b"0123456789")
    with pytest.raises(OSError, match="No space"):
        atomic_write(tmp_path / "sub" / "a.json", '{"new": 1}')
    assert _names(tmp_path) == ["sub"] and _names(tmp_path / "sub") == ["a.json"]  # no file, no temporary
    assert (tmp_path / "sub" / "a.json").read_text() == "{}"  # the old content, whole


def test_atomic_file_for_writers_that_take_a_path(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "lib.so") as tmp:
        tmp.write_bytes(b"partial")
        raise KeyboardInterrupt
    assert _names(tmp_path) == []
    with atomic_file(tmp_path / "lib.so") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".lib.so.") and tmp.is_file()
        tmp.write_bytes(b"whole")
        assert not (tmp_path / "lib.so").exists()  # nothing visible until the writer is done
    assert _names(tmp_path) == ["lib.so"] and (tmp_path / "lib.so").read_bytes() == b"whole"
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "lib.so").stat().st_mode & 0o777 == 0o666 & ~umask  # an ordinary file, not mkstemp's 0600


def test_atomic_entries_replaces_named_entries_only(tmp_path):
    out = tmp_path / "out"
    (out / "target").mkdir(parents=True)
    (out / "target" / "old").write_text("1")
    (out / "drafter.gguf").write_text("stale")
    (out / "notes.txt").write_text("the user's")
    names = ("target", "target.gguf", "drafter.gguf")
    with atomic_entries(out, names) as stage:
        (stage / "target").mkdir()
        (stage / "target" / "new").write_text("2")
        (stage / "target.gguf").write_text("t")
        assert _names(out) == sorted(["target", "drafter.gguf", "notes.txt", stage.name])  # nothing landed yet
    assert _names(out) == ["notes.txt", "target", "target.gguf"]  # the stale drafter.gguf went
    assert _names(out / "target") == ["new"]
    # a failure (a parity check, say): OUT as it was, no staging directory left
    with pytest.raises(RuntimeError), atomic_entries(out, names) as stage:
        (stage / "target.gguf").write_text("half")
        raise RuntimeError("beyond tolerance")
    assert _names(out) == ["notes.txt", "target", "target.gguf"] and (out / "target.gguf").read_text() == "t"
    # an OUT that the failed call created is removed again
    with pytest.raises(RuntimeError), atomic_entries(tmp_path / "fresh", names):
        raise RuntimeError("beyond tolerance")
    assert not (tmp_path / "fresh").exists()


def test_atomic_dir_keep_existing_keeps_the_first_writer(tmp_path):
    d = tmp_path / "cache"
    with atomic_dir(d, keep_existing=True) as t:
        (t / "x").write_text("first")
    with atomic_dir(d, keep_existing=True) as t:  # lost the race: theirs stays, ours goes
        (t / "x").write_text("second")
    assert (d / "x").read_text() == "first" and _names(tmp_path) == ["cache"]
    with atomic_dir(d) as t:
        (t / "x").write_text("third")
    assert (d / "x").read_text() == "third" and _names(tmp_path) == ["cache"]


def test_temporaries_of_dead_processes_are_swept_by_the_next_writer(tmp_path):
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited (pids are not reused this fast)
    (tmp_path / f".a.json.{pid}.x1.tmp").write_text("half")  # what kill -9 leaves: atomic_file's temporary
    (tmp_path / f".d-{pid}-x2").mkdir()  # atomic_dir's
    (tmp_path / f".a.json.{os.getppid()}.x3.tmp").write_text("live")  # a live process's: kept
    atomic_write(tmp_path / "a.json", "{}")
    with atomic_dir(tmp_path / "d") as d:
        (d / "f").write_text("1")
    out = tmp_path / "out"
    out.mkdir()
    (out / f".staging-{pid}-x4").mkdir()
    with atomic_entries(out, ["f"]) as stage:
        (stage / "f").write_text("1")
    assert _names(tmp_path) == [f".a.json.{os.getppid()}.x3.tmp", "a.json", "d", "out"]
    assert _names(out) == ["f"]
