"""The one parity check of every export: the exported target's logits vs the float32 reference's on a probe.

`compare_logits` is the metric (max |logit diff| and argmax agreement) and the gate: beyond a format's tolerance
it raises, and since every exporter checks before anything lands in OUT, nothing is written.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mtpkit.errors import MtpkitError

PROBE_TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return"
PROBE_MAX = 32


def probe_tokens(tokenizer) -> list[int]:
    """The token ids every export is checked on (a fixed range for a target without a tokenizer)."""
    ids = tokenizer.encode(PROBE_TEXT) if tokenizer is not None else list(range(2, 24))
    return ids[:PROBE_MAX]


def reference_logits(ref, tokens: list[int]) -> np.ndarray:
    """[T, V] float32 logits of the reference target (a GemmaModel, run in float32) on `tokens`."""
    import torch
    with torch.no_grad():
        return ref.float()(torch.tensor([tokens])).logits[0].numpy()


def compare_logits(want: np.ndarray, got: np.ndarray, tolerance: float, min_argmax: float, what: str) -> dict[str, Any]:
    """want, got: [T, V] logits (reference, export). Raises beyond `tolerance` (max |diff|) or below `min_argmax`
    (fraction of positions with the same argmax); a non-finite logit is always beyond."""
    want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
    if want.shape != got.shape:
        raise MtpkitError(f"{what}: logits of shape {got.shape}, the reference's are {want.shape}; nothing written")
    diff = float(np.abs(got - want).max())
    agree = float((got.argmax(-1) == want.argmax(-1)).mean())
    res = {"max_abs_logit_diff": diff, "argmax_agreement": agree, "tolerance": tolerance, "min_argmax": min_argmax}
    if not np.isfinite(diff) or diff > tolerance or agree < min_argmax:
        raise MtpkitError(f"{what} differs from the reference beyond tolerance: max |logit diff| {diff:.3g} "
                          f"(tolerance {tolerance}), argmax agreement {agree:.2f} (at least {min_argmax}); nothing written")
    return res
