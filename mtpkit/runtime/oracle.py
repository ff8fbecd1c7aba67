"""A drafter that knows the answer: wraps any backend and drafts the known plain-greedy continuation,
corrupting each draft token with probability `corrupt`.

Random drafters get almost nothing accepted, so they cannot show that verifying k + 1 tokens at once
gives the same greedy tokens as decoding one at a time. This one gets long runs accepted and random
rejections, on any backend: the losslessness check for every port.
"""

from __future__ import annotations

import random

import torch

from mtpkit.runtime.backend import Draft


class OracleDrafter:
    def __init__(self, backend, future: list[int], prompt_len: int, corrupt: float = 0.2, seed: int = 0):
        self.inner = backend
        self.future, self.prompt_len, self.corrupt = future, prompt_len, corrupt
        self.rng = random.Random(seed)
        self.has_drafter = True

    def __getattr__(self, name):  # everything but drafting is the wrapped backend's
        return getattr(self.inner, name)

    @property
    def length(self) -> int:
        return self.inner.length

    def draft(self, token, h, k, sampling, generator, min_confidence=None) -> Draft:
        i = self.inner.length - self.prompt_len + 1  # index in `future` of the token after the bonus
        V = self.inner.vocab_size
        toks = [t if self.rng.random() > self.corrupt else (t + 1) % V for t in self.future[i:i + k]]
        toks += [0] * (k - len(toks))
        return Draft(torch.tensor(toks, dtype=torch.long, device=self.inner.device), None)
