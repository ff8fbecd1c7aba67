"""The online gate (runtime/gate.py): cost model, exploration, and what it achieves on simulated rounds.

Simulated generations use a known cost curve R(k) and known acceptance rates, so the tokens per second the
gate reaches can be compared exactly with plain decoding and with the best fixed k."""

from __future__ import annotations

import numpy as np
import pytest

from mtpkit.runtime.gate import WINDOW, Gate, RoundCosts


def test_round_costs_drop_the_first_round_and_interpolate():
    r = RoundCosts()
    r.add(0, 100.0)  # first round at k = 0: a warm-up, not counted
    assert not r.known(0)
    for s in (1.0, 1.2, 0.9):
        r.add(0, s)
    r.add(4, 50.0)
    r.add(4, 3.0)
    assert r(0) == 1.0 and r(4) == 3.0  # medians
    assert r(2) == pytest.approx(2.0)  # on the line between the measured k
    assert r(6) == pytest.approx(4.0)  # beyond them: the line through the two nearest
    r.add(5, 9.0)
    r.add(5, 3.25)
    assert r(6) == pytest.approx(3.5)


def test_a_mix_of_stopped_and_full_rounds_costs_the_mean_of_its_outcomes_medians():
    """Adaptive drafting: a round that chose k = 3 stops at its first step (cheap) or drafts 3 (dear). R(3) is the
    mean over its last rounds of each outcome's median, not the median of the mix (the cheap mode); one slow
    outlier moves only its outcome's median; rounds of another k that stopped at the same step share its price."""
    r = RoundCosts()
    r.add(3, 99.0, 0)  # warm-up
    for seconds, drafted in [(1.1, 0)] * 5 + [(4.0, 3)] * 3 + [(50.0, 0)]:
        r.add(3, seconds, drafted)
    assert r(3) == pytest.approx((6 * 1.1 + 3 * 4.0) / 9)  # the old median of the mix: 1.1
    r.add(5, 99.0, 0)
    r.add(5, 1.1, 0)  # k = 5 stopped at its first step too: priced like k = 3's stopped rounds
    assert r(5) == pytest.approx(1.1)
    r.add(2, 99.0)
    r.add(2, 2.0)  # without a stop: its own median, as before
    assert r(2) == 2.0


def test_rounds_whose_verify_computed_fewer_head_rows_are_their_own_outcome():
    """verify_rows (llama.cpp on a CPU): a round's verify computes the head for the rows acceptance read, so a
    rejected first draft is cheap and an accepted run dear. R(k) keeps the mix: the mean of each outcome's median."""
    r = RoundCosts()
    r.add(2, 99.0, 2, 1)  # warm-up
    for seconds, rows in [(1.5, 1)] * 4 + [(2.5, 3)] * 5:
        r.add(2, seconds, 2, rows)
    assert r(2) == pytest.approx((4 * 1.5 + 5 * 2.5) / 9)  # the median of the mix would be 2.5
    r.add(2, 9.0, 2, 2)
    assert r(2) == pytest.approx((3 * 1.5 + 9.0 + 5 * 2.5) / 9)  # a new outcome enters, the window's oldest leaves


def test_drafting_rounds_are_priced_in_plain_steps_of_their_time():
    """A session's prompts differ in length and every step grows with the context: a drafting round's seconds count
    against R(0) when it ran, so after a longer prompt made plain steps dearer R(k) grows with them (in seconds it
    would stay at the shorter prompt's figure). Rounds measured before any plain round count in its first R(0)."""
    r = RoundCosts()
    for k, s in [(3, 99.0), (3, 2.0), (0, 99.0), (0, 1.0)]:  # warm-ups, then k = 3 before any plain round
        r.add(k, s)
    assert r(3) == pytest.approx(2.0) and r(0) == 1.0
    for _ in range(WINDOW):  # a longer prompt: plain steps cost 1.5
        r.add(0, 1.5)
    assert r(0) == 1.5 and r(3) == pytest.approx(3.0)
    r.add(3, 3.3)  # measured now: 2.2 plain steps
    assert r(3) == pytest.approx(1.5 * (2.0 + 2.2) / 2)


def test_round_costs_kept_up_to_date_round_by_round_equal_their_definition():
    import statistics
    rng = np.random.default_rng(0)
    r = RoundCosts()
    for _ in range(500):
        k = int(rng.integers(0, 6))
        d = int(rng.integers(0, k + 1))
        r0 = r.measured.get(0)
        r.add(k, float(rng.random()), d, None if rng.random() < 0.5 else int(rng.integers(1, d + 2)))
        if k == 0 or r0 is None:
            continue
        # drafting rounds in plain steps of R(0) when they ran; R(k) = mean of their outcomes' medians x R(0) now
        price = {key: statistics.median(s / ref for s, ref in v) for key, v in r.by_outcome.items() if key != r.PLAIN}
        price[r.PLAIN] = statistics.median(s for s, _ in r.by_outcome[r.PLAIN])
        want = {j: statistics.fmean(price[(x, x < j, rows)] for x, rows in runs) * (r.measured[0] if j else 1.0)
                for j, runs in r.runs.items()}
        assert {j: r(j) for j in r.measured} == pytest.approx(want, rel=1e-12)


def test_a_chunk_of_plain_steps_counts_as_that_many_plain_rounds():
    g = Gate(4, RoundCosts())
    g.accepted[False], g.reached[False] = [1.0] * 4, [2.0] * 4
    g.observe(0, 0, 99.0, steps=16)  # the first chunk: captures, not counted
    g.observe(0, 0, 1.6, steps=16)
    assert g.costs(0) == pytest.approx(0.1)  # seconds per plain step
    assert g.idle == 2 * 15  # choose() counts each chunk's first step
    assert g.accepted[False][0] == pytest.approx(0.95 ** 32) and g.reached[False][0] == pytest.approx(2 * 0.95 ** 32)


def _simulate(rates, cost, max_k, rounds=400, seed=0, gate=True, costs=None, greedy=True):
    """Tokens per second over `rounds` rounds: rates[i] = P(draft i+1 accepted | earlier ones accepted),
    cost(k) = seconds of a round that drafts k. Returns (tokens / seconds, rounds that drafted nothing)."""
    rng = np.random.default_rng(seed)
    g = Gate(max_k, costs or RoundCosts(), greedy)
    tokens = seconds = 0.0
    plain_rounds = 0
    for _ in range(rounds):
        k = g.choose(max_k) if gate else max_k
        n = 0
        while n < k and rng.random() < rates[n]:
            n += 1
        g.observe(k, n, cost(k))
        tokens += n + 1
        seconds += cost(k)
        plain_rounds += k == 0
    return tokens / seconds, plain_rounds


# seconds of a round that drafts k, in plain steps: verify grows with k on CPUs, barely on GPUs; the *_JUMP
# curves have a fixed cost for drafting at all (as measured: the drafter's attention inputs, acceptance), which
# a line through R(0) and one measured k misjudges
CPU = lambda k: 1.0 + 0.45 * k + (0.1 if k else 0.0)  # noqa: E731
GPU = lambda k: 1.0 + 0.06 * k + (0.02 if k else 0.0)  # noqa: E731
CPU_JUMP = lambda k: 1.0 + (0.25 + 0.3 * k if k else 0.0)  # noqa: E731
GPU_JUMP = lambda k: 1.0 + (0.12 + 0.11 * k if k else 0.0)  # noqa: E731
# not monotone: torch's fp32 CPU head GEMM is slow for 2-3 rows (measured round times, torch backend, this CPU)
TORCH_CPU = lambda k: [1.0, 1.96, 2.47, 1.9, 2.0, 2.25][k]  # noqa: E731
COSTS = {"cpu-like": CPU, "gpu-like": GPU, "cpu-jump": CPU_JUMP, "gpu-jump": GPU_JUMP, "torch-cpu": TORCH_CPU}


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
@pytest.mark.parametrize("cost", COSTS.values(), ids=COSTS.keys())
def test_a_useless_drafter_falls_back_to_plain_speed(cost, greedy):
    speed, plain_rounds = _simulate([0.0] * 5, cost, 5, greedy=greedy)
    assert speed >= 0.97 * 1.0  # plain decoding: 1 token per second
    assert plain_rounds > 300


@pytest.mark.parametrize("cost", COSTS.values(), ids=COSTS.keys())
@pytest.mark.parametrize("rates", [[0.9] * 5, [0.7, 0.8, 0.8, 0.8, 0.8], [0.4, 0.5, 0.5, 0.5, 0.5],
                                   [0.25] * 5, [0.6, 0.3, 0.3, 0.3, 0.3]])
@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_the_gate_is_close_to_the_best_fixed_k_and_never_below_plain(cost, rates, greedy):
    """Over 4 simulated generations of 400 rounds: >= 97 % of plain speed always, and >= 95 % of the best fixed k
    (which the gate does not know; near-ties between k cost it a little noise, changing k sometimes gains); the
    greedy gate (acceptance per state) and the sampling one (position 1 shrunk toward its long-run rate) alike."""
    got = np.mean([_simulate(rates, cost, 5, seed=s, greedy=greedy)[0] for s in range(4)])
    best = max(_simulate(rates, cost, k, gate=False)[0] for k in range(1, 6))
    assert got >= 0.97 and got >= 0.95 * best, (got, best)


def _simulate_adaptive(stop, rate, draft_cost, rounds=400, seed=0, accounting=True, verify=0.02, greedy=True):
    """Adaptive drafting (min_confidence): each draft step, the drafter is unsure with probability `stop` and the
    round proposes no more (the unsure step was computed and is paid for); proposed drafts are accepted with
    probability `rate`. A round costs 1 + `verify` per proposed draft + draft_cost per step computed.
    accounting=False observes rounds the way the loop did before (by drafts proposed only)."""
    rng = np.random.default_rng(seed)
    g = Gate(5, RoundCosts(), greedy)
    tokens = seconds = 0.0
    for _ in range(rounds):
        k = g.choose(5)
        drafted = 0
        while drafted < k and rng.random() >= stop:
            drafted += 1
        steps = drafted + (drafted < k)
        n = 0
        while n < drafted and rng.random() < rate:
            n += 1
        cost = 1.0 + verify * drafted + draft_cost * steps
        g.observe(drafted, n, cost, chose=k if accounting else None)
        tokens += n + 1
        seconds += cost
    return tokens / seconds


@pytest.mark.parametrize("stop,rate", [(0.8, 0.3), (0.9, 0.3), (0.9, 0.5), (0.5, 0.7)])
def test_drafts_stopped_by_the_drafters_confidence_do_not_look_like_plain_steps(stop, rate):
    """Measured with ONNX Runtime on this CPU at T = 1 (MT-Bench writing): most rounds' first draft step was
    unsure, so the round verified its bonus alone after paying a draft step. Counted as plain rounds, those made
    a plain step look up to a draft step dearer than it was, and the gate kept drafting at 0.88x of plain; counted under the k
    the gate chose, with the unsure position as not accepted, the gate sees that drafting does not pay (and still
    drafts where it does)."""
    got = np.mean([_simulate_adaptive(stop, rate, 0.12, seed=s) for s in range(4)])
    before = np.mean([_simulate_adaptive(stop, rate, 0.12, seed=s, accounting=False) for s in range(4)])
    if stop >= 0.8:
        assert got >= 0.97 > before, (got, before)
    else:
        assert got >= 1.15, got
    g = Gate(4, RoundCosts())
    for _ in range(3):
        g.observe(0, 0, 1.1, chose=3)  # stopped at its first step
    assert not g.costs.known(0) and g.costs(3) == 1.1 and g.reached[False][0] > 0 == g.accepted[False][0]


@pytest.mark.parametrize("stop,rate", [(0.7, 0.35), (0.5, 0.7), (0.5, 0.3)])
def test_stopped_rounds_on_llama_like_costs_do_not_make_drafting_look_cheap(stop, rate):
    """llama.cpp on this CPU: a verified token costs ~0.9 plain steps (the head on every row), a draft step ~0.14.
    At T = 1 most rounds stopped at their first draft step and a few drafted fully; priced by the median of that mix
    the gate kept drafting at 0.92-0.94x of plain in this simulation (0.96x measured on MT-Bench). Priced by outcome, it
    stays within a few probes of plain speed."""
    assert np.mean([_simulate_adaptive(stop, rate, 0.14, verify=0.9, seed=s) for s in range(4)]) >= 0.94


@pytest.mark.parametrize("stop,rate", [(0.5, 0.7), (0.3, 0.6), (0.4, 0.9)])
def test_sampling_where_drafting_cannot_pay_keeps_to_plain_between_probes(stop, rate):
    """T > 0 on llama-like costs (a verified token ~0.9 plain steps, a draft step 0.2, adaptive stops): no k pays,
    and while the gate decodes plain its only evidence is a probe now and then. With position 1 shrunk toward
    PRIOR and the short-run counts decayed over the plain rounds between probes, a_1 fell back to 0.5 each time and
    the gate probed more often and longer than the rounds' true rate (here 0.35-0.54 with stops) warranted: 0.970-0.973x
    of plain over 2,000 rounds in this simulation (4 seeds). Shrunk toward the long-run rate: 0.980-0.986x."""
    got = [_simulate_adaptive(stop, rate, 0.2, verify=0.9, rounds=2000, seed=s, greedy=False) for s in range(4)]
    assert np.mean(got) >= 0.978, got


class _OneState(Gate):
    """The greedy gate without the split by state: every round counted as if the one before it had missed."""

    def observe(self, *args, **kwargs) -> None:
        super().observe(*args, **kwargs)
        self.after_full = False


def _bursty(split: bool, seed: int, verify: float, draft: float, n: int = 3000) -> float:
    """Tokens per second (plain = 1) over a text whose positions are easy (a draft accepted with probability 0.95)
    or hard (0.25) in runs (each position keeps its kind with probability 0.97), as greedy acceptance is on real
    text; a round drafting k costs 1 + (verify + draft) k plain steps."""
    rng = np.random.default_rng(seed)
    flips = rng.random(n + 8) > 0.97
    easy = np.cumsum(flips) % 2 == 1
    ok = np.where(easy, rng.random(n + 8) < 0.95, rng.random(n + 8) < 0.25)
    g = Gate(5, RoundCosts()) if split else _OneState(5, RoundCosts())
    t, seconds = 0, 0.0
    while t < n:
        k = g.choose(5)
        m = 0
        while m < k and ok[t + m]:
            m += 1
        cost = 1.0 + (verify + draft) * k
        g.observe(k, m, cost)
        t, seconds = t + m + 1, seconds + cost
    return t / seconds


@pytest.mark.parametrize("verify,draft", [(0.02, 0.1), (0.1, 0.12)], ids=["gpu-like", "torch-cpu-like"])
def test_greedy_acceptance_in_runs_is_estimated_per_state(verify, draft):
    """Greedy: the rounds after one that accepted every draft are estimated apart from the others, so the gate
    drafts long through an easy run and drops to plain decoding soon after it ends (one estimate over both states,
    as sampling keeps, which has no such runs, is >= 1 % slower on such a text: 2.3-2.8 % here)."""
    split = np.mean([_bursty(True, s, verify, draft) for s in range(8)])
    pooled = np.mean([_bursty(False, s, verify, draft) for s in range(8)])
    assert split >= 1.01 * pooled, (split, pooled)
    gates = {greedy: Gate(3, RoundCosts(), greedy) for greedy in (True, False)}
    for g in gates.values():
        for _ in range(6):  # a text where a round that accepts all comes after a miss, and a miss after it
            g.observe(3, 3, 1.0)
            g.observe(3, 0, 1.0)
    assert not gates[True].after_full and gates[True].rates()[0] > 0.8  # after a miss: a full round expected
    assert 0.4 < gates[False].rates()[0] < 0.6  # sampling: one estimate over both
    for g in gates.values():
        g.observe(3, 3, 1.0)
    assert gates[True].after_full and gates[True].rates()[0] < 0.3  # after a full round: a miss
    assert 0.4 < gates[False].rates()[0] < 0.6


def test_the_gate_follows_a_change_of_content():
    """Drafts accepted, then never (prose after code), then accepted again: plain in the middle, drafting after."""
    g = Gate(5, RoundCosts())
    ks = []
    for phase_rate in (0.9, 0.0, 0.9):
        rng = np.random.default_rng(0)
        for _ in range(150):
            k = g.choose(5)
            n = 0
            while n < k and rng.random() < phase_rate:
                n += 1
            g.observe(k, n, GPU(k))
            ks.append(k)
    assert np.mean(ks[100:150]) > 4 and np.mean(ks[250:300]) < 0.5 and np.mean(ks[-50:]) > 4


def test_costs_are_explored_first_then_kept_across_generations():
    costs = RoundCosts()
    g = Gate(4, costs)
    seen = []
    for _ in range(4):
        k = g.choose(4)
        seen.append(k)
        g.observe(k, 0, CPU(k))
    assert seen == [4, 4, 0, 0]  # the longest draft, then plain; the first round at each k is a warm-up
    assert Gate(4, costs).choose(4) in range(5) and costs.known(0) and costs.known(4)
    assert Gate(4, costs).choose(0) == 0 and Gate(4, RoundCosts()).choose(2) == 2  # limited by the budget
