"""Data parallelism: `torchrun --nproc-per-node 2 -m mtpkit.distill` (gloo, CPU) gives the same loss
curve and held-out tau as one process at the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.distill_util import fake_mtbench_wheel, tiny_cli_args, tiny_target_dir


def _run(prefix: list[str], args: list[str], env: dict) -> dict:
    res = subprocess.run(prefix + args + ["--json"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_torchrun_two_processes_match_one(tmp_path):
    target = tiny_target_dir(tmp_path / "target")
    fake_mtbench_wheel(tmp_path / "cache")
    env = {**os.environ, "MTPKIT_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("MTPKIT_MTBENCH_WHEEL", None)
    kw = dict(steps=6, batch_size=4, eval_every=3)
    one = _run([sys.executable, "-m", "mtpkit.distill"], tiny_cli_args(target, tmp_path / "one", **kw), env)
    two = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "mtpkit.distill"],
               tiny_cli_args(target, tmp_path / "two", **kw), env)
    assert one["world_size"] == 1 and two["world_size"] == 2

    def losses(d):
        return [json.loads(ln)["loss"] for ln in (d / "log.jsonl").read_text().splitlines() if '"train"' in ln]
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 6
    assert b == pytest.approx(a, rel=1e-4, abs=1e-6)
    assert two["final"]["tau0"] == pytest.approx(one["final"]["tau0"], abs=1e-4)
    assert two["final"]["tau1"] == pytest.approx(one["final"]["tau1"], abs=1e-4)
    assert two["final"]["tau0_loop"] == pytest.approx(one["final"]["tau0_loop"], abs=1e-4)  # walks summed over ranks
    # the data set is the same whichever rank generated which shard
    ia, ib = (json.loads((tmp_path / d / "data" / "index.json").read_text()) for d in ("one", "two"))
    assert ia["key"] == ib["key"]
