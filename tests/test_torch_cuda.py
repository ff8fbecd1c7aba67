"""The torch backend on CUDA: graph-captured (and compiled) steps against the uncaptured path. Skipped without a GPU."""

from __future__ import annotations

import random

import pytest
import torch

from mtpkit.model.config import FULL, SLIDING
from mtpkit.runtime.draft import draft
from mtpkit.runtime.loop import GenerationParams, generate
from mtpkit.runtime.torch_backend import TorchBackend
from tests.conftest import tiny_drafter, tiny_target

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _tokens(be, prompt, n, k, drafter=True):
    params = GenerationParams(max_new_tokens=n, num_draft_tokens=k)
    return [t for r in generate(be, prompt, params, set(), use_drafter=drafter) for t in r.tokens]


def _models(seed):
    rng = random.Random(seed)
    target = tiny_target(seed).cuda()
    drafter = tiny_drafter(target, seed, layer_types=rng.choice([[SLIDING, FULL], [SLIDING, SLIDING, FULL]]),
                           head=rng.choice(["dense", "centroid"]), num_centroids=4, centroid_top_k=2).cuda()
    prompt = [rng.randrange(target.config.vocab_size) for _ in range(rng.randint(1, 20))]
    return target, drafter, prompt


@pytest.mark.parametrize("seed", range(6))
def test_graphs_draft_and_decode_like_the_uncaptured_path(seed):
    target, drafter, prompt = _models(seed)
    k = 1 + seed % 5
    eager = TorchBackend(target, drafter, max_len=256, max_draft=k, cuda_graphs=False)
    graphs = TorchBackend(target, drafter, max_len=256, max_draft=k, cuda_graphs=True)
    plain = _tokens(eager, prompt, 60, k, drafter=False)
    assert _tokens(graphs, prompt, 60, k, drafter=False) == plain
    assert _tokens(graphs, prompt, 60, k) == plain
    sp = GenerationParams().sampling
    drafts = []
    for be in (eager, graphs):  # the same drafts, for every draft length, from one state
        logits, h = be.start(list(prompt))
        drafts.append([draft(be, logits.argmax(), h, j, sp).tokens.tolist() for j in range(1, k + 1)])
    assert drafts[0] == drafts[1]

def test_compiled_drafter_keeps_greedy_output():
    target, drafter, prompt = _models(0)
    be = TorchBackend(target, drafter, max_len=256, max_draft=4, compile="drafter")
    assert _tokens(be, prompt, 40, 4) == _tokens(be, prompt, 40, 4, drafter=False)


def test_compiled_target_keeps_greedy_output():
    """compile="all": every target step (plain and verify) runs one padded width, so a verify row computes what a
    plain step computes; fused plain chunks and single plain steps agree too."""
    target, drafter, prompt = _models(1)
    be = TorchBackend(target, drafter, max_len=256, max_draft=4, compile="all")
    plain = _tokens(be, prompt, 40, 4, drafter=False)
    assert _tokens(be, prompt, 40, 4) == plain
    fused, be.fused_plain = be.fused_plain, None
    assert _tokens(be, prompt, 40, 4, drafter=False) == plain
    assert fused is not None and be._graphs.width == 5 and set(be._graphs.verify_graphs) == {5}


def test_compiled_sampling_for_many_settings_in_one_process():
    """A compiled step is compiled again per sampling settings: more settings than torch.compile's default of 8
    variants (a hard error with fullgraph) still run, and every k of a setting shares its one acceptance graph."""
    from mtpkit.runtime.sampling import SamplingParams
    target, drafter, prompt = _models(2)
    be = TorchBackend(target, drafter, max_len=256, max_draft=4, compile="drafter")
    for i in range(10):
        sp = SamplingParams(temperature=0.5 + 0.1 * i, top_k=20 * (i % 2))
        for k in (1, 4):
            params = GenerationParams(max_new_tokens=12, sampling=sp, num_draft_tokens=k, gate=False, seed=i)
            assert len([t for r in generate(be, prompt, params, set()) for t in r.tokens]) == 12
    assert len(be._graphs.accepts) == 10
