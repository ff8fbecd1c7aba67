"""Building blocks shared by the target and the drafter: Gemma RMSNorm, RoPE, GeGLU, masked attention."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + w), computed in float32 (GGUF files store 1 + w)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel where torch has one (fewer launches per decode step)
        return F.rms_norm(x.float(), x.shape[-1:], 1.0 + self.weight.float(), self.eps).type_as(x)


_weight_major = False  # set by `weight_major`: process-wide, a plain global (torch.compile traces it, not a ContextVar)


@contextmanager
def weight_major() -> Iterator[None]:
    """Inside: `linear` computes x @ w.T as (w @ x.T).T, the weight as GEMM's left operand. The torch backend on a
    CPU runs its steps so: MKL streams a [V, d] weight for a few rows 2-5x faster that way round (this repo's
    2-core AMD CPU, [262144, 640] float32 head: 61 ms for 1 row either way; 2 rows 136 -> 30 ms, 4 rows
    141 -> 43 ms, 6 rows 151 -> 73 ms). Off by default: traced exports keep x @ w.T (a MatMul with a constant
    weight is what their quantizers rewrite)."""
    global _weight_major
    before, _weight_major = _weight_major, True
    try:
        yield
    finally:
        _weight_major = before


def linear(x: torch.Tensor, w: torch.Tensor, fallback=F.linear) -> torch.Tensor:
    """x [..., in] @ w [out, in].T: `fallback(x, w)`, or inside `weight_major` (w @ x.T).T."""
    if _weight_major and x.dim() > 1:
        return torch.mm(w, x.reshape(-1, x.shape[-1]).T).T.reshape(*x.shape[:-1], w.shape[0])
    return fallback(x, w)


class Linear(nn.Linear):
    """nn.Linear without bias, through `linear` (same parameters and state_dict keys)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


def fuse_linears(*linears: nn.Linear) -> torch.Tensor:
    """One [sum of outputs, in] weight for linears that read the same input, the linears' weights becoming views
    of it (no second copy): a decode step then runs one small GEMM where it ran several, each a launch.
    Modules use it only with gradients off (inference); an in-place update of the linears' weights updates it too."""
    w = torch.cat([m.weight.detach() for m in linears])
    at = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = w[at:at + n]
        at += n
    return w


class GeGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden)
        self.up_proj = Linear(dim, hidden)
        self.down_proj = Linear(hidden, dim)
        self.register_buffer("fused", None, persistent=False)  # fuse(): gate and up as one [2 * hidden, dim] weight

    def fuse(self) -> None:
        self.register_buffer("fused", fuse_linears(self.gate_proj, self.up_proj), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None and not torch.is_grad_enabled():  # (gradients reach the separate weights only)
            gate, up = linear(x, self.fused).chunk(2, -1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


def rope_inv_freq(head_dim: int, theta: float, scaling: float = 1.0) -> torch.Tensor:
    """[head_dim // 2] inverse frequencies; linear scaling divides positions by `scaling`."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)) / scaling


def rope_table(pos: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """pos [T] -> (cos, sin) [T, D] float32, computed once per forward and shared by all layers of a kind."""
    wide = torch.float32 if pos.device.type == "mps" else torch.float64  # float64 angles: exact at long positions
    ang = pos.to(wide)[:, None] * inv_freq.to(device=pos.device, dtype=wide)[None, :]  # [T, D/2]
    ang = torch.cat([ang, ang], -1)
    return ang.cos().to(torch.float32), ang.sin().to(torch.float32)


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate-half (NeoX) RoPE. x [B, H, T, D], rope = rope_table(pos, inv_freq) -> same shape as x."""
    cos, sin = rope
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], -1) * sin).type_as(x)


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, length: int, window: int | None) -> torch.Tensor:
    """[T, S] bool, True = attend. A key is visible iff it is valid (0 <= k < length), causal (k <= q)
    and, for sliding layers, inside the window (q - k < window)."""
    k = k_pos[None, :]
    q = q_pos[:, None]
    m = (k >= 0) & (k < length) & (k <= q)
    if window:
        m = m & ((q - k) < window)  # not &=: traced to an in-place op the Core ML converter lacks
    return m


# On CUDA, attention over at most this many query rows (after GQA folding) skips SDPA: 128 covers a verify of
# 17 tokens (max_draft 16) with 4 query heads per KV head, the Gemma 3 270M and 1B layout.
SMALL_QUERY_ROWS = 128


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, H, T, D], k/v [B, KV, S, D], mask [T, S] or [B, 1, T, S] -> [B, H, T, D].

    GQA without copying K/V: the `rep` query heads sharing a KV head are folded into the query axis.
    On CUDA, a few query rows (decode, verify, drafting) take `_attend_rows` instead of SDPA.
    """
    B, H, T, D = q.shape
    KV = k.shape[1]
    rep = H // KV
    q = q.reshape(B, KV, rep * T, D)
    if rep > 1:  # mask [T, S], or [B, 1, T, S] per row
        mask = mask.repeat(rep, 1) if mask.dim() == 2 else mask.repeat(1, 1, rep, 1)
    if q.device.type == "cuda" and rep * T <= SMALL_QUERY_ROWS:
        return _attend_rows(q, k, v, mask, scale).reshape(B, H, T, D)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.reshape(B, H, T, D)


def _attend_rows(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, KV, R, D] with R <= SMALL_QUERY_ROWS, k/v [B, KV, S, D], mask [R, S] -> [B, KV, R, D].

    Two matmuls and a float32 softmax over the rows padded to SMALL_QUERY_ROWS. Why not SDPA: its fused
    kernels give a KV head one thread block, which scans all S keys alone (H100, one KV head: ~40 us per
    layer at S = 576, ~200 us at S = 4096); cuBLAS spreads S over the GPU. Why the padding: cuBLAS
    picks its algorithm (split-K included) by shape, so with one shape for any R a row's result never
    depends on how many rows came with it: a verify of k + 1 tokens computes bitwise what k + 1 decode
    steps compute, which greedy speculative decoding needs to equal plain decoding.
    """
    R = q.shape[2]
    pad = SMALL_QUERY_ROWS - R
    qf = F.pad(q.float(), (0, 0, 0, pad))
    scores = (qf * scale if scale != 1.0 else qf) @ k.float().transpose(-1, -2)  # float32, as SDPA keeps them
    p = torch.where(F.pad(mask, (0, 0, 0, pad), value=True), scores, float("-inf")).softmax(-1)
    return (p.to(v.dtype) @ v)[:, :, :R]


def softcap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    return logits if not cap else torch.tanh(logits / cap) * cap
