"""Sampled draft trees (runtime/tree.py): the layout, the torch backend's tree verify and keep, and acceptance that
keeps the target's distribution (chi-square), for numpy's and torch's ops, dense and sparse q."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtpkit.errors import MtpkitError
from mtpkit.runtime.loop import GenerationParams, generate
from mtpkit.runtime.ops import NumpyOps
from mtpkit.runtime.sampling import SamplingParams, probs
from mtpkit.runtime.torch_backend import TorchBackend
from mtpkit.runtime.tree import TreeDraft, accept_tree, kept_rows, layout
from tests.conftest import tiny_drafter, tiny_target
from tests.test_loop import CHI2_999, _chi2, _run

T1 = SamplingParams(temperature=1.0)


def test_layout_rows_see_their_chain_only():
    depth, see = layout(2, 2)  # rows: b, c0 d0, c1 d0, c0 d1, c1 d1
    assert depth == [0, 1, 1, 2, 2]
    assert [[int(x) for x in row] for row in see] == [
        [1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
    assert kept_rows(2, 1, 2) == [2, 4] and kept_rows(3, 0, 0) == []


@pytest.mark.parametrize("seed,graphs", [(0, False), (1, False), (2, False), (0, True), (1, True)])
def test_tree_rows_compute_what_each_chain_computes_and_keep_moves_the_branch(seed, graphs):
    """The contract test's tree check (test_backend_contract) where the sliding layers' ring wraps inside the tree: a
    ring of 4 + 64 slots, the tree at positions 66..72. A tree verify's rows equal each chain verified alone; after
    keep(), the next step computes what it computes after verifying that chain alone. graphs: the CUDA-graph paths
    (CPU stand-in), whose move graph is captured at the first keep of each length (its warm-up runs must not move
    overlapping rows twice)."""
    from tests.conftest import with_cpu_graphs
    target = tiny_target(seed, sliding_window=4)
    drafter = tiny_drafter(target, seed)
    V = target.config.vocab_size
    g = torch.Generator().manual_seed(seed)
    be = TorchBackend(target, drafter, max_len=256, max_draft=8)
    if graphs:
        be = with_cpu_graphs(be)
    assert be.cache.has_ring and be.cache.ring_size == 68
    prompt = torch.randint(0, V, (66,), generator=g).tolist()
    w, k = 3, 2
    toks = torch.randint(0, V, (1 + w * k,), generator=g)
    chain = lambda c: torch.cat([toks[:1], toks[1:].view(k, w)[:, c]])  # noqa: E731
    with torch.no_grad():
        be.start(prompt)
        p0 = be.length
        lt, ht = (x.clone() for x in be.verify_tree(toks, w))
        for c in range(w):
            be.rollback(p0)
            lc, hc = be.verify(chain(c))
            rows = [0, *kept_rows(w, c, k)]
            torch.testing.assert_close(lt[rows], lc, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ht[rows], hc, rtol=1e-5, atol=1e-5)
        for c in (1, 0, 2):  # chain 1 first: its rows 2, 5 move onto 1, 2 (overlapping), where a move of 2 rows starts
            for n in range(k + 1):
                be.rollback(p0)
                be.verify_tree(toks, w)
                be.keep(p0, kept_rows(w, c, n))
                assert be.length == p0 + 1 + n
                got = be.verify(torch.tensor([5, 6]))[0].clone()  # (graphs: a view of the graph's output)
                be.rollback(p0)
                be.verify(chain(c)[:n + 1])
                torch.testing.assert_close(got, be.verify(torch.tensor([5, 6]))[0], rtol=1e-5, atol=1e-5)


def _tree_round(g, q0, ids0, Q1, ids1, w, depth=2):
    """One sampled tree of w chains, `depth` drafts each: roots from q0 without replacement, then each draft from
    Q1[the previous draft] (a drafter that reads the last token only)."""
    left, roots, valid = q0.copy(), [], []
    for _ in range(w):
        valid.append(left.sum() > 0)
        j = NumpyOps.pick(left, g.random())
        roots.append(int(j))
        left[j] = 0
    cols, pcols, qs, idss = [ids0[roots]], [np.array(roots)], [np.stack([q0] * w)], [np.stack([ids0] * w)]
    for _ in range(depth - 1):
        prev = cols[-1]
        pick = np.array([int(NumpyOps.pick(Q1[t], g.random())) for t in prev])
        cols.append(ids1[prev, pick])
        pcols.append(pick)
        qs.append(Q1[prev])
        idss.append(ids1[prev])
    return TreeDraft(np.stack(cols, 1), np.stack(pcols, 1), np.stack(qs, 1), np.stack(idss, 1), np.array(valid))


@pytest.mark.parametrize("ops_name,w,depth,verify", [("numpy", 3, 2, "block"), ("torch", 3, 2, "token"),
                                                    ("numpy", 2, 2, "token"), ("torch", 5, 2, "block"),
                                                    ("numpy", 2, 3, "block"), ("numpy", 3, 3, "token")])
def test_tree_acceptance_preserves_the_target_distribution(ops_name, w, depth, verify):
    """40k rounds (numpy's ops; 15k with torch's, on the host) on an 8-token vocabulary, q over 5 candidates a step
    (token 0 never one): the first emitted token is distributed as p, and each later one, given the one before x, as
    the target's row after x (a target and a drafter that read the last token only). w = 5 drafts every candidate of
    the first step (the last one has no mass: never accepted). depth 3: the accepted chain has 2 drafts after its
    candidate, where block verification and token-wise rejection differ (block keeps at least as many)."""
    V, N, n_rounds = 8, 5, 40_000 if ops_name == "numpy" else 15_000
    g = np.random.default_rng(0)
    P0 = g.random(V) ** 3
    P0 /= P0.sum()
    after = g.random((V, V)) ** 3  # the target's row after token x
    after /= after.sum(-1, keepdims=True)
    ids0 = g.permutation(np.arange(1, V))[:N]
    q0 = g.random(N) ** 3
    q0[-1] = 0  # a candidate the drafter gives no mass
    q0 /= q0.sum()
    ids1 = np.stack([g.permutation(np.arange(1, V))[:N] for _ in range(V)])
    Q1 = g.random((V, N)) ** 3
    Q1 /= Q1.sum(-1, keepdims=True)
    ops = NumpyOps() if ops_name == "numpy" else TorchBackend(tiny_target(0), None, max_len=8).ops
    arr = (lambda x: x) if ops_name == "numpy" else torch.from_numpy
    rng = ops.generator(0)
    counts = np.zeros((depth + 1, V))  # emitted token i (i = 0: the first) of a round's up to depth + 1
    given = np.zeros((depth + 1, V))  # its expected counts given the token before it
    chosen, emitted = set(), 0
    for _ in range(n_rounds):
        d = _tree_round(g, q0, ids0, Q1, ids1, w, depth)
        rows = np.log(np.concatenate([P0[None], after[d.tokens.T.reshape(-1)]])).astype(np.float32)  # logits
        d = TreeDraft(*(arr(x) for x in (d.tokens, d.picks, d.q.astype(np.float32), d.ids, d.valid)))
        u = ops.rand(rng, w + depth + 1, like=arr(rows))
        c, n, nxt = ops.to_list(ops.cat(accept_tree(ops, d, arr(rows), T1, u, verify=verify)))
        chosen.add(c)
        toks = (d.tokens[c].tolist()[:n] if n else []) + [nxt]
        emitted += len(toks)
        given[0] += P0
        for i, t in enumerate(toks):
            counts[i, t] += 1
            if i + 1 < len(toks):
                given[i + 1] += after[t]
    tested = [i for i in range(depth + 1) if given[i].sum() >= 1000]  # (a round's last tokens: too few to test)
    assert len(tested) >= depth
    for i in tested:
        assert _chi2(torch.from_numpy(counts[i]), torch.from_numpy(given[i])) < CHI2_999[7], i
    assert len(chosen) >= 3  # rounds accepted different chains, and some none (c = w)
    assert emitted / n_rounds > 1.3  # chains are accepted into their later drafts


def test_tree_block_verification_keeps_more_than_token_wise():
    """The same trees, uniforms and target rows (a target reading the last token, chains of 4 drafts): judging the
    accepted chain as one block emits more tokens a round than token-wise rejection (1.9 % here; 0.8-1.9 % over
    seeds 0-5), as it must in expectation: the first token is decided the same way by both."""
    V, N, w, depth, n_rounds = 8, 5, 2, 4, 6000
    g = np.random.default_rng(3)
    after = g.random((V, V)) ** 2
    after /= after.sum(-1, keepdims=True)
    P0 = after[0]
    ids0 = g.permutation(np.arange(1, V))[:N]
    q0 = np.full(N, 1 / N)
    ids1 = np.stack([g.permutation(np.arange(1, V))[:N] for _ in range(V)])
    Q1 = g.random((V, N)) ** 2
    Q1 /= Q1.sum(-1, keepdims=True)
    ops = NumpyOps()
    rng = ops.generator(0)
    total = {"block": 0, "token": 0}
    for _ in range(n_rounds):
        d = _tree_round(g, q0, ids0, Q1, ids1, w, depth)
        d = TreeDraft(d.tokens, d.picks, d.q.astype(np.float32), d.ids, d.valid)
        rows = np.log(np.concatenate([P0[None], after[d.tokens.T.reshape(-1)]])).astype(np.float32)
        u = ops.rand(rng, w + depth + 1, like=rows)
        for verify in total:
            total[verify] += int(accept_tree(ops, d, rows, T1, u, verify=verify)[1]) + 1
    assert total["block"] > 1.01 * total["token"], total


@pytest.mark.parametrize("ops_name", ["numpy", "torch"])
def test_padded_tree_acceptance_is_the_rule_on_k_live_drafts(ops_name):
    """accept_tree on chains padded to K = 4 drafts (junk past k, logits rows of junk chains' depths, junk uniforms
    past w + k) with k live decides what it decides on the k drafts alone: every k, every outcome kind (a chain
    accepted to its end, rejected inside, none of the first drafts), dense and sparse q, top-k / top-p."""
    V, N, w, K = 12, 6, 3, 4
    g = np.random.default_rng(1)
    ops = NumpyOps() if ops_name == "numpy" else TorchBackend(tiny_target(0), None, max_len=8).ops
    arr = (lambda x: x) if ops_name == "numpy" else torch.from_numpy
    seen = set()
    for trial in range(400):
        k = 1 + trial % K
        sp = [T1, SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.2, top_p=0.8)][trial % 3]
        sparse = trial % 2 == 0
        ids = np.stack([np.stack([g.permutation(V)[:N] for _ in range(K)]) for _ in range(w)]) if sparse else None
        q = g.random((w, K, N if sparse else V)) ** 2
        q /= q.sum(-1, keepdims=True)
        q[:, 0] = q[0, 0]  # the shared first step
        if sparse:
            ids[:, 0] = ids[0, 0]
        picks = np.stack([g.permutation(q.shape[-1])[:w] for _ in range(K)], 1)  # distinct first picks
        picks[:, 1:] = g.integers(0, q.shape[-1], (w, K - 1))
        toks = picks if ids is None else np.take_along_axis(ids, picks[..., None], -1)[..., 0]
        valid = np.array([True] * w)
        # concentrated target rows (sometimes on the drafts) so that chains are accepted far into them
        logits = 3 * g.standard_normal((1 + w * K, V)).astype(np.float32)
        for i in range(K):
            for c in range(w):
                if g.random() < 0.7 and i + 1 < K:
                    logits[1 + i * w + c, toks[c, i + 1]] += 8
        if g.random() < 0.7:
            logits[0, toks[g.integers(w), 0]] += 8
        u = g.random(w + K + 1).astype(np.float32)
        cut = lambda x, k=k: None if x is None else arr(np.ascontiguousarray(x[:, :k]))  # noqa: E731
        d_k = TreeDraft(cut(toks), cut(picks), cut(q.astype(np.float32)), cut(ids), arr(valid))
        rows_k = np.concatenate([logits[:1], logits[1:].reshape(K, w, V)[:k].reshape(k * w, V)])
        want = ops.to_list(ops.cat(accept_tree(ops, d_k, arr(rows_k), sp, arr(u[:w + k + 1]))))
        d_K = TreeDraft(*(None if x is None else arr(x) for x in (toks, picks, q.astype(np.float32), ids, valid)))
        k0 = np.array(k) if ops_name == "numpy" else torch.tensor(k)
        got = ops.to_list(ops.cat(accept_tree(ops, d_K, arr(logits), sp, arr(u), k0)))
        assert got == want, (trial, k)
        c, n, _ = want
        seen.add("none" if c == w else "all" if n == k else "cut")
    assert seen == {"none", "all", "cut"}


def test_sampled_tree_loop_matches_target_distribution():
    """End to end on a 16-token tiny target, 3 branches: the 2nd generated token is distributed as the target's."""
    target = tiny_target(3, vocab_size=16, final_logit_softcapping=None)
    drafter = tiny_drafter(target, 3)
    prompt = [1, 2, 3]
    sp = SamplingParams(temperature=1.3, top_k=12)
    be = TorchBackend(target, drafter, max_len=24, max_draft=3)
    with torch.no_grad():
        p1 = probs(be.ops, target(torch.tensor([prompt])).logits[0, -1], sp)
        cont = torch.tensor([[*prompt, t] for t in range(16)])
        p2 = probs(be.ops, target(cont).logits[:, -1], sp)
    counts = torch.zeros(16)
    N = 3000
    for s in range(N):
        out, rounds = _run(be, prompt, set(), max_new_tokens=3, num_draft_tokens=2, seed=s, sampling=sp, branches=3)
        counts[out[1]] += 1
    assert _chi2(counts, N * (p1[:, None] * p2).sum(0)) < CHI2_999[15]


def test_greedy_decoding_keeps_to_chains():
    """branches applies to sampling only: greedy output with branches = 3 is plain greedy output."""
    target = tiny_target(1)
    be = TorchBackend(target, tiny_drafter(target, 1), max_len=64, max_draft=4)
    plain, _ = _run(be, [3, 4, 5], set(), max_new_tokens=30, num_draft_tokens=4, gate=True)
    tree, _ = _run(be, [3, 4, 5], set(), max_new_tokens=30, num_draft_tokens=4, branches=3)
    assert tree == plain


def test_branches_errors():
    target = tiny_target(1)
    be = TorchBackend(target, tiny_drafter(target, 1), max_len=64, max_draft=4)
    sp = SamplingParams(temperature=1.0)
    with pytest.raises(MtpkitError, match="branches must be >= 1"):
        GenerationParams(branches=0)
    with pytest.raises(MtpkitError, match="min_confidence"):
        list(generate(be, [1, 2], GenerationParams(sampling=sp, branches=2, min_confidence=0.5), set()))

    class NoTrees(TorchBackend):
        verify_tree = None
    with pytest.raises(MtpkitError, match="draft trees"):
        list(generate(NoTrees(target, tiny_drafter(target, 1), max_len=8), [1], GenerationParams(sampling=sp, branches=2), set()))


@pytest.mark.parametrize("auto,temperature,branches,want", [
    ((True, True), 0.0, 1, 0.3), ((True, True), 1.0, 1, 0.3), ((True, False), 0.0, 1, 0.3), ((True, False), 1.0, 1, None),
    ((False, False), 0.0, 1, None), ((True, True), 1.0, 3, None)])
def test_auto_adaptive_drafting_follows_the_backend(monkeypatch, auto, temperature, branches, want):
    """min_confidence="auto": AUTO_MIN_CONFIDENCE on a CPU where the backend's auto_adaptive asks for it at that
    temperature (the torch backend: never), never for a draft tree."""
    from mtpkit.api import Session
    target = tiny_target(1)
    be = TorchBackend(target, tiny_drafter(target, 1), max_len=64, max_draft=4)
    seen = []
    monkeypatch.setattr("mtpkit.api.generate", lambda backend, ids, params, *a, **kw: seen.append(params) or iter(()))
    be.auto_adaptive = auto
    list(Session(be, None, target.config, None).stream([1, 2], temperature=temperature, branches=branches))
    assert seen[0].min_confidence == want
    assert TorchBackend.auto_adaptive == (False, False)


def test_padded_tree_graph_computes_the_tree_and_writes_nothing_past_it():
    """The graph path (CPU stand-in) runs every tree of w chains padded to 1 + w k_max rows: its rows equal the eager
    tree verify's, also at the end of the context, and the cache holds nothing new past the tree's own positions."""
    from tests.conftest import with_cpu_graphs
    target = tiny_target(2, sliding_window=4)
    drafter = tiny_drafter(target, 2)
    V, w = target.config.vocab_size, 3
    g = torch.Generator().manual_seed(0)
    eager = TorchBackend(target, drafter, max_len=24, max_draft=5)
    graphs = with_cpu_graphs(TorchBackend(target, drafter, max_len=24, max_draft=5))
    for plen, k in [(5, 1), (9, 2), (17, 2)]:  # 17 + 1 + 3 * 2 = 24: the tree ends at the context's end
        prompt = torch.randint(0, V, (plen,), generator=g).tolist()
        toks = torch.randint(0, V, (1 + w * k,), generator=g)
        with torch.no_grad():
            eager.start(prompt)
            graphs.start(prompt)
            before = [x.clone() for x in graphs.cache.k]
            want = eager.verify_tree(toks, w)
            got = graphs.verify_tree(toks, w, k_max=5)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        assert set(graphs._graphs.tree_graphs) == {1 + w * 5}  # one padded shape
        end = plen + 1 + w * k
        for layer, (old, new) in enumerate(zip(before, graphs.cache.k, strict=True)):
            if not graphs.cache.is_ring(layer):
                assert torch.equal(old[:, :, end:], new[:, :, end:]) and torch.equal(old[:, :, :plen], new[:, :, :plen])
