"""Distillation runs on a tiny target: data shards, resume determinism, time budget, NaN stop, settings."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mtpkit.distill import checkpoint as ckpt
from mtpkit.distill import train as train_mod
from mtpkit.distill.config import DistillConfig
from mtpkit.distill.corpus import Corpus, PromptSource
from mtpkit.distill.data import generate, generate_rows
from mtpkit.distill.train import RunOptions, batch_indices, lr_at, run_distill
from mtpkit.errors import MtpkitError
from mtpkit.model.load import load_drafter, load_target
from mtpkit.suites import EvalFilter, humaneval
from tests.distill_util import TINY_SETTINGS, fake_mtbench_wheel, peaky_target, single_thread, tiny_target_dir  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_target_dir(tmp_path_factory.mktemp("target") / "t")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MTPKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MTPKIT_MTBENCH_WHEEL", raising=False)
    fake_mtbench_wheel(tmp_path / "cache")


def _cfg(target_dir, **kw):
    return DistillConfig(target=str(target_dir), **{**TINY_SETTINGS, **kw})


QUIET = dict(progress=False, log=lambda _msg: None)


def _losses(out):
    return [r["loss"] for r in ckpt.read_log(out)]


def test_resume_gives_identical_losses_and_weights(target_dir, tmp_path):
    cfg = _cfg(target_dir, steps=8, eval_every=3)
    straight = run_distill(cfg, tmp_path / "a", RunOptions(**QUIET))
    half = run_distill(cfg, tmp_path / "b", RunOptions(stop_at=4, **QUIET))
    assert half["stopped"] == "stop_at" and half["step"] == 4
    with pytest.raises(MtpkitError, match="exists and is not empty"):
        run_distill(cfg, tmp_path / "b", RunOptions(**QUIET))
    shard = tmp_path / "b" / "data" / "shard-00000.safetensors"
    mtime = shard.stat().st_mtime_ns
    resumed = run_distill(cfg, tmp_path / "b", RunOptions(resume=True, **QUIET))
    assert shard.stat().st_mtime_ns == mtime  # data reused, not regenerated
    assert resumed["step"] == straight["step"] == 8
    assert _losses(tmp_path / "a") == _losses(tmp_path / "b") and len(_losses(tmp_path / "a")) == 8
    assert straight["best"] == resumed["best"] and straight["final"] == resumed["final"]
    t = load_target(target_dir)
    a, b = (load_drafter(tmp_path / x / "best", t.model) for x in "ab")
    for (k, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(v, w), k
    assert 1.0 <= straight["final"]["tau0"] <= cfg.num_draft_tokens + 1
    for key in ("tau0_loop", "tau1_loop"):  # the loop's walk over the held-out rows selects the checkpoint
        assert 1.0 <= straight["final"][key] <= cfg.num_draft_tokens + 1
        assert straight["best"][key] is not None
    assert 0.0 <= straight["final"]["outside_rate"] <= 1.0
    assert straight["own_parameters"] == a.num_parameters()  # the shared target embedding is not counted
    # a finished run resumed again does nothing and reports the same
    again = run_distill(cfg, tmp_path / "b", RunOptions(resume=True, **QUIET))
    assert again["step"] == 8 and again["best"] == straight["best"]
    with pytest.raises(MtpkitError, match="settings differ"):
        run_distill(_cfg(target_dir, steps=9), tmp_path / "b", RunOptions(resume=True, **QUIET))


def test_time_budget_splits_a_run_across_calls(target_dir, tmp_path):
    cfg = _cfg(target_dir)
    first = run_distill(cfg, tmp_path / "o", RunOptions(time_budget_min=1e-6, **QUIET))
    assert first["stopped"] == "time_budget" and first["phase"] == "data"
    second = run_distill(cfg, tmp_path / "o", RunOptions(resume=True, time_budget_min=10, **QUIET))
    assert second["stopped"] == "done" and second["step"] == cfg.steps
    index = json.loads((tmp_path / "o" / "data" / "index.json").read_text())
    assert [s["split"] for s in index["shards"]] == ["train", "train", "heldout"]


class _Clock:
    """A fake time.monotonic that advances 20 s per reading."""

    def __init__(self):
        self.t = 0.0

    def monotonic(self) -> float:
        self.t += 20.0
        return self.t


def test_time_budget_stops_training_with_a_checkpoint_and_resume_continues_exactly(target_dir, tmp_path, monkeypatch):
    from mtpkit.distill import data as data_mod
    cfg = _cfg(target_dir, steps=8, eval_every=100)
    straight = run_distill(cfg, tmp_path / "a", RunOptions(**QUIET))
    with monkeypatch.context() as mp:
        clock = _Clock()
        mp.setattr(train_mod, "time", clock)
        mp.setattr(data_mod, "time", clock)
        cut = run_distill(cfg, tmp_path / "b", RunOptions(time_budget_min=6, **QUIET))
    assert cut["stopped"] == "time_budget" and 0 < cut["step"] < 8
    assert json.loads((tmp_path / "b" / "last" / "state.json").read_text())["step"] == cut["step"]
    assert (tmp_path / "b" / "best" / "model.safetensors").is_file()
    done = run_distill(cfg, tmp_path / "b", RunOptions(resume=True, **QUIET))
    assert done["step"] == 8 and _losses(tmp_path / "a") == _losses(tmp_path / "b")
    assert done["final"] == straight["final"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(target_dir, tmp_path, monkeypatch):
    real = train_mod.distill_step
    calls = []

    def poisoned(*a, **kw):
        res = real(*a, **kw)
        if kw.get("backward"):
            calls.append(1)
            if len(calls) == 5:
                return res._replace(loss=torch.tensor(float("nan")))
        return res
    monkeypatch.setattr(train_mod, "distill_step", poisoned)
    with pytest.raises(MtpkitError, match=r"loss is nan at step 4.*last good checkpoint .*last \(step 3\)"):
        run_distill(_cfg(target_dir, eval_every=3), tmp_path / "o", RunOptions(**QUIET))
    assert json.loads((tmp_path / "o" / "last" / "state.json").read_text())["step"] == 3
    assert torch.isfinite(torch.cat([p.flatten() for p in load_drafter(tmp_path / "o" / "best").parameters()])).all()


def test_config_json_round_trip_and_validation(tmp_path):
    cfg = DistillConfig(steps=7, betas=[0.8, 0.9], layer_types=["full_attention"])
    cfg.save(tmp_path / "h.json")
    assert DistillConfig.load(tmp_path / "h.json") == cfg
    with pytest.raises(MtpkitError, match="unknown distill setting"):
        DistillConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    for bad in (dict(steps=0), dict(loss="l2"), dict(sampled_fraction=2.0), dict(gen_len=3, num_draft_tokens=4)):
        with pytest.raises(MtpkitError):
            DistillConfig(**bad)


def test_schedule_and_data_order():
    cfg = DistillConfig(steps=100, warmup_steps=10, lr=1.0, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0) and lr_at(100, cfg) == pytest.approx(0.1)
    assert all(lr_at(s, cfg) >= lr_at(s + 1, cfg) for s in range(10, 100))
    seen = torch.cat([batch_indices(s, 10, 4, 0) for s in range(5)])  # 20 draws = 2 epochs of 10 rows
    assert sorted(seen[:10].tolist()) == list(range(10)) and sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, 10, 4, 0), batch_indices(3, 10, 4, 0))
    # length buckets: still every row once per epoch, deterministic, and a batch holds rows of similar length
    lengths = torch.tensor([60, 2000, 70, 2100, 65, 1900, 80, 2200] * 8)
    steps = [batch_indices(s, 64, 8, 0, lengths, 4) for s in range(16)]  # 2 epochs
    ep = torch.cat(steps[:8])
    assert sorted(ep.tolist()) == list(range(64)) and sorted(torch.cat(steps[8:]).tolist()) == list(range(64))
    assert all(int(lengths[b].max() - lengths[b].min()) < 1000 for b in steps)
    assert torch.equal(batch_indices(5, 64, 8, 0, lengths, 4), steps[5])


def test_generation_batches_cap_tokens_for_long_prompts(monkeypatch):
    """max_tokens caps rows x (prompt + continuation) per generation batch and keeps prompts whole."""
    import mtpkit.distill.data as data
    target = peaky_target(1)
    items = [([5 + i] * n, False) for i, n in enumerate([3, 3, 3, 3, 30, 30, 30])]
    shapes = []
    real = data.generate
    monkeypatch.setattr(data, "generate", lambda m, p, *a, **k: shapes.append(tuple(p.shape)) or real(m, p, *a, **k))
    capped = generate_rows(target, items, 4, batch=8, bos_id=2, eos_id=-1, pad_id=0, seed=0, max_tokens=80)
    assert shapes == [(4, 4), (2, 31), (1, 31)]  # 2 x (31 + 4) <= 80 < 3 x (31 + 4)
    free = generate_rows(target, items, 4, batch=8, bos_id=2, eos_id=-1, pad_id=0, seed=0)
    assert shapes[3:] == [(7, 4)] and torch.equal(free.tokens[:4], capped.tokens[:4])
    assert free.prompt_len.tolist()[4:] == [4, 4, 4] and capped.prompt_len.tolist()[4:] == [31, 31, 31]
    # without max_tokens (v2 data) the long prompts were cut to the short ones' length


def test_batched_generation_equals_uncached_greedy_and_buckets_keep_prompts():
    target = peaky_target(1)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 128, (3, 5), generator=g)
    toks, length = generate(target, prompts, torch.zeros(3, dtype=torch.bool), 6, eos_id=-1, pad_id=0)
    ref = prompts
    for _ in range(6):
        ref = torch.cat([ref, target(ref).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(toks, ref) and length.tolist() == [11, 11, 11]
    items = [([5, 6, 7], False), ([8, 9], True), ([10, 11, 12], True), ([13], False)]
    exact = generate_rows(target, items, 4, batch=8, bos_id=2, eos_id=-1, pad_id=0, seed=0, truncate=False)
    assert exact.prompt_len.tolist() == [4, 3, 4, 2]  # BOS + the whole prompt
    assert exact.tokens[0, :4].tolist() == [2, 5, 6, 7] and exact.tokens[3, :2].tolist() == [2, 13]
    cut = generate_rows(target, items, 4, batch=8, bos_id=2, eos_id=-1, pad_id=0, seed=0, truncate=True)
    assert cut.prompt_len.tolist() == [2, 2, 2, 2] and cut.tokens[0, :2].tolist() == [2, 7]  # the tail is kept
    assert torch.equal(exact.sampled, torch.tensor([False, True, True, False]))


def test_left_padded_batches_compute_what_each_prompt_computes_alone():
    """`pad` hides a row's filler keys: its logits and greedy continuation equal the unpadded row's, across the
    sliding window and through a ring cache; generate_rows with max_tokens keeps every prompt whole."""
    target = peaky_target(2)
    w = target.config.sliding_window
    g = torch.Generator().manual_seed(1)
    lens = [3, w + 5, 2 * w + 7]
    rows = [torch.randint(3, 128, (n,), generator=g) for n in lens]
    L = max(lens)
    pad = torch.tensor([L - n for n in lens])
    batch = torch.stack([torch.cat([torch.zeros(L - n, dtype=torch.long), r]) for n, r in zip(lens, rows, strict=True)])
    ring = target.new_cache(L + 40, batch=3, slack=4)  # a ring on sliding layers: prefill in chunks of 5
    out = target(batch, ring, pad=pad)
    for b, r in enumerate(rows):
        alone = target(r[None])
        torch.testing.assert_close(out.logits[b, pad[b]:], alone.logits[0], rtol=1e-4, atol=1e-4)
    items = [(r.tolist(), False) for r in rows]
    padded = generate_rows(target, items, 6, batch=8, bos_id=2, eos_id=-1, pad_id=0, seed=0, max_tokens=10_000)
    assert padded.prompt_len.tolist() == [n + 1 for n in lens] and padded.length.tolist() == [n + 7 for n in lens]
    for b, it in enumerate(items):
        one = generate_rows(target, [it], 6, batch=8, bos_id=2, eos_id=-1, pad_id=0, seed=0, max_tokens=10_000)
        assert torch.equal(padded.tokens[b, :lens[b] + 7], one.tokens[0, :lens[b] + 7])


def test_prompt_source_skips_evaluation_prompts_and_holds_out_documents(target_dir):
    from mtpkit.tokenizer import Tokenizer
    he = humaneval()
    filt = EvalFilter(he)
    tok = Tokenizer.from_sentencepiece(target_dir)
    leaked = he[0].text
    corpus = Corpus(documents=[f"doc {j}\n" * 40 for j in range(32)], prompts=["print('hi')", leaked, "x = 1"])
    src = PromptSource(corpus, tok, prompt_len=8, seed=0, sampled_fraction=0.5, heldout=False, eval_filter=filt)
    assert src.excluded == 1 and leaked not in src.prompts and len(src.documents) == 30
    held = PromptSource(corpus, tok, prompt_len=8, seed=0, sampled_fraction=0.5, heldout=True, eval_filter=filt)
    assert set(held.documents).isdisjoint(src.documents)
    ids, sampled = src(1)
    assert 0 < len(ids) <= 7 and isinstance(sampled, bool)
    long = Corpus(documents=corpus.documents, prompts=["word " * 200])
    ids = PromptSource(long, tok, prompt_len=8, seed=0, sampled_fraction=0.5, heldout=False, eval_filter=filt,
                       max_prompt_len=50)(0)[0]
    assert len(ids) == 49  # prompt records keep max_prompt_len - 1 tokens, document windows prompt_len - 1
    assert src(1) == PromptSource(corpus, tok, prompt_len=8, seed=0, sampled_fraction=0.5, heldout=False,
                                  eval_filter=filt)(1)  # a function of (seed, i) only
    assert filt("unrelated words " + leaked.upper().replace("\n", "  ") + " trailing")
    assert not filt("def totally_new_function(x):\n    return x * 2\n")


def test_stdlib_corpus_windows(target_dir):
    from mtpkit.distill.corpus import load_corpus, stdlib_files
    from mtpkit.tokenizer import Tokenizer
    files = stdlib_files()
    assert len(files) > 100
    assert not any(part in ("site-packages", "test", "tests") for f in files for part in f.parts)
    corpus = load_corpus(None)
    assert corpus.identity["kind"] == "stdlib" and not corpus.prompts
    src = PromptSource(corpus, Tokenizer.from_sentencepiece(target_dir), prompt_len=16, seed=0, sampled_fraction=0.5,
                       heldout=False, eval_filter=EvalFilter(humaneval()))
    windows = [src(i) for i in range(20)]
    assert all(len(ids) == 15 for ids, _ in windows) and 0 < sum(s for _, s in windows) < 20


def test_init_from_warm_starts_from_a_drafter_directory(target_dir, tmp_path):
    base = run_distill(_cfg(target_dir, steps=6), tmp_path / "a", RunOptions(**QUIET))
    src = load_drafter(tmp_path / "a" / "best")
    warm = run_distill(_cfg(target_dir, steps=6, init_from=str(tmp_path / "a" / "best")), tmp_path / "b",
                       RunOptions(stop_at=0, **QUIET))
    assert warm["step"] == 0  # evaluated before any step: the copied weights, the same held-out data
    got = load_drafter(tmp_path / "b" / "best")
    for k, v in src.state_dict().items():
        assert torch.equal(v, got.state_dict()[k]), k
    assert warm["final"]["tau0"] == pytest.approx(base["best"]["tau0"], abs=1e-6)
    assert json.loads((tmp_path / "b" / "hparams.json").read_text())["init_from"] == str(tmp_path / "a" / "best")
    with pytest.raises(MtpkitError, match="differs from this run's: intermediate_size"):
        run_distill(_cfg(target_dir, intermediate_size=32, init_from=str(tmp_path / "a" / "best")), tmp_path / "c",
                    RunOptions(**QUIET))
    assert not (tmp_path / "c").exists()  # refused before anything was written
    with pytest.raises(MtpkitError, match="is not a directory"):
        run_distill(_cfg(target_dir, init_from=str(tmp_path / "nowhere")), tmp_path / "d", RunOptions(**QUIET))
    with pytest.raises(MtpkitError, match="init_from must be"):
        _cfg(target_dir, init_from="")


def test_loop_weighting_trains_another_drafter_and_is_checked(target_dir, tmp_path):
    base = run_distill(_cfg(target_dir, steps=4, eval_every=4), tmp_path / "a", RunOptions(**QUIET))
    loop = run_distill(_cfg(target_dir, steps=4, eval_every=4, loop_weight=1.0), tmp_path / "b", RunOptions(**QUIET))
    la, lb = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert la[0] == pytest.approx(lb[0], rel=1e-5)  # same start, same reported (uniform) loss
    assert la[1:] != pytest.approx(lb[1:], rel=1e-6) and all(map(math.isfinite, lb))
    assert base["final"]["tau0_loop"] and loop["final"]["tau0_loop"]
    with pytest.raises(MtpkitError, match="loop_weight must be in"):
        _cfg(target_dir, loop_weight=1.5)


def test_a_second_run_reuses_another_runs_data(target_dir, tmp_path):
    run_distill(_cfg(target_dir, steps=2), tmp_path / "a", RunOptions(**QUIET))
    data = tmp_path / "a" / "data"
    mtimes = {p.name: p.stat().st_mtime_ns for p in data.iterdir()}
    other = run_distill(_cfg(target_dir, steps=2, lr=1e-3), tmp_path / "b", RunOptions(data_dir=str(data), **QUIET))
    assert other["step"] == 2 and not (tmp_path / "b" / "data").exists()
    assert {p.name: p.stat().st_mtime_ns for p in data.iterdir()} == mtimes  # read, not regenerated
    with pytest.raises(MtpkitError, match="other settings"):
        run_distill(_cfg(target_dir, steps=2, gen_len=9), tmp_path / "c", RunOptions(data_dir=str(data), **QUIET))


def test_init_from_a_drafter_with_fewer_blocks_grows_it_unchanged(target_dir, tmp_path):
    """A 2-block drafter warm-starts a 4-block run: its blocks go to the first places of their kinds, the new ones
    are the identity, so at step 0 the grown drafter scores exactly what the source did; training then moves them."""
    run_distill(_cfg(target_dir, steps=4), tmp_path / "a", RunOptions(**QUIET))
    src_dir = str(tmp_path / "a" / "best")
    grown = ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
    t = load_target(target_dir)
    src = load_drafter(src_dir, t.model)
    warm = run_distill(_cfg(target_dir, steps=4, layer_types=grown, init_from=src_dir), tmp_path / "b",
                       RunOptions(stop_at=0, **QUIET))
    g = load_drafter(tmp_path / "b" / "best", t.model)
    assert g.config.layer_types == grown
    for i, j in ((0, 0), (1, 2)):  # source block -> its place
        for k, v in src.layers[i].state_dict().items():
            assert torch.equal(v, g.layers[j].state_dict()[k]), (i, k)
    for j in (1, 3):
        assert (g.layers[j].post_attention_layernorm.weight == -1).all()
    x = torch.randn(2, 5, t.model.config.hidden_size)
    cache = t.model.new_cache(9, batch=2)
    t.model(torch.randint(3, 100, (2, 9)), cache, logits=False)
    from mtpkit.model.drafter import target_kv
    kv = target_kv(cache, t.model.config)
    q = torch.arange(4, 9)
    with torch.no_grad():
        for a, b in zip(src.body(x, x, q, kv), g.body(x, x, q, kv), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert warm["final"]["tau0"] == pytest.approx(json.loads((tmp_path / "a" / "summary.json").read_text())["final"]["tau0"], abs=1e-5)
    trained = run_distill(_cfg(target_dir, steps=4, layer_types=grown, init_from=src_dir), tmp_path / "b",
                          RunOptions(resume=True, **QUIET))
    assert trained["step"] == 4
    g2 = load_drafter(tmp_path / "b" / "last" / "drafter", t.model)
    assert not (g2.layers[1].post_attention_layernorm.weight == -1).all()  # the new blocks learn
    with pytest.raises(MtpkitError, match="not a grown copy"):
        run_distill(_cfg(target_dir, layer_types=["full_attention", "sliding_attention"], init_from=src_dir),
                    tmp_path / "c", RunOptions(**QUIET))


def test_a_run_resumed_from_a_simulated_score_selects_its_best_anew(target_dir, tmp_path):
    """Runs from before selection walked the loop saved best = simulated tau0: a resumed run must not compare the
    loop's tau0 + tau1 with it (it would never, or always, improve), so its next evaluation is the new best."""
    cfg = _cfg(target_dir, steps=4, eval_every=2)
    run_distill(cfg, tmp_path / "a", RunOptions(stop_at=2, **QUIET))
    state = tmp_path / "a" / "last" / "state.json"
    s = json.loads(state.read_text())
    s["best"] = {"score": 99.0, "step": 2, "tau0": 99.0, "tau1": None}  # the old record's shape, unbeatable
    state.write_text(json.dumps(s))
    out = run_distill(cfg, tmp_path / "a", RunOptions(resume=True, **QUIET))
    assert out["best"]["step"] == 4 and out["best"]["tau0_loop"] is not None
