"""Sampling and acceptance rules, written once over an array `ops` (runtime/ops.py: numpy or torch).

`probs` applies temperature, top-k and top-p the same way to target and draft logits (a draft step of the
centroid head scores only its candidates; the rest of the vocabulary has probability 0, so applying the
rules to the candidates is the same as applying them to a dense row filled with -inf). Acceptance:
- `accept_greedy`: the longest prefix of drafts equal to the target's argmax, then the target's next argmax.
- `accept_rejection`: Leviathan et al. / Chen et al. speculative sampling: accept d_i with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from norm(max(0, p_i - q_i)); if all k are
  accepted sample the bonus from p_k. The output is distributed exactly as p, whatever q is, as long as
  each d_i was drawn from q_i (chi-square tested per backend in tests/test_backend_contract.py).
  q stays sparse: q_i is over the candidate ids of step i, and the residual is p_i with q_i subtracted there.
  It runs on the device with no host sync (a GPU backend replays it as one CUDA graph: Backend.fused_accept).
- `accept_block_logits`: block verification (Sun et al. 2024): the same output distribution, the drafts judged as
  one block, at least as many kept in expectation; the default for a sampled chain (`VERIFY`, loop's `verify`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mtpkit.errors import MtpkitError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise MtpkitError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MtpkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MtpkitError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def scaled(ops, logits, sp: SamplingParams):
    """[..., N] logits -> [..., N] float32 logits after temperature, -inf outside top-k / top-p: probs() is their
    softmax."""
    x = ops.float32(logits) / sp.temperature
    n = x.shape[-1]
    if sp.top_k and sp.top_k < n:
        x = ops.mask_below(x, ops.sort_desc(x)[..., sp.top_k - 1:sp.top_k])
    if sp.top_p < 1.0:
        s = ops.sort_desc(x)
        ps = ops.softmax(s)
        keep = (ops.cumsum(ps) - ps) < sp.top_p  # the smallest prefix whose mass reaches top_p (never empty)
        x = ops.mask_below(x, ops.take_along(s, ops.count(keep) - 1))
    return x


def probs(ops, logits, sp: SamplingParams):
    """[..., N] logits -> [..., N] float32 probabilities after temperature, top-k, top-p."""
    return ops.softmax(scaled(ops, logits, sp))


def accept_greedy(ops, drafts, target_logits) -> tuple[int, int, list[int]]:
    """drafts [k], target_logits [k + 1, V] (row i predicts the token after draft i) -> (n, next, the k drafts)
    as host ints: one host transfer (drafts and the target's argmax together)."""
    tgt = ops.argmax(target_logits)
    both = ops.to_list(ops.cat([drafts, tgt]))
    k = len(both) // 2
    d, t = both[:k], both[k:]
    n = 0
    while n < k and d[n] == t[n]:
        n += 1
    return n, t[n], d


def accept_greedy_device(ops, drafts, target_logits):
    """accept_greedy's (n, next) as 0-d backend arrays, with no host sync (a pipelined round: loop.pipelined)."""
    tgt = ops.argmax(target_logits)
    n = ops.leading_count(drafts == tgt[:drafts.shape[0]])
    return n, ops.index(tgt, n)


def accept_rejection(ops, drafts, picks, q, ids, p, u):
    """drafts [k] drawn from q [k, N] (draft i = ids[i, picks[i]], or picks[i] when ids is None);
    p [k + 1, V] target probabilities; u [k + 1] uniforms -> (n_accepted, next token) as 0-d backend arrays.
    No host sync and no branch on a device value, so a backend can capture it in a CUDA graph
    (Backend.fused_accept): u[:k] decide the drafts, u[k] draws the next token from the residual at the first
    rejection (from p[k] when all k are accepted: q's row is zeroed there)."""
    k = drafts.shape[0]
    pd = ops.take_along(p[:k], drafts[:, None])[:, 0]
    return _reject(ops, picks, q, ids, pd, lambda n: ops.index(p, n), u)


def accept_rejection_logits(ops, drafts, picks, q, ids, logits, sp: SamplingParams, u, k=None):
    """accept_rejection(ops, drafts, picks, q, ids, probs(ops, logits, sp), u) computing p only where the rule reads
    it: each row's log-sum-exp, p at the drafts, and the one row the next token is drawn from (k + 1 rows of a 262k
    vocabulary otherwise cost a softmax each). The same decisions up to float rounding.
    k: None, or a 0-d array when the inputs are padded to K = drafts.shape[0] drafts (K + 1 logits rows, K + 1
    uniforms) of which the first k are live: one shape for every k (a compiled CUDA graph); u[k] draws the next
    token."""
    x = scaled(ops, logits, sp)
    lse = ops.logsumexp(x)  # [K + 1]
    K = drafts.shape[0]
    pd = ops.exp(ops.take_along(x[:K], drafts[:, None])[:, 0] - lse[:K])
    return _reject(ops, picks, q, ids, pd, lambda n: ops.exp(ops.index(x, n) - ops.index(lse, n)), u, k)


def accept_block_logits(ops, drafts, picks, q, ids, logits, sp: SamplingParams, u, k=None):
    """Block verification (Sun et al. 2024, "Block Verification Accelerates Speculative Decoding", Algorithm 2): the
    same inputs and outputs as accept_rejection_logits, and the output is distributed as p too, but the drafts are
    judged as one block, which accepts at least as many of them in expectation (token-wise rejection stops at the
    first draft whose ratio test fails; the block rule can keep a longer prefix whose joint weight is still there).
    With w_0 = 1, w_i = min(1, w_{i-1} p_i(d_i) / q_i(d_i)) and rho_i = sum_x max(0, w_i p_{i+1}(x) - q_{i+1}(x)):
    stop after i drafts with probability h_i = rho_i / (rho_i + 1 - w_i) (i < k; h_k = w_k), tried from i = k down,
    u[i - 1] deciding i; n = the first i that stops (0 if none); the next token is drawn with u[k] from
    norm(max(0, w_n p_{n+1} - q_{n+1})) (n < k) or p_{k+1}. rho needs p only at q's candidates and the mass outside
    them (1 - their sum): no row of the vocabulary beyond its log-sum-exp and the one drawn from."""
    K = drafts.shape[0]
    if K == 0:
        return accept_rejection_logits(ops, drafts, picks, q, ids, logits, sp, u, k)
    x = scaled(ops, logits, sp)
    lse = ops.logsumexp(x)  # [K + 1]
    pd = ops.exp(ops.take_along(x[:K], drafts[:, None])[:, 0] - lse[:K])
    qd = ops.take_along(q, picks[:, None])[:, 0]
    at = ops.arange(K, like=pd)  # draft i + 1 at index i
    live = at < (K if k is None else k)
    ratio = ops.where(live, pd / ops.where(live, qd, 1.0), 0.0)
    ws = [ratio[0] * 0 + 1]  # w_0 .. w_K
    for i in range(K):
        ws.append(ops.clamp_max(ws[-1] * ratio[i], 1))
    w = ops.stack(ws)
    pc = ops.exp((x[:K] if ids is None else ops.take_along(x[:K], ids)) - lse[:K, None])  # p_{i+1} at q_{i+1}'s ids
    outside = 0.0 if ids is None else 1 - pc.sum(-1)
    rho = w[:K] * outside + ops.where(w[:K, None] * pc > q, w[:K, None] * pc - q, 0.0).sum(-1)  # rho_0 .. rho_{K-1}
    last = at + 1 == (K if k is None else k)  # i = k: h_k = w_k
    den = ops.cat([rho[1:] + 1 - w[1:K], ratio[:1] * 0 + 1])  # (i = K: unused) -> [K], i = 1..K
    mid = ops.cat([rho[1:], ratio[:1] * 0]) / ops.where(den > 0, den, 1.0)
    h = ops.where(last, w[1:], ops.where(live, mid, 0.0))
    ok = ops.where(u[:K] < h, 1.0, 0.0)
    n = ops.count((ops.cumsum(ok) - ok) < ok.sum())[0]  # the largest i with u[i - 1] < h_i, 0 if none
    j = ops.clamp_max(n, K - 1)
    more = n < (K if k is None else k)
    row = ops.exp(ops.index(x, n) - ops.index(lse, n)) * ops.index(w, n)
    dist = ops.residual(row, ops.index(q, j) * more, None if ids is None else ops.index(ids, j))
    return n, ops.pick(dist, u[K] if k is None else ops.index(u, k))


VERIFY = {"block": accept_block_logits, "token": accept_rejection_logits}  # a sampled chain's rule, by name


def _reject(ops, picks, q, ids, pd, row, u, k=None):
    """The rejection rule on p at the drafts pd [K] and row(n) -> p [V] of row n; k: the live drafts (None: all K)."""
    K = pd.shape[0]
    if K == 0:  # nothing drafted (adaptive drafting stopped at its first step): n is a 0-d zero
        n = ops.leading_count(u[:0] > 1)
        return n, ops.pick(row(n), u[0])
    qd = ops.take_along(q, picks[:, None])[:, 0]
    ok = u[:K] * qd < pd  # u < p/q without dividing by a tiny q
    if k is not None:
        ok = ok & (ops.arange(K, like=pd) < k)
    n = ops.leading_count(ok)
    j = ops.clamp_max(n, K - 1)  # the rejected draft's row; when n == k any row, zeroed
    live = n < (K if k is None else k)
    dist = ops.residual(row(n), ops.index(q, j) * live, None if ids is None else ops.index(ids, j))
    return n, ops.pick(dist, u[K] if k is None else ops.index(u, k))
