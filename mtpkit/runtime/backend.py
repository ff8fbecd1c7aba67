"""The contract between the speculative loop and a runtime (torch today; llama.cpp, MLX, Core ML, ONNX next).

A backend owns the target, its KV cache and the drafter that reads that cache. The loop only calls
these methods, with torch tensors on `backend.device`; acceptance is the loop's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from mtpkit.runtime.sampling import SamplingParams


@dataclass
class Draft:
    tokens: torch.Tensor  # [k'] int64, k' <= k (fewer when adaptive drafting stopped early)
    q: torch.Tensor | None  # [k', V] draft probabilities the tokens were sampled from (None when greedy)


class Backend(Protocol):
    device: torch.device
    vocab_size: int
    max_len: int  # positions the cache holds (prompt + generated)
    has_drafter: bool

    @property
    def length(self) -> int:
        """Positions currently in the target cache."""

    def start(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reset, then prefill prompt [T] -> (logits [V] at the last position, post-norm hidden [d] there)."""

    def verify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run tokens [n] at positions length..length+n-1 in one target forward -> (logits [n, V], hidden [n, d])."""

    def rollback(self, length: int) -> None:
        """Forget cache positions >= length (rejected drafts). Must raise if it cannot."""

    def draft(self, token: torch.Tensor, h: torch.Tensor, k: int, sampling: SamplingParams,
              generator: torch.Generator | None, min_confidence: float | None = None) -> Draft:
        """Propose up to k tokens after `token` (the bonus, not yet in the cache) from target hidden h [d].

        All steps query at position `length`. With min_confidence, stop once the drafter's top
        probability falls below it (the token that failed is not proposed)."""

    def clock(self) -> object:
        """A timestamp; `elapsed(a, b)` turns two of them into seconds (CUDA events on GPUs: no sync)."""

    def elapsed(self, a: object, b: object) -> float: ...
