"""Sampling and acceptance rules, as pure functions on torch tensors.

`probs` applies temperature, top-k and top-p the same way to target and draft logits. Acceptance:
- `accept_greedy`: the longest prefix of drafts equal to the target's argmax, then the target's next argmax.
- `accept_rejection`: Leviathan et al. / Chen et al. speculative sampling: accept d_i with probability
  min(1, p_i(d_i) / q_i(d_i)); at the first rejection sample from norm(max(0, p_i - q_i)); if all k are
  accepted sample the bonus from p_k. The output is distributed exactly as p, whatever q is, as long as
  each d_i was drawn from q_i (tests/test_sampling.py checks this with a chi-square test).
Both return (n_accepted, next_token) after one host sync.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpkit.errors import MtpkitError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise MtpkitError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise MtpkitError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise MtpkitError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] float32 probabilities after temperature, top-k, top-p."""
    x = logits.float() / p.temperature
    if p.top_k and p.top_k < x.shape[-1]:
        kth = x.topk(p.top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        s, idx = x.sort(dim=-1, descending=True)
        cum = s.softmax(-1).cumsum(-1)
        drop = (cum - s.softmax(-1)) >= p.top_p  # keep the smallest prefix whose mass reaches top_p
        x = x.scatter(-1, idx, s.masked_fill(drop, float("-inf")))
    return x.softmax(-1)


def sample(pr: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """[..., V] probabilities -> [...] int64 samples."""
    flat = pr.reshape(-1, pr.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(pr.shape[:-1])


def accept_greedy(drafts: torch.Tensor, target_logits: torch.Tensor) -> tuple[int, int]:
    """drafts [k], target_logits [k + 1, V] (row i predicts the token after draft i) -> (n, next)."""
    tgt = target_logits.argmax(-1)
    k = drafts.shape[0]
    n = int((drafts == tgt[:k]).int().cumprod(0).sum()) if k else 0
    return n, int(tgt[n])


def accept_rejection(drafts: torch.Tensor, q: torch.Tensor, p: torch.Tensor,
                     generator: torch.Generator | None = None) -> tuple[int, int]:
    """drafts [k] drawn from q [k, V]; p [k + 1, V] target probabilities -> (n_accepted, next token)."""
    k = drafts.shape[0]
    if k:
        idx = drafts[:, None]
        ratio = p[:k].gather(1, idx)[:, 0] / q.gather(1, idx)[:, 0].clamp_min(1e-30)
        u = torch.rand(k, generator=generator, device=p.device)  # the generator lives on p's device
        n = int((u < ratio).int().cumprod(0).sum())
    else:
        n = 0
    if n < k:
        resid = (p[n] - q[n]).clamp_min(0)
        total = resid.sum()
        dist = resid / total if float(total) > 0 else p[n]  # total == 0 only if p == q up to rounding
    else:
        dist = p[k]
    return n, int(sample(dist, generator))
