"""The torch modules `mtpkit export --format coreml` traces: thin wrappers around the reference modules
(mtpkit.model) with static shapes and the KV cache at fixed size. Imports torch: only mtpkit/export/coreml.py loads
this module, inside the functions that export.

Cache: `keys` and `values`, each [L, KV, C, D] float16 (L target layers, C = the exported context), position j at
row j. Two ways to hold it (`stateful`):
  - True  (--compute gpu): Core ML states (ct.StateType). A target step writes its n new rows at p..p+n-1
    (slice_update) and attends to rows j <= q; the draft step is a function of the same package declaring the same
    states, so one MLState serves every function and the drafter reads the target's K/V where it lies.
  - False (--compute ane: the Neural Engine rejects states): `keys` / `values` are inputs, the target step returns
    only its new rows (`new_keys` / `new_values` [L, KV, n, D]) for the caller to write at p..p+n-1, and scores the
    cache (rows j < p) and the new rows separately, so the graph never copies the cache. The drafter is its own
    model whose inputs are the two layers it reads (`keys_sliding` ... [KV, C, D]: views of the caller's arrays).
Rows at or past the cache length may hold anything (a rolled-back draft, a padded verify row): every mask is by
position, so rollback is setting a length and a step never reads them.

Target step (function `prefill` / `decode` / `verify`: n = PREFILL, 1, K + 1):
    input_ids [1, n] int32, position [1] int32 (p, the cache length) [, keys, values]
 -> logits [1, n, V], hidden [1, n, d] (post-final-norm) [, new_keys, new_values]
Draft step (function `draft`): token [1] int32, h [1, d], position [1] int32 (q, the bonus token's = the cache
length) [, keys_sliding, values_sliding, keys_full, values_full] -> centroid head: ids [N] int32 + logits [N];
dense head: logits [V]; and h_next [1, d]. Queries see target rows j < q (DESIGN.md §2).
RoPE is a table of the C positions (cos/sin computed in float64 at export, gathered by position): no angle
arithmetic in float16.

float16 range: Gemma 3's residual stream outgrows float16 (Gemma 3 270M reaches 1.06e5 > 65,504 by layer 12 on a
plain prompt: inf, then NaN). The target graph carries it divided by `residual_scale` (a power of two): the
embedding and every post-attention / post-feedforward norm gain are divided by it, and the norms that read the
stream get eps / scale^2, so every norm's output is the reference's exactly (RMSNorm(x / s) with eps / s^2 =
RMSNorm(x)) and only the stream's magnitude changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtpkit.model.config import SLIDING
from mtpkit.model.config import layer_kinds as kinds
from mtpkit.model.drafter import DrafterModel, draft_mask
from mtpkit.model.gemma import GemmaModel
from mtpkit.model.layers import apply_rope, attend, attention_mask, rope_table, softcap


def cache_shape(c, context: int) -> tuple[int, int, int, int]:
    return (c.num_hidden_layers, c.num_key_value_heads, context, c.head_dim)


class _Ropes(nn.Module):
    """cos/sin tables [C, D] per attention kind of a module with inv_freq_sliding / inv_freq_full buffers."""

    def __init__(self, src: nn.Module, c, context: int):
        super().__init__()
        pos = torch.arange(context)
        for kind in kinds(c):
            cos, sin = rope_table(pos, src.inv_freq_sliding if kind == SLIDING else src.inv_freq_full)
            self.register_buffer(f"cos_{kind}", cos)
            self.register_buffer(f"sin_{kind}", sin)

    def at(self, kind: str, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(self, f"cos_{kind}").index_select(0, pos), getattr(self, f"sin_{kind}").index_select(0, pos)


class ScaledNorm(nn.Module):
    """A reference RMSNorm for a stream divided by s_in, its output divided by s_out (module docstring)."""

    def __init__(self, norm: nn.Module, s_in: float = 1.0, s_out: float = 1.0):
        super().__init__()
        self.eps = norm.eps / s_in ** 2
        self.register_buffer("gain", (1.0 + norm.weight.detach().float()) / s_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), x.shape[-1:], self.gain, self.eps).type_as(x)


def residual_peak(model: GemmaModel, tokens: list[int]) -> float:
    """max |residual stream| of the reference over `tokens` (chooses residual_scale)."""
    peak = [0.0]

    def hook(mod, inp, out):
        peak[0] = max(peak[0], float(out.abs().max()))
    hs = [layer.register_forward_hook(hook) for layer in model.layers]
    try:
        with torch.no_grad():
            model(torch.tensor([tokens]))
    finally:
        for h in hs:
            h.remove()
    return peak[0]


class TargetStep(nn.Module):
    def __init__(self, model: GemmaModel, n: int, context: int, stateful: bool, residual_scale: float = 1.0):
        super().__init__()
        self.m, self.n, self.context, self.stateful, self.s = model, n, context, stateful, residual_scale
        c = model.config
        self.ropes = _Ropes(model, c, context)
        s = residual_scale
        self.norms = nn.ModuleList(nn.ModuleList([ScaledNorm(b.input_layernorm, s_in=s),
                                                  ScaledNorm(b.post_attention_layernorm, s_out=s),
                                                  ScaledNorm(b.pre_feedforward_layernorm, s_in=s),
                                                  ScaledNorm(b.post_feedforward_layernorm, s_out=s)])
                                   for b in model.layers)
        self.final_norm = ScaledNorm(model.norm, s_in=s)
        if stateful:
            self.register_buffer("keys", torch.zeros(cache_shape(c, context), dtype=torch.float16))
            self.register_buffer("values", torch.zeros(cache_shape(c, context), dtype=torch.float16))

    def forward(self, input_ids, position, *kv):
        m, c, n = self.m, self.m.config, self.n
        p = position[0]
        pos = p + torch.arange(n, dtype=position.dtype)
        key_pos = torch.arange(self.context, dtype=position.dtype)
        x = m.embed(input_ids) * (1.0 / self.s)
        ropes, masks = {}, {}
        for kind in kinds(c):
            window = c.sliding_window if kind == SLIDING else None
            ropes[kind] = self.ropes.at(kind, pos)
            if self.stateful:  # rows 0..q (the new ones written first)
                masks[kind] = attention_mask(pos, key_pos, self.context, window)
            else:  # the cache's rows j < p, then the new rows (causal among themselves)
                masks[kind] = (attention_mask(pos, key_pos, p, window), attention_mask(pos, pos, self.context, window))
        new_k, new_v = [], []
        for i, (layer, kind) in enumerate(zip(m.layers, c.layer_types, strict=True)):
            a = layer.self_attn
            norm_in, norm_attn, norm_pre, norm_ffn = self.norms[i]
            y = norm_in(x)
            q = a.q_norm(a.q_proj(y).view(1, n, a.n_heads, a.hd).transpose(1, 2))
            k = a.k_norm(a.k_proj(y).view(1, n, a.n_kv, a.hd).transpose(1, 2))
            v = a.v_proj(y).view(1, n, a.n_kv, a.hd).transpose(1, 2)
            q, k = apply_rope(q, ropes[kind]), apply_rope(k, ropes[kind])
            if self.stateful:
                self.keys[i, :, p:p + n] = k[0].to(torch.float16)
                self.values[i, :, p:p + n] = v[0].to(torch.float16)
                out = attend(q, self.keys[i][None].to(q.dtype), self.values[i][None].to(q.dtype), masks[kind], a.scale)
            else:
                out = _attend_split(q, kv[0][i][None].to(q.dtype), kv[1][i][None].to(q.dtype), k, v, *masks[kind],
                                    a.scale)
                new_k.append(k[0].to(torch.float16))
                new_v.append(v[0].to(torch.float16))
            x = x + norm_attn(a.o_proj(out.transpose(1, 2).reshape(1, n, a.n_heads * a.hd)))
            x = x + norm_ffn(layer.mlp(norm_pre(x)))
        hidden = self.final_norm(x)
        logits = softcap(F.linear(hidden, m.embed_tokens.weight).float(), c.final_logit_softcapping)
        if self.stateful:
            return logits, hidden.float()
        return logits, hidden.float(), torch.stack(new_k), torch.stack(new_v)


def _attend_split(q, pk, pv, k, v, mask_past, mask_new, scale: float):
    """q [1, H, n, D]; cache pk/pv [1, KV, C, D]; new k/v [1, KV, n, D]; masks [n, C] / [n, n] bool -> [1, H, n, D].
    One softmax over both score blocks (GQA folds a KV head's query heads into rows, as layers.attend)."""
    _, H, T, D = q.shape
    KV = pk.shape[1]
    rep = H // KV
    qf = q.reshape(1, KV, rep * T, D) * scale
    s = torch.cat([(qf @ pk.transpose(-1, -2)).masked_fill(~mask_past.repeat(rep, 1), float("-inf")),
                   (qf @ k.transpose(-1, -2)).masked_fill(~mask_new.repeat(rep, 1), float("-inf"))], -1)
    w = s.float().softmax(-1).to(q.dtype)
    C = pk.shape[2]
    return (w[..., :C] @ pv + w[..., C:] @ v).reshape(1, H, T, D)


class DraftStep(nn.Module):
    """One draft step of DrafterModel (T = 1) on its target; the token's embedding and the head's rows come from the
    target's embedding matrix when the drafter shares it (one constant in the package: functions share weights)."""

    def __init__(self, drafter: DrafterModel, target: GemmaModel, context: int, stateful: bool):
        super().__init__()
        self.d, self.t, self.context, self.stateful = drafter, target, context, stateful
        c = target.config
        self.ropes = _Ropes(drafter, drafter.config, context)
        self.layer_of = {kind: c.last_layer_of(kind) for kind in kinds(drafter.config)}
        if stateful:  # the target's states, declared again so that one MLState serves both
            self.register_buffer("keys", torch.zeros(cache_shape(c, context), dtype=torch.float16))
            self.register_buffer("values", torch.zeros(cache_shape(c, context), dtype=torch.float16))

    def forward(self, token, h, position, *kv):
        d, dc = self.d, self.d.config
        key_pos = torch.arange(self.context, dtype=position.dtype)
        x = d.pre_projection(torch.cat([self.t.embed(token[None]), h[None]], -1))  # [1, 1, d]
        for kind, layer in zip(dc.layer_types, d.layers, strict=True):
            window = dc.sliding_window if kind == SLIDING else None
            if self.stateful:
                i = self.layer_of[kind]
                k, v = self.keys[i][None].to(x.dtype), self.values[i][None].to(x.dtype)
            else:
                j = 2 * kinds(dc).index(kind)
                k, v = kv[j][None].to(x.dtype), kv[j + 1][None].to(x.dtype)
            x = layer(x, self.ropes.at(kind, position), k, v, draft_mask(position, key_pos, window))
        x = d.norm(x)[0]  # [1, d]
        h_next = d.post_projection(x).float()
        w = self.t.embed_tokens.weight if dc.share_target_embedding else d.head_weight
        if dc.head == "dense":
            return softcap(F.linear(x, w).float(), dc.final_logit_softcapping)[0], h_next
        top = d.centroids(x)[0].topk(dc.centroid_top_k).indices
        ids = d.cluster_tokens().to(torch.int32).index_select(0, top).reshape(-1)
        logits = softcap((x @ w.index_select(0, ids).T)[0].float(), dc.final_logit_softcapping)
        return ids, logits, h_next
