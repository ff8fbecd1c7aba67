"""The draft policy, once for every backend: k drafter steps -> the proposed tokens (and, when sampling, the
sparse draft distributions acceptance needs).

Greedy: each step's argmax (over the centroid head's candidates, or the vocabulary). Sampling: step i's token
is drawn from q = probs(candidate logits) at the draft temperature (GenerationParams.draft_sampling) by inverse
CDF with the i-th of k uniforms drawn up front (`ops.pick`); q stays over the candidates. Adaptive stop
(min_confidence): stop once the step's top probability falls below the threshold; the token that failed is not
proposed. Token and h stay backend-native arrays from step to step, so a GPU backend drafts without host syncs
unless adaptive stopping asks for one.

A backend may replace the k-step loop with a fused path that computes the same thing: `fused_greedy_draft(token,
h, k) -> tokens` and `fused_sampled_draft(token, h, k, sp, u) -> Draft` (the torch backend's CUDA graphs); the
contract test (tests/test_backend_contract.py) checks each against the loop below.
"""

from __future__ import annotations

from typing import Any

from mtpkit.runtime.backend import Draft
from mtpkit.runtime.sampling import SamplingParams, probs


def draft(backend, token: Any, h: Any, k: int, sp: SamplingParams, rng: Any = None,
          min_confidence: float | None = None, fused: bool = True) -> Draft:
    """Propose up to k tokens after `token` (the bonus, a backend-native [1] or 0-d int array, not yet in
    the cache) from the target's hidden h at the bonus's previous position. fused=False: never the fused path."""
    ops = backend.ops
    if k <= 0 or not backend.has_drafter:
        return Draft(ops.tokens([]))
    if sp.greedy and min_confidence is None and fused and backend.fused_greedy_draft is not None:
        return Draft(backend.fused_greedy_draft(token, h, k))
    u = None if sp.greedy else ops.rand(rng, k, like=h)
    if u is not None and min_confidence is None and fused and backend.fused_sampled_draft is not None:
        return backend.fused_sampled_draft(token, h, k, sp, u)
    toks, picks, qs, idss = [], [], [], []
    for i in range(k):
        s = backend.draft_step(token, h)
        h = s.h
        if sp.greedy:
            j = ops.argmax(s.logits)
            conf = ops.top_prob(s.logits) if min_confidence is not None else None
        else:
            q = probs(ops, s.logits, sp)
            j = ops.pick(q, u[i])
            conf = float(q.max()) if min_confidence is not None else None
        if conf is not None and conf < min_confidence:
            break
        token = j if s.ids is None else ops.index(s.ids, j)
        toks.append(token)
        if not sp.greedy:
            picks.append(j)
            qs.append(q)
            if s.ids is not None:
                idss.append(s.ids)
    if not toks:
        return Draft(ops.tokens([]))
    if sp.greedy:
        return Draft(ops.stack(toks))
    return Draft(ops.stack(toks), ops.stack(picks), ops.stack(qs), ops.stack(idss) if idss else None)
