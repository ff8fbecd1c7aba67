"""An export killed outright (kill -9) while it writes: OUT shows nothing half-written (only a hidden staging
directory is left), an earlier export there stays whole, and the next export removes the leftover and works.

ONNX, because tracing the graph takes seconds even for a tiny target: a window in which its staging directory
(mtpkit.paths.atomic_entries: `.staging-<pid>-*` inside OUT) exists long enough to be seen and killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtpkit.model.config import FULL, SLIDING
from mtpkit.paths import sweep
from tests.conftest import tiny_target
from tests.tiny_gguf import write_gguf

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

ROOT = Path(__file__).resolve().parents[1]


def _export(src: Path, out: Path, cache: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "MTPKIT_CACHE": str(cache), "MTPKIT_QUIET": "1"}
    return subprocess.Popen([sys.executable, "-m", "mtpkit", "export", "--format", "onnx", "--target", str(src),
                             "--drafter", "none", "--out", str(out), "--json", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_once_staging(p: subprocess.Popen, out: Path, timeout: float = 300) -> Path:
    """SIGKILL `p` as soon as its staging directory exists in `out`; returns that directory."""
    t_end = time.monotonic() + timeout
    while time.monotonic() < t_end:
        staging = [s for s in out.glob(f".staging-{p.pid}-*") if s.is_dir()] if out.is_dir() else []
        if staging:
            p.send_signal(signal.SIGKILL)
            p.wait()
            return staging[0]
        if p.poll() is not None:
            pytest.fail(f"the export ended (rc {p.returncode}) before its staging directory was seen: "
                        f"{p.stderr.read()}")
        time.sleep(0.01)
    p.kill()
    pytest.fail("no staging directory within the timeout")


def _visible(out: Path) -> dict[str, bytes]:
    return {str(f.relative_to(out)): f.read_bytes() for f in sorted(out.rglob("*"))
            if f.is_file() and not str(f.relative_to(out)).startswith(".")}


def test_killed_export_leaves_nothing_half_written(tmp_path):
    src = write_gguf(tiny_target(5, vocab_size=288, num_hidden_layers=2, layer_types=[SLIDING, FULL],
                                 hidden_size=64, intermediate_size=96, num_attention_heads=2, num_key_value_heads=1,
                                 head_dim=32, query_pre_attn_scalar=32.0), tmp_path / "t.gguf")
    out, cache = tmp_path / "out", tmp_path / "cache"
    # 1. killed into a new OUT: only the hidden staging directory is there
    p = _export(src, out, cache)
    staging = _kill_once_staging(p, out)
    assert p.returncode == -signal.SIGKILL
    assert [e.name for e in out.iterdir()] == [staging.name] and _visible(out) == {}
    # 2. the next export needs no --force (a dead process's staging does not count), removes it, and works
    p = _export(src, out, cache)
    stdout, stderr = p.communicate(timeout=600)
    assert p.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["format"] == "onnx"
    assert sorted(e.name for e in out.iterdir()) == ["export.json", "onnx.json", "target.onnx", "target.onnx.data",
                                                     "tokenizer.model"]
    # 3. killed while replacing that export (--force): every file of it is still there, whole
    before = _visible(out)
    p = _export(src, out, cache, "--force")
    staging = _kill_once_staging(p, out)
    assert _visible(out) == before and staging.exists()
    sweep(out, ".staging-")  # what the next export does first (mtpkit.paths.atomic_entries)
    assert not staging.exists() and _visible(out) == before
    assert sorted(e.name for e in out.iterdir()) == sorted(before)
