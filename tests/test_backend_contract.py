"""The backend contract (runtime/backend.py), checked the same way on every installed backend.

A backend joins by registering in mtpkit/runtime/__init__.py and adding a `_make_<name>` below that turns a
tiny reference target + drafter into an instance of it (through its exporter when it runs exported files).
Every test then runs on it: parity of logits / hidden / one drafter step with the reference, greedy
speculative == plain past the sliding window for k in {1, 3, 5} and both heads, a fused fast path equal to
the generic draft policy (and fused plain decoding equal to single steps), rollback and context errors, EOS inside a draft, a full context, and a chi-square
test that the sampled loop emits the backend's own target distribution.
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING
from mtpkit.model.drafter import draft_step as ref_draft_step
from mtpkit.runtime import BACKENDS
from mtpkit.runtime.draft import draft
from mtpkit.runtime.loop import GenerationParams, generate
from mtpkit.runtime.oracle import OracleDrafter
from mtpkit.runtime.sampling import VERIFY, SamplingParams, probs
from mtpkit.runtime.tree import accept_tree, draft_tree, kept_rows
from tests.conftest import tiny_drafter, tiny_target

HEADS = ("dense", "centroid")
# one tiny config every backend can express: llama.cpp keeps K/V in q8_0 (head_dim % 32 == 0) and its assistant
# reads layers n-2 (sliding) and n-1 (full); mlx-lm's gemma3_text needs every p-th layer full and no softcap
TARGET = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=2,
              num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32.0, sliding_window=8,
              layer_types=[SLIDING, FULL, SLIDING, FULL], final_logit_softcapping=None)
WINDOW = TARGET["sliding_window"]
NEEDS = {"torch": "torch", "llamacpp": "llama_cpp", "mlx": "mlx_lm", "onnx": "onnxruntime", "torch_cuda": "torch",
         "coreml": "coremltools", "torch_graphs": "torch"}
# parity with the float32 reference: relative to the largest |value| (llama.cpp keeps K/V in q8_0)
TOL = {"torch": 1e-5, "llamacpp": 0.03, "mlx": 1e-4, "onnx": 1e-5, "torch_cuda": 1e-4,
       "coreml": 5e-3, "torch_graphs": 1e-5}  # Core ML: float32 compute over its float16 K/V states
# where a GPU is: the torch backend on CUDA too, through its CUDA graphs (the fused greedy and sampled drafts);
# everywhere: the torch backend's graph paths on a CPU with each graph a ReplayedCall (tests/conftest.py)
RUNS = list(BACKENDS) + ["torch_graphs"] + (["torch_cuda"] if torch.cuda.is_available() else [])


def _reference(head: str):
    t = tiny_target(5, **TARGET)
    kw = dict(head=head, draft_temperature=0.8)
    if head == "centroid":
        kw.update(num_centroids=30, centroid_top_k=3)
    return t, tiny_drafter(t, 5, **kw)


def _make_torch(t, d, tmp, max_len, with_drafter):
    from mtpkit.runtime.torch_backend import TorchBackend
    return TorchBackend(t, d if with_drafter else None, max_len=max_len, max_draft=8)


def _make_torch_graphs(t, d, tmp, max_len, with_drafter):
    from tests.conftest import with_cpu_graphs
    return with_cpu_graphs(_make_torch(t, d, tmp, max_len, with_drafter))


def _make_torch_cuda(t, d, tmp, max_len, with_drafter):
    import copy

    from mtpkit.runtime.torch_backend import TorchBackend
    tc = copy.deepcopy(t).cuda()
    dc = None
    if with_drafter:
        dc = copy.deepcopy(d)
        dc._target_embedding = None  # bound to the CUDA copy's embedding by the backend
        dc = dc.cuda()
    return TorchBackend(tc, dc, max_len=max_len, max_draft=8, cuda_graphs=True)


def _make_llamacpp(t, d, tmp, max_len, with_drafter):
    from mtpkit.export import gguf
    from mtpkit.model.load import save_drafter
    from mtpkit.runtime.llamacpp_backend import LlamaCppBackend
    from tests.tiny_gguf import write_gguf
    out = tmp / "gguf"
    if not (out / "target.gguf").exists():
        save_drafter(d, tmp / "drafter")
        gguf.export(str(write_gguf(t, tmp / "src.gguf")), str(tmp / "drafter"), out, quant="f32", drafter_quant="q8_0")
    return LlamaCppBackend(out / "target.gguf", out / "drafter.gguf" if with_drafter else None, max_len=max_len,
                           threads=1)


def _make_mlx(t, d, tmp, max_len, with_drafter):
    from mtpkit.export.mlx import write_target
    from mtpkit.model.load import save_drafter
    from mtpkit.runtime.mlx_backend import MLXBackend
    out = tmp / "mlx"
    if not (out / "target").exists():
        write_target(t, None, out / "target", dtype="float32")
        save_drafter(d, out / "drafter")
    return MLXBackend(out / "target", out / "drafter" if with_drafter else None, max_len=max_len)


def _make_onnx(t, d, tmp, max_len, with_drafter):
    from mtpkit.export.onnx import write_files
    from mtpkit.runtime.onnx_backend import ONNXBackend
    out = tmp / "onnx"
    if not (out / "onnx.json").exists():
        out.mkdir()
        write_files(t, d, None, out, "none")
    return ONNXBackend(out, out / "drafter.onnx" if with_drafter else None, max_len=max_len, threads=1)


def _make_coreml(t, d, tmp, max_len, with_drafter):
    """Off macOS the backend runs its steps on the exported programs evaluated with numpy (mil_eval: the test harness
    the exporter checks with); float32 compute here, the float16 programs are checked in tests/test_coreml.py."""
    from mtpkit.export.coreml import write_files
    from mtpkit.export.mil_eval import EvaluatedPrograms
    from mtpkit.runtime.coreml_backend import CoreMLBackend
    out = tmp / "coreml"
    if not (out / "coreml.json").exists():
        out.mkdir()
        write_files(t, d, None, out, "none", context=144, k=5, precision="float32", prefill=16)  # PROMPT: 16 + 5
    return CoreMLBackend(out, with_drafter, max_len=max_len, programs=EvaluatedPrograms(out))


def test_every_registered_backend_has_a_maker():
    assert set(BACKENDS) == {name.removeprefix("_make_") for name in globals()
                             if name.startswith("_make_") and not name.endswith(("_cuda", "_graphs"))}


@pytest.fixture(scope="module")
def _cache(tmp_path_factory):
    return {}


# Core ML runs its programs op by op in numpy here (seconds per test, minutes for the chi-square): its dense-head
# pair and its chi-square run with the slow tests (CI runs both)
SLOW_PAIRS = {("coreml", "dense")}
SLOW_IDS = ("test_sampled_loop_emits_the_backends_own_target_distribution[coreml-",
            # the graphs' stand-in draws what the torch pair draws (the fused-vs-generic tests show it step by step)
            "test_sampled_loop_emits_the_backends_own_target_distribution[torch_graphs-")


@pytest.fixture(params=[pytest.param((b, h), marks=[pytest.mark.slow] if (b, h) in SLOW_PAIRS else [])
                        for b in RUNS for h in HEADS], ids=lambda p: f"{p[0]}-{p[1]}")
def pair(request, _cache, tmp_path_factory):
    """(reference target, reference drafter, make(max_len=64, drafter=True) -> backend) for one backend and head."""
    name, head = request.param
    if importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"backend {name} is not installed")
    key = (name, head)
    if key not in _cache:
        _cache[key] = (*_reference(head), tmp_path_factory.mktemp(f"{name}-{head}"))
    t, d, tmp = _cache[key]
    maker = globals()[f"_make_{name}"]
    made: list = []

    def make(max_len: int = 64, drafter: bool = True):
        be = maker(t, d, tmp, max_len, drafter)
        made.append(be)
        return be
    yield name, t, d, make
    for be in made:
        be.close()


def _np(x) -> np.ndarray:
    return x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)


def _close(got, want, tol: float, what: str) -> None:
    got, want = _np(got), _np(want)
    assert got.shape == want.shape, what
    err = np.abs(got - want).max()
    assert err <= tol * max(np.abs(want).max(), 1.0), f"{what}: max |diff| {err:.3g}"


def _tokens(be, n_new, prompt, k=None, eos=(), min_confidence=None, gate=True, **sampling):
    params = GenerationParams(n_new, SamplingParams(**sampling), k or 1, seed=sampling.pop("seed", 0),
                              min_confidence=min_confidence, gate=gate)
    rounds = list(generate(be, prompt, params, set(eos), use_drafter=k is not None))
    return [x for r in rounds for x in r.tokens], rounds


PROMPT = [2] + list(range(270, 290))  # 21 tokens: past the window of 8


def test_target_and_drafter_step_match_the_reference(pair):
    name, t, d, make = pair
    be = make()
    tol = TOL[name]
    with torch.no_grad():
        cache = t.new_cache(64)
        o = t(torch.tensor([PROMPT]), cache)
    logits, h = be.start(PROMPT)
    _close(logits, o.logits[0, -1], tol, "prefill logits")
    _close(h, o.hidden[0, -1], tol, "prefill hidden")
    # one drafter step from the reference's own h: only the backend's K/V and arithmetic differ
    tok = int(o.logits[0, -1].argmax())
    with torch.no_grad():
        ref = ref_draft_step(t, d, torch.tensor([tok]), o.hidden[:, -1], cache)
    h_ref = o.hidden[0, -1].to(be.device) if name.startswith("torch") else _np(o.hidden[0, -1])
    s = be.draft_step(be.ops.tokens([tok]), h_ref)
    _close(s.h, ref.hidden[0, 0], tol, "drafter next h")
    if ref.ids is None:
        assert s.ids is None
        _close(s.logits, ref.logits[0, 0], tol, "drafter logits")
    else:  # the same candidates (their order follows router scores, which K/V rounding may swap at near-ties)
        got_ids, want_ids = _np(s.ids).astype(int), ref.ids[0, 0].numpy()
        assert sorted(got_ids.tolist()) == sorted(want_ids.tolist())
        _close(_np(s.logits)[np.argsort(got_ids)], _np(ref.logits[0, 0])[np.argsort(want_ids)], tol,
               "drafter candidate logits")
    # verify 3 tokens, roll back 2 of them, verify again: what a full forward over the kept tokens gives
    more = [271, 5, 6]
    lv, hv = be.verify(be.ops.tokens(more))
    be.rollback(len(PROMPT) + 1)
    lw, _ = be.verify(be.ops.tokens([9, 10]))
    with torch.no_grad():
        full = t(torch.tensor([PROMPT + more[:1] + [9, 10]]))
        want_v = t(torch.tensor([PROMPT + more]))
    _close(lv, want_v.logits[0, -3:], tol, "verify logits")
    _close(hv, want_v.hidden[0, -3:], tol, "verify hidden")
    _close(lw, full.logits[0, -2:], tol, "logits after rollback")
    assert be.length == len(PROMPT) + 3


@pytest.mark.parametrize("k", [1, 3, 5])
def test_greedy_speculative_equals_plain_past_the_window(pair, k):
    _, t, d, make = pair
    be = make(128)
    for prompt in ([2, 270, 271, 272], PROMPT):
        plain, _ = _tokens(be, 5 * WINDOW, prompt)
        spec, rounds = _tokens(be, 5 * WINDOW, prompt, k=k)  # the online gate picks 0..k per round
        assert spec == plain, f"k={k}"
        assert len(rounds) - 1 <= len(plain)
        fixed, rounds = _tokens(be, 5 * WINDOW, prompt, k=k, gate=False)
        assert fixed == plain and rounds[1].drafted == k and all(r.drafted for r in rounds[1:-1])  # k, budget allowing
        adaptive, _ = _tokens(be, 5 * WINDOW, prompt, k=k, min_confidence=0.2)
        assert adaptive == plain


def test_oracle_drafts_get_accepted_and_stay_lossless(pair):
    """Long accepted runs (the real tiny drafters get few accepted) with random rejections, and an EOS that
    arrives inside an accepted draft: the output stops right there."""
    _, t, d, make = pair
    be = make(128, drafter=False)
    plain, _ = _tokens(be, 6 * WINDOW, PROMPT)
    for seed in range(2):
        oracle = OracleDrafter(be, plain, len(PROMPT), corrupt=0.25, seed=seed)
        got, rounds = _tokens(oracle, 6 * WINDOW, PROMPT, k=5, gate=False)  # 5 drafts every round
        assert got == plain and sum(r.accepted for r in rounds) > 2 * WINDOW
    j = next(j for j in range(6, len(plain)) if plain.index(plain[j]) == j)  # first seen mid-way
    oracle = OracleDrafter(be, plain, len(PROMPT), corrupt=0.0, seed=0)
    got, rounds = _tokens(oracle, 6 * WINDOW, PROMPT, k=5, eos={plain[j]}, gate=False)
    assert got == plain[:j + 1] and rounds[-1].finish == "eos"


def _started_with(pair, fused: str):
    """A backend that has the fused path `fused`, after a prefill of PROMPT -> (backend, bonus token, h)."""
    be = pair[3]()
    if getattr(be, fused) is None:
        pytest.skip("this backend drafts through the generic policy only")
    logits, h = be.start(PROMPT)
    return be, be.ops.tokens([be.ops.to_list(be.ops.argmax(logits))[0]]), h


def test_fused_greedy_draft_equals_the_generic_policy(pair):
    be, bonus, h = _started_with(pair, "fused_greedy_draft")
    fused = be.ops.to_list(be.fused_greedy_draft(bonus, h, 5))
    assert be.ops.to_list(draft(be, bonus, h, 5, SamplingParams(), fused=False).tokens) == fused


def test_fused_sampled_draft_equals_the_generic_policy(pair):
    """Same uniforms -> same drafts, picks and candidate ids, and the same draft distributions q."""
    be, bonus, h = _started_with(pair, "fused_sampled_draft")
    for sp in (SamplingParams(temperature=0.8), SamplingParams(temperature=1.0, top_p=0.9, top_k=20)):
        fused = draft(be, bonus, h, 5, sp, be.ops.generator(3))
        generic = draft(be, bonus, h, 5, sp, be.ops.generator(3), fused=False)
        assert be.ops.to_list(fused.tokens) == be.ops.to_list(generic.tokens)
        assert be.ops.to_list(fused.picks) == be.ops.to_list(generic.picks)
        assert (fused.ids is None) == (generic.ids is None)
        if fused.ids is not None:
            assert be.ops.to_list(fused.ids) == be.ops.to_list(generic.ids)
        _close(fused.q, generic.q, 1e-6, "draft probabilities")


def test_fused_accept_equals_the_generic_rule(pair):
    """Sampled acceptance as the backend's graph = sampling.VERIFY's rule (block verification and token-wise
    rejection) with the same uniforms, for drafts from the fused draft (read in place) and from the generic policy
    (copied in), all-accepted and rejected rounds alike, several k through one graph per sampling settings and rule."""
    be, bonus, h = _started_with(pair, "fused_accept")
    ops, p0 = be.ops, be.length
    seen = set()
    for sp in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9, top_k=20)):
        for k, fused_draft, seed in [(1, True, 0), (3, True, 1), (5, True, 2), (5, False, 3), (5, True, 4)]:
            d = draft(be, bonus, h, k, sp, ops.generator(seed), fused=fused_draft)
            logits, _ = be.verify(ops.cat([bonus, d.tokens]))
            for s in range(6):
                u = ops.rand(ops.generator(100 + s), d.tokens.numel() + 1, like=h)
                if s == 0:
                    u = u * 0  # a draft is accepted wherever the target gives it any probability
                for verify, rule in VERIFY.items():
                    want = ops.to_list(ops.cat(rule(ops, d.tokens, d.picks, d.q, d.ids, logits, sp, u)))
                    got = ops.to_list(ops.cat(be.fused_accept(d, logits, sp, u, verify)))
                    assert got == want, (sp, k, s, verify)
                    seen.add(want[0] == d.tokens.numel())
            be.rollback(p0)
    assert seen == {True, False}  # both all-accepted and rejected rounds were compared


def test_verify_rows_equal_verify(pair):
    """Backend.verify_rows: the same cache and hidden as verify, and each row's logits, computed when read, verify's
    (to the backend's tolerance; bit for bit on the real target's Q8_0 head, where sampled generations at a fixed k
    through either then draw the same tokens: tests/test_real_target.py) and the same whichever rows are read first (a row's logits
    do not depend on the block that computed it)."""
    be, bonus, h = _started_with(pair, "verify_rows")
    ops, p0 = be.ops, be.length
    toks = ops.cat([bonus, ops.tokens([271, 5, 6, 7])])
    want_logits, want_hidden = be.verify(toks)
    seen = None
    for order in ([0, 1, 2, 3, 4], [3, 0, 4, 1, 2], [1, 0], [2, 3, 4, 0]):  # any order: blocks and single rows
        be.rollback(p0)
        rows, hidden = be.verify_rows(toks)
        assert be.length == p0 + 5 and np.array_equal(_np(hidden), _np(want_hidden))
        got = {i: _np(rows(i)) for i in order}
        seen = seen or got
        assert all(np.array_equal(got[i], seen[i]) for i in order), order
    _close(np.stack([seen[i] for i in range(5)]), want_logits, TOL[pair[0]], "rows vs verify")


def test_tree_rows_equal_chains_and_keep_moves_the_branch(pair):
    """A draft tree's verify (runtime/tree.py layout) gives each chain's rows as verifying that chain alone, and after
    keep() the next step computes what it computes after that chain alone."""
    be, bonus, h = _started_with(pair, "verify_tree")
    ops, p0, tol = be.ops, be.length, TOL[pair[0]]
    w, k = 3, 2
    drafts = [280, 7, 291, 13, 40, 270]  # step-major: chain c = drafts[c::w]
    tree = ops.cat([bonus, ops.tokens(drafts)])
    lt, ht = (x * 1 for x in be.verify_tree(tree, w))
    for c in range(w):
        be.rollback(p0)
        lc, hc = be.verify(ops.cat([bonus, ops.tokens(drafts[c::w])]))
        rows = [0, *kept_rows(w, c, k)]
        _close(lt[rows], lc, tol, f"chain {c}'s logits")
        _close(ht[rows], hc, tol, f"chain {c}'s hidden")
    for c, n in [(0, 2), (1, 1), (2, 2), (1, 0)]:
        be.rollback(p0)
        be.verify_tree(tree, w)
        be.keep(p0, kept_rows(w, c, n))
        assert be.length == p0 + 1 + n
        got = be.verify(ops.tokens([5, 6]))[0] * 1  # a copy (CUDA graphs: the graph's output, rewritten below)
        be.rollback(p0)
        be.verify(ops.cat([bonus, ops.tokens(drafts[c::w][:n])]))
        _close(got, be.verify(ops.tokens([5, 6]))[0], tol, f"after keeping chain {c}, {n} drafts")
    be.rollback(p0)


def test_fused_tree_draft_and_acceptance_equal_the_generic_policy(pair):
    """Same uniforms -> the same tree (tokens, picks, ids, valid, q) from the backend's graphs as from tree.draft_tree's
    steps, and the acceptance graph decides as tree.accept_tree, for accepted and rejected rounds, with the accepted
    chain judged by either rule (block verification, token-wise)."""
    be, bonus, h = _started_with(pair, "fused_tree_draft")
    ops, p0 = be.ops, be.length
    seen = set()
    for sp in (SamplingParams(temperature=1.0), SamplingParams(temperature=0.7, top_p=0.9, top_k=20)):
        for w, k, seed in [(2, 1, 0), (3, 3, 1), (4, 5, 2)]:
            generic = draft_tree(be, bonus, h, k, w, sp, ops.generator(seed), fused=False)
            fused = draft_tree(be, bonus, h, k, w, sp, ops.generator(seed))
            for what in ("tokens", "picks", "ids", "valid"):
                a, b = getattr(fused, what), getattr(generic, what)
                assert (a is None) == (b is None) and (a is None or ops.to_list(a) == ops.to_list(b)), what
            _close(fused.q, generic.q, 1e-6, "draft probabilities")
            logits, _ = be.verify_tree(fused.verify_tokens(ops, bonus), w)
            for s in range(6):
                u = ops.rand(ops.generator(100 + s), w + k + 1, like=h) * (1 if s > 1 else 0)
                verify = ("block", "token")[s % 2]
                want = ops.to_list(ops.cat(accept_tree(ops, fused, logits, sp, u, verify=verify)))
                got = ops.to_list(ops.cat(be.fused_accept_tree(fused, logits, sp, u, verify)))
                assert got == want, (sp, w, k, s, verify)
                seen.add(want[0] < w)
            be.rollback(p0)
    assert seen == {True, False}


def test_fused_plain_equals_single_steps(pair):
    """n plain steps with no host sync between them pick what n single verify steps pick from their logits (argmax,
    or ops.pick of probs with the same uniforms), advance the cache by n and return the last step's hidden."""
    be, bonus, h = _started_with(pair, "fused_plain")
    ops, p0 = be.ops, be.length
    for sp in (SamplingParams(), SamplingParams(temperature=0.9, top_k=20)):
        u = None if sp.greedy else ops.rand(ops.generator(1), 7, like=h)
        toks, last = be.fused_plain(bonus, 7, sp, u)
        fused, last = ops.to_list(toks), _np(last)
        assert be.length == p0 + 7
        be.rollback(p0)
        single, tok = [], bonus
        for i in range(7):
            logits, hidden = be.verify(tok)
            j = ops.argmax(logits[0]) if sp.greedy else ops.pick(probs(ops, logits[0], sp), u[i])
            single.append(ops.to_list(j)[0])
            tok = ops.tokens(single[-1:])
        assert fused == single, sp
        _close(last, hidden[0], 0.0, "the last step's hidden")
        be.rollback(p0)


def test_rollback_and_context_errors(pair):
    _, t, d, make = pair
    be = make(32)
    be.start(PROMPT[:10])
    with pytest.raises(MtpkitError, match="roll ?back"):
        be.rollback(11)  # forward: nothing to keep
    with pytest.raises(MtpkitError, match="context full"):
        be.verify(be.ops.tokens(list(range(3, 26))))
    with pytest.raises(MtpkitError, match="does not fit"):
        be.start(list(range(3, 40)))
    # a generation that fills the context stops cleanly ("context"), still equal to plain decoding
    spec, rounds = _tokens(be, 100, PROMPT[:10], k=5)
    plain, _ = _tokens(make(32, drafter=False), 100, PROMPT[:10])
    assert spec == plain and rounds[-1].finish == "context" and len(spec) == 32 - 10 + 1


def chi2_999(df: int) -> float:
    """The 99.9 % quantile of chi-square with df degrees of freedom (Wilson-Hilferty; within 1 % for df >= 5)."""
    z = 3.0902
    return df * (1 - 2 / (9 * df) + z * (2 / (9 * df)) ** 0.5) ** 3


@pytest.mark.parametrize("branches", [1, 3])
def test_sampled_loop_emits_the_backends_own_target_distribution(pair, branches):
    """1,000 short generations, each: a sampled first token, then one speculative round of 3 drafts. The second
    emitted token must follow sum_t p(t) p(. | t), computed from the same backend's own logits. At T = 0.1 the
    tiny target puts ~0.4 on one token while its random drafter is flat: drafts are accepted sometimes (the
    ratio test) and rejected often (the residual max(0, p - q), over the candidates only for the centroid head).
    branches = 3: the round is a draft tree (runtime/tree.py), on backends that verify trees."""
    _, t, d, make = pair
    be = make(32)
    if branches > 1 and be.verify_tree is None:
        pytest.skip("this backend verifies no draft trees")
    sp = SamplingParams(temperature=0.1)
    prompt = [2, 270, 271]
    p1 = _np(probs(be.ops, be.start(prompt)[0], sp))
    expected = np.zeros(t.config.vocab_size)
    for tok in np.flatnonzero(p1 > 1e-6):
        expected += p1[tok] * _np(probs(be.ops, be.start(prompt + [int(tok)])[0], sp))
    n = 1000
    counts = np.zeros_like(expected)
    accepted = 0
    for seed in range(n):
        rounds = list(generate(be, prompt, GenerationParams(5, sp, 3, seed=seed, branches=branches), set()))
        counts[rounds[1].tokens[0]] += 1
        accepted += rounds[1].accepted
    assert accepted > 10  # the ratio test accepted drafts, the residual supplied the rest
    exp = n * expected / expected.sum()
    big = exp >= 5  # pool the cells expected below 5
    cells, want = np.append(counts[big], counts[~big].sum()), np.append(exp[big], exp[~big].sum())
    chi2 = float(((cells - want) ** 2 / want).sum())
    assert chi2 < chi2_999(len(cells) - 1), f"chi2 {chi2:.1f} over {len(cells) - 1} degrees of freedom"


def test_backend_info_is_typed(pair):
    name, t, d, make = pair
    info = make().info()
    assert info.name == name.removesuffix("_cuda").removesuffix("_graphs") and info.target_config.vocab_size == 300 and info.drafter_head in HEADS
    assert info.target_params > 0 and info.drafter_bytes > 0
    json.dumps(info.to_dict())


BLOCK_TORCH = """
import sys
sys.modules["torch"] = None  # `import torch` raises ImportError; find_spec("torch") says it is not installed
"""


@pytest.mark.parametrize("name", ["llamacpp", "mlx", "onnx"])
def test_exported_pairs_run_without_torch(name, tmp_path):
    """An app that runs an exported pair needs no torch: load, greedy speculative == plain, sampling, and the
    `mtpkit run` command, in a fresh process where importing torch fails."""
    import subprocess
    import sys
    if importlib.util.find_spec(NEEDS[name]) is None:
        pytest.skip(f"backend {name} is not installed")
    t, d = _reference("centroid")
    be = globals()[f"_make_{name}"](t, d, tmp_path, 64, True)
    be.close()
    target = tmp_path / {"llamacpp": "gguf/target.gguf", "mlx": "mlx/target", "onnx": "onnx/target.onnx"}[name]
    code = BLOCK_TORCH + f"""
import mtpkit
s = mtpkit.load({str(target)!r}, backend={name!r}, max_len=128)
plain = s.generate([2, 270, 271], max_new_tokens=30, use_drafter=False).tokens
assert s.generate([2, 270, 271], max_new_tokens=30, num_draft_tokens=4).tokens == plain
assert len(s.generate([2, 270], max_new_tokens=10, temperature=1.0, num_draft_tokens=3).tokens) == 10
if s.tokenizer is not None:  # the tiny MLX export has none: text prompts need one
    from typer.testing import CliRunner

    from mtpkit.cli import app
    r = CliRunner().invoke(app, ["run", "abc", "--backend", {name!r}, "--target", {str(target)!r},
                                 "--max-new-tokens", "8", "--compare", "--json"])
    assert r.exit_code == 0, r.output
assert sys.modules["torch"] is None
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
