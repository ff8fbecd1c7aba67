"""Pipelined drafting rounds (loop.pipelined, the torch backend's Pipeline) against the synchronous loop.

The torch backend runs its CUDA-graph paths on a CPU here (tests/conftest.with_cpu_graphs): a round's bonus token, h and
cache length stay on the device and round r + 1 is launched before round r is read. With the same k per round the
pipelined loop must give the synchronous loop's tokens and round outcomes, greedy and sampled (the same uniforms in
the same order); the cache's host-side length must end where the synchronous loop leaves it, also when a round was
launched past an EOS; and the caps near the budget and the end of the context must hold.
"""

from __future__ import annotations

import pytest
import torch

from mtpkit.model.config import FULL, SLIDING
from mtpkit.runtime import loop as loop_mod
from mtpkit.runtime.loop import GenerationParams, generate
from mtpkit.runtime.sampling import SamplingParams
from mtpkit.runtime.torch_backend import Pipeline, TorchBackend
from tests.conftest import tiny_drafter, tiny_target, with_cpu_graphs

TARGET = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=8,
              layer_types=[SLIDING, FULL, SLIDING, FULL], final_logit_softcapping=None)
PROMPT = [2] + list(range(270, 290))
K = 4


@pytest.fixture(scope="module", params=["centroid", "dense"])
def backend(request):
    """Drafts mostly rejected (the centroid head's few candidates) or mostly accepted (dense, near-uniform at T = 1)."""
    t = tiny_target(5, **TARGET)
    kw = dict(num_centroids=30, centroid_top_k=3, draft_temperature=0.8) if request.param == "centroid" else {}
    d = tiny_drafter(t, 5, head=request.param, **kw)
    return with_cpu_graphs(TorchBackend(t, d, max_len=256, max_draft=8))


def _run(be, pipeline: bool, n_new: int = 60, temperature: float = 0.0, gate: bool = False, eos=(),
         use_drafter: bool = True, seed: int = 3, branches: int = 1, verify: str = "block"):
    params = GenerationParams(n_new, SamplingParams(temperature=temperature), K, seed=seed, gate=gate,
                              pipeline=pipeline, branches=branches, verify=verify)
    rounds = list(generate(be, PROMPT, params, set(eos), use_drafter=use_drafter))
    return [x for r in rounds for x in r.tokens], rounds, be.length


@pytest.fixture
def launches(monkeypatch):
    """Counts Pipeline.launch calls (the pipelined path really ran)."""
    calls = []
    real = Pipeline.launch

    def counted(self, k, *a):
        calls.append(k if len(a) < 5 else (k, a[4]))  # (k, w) for a round launched with its width
        return real(self, k, *a)
    monkeypatch.setattr(Pipeline, "launch", counted)
    return calls


def _full_rounds(rounds):
    """(tokens, drafted, accepted) of the rounds that drafted K, until the first that drafted fewer."""
    out = []
    for r in rounds[1:]:
        if r.drafted != K:
            break
        out.append((r.tokens, r.drafted, r.accepted))
    return out


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_pipelined_rounds_equal_the_synchronous_loop(backend, launches, temperature):
    toks_s, rounds_s, len_s = _run(backend, False, temperature=temperature)
    assert not launches
    toks_p, rounds_p, len_p = _run(backend, True, temperature=temperature)
    assert len(launches) >= 8
    full_s, full_p = _full_rounds(rounds_s), _full_rounds(rounds_p)
    # the pipelined loop caps k by the rounds still in flight: it drafts fewer only in its last rounds
    assert sum(len(t) for t, _, _ in full_p) >= 60 - 3 * (K + 1)
    assert full_p == full_s[:len(full_p)]
    if temperature == 0:
        plain, _, _ = _run(backend, False, use_drafter=False)
        assert toks_p == toks_s == plain
        assert len_p == len_s
    else:
        assert {a for _, _, a in full_p} & {1, 2, 3, 4}  # drafts were accepted: the rounds differ in what they keep
    assert len(toks_p) == 60 and len_p == len(PROMPT) + 60 - 1


@pytest.mark.parametrize("w,verify", [(2, "block"), (3, "block"), (2, "token")])
def test_pipelined_tree_rounds_equal_the_synchronous_tree_loop(backend, launches, w, verify):
    """Sampled draft trees of w chains queued ahead of the host: the device-side acceptance, the accepted chain's
    K/V moved into place and the next round's bonus, h and length give the synchronous tree loop's rounds (same k,
    same uniforms); a wrong move or h would change the target's later rows and so the rounds. Also with an EOS: the
    round launched past it is abandoned and the host's cache length ends where the synchronous loop's does. The
    accepted chain judged by either rule."""
    toks_s, rounds_s, _ = _run(backend, False, temperature=1.0, branches=w, verify=verify)
    assert not launches
    toks_p, rounds_p, len_p = _run(backend, True, temperature=1.0, branches=w, verify=verify)
    assert len(launches) >= 8 and {x[1] for x in launches} == {w}
    full_s, full_p = _full_rounds(rounds_s), _full_rounds(rounds_p)
    assert sum(len(t) for t, _, _ in full_p) >= 60 - 3 * (K + 1)
    assert full_p == full_s[:len(full_p)]
    # first drafts were accepted (a chain's rows moved into place), with the dense head chains past their first draft
    assert max(a for _, _, a in full_p) >= (2 if backend.drafter.config.head == "dense" else 1)
    assert len(toks_p) == 60 and len_p == len(PROMPT) + 60 - 1
    eos = toks_s[30]
    cut = toks_s[:toks_s.index(eos) + 1]
    got_s, _, len_s = _run(backend, False, temperature=1.0, branches=w, eos=[eos], verify=verify)
    got_p, rounds, len_p = _run(backend, True, temperature=1.0, branches=w, eos=[eos], verify=verify)
    assert got_p == got_s == cut and rounds[-1].finish == "eos" and len_p == len_s


def test_pipelined_tree_moves_a_later_chain_into_place(launches, monkeypatch):
    """The dense head (near-uniform q at T = 1: first drafts can be accepted); uniforms forced so that rounds accept the second first-draft candidate and its whole chain (u = 1 - 1e-6 for
    candidate 0, 0 for candidate 1 and the chain's drafts): the kept rows are 1 + i w + 1, moved on the device, and h
    is the last of them. The drafts (u = 0.5) and the tokens drawn from the target's rows depend on both, so the
    pipelined rounds equal the synchronous ones only if the move and h are right."""
    from mtpkit.runtime.torch_backend import TorchOps
    t = tiny_target(5, **TARGET)
    backend = with_cpu_graphs(TorchBackend(t, tiny_drafter(t, 5, head="dense"), max_len=256, max_draft=8))
    w, calls = 3, []

    def rand(rng, n, like):
        calls.append(n)
        if len(calls) % 2:  # a round's draft uniforms (w k), then its acceptance's (w + k + 1)
            return torch.full((n,), 0.5)
        k = n - w - 1
        return torch.tensor([1 - 1e-6, 0.0, 0.0] + [0.0] * (k - 1) + [0.5, 0.5])
    monkeypatch.setattr(TorchOps, "rand", staticmethod(rand))
    toks_s, rounds_s, len_s = _run(backend, False, temperature=1.0, branches=w)
    calls.clear()
    toks_p, rounds_p, len_p = _run(backend, True, temperature=1.0, branches=w)
    full_s, full_p = _full_rounds(rounds_s), _full_rounds(rounds_p)
    assert len(full_p) >= 6 and full_p == full_s[:len(full_p)]
    assert sum(a == K for _, _, a in full_p) >= len(full_p) // 2  # whole chains kept (mostly candidate 1's)


def test_pipelined_gate_keeps_greedy_identity(backend, launches):
    plain, _, _ = _run(backend, False, n_new=80, use_drafter=False)
    toks, rounds, length = _run(backend, True, n_new=80, gate=True)
    assert launches and toks == plain and length == len(PROMPT) + 80 - 1


def test_round_launched_past_eos_is_abandoned(backend, launches):
    plain, _, _ = _run(backend, False, use_drafter=False)
    eos = plain[25]
    cut = plain[:plain.index(eos) + 1]
    toks_s, rounds_s, len_s = _run(backend, False, eos=[eos])
    toks_p, rounds_p, len_p = _run(backend, True, eos=[eos])
    assert toks_p == toks_s == cut and rounds_p[-1].finish == "eos"
    assert len_p == len_s == len(PROMPT) + len(cut) - 1
    # the cache is usable after it: the next generation starts from the prompt and matches plain again
    again, _, _ = _run(backend, True)
    assert again[:len(cut)] == cut


def test_pipelined_rounds_stop_at_the_context(launches):
    t = tiny_target(5, **TARGET)
    d = tiny_drafter(t, 5, head="centroid", num_centroids=30, centroid_top_k=3)
    be = with_cpu_graphs(TorchBackend(t, d, max_len=len(PROMPT) + 30, max_draft=8))
    plain = TorchBackend(t, None, max_len=len(PROMPT) + 30, max_draft=8)
    params = GenerationParams(200, num_draft_tokens=K, gate=False)
    rounds = list(generate(be, PROMPT, params, set()))
    want = list(generate(plain, PROMPT, params, set(), use_drafter=False))
    assert launches and rounds[-1].finish == want[-1].finish == "context"
    assert [x for r in rounds for x in r.tokens] == [x for r in want for x in r.tokens]


def test_pipeline_off_for_backends_and_settings_without_it(backend, monkeypatch):
    monkeypatch.setattr(loop_mod, "pipelined", lambda *a, **k: pytest.fail("pipelined ran"))
    _run(backend, False)  # pipeline=False
    cpu = TorchBackend(backend.target, backend.drafter, max_len=256, max_draft=8)  # no graphs: no pipeline
    assert cpu.pipeline is None
    params = GenerationParams(20, num_draft_tokens=K, min_confidence=0.5)  # adaptive drafting stops on the host
    list(generate(backend, PROMPT, params, set()))


def test_gate_prices_a_streams_first_round_by_its_device_time(backend, monkeypatch):
    """The first round of a pipelined stream costs the gate its own device time (draft_s + verify_s), not the wall
    time since the round before it (a round alone, the gate's probe after plain steps, must not look as dear as an
    unpipelined one); the rounds after it the wall time between reads (what a stream of them costs)."""
    from mtpkit.runtime.gate import Gate, RoundCosts
    from mtpkit.runtime.torch_backend import Launched
    seen, read = [], []
    real, launch = Launched.result, Pipeline.launch

    def result(self):
        out = real(self)
        read.append((self.k, out[0], out[3] + out[4], self.first))
        return out

    def first_launch(self, *a):
        out = launch(self, *a)
        out.first, self.launched = not getattr(self, "launched", False), True
        return out
    monkeypatch.setattr(Launched, "result", result)
    monkeypatch.setattr(Pipeline, "launch", first_launch)

    class Spy(Gate):
        def observe(self, drafted, accepted, seconds, steps=1, chose=None, head_rows=None):
            seen.append((drafted, accepted, seconds))
            super().observe(drafted, accepted, seconds, steps, chose, head_rows)
    params = GenerationParams(60, SamplingParams(temperature=1.0), K, gate=True)
    list(generate(backend, PROMPT, params, set(), gate=Spy(K, RoundCosts(), greedy=False)))
    firsts = [x[:3] for x in read if x[3]]
    later = [x[:3] for x in read if not x[3]]
    assert firsts and later and all(x in seen for x in firsts) and not any(x in seen for x in later)
