"""The MLX backend: the target is mlx-lm's gemma3_text model (exported by `mtpkit export --format mlx`)
over caches of ours, the drafter a port of mtpkit.model.drafter.DrafterModel reading those caches.

Caches: `PositionCache` speaks mlx-lm's cache protocol (offset, update_and_fetch, make_mask) but keeps
every position of every layer, sliding ones included, and applies the window in the mask. Rollback is
setting `offset`, exact at any depth: mlx-lm's RotatingKVCache cannot undo a trim once its ring wrapped
(mlx-lm #1423/#1914), which is what breaks its own speculative loop past the window.

The loop speaks torch tensors (backend.py); this backend converts at the boundary (logits of the verified
tokens, the hidden row, the draft tokens) and keeps everything else in MLX.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from mtpkit.errors import MtpkitError
from mtpkit.model.config import SLIDING, DrafterConfig
from mtpkit.model.load import INT8_SCALE, dequantize_int8, read_safetensors
from mtpkit.runtime.backend import Draft
from mtpkit.runtime.sampling import SamplingParams, probs, sample

_STEP = 256  # cache growth granularity (positions)


def _mx():
    from mtpkit.runtime.mlx_blas import use_openblas
    use_openblas()  # Linux: MLX's float32 matmuls through OpenBLAS (must precede the first `import mlx`)
    import mlx.core as mx
    return mx


class PositionCache:
    """One layer's K/V, written by position; mlx-lm's attention calls update_and_fetch, its model make_mask."""

    def __init__(self, window: int | None, max_len: int):
        self.window, self.max_len = window, max_len
        self.keys = self.values = None
        self.offset = 0  # positions held = the next write position

    def update_and_fetch(self, k, v):
        mx = _mx()
        n = k.shape[2]
        end = self.offset + n
        if end > self.max_len:
            raise MtpkitError(f"context full: {end} positions > {self.max_len}")
        if self.keys is None or end > self.keys.shape[2]:
            cap = min(self.max_len, -(-end // _STEP) * _STEP)
            grow = lambda a, like: mx.zeros((*like.shape[:2], cap, like.shape[3]), like.dtype) if a is None else \
                mx.concatenate([a, mx.zeros((*a.shape[:2], cap - a.shape[2], a.shape[3]), a.dtype)], axis=2)
            self.keys, self.values = grow(self.keys, k), grow(self.values, v)
        self.keys[..., self.offset:end, :] = k
        self.values[..., self.offset:end, :] = v
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :]

    def make_mask(self, n: int, return_array: bool = False, window_size: int | None = None):
        """[n, offset + n] bool for queries at offset..offset+n-1: causal, and inside the window if sliding."""
        mx = _mx()
        q = mx.arange(self.offset, self.offset + n)[:, None]
        k = mx.arange(self.offset + n)[None, :]
        m = k <= q
        w = window_size or self.window
        if w:
            m = m & ((q - k) < w)
        return m

    def visible(self, length: int):
        """(keys, values) [1, KV, length, D] and the drafter's mask row for a query at `length`."""
        mx = _mx()
        k = mx.arange(length)[None, :]
        m = (k < length)
        if self.window:
            m = m & ((length - k) < self.window)
        return self.keys[..., :length, :], self.values[..., :length, :], m


def _rms_norm(x, w, eps):
    mx = _mx()
    return mx.fast.rms_norm(x.astype(mx.float32), 1.0 + w.astype(mx.float32), eps).astype(x.dtype)


def _gelu_tanh(x):
    mx = _mx()
    return 0.5 * x * (1.0 + mx.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


class MLXDrafter:
    """Port of DrafterModel for one query at a time (B = T = 1); weights = the reference's canonical tensors."""

    def __init__(self, config: DrafterConfig, weights: dict, target_embed):
        """target_embed: the target's (possibly quantized) mlx embedding module, read row-wise by the head."""
        mx = _mx()
        self.c = c = config
        self.w = weights
        self.embed = target_embed
        if c.head == "centroid":
            self.clusters = weights["token_ordering"].astype(mx.int32).reshape(c.num_centroids, c.tokens_per_centroid)

    def _lin(self, name, x):
        return x @ self.w[name].T

    def __call__(self, emb, h, q_pos: int, kv: dict):
        """emb, h [1, 1, d_t] -> (x [1, d] final-normed, h_next [1, 1, d_t])."""
        mx = _mx()
        c, w = self.c, self.w
        dt = w["pre_projection.weight"].dtype
        x = self._lin("pre_projection.weight", mx.concatenate([emb.astype(dt), h.astype(dt)], axis=-1))
        for i, kind in enumerate(c.layer_types):
            p = f"layers.{i}."
            k, v, mask = kv[kind]
            a = _rms_norm(x, w[p + "input_layernorm.weight"], c.rms_norm_eps)
            q = self._lin(p + "self_attn.q_proj.weight", a).reshape(1, 1, c.num_attention_heads, c.head_dim)
            q = _rms_norm(q.transpose(0, 2, 1, 3), w[p + "self_attn.q_norm.weight"], c.rms_norm_eps)
            base = c.rope_local_base_freq if kind == SLIDING else c.rope_theta
            scale = 1.0 if kind == SLIDING else 1.0 / c.rope_scaling_factor
            q = mx.fast.rope(q.astype(mx.float32), c.head_dim, traditional=False, base=base, scale=scale,
                             offset=q_pos).astype(q.dtype)
            o = mx.fast.scaled_dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype), scale=c.attn_scale,
                                                     mask=mask)
            o = self._lin(p + "self_attn.o_proj.weight", o.transpose(0, 2, 1, 3).reshape(1, 1, -1))
            x = x + _rms_norm(o, w[p + "post_attention_layernorm.weight"], c.rms_norm_eps)
            f = _rms_norm(x, w[p + "pre_feedforward_layernorm.weight"], c.rms_norm_eps)
            f = self._lin(p + "mlp.down_proj.weight",
                          _gelu_tanh(self._lin(p + "mlp.gate_proj.weight", f)) * self._lin(p + "mlp.up_proj.weight", f))
            x = (x + _rms_norm(f, w[p + "post_feedforward_layernorm.weight"], c.rms_norm_eps)) * w[p + "layer_scalar"]
        x = _rms_norm(x, w["norm.weight"], c.rms_norm_eps)
        return x[0], self._lin("post_projection.weight", x)

    def head(self, x):
        """x [1, d] -> (logits [N] float32, ids [N] or None): candidates of the centroid head, or the vocabulary."""
        mx = _mx()
        c = self.c
        own = None if c.share_target_embedding else self.w["embed_tokens.weight"]
        if c.head == "dense":
            ids = None
            logits = (x @ own.T) if own is not None else self.embed.as_linear(x)
        else:
            router = (x @ self.w["centroids.weight"].T).astype(mx.float32)[0]
            top = mx.argpartition(-router, c.centroid_top_k - 1)[:c.centroid_top_k]
            ids = self.clusters[top].reshape(-1)
            wt = own[ids] if own is not None else self.embed(ids)  # [N, d] rows (dequantized if quantized)
            logits = x.astype(wt.dtype) @ wt.T
        logits = logits.astype(mx.float32)[0]
        if c.final_logit_softcapping:
            s = c.final_logit_softcapping
            logits = mx.tanh(logits / s) * s
        return logits, ids


def _to_torch(a) -> torch.Tensor:
    mx = _mx()
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return torch.from_numpy(np.array(a))


class MLXBackend:
    def __init__(self, target_dir: str | Path, drafter_dir: str | Path | None = None, *, max_len: int = 4096):
        mx = _mx()
        from mtpkit.export.mlx import load_target
        self.dir = Path(target_dir)
        self.model, self.config, self.tokenizer = load_target(target_dir)
        c = self.config
        self.device = torch.device("cpu")  # where the loop's tensors live; MLX picks its own device
        self.vocab_size, self.max_len = c.vocab_size, max_len
        self.caches = [PositionCache(c.sliding_window if t == SLIDING else None, max_len) for t in c.layer_types]
        self.embed_scale = c.embed_scale
        self.drafter = None
        if drafter_dir is not None:
            self.drafter = self._load_drafter(Path(drafter_dir))
        self.has_drafter = self.drafter is not None
        self.cuda_graphs = False
        self._mx = mx

    def _load_drafter(self, d: Path) -> MLXDrafter:
        mx = _mx()
        if not (d / "config.json").is_file():
            raise MtpkitError(f"{d} is not a drafter directory (no config.json)")
        dc = DrafterConfig.from_dict(json.loads((d / "config.json").read_text()))
        dc.check_target(self.config)
        files = sorted(d.glob("*.safetensors"))
        w: dict = {}
        for f in files:
            w.update(mx.load(str(f)))
        if any(k.endswith(INT8_SCALE) for k in w):  # int8-stored (e.g. the shipped drafter): dequantize as load_drafter does
            w = {k: mx.array(v.numpy()) for k, v in dequantize_int8(read_safetensors(files), f"drafter {d}").items()}
        return MLXDrafter(dc, w, self.model.model.embed_tokens)

    def describe(self) -> dict:
        """As TorchBackend.describe (quantized weights: bytes as stored, params = logical weights)."""
        from mlx.utils import tree_flatten
        flat = tree_flatten(self.model.parameters())
        q = (json.loads((self.dir / "config.json").read_text()).get("quantization") or {}).get("bits")
        emb = self.model.model.embed_tokens
        d = self.drafter
        dw = list(d.w.values()) if d is not None else []
        return {"backend": "mlx", "dtype": f"q{q}" if q else str(emb.weight.dtype).removeprefix("mlx.core."),
                "target_params": self.config_params(), "target_bytes": sum(a.nbytes for _, a in flat),
                "embedding_params": self.config.vocab_size * self.config.hidden_size, "target_config": self.config,
                "drafter_config": d.c if d is not None else None,
                "drafter_params": sum(a.size for a in dw if self._mx.issubdtype(a.dtype, self._mx.floating)),
                "drafter_bytes": sum(a.nbytes for a in dw)}

    def config_params(self) -> int:
        c = self.config
        attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * c.head_dim
        mlp = 3 * c.hidden_size * c.intermediate_size
        return c.vocab_size * c.hidden_size + c.num_hidden_layers * (attn + mlp + 4 * c.hidden_size) + c.hidden_size

    # ------------------------------------------------------------------ target
    @property
    def length(self) -> int:
        return self.caches[0].offset

    def _forward(self, tokens: torch.Tensor):
        mx = self._mx
        x = mx.array(tokens.to(torch.int32).numpy())[None]
        h = self.model.model(x, self.caches)  # post-norm hidden [1, T, d]
        logits = self.model.model.embed_tokens.as_linear(h).astype(mx.float32)
        mx.eval(logits, h)
        return logits[0], h[0]

    def start(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt.numel() >= self.max_len:
            raise MtpkitError(f"prompt of {prompt.numel()} tokens does not fit the context ({self.max_len})")
        for c in self.caches:
            c.offset = 0
        logits, h = self._forward(prompt)
        return _to_torch(logits[-1]), _to_torch(h[-1])

    def verify(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.length + tokens.numel() > self.max_len:
            raise MtpkitError(f"context full: {self.length + tokens.numel()} positions > {self.max_len}")
        logits, h = self._forward(tokens)
        return _to_torch(logits), _to_torch(h)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise MtpkitError(f"rollback to {length}: the cache holds {self.length} positions")
        for c in self.caches:
            c.offset = length  # every position is kept: exact at any depth, sliding layers included

    # ------------------------------------------------------------------ drafter
    def _kv(self) -> dict:
        c = self.config
        return {kind: self.caches[c.last_layer_of(kind)].visible(self.length) for kind in set(c.layer_types)}

    def draft(self, token: torch.Tensor, h: torch.Tensor, k: int, sampling: SamplingParams,
              generator: torch.Generator | None, min_confidence: float | None = None) -> Draft:
        mx = self._mx
        if self.drafter is None or k <= 0:
            return Draft(torch.empty(0, dtype=torch.long), None)
        kv, pos = self._kv(), self.length
        tok = mx.array([int(token)])
        hm = mx.array(h.float().numpy())[None, None]
        embed = self.model.model.embed_tokens
        toks, qs = [], []
        for _ in range(k):
            e = (embed(tok).astype(mx.float32) * self.embed_scale)[None]  # [1, 1, d_t], as GemmaModel.embed
            x, hm = self.drafter(e, hm, pos, kv)
            logits, ids = self.drafter.head(x)
            if sampling.greedy:  # lazily chained: one evaluation for the whole draft when not adaptive
                best = mx.argmax(logits)
                tok = (ids[best] if ids is not None else best).reshape(1)
                if min_confidence is not None and mx.softmax(logits).max().item() < min_confidence:
                    break
                toks.append(tok)
                continue
            dense = logits
            if ids is not None:
                dense = mx.full((self.vocab_size,), float("-inf"), dtype=mx.float32)
                dense[ids] = logits
            q = probs(_to_torch(dense), sampling)
            t = int(sample(q, generator))
            if min_confidence is not None and float(q.max()) < min_confidence:
                break
            toks.append(mx.array([t]))
            qs.append(q)
            tok = mx.array([t])
        if not toks:
            return Draft(torch.empty(0, dtype=torch.long), None)
        out = mx.concatenate(toks)
        mx.eval(out)
        return Draft(torch.from_numpy(np.array(out)).long(), torch.stack(qs) if qs else None)

    # ------------------------------------------------------------------ timing
    def clock(self) -> object:
        return time.perf_counter()

    def elapsed(self, a, b) -> float:
        return b - a
