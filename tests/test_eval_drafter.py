"""`eval-drafter`'s loop-faithful report: the T=0 and T=1 walks, per-category taus, several suites in one
run, --max-prompt-tokens and --centroid-top-k (tiny random target and drafters, jsonl suites, no network)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from mtpkit.distill.cli import eval_drafter_command
from mtpkit.distill.evaluate import eval_drafter, loop_tau, loop_tau_sampled, walk_accept
from mtpkit.model.load import load_drafter, load_target, save_drafter
from mtpkit.suites import load_suite
from tests.conftest import fails_cleanly, tiny_drafter
from tests.distill_util import corpus_text, single_thread, tiny_target_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")

app = typer.Typer(pretty_exceptions_enable=False)
app.command("eval-drafter")(eval_drafter_command)
app.command("unused")(lambda: None)  # two commands: invoked as `eval-drafter ...`, like the real CLI
runner = CliRunner()
_fails = functools.partial(fails_cleanly, app=app)
NUM_CENTROIDS = 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny target dir, a centroid and a dense random drafter, and two jsonl suites with categories."""
    root = tmp_path_factory.mktemp("eval")
    tdir = tiny_target_dir(root / "t")
    t = load_target(tdir)
    save_drafter(tiny_drafter(t.model, head="centroid", num_centroids=NUM_CENTROIDS, centroid_top_k=2), root / "centroid",
                 meta={"num_draft_tokens": 3})
    save_drafter(tiny_drafter(t.model, seed=1), root / "dense", meta={"num_draft_tokens": 3})
    text = corpus_text()
    s1 = [{"id": "m1", "category": "math", "prompt": "Compute the sum of 12 and 30, then"},
          {"id": "m2", "category": "math", "prompt": text[2000:2300]},
          {"id": "c1", "category": "chat", "prompt": "Hello there, how are"},
          {"id": "c2", "category": "chat", "prompt": text[500:900]},
          {"id": "u1", "prompt": "def wrap(text, width):"}]
    s2 = [{"id": "q1", "category": "qa", "prompt": "Which module wraps text?"},
          {"id": "q2", "category": "qa", "prompt": text[3000:3900]},  # a few hundred tokens
          {"id": "x1", "category": "extraction", "prompt": text[100:200]}]
    paths = []
    for name, rows in (("s1", s1), ("s2", s2)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(str(root / f"{name}.jsonl"))
    return dict(target=tdir, centroid=root / "centroid", dense=root / "dense", s1=paths[0], s2=paths[1])


def _run(setup, *args: str, drafter: str = "centroid") -> dict:
    res = runner.invoke(app, ["eval-drafter", "--target", str(setup["target"]), "--drafter", str(setup[drafter]),
                              "--gen-len", "10", "--batch", "4", *args, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_loop_walk_at_t0_is_the_hand_computed_walk():
    k, prompt_len, length = 3, 2, 12
    g = torch.zeros(12, k)  # row p - 1 holds the round at p; every other row rejects at once
    g[1] = torch.tensor([1., 1., 0.])  # p=2: 2 accepted + bonus -> p=5
    g[4] = torch.tensor([0., 1., 1.])  # p=5: 0 accepted (later matches do not count) + bonus -> p=6
    g[5] = torch.tensor([1., 1., 1.])  # p=6: 3 accepted + bonus -> p=10
    g[9] = torch.tensor([1., 0., 0.])  # p=10: one token left to emit (drafts past the end are not looked at)
    assert loop_tau(g, prompt_len, length) == (3 + 1 + 4 + 1, 4)
    assert loop_tau(g[1:], prompt_len - 1, length - 1) == (9, 4)  # rounds before `first` skipped: same walk
    assert loop_tau(torch.ones(12, k), 1, 11) == (9, 3)  # 4 + 4 + the last token
    assert loop_tau(g, 11, 12) == (0, 0)  # no continuation left after the bonus token
    leads = []
    loop_tau(g, prompt_len, length, leads)
    assert leads == [2, 0, 3]  # the round at p=10 has one draft left (m < k): not a full round
    assert walk_accept(leads, k) == [round(2 / 3, 4), round(2 / 3, 4), round(1 / 3, 4)] and walk_accept([], k) is None


def test_loop_walk_at_t1():
    k, prompt_len = 3, 2
    length = prompt_len + 1 + 5 * (k + 1)  # 20 tokens after the first
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert loop_tau_sampled(torch.ones(length, k), prompt_len, length, gen()) == (20, 5)  # k + 1 per round
    assert loop_tau_sampled(torch.zeros(length, k), prompt_len, length, gen()) == (20, 20)  # the bonus only
    assert loop_tau_sampled(torch.ones(length, k), prompt_len, length - 2, gen()) == (18, 5)  # bounded by the end
    # random acceptance: the walk's mean emitted per round -> 1 + a1 + a1 a2 + a1 a2 a3; same seed, same walk
    a = torch.tensor([0.9, 0.5, 0.2]).expand(40_001, k)
    tokens, rounds = loop_tau_sampled(a, 1, 40_001, gen())
    assert tokens == 39_999 and tokens / rounds == pytest.approx(1 + 0.9 + 0.45 + 0.09, abs=0.03)
    assert loop_tau_sampled(a[:200], 1, 200, gen()) == loop_tau_sampled(a[:200], 1, 200, gen())


def test_report_shape_and_per_category(setup):
    r = _run(setup, "--suite", setup["s1"])
    assert r["suite"] == setup["s1"] and r["prompts"] == 5 and r["num_draft_tokens"] == 3
    assert "tau0_loop" not in r
    for key in ("tau0", "tau1", "tau0_sim", "tau1_sim"):
        assert 1.0 <= r[key] <= 4.0
    for t in "01":  # the walk's rates: non-increasing in i, and they give its tau (full rounds only, so approx)
        la = r[f"loop_accept{t}"]
        assert len(la) == 3 and all(0 <= b <= a <= 1 for a, b in zip(la, la[1:], strict=False))
        assert 1 + sum(la) == pytest.approx(r[f"tau{t}"], abs=0.5)
    assert set(r["per_category"]) == {"math", "chat", setup["s1"]}  # uncategorized -> the suite's name
    assert [v["prompts"] for v in r["per_category"].values()] == [2, 2, 1]
    for t in ("tau0", "tau1"):
        vals = {c: v[t] for c, v in r["per_category"].items()}
        assert r[f"min_category_{t}"] == min(vals.values()) and vals[r[f"min_category_{t}_at"]] == min(vals.values())
        assert min(vals.values()) - 1e-9 <= r[t] <= max(vals.values()) + 1e-9  # tokens / rounds pooled over categories
    for v in r["per_category"].values():
        assert set(v) == {"prompts", "tau0", "tau1", "tau0_sim", "tau1_sim", "outside_rate"}
        assert 0.0 <= v["outside_rate"] <= 1.0
    assert r["max_prompt_tokens"] == 4096 - 10 and r["truncated_prompts"] == 0
    assert r["centroid_top_k"] == 2 and r["candidates_per_step"] == 2 * 128 // NUM_CENTROIDS
    assert 0 < r["loop_rounds0"] <= 5 * 9 and r["rounds_greedy"] == 5 * 7 and len(r["accept0"]) == len(r["cond_accept1"]) == 3
    cut = _run(setup, "--suite", setup["s1"], "--max-prompt-tokens", "16")
    assert cut["max_prompt_tokens"] == 16 and cut["truncated_prompts"] >= 2


def test_batching_does_not_change_the_report(setup):
    t = load_target(setup["target"])
    d = load_drafter(setup["centroid"], t.model)
    prompts = load_suite(setup["s1"])
    one = eval_drafter(t, d, prompts, k=3, gen_len=10, batch=1, name="s1")
    four = eval_drafter(t, d, prompts, k=3, gen_len=10, batch=4, name="s1")
    # greedy rows only: the sampled continuations depend on how generation groups the rows
    for key in ("tau0", "tau0_sim", "rounds_greedy", "loop_rounds0"):
        assert one[key] == pytest.approx(four[key], abs=1e-5), key
    assert {c: v["tau0"] for c, v in one["per_category"].items()} == pytest.approx(
        {c: v["tau0"] for c, v in four["per_category"].items()}, abs=1e-5)
    assert one["per_category"].keys() == {"math", "chat", "s1"}


def test_several_suites_in_one_run(setup):
    s1, s2 = setup["s1"], setup["s2"]
    r = _run(setup, "--suite", s1, "--suite", f"{s2},{s1}")  # repeated and comma-separated; duplicates dropped
    assert list(r["suites"]) == [s1, s2] and r["num_draft_tokens"] == 3 and r["gen_len"] == 10
    assert set(r["suites"][s2]["per_category"]) == {"qa", "extraction"}
    o = r["overall"]
    for t in ("tau0", "tau1"):
        cats = {(s, c): v[t] for s, rep in r["suites"].items() for c, v in rep["per_category"].items()}
        assert o[f"min_category_{t}"] == min(cats.values()) and cats[tuple(o[f"min_category_{t}_at"])] == o[f"min_category_{t}"]
        suites = {s: rep[t] for s, rep in r["suites"].items()}
        assert o[f"min_{t}"] == min(suites.values()) and o[f"min_{t}_at"] in suites
    alone = _run(setup, "--suite", s2)  # a suite's report does not depend on the others in the run
    for key in ("tau0", "tau1", "tau0_sim", "tau1_sim", "per_category", "outside_rate"):
        assert alone[key] == r["suites"][s2][key], key
    res = runner.invoke(app, ["eval-drafter", "--target", str(setup["target"]), "--drafter", str(setup["centroid"]),
                              "--gen-len", "6", "--suite", f"{s1},{s2}"])
    assert res.exit_code == 0 and "overall worst" in res.output and "extraction" in res.output, res.output


def test_centroid_top_k_override(setup):
    rates = []
    for top_k in (1, 2, 4, NUM_CENTROIDS):
        r = _run(setup, "--suite", setup["s2"], "--centroid-top-k", str(top_k))
        assert r["centroid_top_k"] == top_k and r["candidates_per_step"] == top_k * 128 // NUM_CENTROIDS
        rates.append(r["outside_rate"])
    assert rates == sorted(rates, reverse=True) and rates[0] > 0 and rates[-1] == 0.0  # more clusters, fewer misses
    t = load_target(setup["target"])
    d = load_drafter(setup["centroid"], t.model)
    eval_drafter(t, d, load_suite(setup["s2"]), k=2, gen_len=4, centroid_top_k=5)
    assert d.config.centroid_top_k == 2  # the override is undone after the evaluation
    dense = _run(setup, "--suite", setup["s2"], drafter="dense")
    assert dense["outside_rate"] is None and dense["centroid_top_k"] is None
    assert all(v["outside_rate"] is None for v in dense["per_category"].values())
    base = ["eval-drafter", "--target", str(setup["target"]), "--suite", setup["s2"], "--drafter"]
    _fails([*base, str(setup["dense"]), "--centroid-top-k", "2"], "centroid head")
    _fails([*base, str(setup["centroid"]), "--centroid-top-k", "17"], "exceeds num_centroids")
    _fails([*base, str(setup["centroid"]), "--centroid-top-k", "0"], "--centroid-top-k")
    _fails([*base, str(setup["centroid"]), "--max-prompt-tokens", "0"], "--max-prompt-tokens")
    _fails(["eval-drafter", "--target", str(setup["target"]), "--drafter", str(setup["centroid"]), "--suite", ", "],
           "no suite")


def test_bad_inputs_fail_before_the_target_loads(setup, tmp_path):
    """With a target that does not exist, each error is still about the bad input: checked before loading."""
    nope = str(tmp_path / "no-target")
    base = ["eval-drafter", "--target", nope, "--drafter", str(setup["centroid"])]
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a"}\n{"prompt": \n')
    (tmp_path / "nodrafter").mkdir()
    (tmp_path / "nodrafter" / "config.json").write_text((setup["centroid"] / "config.json").read_text())
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_text("[1, 2]")
    (tmp_path / "garbage" / "model.safetensors").write_bytes(b"")
    for args, match in (
            ([*base, "--suite", str(tmp_path / "missing.jsonl")], "cannot read suite"),
            ([*base, "--suite", str(tmp_path / "empty.jsonl")], "has no prompts"),
            ([*base, "--suite", str(tmp_path / "bad.jsonl")], "bad.jsonl:2: not valid JSON"),
            ([*base, "--suite", setup["s1"], "--limit", "0"], "--limit must be at least 1, got 0"),
            ([*base, "--suite", setup["s1"], "--gen-len", "0"], "--gen-len must be at least 2, got 0"),
            ([*base, "--suite", setup["s1"], "--gen-len", "5000"], "leaves no room for the prompt"),
            ([*base, "--suite", setup["s1"], "--num-draft-tokens", "0"], "--num-draft-tokens must be at least 1"),
            ([*base, "--suite", setup["s1"], "--batch", "-2"], "--batch must be at least 1"),
            ([*base, "--suite", setup["s1"], "--device", "bogus"], "--device must be cpu or cuda"),
            ([*base, "--suite", setup["s1"], "--centroid-top-k", "17"], "exceeds num_centroids"),
            (["eval-drafter", "--target", nope, "--drafter", str(tmp_path / "none-here"), "--suite", setup["s1"]],
             "is not a directory"),
            (["eval-drafter", "--target", nope, "--drafter", str(tmp_path / "nodrafter"), "--suite", setup["s1"]],
             "no *.safetensors"),
            (["eval-drafter", "--target", nope, "--drafter", str(tmp_path / "garbage"), "--suite", setup["s1"]],
             "must be a JSON object"),
            (["eval-drafter", "--target", nope, "--suite", setup["s1"]], "no drafter ships for target")):
        _fails(args, match)


def test_drafter_defaults_to_the_shipped_one(setup, monkeypatch):
    """No --drafter: the drafter shipped for the target's name, as `mtpkit run` picks it (mtpkit.api)."""
    import mtpkit.api
    shipped = setup["target"].parent / "shipped"
    shipped.mkdir(exist_ok=True)
    if not (shipped / "t").exists():
        (shipped / "t").symlink_to(setup["centroid"])
    monkeypatch.setattr(mtpkit.api, "DEFAULT_DRAFTERS", shipped)
    monkeypatch.chdir(setup["target"].parent)  # the target by a name ("t"), not a path
    res = runner.invoke(app, ["eval-drafter", "--target", "t", "--suite", setup["s2"], "--gen-len", "6", "--batch", "4",
                              "--json"])
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout)
    assert r["drafter"] == str(shipped / "t") and r["num_draft_tokens"] == 3  # k from the shipped meta.json
    same = _run(setup, "--suite", setup["s2"], "--gen-len", "6")  # --drafter given: the same report
    assert {k: v for k, v in r.items() if k not in ("target", "drafter", "seconds")} == {
        k: v for k, v in same.items() if k not in ("target", "drafter", "seconds")}
