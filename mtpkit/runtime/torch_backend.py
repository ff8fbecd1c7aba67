"""The torch backend: the reference target and drafter themselves, on CPU or CUDA.

On CUDA (`cuda_graphs=True`) each verify width 1..k+1 and the greedy draft steps are captured once as
CUDA graphs over the static KV cache and replayed: one launch per target forward, one per draft step
plus one per round for the drafter's attention inputs, and the only host syncs per round are the ones
acceptance needs. Positions and lengths enter the graphs as device tensors (GemmaModel.step and the
cache's ring arithmetic are tensor-only for this).
`compile` runs captured steps through torch.compile first (inductor, no cudagraphs of its own): a step
of a small model is hundreds of tiny kernels, and fusing them is most of its time. "drafter" compiles
the draft steps only; "all" the target's forwards too, for plain decoding as well. Only "drafter" keeps
greedy speculative output equal to plain: compiled verify rows are not bitwise what compiled single
steps compute (H100 bench: 12/16 and 10/16 prompts identical), the eager ones are.
"""

from __future__ import annotations

import time

import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.drafter import DrafterModel, DraftOutput, target_kv
from mtpkit.model.gemma import GemmaModel
from mtpkit.runtime.backend import Draft
from mtpkit.runtime.sampling import SamplingParams, probs, sample

COMPILE = ("drafter", "all")  # what TorchBackend(compile=...) compiles


class TorchBackend:
    def __init__(self, target: GemmaModel, drafter: DrafterModel | None = None, *, max_len: int = 4096,
                 max_draft: int = 16, cuda_graphs: bool | None = None, compile: str | None = None):
        p = target.embed_tokens.weight
        self.device = p.device
        self.target, self.drafter = target, drafter
        self.vocab_size = target.config.vocab_size
        self.max_len = max_len
        self.has_drafter = drafter is not None
        self.max_draft = max_draft
        # a verify of k + 1 tokens must fit a sliding ring, and rollback undoes up to k positions
        self.cache = target.new_cache(max_len, slack=max(64, max_draft + 1))
        if drafter is not None and not drafter.is_bound:
            drafter.bind_target(target.embed_tokens.weight)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise MtpkitError("cuda_graphs needs a CUDA device")
        self.compile: str | None = None
        self._graphs = _Graphs(self) if self.cuda_graphs else None
        if compile:
            self.enable_compile(compile)

    def enable_compile(self, what: str = "drafter") -> None:
        """Capture torch.compile'd steps from now on: "drafter" or "all" (see the module docstring).
        Graphs captured so far are dropped."""
        if what not in COMPILE:
            raise MtpkitError(f"compile must be one of {', '.join(COMPILE)}, got {what!r}")
        if not self.cuda_graphs:
            raise MtpkitError("compile needs cuda_graphs (it compiles the steps the CUDA graphs capture)")
        self.compile = what
        self._graphs = _Graphs(self)

    @property
    def length(self) -> int:
        return self.cache.length

    def describe(self) -> dict:
        """What runs: sizes and dtype of target and drafter (for benches and the speedup predictor)."""
        t, d = self.target, self.drafter
        return {"backend": "torch", "dtype": str(t.embed_tokens.weight.dtype).removeprefix("torch."),
                "target_params": sum(p.numel() for p in t.parameters()),
                "target_bytes": sum(p.numel() * p.element_size() for p in t.parameters()),
                "embedding_params": t.embed_tokens.weight.numel(), "target_config": t.config,
                "drafter_config": d.config if d is not None else None,
                "drafter_params": sum(p.numel() for p in d.parameters()) if d is not None else 0,
                "drafter_bytes": sum(p.numel() * p.element_size() for p in d.parameters()) if d is not None else 0}

    # ------------------------------------------------------------------ target
    @torch.inference_mode()
    def start(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt.numel() >= self.max_len:
            raise MtpkitError(f"prompt of {prompt.numel()} tokens does not fit the context ({self.max_len})")
        self.cache.reset()
        out = self.target(prompt.to(self.device)[None], self.cache)
        return out.logits[0, -1], out.hidden[0, -1]

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, start = tokens.numel(), self.cache.length
        if start + n > self.max_len:
            raise MtpkitError(f"context full: {start + n} positions > {self.max_len}")
        if self._graphs is not None:
            logits, hidden = self._graphs.verify(tokens, start)
            self.cache.advance(start, n)
            return logits, hidden
        out = self.target(tokens[None], self.cache)
        return out.logits[0], out.hidden[0]

    def rollback(self, length: int) -> None:
        self.cache.rollback(length)

    # ------------------------------------------------------------------ drafter
    def _step(self, token: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, kv, attn: dict) -> DraftOutput:
        """One drafter step: token [], h [d_t] -> DraftOutput with B = T = 1 (attn: the round's attention_inputs)."""
        emb = self.target.embed(token.view(1, 1))
        return self.drafter(emb, h.view(1, 1, -1).to(emb.dtype), q_pos, kv, attn)

    @staticmethod
    def _argmax(out: DraftOutput) -> torch.Tensor:
        """The greedy draft token as a 0-d device tensor (no host sync; centroid head: among its candidates)."""
        best = out.logits[0, 0].argmax()
        return best if out.ids is None else out.ids[0, 0].gather(0, best.view(1)).view(())

    def _draft_inputs(self, q_pos: torch.Tensor) -> tuple[dict, dict]:
        """(kv, attn) of a draft round querying at q_pos [1] (a device tensor: CUDA-graph safe)."""
        kv = target_kv(self.cache, self.target.config, q_pos[0])
        return kv, self.drafter.attention_inputs(q_pos, kv)

    def _greedy_step(self, tok: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, kv: dict, attn: dict
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy draft step on device: (token [], h [d_t]) -> (next token [], next h [d_t])."""
        out = self._step(tok, h, q_pos, kv, attn)
        return self._argmax(out), out.hidden[0, 0]

    def _greedy_drafts(self, token: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, k: int) -> torch.Tensor:
        """k greedy draft tokens [k], all on device (no host sync)."""
        kv, attn = self._draft_inputs(q_pos)
        toks = []
        tok = token.reshape(())
        for _ in range(k):
            tok, h = self._greedy_step(tok, h, q_pos, kv, attn)
            toks.append(tok)
        return torch.stack(toks)

    @torch.inference_mode()
    def draft(self, token: torch.Tensor, h: torch.Tensor, k: int, sampling: SamplingParams,
              generator: torch.Generator | None, min_confidence: float | None = None) -> Draft:
        if self.drafter is None or k <= 0:
            return Draft(torch.empty(0, dtype=torch.long, device=self.device), None)
        if sampling.greedy and min_confidence is None and self._graphs is not None:
            return Draft(self._graphs.draft(token, h, k, self.cache.length), None)
        q_pos = torch.tensor([self.cache.length], device=self.device)
        if sampling.greedy and min_confidence is None:
            return Draft(self._greedy_drafts(token, h, q_pos, k), None)
        kv, attn = self._draft_inputs(q_pos)
        toks, qs = [], []
        tok = token.reshape(())
        for _ in range(k):
            out = self._step(tok, h, q_pos, kv, attn)
            h = out.hidden[0, 0]
            if sampling.greedy:  # the top probability over the candidates = over the vocabulary (the rest is 0)
                tok = self._argmax(out)
                conf = out.logits[0, 0].softmax(-1).max() if min_confidence is not None else None
            else:
                q = probs(out.dense_logits(self.vocab_size)[0, 0], sampling)
                tok = sample(q, generator)
                qs.append(q)
                conf = q.max() if min_confidence is not None else None
            if conf is not None and float(conf) < min_confidence:
                if qs:
                    qs.pop()
                break
            toks.append(tok)
        tokens = torch.stack(toks) if toks else torch.empty(0, dtype=torch.long, device=self.device)
        return Draft(tokens, torch.stack(qs) if qs else None)

    # ------------------------------------------------------------------ timing
    def clock(self) -> object:
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        if self.device.type == "cuda":
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


class _Graphs:
    """Lazily captured CUDA graphs: one per verify width; for drafting, one for a round's attention inputs
    and one per draft step i, which reads step i - 1's outputs.

    A graph is captured the first time its shape is needed, from the real inputs of that moment: the
    warm-up run writes exactly the K/V the replay will write, so capturing mid-generation is safe.
    Drafting is k short graphs, not one long one, because a graph starts running only once its launch,
    ~0.5 us of host time per kernel (H100), is complete: short ones overlap their launch with the
    previous one's run.
    """

    def __init__(self, be: TorchBackend):
        self.be = be
        self.pool = torch.cuda.graph_pool_handle()
        self.verify_graphs: dict[int, tuple] = {}
        self.draft_prep: tuple | None = None  # (graph, (kv, attn), (token, h, q_pos) inputs)
        self.draft_steps: list[tuple] = []  # step i: (graph, (token, h) outputs)
        self.step, self.draft_inputs, self.draft_step = be.target.step, be._draft_inputs, be._greedy_step
        if be.compile == "all":
            self.step = torch.compile(self.step, fullgraph=True, dynamic=False)
        if be.compile:
            self.draft_inputs = torch.compile(self.draft_inputs, fullgraph=True, dynamic=False)
            self.draft_step = torch.compile(self.draft_step, fullgraph=True, dynamic=False)

    def _capture(self, fn, inputs: tuple[torch.Tensor, ...]):
        """Warm up on a side stream, then capture fn(*inputs) -> (graph, outputs)."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = fn(*inputs)
        return g, out

    def verify(self, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.numel()
        if n not in self.verify_graphs:
            static = (tokens.view(1, n).clone(), torch.arange(start, start + n, device=self.be.device))

            def fn(t, p):
                o = self.step(t, p, self.be.cache)
                return o.logits[0], o.hidden[0]
            self.verify_graphs[n] = (*self._capture(fn, static), static)
        g, out, (t_in, p_in) = self.verify_graphs[n]
        t_in.copy_(tokens.view(1, n))
        torch.arange(start, start + n, out=p_in)  # in place, no host-to-device copy
        g.replay()
        return out

    def draft(self, token: torch.Tensor, h: torch.Tensor, k: int, length: int) -> torch.Tensor:
        if self.draft_prep is None:
            static = (token.reshape(()).clone(), h.clone(), torch.full((1,), length, device=self.be.device))
            self.draft_prep = (*self._capture(self.draft_inputs, static[2:]), static)
        g, (kv, attn), (t_in, h_in, q_in) = self.draft_prep
        t_in.copy_(token.reshape(()))
        h_in.copy_(h)
        q_in.fill_(length)
        g.replay()
        for i in range(k):  # a step is captured after the previous one ran: its warm-up reads real outputs
            if i == len(self.draft_steps):
                prev = (t_in, h_in) if i == 0 else self.draft_steps[i - 1][1]
                self.draft_steps.append(self._capture(lambda t, hh: self.draft_step(t, hh, q_in, kv, attn), prev))
            self.draft_steps[i][0].replay()
        return torch.stack([out[0] for _, out in self.draft_steps[:k]])
