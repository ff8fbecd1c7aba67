"""The decoding methods a bench compares: ours (plain, speculative) and the baselines a user would pick instead.

Every method turns prompt token ids into a `Run` with the same definitions, so numbers line up:
  tok/s  = (new tokens - 1) / seconds after the first new token (the prefill and first token excluded)
  tau    = (new tokens - 1) / decode forwards of the target (1.0 for plain decoding)
Baselines are built only when their package is installed; transformers and llama_cpp are imported here.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtpkit.errors import MtpkitError

LOOKUP_TOKENS = 10  # prompt-lookup draft length: the default of llama-cpp-python's LlamaPromptLookupDecoding


@dataclass
class Run:
    tokens: list[int]
    decode_s: float  # seconds from the first new token to the last
    forwards: int | None  # target forwards after the prefill; None if the method does not expose them
    drafted_per_position: list[int] = field(default_factory=list)
    accepted_per_position: list[int] = field(default_factory=list)
    draft_s: float | None = None  # time spent drafting (ours only)
    drafted: int = 0  # draft tokens proposed
    verify_s: float | None = None  # time in target decode forwards (ours only)
    accepted: int = 0  # draft tokens accepted, for methods that report only totals (llama-server)

    @property
    def tok_per_s(self) -> float:
        n = len(self.tokens) - 1
        return n / self.decode_s if n > 0 and self.decode_s > 0 else 0.0


@dataclass
class Method:
    """One way to decode. `reference` names the method whose greedy output this one must reproduce
    (`must`) or is expected to reproduce up to kernel numerics (not `must`)."""
    name: str
    description: str
    weights: str  # what weights it runs (e.g. "ours fp32", "GGUF Q4_K_M")
    weights_mb: float
    reference: str | None = None
    must_match: bool = False

    def run(self, ids: list[int], max_new_tokens: int) -> Run:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class Sampling:
    temperature: float
    seed: int
    eos: set[int]


def _sync(device) -> None:
    """Wait for a CUDA device (a torch.device or a name like "cuda:0"); nothing on other devices."""
    if str(device).startswith("cuda"):
        import torch
        torch.cuda.synchronize(device)


@dataclass
class OurLoop(Method):
    session: Any = None
    use_drafter: bool = False
    gen: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"  # the backend's (BackendInfo.device): runs end with a CUDA sync there

    def run(self, ids: list[int], max_new_tokens: int) -> Run:
        from mtpkit.api import Stats
        st = Stats()
        toks: list[int] = []
        t_first = None
        for r in self.session.stream(ids, max_new_tokens=max_new_tokens, stats=st, use_drafter=self.use_drafter,
                                     **self.gen):
            toks += r.tokens
            if r.prefill:
                t_first = time.perf_counter()
        _sync(self.device)
        decode_s = time.perf_counter() - t_first
        return Run(toks, decode_s, st.target_forwards, st.drafted_per_position, st.accepted_per_position,
                   st.draft_s, st.drafted, st.verify_s)


class _Clock:
    """A transformers streamer that stamps each put(): the prompt, then one put per forward."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@dataclass
class HFGenerate(Method):
    model: Any = None
    lookup: int | None = None  # prompt_lookup_num_tokens, None = plain generate
    sampling: Sampling | None = None

    def run(self, ids: list[int], max_new_tokens: int) -> Run:
        import torch
        dev = self.model.device
        x = torch.tensor([ids], device=dev)
        sp = self.sampling
        kw: dict[str, Any] = dict(max_new_tokens=max_new_tokens, eos_token_id=sorted(sp.eos), pad_token_id=0)
        if sp.temperature > 0:
            torch.manual_seed(sp.seed)
            kw.update(do_sample=True, temperature=sp.temperature, top_k=0, top_p=1.0)
        else:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        if self.lookup:
            kw["prompt_lookup_num_tokens"] = self.lookup
        clock = _Clock()
        with torch.no_grad():
            out = self.model.generate(x, streamer=clock, **kw)
        _sync(dev)
        end = time.perf_counter()
        toks = out[0, len(ids):].tolist()
        # times[0] = the prompt, times[1] = the first new token (prefill), then one put per forward
        t_first = clock.times[1] if len(clock.times) > 1 else end
        return Run(toks, end - t_first, max(len(clock.times) - 2, 0))


@dataclass
class LlamaCpp(Method):
    llm: Any = None
    lookup: Any = None  # a _CountingLookup, or None for plain decoding
    sampling: Sampling | None = None

    def run(self, ids: list[int], max_new_tokens: int) -> Run:
        sp = self.sampling
        if self.lookup is not None:
            self.lookup.calls = 0
        self.llm.reset()
        kw = dict(top_k=1, top_p=1.0, min_p=0.0, temp=0.0) if sp.temperature <= 0 else dict(
            top_k=0, top_p=1.0, min_p=0.0, temp=sp.temperature)
        if sp.temperature > 0:
            self.llm.set_seed(sp.seed)
        toks: list[int] = []
        t_first = None
        for tok in self.llm.generate(ids, repeat_penalty=1.0, reset=True, **kw):
            toks.append(int(tok))
            if t_first is None:
                t_first = time.perf_counter()
            if tok in sp.eos or len(toks) >= max_new_tokens:
                break
        decode_s = time.perf_counter() - t_first
        forwards = self.lookup.calls if self.lookup is not None else len(toks) - 1
        return Run(toks, decode_s, forwards)


def _lookup_class():
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    class _CountingLookup(LlamaPromptLookupDecoding):
        """llama-cpp-python's prompt lookup, counting its calls: one per verify forward after the prefill."""
        calls = 0

        def __call__(self, input_ids, /, **kw):
            self.calls += 1
            return super().__call__(input_ids, **kw)

    return _CountingLookup


def our_methods(session, gen: dict[str, Any], info: dict[str, Any], gate: str = "on", branches: int = 1,
                rows: str = "lazy", pipeline: str = "on", verify: str = "block") -> list[Method]:
    """Plain and speculative decoding through our loop; `info` = session.backend.info(). gate: on = speculative
    with the online gate (the default), off = speculative drafting k every round, both = the two side by side.
    branches > 1 (sampling): speculative drafts trees of that many branches, and `speculative_chain` (one chain a
    round, same gate setting) runs beside it. rows: lazy = a verify computes the target's head for the rows acceptance
    reads where the backend can (Backend.verify_rows), all = for every row, both = `speculative_all_rows` beside.
    `plain` is the backend's own step (llama.cpp's decode: lazy_rows off); where the backend has verify_rows and rows
    is not all, `plain_rows` = plain decoding through it (llama.cpp: the head by q8_head.c), greedy-checked against
    plain: speculation's own gain is speculative over plain_rows. pipeline: on = drafting rounds queued ahead of the
    host where the backend can (Backend.pipeline: CUDA graphs), off = one round at a time, both = `speculative_sync`
    (one at a time) beside. verify (sampling: a round's chain, or a tree's accepted one): block (block
    verification) | token | both = `speculative_token` (token-wise rejection) beside."""
    mb, dmb = info.target_bytes / 2**20, info.drafter_bytes / 2**20
    gen = dict(gen, lazy_rows=rows != "all", pipeline=pipeline != "off", verify="token" if verify == "token" else "block")
    w = f"mtpkit {info.name} {info.dtype}"
    out: list[Method] = [OurLoop("plain", "mtpkit loop, no drafter (the baseline of every speedup)", w, mb,
                                 session=session, use_drafter=False, gen=dict(gen, lazy_rows=False), device=info.device)]
    if rows != "all" and session.backend.verify_rows is not None:  # llama.cpp: plain steps with mtpkit's row head
        out.append(OurLoop("plain_rows", "mtpkit loop, no drafter, each step's head by the backend's row head "
                           "(verify_rows: q8_head.c on llama.cpp)", w, mb, reference="plain", must_match=True,
                           session=session, use_drafter=False, gen=gen, device=info.device))
    if gate in ("on", "both"):
        out.append(OurLoop("speculative", "mtpkit shared-cache speculative loop, online gate picks k per round",
                           f"{w} + drafter", mb + dmb, reference="plain", must_match=True, session=session,
                           use_drafter=True, gen=dict(gen, gate=True), device=info.device))
    if gate in ("off", "both"):
        out.append(OurLoop("speculative" if gate == "off" else "speculative_fixed_k",
                           "mtpkit shared-cache speculative loop, k drafts every round (no gate)",
                           f"{w} + drafter", mb + dmb, reference="plain", must_match=True, session=session,
                           use_drafter=True, gen=dict(gen, gate=False), device=info.device))
    spec = [m for m in out if m.use_drafter]
    if branches > 1:
        for m in spec:
            m.gen = dict(m.gen, branches=branches)
            m.description += f", draft trees of {branches} branches"
        out.append(OurLoop("speculative_chain", "mtpkit shared-cache speculative loop, one chain a round",
                           f"{w} + drafter", mb + dmb, reference="plain", must_match=True, session=session,
                           use_drafter=True, gen=dict(gen, gate=gate != "off"), device=info.device))
    for name, what, flags, on in (
            ("speculative_all_rows", "the target's head on every verify row", {"lazy_rows": False}, rows == "both"),
            ("speculative_sync", "one round at a time (no rounds queued ahead of the host)", {"pipeline": False},
             pipeline == "both"),
            ("speculative_token", "token-wise rejection (not block verification)", {"verify": "token"},
             verify == "both")):
        if on:  # `speculative` with one setting changed
            out.append(OurLoop(name, f"mtpkit shared-cache speculative loop, {what}", f"{w} + drafter", mb + dmb,
                               reference="plain", must_match=True, session=session, use_drafter=True,
                               gen=dict(spec[0].gen, **flags), device=info.device))
    return out


def torch_methods(target: str, gen: dict[str, Any], threads: int | None) -> list[Method]:
    """Plain decoding of the float32 reference (our loop on the torch backend, CPU) for a run on an exported pair:
    the figure the export has to beat."""
    import mtpkit
    s = mtpkit.load(target, drafter="none", backend="torch", device="cpu", threads=threads)
    info = s.backend.info()
    return [OurLoop("torch_plain", "mtpkit loop on the torch backend (the reference), no drafter",
                    f"mtpkit torch {info.dtype}", info.target_bytes / 2**20, reference="plain", session=s,
                    use_drafter=False, gen=gen, device=info.device)]


def hf_methods(session, sampling: Sampling, lookup_tokens: int) -> list[Method]:
    """transformers `generate` on the same weights (dtype and device as ours): plain and prompt lookup."""
    from mtpkit.hf import hf_model
    t = session.backend.target
    dev = session.backend.device
    dtype = t.embed_tokens.weight.dtype
    model = hf_model(t.config, t.state_dict(), dtype=dtype, device=dev, attn="sdpa")
    mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    w = f"same weights, transformers {str(dtype).removeprefix('torch.')}"
    return [
        HFGenerate("hf_generate", "transformers generate (greedy/sampling)", w, mb, reference="plain",
                   model=model, sampling=sampling),
        HFGenerate("hf_prompt_lookup", f"transformers generate, prompt_lookup_num_tokens={lookup_tokens}", w, mb,
                   reference="hf_generate", must_match=True, model=model, lookup=lookup_tokens, sampling=sampling),
    ]


def llamacpp_methods(gguf: str, threads: int, n_ctx: int, sampling: Sampling, lookup_tokens: int,
                     gpu: bool) -> list[Method]:
    """llama-cpp-python on the target's GGUF: plain and LlamaPromptLookupDecoding (which makes it compute
    logits for every position, as llama-cpp-python requires for any draft model)."""
    from llama_cpp import Llama

    from mtpkit.runtime.llamacpp_backend import quiet_llama_logs
    quiet_llama_logs()
    mb = os.path.getsize(gguf) / 2**20
    w = f"GGUF {os.path.basename(gguf)}" + (", all layers on the GPU" if gpu else ", CPU")
    common = dict(model_path=gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                  seed=sampling.seed, n_gpu_layers=-1 if gpu else 0)
    try:
        plain = Llama(**common)
        lookup = _lookup_class()(num_pred_tokens=lookup_tokens)
        # logits_all=True by hand: llama-cpp-python 0.3.36 switches it on for a draft model only after sizing its
        # score buffer for one batch, so any prompt longer than n_batch (512) failed with a numpy broadcast error
        spec = Llama(**common, draft_model=lookup, logits_all=True)
    except (ValueError, RuntimeError) as e:
        raise MtpkitError(f"llama-cpp-python cannot load {gguf}: {e}") from None
    return [
        LlamaCpp("llamacpp", "llama-cpp-python generate", w, mb, reference="plain", llm=plain, sampling=sampling),
        LlamaCpp("llamacpp_prompt_lookup", f"llama-cpp-python LlamaPromptLookupDecoding(num_pred_tokens={lookup_tokens})",
                 w, mb, reference="llamacpp", must_match=True, llm=spec, lookup=lookup, sampling=sampling),
    ]


@dataclass
class MlxLm(Method):
    model: Any = None
    draft_model: Any = None  # None = mlx-lm's plain generate_step
    num_draft: int = 0
    sampling: Sampling | None = None

    def run(self, ids: list[int], max_new_tokens: int) -> Run:
        import mlx.core as mx
        from mlx_lm.generate import generate_step, speculative_generate_step
        from mlx_lm.sample_utils import make_sampler
        sp = self.sampling
        if sp.temperature > 0:
            mx.random.seed(sp.seed)
        sampler = make_sampler(temp=max(sp.temperature, 0.0))
        prompt = mx.array(ids)
        if self.draft_model is None:
            gen = ((tok, None, False) for tok, _ in generate_step(prompt, self.model, max_tokens=max_new_tokens,
                                                                    sampler=sampler))
        else:
            gen = speculative_generate_step(prompt, self.model, self.draft_model, num_draft_tokens=self.num_draft,
                                            max_tokens=max_new_tokens, sampler=sampler)
        toks: list[int] = []
        t_first, target_tokens = None, 0
        for tok, _, from_draft in gen:
            toks.append(int(tok))
            target_tokens += not from_draft
            if t_first is None:
                t_first = time.perf_counter()
            if tok in sp.eos or len(toks) >= max_new_tokens:
                break
        # every target forward yields exactly one token that is not from the draft; the first is the prefill's
        return Run(toks, time.perf_counter() - t_first, max(target_tokens - 1, 0))


def mlx_lm_methods(target_dir: str, sampling: Sampling, num_draft: int, draft_layers: int) -> list[Method]:
    """mlx-lm itself on the exported target: plain `generate_step`, and `speculative_generate_step` with a
    separate draft model built without training: the target's first `draft_layers` layers + its norm and head
    (mlx-lm's speculative loop needs a draft model; none smaller than Gemma 3 270M is available)."""
    from mlx_lm.utils import load_model
    model, _ = load_model(Path(target_dir))
    draft, _ = load_model(Path(target_dir))
    draft.model.layers = draft.model.layers[:draft_layers]
    draft.args.num_hidden_layers = draft_layers
    mb = Path(target_dir, "model.safetensors").stat().st_size / 2**20
    w = "mlx-lm, the exported target"
    return [
        MlxLm("mlx_lm", "mlx-lm generate_step (its own RotatingKVCache)", w, mb, reference="plain",
              model=model, sampling=sampling),
        MlxLm("mlx_lm_speculative", f"mlx-lm speculative_generate_step, draft = the target's first {draft_layers} "
              f"layers, {num_draft} draft tokens", w + f" + {draft_layers}-layer draft", mb,
              reference="mlx_lm", must_match=True, model=model, draft_model=draft, num_draft=num_draft,
              sampling=sampling),
    ]
