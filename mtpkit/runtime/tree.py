"""Sampled speculation over a draft tree: w first drafts drawn without replacement, each followed by a chain.

At T > 0 the first draft of a round is where acceptance is lowest (1 - TV ~0.46 on everyday prompts and MT-Bench
with the shipped drafter, issue 15). A tree round drafts w distinct candidates for the first token from the
drafter's q (one draft step), continues each with k - 1 sampled steps (w rows a step: the drafter has no cache of
its own, so branches are just rows), verifies the 1 + w k tokens in one target forward, and accepts:
- first token: recursive rejection sampling over the w candidates (Jeon et al. 2024, "Recursive Speculative
  Decoding"): candidate c is accepted with probability min(1, r_c(x_c) / q_c(x_c)); on rejection
  r_{c+1} = norm(max(0, r_c - q_c)) and q_{c+1} = q_c without x_c, renormalized; r_0 = the target's p. Each
  stage samples its r exactly whatever the next candidate is, so the first token is distributed as p; when
  all w are rejected it is drawn from r_w.
- the accepted candidate's chain: a one-chain rule (sampling.VERIFY: block verification by default, or token-wise
  rejection) against the target's rows of that chain, which were computed with that chain as their context. Given
  candidate c accepted, its chain's later drafts were drawn from q after c whatever the other candidates were, so
  the chain is an ordinary one from there.
The output is distributed as the target's sampling distribution (chi-square tested in tests/test_tree.py).

Layout of a round (w chains, k drafts each, step-major): verify row 0 is the bonus token b; row 1 + i w + c is
chain c's draft i (depth i + 1), which sees the cache, b and chain c's drafts 0..i. After acceptance the
accepted chain's rows are moved to the positions after b (Backend.keep) and the cache is cut there.

Only at T > 0: a tree row's keys sit at other cache slots than in plain decoding, so its logits are not bitwise a
plain step's, and greedy speculative output must equal plain greedy output exactly (chains keep that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mtpkit.runtime.sampling import VERIFY, SamplingParams, probs


@dataclass
class TreeDraft:
    tokens: Any  # [w, k] chain c's drafts (chain c starts with first-draft candidate c)
    picks: Any  # [w, k] each draft's index among its step's candidates
    q: Any  # [w, k, N] each step's draft probabilities (row [c, 0]: the shared first step's q)
    ids: Any  # [w, k, N] candidate ids, or None (dense head: q is over the vocabulary)
    valid: Any  # [w] bool: the first step's q had mass left for candidate c (False: c is never accepted)

    @property
    def shape(self) -> tuple[int, int]:
        w, k = self.tokens.shape
        return w, k

    def verify_tokens(self, ops, bonus: Any) -> Any:
        """[1 + w k] the verify's input: b, then the drafts step-major (row 1 + i w + c = chain c's draft i)."""
        return ops.cat([bonus, self.tokens.T])


def layout(w: int, k: int) -> tuple[list[int], list[list[bool]]]:
    """(depth [n], see [n][n]) of a round's verify rows, n = 1 + w k: row 1 + i w + c is at depth i + 1 and sees
    row 0 and rows 1 + j w + c, j <= i."""
    n = 1 + w * k
    chain = [-1] + [r % w for r in range(w * k)]
    depth = [0] + [r // w + 1 for r in range(w * k)]
    see = [[j == 0 or (chain[i] == chain[j] and depth[j] <= depth[i]) for j in range(n)] for i in range(n)]
    return depth, see


def kept_rows(w: int, c: int, n: int) -> list[int]:
    """Verify rows (offsets from the bonus's position) of chain c's first n drafts, in order."""
    return [1 + i * w + c for i in range(n)]


def draft_tree(backend, token: Any, h: Any, k: int, w: int, sp: SamplingParams, rng: Any, fused: bool = True) -> TreeDraft:
    """w chains of k sampled drafts after `token` (the bonus, not yet cached) from the target's hidden h: step 0 once,
    its q drawn w times without replacement (inverse CDF with the drawn candidates zeroed), then k - 1 steps of w
    rows (`backend.draft_rows`). Uniforms: w k drawn here, up front (`backend.fused_tree_draft`, CUDA graphs, draws
    with the same ones; fused=False: never)."""
    ops = backend.ops
    u = ops.rand(rng, w * k, like=h)
    if fused and backend.fused_tree_draft is not None:
        return backend.fused_tree_draft(token, h, k, w, sp, u)
    s = backend.draft_step(token, h)
    q0 = probs(ops, s.logits, sp)
    left, picks, valid = q0, [], []
    for c in range(w):
        valid.append(left.sum() > 0)
        j = ops.pick(left, u[c])
        picks.append(j)
        left = ops.zero_at(left, j)
    pick0 = ops.stack(picks)
    tok = pick0 if s.ids is None else ops.take_along(s.ids, pick0)
    toks, pks, qs, idss = [tok], [pick0], [ops.stack([q0] * w)], [None if s.ids is None else ops.stack([s.ids] * w)]
    hs = ops.stack([s.h] * w)
    for i in range(1, k):
        r = backend.draft_rows(tok, hs)
        q = probs(ops, r.logits, sp)
        j = ops.pick_rows(q, u[w * i:w * (i + 1)])
        tok = j if r.ids is None else ops.take_along(r.ids, j[:, None])[:, 0]
        hs = r.h
        toks.append(tok)
        pks.append(j)
        qs.append(q)
        idss.append(r.ids)
    t = lambda xs: ops.stack(xs).swapaxes(0, 1)  # noqa: E731  [k, w, ...] -> [w, k, ...]
    return TreeDraft(t(toks), t(pks), t(qs), None if s.ids is None else t(idss), ops.stack(valid))


def accept_tree(ops, d: TreeDraft, logits: Any, sp: SamplingParams, u: Any, k: Any = None,
                verify: str = "block") -> tuple[Any, Any, Any]:
    """d (w chains of K drafts), logits [1 + w K, V] the target's at the verify's rows (layout), u [w + K + 1]
    uniforms -> (chain c, drafts accepted n, next token) as 0-d arrays; c = w when no first draft was accepted
    (then n = 0). k: None, or a 0-d array when the chains are padded to K drafts of which the first k are live (one
    shape for every k: a compiled CUDA graph); u[w + k] draws the token when no first draft is accepted. The target's
    p only where the rule reads it (row 0's, and the accepted chain's through the rule `verify` names in
    sampling.VERIFY, from the accepted candidate on). No host sync and no branch on a device value (a GPU backend can
    replay it as one graph)."""
    w, K = d.shape
    r = probs(ops, logits[0], sp)  # the first token's target: r_0 = p, then the residuals
    q = d.q[0, 0]
    ids0 = None if d.ids is None else d.ids[0, 0]
    chosen, alive = ops.full_like(d.picks[0, 0], w), ops.full_like(d.valid[0], True)
    for c in range(w):
        qn = q / (q.sum() + 1e-30)
        j = d.picks[c, 0]
        ok = alive & d.valid[c] & (u[c] * ops.index(qn, j) < ops.index(r, d.tokens[c, 0]) / r.sum())
        chosen = ops.where(ok, c, chosen)
        alive = alive & ~ok
        r = ops.residual(r / r.sum(), qn, ids0)
        q = ops.zero_at(q, j)
    cc = ops.clamp_max(chosen, w - 1)
    rows = logits[1:].reshape(K, w, -1)  # [K, w, V]: chain c's rows are rows[:, c]
    ids = None if d.ids is None else ops.index(d.ids, cc)[1:]
    n, nxt = VERIFY[verify](ops, ops.index(d.tokens, cc)[1:], ops.index(d.picks, cc)[1:], ops.index(d.q, cc)[1:],
                            ids, ops.column(rows, cc), sp, u[w:w + K], None if k is None else k - 1)
    none = chosen == w
    return chosen, ops.where(none, 0, n + 1), ops.where(none, ops.pick(r, u[w + K] if k is None else ops.index(u, k + w)),
                                                      nxt)
