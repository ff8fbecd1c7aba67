"""The torch backend: the reference target and drafter themselves, on CPU or CUDA.

On CUDA (`cuda_graphs=True`) each verify width 1..k+1 (one padded width when compiled, below) and the draft
steps (greedy, and sampled per sampling settings, with uniforms drawn ahead) are captured once as CUDA graphs
over the static KV cache and replayed: one launch per target forward, one per draft step plus one per round for
the drafter's attention inputs, one for sampled acceptance (sampling.VERIFY's rule: one graph per sampling settings
and rule for every k, its inputs padded to max_draft), and one host sync per round (acceptance's result: n, the
next token and the drafts in one transfer; `Pipeline`: an async copy, read one round later, while the next round
runs). Positions and lengths enter the graphs as device tensors (GemmaModel.step and the cache's ring arithmetic
are tensor-only).
`compile` runs captured steps through torch.compile first (inductor, no cudagraphs of its own): a step
of a small model is hundreds of tiny kernels, and fusing them is most of its time. "drafter" compiles
the draft steps, sampled acceptance and a sampled plain step's pick (H100: 0.15 -> 0.04 ms and 0.10 -> 0.03 ms
over the 262k vocabulary, bench/sampling_profile.py); "all" (the default on CUDA) the target's steps too.
Compiled kernels are chosen per
shape, so with "all" every target step, plain and verify, runs one padded width (max_draft + 1 rows; padding
rows repeat the last token at its position): a verify row then computes bitwise what a plain step computes,
and greedy speculative output stays equal to plain (H200: 16/16, 16/16, 48/48 on HumanEval / MT-Bench /
everyday; 1.0 ms a step of 17 rows vs 1.0 ms of 6).
The target's q/k/v and gate/up projections run as one GEMM each (GemmaModel.fuse: 1.23 -> 1.01 ms a compiled
CUDA step), and on CUDA plain steps run in fused chunks (`fused_plain`: no host sync between steps, so the next
step's launch overlaps the running one: 1.45 -> 1.05 ms a token).
On a CPU every target step after the prefill, plain or verify, runs CPU_WIDTH rows the same way (padded; a longer
verify in several steps) with its linears weight-major (layers.weight_major): one shape, so a verify row is
bitwise a plain step (greedy identity exact), and a verify of up to CPU_WIDTH tokens costs one plain step, which
is itself faster than a one-row step (see CPU_WIDTH).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.drafter import DrafterModel, DraftOutput, target_kv
from mtpkit.model.gemma import GemmaModel
from mtpkit.model.layers import weight_major
from mtpkit.progress import note
from mtpkit.runtime.backend import Backend, BackendInfo, Draft, DraftStep, Loaded
from mtpkit.runtime.sampling import VERIFY, SamplingParams, accept_greedy_device, probs

COMPILE = ("none", "drafter", "all")  # what TorchBackend(compile=...) compiles
RECOMPILE_LIMIT = 64  # compiled variants of one step (one per sampling settings, per shape) a process may hold
# On a CPU every target step after the prefill runs this many rows (padded like the compiled CUDA steps; a verify
# of more tokens runs in steps of this many): a step's GEMMs then stream each weight once for all its rows
# (layers.weight_major), and a verify row computes bitwise what a plain step computes. This repo's 2-core CPU,
# Gemma 3 270M float32, ms a step of 1 / 2 / 4 / 6 rows: 110 / 207 / 178 / 213 as x @ w.T per row count, 118 / 73 /
# 79 / 112 weight-major and fused; so 4 (3 drafts verify at the price of a plain step).
CPU_WIDTH = 4
SIBLING_DRAFTER = None  # targets are names or checkpoints: the default drafter is the one shipped for the name


class TorchOps:
    """runtime/ops.py's operations on torch tensors of one device (no host sync except where a host value is
    returned: to_list, top_prob)."""
    name = "torch"

    def __init__(self, device: torch.device):
        self.device = device

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def tokens(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    @staticmethod
    def to_list(x: torch.Tensor) -> list[int]:
        return x.reshape(-1).tolist()

    @staticmethod
    def cat(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([x.reshape(-1) for x in xs])

    @staticmethod
    def stack(xs: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(xs)

    @staticmethod
    def argmax(x: torch.Tensor) -> torch.Tensor:
        return x.argmax(-1)

    @staticmethod
    def index(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return x.index_select(0, i.view(1))[0]  # not x[i]: a 0-d index tensor would be read on the host

    @staticmethod
    def clamp_max(x: torch.Tensor, m: int) -> torch.Tensor:
        return x.clamp_max(m)

    @staticmethod
    def top_prob(logits: torch.Tensor) -> float:
        return float(logits.float().softmax(-1).max())

    @staticmethod
    def float32(x: torch.Tensor) -> torch.Tensor:
        return x.float()

    @staticmethod
    def sort_desc(x: torch.Tensor) -> torch.Tensor:
        return x.sort(-1, descending=True).values

    @staticmethod
    def softmax(x: torch.Tensor) -> torch.Tensor:
        return x.softmax(-1)

    @staticmethod
    def arange(n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n, device=like.device)

    @staticmethod
    def logsumexp(x: torch.Tensor) -> torch.Tensor:
        return x.logsumexp(-1)

    @staticmethod
    def exp(x: torch.Tensor) -> torch.Tensor:
        return x.exp()

    @staticmethod
    def cumsum(x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(-1)

    @staticmethod
    def count(mask: torch.Tensor) -> torch.Tensor:
        return mask.sum(-1, keepdim=True)

    @staticmethod
    def take_along(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.gather(-1, idx)

    @staticmethod
    def mask_below(x: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(x < threshold, float("-inf"))

    @staticmethod
    def leading_count(mask: torch.Tensor) -> torch.Tensor:
        return mask.long().cumprod(0).sum()

    @staticmethod
    def rand(rng: torch.Generator, n: int, like: torch.Tensor) -> torch.Tensor:
        return torch.rand(n, generator=rng, device=like.device)

    @staticmethod
    def pick(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """NumpyOps.pick on the device, without a host sync (u: a 0-d tensor): CUDA-graph safe."""
        c = p.double().cumsum(-1)
        return (c <= u.double() * c[-1]).sum().clamp_max(c.numel() - 1)

    @staticmethod
    def pick_rows(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """`pick` per row of p [w, N] with uniforms u [w], on the device."""
        c = p.double().cumsum(-1)
        return (c <= u.double()[:, None] * c[:, -1:]).sum(-1).clamp_max(c.shape[-1] - 1)

    @staticmethod
    def zero_at(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return x.index_fill(0, i.view(1), 0)

    @staticmethod
    def column(x: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        return x.index_select(1, i.view(1))[:, 0]

    @staticmethod
    def where(cond: torch.Tensor, a: Any, b: Any) -> torch.Tensor:
        return torch.where(cond, a, b)

    @staticmethod
    def full_like(x: torch.Tensor, value: Any) -> torch.Tensor:
        return torch.full_like(x, value)

    @classmethod
    def sample(cls, p: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        return cls.pick(p, torch.rand((), generator=rng, device=p.device))

    @staticmethod
    def residual(p: torch.Tensor, q: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        if ids is None:
            r = (p - q).clamp_min(0)
        else:
            r = p.index_put((ids,), (p[ids] - q).clamp_min(0))
        return torch.where(r.sum() > 0, r, p)  # unnormalized: `sample` needs no normalization, and no host sync


def torch_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """--device / --dtype -> torch's: CUDA if available, bfloat16 on GPUs and float32 on CPUs by default."""
    try:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise MtpkitError(f"unknown device {device!r} for the torch backend (cpu, cuda, cuda:N)")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise MtpkitError("device cuda requested but torch sees no CUDA GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise MtpkitError(f"device {device} requested but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          None: torch.bfloat16 if dev.type == "cuda" else torch.float32}.get(dtype)
    if dt is None:
        raise MtpkitError(f"unknown dtype {dtype!r} (float32, bfloat16, float16)")
    return dev, dt


@dataclass(frozen=True)
class Options:
    device: str | None = None  # cpu | cuda[:i]; default: cuda if available
    dtype: str | None = None  # float32 | bfloat16 | float16; default: bfloat16 on GPUs, float32 on CPUs
    threads: int | None = None  # torch's CPU threads (torch.set_num_threads); default: torch's own
    cuda_graphs: bool | None = None  # default: on for CUDA
    compile: str | None = None  # none | drafter | all (see the module docstring); default: all on CUDA
    random_drafter: dict | None = None  # config overrides: an untrained drafter, for cost measurements only


def load(target: str, drafter: str | None, opts: Options, *, max_len: int, max_draft: int) -> Loaded:
    """`target`: a name (gemma3-270m), .gguf file or HF directory; `drafter`: a drafter directory or None."""
    from mtpkit.model.load import load_drafter, load_target
    if opts.threads is not None:
        if opts.threads < 1:
            raise MtpkitError(f"threads must be >= 1, got {opts.threads}")
        torch.set_num_threads(opts.threads)
    dev, dt = torch_device_dtype(opts.device, opts.dtype)
    t = load_target(target, dtype=dt, device=dev)
    d = None
    if opts.random_drafter is not None:
        from mtpkit.model.config import DrafterConfig
        torch.manual_seed(0)
        d = DrafterModel(DrafterConfig.for_target(t.config, **opts.random_drafter)).to(device=dev, dtype=dt).eval()
        drafter = "random"
    elif drafter is not None:
        d = load_drafter(drafter, t, dtype=dt, device=dev)  # the Target: its fingerprint is checked too
    compile = opts.compile or ("all" if dev.type == "cuda" and opts.cuda_graphs is not False else None)
    be = TorchBackend(t.model, d, max_len=max_len, max_draft=max_draft, cuda_graphs=opts.cuda_graphs, compile=compile)
    return Loaded(be, t.tokenizer, t.config, drafter, t.source)


class TorchBackend(Backend):
    auto_adaptive = (False, False)  # a verify of up to CPU_WIDTH tokens costs one plain step (Backend.auto_adaptive)

    def __init__(self, target: GemmaModel, drafter: DrafterModel | None = None, *, max_len: int = 4096,
                 max_draft: int = 16, cuda_graphs: bool | None = None, compile: str | None = None,
                 fuse: bool = True):
        p = target.embed_tokens.weight
        self.device = p.device
        if fuse:  # q/k/v and gate/up as one GEMM each (in place)
            target.fuse()
            if drafter is not None:
                drafter.fuse()
        self.ops = TorchOps(self.device)
        self.target, self.drafter = target, drafter
        self.vocab_size = target.config.vocab_size
        self.max_len = max_len
        self.has_drafter = drafter is not None
        self.draft_temperature = drafter.config.draft_temperature if drafter is not None else 1.0
        self.max_draft = max_draft
        self.width = CPU_WIDTH if self.device.type == "cpu" else None  # rows of every target step on a CPU
        self._padding: dict[tuple[int, int], torch.Tensor] = {}  # _pad_rows
        self._layouts: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # _tree_layout
        # a verify of k + 1 tokens must fit a sliding ring, and rollback undoes up to k positions
        self.cache = target.new_cache(max_len, slack=max(64, max_draft + 1))
        if drafter is not None and not drafter.is_bound:
            drafter.bind_target(target.embed_tokens.weight)
        self.cuda_graphs = self.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and self.device.type != "cuda":
            raise MtpkitError("cuda_graphs needs a CUDA device")
        self.compile: str | None = None
        self._round: tuple | None = None  # (q_pos, kv, attn) of the current draft round
        self._set_graphs(_Graphs(self) if self.cuda_graphs else None)
        if compile and compile != "none":
            self.enable_compile(compile)

    def _set_graphs(self, graphs: _Graphs | None) -> None:
        self._graphs = graphs
        on = graphs is not None and self.has_drafter
        self.fused_greedy_draft = (lambda token, h, k: graphs.draft(token, h, k, self.cache.length)) if on else None
        self.fused_sampled_draft = (lambda token, h, k, sp, u: graphs.draft_sampled(token, h, k, self.cache.length,
                                                                                    sp, u)) if on else None
        self.fused_plain = self._fused_plain if graphs is not None else None
        self.fused_accept = graphs.accept if on else None
        self.fused_tree_draft = (lambda token, h, k, w, sp, u: graphs.draft_tree(token, h, k, w, self.cache.length, sp,
                                                                                 u)) if on else None
        self.fused_accept_tree = graphs.accept_tree if on else None
        self.pipeline = (lambda bonus, h: Pipeline(self, bonus, h)) if on else None

    def _next_positions(self, n: int) -> int:
        """The first of n positions a target step is about to write (raises if they do not fit); ends the draft round."""
        start = self.cache.length
        if start + n > self.max_len:
            raise MtpkitError(f"context full: {start + n} positions > {self.max_len}")
        self._round = None
        return start

    def _fused_plain(self, token: torch.Tensor, n: int, sp: SamplingParams, u: torch.Tensor | None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        start = self._next_positions(n)
        tokens, h = self._graphs.plain(token, n, start, sp, u)
        self.cache.advance(start, n)
        return tokens, h

    def enable_compile(self, what: str = "drafter") -> None:
        """Capture torch.compile'd steps from now on: "drafter" or "all" (see the module docstring).
        Graphs captured so far are dropped."""
        if what not in COMPILE[1:]:
            raise MtpkitError(f"compile must be one of {', '.join(COMPILE)}, got {what!r}")
        if not self.cuda_graphs:
            raise MtpkitError(f"compile {what} needs a CUDA device with cuda_graphs on (it compiles the steps the CUDA "
                              "graphs capture); --compile none on a CPU")
        self.compile = what
        self._set_graphs(_Graphs(self))

    @property
    def length(self) -> int:
        return self.cache.length

    def info(self) -> BackendInfo:
        t, d = self.target, self.drafter
        size = lambda m: (sum(p.numel() for p in m.parameters()),  # noqa: E731
                          sum(p.numel() * p.element_size() for p in m.parameters()))
        tp, tb = size(t)
        dp, db = size(d) if d is not None else (0, 0)
        return BackendInfo("torch", str(self.device), str(t.embed_tokens.weight.dtype).removeprefix("torch."),
                           torch.get_num_threads() if self.device.type == "cpu" else None, tp, tb,
                           t.embed_tokens.weight.numel(), t.config, d.config if d is not None else None, dp, db,
                           d.config.head if d is not None else None, graphs=self.cuda_graphs, compile=self.compile)

    # ------------------------------------------------------------------ target
    @torch.inference_mode()
    def start(self, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if len(prompt) >= self.max_len:
            raise MtpkitError(f"prompt of {len(prompt)} tokens does not fit the context ({self.max_len})")
        self.cache.reset()
        self._round = None
        out = self.target(self.ops.tokens(prompt)[None], self.cache, logits=False)
        h = out.hidden[0, -1]
        return self.target.head(h[None])[0], h  # the head on the last row only: [T, V] logits would be 1 MB a token

    @torch.inference_mode()
    def verify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = tokens.numel()
        start = self._next_positions(n)
        if self._graphs is not None:
            logits, hidden = self._graphs.verify(tokens, start)
            self.cache.advance(start, n)
            return logits, hidden
        if self.width is None:
            out = self.target(tokens[None], self.cache)
            return out.logits[0], out.hidden[0]
        logits, hidden, w = [], [], self.width
        with weight_major():
            for i in range(0, n, w):  # steps of w rows; padding rows repeat the last token at its position
                m = min(w, n - i)
                rows = self._pad_rows(m, w)
                out = self.target.step(tokens.view(-1)[i:i + m][rows][None], rows + (start + i), self.cache)
                self.cache.advance(start + i, m)
                logits.append(out.logits[0, :m])
                hidden.append(out.hidden[0, :m])
        return (logits[0], hidden[0]) if len(logits) == 1 else (torch.cat(logits), torch.cat(hidden))

    @torch.inference_mode()
    def verify_tree(self, tokens: torch.Tensor, w: int, k_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A draft tree's rows (runtime/tree.py layout, w chains) in one forward at positions length.. ->
        (logits [n, V], hidden [n, d]). k_max: the longest chain this generation drafts (the CUDA graphs run every
        tree of w chains padded to 1 + w k_max rows: one compiled shape)."""
        n = tokens.numel()
        width = 1 + w * max(k_max or 0, (n - 1) // w)
        if width > self.cache.max_chunk:
            raise MtpkitError(f"a draft tree of {width} rows exceeds this cache's {self.cache.max_chunk} (its slack)")
        start = self._next_positions(n)
        depth, see = self._tree_layout(w, (n - 1) // w)
        if self._graphs is not None:
            logits, hidden = self._graphs.verify_tree(tokens, depth, see, start, w, width)
        else:
            with weight_major():
                out = self.target.step(tokens.view(1, n), torch.arange(start, start + n, device=self.device),
                                       self.cache, tree=(depth, see))
            logits, hidden = out.logits[0], out.hidden[0]
        self.cache.advance(start, n)
        return logits, hidden

    def _tree_layout(self, w: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if (w, k) not in self._layouts:
            from mtpkit.runtime.tree import layout
            depth, see = layout(w, k)
            self._layouts[w, k] = (torch.tensor(depth, device=self.device), torch.tensor(see, device=self.device))
        return self._layouts[w, k]

    def keep(self, start: int, rows: list[int]) -> None:
        """After a tree verify at `start`: the rows (offsets from start) that become positions start + 1..; the
        cache then ends after them."""
        m = len(rows)
        if rows != list(range(1, m + 1)):
            src = torch.tensor(rows, device=self.device) + start
            dst = torch.arange(start + 1, start + 1 + m, device=self.device)
            if self._graphs is not None:
                self._graphs.move(src, dst)
            else:
                self.cache.move(src, dst)
        self.rollback(start + 1 + m)

    def _pad_rows(self, n: int, w: int) -> torch.Tensor:
        """[w] the input row each row of a w-row target step with n tokens repeats: 0..n-1, then n - 1 (cached)."""
        if (n, w) not in self._padding:
            self._padding[n, w] = torch.arange(w, device=self.device).clamp_max(n - 1)
        return self._padding[n, w]

    def rollback(self, length: int) -> None:
        self._round = None
        self.cache.rollback(length)

    # ------------------------------------------------------------------ drafter
    def _step(self, token: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, kv, attn: dict) -> DraftOutput:
        """One drafter step: token [], h [d_t] -> DraftOutput with B = T = 1 (attn: the round's attention_inputs)."""
        emb = self.target.embed(token.view(1, 1))
        return self.drafter(emb, h.view(1, 1, -1).to(emb.dtype), q_pos, kv, attn)

    def _draft_inputs(self, q_pos: torch.Tensor) -> tuple[dict, dict]:
        """(kv, attn) of a draft round querying at q_pos [1] (a device tensor: CUDA-graph safe)."""
        kv = target_kv(self.cache, self.target.config, q_pos[0])
        return kv, self.drafter.attention_inputs(q_pos, kv)

    @torch.inference_mode()
    def draft_step(self, token: torch.Tensor, h: torch.Tensor) -> DraftStep:
        if self.drafter is None:
            raise MtpkitError("this backend has no drafter")
        if self._round is None:  # once per round: every step queries at the bonus position
            q_pos = torch.tensor([self.cache.length], device=self.device)
            self._round = (q_pos, *self._draft_inputs(q_pos))
        out = self._step(token.reshape(()), h, *self._round)
        return DraftStep(out.logits[0, 0], None if out.ids is None else out.ids[0, 0], out.hidden[0, 0])

    @torch.inference_mode()
    def draft_rows(self, tokens: torch.Tensor, h: torch.Tensor) -> DraftStep:
        """w drafter steps side by side, one per row (a draft tree's chains), in the round `draft_step` began:
        tokens [w], h [w, d] -> DraftStep(logits [w, N], ids [w, N] or None, h [w, d])."""
        if self._round is None:
            raise MtpkitError("draft_rows continues a round: call draft_step first")
        out = self._rows_step(tokens, h, *self._round)
        return DraftStep(out.logits[0], None if out.ids is None else out.ids[0], out.hidden[0])

    def _rows_step(self, tokens: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, kv, attn: dict) -> DraftOutput:
        w = tokens.numel()
        rows = {kind: ((rope[0].expand(w, -1), rope[1].expand(w, -1)), k, v, mask.expand(w, -1))
                for kind, (rope, k, v, mask) in attn.items()}
        emb = self.target.embed(tokens.view(1, w))
        return self.drafter(emb, h.view(1, w, -1).to(emb.dtype), q_pos.expand(w), kv, rows)

    def _greedy_step(self, tok: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor, kv: dict, attn: dict
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """One greedy draft step on device, as the CUDA graphs capture it: (token [], h) -> (next token [], next h).
        Same picks as draft.draft's greedy path (the contract test checks it)."""
        out = self._step(tok, h, q_pos, kv, attn)
        best = out.logits[0, 0].argmax()
        return (best if out.ids is None else self.ops.index(out.ids[0, 0], best)), out.hidden[0, 0]

    def _sampled_step(self, tok: torch.Tensor, h: torch.Tensor, u: torch.Tensor, q_pos: torch.Tensor, kv: dict,
                      attn: dict, sp: SamplingParams) -> tuple:
        """One sampled draft step on device, as the CUDA graphs capture it: (token [], h, uniform u []) ->
        (next token [], next h, pick [], q [N], candidate ids [N] or None). Same as draft.draft's sampled path."""
        out = self._step(tok, h, q_pos, kv, attn)
        q = probs(self.ops, out.logits[0, 0], sp)
        j = self.ops.pick(q, u)
        ids = None if out.ids is None else out.ids[0, 0]
        return (j if ids is None else self.ops.index(ids, j)), out.hidden[0, 0], j, q, ids

    def _tree_first(self, tok: torch.Tensor, h: torch.Tensor, u: torch.Tensor, q_pos: torch.Tensor, kv: dict,
                    attn: dict, sp: SamplingParams) -> tuple:
        """A draft tree's first step on device, as the CUDA graphs capture it: (token [], h, uniforms u [w]) ->
        (tokens [w], h [w, d], picks [w], q [N], ids [N] or None, valid [w]); tree.draft_tree's first step."""
        out = self._step(tok, h, q_pos, kv, attn)
        q = probs(self.ops, out.logits[0, 0], sp)
        ids = None if out.ids is None else out.ids[0, 0]
        left, picks, valid = q, [], []
        for c in range(u.numel()):
            valid.append(left.sum() > 0)
            j = self.ops.pick(left, u[c])
            picks.append(j)
            left = self.ops.zero_at(left, j)
        j = torch.stack(picks)
        w = u.numel()
        return (j if ids is None else ids.gather(0, j)), out.hidden[0, 0].repeat(w, 1), j, q, ids, torch.stack(valid)

    def _tree_rows(self, tok: torch.Tensor, h: torch.Tensor, u: torch.Tensor, q_pos: torch.Tensor, kv: dict,
                   attn: dict, sp: SamplingParams) -> tuple:
        """A draft tree's later step, w rows: (tokens [w], h [w, d], u [w]) -> (tokens, h, picks, q [w, N], ids)."""
        out = self._rows_step(tok, h, q_pos, kv, attn)
        q = probs(self.ops, out.logits[0], sp)
        j = self.ops.pick_rows(q, u)
        ids = None if out.ids is None else out.ids[0]
        return (j if ids is None else ids.gather(1, j[:, None])[:, 0]), out.hidden[0], j, q, ids

    # ------------------------------------------------------------------ timing
    def clock(self) -> object:
        if self.device.type == "cuda":
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return super().clock()

    def elapsed(self, a: Any, b: Any) -> float:
        if self.device.type == "cuda":
            b.synchronize()
            return a.elapsed_time(b) / 1000.0
        return b - a


def _set_length(dst: torch.Tensor, length: int | torch.Tensor) -> None:
    """Write a position into a graph's [1] input: a host int, or a device tensor (no host sync)."""
    if isinstance(length, torch.Tensor):
        dst.copy_(length.view(1))
    else:
        dst.fill_(length)


@dataclass
class Launched:
    """A round queued by Pipeline.launch: its outcome lands in `host` ([n, next, drafts...], pinned memory on CUDA)
    once the device has passed its last mark."""
    pipe: Pipeline
    k: int
    host: torch.Tensor
    marks: tuple  # clock() at the draft's start, after the draft, after acceptance and commit
    written: int  # positions the round's verify wrote: k + 1, or 1 + w k for a draft tree

    def result(self) -> tuple[int, int, list[int], float, float]:
        """(n accepted, next token, the k drafts, draft seconds, verify seconds): waits for the round; commits the
        cache's host-side length (rounds must be read in launch order)."""
        be = self.pipe.be
        t0, t1, t2 = self.marks
        verify_s = be.elapsed(t1, t2)  # (syncs on the round's last mark)
        vals = self.host.tolist()
        self._commit(vals[0] + 1)
        return vals[0], vals[1], vals[2:], be.elapsed(t0, t1), verify_s

    def abandon(self) -> None:
        """A round launched past the generation's end: record its writes, keep the length."""
        self._commit(0)

    def _commit(self, kept: int) -> None:
        """The host's cache length after this round: its positions written (the ring's rollback check sees them),
        `kept` of them kept."""
        cache = self.pipe.be.cache
        start = cache.length
        cache.advance(start, self.written)
        self.pipe.be.rollback(start + kept)


class Pipeline:
    """Speculative rounds queued ahead of the host (the torch backend's CUDA graphs; Backend.pipeline). The bonus
    token, h and the cache length live on the device: a round drafts from them, verifies, accepts (greedy on the
    device, or the sampled acceptance graph) and writes the next round's, so launching round r + 1 needs nothing of
    round r's outcome on the host. The host reads each round through one async copy into pinned memory. Positions
    enter every graph as device tensors already; the host's cache length follows when a round is read."""

    SLOTS = 4  # pinned result buffers, reused in turn (loop.pipelined keeps at most 2 rounds in flight)

    def __init__(self, be: TorchBackend, bonus: int, h: torch.Tensor):
        self.be, g = be, be._graphs
        if g.pipe_state is None:  # once per backend: the device state and the pinned result slots
            dev, pin = be.device, be.device.type == "cuda"
            g.pipe_state = (torch.zeros(1, dtype=torch.long, device=dev), torch.zeros_like(h),
                            torch.zeros(1, dtype=torch.long, device=dev),
                            [torch.zeros(be.max_draft + 2, dtype=torch.long, pin_memory=pin) for _ in range(self.SLOTS)])
        self.tok, self.h, self.len, self.slots = g.pipe_state
        self.tok.fill_(bonus)  # (host scalars into device buffers: no sync)
        self.len.fill_(be.cache.length)
        if h.data_ptr() != self.h.data_ptr():
            self.h.copy_(h)
        self.turn = 0

    @torch.inference_mode()
    def launch(self, k: int, dsp: SamplingParams, sp: SamplingParams, u_draft: torch.Tensor | None,
               u_accept: torch.Tensor | None, w: int = 1, k_max: int | None = None, verify: str = "block") -> Launched:
        """Queue a round of k drafts; w > 1 (sampling): a draft tree of w chains (runtime/tree.py), verified padded to
        1 + w k_max rows, the accepted chain's K/V moved into place on the device."""
        be, g = self.be, self.be._graphs
        if not 1 <= k <= be.max_draft:
            raise MtpkitError(f"a pipelined round drafts 1..{be.max_draft} tokens, got {k}")
        if w > 1:
            return self._launch_tree(k, w, max(k, k_max or k), dsp, sp, u_draft, u_accept, verify)
        t0 = be.clock()
        d = Draft(g.draft(self.tok, self.h, k, self.len)) if sp.greedy else g.draft_sampled(self.tok, self.h, k,
                                                                                             self.len, dsp, u_draft)
        t1 = be.clock()
        logits, hidden = g.verify(torch.cat([self.tok, d.tokens]), self.len)
        if sp.greedy:
            n, nxt = accept_greedy_device(be.ops, d.tokens, logits)
        else:
            n, nxt = g.accept(d, logits, sp, u_accept, verify)
        vals = torch.cat([n.view(1), nxt.view(1), d.tokens])
        self.len.add_(n + 1)  # the next round's bonus, h and length
        self.tok.copy_(nxt.view(1))
        self.h.copy_(hidden.index_select(0, n.view(1))[0])
        return self._queue(k, k + 1, vals, t0, t1)

    def _launch_tree(self, k: int, w: int, k_max: int, dsp: SamplingParams, sp: SamplingParams, u_draft: torch.Tensor,
                     u_accept: torch.Tensor, verify: str = "block") -> Launched:
        """loop.generate's tree round on the device: the n kept tokens are chain c's first n drafts (c = w: none, n = 0),
        rows 1 + i w + c of the verify, moved to the positions after the bonus (all k of them: those past n lie past the
        length); h is the last kept row's."""
        be, g = self.be, self.be._graphs
        t0 = be.clock()
        td = g.draft_tree(self.tok, self.h, k, w, self.len, dsp, u_draft)
        t1 = be.clock()
        depth, see = be._tree_layout(w, k)
        logits, hidden = g.verify_tree(td.verify_tokens(be.ops, self.tok), depth, see, self.len, w, 1 + w * k_max)
        c, n, nxt = g.accept_tree(td, logits, sp, u_accept, verify)
        c = c.clamp_max(w - 1)
        ar = torch.arange(k, device=be.device)
        g.move(self.len + 1 + ar * w + c, self.len + 1 + ar)
        last = torch.where(n > 0, 1 + (n - 1) * w + c, 0)
        vals = torch.cat([n.view(1), nxt.view(1), td.tokens.index_select(0, c.view(1))[0]])
        self.len.add_(n + 1)
        self.tok.copy_(nxt.view(1))
        self.h.copy_(hidden.index_select(0, last.view(1))[0])
        return self._queue(k, 1 + w * k, vals, t0, t1)

    def _queue(self, k: int, written: int, vals: torch.Tensor, t0: Any, t1: Any) -> Launched:
        """The round's outcome [n, next, drafts] to a pinned slot by an async copy."""
        host = self.slots[self.turn][:k + 2]
        self.turn = (self.turn + 1) % self.SLOTS
        host.copy_(vals, non_blocking=True)
        return Launched(self, k, host, (t0, t1, self.be.clock()), written)


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
        self.pool = torch.cuda.graph_pool_handle() if be.device.type == "cuda" else None  # (CPU: tests' stand-in)
        self.verify_graphs: dict[int, tuple] = {}
        self.draft_prep: tuple | None = None  # (graph, (kv, attn), (token, h, q_pos) inputs)
        self.draft_steps: list[tuple] = []  # step i: (graph, (token, h) outputs)
        self.sampled_steps: dict[SamplingParams, list[tuple]] = {}  # per sampling settings, step i: (graph, outputs)
        self.sampled_out: dict[SamplingParams, tuple] = {}  # per sampling settings: (tokens, picks, q, ids) [max_draft, ..]
        self.accepts: dict[tuple, tuple] = {}  # sampled acceptance per (sp, verify), every k: (graph, out, inputs)
        self.uniforms_accept = torch.zeros(be.max_draft + 1, device=be.device)
        self.uniforms = torch.zeros(be.max_draft, device=be.device)  # the sampled steps' u, written per round
        # compiled target steps all run one padded width (plain and verify): compiled kernels are chosen per
        # shape, so a verify row then computes bitwise what a plain step computes (greedy identity)
        self.width = be.max_draft + 1 if be.compile == "all" else None
        self.feeds: dict[SamplingParams | None, tuple] = {}  # plain decoding: (graph, picked tokens, step counter)
        self.uniforms_plain = torch.zeros(be.max_len, device=be.device)  # sampled plain decoding's u, per call
        self.step, self.draft_inputs, self.draft_step = be.target.step, be._draft_inputs, be._greedy_step
        self.sampled_step = be._sampled_step
        self.accept_rule, self.sample = self._accept_rule, self._sample  # sampled acceptance; a sampled plain pick
        self.tree_first, self.tree_rows = be._tree_first, be._tree_rows
        self.tree_accept_rule = self._tree_accept_rule
        self.tree_graphs: dict[int, tuple] = {}  # tree verify per padded width
        self.tree_layouts: dict[tuple, tuple] = {}  # padded (depth, see) per layout
        self.tree_steps: dict[tuple, list] = {}  # per (sampling settings, w): step i's (graph, outputs)
        self.tree_out: dict[tuple, tuple] = {}  # per (sp, w): (tokens, picks, q, ids, valid) [w, max_draft, ..]
        self.tree_accepts: dict[tuple, tuple] = {}  # per (sp, w, K, verify): (graph, out), every k <= K
        self.tree_accept_inputs: dict[tuple, tuple] = {}  # ... its static inputs, padded to K
        self.tree_width: dict[int, int] = {}  # per w: the padded width of the last tree verify (1 + w K)
        self.moves: dict[int, tuple] = {}  # per rows moved m: (graph, (src [m], dst [m]) inputs)
        self.uniforms_tree: dict[int, torch.Tensor] = {}  # per w: a tree draft's w max_draft uniforms
        self.pipe_state: tuple | None = None  # Pipeline's (bonus [1], h [d], length [1], pinned result slots)
        if be.compile == "all":
            self.step = torch.compile(self.step, fullgraph=True, dynamic=False)
        if be.compile:
            self.draft_inputs = torch.compile(self.draft_inputs, fullgraph=True, dynamic=False)
            self.draft_step = torch.compile(self.draft_step, fullgraph=True, dynamic=False)
            self.sampled_step = torch.compile(self.sampled_step, fullgraph=True, dynamic=False)
            self.tree_first = torch.compile(self.tree_first, fullgraph=True, dynamic=False)
            self.tree_rows = torch.compile(self.tree_rows, fullgraph=True, dynamic=False)
            self.accept_rule = torch.compile(self.accept_rule, fullgraph=True, dynamic=False)
            self.tree_accept_rule = torch.compile(self.tree_accept_rule, fullgraph=True, dynamic=False)
            self.sample = torch.compile(self.sample, fullgraph=True, dynamic=False)

    def _capture(self, fn, inputs: tuple[torch.Tensor, ...]):
        """Warm up on a side stream, then capture fn(*inputs) -> (graph, outputs). A compiled step is compiled again
        per sampling settings (and shape): torch.compile's default of 8 variants of a function, a hard error with
        fullgraph, is raised to RECOMPILE_LIMIT for the captures."""
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s), torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            for _ in range(2):
                fn(*inputs)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self.pool):
            out = fn(*inputs)
        return g, out

    def _rows(self, n: int) -> torch.Tensor:
        """[w] the input row each of a target step's w rows repeats: 0..n-1, then n - 1 (w = n unpadded)."""
        w = self.width or n
        if n > w:
            raise MtpkitError(f"a target step of {n} tokens exceeds this backend's {w} rows (max_draft + 1)")
        return self.be._pad_rows(n, w)

    def _target(self, tokens: torch.Tensor, start: int) -> tuple:
        """Write tokens [n] at positions start.. into the input of the width-w target graph (captured the first
        time from these inputs) -> (graph, (logits [w, V], hidden [w, d]), (tokens [1, w], positions [w]))."""
        n = tokens.numel()
        rows = self._rows(n)
        w = rows.numel()
        if w not in self.verify_graphs:
            static = (tokens.view(-1)[rows].view(1, w), rows + start)

            def fn(t, p):
                o = self.step(t, p, self.be.cache)
                return o.logits[0], o.hidden[0]
            if self.be.compile == "all":
                note(f"torch.compile: the target's step of {w} rows (once per process; cached on disk)")
            self.verify_graphs[w] = (*self._capture(fn, static), static)
        g, out, (t_in, p_in) = self.verify_graphs[w]
        torch.index_select(tokens.view(-1), 0, rows, out=t_in.view(w))  # on the device: no host sync
        torch.add(rows, start, out=p_in)
        return g, out, (t_in, p_in)

    def verify(self, tokens: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded rows repeat the last token at its position: they write the K/V it writes, and the real rows
        compute what they compute alone (every op is per row)."""
        g, (logits, hidden), _ = self._target(tokens, start)
        g.replay()
        n = tokens.numel()
        return logits[:n], hidden[:n]

    @torch.inference_mode()
    def plain(self, token: torch.Tensor, n: int, start: int, sp: SamplingParams,
              u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """n plain decoding steps from `token` at position `start` with no host sync: each step's pick (argmax, or
        `ops.pick` of probs at sp with uniform u[i]) is written into the next step's input by a small graph
        replayed after the target's. -> (tokens [n], post-norm hidden of the last step [d])."""
        key = None if sp.greedy else sp
        if key not in self.feeds:  # (its warm-up runs move the target graph's inputs: written again below)
            _, (logits, hidden), (t_in, p_in) = self._target(token.reshape(1), start)
            picked = torch.zeros(self.be.max_len, dtype=torch.long, device=self.be.device)
            at = torch.zeros(1, dtype=torch.long, device=self.be.device)

            def feed():
                if sp.greedy:
                    j = logits[0].argmax()
                else:
                    j = self.sample(logits[0], self.uniforms_plain.gather(0, at)[0], sp)
                picked.index_copy_(0, at, j.view(1))
                t_in.copy_(j.expand_as(t_in))
                p_in.add_(1)
                at.add_(1)
            self.feeds[key] = (self._capture(feed, ())[0], picked, at)
        fg, picked, at = self.feeds[key]
        g, (_, hidden), _ = self._target(token.reshape(1), start)
        at.zero_()
        if u is not None:
            self.uniforms_plain[:n].copy_(u)
        for _ in range(n):
            g.replay()
            fg.replay()
        return picked[:n], hidden[0]

    def _prep(self, token: torch.Tensor, h: torch.Tensor, length: int | torch.Tensor) -> tuple:
        """Replay the round's attention-input graph on the bonus token and h -> (kv, attn, (token, h, q_pos) inputs).
        length: the bonus's position, a host int or a [1] device tensor (a pipelined round's)."""
        if self.draft_prep is None:
            static = (token.reshape(()).clone(), h.clone(), torch.zeros(1, dtype=torch.long, device=self.be.device))
            _set_length(static[2], length)
            self.draft_prep = (*self._capture(self.draft_inputs, static[2:]), static)
        g, (kv, attn), (t_in, h_in, q_in) = self.draft_prep
        t_in.copy_(token.reshape(()))
        h_in.copy_(h)
        _set_length(q_in, length)
        g.replay()
        return kv, attn, (t_in, h_in, q_in)

    @torch.inference_mode()
    def draft(self, token: torch.Tensor, h: torch.Tensor, k: int, length: int) -> torch.Tensor:
        kv, attn, (t_in, h_in, q_in) = self._prep(token, h, length)
        for i in range(k):  # a step is captured after the previous one ran: its warm-up reads real outputs
            if i == len(self.draft_steps):
                prev = (t_in, h_in) if i == 0 else self.draft_steps[i - 1][1]
                self.draft_steps.append(self._capture(lambda t, hh: self.draft_step(t, hh, q_in, kv, attn), prev))
            self.draft_steps[i][0].replay()
        return torch.stack([out[0] for _, out in self.draft_steps[:k]])

    @torch.inference_mode()
    def draft_sampled(self, token: torch.Tensor, h: torch.Tensor, k: int, length: int, sp: SamplingParams,
                      u: torch.Tensor) -> Draft:
        """k sampled draft steps, one graph each (per sampling settings), reading k uniforms u drawn by the caller.
        Step i also writes its outputs into row i of buffers per sampling settings: the Draft is views of them
        (valid until the next sampled draft), which is what `accept` reads without a copy."""
        kv, attn, (t_in, h_in, q_in) = self._prep(token, h, length)
        self.uniforms[:k].copy_(u)
        steps = self.sampled_steps.setdefault(sp, [])
        for i in range(k):
            if i == len(steps):
                prev = (t_in, h_in) if i == 0 else steps[i - 1][1][:2]
                ui = self.uniforms[i]  # a view: the graph reads whatever this round wrote there
                steps.append(self._capture(lambda t, hh, i=i, ui=ui: self._sampled_into(i, sp, t, hh, ui, q_in, kv,
                                                                                         attn), prev))
            steps[i][0].replay()
        toks, picks, q, ids = self.sampled_out[sp]
        return Draft(toks[:k], picks[:k], q[:k], None if ids is None else ids[:k])

    def _sampled_into(self, i: int, sp: SamplingParams, *args) -> tuple:
        """Draft step i (`sampled_step`), its token, pick, q and ids also written into row i of sampled_out[sp]."""
        out = self.sampled_step(*args, sp)
        tok, _, j, q, ids = out
        if sp not in self.sampled_out:  # allocated at the first capture's warm-up
            m, dev = self.be.max_draft, self.be.device
            self.sampled_out[sp] = (torch.zeros(m, dtype=torch.long, device=dev), torch.zeros(m, dtype=torch.long,
                                    device=dev), q.new_zeros(m, q.numel()), None if ids is None else ids.new_zeros(m, ids.numel()))
        for buf, x in zip(self.sampled_out[sp], (tok, j, q, ids), strict=True):
            if buf is not None:
                buf[i].copy_(x)
        return out

    def _accept_rule(self, lg: torch.Tensor, toks: torch.Tensor, picks: torch.Tensor, q: torch.Tensor,
                     ids: torch.Tensor | None, u: torch.Tensor, k: torch.Tensor, sp: SamplingParams, verify: str
                     ) -> torch.Tensor:
        """[n, next]: the rule `verify` names (sampling.VERIFY) on inputs padded to max_draft drafts, k of them live
        (the acceptance graph; compiled with the steps)."""
        return torch.stack(VERIFY[verify](self.be.ops, toks, picks, q, ids, lg, sp, u, k))

    def _sample(self, logits: torch.Tensor, u: torch.Tensor, sp: SamplingParams) -> torch.Tensor:
        """A sampled plain step's pick from its logits [V] with uniform u, as the plain chunk's graph captures it."""
        return self.be.ops.pick(probs(self.be.ops, logits, sp), u)

    @torch.inference_mode()
    def accept(self, d: Draft, logits: torch.Tensor, sp: SamplingParams, u: torch.Tensor, verify: str = "block"
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """sampling.VERIFY[verify](ops, d..., logits, sp, u) as one graph per sampling settings and rule, for every k:
        its inputs padded to max_draft drafts, k a device scalar. It reads the sampled draft's buffers and the verify
        graph's logits where those graphs wrote them (rows copied in only when they are other tensors)."""
        k = d.tokens.numel()
        if (sp, verify) not in self.accepts:
            static = self._accept_inputs(sp, d, logits)
            k_in = torch.zeros((), dtype=torch.long, device=self.be.device)
            self.accepts[sp, verify] = (*self._capture(lambda *x: self.accept_rule(*x, sp, verify), (*static, k_in)),
                                        (*static, k_in))
        g, out, static = self.accepts[sp, verify]
        for dst, src in zip(static, (logits, d.tokens, d.picks, d.q, d.ids, u), strict=False):
            if dst is not None and dst.data_ptr() != src.data_ptr():
                dst[:src.shape[0]].copy_(src)
        static[-1].fill_(k)  # (a host int into a device scalar: no sync)
        g.replay()
        return out[0], out[1]

    def _accept_inputs(self, sp: SamplingParams, d: Draft, logits: torch.Tensor) -> tuple:
        """The acceptance graph's padded inputs: the verify graph's logits [max_draft + 1, V] when its width is that,
        the sampled draft's buffers (sampled_out[sp]) when it has them, else buffers of their own; the uniforms."""
        m = self.be.max_draft
        verify = self.verify_graphs.get(self.width)
        lg = verify[1][0] if self.width == m + 1 and verify is not None else logits.new_zeros(m + 1, logits.shape[-1])
        drafts = self.sampled_out.get(sp)
        if drafts is None or drafts[2].shape[-1] != d.q.shape[-1] or (drafts[3] is None) != (d.ids is None):
            drafts = (d.tokens.new_zeros(m), d.picks.new_zeros(m), d.q.new_zeros(m, d.q.shape[-1]),
                      None if d.ids is None else d.ids.new_zeros(m, d.ids.shape[-1]))
        return (lg, *drafts, self.uniforms_accept)

    # ------------------------------------------------------------------ draft trees (runtime/tree.py), sampling
    def verify_tree(self, tokens: torch.Tensor, depth: torch.Tensor, see: torch.Tensor, start: int | torch.Tensor,
                    w: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A tree verify as one graph per width (rows padded to `width`: one compiled shape for every k of a w). A padding
        row is a copy of the last row (its token, position, depth and ancestors; no row sees it), so it writes the K/V
        the last row writes, where that row writes them: nothing past the tree's own positions."""
        n = tokens.numel()
        key = (w, n, width)
        rows = self.be._pad_rows(n, width)
        if key not in self.tree_layouts:
            sw = torch.zeros(width, width, dtype=torch.bool, device=depth.device)
            sw[:, :n] = see[rows]
            self.tree_layouts[key] = (depth[rows], sw)
        d, sw = self.tree_layouts[key]
        if width not in self.tree_graphs:
            static = (tokens.view(-1)[rows].view(1, width), rows + start, d.clone(), sw.clone())

            def fn(t, p, dd, ss):
                o = self.step(t, p, self.be.cache, True, None, (dd, ss))
                return o.logits[0], o.hidden[0]
            if self.be.compile == "all":
                note(f"torch.compile: the target's draft-tree step of {width} rows (once per process; cached on disk)")
            self.tree_graphs[width] = (*self._capture(fn, static), static)
        self.tree_width[w] = width
        g, (logits, hidden), (t_in, p_in, d_in, s_in) = self.tree_graphs[width]
        torch.index_select(tokens.view(-1), 0, rows, out=t_in.view(width))
        torch.add(rows, start, out=p_in)
        d_in.copy_(d)
        s_in.copy_(sw)
        g.replay()
        return logits[:n], hidden[:n]

    @torch.inference_mode()
    def draft_tree(self, token: torch.Tensor, h: torch.Tensor, k: int, w: int, length: int, sp: SamplingParams,
                   u: torch.Tensor):
        """tree.draft_tree as k graphs (per sampling settings and w) reading the w k uniforms u; the TreeDraft is views
        of buffers per (sp, w), valid until the next tree draft."""
        from mtpkit.runtime.tree import TreeDraft
        kv, attn, (t_in, h_in, q_in) = self._prep(token, h, length)
        if w not in self.uniforms_tree:
            self.uniforms_tree[w] = torch.zeros(w * self.be.max_draft, device=self.be.device)
        uniforms = self.uniforms_tree[w]
        uniforms[:w * k].copy_(u)
        key = (sp, w)
        steps = self.tree_steps.setdefault(key, [])
        for i in range(k):
            if i == len(steps):
                ui = uniforms[w * i:w * (i + 1)]  # a view: the graph reads whatever this round wrote there
                if i == 0:
                    fn = lambda t, hh, ui=ui: self._tree_into(key, 0, self.tree_first(t, hh, ui, q_in, kv, attn, sp))  # noqa: E731
                    prev = (t_in, h_in)
                else:
                    fn = lambda t, hh, i=i, ui=ui: self._tree_into(key, i, self.tree_rows(t, hh, ui, q_in, kv, attn, sp))  # noqa: E731
                    prev = steps[i - 1][1][:2]
                steps.append(self._capture(fn, prev))
            steps[i][0].replay()
        toks, picks, q, ids, valid = self.tree_out[key]
        return TreeDraft(toks[:, :k], picks[:, :k], q[:, :k], None if ids is None else ids[:, :k], valid)

    def _tree_into(self, key: tuple, i: int, out: tuple) -> tuple:
        """Step i's tokens, picks, q and ids also written into column i of the (sp, w) buffers (q and ids of step 0:
        the shared first step's, in every row; its valid flags too)."""
        tok, _, j, q, ids = out[:5]
        w = tok.numel()
        if key not in self.tree_out:  # allocated at the first capture's warm-up
            m, dev, N = self.be.max_draft, self.be.device, q.shape[-1]
            self.tree_out[key] = (torch.zeros(w, m, dtype=torch.long, device=dev),
                                  torch.zeros(w, m, dtype=torch.long, device=dev), q.new_zeros(w, m, N),
                                  None if ids is None else ids.new_zeros(w, m, N), torch.zeros(w, dtype=torch.bool, device=dev))
        toks, picks, qb, idb, valid = self.tree_out[key]
        toks[:, i].copy_(tok)
        picks[:, i].copy_(j)
        qb[:, i].copy_(q.expand(w, -1))
        if idb is not None:
            idb[:, i].copy_(ids.expand(w, -1))
        if i == 0:
            valid.copy_(out[5])
        return out

    @torch.inference_mode()
    def accept_tree(self, d, logits: torch.Tensor, sp: SamplingParams, u: torch.Tensor, verify: str = "block") -> tuple:
        """tree.accept_tree(ops, d, logits, sp, u, verify=verify) as one graph per (sp, w, K, verify) for every k <= K:
        the chains padded to K drafts (K of the last tree verify of w chains, whose padded logits it reads in place), k
        a device scalar."""
        w, k = d.shape
        K = max(k, (self.tree_width.get(w, 1) - 1) // w)
        key = (sp, w, K, verify)
        if key not in self.tree_accept_inputs:
            tv = self.tree_graphs.get(1 + w * K)  # the padded tree verify's graph, (graph, outputs)
            lg = tv[1][0] if tv is not None else logits.new_zeros(1 + w * K, logits.shape[-1])
            pad = lambda x: None if x is None else x.new_zeros(w, K, *x.shape[2:])  # noqa: E731
            self.tree_accept_inputs[key] = (lg, pad(d.tokens), pad(d.picks), pad(d.q), pad(d.ids), d.valid.clone(),
                                            u.new_zeros(w + K + 1), torch.zeros((), dtype=torch.long, device=self.be.device))
        static = self.tree_accept_inputs[key]
        lg, toks, picks, q, ids, valid, uu, k_in = static
        if lg.data_ptr() != logits.data_ptr():
            lg[:logits.shape[0]].copy_(logits)
        for dst, src in ((toks, d.tokens), (picks, d.picks), (q, d.q), (ids, d.ids)):
            if dst is not None:
                dst[:, :k].copy_(src)
        valid.copy_(d.valid)
        uu[:u.shape[0]].copy_(u)
        k_in.fill_(k)  # (a host int into a device scalar: no sync)
        if key not in self.tree_accepts:  # (captured on this round's inputs: its warm-up runs read real drafts)
            self.tree_accepts[key] = self._capture(lambda *x: self.tree_accept_rule(*x, sp, verify), static)
        g, out = self.tree_accepts[key]
        g.replay()
        return out[0], out[1], out[2]

    def _tree_accept_rule(self, lg: torch.Tensor, toks: torch.Tensor, picks: torch.Tensor, q: torch.Tensor,
                          ids: torch.Tensor | None, valid: torch.Tensor, u: torch.Tensor, k: torch.Tensor,
                          sp: SamplingParams, verify: str = "block") -> torch.Tensor:
        """[c, n, next]: tree.accept_tree on chains padded to K drafts, k of them live (compiled with the steps)."""
        from mtpkit.runtime.tree import TreeDraft, accept_tree
        return torch.stack(accept_tree(self.be.ops, TreeDraft(toks, picks, q, ids, valid), lg, sp, u, k, verify))

    @torch.inference_mode()
    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """cache.move(src, dst) as one graph per m = src.numel(), captured moving dst onto itself: the warm-up runs
        then change nothing (a move is not idempotent where src and dst overlap, as a tree's rows do)."""
        m = src.numel()
        if m not in self.moves:
            static = (dst.clone(), dst.clone())
            self.moves[m] = (self._capture(lambda s_in, d_in: self.be.cache.move(s_in, d_in), static)[0], static)
        g, (s_in, d_in) = self.moves[m]
        s_in.copy_(src)
        d_in.copy_(dst)
        g.replay()
