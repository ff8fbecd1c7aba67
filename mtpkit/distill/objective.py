"""The distillation objective: teacher-forced target pass, k-step drafter unroll, chunked losses and
simulated acceptance. Pure functions of (target, drafter, batch); no optimizer, no I/O.

Round contract (the runtime's, DESIGN.md §3): the target has processed x_0..x_{p-1} (cache length p),
its post-norm hidden h_{p-1}, and the bonus token x_p. Draft step 1 reads (E[x_p], h_{p-1}) at query
position p and predicts x_{p+1}; step i+1 reads (E[x_{p+i}], the drafter's own previous h) at the SAME
query position p and predicts x_{p+i+1}. Step i+1 is compared with the target distribution at position
p+i (the one that scores x_{p+i+1}). Training teacher-forces the true tokens: only the branch where
every earlier draft was accepted matters, and on it the drafts equal the sequence's tokens.

One forward of the target over [B, T] gives every position's h, distribution and K/V at once; a
drafter query at p sees keys < p exactly as in the runtime (`draft_mask`). Rounds are indexed by
r = p - 1 for p in 1..T-1-k (R = T - 1 - k rows per sequence); a round counts when it starts in the
continuation (p >= prompt_len) and all k drafted tokens lie inside the sequence (p + k <= length - 1).

Vocabulary-sized tensors ([positions, V], V = 262144 on Gemma 3) exist one chunk of rounds and one
draft step at a time: the drafter body runs once for all positions, its features are cut into leaf
tensors, each (chunk, step) loss is back-propagated into them right away, and the body gets one final
backward with the accumulated feature gradients. [B, T, k, V] never exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from mtpkit.model.drafter import DrafterModel, target_kv
from mtpkit.model.gemma import GemmaModel


class Batch(NamedTuple):
    tokens: torch.Tensor  # [B, T] long, right-padded
    prompt_len: torch.Tensor  # [B] long: the first generated token's position (first round)
    length: torch.Tensor  # [B] long: valid tokens (prompt + continuation, EOS included)
    sampled: torch.Tensor  # [B] bool: continuation sampled at T=1 (else greedy)

    def to(self, device) -> Batch:
        return Batch(*(t.to(device) for t in self))


@dataclass(frozen=True)
class Objective:
    k: int  # draft steps per round
    loss: str = "kl"  # "kl" | "tv" | "mix"
    tv_weight: float = 0.5
    step_decay: float = 0.8  # step i (0-based) weighs step_decay ** i
    router_weight: float = 0.2  # centroid head only
    chunk: int = 2048  # positions (batch x rounds) per vocabulary-sized chunk
    loop_weight: float = 0.0  # share of each row's loss weighted as the loop visits rounds (`loop_round_weights`)

    def step_weights(self) -> list[float]:
        return [self.step_decay ** i for i in range(self.k)]


class TeacherPass(NamedTuple):
    hidden: torch.Tensor  # [B, T, d_t] post-final-norm hidden states
    kv: dict  # {SLIDING|FULL: (k [B, KV, T, D], v, key_pos [T])}, the K/V the drafter reads


class Accept(NamedTuple):
    """Per round and draft step, [B, R, k] float: acceptance *given all earlier drafts accepted*."""
    greedy: torch.Tensor  # 1 if the drafter's argmax equals the target's (T=0)
    tv: torch.Tensor  # 1 - TV(p_target, q_drafter): acceptance probability of rejection sampling (T=1)
    outside: torch.Tensor  # centroid head: 1 if the target's argmax is outside the chosen clusters


class StepResult(NamedTuple):
    loss: torch.Tensor  # scalar: sum over counted rounds of sum_i w_i * loss_i (un-normalized, detached)
    step_loss: torch.Tensor  # [k] per-step distillation loss sums (unweighted)
    router_loss: torch.Tensor  # [k] per-step router loss sums, KL(cluster mass || router) (0 for the dense head)
    mask: torch.Tensor  # [B, R - first] bool: counted rounds
    accept: Accept
    first: int = 0  # rounds before this one (all inside every row's prompt) were skipped: index r is round first + r


def round_starts(a: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """a [B, R, k] acceptance of draft i given earlier ones accepted, mask [B, R] counted rounds -> [B, R]:
    the probability that the loop starts a round at r. Each row's first counted round is a start; a round
    at r that accepts exactly n drafts (probability prod_{j<n} a_j * (1 - a_n), or prod a for n = k) emits
    n + 1 tokens, so the next starts at r + n + 1. Mass leaving the counted rounds (the row's end) is dropped.
    """
    B, R, k = a.shape
    pre = torch.cat([torch.ones_like(a[..., :1]), a.cumprod(-1)], -1)  # [B, R, k + 1]: i drafts accepted
    exact = pre - torch.cat([pre[..., 1:], torch.zeros_like(a[..., :1])], -1)  # exactly n accepted, n = 0..k
    s = torch.zeros(B, R + k + 1, device=a.device, dtype=a.dtype)
    m = mask.to(a.dtype)
    first = torch.where(mask.any(1), mask.float().argmax(1), torch.full_like(mask[:, 0], R, dtype=torch.long))
    s[torch.arange(B, device=a.device), first] = 1.0
    counted = mask.any(0).nonzero()
    for r in range(int(counted[0]) if len(counted) else R, int(counted[-1]) + 1 if len(counted) else R):
        s[:, r + 1:r + k + 2] += (s[:, r] * m[:, r])[:, None] * exact[:, r]
    return s[:, :R] * m


def loop_round_weights(a: torch.Tensor, mask: torch.Tensor, obj: Objective) -> torch.Tensor:
    """[B, R, k] loss weight of each (round, draft step): (1 - w) * uniform + w * loop, w = obj.loop_weight.

    uniform: every counted round alike, step i weighs step_decay ** i. loop: round r weighs the probability
    that the loop starts a round there (`round_starts`, from the batch's own acceptance `a`, detached), and
    step i the probability that drafts 0..i-1 were accepted: the first-order weight of that step's
    acceptance in the loop's tokens per round (the rounds a walk visits, not every position alike: after a
    rejection, the next round starts right there). Each row's loop part is scaled to its uniform part's sum,
    so the loss keeps its size and a row's weights depend on that row only (data-parallel splits agree).
    """
    m = mask.to(a.dtype)[..., None]
    uniform = m * torch.tensor(obj.step_weights(), device=a.device, dtype=a.dtype)
    if obj.loop_weight == 0:
        return uniform
    a = a.detach()
    reach = torch.cat([torch.ones_like(a[..., :1]), a[..., :-1].cumprod(-1)], -1)
    loop = round_starts(a, mask)[..., None] * reach
    scale = uniform.sum((1, 2), keepdim=True) / loop.sum((1, 2), keepdim=True).clamp_min(1e-9)
    return (1 - obj.loop_weight) * uniform + obj.loop_weight * scale * loop


def round_mask(batch: Batch, k: int) -> torch.Tensor:
    """[B, R] bool, R = T - 1 - k: round p = r + 1 counts iff prompt_len <= p and p + k <= length - 1."""
    T = batch.tokens.shape[1]
    p = torch.arange(1, T - k, device=batch.tokens.device)[None, :]
    return (p >= batch.prompt_len[:, None]) & (p + k <= batch.length[:, None] - 1)


@torch.no_grad()
def teacher_pass(target: GemmaModel, tokens: torch.Tensor) -> TeacherPass:
    """tokens [B, T] -> hidden and K/V of every position, from one cached forward (no ring: slack >= T)."""
    B, T = tokens.shape
    cache = target.new_cache(T, batch=B, slack=T)
    out = target(tokens, cache, logits=False)
    return TeacherPass(out.hidden, target_kv(cache, target.config))


def unroll(target: GemmaModel, drafter: DrafterModel, tokens: torch.Tensor, tp: TeacherPass,
           k: int, first: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rounds p = first+1..T-1-k in parallel, k steps each -> k x (features [B, R', d], h_next [B, R', d_t]),
    R' = T - 1 - k - first. `drafter.head(x, h_next)` of step i gives the runtime's i-th `draft_step` logits.
    """
    T = tokens.shape[1]
    R = T - 1 - k
    q_pos = torch.arange(first + 1, R + 1, device=tokens.device)  # round r queries at p = r + 1
    h = tp.hidden[:, first:R]  # h_{p-1}
    out = []
    for i in range(k):
        with torch.no_grad():
            emb = target.embed(tokens[:, first + 1 + i:1 + i + R])  # E[x_{p+i}] * sqrt(d_t)
        x, h = drafter.body(emb, h.to(emb.dtype) if i == 0 else h, q_pos, tp.kv)
        out.append((x, h))
    return out


def distill_loss(t_logp: torch.Tensor, d_logits: torch.Tensor, kind: str, tv_weight: float,
                 p: torch.Tensor | None = None, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Per-position loss [...]: forward KL(p_target || q_drafter), TV(p, q), or (1 - w) KL + w TV.

    t_logp [..., V] target log-probs (no grad), d_logits [..., V] drafter logits, p = t_logp.exp() if given.
    With `ids` [..., N] (centroid head) TV is the runtime's: q is the softmax over the candidates only, so
    1 - TV is exactly the acceptance probability of the draft the loop samples; KL stays over the vocabulary.
    """
    p = t_logp.exp() if p is None else p
    out = torch.zeros(d_logits.shape[:-1], device=d_logits.device)
    if kind in ("kl", "mix"):
        # KL = <p, log p - log q> with log q = d - logsumexp(d): no [.., V] log q is kept for backward
        kl = (p * (t_logp - d_logits)).sum(-1) + torch.logsumexp(d_logits, -1)
        out = out + (kl if kind == "kl" else (1 - tv_weight) * kl)
    if kind in ("tv", "mix"):
        if ids is None:
            tv = 0.5 * (p - d_logits.softmax(-1)).abs().sum(-1)
        else:
            p_cand = p.gather(-1, ids)
            tv = 0.5 * ((p_cand - d_logits.gather(-1, ids).softmax(-1)).abs().sum(-1) + (1 - p_cand.sum(-1)).clamp_min(0))
        out = out + (tv if kind == "tv" else tv_weight * tv)
    return out


@torch.no_grad()
def accept_from_logits(t_logp: torch.Tensor, d_logits: torch.Tensor, ids: torch.Tensor | None = None,
                       p: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Acceptance of one draft step, each [...]: (greedy match, 1 - TV, target argmax outside candidates).

    t_logp [..., V] (p = its exp, if given); d_logits [..., V] dense drafter logits. With `ids` [..., N]
    (centroid head) the draft distribution is a softmax over the candidate ids only, zero elsewhere,
    exactly as the runtime drafts.
    """
    t_arg = t_logp.argmax(-1)
    p = t_logp.exp() if p is None else p
    if ids is None:
        q = d_logits.softmax(-1)
        return ((d_logits.argmax(-1) == t_arg).float(), 1 - 0.5 * (p - q).abs().sum(-1), torch.zeros_like(p[..., 0]))
    cand = d_logits.gather(-1, ids)  # [..., N]
    q = cand.softmax(-1)
    draft = ids.gather(-1, cand.argmax(-1, keepdim=True))[..., 0]
    p_cand = p.gather(-1, ids)
    tv = 0.5 * ((p_cand - q).abs().sum(-1) + (1 - p_cand.sum(-1)).clamp_min(0))
    outside = ~(ids == t_arg[..., None]).any(-1)
    return (draft == t_arg).float(), 1 - tv, outside.float()


def candidate_ids(drafter: DrafterModel, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid head: x [..., d] -> (router logits [..., C] float, candidate ids [..., top_k * tokens_per_centroid])."""
    router = drafter.centroids(x).float()
    top = router.detach().topk(drafter.config.centroid_top_k, dim=-1).indices
    return router, drafter.cluster_tokens()[top].flatten(-2)


def cluster_mass(p: torch.Tensor, ordering: torch.Tensor, num_centroids: int) -> torch.Tensor:
    """p [..., V] -> [..., C]: probability mass of each cluster (cluster j = ordering[j*n:(j+1)*n])."""
    return p.index_select(-1, ordering).unflatten(-1, (num_centroids, -1)).sum(-1)


def distill_step(target: GemmaModel, drafter: DrafterModel, batch: Batch, obj: Objective, *,
                 norm: float = 1.0, backward: bool = True, skip_prompt: bool = True) -> StepResult:
    """Loss and acceptance of one batch; with `backward`, accumulates d(loss / norm) into the drafter's grads.

    `norm` is the number of counted rounds in the *global* batch, so data-parallel processes that sum
    their gradients get exactly the single-process gradient.
    """
    k, c = obj.k, drafter.config
    if batch.tokens.shape[1] < k + 2:  # every row ended early (EOS): pad so that R >= 1 (those rounds are masked)
        batch = batch._replace(tokens=torch.nn.functional.pad(batch.tokens, (0, k + 2 - batch.tokens.shape[1])))
    tokens = batch.tokens
    B, T = tokens.shape
    # rounds p < min(prompt_len) never count: skip them (a long prompt costs the teacher pass only)
    first = min(max(0, int(batch.prompt_len.min()) - 1), T - 2 - k) if skip_prompt else 0
    R = T - 1 - k - first
    tp = teacher_pass(target, tokens)
    with torch.set_grad_enabled(backward):
        steps = unroll(target, drafter, tokens, tp, k, first)
    feats = [x for x, _ in steps]
    leaves = [x.detach().requires_grad_(backward) for x in feats]
    mask = round_mask(batch, k)[:, first:]
    dev = tokens.device
    acc = [torch.zeros(B, R, k, device=dev) for _ in range(3)]
    step_loss, router_loss = torch.zeros(k, device=dev), torch.zeros(k, device=dev)
    rows = max(1, obj.chunk // B)

    def chunk_targets(r0: int, r1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Target log-probs and probs at positions r0+1 .. r1+k-1: step i is scored against [:, i:i + r1 - r0]."""
        t_all = target.head(tp.hidden[:, first + r0 + 1:first + r1 + k]).float().log_softmax(-1)
        return t_all, t_all.exp()

    def store_accept(r0: int, r1: int, i: int, t_logp, p, d_logits, ids) -> None:
        for store, val in zip(acc, accept_from_logits(t_logp, d_logits.detach(), ids, p), strict=True):
            store[:, r0:r1, i] = val

    # the loop's weighting needs every round's acceptance first: a no-grad pass of the heads (H200, side by side with a
    # uniform run: 200 steps to its 235 in the same time)
    weigh_by_loop = backward and obj.loop_weight > 0
    if weigh_by_loop:
        with torch.no_grad():
            for r0 in range(0, R, rows):
                r1 = min(R, r0 + rows)
                t_all, p_all = chunk_targets(r0, r1)
                for i in range(k):
                    x = feats[i][:, r0:r1]
                    ids = candidate_ids(drafter, x)[1] if c.head == "centroid" else None
                    store_accept(r0, r1, i, t_all[:, i:i + r1 - r0], p_all[:, i:i + r1 - r0], drafter.dense_logits(x), ids)
        a = torch.where(batch.sampled[:, None, None], acc[1], acc[0])  # 1 - TV on sampled rows, argmax match on greedy
        weights = loop_round_weights(a, mask, obj)
    else:
        weights = loop_round_weights(acc[0], mask, obj)  # uniform: acceptance not read
    for r0 in range(0, R, rows):
        r1 = min(R, r0 + rows)
        m = mask[:, r0:r1].float()
        with torch.no_grad():
            t_all, p_all = chunk_targets(r0, r1)
        for i in range(k):
            t_logp = t_all[:, i:i + r1 - r0]  # the distribution draft step i is scored against
            p = p_all[:, i:i + r1 - r0]
            w = weights[:, r0:r1, i]
            with torch.set_grad_enabled(backward):
                x = leaves[i][:, r0:r1]
                d_logits = drafter.dense_logits(x)
                router, ids = candidate_ids(drafter, x) if c.head == "centroid" else (None, None)
                per = distill_loss(t_logp, d_logits, obj.loss, obj.tv_weight, p, ids)
                total = (per * w).sum()
                step_loss[i] += (per.detach() * m).sum()
                if router is not None:
                    mass = cluster_mass(p, drafter.token_ordering, c.num_centroids)
                    # KL(cluster mass || router): 0 for a perfect router (CE minus the mass's entropy)
                    rkl = (torch.special.xlogy(mass, mass) - mass * router.log_softmax(-1)).sum(-1)
                    total = total + obj.router_weight * (rkl * w).sum()
                    router_loss[i] += (rkl.detach() * m).sum()
            if backward and total.requires_grad:
                (total / norm).backward()
            if not weigh_by_loop:
                store_accept(r0, r1, i, t_logp, p, d_logits, ids)
    if backward:
        grads = [x.grad if x.grad is not None else torch.zeros_like(x) for x in leaves]
        torch.autograd.backward(feats, grads)
    w = torch.tensor(obj.step_weights(), device=dev)
    loss = (w * (step_loss + obj.router_weight * router_loss)).sum()
    return StepResult(loss, step_loss, router_loss, mask, Accept(*acc), first)


def simulated_tau(a: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """a [..., k] per-step acceptance given all earlier accepted -> 1 + mean_rounds sum_i prod_{j<=i} a_j.

    Includes the bonus token, so 1 <= tau <= k + 1; mask [...] bool selects the rounds (None: all).
    """
    prefix = a.cumprod(-1).sum(-1)
    if mask is not None:
        prefix = prefix[mask]
    return 1.0 + (prefix.mean().item() if prefix.numel() else 0.0)


def acceptance_sums(result: StepResult, sampled: torch.Tensor) -> torch.Tensor:
    """Additive statistics of one batch (sum them across batches/processes, then `summarize`):
    [n_greedy, n_sampled, n_all, outside, prefix_greedy[k], prefix_tv[k]]."""
    a, mask = result.accept, result.mask
    g = (mask & ~sampled[:, None]).float()
    s = (mask & sampled[:, None]).float()
    m = mask.float()
    pg = (a.greedy.cumprod(-1) * g[..., None]).sum((0, 1))
    pt = (a.tv.cumprod(-1) * s[..., None]).sum((0, 1))
    outside = (a.outside * m[..., None]).sum()
    head = torch.stack([g.sum(), s.sum(), m.sum(), outside])
    return torch.cat([head, pg, pt])


def summarize(sums: torch.Tensor, k: int) -> dict:
    """`acceptance_sums` totals -> tau at T=0 (greedy rows) and T=1 (sampled rows), per-position acceptance."""
    n_g, n_s, n_all, outside = (float(v) for v in sums[:4])
    pg, pt = sums[4:4 + k] / max(n_g, 1.0), sums[4 + k:4 + 2 * k] / max(n_s, 1.0)
    return {"tau0": 1 + float(pg.sum()) if n_g else None, "tau1": 1 + float(pt.sum()) if n_s else None,
            "accept0": [round(float(v), 4) for v in pg] if n_g else None,
            "accept1": [round(float(v), 4) for v in pt] if n_s else None,
            "outside_rate": outside / max(n_all * k, 1.0), "rounds_greedy": int(n_g), "rounds_sampled": int(n_s)}
