"""The contract between the loop and a runtime backend: steps, not policy.

A backend owns the target, its KV cache and the drafter that reads that cache, and provides steps:
  start(prompt)          reset, prefill          -> (logits [V], post-norm hidden [d]) at the last position
  verify(tokens [n])     one target forward at positions length..length+n-1 -> (logits [n, V], hidden [n, d])
  rollback(length)       forget positions >= length; raises if it cannot
  draft_step(token, h)   one drafter forward querying at position `length` (the bonus token's, not yet
                         cached) -> DraftStep(logits over candidates or the vocabulary, candidate ids, next h)
Arrays are the backend's own (`ops` says which: numpy, or torch on the backend's device). What to draft
(greedy, sampled, adaptive stop, the draft temperature), what to accept and when to stop live once, in
runtime/draft.py, sampling.py, gate.py and loop.py. A backend may offer `fused_greedy_draft(token, h, k)` and
`fused_sampled_draft(token, h, k, sp, u)` (the CUDA-graphed drafts), `fused_plain(token, n, sp, u)`: n plain
decoding steps with no host sync between them, and `fused_accept(draft, logits, sp, u, verify)`: sampled acceptance as one
graph; the shared contract test proves them equal to the generic policy.

Backends register in runtime/__init__.py and expose `Options` (a dataclass of their load-time options) and
`load(target, drafter, options, max_len, max_draft) -> Loaded`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mtpkit.errors import MtpkitError
from mtpkit.runtime.ops import NumpyOps


def read_manifest(path: Path, fmt: str, what: str) -> dict:
    """An export's JSON manifest whose "format" must be `mtpkit-{fmt}` (written by `mtpkit export --format fmt`)."""
    try:
        m = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MtpkitError(f"{path}: cannot read the {what} export's manifest ({e})") from None
    if m.get("format") != f"mtpkit-{fmt}":
        raise MtpkitError(f"{path} was not written by `mtpkit export --format {fmt}`")
    return m


@dataclass(frozen=True)
class BackendInfo:
    """What runs: for benches, the speedup predictor and `--json` output."""
    name: str  # registry name: torch | llamacpp | mlx
    device: str  # "cpu", "cuda:0", "gpu" (MLX on Apple silicon) ...
    dtype: str  # weights as they run: float32, bfloat16, q8, Q4_K_M ...
    threads: int | None  # CPU threads the backend computes with (None: not a CPU backend)
    target_params: int
    target_bytes: int
    embedding_params: int
    target_config: Any  # GemmaConfig
    drafter_config: Any = None  # DrafterConfig, when the backend holds the reference config
    drafter_params: int = 0
    drafter_bytes: int = 0
    drafter_head: str | None = None  # dense | centroid
    graphs: bool = False  # CUDA graphs (torch on CUDA)
    compile: str | None = None  # torch.compile'd steps: drafter | all
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific settings (llama.cpp context ...)

    @property
    def on_cpu(self) -> bool:
        return self.device.split(":")[0] == "cpu"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_config"] = self.target_config.to_dict()
        d["drafter_config"] = self.drafter_config.to_dict() if self.drafter_config is not None else None
        return d


@dataclass
class DraftStep:
    logits: Any  # [N] float32 logits of the candidates (centroid head) or [V] of the vocabulary (dense head)
    ids: Any | None  # [N] int64 candidate token ids; None = logits are over the vocabulary
    h: Any  # [d_target] the next step's h (backend-native)


@dataclass
class Draft:
    tokens: Any  # [k'] int64 proposed tokens, k' <= k (fewer when adaptive drafting stopped early)
    picks: Any = None  # sampled drafts: [k'] index of each token among its step's candidates
    q: Any = None  # sampled drafts: [k', N] draft probabilities over the candidates (None when greedy)
    ids: Any = None  # sampled drafts, centroid head: [k', N] candidate ids (None: q is over the vocabulary)


@dataclass
class Loaded:
    """What a backend's `load` returns; api.Session wraps it."""
    backend: Any
    tokenizer: Any
    config: Any  # GemmaConfig
    drafter_path: str | None
    source: dict[str, Any]


class Backend:
    """Defaults shared by the backends; the methods below the line are what each must provide."""
    ops: Any = NumpyOps
    vocab_size: int
    max_len: int  # positions the cache holds (prompt + generated)
    has_drafter: bool = False
    # where min_confidence="auto" turns adaptive drafting on (on a CPU; never on a GPU): (at T = 0, at T > 0). It pays
    # where a verified token costs nearly a plain step (llama.cpp on this 2-core CPU), not where a verify of a few
    # tokens costs one step (the torch backend's padded CPU steps, MLX at T > 0): bench/results/cpu_adaptive/
    auto_adaptive: tuple[bool, bool] = (True, True)
    draft_temperature: float = 1.0  # the drafter's calibrated factor (DrafterConfig.draft_temperature)
    fused_greedy_draft = None  # optional: (token, h, k) -> tokens [k], equal to draft.draft(...) when greedy
    fused_sampled_draft = None  # optional: (token, h, k, sp, u) -> Draft, equal to draft.draft(...) when sampling
    # optional: (token, n, sp, u [n] or None) -> (tokens [n], h [d]): n plain decoding steps from `token` (written at
    # position `length`, the cache advances by n), each step's token picked from its logits at sp (argmax, or
    # ops.pick(probs, u[i])); h = the last step's post-norm hidden. Greedy: what n verify([token]) steps give.
    fused_plain = None
    # optional: (draft, logits [k + 1, V], sp, u [k + 1], verify) -> (n, next token) as 0-d arrays: what
    # sampling.VERIFY[verify](ops, ..., logits, sp, u) computes (block or token-wise), run as one replayed graph
    fused_accept = None
    # optional, sampled draft trees (runtime/tree.py): verify_tree(tokens [1 + w k], w, k_max) -> (logits, hidden) of
    # the rows in the tree's layout (k_max: the longest chain of the generation); keep(start, rows): those rows become the positions after start, the cache ends
    # there; draft_rows(tokens [w], h [w, d]) -> DraftStep of w rows: w draft steps side by side in the round that
    # draft_step began
    verify_tree = None
    keep = None
    draft_rows = None
    fused_tree_draft = None  # optional: (token, h, k, w, sp, u [w k]) -> TreeDraft, equal to tree.draft_tree(...)
    fused_accept_tree = None  # optional: (tree, logits, sp, u, verify) -> (c, n, next): tree.accept_tree as one graph
    # optional: (tokens [n], reach [n] or None) -> (rows, hidden [n, d]): verify() with each row's logits computed when
    # first read, rows(i) -> [V], equal to verify()'s row i, rows.computed: the rows computed so far; acceptance reads
    # rows 0..n only (loop.accept_rows); reach: the gate's chance that each row is read, for the backend to plan its
    # work (it may compute a row before it is read). Where the head is most of a verify
    # (llama.cpp on a CPU: runtime/ggml_head.py) a rejected draft then costs no head rows
    verify_rows = None
    # optional: (bonus, h) -> a pipeline whose launch(k, draft_sp, sp, u_draft, u_accept, w, k_max, verify) queues a
    # whole round (w > 1: a draft tree of w chains, verified padded to 1 + w k_max rows; verify: fused_accept's) (draft,
    # verify, acceptance, and the next round's bonus, h and cache length written on the device) without a host sync
    # and returns a Launched whose result() -> (n, next token, drafts, draft_s, verify_s) waits for it (rounds are
    # read in launch order; each commits the host's cache length), abandon() forgets one launched past the end.
    # The loop (loop.pipelined) then queues round r + 1 before it reads round r: the host's work overlaps the GPU's
    pipeline = None

    def clock(self) -> object:
        """A timestamp; `elapsed(a, b)` turns two of them into seconds (CUDA events on GPUs: no sync)."""
        return time.perf_counter()

    def elapsed(self, a: Any, b: Any) -> float:
        return b - a

    def close(self) -> None:
        """Free native resources now (they are freed on garbage collection otherwise)."""

    # ------------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Positions currently in the target cache."""
        raise NotImplementedError

    def info(self) -> BackendInfo:
        raise NotImplementedError

    def start(self, prompt: list[int]) -> tuple[Any, Any]:
        raise NotImplementedError

    def verify(self, tokens: Any) -> tuple[Any, Any]:
        raise NotImplementedError

    def rollback(self, length: int) -> None:
        raise NotImplementedError

    def draft_step(self, token: Any, h: Any) -> DraftStep:
        raise NotImplementedError
