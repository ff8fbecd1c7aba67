"""The torch backend: the reference target and drafter themselves, on CPU or CUDA.

On CUDA (`cuda_graphs=True`) each verify width 1..k+1 and the k-step greedy draft are captured once
as CUDA graphs over the static KV cache and replayed: one launch per target forward and one per draft,
and the only host syncs per round are the ones acceptance needs. Positions and lengths enter the
graphs as device tensors (GemmaModel.step and the cache's ring arithmetic are tensor-only for this).
"""

from __future__ import annotations

import time

import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.drafter import DrafterModel, DraftOutput, target_kv
from mtpkit.model.gemma import GemmaModel
from mtpkit.runtime.backend import Draft
from mtpkit.runtime.sampling import SamplingParams, probs, sample


class TorchBackend:
    def __init__(self, target: GemmaModel, drafter: DrafterModel | None = None, *, max_len: int = 4096,
                 max_draft: int = 16, cuda_graphs: bool | None = None):
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
        self._graphs = _Graphs(self) if self.cuda_graphs else None

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
    def _step(self, token: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, kv) -> DraftOutput:
        """One drafter step: token [], h [d_t] -> DraftOutput with B = T = 1."""
        emb = self.target.embed(token.view(1, 1))
        return self.drafter(emb, h.view(1, 1, -1).to(emb.dtype), q_pos, kv)

    @staticmethod
    def _argmax(out: DraftOutput) -> torch.Tensor:
        """The greedy draft token as a 0-d device tensor (no host sync; centroid head: among its candidates)."""
        best = out.logits[0, 0].argmax()
        return best if out.ids is None else out.ids[0, 0].gather(0, best.view(1)).view(())

    def _greedy_drafts(self, token: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, k: int) -> torch.Tensor:
        """k greedy draft tokens [k], all on device (no host sync): what the draft CUDA graph captures."""
        kv = target_kv(self.cache, self.target.config, q_pos[0])
        toks = []
        tok = token.reshape(())
        for _ in range(k):
            out = self._step(tok, h, q_pos, kv)
            tok, h = self._argmax(out), out.hidden[0, 0]
            toks.append(tok)
        return torch.stack(toks)

    @torch.inference_mode()
    def draft(self, token: torch.Tensor, h: torch.Tensor, k: int, sampling: SamplingParams,
              generator: torch.Generator | None, min_confidence: float | None = None) -> Draft:
        if self.drafter is None or k <= 0:
            return Draft(torch.empty(0, dtype=torch.long, device=self.device), None)
        q_pos = torch.tensor([self.cache.length], device=self.device)
        if sampling.greedy and min_confidence is None:
            if self._graphs is not None:
                return Draft(self._graphs.draft(token, h, k, self.cache.length), None)
            return Draft(self._greedy_drafts(token, h, q_pos, k), None)
        kv = target_kv(self.cache, self.target.config)
        toks, qs = [], []
        tok = token.reshape(())
        for _ in range(k):
            out = self._step(tok, h, q_pos, kv)
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
    """Lazily captured CUDA graphs: one per verify width and one per draft length.

    A graph is captured the first time its shape is needed, from the real inputs of that moment: the
    warm-up run writes exactly the K/V the replay will write, so capturing mid-generation is safe.
    """

    def __init__(self, be: TorchBackend):
        self.be = be
        self.pool = torch.cuda.graph_pool_handle()
        self.verify_graphs: dict[int, tuple] = {}
        self.draft_graphs: dict[int, tuple] = {}

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
        pos = torch.arange(start, start + n, device=self.be.device)
        if n not in self.verify_graphs:
            static = (tokens.view(1, n).clone(), pos.clone())

            def fn(t, p):
                o = self.be.target.step(t, p, self.be.cache)
                return o.logits[0], o.hidden[0]
            self.verify_graphs[n] = (*self._capture(fn, static), static)
        g, out, (t_in, p_in) = self.verify_graphs[n]
        t_in.copy_(tokens.view(1, n))
        p_in.copy_(pos)
        g.replay()
        return out

    def draft(self, token: torch.Tensor, h: torch.Tensor, k: int, length: int) -> torch.Tensor:
        q_pos = torch.tensor([length], device=self.be.device)
        if k not in self.draft_graphs:
            static = (token.reshape(()).clone(), h.clone(), q_pos.clone())
            self.draft_graphs[k] = (*self._capture(lambda t, hh, q: self.be._greedy_drafts(t, hh, q, k), static), static)
        g, out, (t_in, h_in, q_in) = self.draft_graphs[k]
        t_in.copy_(token.reshape(()))
        h_in.copy_(h)
        q_in.copy_(q_pos)
        g.replay()
        return out
