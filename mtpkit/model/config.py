"""Config dataclasses for the reference target (Gemma family decoder) and the assistant drafter.

`GemmaConfig.from_dict` reads Hugging Face `config.json` files (Gemma 3 text configs, the nested
`text_config` of multimodal ones, old `sliding_window_pattern` and new `layer_types` /
`rope_parameters` spellings). `to_dict` writes our own flat JSON, which `from_dict` reads back.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from mtpkit.errors import MtpkitError

SLIDING = "sliding_attention"
FULL = "full_attention"


def layer_kinds(c) -> list[str]:
    """The attention kinds a config's layers use, sliding first (the exported graphs' K/V input order)."""
    return [k for k in (SLIDING, FULL) if k in c.layer_types]


def _check_positive(obj: Any, names: list[str]) -> None:
    for n in names:
        v = getattr(obj, n)
        if v is None or v <= 0:
            raise MtpkitError(f"{type(obj).__name__}.{n} must be positive, got {v!r}")


@dataclass
class GemmaConfig:
    """A Gemma 3 style decoder. Defaults are Gemma 3 270M."""

    vocab_size: int = 262144
    hidden_size: int = 640
    intermediate_size: int = 2048  # GeGLU width
    num_hidden_layers: int = 18
    num_attention_heads: int = 4
    num_key_value_heads: int = 1  # GQA: each KV head serves num_attention_heads // num_key_value_heads queries
    head_dim: int = 256
    query_pre_attn_scalar: float = 256.0  # attention scale = query_pre_attn_scalar ** -0.5
    sliding_window: int | None = 512  # a query at q sees keys k with q - k < sliding_window
    layer_types: list[str] = field(default_factory=list)  # per layer SLIDING or FULL; [] = Gemma 3 pattern
    rope_theta: float = 1_000_000.0  # full-attention layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling_factor: float = 1.0  # linear position scaling on full layers (Gemma 3 4B+ use 8)
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    max_position_embeddings: int = 32768
    bos_token_id: int = 2
    eos_token_id: int = 1
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        if not self.layer_types:
            # Gemma 3: every 6th layer is global.
            self.layer_types = [FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)]
        self.validate()

    def validate(self) -> None:
        _check_positive(self, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps"])
        if len(self.layer_types) != self.num_hidden_layers:
            raise MtpkitError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        bad = set(self.layer_types) - {SLIDING, FULL}
        if bad:
            raise MtpkitError(f"unknown layer type(s) {sorted(bad)}; expected {SLIDING!r} or {FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MtpkitError("num_attention_heads must be a multiple of num_key_value_heads")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise MtpkitError("sliding layers need a positive sliding_window")

    @property
    def attn_scale(self) -> float:
        return self.query_pre_attn_scalar ** -0.5

    @property
    def embed_scale(self) -> float:
        return math.sqrt(self.hidden_size)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    def last_layer_of(self, kind: str) -> int:
        """Index of the last layer of type `kind` (SLIDING or FULL); the drafter reads its K/V."""
        idx = [i for i, t in enumerate(self.layer_types) if t == kind]
        if not idx:
            raise MtpkitError(f"target has no {kind} layer for the drafter to read")
        return idx[-1]

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "gemma3_text", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GemmaConfig:
        """Build from our own `to_dict` output or a Hugging Face Gemma 3 `config.json`."""
        if "text_config" in d and isinstance(d["text_config"], dict):  # Gemma3ForConditionalGeneration
            d = {**d["text_config"]}
        mt = d.get("model_type", "gemma3_text")
        if mt not in ("gemma3_text", "gemma3", "gemma2", "gemma"):
            raise MtpkitError(f"unsupported model_type {mt!r}: mtpkit's reference covers the Gemma family")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(kw.get(k), list):  # HF allows lists of EOS ids; the first is the canonical one
                kw[k] = kw[k][0]
            if kw.get(k) is None:
                kw.pop(k, None)
        if "layer_types" not in d:
            pattern = d.get("sliding_window_pattern")
            n = d.get("num_hidden_layers", cls.num_hidden_layers)
            if pattern:
                kw["layer_types"] = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n)]
        rp = d.get("rope_parameters")  # transformers >= 5 spelling
        if isinstance(rp, dict) and FULL in rp:
            kw["rope_theta"] = rp[FULL].get("rope_theta", kw.get("rope_theta", cls.rope_theta))
            if rp[FULL].get("rope_type") == "linear":
                kw["rope_scaling_factor"] = float(rp[FULL]["factor"])
            if SLIDING in rp:
                kw["rope_local_base_freq"] = rp[SLIDING].get("rope_theta", cls.rope_local_base_freq)
        rs = d.get("rope_scaling")
        if isinstance(rs, dict):
            rtype = rs.get("rope_type", rs.get("type"))
            if rtype == "linear":
                kw["rope_scaling_factor"] = float(rs["factor"])
            elif rtype not in (None, "default"):
                raise MtpkitError(f"unsupported rope_scaling type {rtype!r}")
        act = d.get("hidden_activation", d.get("hidden_act", "gelu_pytorch_tanh"))
        if act not in ("gelu_pytorch_tanh", "gelu_tanh", "gelu"):
            raise MtpkitError(f"unsupported activation {act!r}; the reference implements GeGLU with gelu-tanh")
        return cls(**kw)


@dataclass
class DrafterConfig:
    """The Gemma 4 style assistant drafter (DESIGN.md §2): Q-only attention over the target's K/V."""

    target_hidden_size: int = 640  # d_target: width of h and of the target embedding
    hidden_size: int = 640  # d: the drafter's own width
    intermediate_size: int = 2048
    layer_types: list[str] = field(default_factory=lambda: [SLIDING, SLIDING, SLIDING, FULL])
    num_attention_heads: int = 4
    num_key_value_heads: int = 1  # must equal the target's
    head_dim: int = 256  # must equal the target's
    vocab_size: int = 262144
    sliding_window: int | None = 512
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling_factor: float = 1.0
    attn_scale: float = 1.0  # q is RMS-normed and k was normed by the target: no 1/sqrt(d) needed
    rms_norm_eps: float = 1e-6
    final_logit_softcapping: float | None = None
    head: str = "dense"  # "dense" (tied to the head's embedding matrix) or "centroid"
    # True: the head (and the centroid gather) use the *target's* embedding matrix, bound at load time with
    # `DrafterModel.bind_target`; the drafter then owns no vocab-sized tensor (needs hidden == target hidden)
    share_target_embedding: bool = False
    num_centroids: int = 2048  # centroid head: vocab_size must equal num_centroids * tokens_per_centroid
    centroid_top_k: int = 32  # clusters kept per step
    # sampling (T > 0): drafts are drawn at temperature T * draft_temperature. Rejection sampling keeps the
    # output exactly the target's for any draft distribution; a calibrated factor < 1 raises acceptance
    # (bench/draft_temperature.py measures it). Runtime only: training and the reference model ignore it.
    draft_temperature: float = 1.0

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_types)

    @property
    def tokens_per_centroid(self) -> int:
        return self.vocab_size // self.num_centroids

    def validate(self) -> None:
        # a config.json can hold anything JSON can: check types and finiteness here, not by a TypeError later
        for n in ("target_hidden_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                  "head_dim", "vocab_size", "num_centroids", "centroid_top_k"):
            v = getattr(self, n)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise MtpkitError(f"drafter config: {n} must be a positive integer, got {v!r}")
        for n in ("rms_norm_eps", "draft_temperature", "attn_scale", "rope_theta", "rope_local_base_freq",
                  "rope_scaling_factor", "final_logit_softcapping"):
            v = getattr(self, n)
            if v is None and n == "final_logit_softcapping":
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise MtpkitError(f"drafter config: {n} must be a positive finite number, got {v!r}")
        if not isinstance(self.share_target_embedding, bool):
            raise MtpkitError(f"drafter config: share_target_embedding must be true or false, got "
                              f"{self.share_target_embedding!r}")
        lt = self.layer_types
        if not isinstance(lt, list) or not lt or any(t not in (SLIDING, FULL) for t in lt):
            raise MtpkitError(f"drafter layer_types must be a non-empty list of {SLIDING!r}/{FULL!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise MtpkitError("drafter num_attention_heads must be a multiple of num_key_value_heads")
        if self.head not in ("dense", "centroid"):
            raise MtpkitError(f"drafter head must be 'dense' or 'centroid', got {self.head!r}")
        if self.head == "centroid":
            if self.vocab_size % self.num_centroids:
                raise MtpkitError("centroid head: vocab_size must be a multiple of num_centroids")
            if self.centroid_top_k > self.num_centroids:
                raise MtpkitError("centroid head: centroid_top_k exceeds num_centroids")
        if self.share_target_embedding and self.hidden_size != self.target_hidden_size:
            raise MtpkitError(f"share_target_embedding needs hidden_size == target_hidden_size "
                              f"({self.hidden_size} != {self.target_hidden_size})")
        w = self.sliding_window
        if SLIDING in lt and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
            raise MtpkitError(f"drafter config: sliding layers need a positive integer sliding_window, got {w!r}")

    def check_tensors(self, tensors: Mapping[str, Any], what: str) -> None:
        """Raise a one-line MtpkitError unless this drafter's values can run: every floating array finite and, for
        the centroid head, `token_ordering` a permutation of the vocabulary. `tensors`: name -> numpy array (or
        anything np.asarray reads: CPU torch tensors, MLX arrays); int8 arrays are finite by construction, so
        checking a file's tensors before dequantizing costs a few ms for the shipped drafter. Shapes are
        load_state's business."""
        check_finite(tensors, what)
        if self.head == "centroid" and "token_ordering" in tensors:
            check_token_ordering(tensors["token_ordering"], self.vocab_size, what)

    def check_target(self, t: GemmaConfig) -> None:
        """Raise MtpkitError naming the first field where this drafter cannot run on target `t`."""
        pairs = [("vocab_size", self.vocab_size, t.vocab_size),
                 ("target_hidden_size", self.target_hidden_size, t.hidden_size),
                 ("head_dim", self.head_dim, t.head_dim),
                 ("num_key_value_heads", self.num_key_value_heads, t.num_key_value_heads)]
        for name, mine, theirs in pairs:
            if mine != theirs:
                raise MtpkitError(f"drafter does not match the target: {name} is {mine} in the drafter, {theirs} in the target")
        for kind in set(self.layer_types):
            t.last_layer_of(kind)
        if SLIDING in self.layer_types and self.sliding_window != t.sliding_window:
            raise MtpkitError(f"drafter sliding_window {self.sliding_window} != target's {t.sliding_window}")

    @classmethod
    def for_target(cls, t: GemmaConfig, **overrides: Any) -> DrafterConfig:
        """A drafter config whose shared fields are copied from target `t`."""
        kw: dict[str, Any] = dict(
            target_hidden_size=t.hidden_size, hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
            num_attention_heads=t.num_attention_heads, num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim, vocab_size=t.vocab_size, sliding_window=t.sliding_window,
            rope_theta=t.rope_theta, rope_local_base_freq=t.rope_local_base_freq,
            rope_scaling_factor=t.rope_scaling_factor, rms_norm_eps=t.rms_norm_eps,
            final_logit_softcapping=t.final_logit_softcapping)
        kw.update(overrides)
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "mtpkit_assistant", **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DrafterConfig:
        if not isinstance(d, dict):
            raise MtpkitError(f"a drafter config must be a JSON object, got {type(d).__name__}")
        if d.get("model_type", "mtpkit_assistant") != "mtpkit_assistant":
            raise MtpkitError(f"not an mtpkit drafter config (model_type {d.get('model_type')!r})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names - {"model_type"}
        if unknown:
            raise MtpkitError(f"unknown drafter config field(s): {sorted(unknown)}")
        return cls(**{k: v for k, v in d.items() if k in names})


def check_finite(arrays: Mapping[str, Any], what: str) -> None:
    """Raise a one-line MtpkitError naming the first floating array in `arrays` that holds NaN or Inf.

    Every loader of drafter weights calls this (load_drafter, the llama.cpp and MLX backends): a drafter with a NaN
    is never accepted, so it would only slow generation down, silently."""
    import numpy as np
    for name, a in arrays.items():
        a = np.asarray(a)
        if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
            kind = "NaN" if np.isnan(a).any() else "Inf"
            raise MtpkitError(f"{what}: tensor {name!r} holds {kind} values (damaged weights or a diverged training run)")


def check_token_ordering(order: Any, vocab_size: int, what: str) -> None:
    """The centroid head's token_ordering [V] must list every token id of the vocabulary exactly once: an id
    outside it would index past the head's rows, and a repeated one would count a candidate twice (and leave
    others undraftable)."""
    import numpy as np
    o = np.asarray(order).reshape(-1)
    if not np.issubdtype(o.dtype, np.integer):
        raise MtpkitError(f"{what}: the centroid head's token_ordering holds {o.dtype} values, not token ids")
    if o.size != vocab_size:
        raise MtpkitError(f"{what}: the centroid head's token_ordering lists {o.size} ids for a vocabulary of {vocab_size}")
    out = (o < 0) | (o >= vocab_size)
    if out.any():
        raise MtpkitError(f"{what}: the centroid head's token_ordering holds token id {int(o[out.argmax()])}, outside "
                          f"the vocabulary (0..{vocab_size - 1})")
    counts = np.bincount(o, minlength=vocab_size)
    if (counts != 1).any():
        dup = int((counts > 1).argmax())
        raise MtpkitError(f"{what}: the centroid head's token_ordering is not a permutation of the vocabulary: token id "
                          f"{dup} is listed {int(counts[dup])} times and {int((counts == 0).sum())} ids not at all")
