"""The few array operations the loop, the draft policy and acceptance need, for one array library.

Sampling and acceptance (sampling.py) and the draft policy (draft.py) are written once against this small
interface; a backend hands the loop the `Ops` of the arrays it returns: `NumpyOps` here (llama.cpp, MLX and
the coming ONNX / Core ML backends: no torch), `TorchOps` in torch_backend.py (tensors stay on the GPU, so
drafting and acceptance need no host sync per step). Random numbers come from `ops.generator(seed)`; draws
are `pick(p, u)` of uniforms drawn ahead (so a CUDA graph can replay a sampled draft step).
Shapes: V = vocabulary, N = candidates of one draft step (V for a dense head), k = drafts.
"""

from __future__ import annotations

import numpy as np


class NumpyOps:
    name = "numpy"

    @staticmethod
    def generator(seed: int) -> np.random.Generator:
        return np.random.default_rng(seed)

    @staticmethod
    def tokens(ids: list[int]) -> np.ndarray:
        return np.asarray(ids, dtype=np.int64).reshape(len(ids))

    @staticmethod
    def to_list(x) -> list[int]:
        return np.asarray(x).reshape(-1).tolist()

    @staticmethod
    def cat(xs: list) -> np.ndarray:
        return np.concatenate([np.asarray(x).reshape(-1) for x in xs])

    @staticmethod
    def stack(xs: list) -> np.ndarray:
        return np.stack(xs)

    @staticmethod
    def argmax(x) -> np.ndarray:
        return np.asarray(x).argmax(-1)

    @staticmethod
    def index(x, i) -> np.ndarray:
        """x[i] for a 0-d index array i: an element of a 1-D x, a row of a 2-D x."""
        return x[int(i)]

    @staticmethod
    def clamp_max(x, m: int) -> np.ndarray:
        return np.minimum(x, m)

    @staticmethod
    def top_prob(logits) -> float:
        """max softmax(logits) of a 1-D row, on the host."""
        x = np.asarray(logits, dtype=np.float64)
        return float(1.0 / np.exp(x - x.max()).sum())

    @staticmethod
    def float32(x) -> np.ndarray:
        return np.asarray(x, dtype=np.float32)

    @staticmethod
    def sort_desc(x) -> np.ndarray:
        return -np.sort(-x, axis=-1)

    @staticmethod
    def softmax(x) -> np.ndarray:
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    @staticmethod
    def arange(n: int, like=None) -> np.ndarray:
        return np.arange(n)

    @staticmethod
    def logsumexp(x) -> np.ndarray:
        """log(sum(exp(x))) along the last axis (-inf entries allowed, not all of a row)."""
        m = x.max(-1, keepdims=True)
        return (np.log(np.exp(x - m).sum(-1, keepdims=True)) + m)[..., 0]

    @staticmethod
    def exp(x) -> np.ndarray:
        return np.exp(x)

    @staticmethod
    def cumsum(x) -> np.ndarray:
        return np.cumsum(x, axis=-1)

    @staticmethod
    def count(mask) -> np.ndarray:
        """[..., n] bool -> [..., 1] int64 number of True along the last axis."""
        return mask.sum(-1, keepdims=True, dtype=np.int64)

    @staticmethod
    def take_along(x, idx) -> np.ndarray:
        return np.take_along_axis(x, idx, axis=-1)

    @staticmethod
    def mask_below(x, threshold) -> np.ndarray:
        return np.where(x < threshold, np.float32(-np.inf), x)

    @staticmethod
    def leading_count(mask) -> np.ndarray:
        """Length of the all-True prefix of a 1-D bool array, as a 0-d int64 array."""
        return np.int64(np.cumprod(np.asarray(mask, dtype=np.int64)).sum())

    @staticmethod
    def rand(rng: np.random.Generator, n: int, like=None) -> np.ndarray:
        return rng.random(n, dtype=np.float32)

    @staticmethod
    def pick(p, u) -> np.ndarray:
        """Inverse CDF: the index i with cdf[i - 1] <= u * total < cdf[i] of a 1-D probability vector p (need not
        be normalized) and a uniform u in [0, 1): one draw from p. Never an index of probability 0."""
        c = np.cumsum(np.asarray(p, dtype=np.float64))
        return np.int64(min(np.searchsorted(c, float(u) * c[-1], side="right"), c.size - 1))

    @classmethod
    def pick_rows(cls, p, u) -> np.ndarray:
        """[w] one `pick` per row of p [w, N] with uniforms u [w]."""
        return np.stack([cls.pick(row, x) for row, x in zip(p, u, strict=True)])

    @staticmethod
    def zero_at(x, i) -> np.ndarray:
        """A copy of the 1-D x with x[i] = 0 (i a 0-d index array)."""
        x = x.copy()
        x[int(i)] = 0
        return x

    @staticmethod
    def column(x, i) -> np.ndarray:
        """x[:, i] for a 0-d index array i."""
        return x[:, int(i)]

    @staticmethod
    def where(cond, a, b) -> np.ndarray:
        return np.where(cond, a, b)

    @staticmethod
    def full_like(x, value) -> np.ndarray:
        return np.full_like(x, value)

    @classmethod
    def sample(cls, p, rng: np.random.Generator) -> np.ndarray:
        """One index drawn from a 1-D probability vector (need not be normalized), as a 0-d int64 array."""
        return cls.pick(p, rng.random())

    @staticmethod
    def residual(p, q, ids) -> np.ndarray:
        """norm(max(0, p - q)) for one position: p [V] target probabilities, q the draft's over candidates ids [N]
        (ids None: q is over the vocabulary). Falls back to p when the residual is all zero (p == q)."""
        r = p.copy()
        if ids is None:
            r = np.maximum(p - q, 0)
        else:
            r[ids] = np.maximum(p[ids] - q, 0)
        total = float(r.sum())
        return r / total if total > 0 else p
