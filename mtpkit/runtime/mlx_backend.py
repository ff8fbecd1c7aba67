"""The MLX backend: the target is mlx-lm's gemma3_text model (exported by `mtpkit export --format mlx`)
over caches of ours, the drafter a port of mtpkit.model.drafter.DrafterModel reading those caches.

Caches: `PositionCache` speaks mlx-lm's cache protocol (offset, update_and_fetch, make_mask) but keeps
every position of every layer, sliding ones included, and applies the window in the mask. Rollback is
setting `offset`, exact at any depth: mlx-lm's RotatingKVCache cannot undo a trim once its ring wrapped
(mlx-lm #1423/#1914), which is what breaks its own speculative loop past the window.

The loop speaks numpy (runtime/ops.py): this backend converts at the boundary (logits of the verified tokens,
the hidden row, one draft step's candidates) and keeps everything else in MLX. Its fused greedy draft chains the
k steps lazily and evaluates them once (the contract test checks it equals the generic policy).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.model.config import SLIDING, DrafterConfig
from mtpkit.model.files import INT8_SCALE, dequantize_int8
from mtpkit.runtime.backend import Backend, BackendInfo, DraftStep, Loaded

_STEP = 256  # cache growth granularity (positions)
SIBLING_DRAFTER = "drafter"  # `mtpkit export --format mlx` writes DIR/target and DIR/drafter


@dataclass(frozen=True)
class Options:
    device: str | None = None  # cpu | gpu; default: MLX's default device
    threads: int | None = None  # Linux: OpenBLAS threads of MLX's float32 matmuls; default: OpenBLAS's own


def load(target: str, drafter: str | None, opts: Options, *, max_len: int, max_draft: int) -> Loaded:
    """`target`: a directory from `mtpkit export --format mlx`; `drafter`: a drafter directory or None."""
    if opts.device not in (None, "cpu", "gpu"):
        raise MtpkitError(f"backend mlx runs on cpu or gpu, got device {opts.device!r}")
    try:
        mx = _mx()
        import mlx_lm  # noqa: F401
    except ImportError:
        raise MtpkitError("backend mlx needs mlx and mlx-lm (pip install 'mtpkit[mlx]')") from None
    if opts.device is not None:
        mx.set_default_device(mx.gpu if opts.device == "gpu" else mx.cpu)
    if opts.threads is not None:
        from mtpkit.runtime.mlx_blas import set_threads
        if opts.threads < 1:
            raise MtpkitError(f"threads must be >= 1, got {opts.threads}")
        set_threads(opts.threads)
    t = Path(target)
    if not t.is_dir():
        raise MtpkitError(f"backend mlx needs an exported target directory, got {target!r} "
                          f"(make one with `mtpkit export --format mlx --out DIR`, then pass DIR/target)")
    be = MLXBackend(t, drafter, max_len=max_len, threads=opts.threads)
    return Loaded(be, be.tokenizer, be.config, drafter, {"kind": "mlx-dir", "path": str(t.resolve())})


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


def _np(a) -> np.ndarray:
    mx = _mx()
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.array(a)


class MLXBackend(Backend):
    auto_adaptive = (True, False)  # Backend.auto_adaptive: at T > 0 stopping on the top probability cost 12-15 %

    def __init__(self, target_dir: str | Path, drafter_dir: str | Path | None = None, *, max_len: int = 4096,
                 threads: int | None = None):
        mx = _mx()
        from mtpkit.export.mlx import load_target
        self.dir = Path(target_dir)
        self.threads = threads  # as set by load (OpenBLAS threads), for info()
        self.model, self.config, self.tokenizer = load_target(target_dir)
        c = self.config
        self.vocab_size, self.max_len = c.vocab_size, max_len
        self.caches = [PositionCache(c.sliding_window if t == SLIDING else None, max_len) for t in c.layer_types]
        self.embed_scale = c.embed_scale
        self.drafter = None
        if drafter_dir is not None:
            self.drafter = self._load_drafter(Path(drafter_dir))
        self.has_drafter = self.drafter is not None
        self.draft_temperature = self.drafter.c.draft_temperature if self.drafter is not None else 1.0
        self._mx = mx
        self._round = None  # (query position, kv) of the current draft round
        self.fused_greedy_draft = self._fused_greedy_draft if self.drafter is not None else None

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
        if dc.head == "centroid" and "token_ordering" not in w:
            raise MtpkitError(f"drafter {d}: its centroid head has no token_ordering")
        # the stored values as numpy (bfloat16, which numpy lacks, through float32): finite, ordering a permutation
        dc.check_tensors({k: np.asarray(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a) for k, a in w.items()},
                         f"drafter {d}")
        if any(k.endswith(INT8_SCALE) for k in w):  # int8-stored (e.g. the shipped drafter): dequantize as load_drafter does
            w = dequantize_int8(w, f"drafter {d}", lambda a: a.astype(mx.float32))
        return MLXDrafter(dc, w, self.model.model.embed_tokens)

    def info(self) -> BackendInfo:
        """Quantized weights: bytes as stored, params = logical weights."""
        from mlx.utils import tree_flatten
        mx = self._mx
        flat = tree_flatten(self.model.parameters())
        q = (json.loads((self.dir / "config.json").read_text()).get("quantization") or {}).get("bits")
        emb = self.model.model.embed_tokens
        d = self.drafter
        dw = list(d.w.values()) if d is not None else []
        return BackendInfo("mlx", "gpu" if mx.default_device() == mx.gpu else "cpu",
                           f"q{q}" if q else str(emb.weight.dtype).removeprefix("mlx.core."), self.threads,
                           self.config_params(), sum(a.nbytes for _, a in flat),
                           self.config.vocab_size * self.config.hidden_size, self.config, d.c if d is not None else None,
                           sum(a.size for a in dw if mx.issubdtype(a.dtype, mx.floating)), sum(a.nbytes for a in dw),
                           d.c.head if d is not None else None)

    def config_params(self) -> int:
        c = self.config
        attn = c.hidden_size * c.head_dim * (2 * c.num_attention_heads + 2 * c.num_key_value_heads) + 2 * c.head_dim
        mlp = 3 * c.hidden_size * c.intermediate_size
        return c.vocab_size * c.hidden_size + c.num_hidden_layers * (attn + mlp + 4 * c.hidden_size) + c.hidden_size

    # ------------------------------------------------------------------ target
    @property
    def length(self) -> int:
        return self.caches[0].offset

    def _forward(self, tokens: list[int]):
        mx = self._mx
        x = mx.array(tokens, dtype=mx.int32)[None]
        h = self.model.model(x, self.caches)  # post-norm hidden [1, T, d]
        logits = self.model.model.embed_tokens.as_linear(h).astype(mx.float32)
        mx.eval(logits, h)
        return logits[0], h[0]

    def start(self, prompt: list[int]) -> tuple[np.ndarray, np.ndarray]:
        if len(prompt) >= self.max_len:
            raise MtpkitError(f"prompt of {len(prompt)} tokens does not fit the context ({self.max_len})")
        self._round = None
        for c in self.caches:
            c.offset = 0
        logits, h = self._forward(list(prompt))
        return _np(logits[-1]), _np(h[-1])

    def verify(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.asarray(tokens).reshape(-1).tolist()
        if self.length + len(ids) > self.max_len:
            raise MtpkitError(f"context full: {self.length + len(ids)} positions > {self.max_len}")
        self._round = None
        logits, h = self._forward(ids)
        return _np(logits), _np(h)

    def rollback(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise MtpkitError(f"rollback to {length}: the cache holds {self.length} positions")
        self._round = None
        for c in self.caches:
            c.offset = length  # every position is kept: exact at any depth, sliding layers included

    # ------------------------------------------------------------------ drafter
    def _kv(self) -> dict:
        c = self.config
        return {kind: self.caches[c.last_layer_of(kind)].visible(self.length) for kind in set(c.layer_types)}

    def _mx_step(self, tok, hm):
        """One lazy drafter step: tok [1] int32, hm [1, 1, d_t] -> (logits [N] float32, ids [N] or None, next hm)."""
        mx = self._mx
        if self._round is None:  # once per round: every step queries at the bonus position
            self._round = (self.length, self._kv())
        pos, kv = self._round
        e = (self.model.model.embed_tokens(tok).astype(mx.float32) * self.embed_scale)[None]  # as GemmaModel.embed
        x, hm = self.drafter(e, hm, pos, kv)
        logits, ids = self.drafter.head(x)
        return logits, ids, hm

    def draft_step(self, token: np.ndarray, h: np.ndarray) -> DraftStep:
        mx = self._mx
        if self.drafter is None:
            raise MtpkitError("this backend has no drafter")
        tok = mx.array(np.asarray(token, dtype=np.int32).reshape(1))
        logits, ids, hm = self._mx_step(tok, mx.array(np.asarray(h, dtype=np.float32))[None, None])
        mx.eval(logits, hm) if ids is None else mx.eval(logits, ids, hm)
        return DraftStep(_np(logits), None if ids is None else _np(ids).astype(np.int64), _np(hm[0, 0]))

    def _fused_greedy_draft(self, token: np.ndarray, h: np.ndarray, k: int) -> np.ndarray:
        """k greedy steps chained lazily, evaluated once."""
        mx = self._mx
        tok = mx.array(np.asarray(token, dtype=np.int32).reshape(1))
        hm = mx.array(np.asarray(h, dtype=np.float32))[None, None]
        toks = []
        for _ in range(k):
            logits, ids, hm = self._mx_step(tok, hm)
            best = mx.argmax(logits)
            tok = (ids[best] if ids is not None else best).reshape(1)
            toks.append(tok)
        out = mx.concatenate(toks)
        mx.eval(out)
        return np.array(out).astype(np.int64)
