"""Reference Gemma 3 decoder (the frozen target), plain PyTorch.

Covers Gemma 3 exactly: GQA, q/k RMSNorm, the (1 + w) norm convention, post-attention and post-FFN
norms, GeGLU with gelu-tanh, sqrt(d) embedding scale, tied head, interleaved sliding/full layers with
their own RoPE bases, `query_pre_attn_scalar`, optional final logit softcapping.

`forward` returns logits and the post-final-norm hidden states (the drafter's `h`). With a cache it
writes positions start..start+T-1 by index and sets `cache.length = start + T`; rolling back is the
caller's `cache.rollback(n)`. State-dict keys are the canonical tensor names every port maps from:
`embed_tokens.weight`, `layers.{i}.self_attn.{q,k,v,o}_proj.weight`, `layers.{i}.self_attn.{q,k}_norm.weight`,
`layers.{i}.mlp.{gate,up,down}_proj.weight`, `layers.{i}.{input,post_attention,pre_feedforward,
post_feedforward}_layernorm.weight`, `norm.weight` (Hugging Face's names without the `model.` prefix).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from mtpkit.errors import MtpkitError
from mtpkit.model.cache import KVCache
from mtpkit.model.config import SLIDING, GemmaConfig
from mtpkit.model.layers import (
    GeGLU,
    Linear,
    RMSNorm,
    apply_rope,
    attend,
    attention_mask,
    fuse_linears,
    linear,
    rope_inv_freq,
    rope_table,
    softcap,
)


class Output(NamedTuple):
    logits: torch.Tensor  # [B, T, V] float32
    hidden: torch.Tensor  # [B, T, d] post-final-norm hidden states


class Attention(nn.Module):
    def __init__(self, c: GemmaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.scale = c.attn_scale
        self.q_proj = Linear(c.hidden_size, self.n_heads * self.hd)
        self.k_proj = Linear(c.hidden_size, self.n_kv * self.hd)
        self.v_proj = Linear(c.hidden_size, self.n_kv * self.hd)
        self.o_proj = Linear(self.n_heads * self.hd, c.hidden_size)
        self.q_norm = RMSNorm(self.hd, c.rms_norm_eps)
        self.k_norm = RMSNorm(self.hd, c.rms_norm_eps)
        self.register_buffer("fused", None, persistent=False)  # fuse(): q, k and v as one weight

    def fuse(self) -> None:
        self.register_buffer("fused", fuse_linears(self.q_proj, self.k_proj, self.v_proj), persistent=False)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.fused is not None and not torch.is_grad_enabled():  # (gradients reach the separate weights only)
            q, k, v = linear(x, self.fused).split([self.n_heads * self.hd, self.n_kv * self.hd,
                                                   self.n_kv * self.hd], -1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = self.q_norm(q.view(B, T, self.n_heads, self.hd).transpose(1, 2))
        k = self.k_norm(k.view(B, T, self.n_kv, self.hd).transpose(1, 2))
        v = v.view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        if cache is None:
            k_all, v_all = k, v
        else:
            cache.write(self.layer, pos, k, v)
            k_all, v_all = cache.k[self.layer], cache.v[self.layer]
        out = attend(q, k_all.to(q.dtype), v_all.to(q.dtype), mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class Block(nn.Module):
    def __init__(self, c: GemmaConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.mlp = GeGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, x, pos, rope, mask, cache):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), pos, rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaModel(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.register_buffer("inv_freq_full", rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor),
                             persistent=False)
        self.register_buffer("inv_freq_sliding", rope_inv_freq(c.head_dim, c.rope_local_base_freq), persistent=False)

    def fuse(self) -> GemmaModel:
        """Run q/k/v and gate/up as one GEMM each (weights become views of the fused ones; state_dict keys and
        values unchanged): fewer launches per decode step. The sums are the same; their rounding may differ."""
        for layer in self.layers:
            layer.self_attn.fuse()
            layer.mlp.fuse()
        return self

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Scaled input embedding: E[token] * sqrt(d) (the scale rounded to the weight dtype, as HF does)."""
        e = self.embed_tokens(tokens)
        return e * torch.tensor(self.config.embed_scale, dtype=e.dtype)

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied output head on post-norm hidden states -> float32 logits."""
        w = self.embed_tokens.weight
        return softcap(linear(hidden, w, lambda x, w: x @ w.T).float(), self.config.final_logit_softcapping)

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, start: int | None = None,
                logits: bool = True, pad: torch.Tensor | None = None) -> Output:
        """tokens [B, T] at positions start..start+T-1 -> Output(logits [B, T, V], hidden [B, T, d]).

        With a cache, `start` defaults to `cache.length`; start < cache.length first rolls back.
        Inputs longer than `cache.max_chunk` are run in chunks (a sliding ring must not overwrite keys
        the same forward still needs). `logits=False` skips the head (returns an empty logits tensor).
        `pad` [B]: row b is left-padded, its first pad[b] positions are filler (see `step`).
        """
        T = tokens.shape[1]
        if cache is None:
            start = 0 if start is None else start
            return self.step(tokens, torch.arange(start, start + T, device=tokens.device), None, logits, pad)
        start = cache.length if start is None else start
        if start < cache.length:
            cache.rollback(start)
        elif start > cache.length:
            raise ValueError(f"cannot write at {start}: cache holds only {cache.length} positions (no gaps)")
        if start + T > cache.max_len:
            raise MtpkitError(f"context full: {start + T} positions > cache max_len {cache.max_len}")
        step, outs = cache.max_chunk, []
        for i in range(0, T, step):
            n = min(step, T - i)
            outs.append(self.step(tokens[:, i:i + n], torch.arange(start + i, start + i + n, device=tokens.device),
                                  cache, logits, pad))
            cache.advance(start + i, n)
        if len(outs) == 1:
            return outs[0]
        return Output(torch.cat([o.logits for o in outs], 1), torch.cat([o.hidden for o in outs], 1))

    def step(self, tokens: torch.Tensor, pos: torch.Tensor, cache: KVCache | None, logits: bool = True,
             pad: torch.Tensor | None = None, tree: tuple[torch.Tensor, torch.Tensor] | None = None) -> Output:
        """The raw forward: tokens [B, T] at positions pos [T] (contiguous), tensor ops only.

        Writes K/V into `cache` but leaves its bookkeeping (length) to the caller, so a backend can
        capture this in a CUDA graph and replay it. Use `forward` unless you are such a backend.
        `pad` [B] (batched generation of prompts of different lengths): keys at positions < pad[b] are
        hidden from row b, whose filler queries see only themselves; RoPE scores depend on relative
        positions only, so row b computes what it computes alone, shifted by pad[b] positions.
        `tree` = (depth [T], see [T, T] bool), with a cache (B = 1): a draft tree verified in one forward. Row i
        is written at slot position pos[i] but is a token at position pos[0] + depth[i]: RoPE and the window use
        that, and it sees the cached keys before pos[0] and the rows j with see[i, j] (its ancestors and itself).
        Only for sampled speculation: a tree row's keys sit at other slots than in plain decoding, so its result
        is not bitwise a plain step's (runtime/tree.py).
        """
        x = self.embed(tokens)
        c = self.config
        length = pos[-1] + 1  # a tensor: no host sync, so the step can be CUDA-graphed
        q_pos = pos if tree is None else pos[0] + tree[0]
        ropes, masks = {}, {}
        for kind in set(c.layer_types):  # RoPE tables and masks once per layer kind, not per layer
            ropes[kind] = rope_table(q_pos, self.inv_freq_sliding if kind == SLIDING else self.inv_freq_full)
            k_pos = pos if cache is None else cache.key_positions(c.last_layer_of(kind), length)
            window = c.sliding_window if kind == SLIDING else None
            if tree is None:
                masks[kind] = attention_mask(pos, k_pos, length, window)
            else:  # cached keys by the rows' token positions; this step's own rows by the tree
                rel = k_pos - pos[0]
                own = ((rel >= 0) & (rel < pos.numel()))[None, :] & tree[1][:, rel.clamp(0, pos.numel() - 1)]
                masks[kind] = attention_mask(q_pos, k_pos, pos[0], window) | own
            if pad is not None:  # [B, 1, T, S]
                real = (k_pos[None, :] >= pad[:, None])[:, None, None, :]
                masks[kind] = (masks[kind] & real) | (k_pos[None, :] == pos[:, None])
        for layer, kind in zip(self.layers, c.layer_types, strict=True):
            x = layer(x, pos, ropes[kind], masks[kind], cache)
        hidden = self.norm(x)
        return Output(self.head(hidden) if logits else hidden.new_empty(0), hidden)

    def new_cache(self, max_len: int, batch: int = 1, slack: int = 256) -> KVCache:
        p = self.embed_tokens.weight
        return KVCache(self.config, max_len, batch, slack=slack, device=p.device, dtype=p.dtype)
