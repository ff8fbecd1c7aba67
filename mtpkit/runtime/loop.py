"""The shared-cache speculative loop as small steps and one generator.

Contract of a round (DESIGN.md §3): the target cache holds positions < p, h is the target's post-norm
hidden at p - 1 and b (the bonus token, position p) is not in the cache yet.
  draft   d_1..d_k  <- drafter(b, h) at query position p, reading the target's cache
  verify  target([b, d_1..d_k]) at positions p..p+k -> logits, hidden
  accept  n drafts (greedy prefix match, or rejection sampling) + the next bonus b'
  commit  roll the cache back to p + n + 1, h <- hidden[n]
Every round emits d_1..d_n, b': tau = n + 1 tokens per target forward. With no drafter (or k = 0) the
same code is plain decoding, which is the baseline every speedup is measured against. Each round's k is
picked by the online gate (runtime/gate.py) in 0..num_draft_tokens, or is num_draft_tokens when gate=False.
Plain steps (plain decoding, or the gate's k = 0) on a backend with `fused_plain` (the torch backend's CUDA
graphs) run PLAIN_CHUNK at a time with no host sync between them: the host queues the next steps while the GPU
runs (one Round per chunk, `forwards` = its tokens); the tokens equal those of single steps (greedy), or are
drawn from the same distribution (sampling).
A backend with `verify_rows` (llama.cpp on a CPU) runs every step through it (`lazy_rows`, the default), plain ones
too: the target's head computed only for the rows acceptance reads (accept_rows: rows 0..n, the same outcome as
accept on every row), by its row head (q8_head.c: bit for bit llama.cpp's rows, cheaper); lazy_rows=False keeps
the backend's own step (llama.cpp's decode: the bench's `plain`, the stock baseline).
A backend with `pipeline` (the torch backend's CUDA graphs) runs drafting rounds queued ahead of the host
(`pipelined`): the round's bonus, h and cache length stay on the device, so round r + 1 is launched before round r is
read and the host's work between rounds (reading one, the gate, the caller) overlaps the GPU's instead of idling it
(H100: a round of 5 drafts 2.26 -> 1.89 ms greedy, 2.60 -> 2.12 ms at T = 1), draft trees too (branches > 1: the
accepted chain's K/V moved into place on the device). Its k is picked one round earlier, capped
by what the rounds in flight may still emit; the gate prices it by the time between reads (the first round of a
stream: by the device's time for it).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from mtpkit.errors import MtpkitError
from mtpkit.runtime.backend import Backend, Draft
from mtpkit.runtime.draft import draft
from mtpkit.runtime.gate import Gate, RoundCosts
from mtpkit.runtime.sampling import VERIFY, SamplingParams, accept_greedy, accept_rejection, probs
from mtpkit.runtime.tree import TreeDraft, accept_tree, draft_tree, kept_rows

PLAIN_CHUNK = 16  # fused plain decoding: steps queued per host sync (a chunk past EOS is wasted work)


@dataclass
class Round:
    tokens: list[int]  # emitted this round (accepted drafts, then the target's token), cut at EOS/limit
    drafted: int  # drafts proposed
    accepted: int  # drafts accepted
    draft_s: float = 0.0
    verify_s: float = 0.0
    prefill: bool = False  # the first "round": the prompt's forward and the first token
    finish: str | None = None  # "eos", "length" (max_new_tokens) or "context" on the last round
    forwards: int = 1  # target forwards the round stands for (a fused plain chunk: one per token it emits)


@dataclass
class GenerationParams:
    max_new_tokens: int = 128
    sampling: SamplingParams = field(default_factory=SamplingParams)
    num_draft_tokens: int = 5  # the most drafts per round (K; as `mtpkit run`); every round's k when gate=False
    seed: int = 0
    min_confidence: float | None = None  # adaptive drafting: stop a draft when the drafter's top prob drops below
    draft_temperature: float = 1.0  # sampling: drafts are drawn at temperature T * this (DrafterConfig.draft_temperature)
    gate: bool = True  # pick each round's k in 0..num_draft_tokens (runtime/gate.py); False: always num_draft_tokens
    branches: int = 1  # sampling: w first-draft candidates, each with its chain (runtime/tree.py); 1 = one chain
    lazy_rows: bool = True  # steps through the backend's verify_rows where it has one (head rows as acceptance reads them)
    pipeline: bool = True  # drafting rounds queued ahead of the host where the backend can (Backend.pipeline: CUDA)
    # sampling, a chain whose every verify row is computed (one a round, or a tree's accepted one): "block" = block
    # verification (sampling.accept_block_logits), "token" = token-wise rejection (sampling.accept_rejection_logits);
    # verify_rows (llama.cpp) judges token-wise
    verify: str = "block"

    def __post_init__(self) -> None:
        if self.max_new_tokens <= 0:
            raise MtpkitError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
        if self.num_draft_tokens < 1:
            raise MtpkitError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if self.min_confidence is not None and not 0 < self.min_confidence < 1:
            raise MtpkitError(f"min_confidence must be in (0, 1), got {self.min_confidence}")
        if self.branches < 1:
            raise MtpkitError(f"branches must be >= 1, got {self.branches}")
        if not self.draft_temperature > 0:
            raise MtpkitError(f"draft_temperature must be positive, got {self.draft_temperature}")
        if self.verify not in VERIFY:
            raise MtpkitError(f"verify must be one of {', '.join(VERIFY)}, got {self.verify!r}")

    @property
    def draft_sampling(self) -> SamplingParams:
        """What drafts are sampled with: the target's settings at temperature T * draft_temperature."""
        sp = self.sampling
        return sp if sp.greedy else replace(sp, temperature=sp.temperature * self.draft_temperature)


def first_token(ops, logits, sp: SamplingParams, rng) -> int:
    pick = ops.argmax(logits) if sp.greedy else ops.sample(probs(ops, logits, sp), rng)
    return ops.to_list(pick)[0]


def accept(backend: Backend, d: Draft, logits, sp: SamplingParams, rng, verify: str = "block"
           ) -> tuple[int, int, list[int]]:
    """(n accepted, next token, the drafts) as host ints for draft d (k tokens) against target logits [k + 1, V]:
    one host transfer. Sampling: the rule `verify` names (sampling.VERIFY) on the device (the backend's fused_accept,
    a replayed CUDA graph, when it has one), with k + 1 uniforms drawn here."""
    ops = backend.ops
    if sp.greedy:
        return accept_greedy(ops, d.tokens, logits)
    u = ops.rand(rng, d.tokens.shape[0] + 1, like=logits)
    if backend.fused_accept is not None:
        n, nxt = backend.fused_accept(d, logits, sp, u, verify)
    else:
        n, nxt = VERIFY[verify](ops, d.tokens, d.picks, d.q, d.ids, logits, sp, u)
    vals = ops.to_list(ops.cat([n, nxt, d.tokens]))
    return vals[0], vals[1], vals[2:]


def accept_rows(backend: Backend, d: Draft, rows, sp: SamplingParams, rng) -> tuple[int, int, list[int]]:
    """accept() for a verify whose logits rows are computed when read (Backend.verify_rows): rows in order while
    drafts are accepted, then accept()'s own rule (accept_greedy / accept_rejection, the same uniforms) on them, the
    rows after the first rejection zeros, which that rule never reads. Same outcome as accept() on verify()'s logits."""
    ops = backend.ops
    drafts = ops.to_list(d.tokens)
    k = len(drafts)
    u = None if sp.greedy else ops.rand(rng, k + 1, like=d.tokens)
    got = []
    for i in range(k + 1):
        x = rows(i)
        if sp.greedy:
            got.append(x)
            ok = i < k and ops.to_list(ops.argmax(x))[0] == drafts[i]
        else:
            got.append(probs(ops, x, sp))
            ok = i < k and bool(u[i] * d.q[i, int(d.picks[i])] < got[i][drafts[i]])  # as accept_rejection's
        if not ok:
            break
    rest = [got[0] * 0] * (k + 1 - len(got))
    table = ops.stack(got + rest)
    if sp.greedy:
        return accept_greedy(ops, d.tokens, table)
    n, nxt = accept_rejection(ops, d.tokens, d.picks, d.q, d.ids, table, u)
    vals = ops.to_list(ops.cat([n, nxt, d.tokens]))
    return vals[0], vals[1], vals[2:]


def accept_branches(backend: Backend, d: TreeDraft, logits, sp: SamplingParams, rng,
                    verify: str = "block") -> tuple[int, int, int, list[int]]:
    """(chain c, n accepted, next token, chain c's drafts) as host ints for a draft tree against the verify's logits
    [1 + w k, V] (tree.accept_tree, the accepted chain judged by the rule `verify` names; the backend's
    fused_accept_tree when it has one): one host transfer."""
    ops = backend.ops
    w, k = d.shape
    u = ops.rand(rng, w + k + 1, like=logits)
    if backend.fused_accept_tree is not None:
        c, n, nxt = backend.fused_accept_tree(d, logits, sp, u, verify)
    else:
        c, n, nxt = accept_tree(ops, d, logits, sp, u, verify=verify)
    vals = ops.to_list(ops.cat([c, n, nxt, ops.index(d.tokens, ops.clamp_max(c, w - 1))]))
    return vals[0], vals[1], vals[2], vals[3:]


def cut(tokens: list[int], eos: set[int], budget: int) -> tuple[list[int], str | None]:
    """Truncate emitted tokens at the first EOS (kept) or at the remaining budget."""
    for i, t in enumerate(tokens[:budget]):
        if t in eos:
            return tokens[:i + 1], "eos"
    if len(tokens) >= budget:
        return tokens[:budget], "length"
    return tokens, None


def generate(backend: Backend, prompt: list[int], params: GenerationParams, eos: set[int],
             use_drafter: bool = True, gate: Gate | None = None) -> Iterator[Round]:
    """Yield one Round per target forward (the first is the prefill). `gate`: the online gate with what it has
    measured on this backend so far (kept by the caller across generations; a fresh one if None)."""
    if not prompt:
        raise MtpkitError("empty prompt")
    if len(prompt) >= backend.max_len:
        raise MtpkitError(f"prompt of {len(prompt)} tokens does not fit the context of {backend.max_len} positions "
                          "(mtpkit run --context N, mtpkit.load(max_len=N))")
    sp, dsp, ops = params.sampling, params.draft_sampling, backend.ops
    tree = use_drafter and backend.has_drafter and params.branches > 1 and not sp.greedy  # checked before the prefill
    if tree and backend.verify_tree is None:
        raise MtpkitError(f"branches > 1 needs a backend with draft trees (torch); {type(backend).__name__} has none")
    if tree and params.min_confidence is not None:
        raise MtpkitError("branches > 1 drafts every chain to k: it does not take min_confidence")
    rng = None if sp.greedy else ops.generator(params.seed)
    t0 = backend.clock()
    logits, h = backend.start(list(prompt))
    bonus = first_token(ops, logits, sp, rng)
    out, finish = cut([bonus], eos, params.max_new_tokens)
    emitted = len(out)
    yield Round(out, 0, 0, verify_s=backend.elapsed(t0, backend.clock()), prefill=True, finish=finish)
    drafting = use_drafter and backend.has_drafter
    lazy = params.lazy_rows and backend.verify_rows is not None
    pipelining = (drafting and params.pipeline and backend.pipeline is not None and not lazy
                  and params.min_confidence is None)
    w = params.branches if tree else 1  # chains a round drafts
    if not (drafting and params.gate):
        gate = None
    else:
        gate = (gate or Gate(params.num_draft_tokens, RoundCosts(), sp.greedy)).for_k(params.num_draft_tokens)
    last = time.perf_counter()  # the gate times a round from the end of the previous one: the loop's own
    while finish is None:  # overhead and the caller's work between rounds count (per round, as they are paid)
        room = backend.max_len - backend.length - 1  # positions left after the bonus
        if room < 0:
            yield Round([], 0, 0, finish="context")
            return
        k = _round_k(backend, params, gate, emitted, w=w) if drafting else 0
        if k > 0 and pipelining:
            bonus, h, emitted, finish, last = yield from pipelined(backend, params, gate, k, w, bonus, h, emitted,
                                                                   eos, rng, last)
            continue
        if k == 0 and backend.fused_plain is not None:  # plain steps, PLAIN_CHUNK of them per host sync
            m = min(PLAIN_CHUNK, params.max_new_tokens - emitted, room + 1)
            u = None if sp.greedy else ops.rand(rng, m, like=h)
            t0 = backend.clock()
            toks, h = backend.fused_plain(ops.tokens([bonus]), m, sp, u)
            t1 = backend.clock()
            picked = ops.to_list(toks)
            if gate is not None:
                now = time.perf_counter()
                gate.observe(0, 0, now - last, steps=m)
                last = now
            bonus = picked[-1]
            out, finish = cut(picked, eos, params.max_new_tokens - emitted)
            emitted += len(out)
            yield Round(out, 0, 0, verify_s=backend.elapsed(t0, t1), finish=finish, forwards=len(out))
            continue
        b = ops.tokens([bonus])
        head_rows = None  # verify_rows: the head rows the round computed (part of its cost), else None: all of them
        if tree and k > 0:  # sampled: w first drafts, each with a chain of k - 1 (runtime/tree.py)
            t0 = backend.clock()
            td = draft_tree(backend, b, h, k, params.branches, dsp, rng)
            t1 = backend.clock()
            p0 = backend.length
            logits, hidden = backend.verify_tree(td.verify_tokens(ops, b), params.branches, params.num_draft_tokens)
            c, n, bonus, drafted = accept_branches(backend, td, logits, sp, rng, params.verify)
            rows = kept_rows(params.branches, c, n)
            backend.keep(p0, rows)
            h = hidden[rows[-1] if rows else 0]
        else:
            t0 = backend.clock()
            d = draft(backend, b, h, k, dsp, rng, params.min_confidence)
            t1 = backend.clock()
            p0 = backend.length
            if lazy:  # (k = 0 too: the gate's plain steps get the backend's row head, q8_head.c on llama.cpp)
                reach = None if gate is None else gate.reach(d.tokens.shape[0])
                row_logits, hidden = backend.verify_rows(ops.cat([b, d.tokens]), reach)
                n, bonus, drafted = accept_rows(backend, d, row_logits, sp, rng)
                head_rows = row_logits.computed
            else:
                logits, hidden = backend.verify(ops.cat([b, d.tokens]))
                n, bonus, drafted = accept(backend, d, logits, sp, rng, params.verify)
            backend.rollback(p0 + n + 1)
            h = hidden[n]
        t2 = backend.clock()
        if gate is not None:  # acceptance synced the device
            now = time.perf_counter()
            gate.observe(len(drafted), n, now - last, chose=k, head_rows=head_rows)
            last = now
        out, finish = cut(drafted[:n] + [bonus], eos, params.max_new_tokens - emitted)
        emitted += len(out)
        yield Round(out, len(drafted), n, backend.elapsed(t0, t1), backend.elapsed(t1, t2), finish=finish)


PIPELINE_DEPTH = 2  # rounds in flight: the host reads round r while round r + 1 runs


def pipelined(backend: Backend, params: GenerationParams, gate: Gate | None, k: int, w: int, bonus: int, h,
              emitted: int, eos: set[int], rng, last: float):
    """Drafting rounds queued ahead of the host (Backend.pipeline), from the loop's state after a round, starting
    with k drafts. Round r + 1 is launched before round r is read, so the host's work (reading a round, the gate, the
    caller between rounds) overlaps the device's instead of leaving it idle. What is not known yet at a launch is
    bounded: the rounds in flight emit at most k_i + 1 tokens and keep k_i + 1 positions each, so each round's k is
    capped by the budget and the context left after them, and picked by the gate from what it had seen one round
    earlier. w > 1: sampled draft trees of w chains (runtime/tree.py), the accepted chain moved into place on the
    device. The same uniforms in the same order as the synchronous loop: with the same k per round, the same tokens
    (greedy: plain greedy's whatever k). Returns (bonus, h, emitted, finish, last) once the gate picks k = 0 (plain
    steps follow in the caller), the caps reach 0 (the last rounds run synchronously), or the generation ends (a
    round launched past the end is abandoned: its work is lost, the cache's length stays)."""
    sp, dsp, ops = params.sampling, params.draft_sampling, backend.ops
    pipe = backend.pipeline(bonus, h)
    flight: deque = deque()
    finish, read = None, 0
    while True:
        if k > 0:
            u_draft = None if sp.greedy else ops.rand(rng, w * k, like=h)  # (the synchronous loop's order)
            u_accept = None if sp.greedy else ops.rand(rng, (w > 1) * w + k + 1, like=h)
            flight.append(pipe.launch(k, dsp, sp, u_draft, u_accept, w, params.num_draft_tokens, params.verify))
        if not flight:
            return bonus, pipe.h, emitted, finish, last
        if k > 0 and len(flight) < PIPELINE_DEPTH:
            k = _round_k(backend, params, gate, emitted, flight, w)
            continue
        r = flight.popleft()
        n, bonus, drafted, draft_s, verify_s = r.result()
        if gate is not None:
            # priced by the time since the previous round was read: its cost in a stream of rounds (the host's share
            # included where the host is the slower). The first round of a stream waited for the host's launches: it
            # is priced by the device's time for it (alone, e.g. the gate's probe after plain steps, it would look
            # as dear as an unpipelined round and keep the gate from drafting: H100, MT-Bench T = 1, 1.00x)
            now = time.perf_counter()
            gate.observe(len(drafted), n, now - last if read else draft_s + verify_s, chose=r.k)
            last = now
        read += 1
        out, finish = cut(drafted[:n] + [bonus], eos, params.max_new_tokens - emitted)
        emitted += len(out)
        yield Round(out, len(drafted), n, draft_s, verify_s, finish=finish)
        if finish is not None:
            for r in flight:
                r.abandon()
            return bonus, pipe.h, emitted, finish, last
        k = _round_k(backend, params, gate, emitted, flight, w) if k > 0 else 0


def _round_k(backend: Backend, params: GenerationParams, gate: Gate | None, emitted: int,
             flight=(), w: int = 1) -> int:
    """The next round's k: at most num_draft_tokens, the budget and the context left (the gate's pick within that),
    with the pipelined rounds in flight counted at their most (k_i + 1 tokens and kept positions each); a draft tree
    of w chains writes 1 + w k positions. 0 = plain, or for the pipeline launch no more (drain)."""
    ahead = sum(r.k + 1 for r in flight)
    room = backend.max_len - backend.length - ahead - 1
    k = min(params.num_draft_tokens, params.max_new_tokens - emitted - ahead - 1, room // w)
    if k <= 0:
        return 0
    return gate.choose(k) if gate is not None else k
