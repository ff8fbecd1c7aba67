"""The target's KV cache: per-layer buffers written by position, rollback by setting a length.

Full-attention layers keep one slot per position. Sliding layers keep a ring of
`sliding_window + slack` slots (slot = position % size) when that is smaller than `max_len`.

Why the ring stays correct after a rollback: with writes always contiguous from `length`, slot s
holds position p(s) = the largest p < length with p % size == s, *except* for slots written by
positions that were rolled back. Those stale slots still hold a position in [length, length + slack),
so the formula reads them as p - size < length - window: outside the window of every later query,
hence masked. That holds only while the highest length ever reached is at most `slack` above the
length rolled back to, so `rollback` raises beyond that instead of silently attending garbage (the
mlx-lm #1423 failure mode). A forward of T tokens writes before it attends, so on a ring it needs
T <= slack + 1; `max_chunk` tells callers (the model chunks longer inputs itself).
"""

from __future__ import annotations

import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import GemmaConfig


class KVCache:
    def __init__(self, config: GemmaConfig, max_len: int, batch: int = 1, *, slack: int = 256,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32):
        if max_len <= 0:
            raise MtpkitError(f"cache max_len must be positive, got {max_len}")
        self.config = config
        self.max_len = max_len
        self.slack = slack
        self.length = 0  # number of positions whose K/V are valid
        self._high = 0  # highest length ever reached: stale ring slots hold positions below it
        w = config.sliding_window or 0
        self.ring_size = w + slack if w and w + slack < max_len else max_len
        self.sizes = [self.ring_size if config.is_sliding(i) else max_len for i in range(config.num_hidden_layers)]
        shape = lambda n: (batch, config.num_key_value_heads, n, config.head_dim)  # noqa: E731
        self.k = [torch.zeros(shape(n), device=device, dtype=dtype) for n in self.sizes]
        self.v = [torch.zeros(shape(n), device=device, dtype=dtype) for n in self.sizes]

    @property
    def has_ring(self) -> bool:
        return self.ring_size < self.max_len

    @property
    def max_chunk(self) -> int:
        """Most tokens one forward may write: a ring must not overwrite keys its own queries need."""
        return self.slack + 1 if self.has_ring else self.max_len

    def is_ring(self, layer: int) -> bool:
        return self.sizes[layer] < self.max_len

    def write(self, layer: int, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v [B, KV, T, D] for positions pos [T] of `layer` (tensor ops only: CUDA-graph safe).

        Bounds (pos < max_len, T <= max_chunk on rings) are the caller's to check: GemmaModel.forward does.
        """
        slots = pos % self.sizes[layer]
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))

    def move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Copy the K/V written at positions src [n] to positions dst [n] in every layer (tensor ops only): a
        draft tree's accepted branch into the positions its tokens hold (runtime/tree.py). The caller sets the
        length after it (rollback); src and dst must be written positions the ring still holds."""
        for i, size in enumerate(self.sizes):
            s, d = src % size, dst % size
            self.k[i].index_copy_(2, d, self.k[i].index_select(2, s))
            self.v[i].index_copy_(2, d, self.v[i].index_select(2, s))

    def key_positions(self, layer: int, length: int | torch.Tensor | None = None) -> torch.Tensor:
        """[S] position held by each slot of `layer` when `length` positions are valid (< 0 = empty).

        Entries >= length (full layers) or < 0 must be masked by the caller.
        """
        n = self.sizes[layer]
        length = self.length if length is None else length
        s = torch.arange(n, device=self.k[layer].device)
        if n == self.max_len:
            return s
        return s + n * torch.div(length - 1 - s, n, rounding_mode="floor")

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(k, v, key_positions) of layer i: views of the buffers, no copy. The drafter reads these."""
        return self.k[i], self.v[i], self.key_positions(i)

    def advance(self, start: int, T: int) -> None:
        """Record that positions start..start+T-1 were written (called once per forward)."""
        self.length = start + T
        self._high = max(self._high, self.length)

    def rollback(self, length: int) -> None:
        """Forget positions >= length. Raises if a sliding ring cannot undo that many positions."""
        if length < 0 or length > self.length:
            raise MtpkitError(f"cannot roll back to {length}: cache holds {self.length} positions")
        if self.has_ring and self._high - length > self.slack:
            raise MtpkitError(
                f"rollback of {self._high - length} positions exceeds the sliding-window slack ({self.slack}); "
                "build the cache with a larger slack")
        self.length = length

    def reset(self) -> None:
        self.length = 0
        self._high = 0
