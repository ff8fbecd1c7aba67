"""The speculative loop: lossless greedy on many random configs, exact sampling, no rejected K/V left behind."""

from __future__ import annotations

import random

import pytest
import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING
from mtpkit.runtime.loop import PLAIN_CHUNK, GenerationParams, generate
from mtpkit.runtime.oracle import OracleDrafter
from mtpkit.runtime.sampling import SamplingParams, accept_rejection, probs
from mtpkit.runtime.torch_backend import TorchBackend
from tests.conftest import tiny_drafter, tiny_target


def _run(backend, prompt, eos, **kw):
    kw.setdefault("gate", False)  # these check the loop's mechanics: k drafts every round (the gate: test_gate.py)
    params = GenerationParams(**kw)
    out, rounds = [], []
    for r in generate(backend, prompt, params, eos):
        out += r.tokens
        rounds.append(r)
    return out, rounds


def OracleBackend(target, drafter, *, future, prompt_len, corrupt, seed, **kw):  # noqa: N802
    return OracleDrafter(TorchBackend(target, drafter, **kw), future, prompt_len, corrupt, seed)


@pytest.mark.parametrize("seed", range(50))
def test_greedy_speculative_equals_plain_greedy(seed):
    rng = random.Random(seed)
    target = tiny_target(seed)
    drafter = tiny_drafter(target, seed, layer_types=rng.choice([[SLIDING, FULL], [FULL], [SLIDING, SLIDING, FULL]]),
                           head=rng.choice(["dense", "centroid"]), num_centroids=4, centroid_top_k=rng.choice([1, 2]))
    w = target.config.sliding_window
    prompt = [rng.randrange(target.config.vocab_size) for _ in range(rng.randint(1, 2 * w))]
    n_new = 4 * w + rng.randint(0, 10)  # runs well past the sliding window
    k = rng.randint(1, 6)
    plain, _ = _run(TorchBackend(target, None, max_len=128), prompt, set(), max_new_tokens=n_new)
    spec, rounds = _run(TorchBackend(target, drafter, max_len=128, max_draft=k), prompt, set(),
                        max_new_tokens=n_new, num_draft_tokens=k)
    assert spec == plain
    gated, _ = _run(TorchBackend(target, drafter, max_len=128, max_draft=k), prompt, set(),
                    max_new_tokens=n_new, num_draft_tokens=k, gate=True)
    assert gated == plain
    # the oracle drafter gets most drafts accepted; with an EOS inside the text the output must stop there
    late = sorted({t for t in plain if plain.index(t) >= len(plain) // 2})  # tokens first seen late
    eos = {rng.choice(late)} if late else set()
    want = plain[:plain.index(next(iter(eos))) + 1] if eos else plain
    oracle = OracleBackend(target, None, max_len=128, max_draft=k, future=plain, prompt_len=len(prompt),
                           corrupt=0.2, seed=seed)
    got, rounds = _run(oracle, prompt, eos, max_new_tokens=n_new, num_draft_tokens=k)
    assert got == want
    assert rounds[-1].finish == ("eos" if eos else "length")
    assert sum(r.accepted for r in rounds) > 0


def test_eos_in_the_middle_of_accepted_drafts():
    target = tiny_target(1)
    prompt = [3, 5, 7]
    plain, _ = _run(TorchBackend(target, None, max_len=128), prompt, set(), max_new_tokens=30)
    j = next(j for j in range(4, 30) if plain.index(plain[j]) == j and j % 8 not in (0, 1))  # mid-draft, first seen
    eos = {plain[j]}
    want = plain[:j + 1]
    oracle = OracleBackend(target, None, max_len=128, max_draft=8, future=plain, prompt_len=3, corrupt=0.0, seed=0)
    got, rounds = _run(oracle, prompt, eos, max_new_tokens=30, num_draft_tokens=8)
    assert got == want
    last = rounds[-1]
    assert last.finish == "eos" and last.accepted > len(last.tokens) - 1  # EOS was drafted, later drafts dropped


def test_rejected_tokens_never_stay_visible_in_the_cache():
    target = tiny_target(2)
    drafter = tiny_drafter(target, 2)
    prompt = [1, 2, 3, 4]
    be = TorchBackend(target, drafter, max_len=96, max_draft=5)
    out, rounds = _run(be, prompt, set(), max_new_tokens=40, num_draft_tokens=5)
    assert sum(r.drafted - r.accepted for r in rounds) > 0  # some drafts were rejected
    # the cache holds exactly prompt + out[:-1]; a fresh prefill of that sequence gives the same K/V
    seq = torch.tensor([prompt + out[:-1]])
    assert be.length == seq.shape[1]
    fresh = target.new_cache(96, slack=be.cache.slack)
    target(seq, fresh)
    L = be.length
    for layer in range(target.config.num_hidden_layers):
        pos = be.cache.key_positions(layer)
        valid = (pos >= 0) & (pos < L) & (pos > L - 1 - (target.config.sliding_window or L) - be.cache.slack)
        if not be.cache.is_ring(layer):
            valid &= pos < L
        torch.testing.assert_close(be.cache.k[layer][:, :, valid], fresh.k[layer][:, :, valid], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(be.cache.v[layer][:, :, valid], fresh.v[layer][:, :, valid], rtol=1e-5, atol=1e-5)


def _chi2(counts: torch.Tensor, expected: torch.Tensor) -> float:
    keep = expected > 0
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


CHI2_999 = {7: 24.32, 15: 37.70}  # 99.9 % quantiles (df = V - 1)


def test_rejection_rule_without_branches_matches_the_textbook_one():
    """accept_rejection decides on the device with no branch (n stays an array, q's row is zeroed when every draft is
    accepted); with numpy's and torch's ops it gives exactly what the branching rule gives for the same uniforms:
    accept while u_i q_i(d_i) < p_i(d_i), then draw with u_k from norm(max(0, p_n - q_n)), or from p_k."""
    import numpy as np

    from mtpkit.runtime.ops import NumpyOps
    g = np.random.default_rng(1)
    V, N = 12, 4
    tops = TorchBackend(tiny_target(0), None, max_len=8).ops
    outcomes = set()
    for trial in range(300):
        k = int(g.integers(1, 5))
        p = g.random((k + 1, V)) ** 4
        p = (p / p.sum(-1, keepdims=True)).astype(np.float32)
        ids = np.stack([g.permutation(V)[:N] for _ in range(k)])
        q = g.random((k, N)) ** 2
        q = (q / q.sum(-1, keepdims=True)).astype(np.float32)
        picks = np.array([g.choice(N, p=qi / qi.sum(dtype=np.float64)) for qi in q])
        drafts = ids[np.arange(k), picks]
        u = g.random(k + 1).astype(np.float32) * (trial % 3 != 0)  # every third trial: u = 0 before the last
        u[k] = g.random()
        n = 0
        while n < k and u[n] * q[n, picks[n]] < p[n, drafts[n]]:
            n += 1
        if n < k:
            r = p[n].copy()
            r[ids[n]] = np.maximum(p[n, ids[n]] - q[n], 0)
        else:
            r = p[k]
        c = np.cumsum(r, dtype=np.float64)
        want = [n, min(int(np.searchsorted(c, float(u[k]) * c[-1], side="right")), V - 1)]
        got_np = NumpyOps.to_list(NumpyOps.cat(accept_rejection(NumpyOps, drafts, picks, q, ids, p, u)))
        t = torch.from_numpy
        got_t = tops.to_list(tops.cat(accept_rejection(tops, t(drafts), t(picks), t(q), t(ids), t(p), t(u))))
        assert got_np == got_t == want, (trial, got_np, got_t, want)
        outcomes.add(n == k)
    assert outcomes == {True, False}


def test_rejection_from_logits_is_the_rule_on_probs():
    """accept_rejection_logits (p only at the drafts and the one row drawn from, via each row's log-sum-exp) decides
    what accept_rejection does on probs() of the same logits, with numpy's and torch's ops, for temperature alone and
    with top-k / top-p, k = 0..4, rounds that accept all and rounds that reject."""
    import numpy as np

    from mtpkit.runtime.ops import NumpyOps
    from mtpkit.runtime.sampling import accept_rejection_logits
    g = np.random.default_rng(3)
    V, N = 40, 6
    tops = TorchBackend(tiny_target(0), None, max_len=8).ops
    t = torch.from_numpy
    outcomes = set()
    for trial in range(300):
        sp = [SamplingParams(temperature=1.0), SamplingParams(temperature=0.6, top_k=9),
              SamplingParams(temperature=1.3, top_p=0.8)][trial % 3]
        k = int(g.integers(0, 5))
        logits = (g.standard_normal((k + 1, V)) * 2).astype(np.float32)
        ids = np.array([g.permutation(V)[:N] for _ in range(k)], dtype=np.int64).reshape(k, N)
        ids[:, 0] = logits[:k].argmax(-1)  # a candidate the target likes, so some rounds accept all
        q = g.random((k, N)).astype(np.float32) ** 4
        q /= q.sum(-1, keepdims=True)
        picks = np.array([g.choice(N, p=qi / qi.sum(dtype=np.float64)) for qi in q], dtype=np.int64)
        drafts = ids[np.arange(k), picks]
        u = g.random(k + 1).astype(np.float32) * (trial % 4 != 0)  # every fourth trial: u = 0 before the last
        u[k] = g.random()
        want = NumpyOps.to_list(NumpyOps.cat(accept_rejection(NumpyOps, drafts, picks, q, ids,
                                                               probs(NumpyOps, logits, sp), u)))
        got_np = NumpyOps.to_list(NumpyOps.cat(accept_rejection_logits(NumpyOps, drafts, picks, q, ids, logits, sp, u)))
        got_t = tops.to_list(tops.cat(accept_rejection_logits(tops, t(drafts), t(picks), t(q), t(ids), t(logits), sp,
                                                              t(u))))
        assert got_np == got_t == want, (trial, got_np, got_t, want)
        # padded to K = 4 drafts (rows past k random), k a 0-d array: what one CUDA graph for every k computes
        K = 4
        pad = lambda x, rows: t(np.concatenate([x, rows[x.shape[0]:]]).astype(x.dtype))  # noqa: E731
        junk = lambda *shape: (g.random(shape) * 5).astype(np.float32)  # noqa: E731
        padded = accept_rejection_logits(tops, pad(drafts, g.integers(0, V, K)), pad(picks, g.integers(0, N, K)),
                                         pad(q, junk(K, N)), pad(ids, g.integers(0, V, (K, N))),
                                         pad(logits, junk(K + 1, V)), sp, pad(u, junk(K + 1)), torch.tensor(k))
        assert tops.to_list(tops.cat(padded)) == want, (trial, "padded")
        outcomes.add((k, want[0] == k))
    assert {(k, True) for k in range(5)} <= outcomes and {(k, False) for k in range(1, 5)} <= outcomes


@pytest.mark.parametrize("ops_name,sparse", [("numpy", False), ("numpy", True), ("torch", False), ("torch", True)])
def test_rejection_sampling_preserves_the_target_distribution(ops_name, sparse):
    """60k rounds on an 8-token vocabulary, with numpy's and torch's ops, q dense or over 5 candidates per step
    (the centroid head's sparse q): the first two emitted tokens are distributed as p."""
    import numpy as np

    from mtpkit.runtime.ops import NumpyOps
    V, k, N = 8, 3, 60_000
    g = np.random.default_rng(0)
    p = g.random((k + 1, V)) ** 3
    p /= p.sum(-1, keepdims=True)
    ids = np.stack([g.permutation(np.arange(1, V))[:5] for _ in range(k)])  # token 0 is never a candidate
    qc = g.random((k, 5)) ** 3
    qc /= qc.sum(-1, keepdims=True)
    q = qc if sparse else np.zeros((k, V))
    if not sparse:
        np.put_along_axis(q, ids, qc, axis=1)
    ops = NumpyOps() if ops_name == "numpy" else TorchBackend(tiny_target(0), None, max_len=8).ops
    arr = (lambda x: x) if ops_name == "numpy" else torch.from_numpy
    rng = ops.generator(0)
    P, Q, IDS = arr(p.astype(np.float32)), arr(q.astype(np.float32)), arr(ids) if sparse else None
    first, second = np.zeros(V), np.zeros(V)
    for _ in range(N):
        picks = (g.random((k, 1)) > qc.cumsum(-1)).sum(-1).clip(max=4)  # draft i drawn from q_i
        drafts = ids[np.arange(k), picks]
        n, nxt = ops.to_list(ops.cat(accept_rejection(ops, arr(drafts), arr(picks if sparse else drafts), Q, IDS, P,
                                                      ops.rand(rng, k + 1, like=P))))
        toks = drafts[:n].tolist() + [nxt]
        first[toks[0]] += 1
        if len(toks) > 1:
            second[toks[1]] += 1
    assert _chi2(torch.from_numpy(first), N * torch.from_numpy(p[0])) < CHI2_999[7]
    # given an accepted first draft, the second token follows p[1]
    assert _chi2(torch.from_numpy(second), second.sum() * torch.from_numpy(p[1])) < CHI2_999[7]


@pytest.mark.parametrize("draft_temperature", [1.0, 0.6])
def test_sampled_loop_matches_target_distribution(draft_temperature):
    """End to end on a 16-token tiny target: the 2nd generated token's distribution equals the target's,
    also when drafts are drawn at a different temperature (a calibrated drafter's draft_temperature)."""
    target = tiny_target(3, vocab_size=16, final_logit_softcapping=None)
    drafter = tiny_drafter(target, 3)
    prompt = [1, 2, 3]
    sp = SamplingParams(temperature=1.3, top_k=12, top_p=0.95)
    be = TorchBackend(target, drafter, max_len=16, max_draft=3)
    with torch.no_grad():
        p1 = probs(be.ops, target(torch.tensor([prompt])).logits[0, -1], sp)
        cont = torch.tensor([[*prompt, t] for t in range(16)])
        p2 = probs(be.ops, target(cont).logits[:, -1], sp)
    expected = (p1[:, None] * p2).sum(0)
    counts = torch.zeros(16)
    N = 6000
    for s in range(N):
        out, _ = _run(be, prompt, set(), max_new_tokens=5, num_draft_tokens=3, seed=s,
                      sampling=sp, draft_temperature=draft_temperature)
        counts[out[1]] += 1
    assert _chi2(counts, N * expected) < CHI2_999[15]


@pytest.mark.parametrize("kw,match", [
    (dict(max_new_tokens=0), "max_new_tokens"), (dict(num_draft_tokens=0), "num_draft_tokens"),
    (dict(draft_temperature=0.0), "draft_temperature"),
])
def test_bad_generation_params(kw, match):
    with pytest.raises(MtpkitError, match=match):
        GenerationParams(**kw)


def test_draft_sampling_scales_only_the_drafts_temperature():
    sp = SamplingParams(temperature=1.5, top_p=0.9, top_k=7)
    assert GenerationParams(sampling=sp, draft_temperature=0.6).draft_sampling == \
        SamplingParams(temperature=1.5 * 0.6, top_p=0.9, top_k=7)
    assert GenerationParams(draft_temperature=0.6).draft_sampling.greedy  # greedy stays greedy


@pytest.mark.parametrize("kw,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_bad_sampling_params(kw, match):
    with pytest.raises(MtpkitError, match=match):
        SamplingParams(**kw)


def test_prompt_errors(target):
    be = TorchBackend(target, None, max_len=16)
    with pytest.raises(MtpkitError, match="empty prompt"):
        _run(be, [], set())
    with pytest.raises(MtpkitError, match="does not fit"):
        _run(be, list(range(16)), set())
    # generation stops cleanly when the context fills up
    out, rounds = _run(be, [1, 2, 3], set(), max_new_tokens=100)
    assert rounds[-1].finish == "context" and len(out) == 16 - 3 + 1  # the last token needs no cache slot


def test_adaptive_drafting_is_still_lossless(target):
    drafter = tiny_drafter(target, 5)
    prompt = [4, 5, 6]
    plain, _ = _run(TorchBackend(target, None, max_len=128), prompt, set(), max_new_tokens=40)
    spec, rounds = _run(TorchBackend(target, drafter, max_len=128), prompt, set(), max_new_tokens=40,
                        num_draft_tokens=6, min_confidence=0.2)
    assert spec == plain
    assert any(r.drafted < 6 for r in rounds[1:-1])  # it did stop some drafts early


class ChunkedPlain:
    """A backend with `fused_plain` made of single verify steps (what the torch backend's CUDA graphs compute, here
    on the CPU): the loop's chunked plain decoding, tested without a GPU."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def fused_plain(self, token, n, sp, u):
        self.calls.append(n)
        ops, out = self.inner.ops, []
        for i in range(n):
            logits, hidden = self.inner.verify(token)
            j = ops.argmax(logits[0]) if sp.greedy else ops.pick(probs(ops, logits[0], sp), u[i])
            out.append(ops.to_list(j)[0])
            token = ops.tokens(out[-1:])
        return ops.tokens(out), hidden[0]


def test_chunked_plain_decoding_emits_what_single_steps_emit(target):
    from mtpkit.api import Stats
    prompt = [3, 14, 15, 92, 65]
    plain, _ = _run(TorchBackend(target, None, max_len=128), prompt, set(), max_new_tokens=40)
    be = ChunkedPlain(TorchBackend(target, None, max_len=128))
    got, rounds = _run(be, prompt, set(), max_new_tokens=40)
    assert got == plain and be.calls == [PLAIN_CHUNK, PLAIN_CHUNK, 39 - 2 * PLAIN_CHUNK]
    st = Stats()
    for r in rounds:
        st.add(r)
    assert st.target_forwards == 39 and st.tau == 1.0 and rounds[-1].finish == "length"
    # an EOS inside a chunk ends the output there
    eos = plain[20]
    want = plain[:plain.index(eos) + 1]
    got, rounds = _run(ChunkedPlain(TorchBackend(target, None, max_len=128)), prompt, {eos}, max_new_tokens=40)
    assert got == want and rounds[-1].finish == "eos"
    # the context fills inside a chunk: the same tokens as single steps, then "context"
    short, rounds_single = _run(TorchBackend(target, None, max_len=30), prompt, set(), max_new_tokens=40)
    be = ChunkedPlain(TorchBackend(target, None, max_len=30))
    got, rounds = _run(be, prompt, set(), max_new_tokens=40)
    assert got == short and rounds[-1].finish == rounds_single[-1].finish == "context" and len(got) == 30 - 5 + 1
    # sampling: one uniform per step, drawn by the loop
    got, _ = _run(ChunkedPlain(TorchBackend(target, None, max_len=128)), prompt, set(), max_new_tokens=40,
                  sampling=SamplingParams(temperature=1.0), seed=3)
    assert len(got) == 40


def test_the_gates_plain_steps_run_in_chunks(target):
    """With a drafter that gets little accepted the gate picks k = 0: those plain steps run as fused chunks, and
    the output stays plain greedy decoding."""
    prompt = [3, 14, 15, 92, 65]
    plain, _ = _run(TorchBackend(target, None, max_len=256), prompt, set(), max_new_tokens=120)
    be = ChunkedPlain(TorchBackend(target, tiny_drafter(target, 1), max_len=256, max_draft=4))
    got, rounds = _run(be, prompt, set(), max_new_tokens=120, num_draft_tokens=4, gate=True)
    assert got == plain
    assert be.calls and any(r.forwards > 1 and r.drafted == 0 for r in rounds)
    assert any(r.drafted for r in rounds)  # the gate still drafts (first the longest draft, then probes)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
def test_accept_rows_reads_only_the_rows_acceptance_needs_and_equals_accept(temperature):
    """loop.accept_rows (a verify whose head rows are computed when read: Backend.verify_rows) reads rows 0..n in
    order, n the drafts it accepts, and decides exactly what loop.accept decides on all k + 1 rows, for the same
    generator state (greedy; sampling with and without top-p / top-k, the centroid head's candidate ids or a dense q)."""
    from types import SimpleNamespace

    import numpy as np

    from mtpkit.runtime.backend import Draft
    from mtpkit.runtime.loop import accept, accept_rows
    from mtpkit.runtime.ops import NumpyOps
    g = np.random.default_rng(2)
    be = SimpleNamespace(ops=NumpyOps, fused_accept=None)
    V, N = 40, 8
    ns = set()
    for trial in range(200):
        sp = SamplingParams(temperature, top_p=0.9 if trial % 2 else 1.0, top_k=12 if trial % 3 == 0 else 0)
        k = int(g.integers(1, 6))
        logits = (g.standard_normal((k + 1, V)) * 3).astype(np.float32)
        if sp.greedy:
            drafts = logits[:k].argmax(-1)
            drafts[g.random(k) < 0.3] = g.integers(0, V)  # some rejected
            d = Draft(drafts.astype(np.int64))
        else:
            dense = trial % 4 == 0
            ids = None if dense else np.stack([g.permutation(V)[:N] for _ in range(k)]).astype(np.int64)
            q = g.random((k, V if dense else N)) ** 3
            q = (q / q.sum(-1, keepdims=True)).astype(np.float32)
            if trial % 5 == 0:  # drafts that the target likes: long accepted runs
                q = probs(NumpyOps, logits[:k] if dense else np.take_along_axis(logits[:k], ids, -1), sp)
            picks = np.array([g.choice(q.shape[1], p=qi / qi.sum(dtype=np.float64)) for qi in q])
            d = Draft((picks if dense else ids[np.arange(k), picks]).astype(np.int64), picks, q, ids)
        seed = int(g.integers(1 << 30))
        want = accept(be, d, logits, sp, NumpyOps.generator(seed), verify="token")  # accept_rows judges token-wise
        read = []
        got = accept_rows(be, d, lambda i, read=read, x=logits: read.append(i) or x[i], sp, NumpyOps.generator(seed))
        assert got == want, (trial, sp, k)
        assert read == list(range(want[0] + 1)), (read, want)
        ns.add(want[0] == k)
    assert ns == {True, False}  # all-accepted and rejected rounds alike
