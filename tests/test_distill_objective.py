"""The distillation objective on tiny random configs: shapes, unroll == runtime draft steps, chunking,
losses, simulated tau bounds, centroid ordering."""

from __future__ import annotations

import pytest
import torch

from mtpkit.distill.centroids import balanced_ordering, init_centroid_head
from mtpkit.distill.objective import (
    Batch,
    Objective,
    accept_from_logits,
    acceptance_sums,
    distill_loss,
    distill_step,
    loop_round_weights,
    round_mask,
    round_starts,
    simulated_tau,
    summarize,
    teacher_pass,
    unroll,
)
from mtpkit.model.drafter import draft_step
from tests.conftest import tiny_drafter, tiny_target
from tests.distill_util import peaky_target, single_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("single_thread")


def _batch(target, B=3, T=14, seed=0, prompt_len=4):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, target.config.vocab_size, (B, T), generator=g)
    length = torch.tensor([T - i for i in range(B)])
    return Batch(tokens, torch.full((B,), prompt_len), length, torch.arange(B) % 2 == 1)


def _drafter(target, head, seed=0, shared=False):
    kw = dict(head="centroid", num_centroids=8, centroid_top_k=2) if head == "centroid" else {}
    if shared:
        kw.update(hidden_size=target.config.hidden_size, share_target_embedding=True)
    d = tiny_drafter(target, seed, **kw)
    if shared:
        d.bind_target(target.embed_tokens.weight)
    if head == "centroid":
        init_centroid_head(d, target.embed_tokens.weight)
    return d


@pytest.mark.parametrize("head", ["dense", "centroid"])
def test_step_shapes_and_gradients(head):
    target = tiny_target(1, vocab_size=128)
    drafter = _drafter(target, head).train()
    b = _batch(target)
    k = 3
    res = distill_step(target, drafter, b, Objective(k=k, chunk=8), norm=float(round_mask(b, k).sum()))
    R = b.tokens.shape[1] - 1 - k
    assert res.first == 3  # rounds p < 4 (inside every prompt) are not computed
    assert res.mask.shape == (3, R - 3) and all(a.shape == (3, R - 3, k) for a in res.accept)
    assert res.step_loss.shape == (k,) and torch.isfinite(res.loss)
    assert (res.router_loss > 0).all() == (head == "centroid")
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in drafter.parameters())
    assert target.embed_tokens.weight.grad is None
    # the mask: rounds start at the prompt end and keep all k drafted tokens inside the sequence
    p = torch.arange(4, R + 1)
    for i in range(3):
        want = (p >= 4) & (p + k <= int(b.length[i]) - 1)
        assert torch.equal(res.mask[i], want)


@pytest.mark.parametrize("head,shared", [("dense", False), ("centroid", False), ("dense", True)])
@pytest.mark.parametrize("seed", [0, 2])
def test_unroll_equals_sequential_runtime_draft_steps(seed, head, shared):
    """The parallel k-step unroll == k runtime draft_step calls per round on a sliding ring cache."""
    target = tiny_target(seed, vocab_size=128)
    drafter = _drafter(target, head, seed, shared)
    k, T = 3, 3 * target.config.sliding_window + 4
    x = _batch(target, B=1, T=T, seed=seed).tokens
    tp = teacher_pass(target, x)
    with torch.no_grad():
        steps = [drafter.head(f, h) for f, h in unroll(target, drafter, x, tp, k)]
    ring = target.new_cache(max_len=T + 4, slack=3)
    target(x[:, :1], ring)
    for p in range(1, T - k):  # round p: cache holds 0..p-1, bonus x_p, h_{p-1}
        h = tp.hidden[:, p - 1]
        for i in range(k):
            one = draft_step(target, drafter, x[:, p + i], h, ring)  # teacher-forced token x_{p+i}
            torch.testing.assert_close(one.logits[:, 0], steps[i].logits[:, p - 1], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(one.hidden[:, 0], steps[i].hidden[:, p - 1], rtol=1e-4, atol=1e-4)
            if head == "centroid":
                assert torch.equal(one.ids[:, 0], steps[i].ids[:, p - 1])
            h = one.hidden[:, 0]
        target(x[:, p:p + 1], ring)


@pytest.mark.parametrize("loss", ["kl", "mix"])
def test_skipping_prompt_rounds_changes_nothing(loss):
    """Rounds inside every prompt are skipped: same loss, gradients and acceptance as computing all of them."""
    target = tiny_target(2, vocab_size=128)
    b = _batch(target, B=3, T=20)._replace(prompt_len=torch.tensor([6, 9, 7]))
    out = []
    for skip in (True, False):
        d = _drafter(target, "centroid", seed=3).train()
        res = distill_step(target, d, b, Objective(k=3, loss=loss, chunk=7), skip_prompt=skip)
        out.append((res, [p.grad.clone() for p in d.parameters()]))
    (a, ga), (full, gf) = out
    assert a.first == 5 and full.first == 0
    torch.testing.assert_close(a.loss, full.loss, rtol=1e-5, atol=1e-5)
    for x, y in zip(ga, gf, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    assert torch.equal(a.mask, full.mask[:, 5:]) and not full.mask[:, :5].any()
    torch.testing.assert_close(acceptance_sums(a, b.sampled), acceptance_sums(full, b.sampled))


def test_candidate_tv_loss_is_one_minus_runtime_acceptance():
    """With candidate ids the TV loss is exactly 1 - the acceptance probability of the runtime's sparse draft."""
    g = torch.Generator().manual_seed(1)
    t_logp = (2 * torch.randn(4, 6, 50, generator=g)).log_softmax(-1)
    d = 2 * torch.randn(4, 6, 50, generator=g)
    ids = torch.stack([torch.randperm(50, generator=g)[:12] for _ in range(24)]).view(4, 6, 12)
    tv = distill_loss(t_logp, d, "tv", 0.5, ids=ids)
    torch.testing.assert_close(tv, 1 - accept_from_logits(t_logp, d, ids)[1])
    assert not torch.allclose(tv, distill_loss(t_logp, d, "tv", 0.5))  # the dense TV is another quantity


def test_chunking_does_not_change_loss_or_gradients():
    target = tiny_target(2, vocab_size=128)
    b = _batch(target, B=2, T=16)
    grads = []
    for chunk in (1, 5, 10_000):
        d = _drafter(target, "centroid", seed=3).train()
        res = distill_step(target, d, b, Objective(k=3, loss="mix", chunk=chunk))
        grads.append((res.loss, [p.grad.clone() for p in d.parameters()]))
    for loss, g in grads[1:]:
        torch.testing.assert_close(loss, grads[0][0], rtol=1e-5, atol=1e-5)
        for a, b_ in zip(g, grads[0][1], strict=True):
            torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-6)


def test_losses_and_acceptance_of_identical_distributions_are_perfect():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(5, 7, 40, generator=g)
    t_logp = logits.log_softmax(-1)
    for kind in ("kl", "tv", "mix"):
        assert distill_loss(t_logp, logits, kind, 0.5).abs().max() < 1e-5
        assert (distill_loss(t_logp, torch.zeros_like(logits), kind, 0.5) > 0).all()
    greedy, tv, outside = accept_from_logits(t_logp, logits)
    assert greedy.eq(1).all() and torch.allclose(tv, torch.ones_like(tv), atol=1e-5) and outside.eq(0).all()
    # candidates that hold every token but in another order: still the oracle
    ids = torch.randperm(40, generator=g).expand(5, 7, 40)
    greedy, tv, outside = accept_from_logits(t_logp, logits, ids)
    assert greedy.eq(1).all() and torch.allclose(tv, torch.ones_like(tv), atol=1e-5) and outside.eq(0).all()
    # a candidate set without the target's argmax: greedy rejects, outside is counted, TV covers the missing mass
    top = t_logp.argmax(-1, keepdim=True)
    others = torch.arange(40).expand(5, 7, 40)
    ids = others[(others != top)].view(5, 7, 39)
    greedy, tv, outside = accept_from_logits(t_logp, logits, ids)
    assert greedy.eq(0).all() and outside.eq(1).all() and (tv < 1 - t_logp.exp().gather(-1, top)[..., 0] + 1e-5).all()


def test_simulated_tau_bounds_and_oracle():
    k = 4
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        a = torch.rand(50, k, generator=g)
        assert 1.0 <= simulated_tau(a) <= k + 1
    assert simulated_tau(torch.ones(10, k)) == k + 1
    assert simulated_tau(torch.zeros(10, k)) == 1
    # "given all previous matched": a miss at step 1 voids later matches
    assert simulated_tau(torch.tensor([[0.0, 1.0, 1.0, 1.0]])) == 1
    # oracle drafter (its distribution is the target's) through accept_from_logits -> tau = k + 1
    t_logp = torch.randn(6, 9, k, 30, generator=g).log_softmax(-1)
    greedy, tv, _ = accept_from_logits(t_logp, t_logp.clone())
    assert simulated_tau(greedy) == k + 1 and abs(simulated_tau(tv) - (k + 1)) < 1e-4


def test_summarize_reports_tau_per_temperature_and_outside_rate():
    target = peaky_target(0)
    drafter = _drafter(target, "centroid")
    b = _batch(target, B=4, T=16)
    res = distill_step(target, drafter, b, Objective(k=3), backward=False)
    s = summarize(acceptance_sums(res, b.sampled), 3)
    assert 1 <= s["tau0"] <= 4 and 1 <= s["tau1"] <= 4
    assert 0.0 <= s["outside_rate"] <= 1.0 and len(s["accept0"]) == 3
    assert s["rounds_greedy"] + s["rounds_sampled"] == int(res.mask.sum())
    assert all(x >= y for x, y in zip(s["accept0"], s["accept0"][1:], strict=False))  # prefix products shrink


def test_centroid_ordering_is_a_balanced_permutation():
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(96, 12, generator=g)
    for clusters in (1, 3, 8, 96):
        order = balanced_ordering(emb, clusters)
        assert torch.equal(order.sort().values, torch.arange(96))
    # well-separated groups of rows land in the same cluster
    centers = 10 * torch.randn(4, 12, generator=g)
    emb = centers.repeat_interleave(24, 0) + 0.01 * torch.randn(96, 12, generator=g)
    order = balanced_ordering(emb, 4)
    assert all(len(set((order[j * 24:(j + 1) * 24] // 24).tolist())) == 1 for j in range(4))
    with pytest.raises(ValueError):
        balanced_ordering(emb, 5)


def test_loss_decreases_on_tiny_overfit():
    torch.manual_seed(0)
    target = peaky_target(0)
    drafter = _drafter(target, "centroid", shared=True).train()
    b = _batch(target, B=4, T=16)
    opt = torch.optim.AdamW(drafter.parameters(), lr=1e-2)
    obj = Objective(k=3, loss="kl")
    losses = []
    for _ in range(30):
        opt.zero_grad()
        res = distill_step(target, drafter, b, obj, norm=float(round_mask(b, 3).sum()))
        losses.append(float(res.loss))
        opt.step()
    assert losses[-1] < 0.5 * losses[0], losses



def test_a_batch_shorter_than_one_round_counts_nothing():
    target = tiny_target(0, vocab_size=128)
    b = Batch(torch.tensor([[2, 5, 1]]), torch.tensor([2]), torch.tensor([3]), torch.tensor([False]))
    res = distill_step(target, _drafter(target, "dense"), b, Objective(k=4), backward=False)
    assert not res.mask.any() and float(res.loss) == 0.0


def _walk_starts(greedy: torch.Tensor, mask: torch.Tensor) -> set[int]:
    """Rounds (index r: round at p = r + 1) where the loop's walk starts one, given argmax matches [R, k]."""
    counted = mask.nonzero()[:, 0].tolist()
    r, last, out = counted[0], counted[-1], set()
    while r <= last:
        out.add(r)
        r += 1 + next((i for i in range(greedy.shape[1]) if not greedy[r, i]), greedy.shape[1])
    return out


def test_round_starts_of_greedy_acceptance_are_the_walks_starts():
    """At T = 0 (acceptance 0 or 1) the loop visits a definite set of rounds: round_starts is 1 there, 0 elsewhere."""
    g = torch.Generator().manual_seed(0)
    target = tiny_target(2, vocab_size=64)
    b = _batch(target, B=4, T=40)._replace(prompt_len=torch.tensor([4, 9, 6, 12]))
    mask = round_mask(b, 4)
    a = (torch.rand(*mask.shape, 4, generator=g) < 0.7).float()
    s = round_starts(a, mask)
    for j in range(4):
        want = torch.zeros(mask.shape[1])
        want[list(_walk_starts(a[j], mask[j]))] = 1.0
        assert torch.equal(s[j], want)


def test_round_starts_are_the_sampled_walks_visit_frequencies():
    """With acceptance in (0, 1), round_starts is the probability that a walk drawing u_i < a_i starts at r."""
    g = torch.Generator().manual_seed(1)
    B, R, k, n = 2, 30, 3, 20_000
    mask = torch.ones(B, R, dtype=torch.bool)
    mask[1, :4] = False  # a later prompt end
    mask[:, R - 2:] = False  # the sequence's end
    a = torch.rand(B, R, k, generator=g)
    s = round_starts(a, mask)
    visits = torch.zeros(B, R)
    for j in range(B):
        counted = mask[j].nonzero()[:, 0]
        for _ in range(n):
            r = int(counted[0])
            while r <= int(counted[-1]):
                visits[j, r] += 1
                u = torch.rand(k, generator=g)
                r += 1 + next((i for i in range(k) if not u[i] < a[j, r, i]), k)
    freq = visits / n
    assert (s[~mask] == 0).all()
    assert (freq - s).abs().max() < 4 * (0.25 / n) ** 0.5 + 1e-6


def test_loop_weights_keep_each_rows_total_and_drop_steps_after_a_rejection():
    g = torch.Generator().manual_seed(2)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, :5] = False
    a = (torch.rand(3, 12, 4, generator=g) < 0.6).float()
    uniform = loop_round_weights(a, mask, Objective(k=4))
    torch.testing.assert_close(uniform, mask[..., None].float() * torch.tensor([0.8 ** i for i in range(4)]))
    w = loop_round_weights(a, mask, Objective(k=4, loop_weight=1.0))
    torch.testing.assert_close(w.sum((1, 2)), uniform.sum((1, 2)))
    rejected_before = torch.cat([torch.zeros(3, 12, 1), (1 - a[..., :-1]).cummax(-1).values], -1) > 0
    assert (w[rejected_before] == 0).all() and (w[~mask] == 0).all()
    assert (w[round_starts(a, mask) == 0] == 0).all()
    half = loop_round_weights(a, mask, Objective(k=4, loop_weight=0.5))
    torch.testing.assert_close(half, 0.5 * uniform + 0.5 * w)


@pytest.mark.parametrize("head", ["dense", "centroid"])
def test_loop_weighted_step_is_chunk_invariant_and_moves_the_gradient(head):
    """The loop weighting's no-grad acceptance pass indexes rounds like the loss pass: chunking changes nothing;
    the loss it reports stays the uniform one, its gradient is another."""
    target = tiny_target(2, vocab_size=128)
    b = _batch(target, B=3, T=18)._replace(prompt_len=torch.tensor([4, 6, 5]))
    out = []
    for loop_weight, chunk in ((0.0, 10_000), (1.0, 1), (1.0, 7), (1.0, 10_000)):
        d = _drafter(target, head, seed=3).train()
        res = distill_step(target, d, b, Objective(k=3, loss="mix", chunk=chunk, loop_weight=loop_weight))
        out.append((res, torch.cat([p.grad.flatten() for p in d.parameters() if p.grad is not None])))
    (base, g0), *loops = out
    for res, grad in loops:
        torch.testing.assert_close(res.loss, base.loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(acceptance_sums(res, b.sampled), acceptance_sums(base, b.sampled))
        torch.testing.assert_close(grad, loops[-1][1], rtol=1e-4, atol=1e-6)
    assert not torch.allclose(loops[-1][1], g0, rtol=1e-3, atol=1e-5)
