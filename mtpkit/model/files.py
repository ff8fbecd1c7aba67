"""Weight files without torch: GGUF metadata and tensors (through the `gguf` package, as numpy), and the
int8 drafter storage's dequantization for any array library. The llama.cpp and MLX backends read files
through this module, so they run where torch is not installed; model/load.py builds torch models on it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mtpkit.errors import MtpkitError
from mtpkit.model.config import FULL, SLIDING, GemmaConfig

INT8_SCALE = ".int8_scale"  # key suffix of the per-row scales of an int8-stored matrix


def open_gguf(path: Path):
    import gguf
    try:
        return _reader_class(gguf)(str(path))
    except Exception as e:  # the reader raises ValueError/IndexError/struct errors on damaged files
        raise MtpkitError(f"cannot read GGUF {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'corrupt or truncated file'}") from None


_READER = None


def _reader_class(gguf):
    """gguf's reader, with arrays read fast: gguf 0.19 parses them element by element through numpy memmap views (a
    drafter GGUF's 262k-entry token ordering, 1.3M-value centroids and 262k vocabulary strings took 25-40 s to open
    on this repo's CPU; now under a second). An array of numbers is one view (its field's parts: item type, length,
    values; its data [2]); an array of strings the same parts as gguf's own (a length and the bytes per string), cut
    from a plain ndarray. `contents()` gives the same values either way (tests/test_gguf.py)."""
    global _READER
    if _READER is None:
        import struct
        T = gguf.GGUFValueType

        class Reader(gguf.GGUFReader):
            def _get_field_parts(self, orig_offs, raw_type):
                if T(raw_type) != T.ARRAY or self.byte_order != "I":
                    return super()._get_field_parts(orig_offs, raw_type)
                itype = self._get(orig_offs, np.uint32)
                alen = self._get(orig_offs + 4, np.uint64)
                sub, n, offs = T(int(itype[0])), int(alen[0]), orig_offs + 12
                nptype = self.gguf_scalar_to_np.get(sub)
                if nptype is not None:
                    vals = self._get(offs, nptype, n)
                    return 12 + int(vals.nbytes), [itype, alen, vals], [2], [T.ARRAY, sub]
                if sub != T.STRING:
                    return super()._get_field_parts(orig_offs, raw_type)
                raw = np.asarray(self.data)  # a plain ndarray over the same memory map: cheap views
                buf = memoryview(raw)
                parts: list = [itype, alen]
                for _ in range(n):
                    (slen,) = struct.unpack_from("<Q", buf, offs)
                    parts += [raw[offs:offs + 8].view(np.uint64), raw[offs + 8:offs + 8 + slen]]
                    offs += 8 + slen
                return offs - orig_offs, parts, list(range(3, len(parts), 2)), [T.ARRAY, T.STRING]
        _READER = Reader
    return _READER


def gguf_config(reader) -> GemmaConfig:
    """GemmaConfig from gemma3 GGUF metadata (defaults follow llama.cpp's gemma3 loader)."""
    def get(key, default=None):
        f = reader.fields.get(key)
        if f is None:
            return default
        v = f.contents()
        if isinstance(v, float):  # GGUF floats are f32: keep the shortest decimal (1e-06, not 9.99999997e-07)
            v = float(np.format_float_positional(np.float32(v), unique=True, trim="-"))
        return v
    arch = get("general.architecture")
    if arch != "gemma3":
        raise MtpkitError(f"GGUF architecture is {arch!r}; mtpkit imports 'gemma3' targets")
    a = "gemma3."
    n_layers = int(get(a + "block_count"))
    hidden = int(get(a + "embedding_length"))
    heads = int(get(a + "attention.head_count"))
    head_dim = int(get(a + "attention.key_length", hidden // heads))
    pattern = get(a + "attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer booleans: True = sliding
        layer_types = [SLIDING if s else FULL for s in pattern]
    else:
        layer_types = [FULL if (i + 1) % int(pattern) == 0 else SLIDING for i in range(n_layers)]
    scaling = 1.0
    if get(a + "rope.scaling.type") == "linear":
        scaling = float(get(a + "rope.scaling.factor", 1.0))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if embd is None:
        raise MtpkitError("GGUF has no token_embd.weight tensor")
    vocab = int(embd.shape[1])
    if tokens is not None and len(tokens.data) != vocab:
        raise MtpkitError(f"GGUF tokenizer has {len(tokens.data)} tokens but token_embd has {vocab} rows")
    return GemmaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=int(get(a + "feed_forward_length")),
        num_hidden_layers=n_layers, num_attention_heads=heads,
        num_key_value_heads=int(get(a + "attention.head_count_kv", heads)), head_dim=head_dim,
        # llama.cpp: 27B (62 layers) scales by hidden/heads, every other size by head_dim
        query_pre_attn_scalar=float(hidden // heads if n_layers == 62 else head_dim),
        sliding_window=int(get(a + "attention.sliding_window", 512)), layer_types=layer_types,
        rope_theta=float(get(a + "rope.freq_base", 1e6)), rope_local_base_freq=float(get(a + "rope.freq_base_swa", 1e4)),
        rope_scaling_factor=scaling, rms_norm_eps=float(get(a + "attention.layer_norm_rms_epsilon", 1e-6)),
        final_logit_softcapping=get(a + "final_logit_softcapping"),
        max_position_embeddings=int(get(a + "context_length", 32768)),
        bos_token_id=int(get("tokenizer.ggml.bos_token_id", 2)), eos_token_id=int(get("tokenizer.ggml.eos_token_id", 1)),
        pad_token_id=int(get("tokenizer.ggml.padding_token_id", 0)))


def gguf_array(t):
    """One GGUFReader tensor dequantized to float32 numpy, in PyTorch's (row-major) layout."""
    from gguf.quants import dequantize
    try:
        a = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise MtpkitError(f"GGUF tensor {t.name} has type {t.tensor_type.name}, which gguf cannot dequantize") from None
    return np.asarray(a, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def _is_int8(a) -> bool:
    return str(a.dtype).rsplit(".", 1)[-1] == "int8"  # torch.int8, int8 (numpy), mlx.core.int8


def dequantize_int8(sd: dict[str, Any], what: str, to_float32: Callable[[Any], Any]) -> dict[str, Any]:
    """Inverse of load.quantize_int8 (float32 matrices) for torch, numpy or MLX arrays (`to_float32` casts one);
    a no-op for files without int8 matrices."""
    out = {k: v for k, v in sd.items() if not k.endswith(INT8_SCALE)}
    for k in sd:
        if not k.endswith(INT8_SCALE):
            continue
        base, scale = k[: -len(INT8_SCALE)], sd[k]
        q = sd.get(base)
        if q is None or not _is_int8(q) or q.ndim != 2 or tuple(scale.shape) != (q.shape[0],):
            raise MtpkitError(f"{what}: {k!r} does not scale an int8 matrix {base!r} row by row")
        out[base] = to_float32(q) * to_float32(scale)[:, None]
    stray = sorted(k for k, v in out.items() if _is_int8(v))
    if stray:
        raise MtpkitError(f"{what}: int8 tensor {stray[0]!r} has no {INT8_SCALE!r} scales")
    return out
