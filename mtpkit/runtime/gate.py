"""The online gate: each round's draft length k in 0..K, picked to maximize expected tokens per second.

    tokens(k)  = 1 + a_1 + a_1 a_2 + ... + a_1 a_2 ... a_k    a_i = P(draft i accepted | drafts 1..i-1 accepted)
    seconds(k) = R(k), the measured wall time of a round that chose k, from the end of the round before it: draft,
                 verify, acceptance, and the loop's and its caller's work per round
    k*         = argmax over k in 0..K of tokens(k) / seconds(k);  k = 0 is a plain decoding step

a_i are running estimates at the current temperature: counts decayed by DECAY per round, each position's
shrunk toward the estimate of the position before it (the first toward PRIOR). Greedy acceptance comes in runs
(40 MT-Bench texts recorded by bench/gate_replay.py, walked with k = 5: a round's first draft was accepted 0.86 of
the time after a round that accepted all 5, 0.47 after one that accepted none), so at T = 0 the counts are kept
apart by whether the previous round accepted every draft it proposed, each state's estimates shrunk toward both
kept together; at T > 0 rounds are close to independent (0.52 vs 0.44) and the split would only halve the
evidence. At T > 0 position 1 is shrunk toward the session's long-run rate (counts decayed by SLOW_DECAY per
round) instead of PRIOR: while plain decoding looks best the only evidence is a probe now and then, the short-run
counts decay over the plain rounds between probes, and a_1 fell back to PRIOR each time, above what rounds gave
(position 1 yielded a token in 0.25-0.29 of drafting rounds, adaptive stops included, on MT-Bench and everyday
text at T = 1): the gate probed twice as often, at longer k, as its true rate warranted (llama.cpp costs on this
CPU, bench/gate_replay.py: T = 1 0.972-0.976x -> 0.983-0.991x). With adaptive drafting
(min_confidence) a round may propose fewer than its k: the step that stopped it was paid for, so that round
counts under R(k), and its stopped position as reached and not accepted (a_i is the chance that position i
yields a token); otherwise a round that stopped at its first step would count as a plain step, and a plain
step would look dearer than it is. When drafts stop being accepted the gate falls back to plain decoding
within a few rounds; while plain looks best it still drafts (the cheapest k) after 4, 8, ..., 64 plain
rounds (a probe), in case acceptance came back, but no more often than keeps the probes' expected loss under
PROBE_BUDGET of the plain time.
R(k) is the mean over the last rounds that chose k of each one's outcome priced at the median of recent rounds
with that outcome, in plain steps of their time times R(0) now (RoundCosts; a backend's first round at each k is not
counted: it pays for CUDA-graph captures and warm-ups); where the backend runs plain steps in fused chunks, R(0) is a
chunk's time per step. R need not grow with k (on this repo's CPU torch's fp32 head GEMM takes 62 / 140 / 200 /
113 ms for 1 / 2 / 3 / 4 rows: a verify of 6 tokens is cheaper than one of 3), so the
gate measures k = K and k = 0 first, then, once drafting pays at a measured k, any other k that could beat it
if it cost only a plain step (two rounds each); an unmeasured k's R is interpolated linearly.
api.Session keeps one Gate (acceptance and costs) per greedy/sampled across its generations.
Any choice of k keeps the output exact (greedy: identical to plain; sampling: the target's distribution),
so the gate only moves speed.
"""

from __future__ import annotations

import statistics
from collections import Counter, deque

PRIOR = 0.5  # a_i before evidence
PRIOR_WEIGHT = 0.5  # in rounds of evidence
SLOW_DECAY = 0.998  # per round: the long-run rate at position 1 (T > 0) forgets over ~500 rounds
SLOW_WEIGHT = 4.0  # in rounds of evidence: how much position 1 leans on the long-run rate (T > 0)
STATE_WEIGHT = 2.0  # in rounds of evidence: how much a T = 0 state's estimate leans on both states together
CHAIN_WEIGHT = 2.0  # in rounds of evidence: how much a position's estimate leans on the one before it
DECAY = 0.95  # per round: evidence from 20 rounds back counts 1/e
WINDOW = 9  # rounds per k (and per outcome) that R(k) is made of
EXPLORE_TRIES = 4  # rounds the gate spends choosing an unmeasured k before it relies on interpolation
PROBE_MIN, PROBE_MAX = 4, 64  # while plain decoding looks best: draft after this many plain rounds (doubling)
PROBE_BUDGET = 0.01  # ... and no sooner than its expected loss (in plain steps) / this


def expected_tokens(rates: list[float], limit: int) -> list[float]:
    """tokens(k) for k = 0..limit: 1 + a_1 + a_1 a_2 + ... + a_1 ... a_k (the module docstring's formula)."""
    out, run = [1.0], 1.0
    for a in rates[:limit]:
        run *= a
        out.append(out[-1] + run)
    return out


class RoundCosts:
    """R(k): seconds per round by the k the gate chose, measured as the loop runs.

    Each of the last WINDOW rounds that chose k is priced at the median of the recent rounds with its outcome
    (drafts proposed d, stopped early or not, and the head rows its verify computed where that depends on
    acceptance: Backend.verify_rows), and R(k) is their mean. Without adaptive drafting every round that chose k
    proposes k, and R(k) is the median of those rounds. With it, a round may stop at its first step (one draft
    step and a verify of one token) or propose all k (k steps, a verify of k + 1): 21.6 vs ~41 ms on llama.cpp on
    this CPU. The median of such a mix is its cheap mode, which made drafting look cheaper than it was
    (bench/results/cpu_llamacpp_cost); the mean of per-outcome medians keeps the mix's shares and the medians'
    indifference to a slow outlier. Rounds that chose different k but ran the same steps (stopped at the same d)
    share their outcome's median.
    A drafting round is priced in plain steps (its seconds over R(0) when it ran) and R(k) = that times R(0) now:
    every step grows with the context, and a session's prompts differ in length, so seconds measured on the
    previous (shorter) prompt made drafting look cheap beside a plain step measured on this one (llama.cpp on this
    CPU, everyday summarization of ~2k-token articles: drafting rounds lost 3.5-5 %; bench/results/cpu_lazy_rows).
    Before any plain round is measured, prices are in seconds (R(0) = 1 until then)."""

    PLAIN = (0, False, None)  # the outcome of a plain round

    def __init__(self) -> None:
        self.runs: dict[int, deque[tuple[int, int | None]]] = {}  # chosen k -> (proposed, head rows), last WINDOW rounds
        # outcome (proposed, stopped early, head rows or None) -> (seconds, R(0) then or None)
        self.by_outcome: dict[tuple[int, bool, int | None], deque[tuple[float, float | None]]] = {}
        self.price: dict[tuple[int, bool, int | None], float] = {}  # their median: plain in seconds, else in R(0)s
        self.measured: dict[int, float] = {}  # k -> R(0) in seconds, R(k > 0) in R(0)s
        self.seen: set[int] = set()
        self.asked: Counter[int] = Counter()  # rounds the gate chose k to measure it

    def add(self, k: int, seconds: float, drafted: int | None = None, head_rows: int | None = None) -> None:
        """A round that chose k, proposed `drafted` drafts (default k) and took `seconds`; `head_rows`: the target
        head rows its verify computed when that depended on acceptance (Backend.verify_rows), part of its outcome."""
        if k not in self.seen:  # the first round at k: captures and warm-ups
            self.seen.add(k)
            return
        d = k if drafted is None else drafted
        if k == 0:
            d, head_rows = 0, None
        self.runs.setdefault(k, deque(maxlen=WINDOW)).append((d, head_rows))
        key = (d, d < k, head_rows)
        first_plain = k == 0 and 0 not in self.measured
        self.by_outcome.setdefault(key, deque(maxlen=WINDOW)).append((seconds, self.measured.get(0)))
        if first_plain:  # drafting rounds measured so far: in plain steps of this first R(0)
            r0 = seconds
            for key2, times in self.by_outcome.items():
                times2 = [(s, r0 if ref is None and key2 != self.PLAIN else ref) for s, ref in times]
                times.clear()
                times.extend(times2)
        for key2 in (list(self.by_outcome) if first_plain else [key]):
            times = self.by_outcome[key2]
            self.price[key2] = statistics.median(s if key2 == self.PLAIN else s / (ref or 1.0) for s, ref in times)
        for j, runs in self.runs.items():  # the k whose window holds this outcome (a few us a round)
            if first_plain or j == k or (d < j) == key[1] and (d, head_rows) in runs:
                self.measured[j] = sum(self.price[(x, x < j, r)] for x, r in runs) / len(runs)

    def known(self, k: int) -> bool:
        return k in self.measured

    def _seconds(self, k: int) -> float:
        return self.measured[k] if k == 0 else self.measured[k] * self.measured.get(0, 1.0)

    def __call__(self, k: int) -> float:
        """R(k): measured, or on the line through the nearest measured k on each side (or the two nearest)."""
        if k in self.measured:
            return self._seconds(k)
        ks = sorted(self.measured)  # the gate asks only once two k are measured
        if len(ks) == 1:
            return self._seconds(ks[0])
        lo, hi = [x for x in ks if x < k], [x for x in ks if x > k]
        a, b = (lo[-1], hi[0]) if lo and hi else (lo[-2], lo[-1]) if lo else (hi[0], hi[1])
        ra, rb = self._seconds(a), self._seconds(b)
        return max(ra + (rb - ra) * (k - a) / (b - a), 1e-9)


class Gate:
    """Acceptance estimates per draft position and the round costs; `choose` a round's k, `observe` its outcome.
    api.Session keeps one across generations (acceptance decays per round, so a new text soon speaks for itself)."""

    def __init__(self, max_k: int, costs: RoundCosts, greedy: bool = True):
        self.max_k, self.costs, self.greedy = max_k, costs, greedy
        # decayed counts per position i and state (after_full: the previous round accepted every draft it
        # proposed; greedy only, a sampling gate keeps one state): rounds that reached draft i (drafts 1..i-1
        # accepted), and those that accepted it
        self.reached = {after: [0.0] * max_k for after in (False, True)}
        self.accepted = {after: [0.0] * max_k for after in (False, True)}
        self.after_full = False
        self.slow = [0.0, 0.0]  # a sampling gate's position-1 counts decayed by SLOW_DECAY: reached, accepted
        self.idle, self.probe_every = 0, PROBE_MIN  # plain rounds in a row; when to probe next

    def for_k(self, max_k: int) -> Gate:
        """This gate, or for another K a new one that keeps the round costs (acceptance starts over)."""
        return self if max_k == self.max_k else Gate(max_k, self.costs, self.greedy)

    def rates(self) -> list[float]:
        """a_1..a_K: position 1's evidence shrunk toward PRIOR, each later position's toward the estimate of the
        position before it. Conditional acceptance grows with depth for a drafter (given drafts 1..i-1 were
        accepted the text is predictable: shipped drafter on HumanEval, a_1..a_5 = 0.80 0.88 0.89 0.92 0.93),
        so positions the gate has not drafted to lately inherit the last one measured, and it tries longer
        drafts when the short ones are accepted. At T = 0 the estimates of the state the gate is in (after a
        round that accepted all it proposed, or not), each position's shrunk toward those over both states; at
        T > 0 position 1 shrunk toward the long-run rate (itself toward PRIOR)."""
        prev, w = PRIOR, PRIOR_WEIGHT
        if not self.greedy:
            prev, w = (self.slow[1] + PRIOR * PRIOR_WEIGHT) / (self.slow[0] + PRIOR_WEIGHT), SLOW_WEIGHT
        pooled = []
        for i in range(self.max_k):
            acc = self.accepted[False][i] + self.accepted[True][i]
            prev = (acc + prev * w) / (self.reached[False][i] + self.reached[True][i] + w)
            pooled.append(prev)
            w = CHAIN_WEIGHT
        if not self.greedy:
            return pooled
        acc, reached = self.accepted[self.after_full], self.reached[self.after_full]
        return [(a + p * STATE_WEIGHT) / (n + STATE_WEIGHT) for a, n, p in zip(acc, reached, pooled, strict=True)]

    def reach(self, n: int) -> list[float]:
        """The chance that a round of n drafts reads each of its n + 1 verify rows: 1, a_1, a_1 a_2, ..."""
        out = [1.0]
        for a in self.rates()[:n]:
            out.append(out[-1] * a)
        return out

    def choose(self, limit: int) -> int:
        """The round's k in 0..min(limit, max_k)."""
        limit = min(limit, self.max_k)
        if limit <= 0:
            return 0
        r = self.costs
        for k in (limit, 0):  # first measure the longest draft and a plain step
            if not r.known(k) and r.asked[k] < EXPLORE_TRIES:  # (adaptive drafting may stop short of k)
                r.asked[k] += 1
                return k
        tokens = expected_tokens(self.rates(), limit)
        best_k, best = 1, 0.0
        explore_k, explore = 0, 1.0 / r(0)
        for k in range(1, limit + 1):
            if r.known(k) or r.asked[k] >= EXPLORE_TRIES:
                if tokens[k] / r(k) > best:
                    best_k, best = k, tokens[k] / r(k)
            elif tokens[k] / r(0) > explore:  # unmeasured: worth measuring if it could win at the cost of a plain step
                explore_k, explore = k, tokens[k] / r(0)
        if explore_k and best > 1.0 / r(0) and explore > best:  # only once drafting pays somewhere
            r.asked[explore_k] += 1
            return explore_k
        if best > 1.0 / r(0):
            self.idle, self.probe_every = 0, PROBE_MIN
            return best_k
        self.idle += 1  # plain looks best: draft now and then in case acceptance came back, the k whose
        # expected loss (R(k) / R(0) - tokens(k) plain steps) is least, at most PROBE_BUDGET of the plain time
        loss, probe_k = float("inf"), 1
        for k in range(1, limit + 1):
            if r(k) / r(0) - tokens[k] < loss:  # (R interpolated where not measured yet)
                loss, probe_k = r(k) / r(0) - tokens[k], k
        if self.idle < max(self.probe_every, max(loss, 0.0) / PROBE_BUDGET):
            return 0
        self.idle, self.probe_every = 0, min(2 * self.probe_every, PROBE_MAX)
        return probe_k

    def observe(self, drafted: int, accepted: int, seconds: float, steps: int = 1, chose: int | None = None,
                head_rows: int | None = None) -> None:
        """A round's outcome; `steps` > 1: that many plain steps run as one chunk (loop.PLAIN_CHUNK), counted as
        that many plain rounds of seconds / steps each. `chose`: the round's k when adaptive drafting proposed
        fewer (`drafted` < chose; module docstring); default `drafted`. `head_rows`: RoundCosts.add's."""
        chose = drafted if chose is None else chose
        self.costs.add(chose, seconds / steps, drafted, head_rows)
        if steps > 1:
            self.idle += steps - 1  # the chunk's other steps (choose() counts the plain round it picks)
        f = DECAY ** steps
        for counts in (*self.accepted.values(), *self.reached.values()):
            counts[:] = [c * f for c in counts]
        stopped = int(drafted < chose)  # position `drafted` was reached (all accepted) and proposed nothing
        if not self.greedy:  # (only a sampling gate reads the long-run rate)
            f = SLOW_DECAY ** steps
            self.slow = [self.slow[0] * f + (chose > 0), self.slow[1] * f + (accepted > 0)]
        reached, acc = self.reached[self.after_full], self.accepted[self.after_full]
        for i in range(min(accepted + 1, drafted + stopped)):
            reached[i] += 1
            acc[i] += i < accepted
        self.after_full = self.greedy and chose > 0 and accepted == drafted == chose
