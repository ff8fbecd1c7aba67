"""A drafter that knows the answer: wraps any backend and drafts the known plain-greedy continuation,
corrupting each draft token with probability `corrupt`.

Random drafters get almost nothing accepted, so they cannot show that verifying k + 1 tokens at once
gives the same greedy tokens as decoding one at a time. This one gets long runs accepted and random
rejections, on any backend: the losslessness check for every port.
"""

from __future__ import annotations

import random

from mtpkit.runtime.backend import DraftStep


class OracleDrafter:
    """draft_step proposes the next token of `future` as the single candidate of a sparse head (so greedy and
    sampled drafting both propose it); h is passed through."""
    fused_greedy_draft = None  # never the wrapped backend's fast paths: they would run the real drafter
    fused_sampled_draft = None

    def __init__(self, backend, future: list[int], prompt_len: int, corrupt: float = 0.2, seed: int = 0):
        self.inner = backend
        self.future, self.prompt_len, self.corrupt = future, prompt_len, corrupt
        self.rng = random.Random(seed)
        self.has_drafter = True
        self._round = (-1, 0)  # (cache length of the round, steps taken)

    def __getattr__(self, name):  # everything but drafting is the wrapped backend's
        return getattr(self.inner, name)

    @property
    def length(self) -> int:
        return self.inner.length

    def start(self, prompt):
        self._round = (-1, 0)
        return self.inner.start(prompt)

    def draft_step(self, token, h) -> DraftStep:
        length = self.inner.length
        step = self._round[1] if self._round[0] == length else 0
        self._round = (length, step + 1)
        i = length - self.prompt_len + 1 + step  # index in `future` of this step's token
        t = self.future[i] if i < len(self.future) else 0
        if self.rng.random() < self.corrupt:
            t = (t + 1) % self.inner.vocab_size
        ops = self.inner.ops
        return DraftStep(ops.float32(ops.tokens([0])), ops.tokens([t]), h)
