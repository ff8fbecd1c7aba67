"""The one parity check of every export: the exported target's logits vs the float32 reference's on a probe.

`compare_logits` is the metric (max |logit diff| and argmax agreement) and the gate: beyond a format's tolerance
it raises, and since every exporter checks before anything lands in OUT, nothing is written. `walk` and
`check_draft_steps` run an exported pair through a runtime backend's steps (ONNX, Core ML) for those checks.
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


def walk(be, tokens: list[int], split: int, chunk: int = 4) -> tuple[np.ndarray, list[int], list]:
    """Through a backend: prefill tokens[:split], then verify the rest `chunk` at a time -> (logits [len - split + 1,
    V], the cache length each verify started at, the hidden row before each verify)."""
    logits, h = be.start(tokens[:split])
    rows, starts, hs = [logits[None]], [], []
    for i in range(split, len(tokens), chunk):
        starts.append(be.length)
        hs.append(h)
        lg, hid = be.verify(be.ops.tokens(tokens[i:i + chunk]))
        rows.append(lg)
        h = hid[-1]
    return np.concatenate(rows), starts, hs


def check_draft_steps(ref, drafter, be, tokens: list[int], tolerance: tuple[float, float], min_argmax: float,
                      what: str, chunk: int = 4) -> dict[str, Any]:
    """Draft steps of an exported pair (backend `be` with its drafter; the target's K/V and h from the exported
    target, at the start of each verify of `walk` over `tokens` split in half) vs the reference drafter on the
    reference target's cache: the candidates' logits against the reference's dense logits at the same ids
    (compare_logits, tolerance[0]) and the next h (tolerance[1] x the largest |h|). Raises beyond either."""
    import torch

    from mtpkit.model.drafter import target_kv
    _, starts, hs = walk(be, tokens, max(1, len(tokens) // 2), chunk)
    steps = []
    for q, h in reversed(list(zip(starts, hs, strict=True))):  # replay, latest first: roll back to q, draft there
        be.rollback(q)
        steps.insert(0, be.draft_step(be.ops.tokens([tokens[q]]), h))
    ids = [s.ids if s.ids is not None else np.arange(len(s.logits)) for s in steps]
    with torch.no_grad():
        cache = ref.new_cache(len(tokens) + 8)
        o = ref(torch.tensor([tokens]), cache)
        q = torch.tensor(starts)
        x, h_next = drafter.body(ref.embed(torch.tensor([[tokens[i] for i in starts]])), o.hidden[:, q - 1], q,
                                 target_kv(cache, ref.config))
        dense = drafter.dense_logits(x)[0].numpy()
    want = np.stack([dense[r, i] for r, i in enumerate(ids)])
    res = compare_logits(want, np.stack([s.logits for s in steps]), tolerance[0], min_argmax, what)
    h_diff = float(np.abs(np.stack([s.h for s in steps]) - h_next[0].numpy()).max())
    h_scale = float(h_next.abs().max())
    if not h_diff <= tolerance[1] * h_scale:
        raise MtpkitError(f"{what} differs from the reference beyond tolerance: max |next h diff| {h_diff:.3g} "
                          f"(tolerance {tolerance[1]} x {h_scale:.3g}); nothing written")
    return {**res, "steps": len(starts), "max_abs_h_diff": h_diff, "h_scale": h_scale}
