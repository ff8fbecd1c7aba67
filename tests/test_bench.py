"""`mtpkit bench | report | predict | profile-device` on a tiny GGUF target: document layout, identity checks,
outputs, bad input; the predictor's cost model on synthetic numbers. No timing is asserted."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from mtpkit.bench import predict as pr
from mtpkit.bench.runner import spread
from mtpkit.bench.schema import check_document
from mtpkit.cli import app
from mtpkit.errors import MtpkitError
from mtpkit.suites import SuitePrompt
from tests.conftest import fails_cleanly, tiny_drafter, tiny_target
from tests.tiny_gguf import write_gguf

runner = CliRunner()


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def pair(tmp_path):
    from mtpkit.model.load import save_drafter
    t = tiny_target(3, vocab_size=300)
    save_drafter(tiny_drafter(t), tmp_path / "drafter")
    suite = tmp_path / "suite.jsonl"
    suite.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "abc abc abc", "category": "a"}, {"turns": ["hello there", "second turn"], "category": "b"},
        {"id": "x", "prompt": "def g"}]) + "\n")
    return write_gguf(t, tmp_path / "tiny.gguf"), tmp_path / "drafter", suite


def test_bench_document_outputs_and_identity(pair, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    pytest.importorskip("matplotlib")
    target, drafter, suite = pair
    out = tmp_path / "res"
    res = runner.invoke(app, ["bench", "--target", str(target), "--drafter", str(drafter), "--suite", str(suite),
                              "--device", "cpu", "--max-new-tokens", "12", "-k", "3", "--repeats", "2",
                              "--min-confidence", "0", "--baselines", "hf,llamacpp", "--quiet",
                              "--json", str(out / "b.json"), "--markdown", str(out / "b.md"), "--plot", str(out / "b.png")])
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "b.json").read_text())
    check_document(doc)
    names = ["plain", "speculative", "hf_generate", "hf_prompt_lookup", "llamacpp", "llamacpp_prompt_lookup"]
    assert list(doc["summary"]) == names and not doc["skipped"]
    s = doc["summary"]
    assert s["speculative"]["greedy_identical"] == {"identical": 3, "prompts": 3}
    assert "speculative" not in doc["greedy_mismatch"]
    assert s["plain"]["tau"] == 1.0 and s["speculative"]["tau"] >= 1.0 and s["llamacpp"]["tau"] == 1.0
    assert 1 <= len(s["speculative"]["acceptance"]) <= 3 and s["speculative"]["c"] > 0
    assert s["plain"]["speedup"] == 1.0 and all(v["tok_per_s"] > 0 for v in s.values())
    assert set(doc["by_category"]) == {"a", "b", "uncategorized"}
    for p in doc["prompts"]:
        r = p["results"]
        assert all(len(r[n]["tok_per_s_runs"]) == 2 for n in names)
        assert r["speculative"]["identical_to_reference"] is True
        assert all(n == 12 or n < 12 for n in r["plain"]["new_tokens"])
    assert doc["machine"]["cpu"] and doc["machine"]["versions"]["torch"]
    assert doc["settings"]["device"] == "cpu" and doc["models"]["drafter"]["params"] > 0
    md = (out / "b.md").read_text()
    assert "| speculative |" in md and "| llamacpp_prompt_lookup |" in md and "Machine:" in md
    assert (out / "b.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the same table from the JSON alone, and a prediction with its validation on a matching profile
    again = runner.invoke(app, ["report", str(out / "b.json"), "--plot", str(out / "c.png")])
    assert again.exit_code == 0 and "| speculative |" in again.output and (out / "c.png").stat().st_size > 0
    prof = {"name": "here", "memory_bandwidth_gbs": 20, "compute_tflops": {"fp32": 0.05}, "figures": "measured",
            "runtime": "torch-cpu", "match": [doc["machine"]["cpu"]]}
    (tmp_path / "here.json").write_text(json.dumps(prof))
    pred = runner.invoke(app, ["predict", str(out / "b.json"), "--profile", str(tmp_path / "here.json"), "--json"])
    assert pred.exit_code == 0, pred.output
    v = json.loads(pred.output)["validation"]
    assert v["profile"] == "here" and v["measured_speedup"] == s["speculative"]["speedup"]


def test_bench_bad_input(pair, tmp_path):
    target, drafter, suite = pair
    base = ["bench", "--target", str(target), "--drafter", str(drafter), "--suite", str(suite), "--device", "cpu"]
    fails_cleanly(base + ["--json", str(tmp_path / "x.txt")], "--json expects a .json file")
    fails_cleanly(base + ["--plot", str(tmp_path / "x.jpg")], "--plot expects a .png file")
    fails_cleanly(base + ["--baselines", "vllm"], "unknown baselines")
    fails_cleanly(base + ["--repeats", "0"], "--repeats")
    fails_cleanly(base + ["--limit", "0"], "--limit")
    fails_cleanly(base + ["--verify-rows", "some"], "--verify-rows must be one of lazy, all, both")
    fails_cleanly(base + ["--pipeline", "maybe"], "--pipeline must be one of on, off, both")
    fails_cleanly(base + ["--verify", "some"], "--verify must be one of block, token, both")
    fails_cleanly(base[:-4] + ["--suite", "nope", "--device", "cpu"], "unknown suite")
    fails_cleanly(["bench", "--target", str(target), "--suite", str(suite), "--device", "cpu"], "no drafter")
    (tmp_path / "not.json").write_text('{"a": 1}')
    fails_cleanly(["report", str(tmp_path / "not.json")], "not an mtpkit.bench/1 document")
    fails_cleanly(["predict", str(tmp_path / "not.json")], "not an mtpkit.bench/1 document")
    assert not list(tmp_path.glob("x.*"))


def test_named_baseline_that_cannot_run_is_an_error(pair, tmp_path):
    """A baseline asked for by name must run (llama.cpp needs a GGUF target); under `auto` it is skipped with
    the reason recorded."""
    pytest.importorskip("llama_cpp")
    import mtpkit
    from mtpkit.bench.runner import BenchConfig, _build_methods
    from tests.test_import_cli import _hf_dir
    target, drafter, suite = pair
    d = _hf_dir(tiny_target(3, vocab_size=300), tmp_path / "hf")
    s = mtpkit.load(str(d), drafter=str(drafter), device="cpu")
    with pytest.raises(MtpkitError, match="not loaded from a GGUF"):
        _build_methods(BenchConfig(baselines="llamacpp"), s, 8, print)
    notes = []
    methods, skipped = _build_methods(BenchConfig(baselines="auto"), s, 8, notes.append)
    assert "llamacpp" in skipped and "llamacpp" not in [m.name for m in methods] and notes


def _session(pair):
    import mtpkit
    target, drafter, _ = pair
    return mtpkit.load(str(target), drafter=str(drafter), device="cpu")


def _methods(session, notes: list, **cfg):
    """The methods `mtpkit bench` builds with these settings and no baselines (its notes appended to `notes`)."""
    from mtpkit.bench.runner import BenchConfig, _build_methods
    return _build_methods(BenchConfig(baselines="none", **cfg), session, 8, notes.append)[0]


def test_verify_rows_both_runs_the_head_on_every_row_beside(pair, tmp_path):
    """--verify-rows both: `speculative_all_rows` (verify, every head row) beside `speculative` (verify_rows where the
    backend has it), same gate; a backend without verify_rows gets a note that the two run the same path. `plain` is
    the backend's own step; with verify_rows (and not --verify-rows all) `plain_rows` decodes plainly through it."""
    s, notes = _session(pair), []
    methods = _methods(s, notes, verify_rows="both")
    assert [(m.name, m.gen["lazy_rows"]) for m in methods] == [("plain", False), ("speculative", True),
                                                               ("speculative_all_rows", False)]
    assert methods[2].must_match and any("verify_rows" in n for n in notes)  # torch has none
    # a backend with verify_rows (llama.cpp): plain decoding through it too, greedy-checked against the stock step
    s.backend.verify_rows = s.backend.verify
    for rows, want in (("lazy", ["plain", "plain_rows", "speculative"]), ("all", ["plain", "speculative"])):
        assert [m.name for m in _methods(s, notes, verify_rows=rows)] == want, rows
    pr = _methods(s, notes)[1]
    assert pr.gen["lazy_rows"] and not pr.use_drafter and pr.must_match and pr.reference == "plain"


def test_pipeline_both_runs_one_round_at_a_time_beside(pair):
    """--pipeline both: `speculative_sync` (pipeline off) beside `speculative`, same gate and rows; a backend without
    pipelined rounds (torch on a CPU) gets a note that the two run the same loop. The session keeps one gate each."""
    s, notes = _session(pair), []
    methods = _methods(s, notes, pipeline="both")
    assert [(m.name, m.gen["pipeline"]) for m in methods] == [("plain", True), ("speculative", True),
                                                              ("speculative_sync", False)]
    assert methods[2].must_match and methods[2].gen["gate"] and any("pipelined" in n for n in notes)
    for m in methods[1:]:
        m.run([2, 3, 4], 4)
    assert sorted(k[3] for k in s.gates) == [False, True]  # a pipelined round costs less: its own round costs
    methods = _methods(s, notes, pipeline="off")
    assert [(m.name, m.gen["pipeline"]) for m in methods] == [("plain", False), ("speculative", False)]


def test_verify_both_runs_token_wise_rejection_beside(pair):
    """--verify both (sampling): `speculative_token` (token-wise rejection) beside `speculative` (block verification),
    each with its own gate (their acceptance differs); --verify token makes token-wise the only one."""
    s, notes = _session(pair), []
    methods = _methods(s, notes, verify="both", temperature=1.0)
    assert [(m.name, m.gen["verify"]) for m in methods] == [("plain", "block"), ("speculative", "block"),
                                                            ("speculative_token", "token")]
    assert methods[2].must_match and methods[2].gen["gate"]
    for m in methods[1:]:
        m.run([2, 3, 4], 4)
    assert sorted(k[-1] for k in s.gates) == ["block", "token"]
    assert [m.gen["verify"] for m in _methods(s, notes, verify="token", temperature=1.0)] == ["token", "token"]


def test_spread_takes_categories_in_turn():
    ps = [SuitePrompt(f"{c}{i}", ("x",), c) for c in "abc" for i in range(3)]
    assert [p.id for p in spread(ps, 5)] == ["a0", "b0", "c0", "a1", "b1"]
    assert [p.id for p in spread(ps[:3], 2)] == ["a0", "a1"]
    assert len(spread(ps, 100)) == 9


def _doc(tau=3.0, s=4.0, plain_tok_s=20.0, speedup=1.5, gpu=None):
    return {"summary": {"plain": {"tok_per_s": plain_tok_s},
                        "speculative": {"tau": tau, "draft_steps_per_forward": s, "speedup": speedup, "c": 0.1,
                                        "verify_rel": 1.2}},
            "models": {"target": {"params": 268_000_000, "layers": 18},
                       "drafter": {"params_read_per_step": 15_000_000, "blocks": 2}},
            "settings": {"num_draft_tokens": 5, "threads": 2}, "machine": {"gpu": gpu, "cpu": "Some CPU"}}


def test_predictor_cost_model():
    # memory-bound with no overhead: speedup = tau * P_t / (s * P_d + P_t)
    prof = {"name": "ideal", "memory_bandwidth_gbs": 100, "compute_tflops": {"fp32": 1e9}, "figures": "measured"}
    p = pr.predict(_doc(), prof, runtime="torch-cpu", overhead_s=0.0)
    assert math.isclose(p["speedup"], 3.0 * 268e6 / (4 * 15e6 + 268e6), rel_tol=1e-6)
    assert math.isclose(p["target_step_ms"], 268e6 * 4 / 100e9 * 1e3, rel_tol=1e-9)
    # finite compute makes the verify of 1 + s tokens dearer than one step, and the speedup smaller
    slow = pr.predict(_doc(), {**prof, "compute_tflops": {"fp32": 0.05}}, runtime="torch-cpu", overhead_s=0.0)
    assert slow["verify_rel"] > 1.0 and slow["speedup"] < p["speedup"]
    # the fitted overhead reproduces the measured plain step exactly
    prof["match"] = ["Some CPU", "threads=2"]
    o = pr.fit_overhead(_doc(plain_tok_s=10.0), prof)
    assert math.isclose(pr.predict(_doc(plain_tok_s=10.0), prof, runtime="torch-cpu", overhead_s=o)["target_step_ms"],
                        100.0, rel_tol=1e-9)
    v = pr.validation(_doc(plain_tok_s=10.0), [prof])
    assert v["profile"] == "ideal" and math.isclose(v["error"], v["predicted_speedup"] / 1.5 - 1)
    assert pr.validation(_doc(gpu="Other GPU"), [{**prof, "match": ["Other GPU", "threads=9"]}]) is None


def test_shipped_profiles_predict():
    profs = pr.load_profiles()
    names = {p["name"] for p in profs}
    assert {"apple-m3", "iphone-15-pro", "pixel-8", "rtx-4090", "h100-sxm", "xeon-2vcpu"} <= names
    for p in profs:
        assert p["sources"], p["name"]
        r = pr.predict(_doc(), p)
        assert 0 < r["speedup"] < 10 and r["target_step_ms"] > 0, p["name"]
    with pytest.raises(MtpkitError, match="unknown profile"):
        pr.load_profiles(["no-such-device"])


def test_llamacpp_prompt_lookup_baseline_takes_prompts_longer_than_a_batch(pair):
    """llama-cpp-python sized its score buffer for one batch (512 rows) when given a draft model: every prompt of
    more than 512 tokens (the everyday suite's documents) failed with a numpy broadcast error."""
    pytest.importorskip("llama_cpp")
    from mtpkit.bench.methods import Sampling, llamacpp_methods
    gguf, _, _ = pair
    ids = [2] + [260 + i % 20 for i in range(700)]
    plain, lookup = llamacpp_methods(str(gguf), 2, 760, Sampling(0.0, 0, {1}), 4, False)
    a, b = plain.run(ids, 8), lookup.run(ids, 8)
    assert len(a.tokens) == 8 and a.tokens == b.tokens
