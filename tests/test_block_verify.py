"""Block verification (sampling.accept_block_logits): the output keeps the target's distribution where p depends on
the drafts before it (the case the block rule's weights are about), it accepts more than token-wise rejection on
average, and padded to K drafts with k live it decides what it decides on the k drafts alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mtpkit.runtime.ops import NumpyOps
from mtpkit.runtime.sampling import SamplingParams, accept_block_logits, accept_rejection_logits
from mtpkit.runtime.torch_backend import TorchBackend
from tests.conftest import tiny_target
from tests.test_loop import CHI2_999, _chi2

V, K, N_CAND = 4, 3, 3
T1 = SamplingParams(temperature=1.0)


def _ops(name):
    return NumpyOps() if name == "numpy" else TorchBackend(tiny_target(0), None, max_len=8).ops


class _Tree:
    """A target p(. | prefix) and a drafter q(. | prefix) over a V-token vocabulary for every prefix of the drafts
    (random, fixed by the seed); q over N_CAND candidates per prefix (token 0 never one) when sparse."""

    def __init__(self, seed: int, sparse: bool):
        self.g, self.sparse, self.p, self.q = np.random.default_rng(seed), sparse, {}, {}

    def target(self, prefix: tuple) -> np.ndarray:
        if prefix not in self.p:
            x = self.g.random(V) ** 3
            self.p[prefix] = x / x.sum()
        return self.p[prefix]

    def draft(self, prefix: tuple) -> tuple[np.ndarray, np.ndarray]:
        """(q over its ids, ids)"""
        if prefix not in self.q:
            ids = self.g.permutation(np.arange(1, V))[:N_CAND] if self.sparse else np.arange(V)
            x = self.g.random(ids.size) ** 3
            self.q[prefix] = (x / x.sum(), ids)
        return self.q[prefix]


def _round(tree: _Tree, g: np.random.Generator, k: int):
    """Draft k tokens from q -> (drafts, picks, q [k, N], ids [k, N], logits [k + 1, V]) (log p of each prefix)."""
    drafts, picks, qs, idss = [], [], [], []
    for _ in range(k):
        q, ids = tree.draft(tuple(drafts))
        j = int(min((g.random() > q.cumsum()).sum(), q.size - 1))
        picks.append(j)
        qs.append(q)
        idss.append(ids)
        drafts.append(int(ids[j]))
    logits = np.log(np.stack([tree.target(tuple(drafts[:i])) for i in range(k + 1)]))
    return np.array(drafts), np.array(picks), np.stack(qs), np.stack(idss), logits


@pytest.mark.parametrize("ops_name,sparse", [("numpy", False), ("numpy", True), ("torch", True)])
def test_block_verification_keeps_the_target_distribution_and_accepts_more(ops_name, sparse):
    """40k rounds of 3 drafts each, target rows that depend on the drafts before them: the first two emitted tokens
    (the second drawn from the target after the first when a round emits one) are distributed as the target's, and
    the same rounds through token-wise rejection accept fewer drafts on average."""
    ops, tree, g = _ops(ops_name), _Tree(1, sparse), np.random.default_rng(2)
    arr = (lambda x: x) if ops_name == "numpy" else torch.from_numpy
    rng, n_rounds = ops.generator(0), 40_000 if ops_name == "numpy" else 15_000
    counts, accepted = np.zeros((V, V)), {"block": 0, "token": 0}
    for _ in range(n_rounds):
        drafts, picks, q, ids, logits = _round(tree, g, K)
        args = (arr(drafts), arr(picks), arr(q.astype(np.float32)), arr(ids) if sparse else None,
                arr(logits.astype(np.float32)), T1)
        u = ops.rand(rng, K + 1, like=args[4])
        n, nxt = ops.to_list(ops.cat(accept_block_logits(ops, *args, u)))
        accepted["block"] += n
        accepted["token"] += ops.to_list(accept_rejection_logits(ops, *args, u)[0])[0]
        toks = drafts[:n].tolist() + [nxt]
        if len(toks) < 2:
            toks.append(int(g.choice(V, p=tree.target((toks[0],)))))
        counts[toks[0], toks[1]] += 1
    want = np.array([[tree.target(())[a] * tree.target((a,))[b] for b in range(V)] for a in range(V)])
    assert _chi2(torch.from_numpy(counts.ravel()), n_rounds * torch.from_numpy(want.ravel())) < CHI2_999[15]
    assert accepted["block"] > 1.02 * accepted["token"], accepted


@pytest.mark.parametrize("ops_name", ["numpy", "torch"])
def test_padded_block_rule_is_the_rule_on_k_live_drafts(ops_name):
    """Padded to K = 5 drafts (junk drafts, q rows, logits rows and uniforms past k) with k live, for k = 1..5: the
    same (n, next) as on the k drafts alone, with both outcomes (all accepted, stopped early) seen for every k."""
    ops, g = _ops(ops_name), np.random.default_rng(3)
    arr = (lambda x: x) if ops_name == "numpy" else torch.from_numpy
    Kp, seen = 5, set()
    for trial in range(600):
        k = 1 + trial % Kp
        tree = _Tree(100 + trial, sparse=trial % 2 == 0)
        sp = [T1, SamplingParams(temperature=0.8, top_k=3), SamplingParams(temperature=1.2, top_p=0.7)][trial % 3]
        drafts, picks, q, ids, logits = _round(tree, g, Kp)
        u = g.random(Kp + 1).astype(np.float32)
        sparse = trial % 2 == 0
        cut = lambda x, m: arr(np.ascontiguousarray(x[:m]))  # noqa: E731
        want = ops.to_list(ops.cat(accept_block_logits(
            ops, cut(drafts, k), cut(picks, k), cut(q.astype(np.float32), k), cut(ids, k) if sparse else None,
            cut(logits.astype(np.float32), k + 1), sp, arr(np.concatenate([u[:k], u[Kp:]])))))
        k0 = np.array(k) if ops_name == "numpy" else torch.tensor(k)
        junk_u = np.concatenate([u[:k], u[Kp:], u[k:Kp]])  # u[k] draws the next token when k are live
        got = ops.to_list(ops.cat(accept_block_logits(
            ops, arr(drafts), arr(picks), arr(q.astype(np.float32)), arr(ids) if sparse else None,
            arr(logits.astype(np.float32)), sp, arr(junk_u), k0)))
        assert got == want, (trial, k)
        seen.add((k, want[0] == k))
    assert seen == {(k, done) for k in range(1, Kp + 1) for done in (True, False)}


def _block_outcomes(tree: _Tree, X: tuple) -> list[tuple[float, tuple, np.ndarray]]:
    """The block rule's outcomes for draft block X, computed from its definition (accept_block_logits's docstring):
    [(probability, tokens kept, the next token's distribution)]."""
    G = len(X)
    q = lambda pre, x: dict(zip(tree.draft(pre)[1].tolist(), tree.draft(pre)[0].tolist(), strict=True)).get(x, 0.0)  # noqa: E731
    w = [1.0]
    for i in range(G):
        w.append(min(1.0, w[-1] * tree.target(X[:i])[X[i]] / q(X[:i], X[i])))
    h, res = {G: w[G]}, {}
    for i in range(G):
        qrow = np.array([q(X[:i], x) for x in range(V)])
        r = np.maximum(w[i] * tree.target(X[:i]) - qrow, 0.0)
        h[i] = r.sum() / (r.sum() + 1 - w[i]) if r.sum() + 1 - w[i] > 1e-15 else 0.0
        res[i] = r / r.sum() if r.sum() > 0 else None
    out, stay = [], 1.0
    for i in range(G, -1, -1):
        hi = h[i] if i > 0 else 1.0
        if stay * hi > 0:
            out.append((stay * hi, X[:i], tree.target(X) if i == G else res[i]))
        stay *= 1 - hi
    return out


@pytest.mark.parametrize("seed,sparse", [(0, False), (1, True), (2, True)])
def test_the_block_rule_keeps_the_distribution_exactly(seed, sparse):
    """By enumeration, no sampling: every draft block of 3 on a 4-token vocabulary, every outcome of the block rule,
    then the target's own tokens after it: the first three tokens are distributed exactly as the target's (to float
    rounding), and the rule's expected tokens are at least token-wise rejection's."""
    import itertools
    tree, G, L = _Tree(seed, sparse), 3, 3
    got: dict[tuple, float] = {}
    block_tokens = token_tokens = 0.0

    def extend(s: tuple, m: float) -> None:
        if len(s) >= L:
            got[s[:L]] = got.get(s[:L], 0.0) + m
        else:
            for z in range(V):
                extend(s + (z,), m * tree.target(s)[z])
    for X in itertools.product(range(V), repeat=G):
        qs = [dict(zip(tree.draft(X[:i])[1].tolist(), tree.draft(X[:i])[0].tolist(), strict=True)).get(X[i], 0.0)
              for i in range(G)]
        px = float(np.prod(qs))
        if px == 0:
            continue
        for pr, kept, nxt in _block_outcomes(tree, X):
            block_tokens += px * pr * (len(kept) + 1)
            for y in range(V):
                extend(kept + (y,), px * pr * nxt[y])
        run = 1.0
        for i in range(G):
            run *= min(1.0, tree.target(X[:i])[X[i]] / qs[i])
            token_tokens += px * run
        token_tokens += px
    want = {s: float(np.prod([tree.target(s[:i])[s[i]] for i in range(L)])) for s in itertools.product(range(V), repeat=L)}
    assert max(abs(got.get(s, 0.0) - m) for s, m in want.items()) < 1e-12
    assert block_tokens >= token_tokens - 1e-12, (block_tokens, token_tokens)
