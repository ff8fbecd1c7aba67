"""The two graphs `mtpkit export --format onnx` traces: thin torch wrappers around the reference modules
(mtpkit.model), with the KV cache made explicit in ONNX Runtime's / Hugging Face's naming. Imports torch: only
mtpkit/export/onnx.py loads this module, inside the functions that export.

Target step, n new tokens at positions p..p+n-1 (p = the cache length):
    input_ids [1, n] int64, position_ids [1, n] int64 (= p + arange(n)), logits_indices [m] int64 (the rows
    whose logits to compute: all n when verifying, the last one after a prefill), past_key_values.{i}.key|value
    [1, KV, S_i, D] = layer i's keys/values at the S_i positions *just before p* (full layers: all p of them;
    sliding layers: the last min(p, window - 1) suffice, more are masked)
 -> logits [1, m, V] float32, hidden_states [1, n, d] (post-final-norm), present.{i}.key|value [1, KV, n, D]:
    only the n new positions, which the caller writes into its own cache at p..p+n-1.
Masks are by absolute position (past key j is at p - S_i + j): exact at any depth past the sliding window.
Attention scores the past and the new keys separately and concatenates the scores, so the graph never copies the
cache (a Concat of past and present K/V would copy all of it every step).

Drafter step (DESIGN.md §2): token [1] int64, h [1, d_t], position [1] int64 (the bonus's, = the target's cache
length q), the target's last sliding and last full layer K/V under the target's own input names (keys at the
positions just before q, as above) -> centroid head: ids [N] int64 + logits [N] float32; dense head: logits [V];
and h_next [d_t].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtpkit.model.config import SLIDING
from mtpkit.model.config import layer_kinds as kinds
from mtpkit.model.drafter import DrafterModel, draft_mask
from mtpkit.model.gemma import GemmaModel
from mtpkit.model.layers import apply_rope, rope_table, softcap


def past_name(i: int, kv: str) -> str:
    return f"past_key_values.{i}.{kv}"


def present_name(i: int, kv: str) -> str:
    return f"present.{i}.{kv}"


def _key_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, S] additive mask (0 or -inf): causal (k <= q) and, if sliding, q - k < window."""
    q, k = q_pos[:, None], k_pos[None, :]
    ok = k <= q
    if window:
        ok = ok & ((q - k) < window)
    return torch.zeros(ok.shape, dtype=torch.float32).masked_fill(~ok, float("-inf"))


def _attend(q, pk, pv, mask_past, k, v, mask_new, scale: float):
    """q [1, H, T, D]; past pk/pv [1, KV, S, D]; new k/v [1, KV, T, D]; masks [T, S] / [T, T] additive
    -> [1, T, H * D]. GQA folds the query heads of a KV head into rows; scores in float32."""
    _, H, T, D = q.shape
    KV = pk.shape[1]
    rep = H // KV
    qf = q.reshape(1, KV, rep * T, D).float() * scale
    s = torch.cat([qf @ pk.float().transpose(-1, -2) + mask_past.repeat(rep, 1),
                   qf @ k.float().transpose(-1, -2) + mask_new.repeat(rep, 1)], -1)
    p = s.softmax(-1)
    S = pk.shape[2]
    out = p[..., :S] @ pv.float() + p[..., S:] @ v.float()
    return out.reshape(1, H, T, D).transpose(1, 2).reshape(1, T, H * D).to(q.dtype)


class TargetGraph(nn.Module):
    def __init__(self, model: GemmaModel):
        super().__init__()
        self.m = model

    def forward(self, input_ids, position_ids, logits_indices, *past):
        m, c = self.m, self.m.config
        pos = position_ids[0]
        x = m.embed(input_ids)
        ropes, masks_new = {}, {}
        for kind in set(c.layer_types):
            sliding = kind == SLIDING
            ropes[kind] = rope_table(pos, m.inv_freq_sliding if sliding else m.inv_freq_full)
            masks_new[kind] = _key_mask(pos, pos, c.sliding_window if sliding else None)
        presents = []
        for i, (layer, kind) in enumerate(zip(m.layers, c.layer_types, strict=True)):
            a = layer.self_attn
            y = layer.input_layernorm(x)
            T = y.shape[1]
            q = a.q_norm(a.q_proj(y).view(1, T, a.n_heads, a.hd).transpose(1, 2))
            k = a.k_norm(a.k_proj(y).view(1, T, a.n_kv, a.hd).transpose(1, 2))
            v = a.v_proj(y).view(1, T, a.n_kv, a.hd).transpose(1, 2)
            q, k = apply_rope(q, ropes[kind]), apply_rope(k, ropes[kind])
            pk, pv = past[2 * i], past[2 * i + 1]
            k_pos = pos[0] - pk.shape[2] + torch.arange(pk.shape[2])
            window = c.sliding_window if kind == SLIDING else None
            out = _attend(q, pk, pv, _key_mask(pos, k_pos, window), k, v, masks_new[kind], a.scale)
            x = x + layer.post_attention_layernorm(a.o_proj(out))
            x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
            presents += [k, v]
        hidden = m.norm(x)
        # the tied head as F.linear: a Gemm(transB) sharing the embedding's constant (export.onnx unties it to quantize)
        logits = F.linear(hidden[0].index_select(0, logits_indices), m.embed_tokens.weight)
        return (softcap(logits.float(), c.final_logit_softcapping)[None], hidden, *presents)


class DrafterGraph(nn.Module):
    """One draft step of DrafterModel (T = 1) over the target's explicit K/V; `target` gives the token embedding
    (and the head's matrix when the drafter shares it). K/V inputs: (key, value) per kind in `kinds(config)`.

    Centroid head: the head's rows are stored cluster by cluster (`rows` [C, T * d] = head_weight[token_ordering]),
    so a step gathers its top clusters as 32 contiguous blocks instead of 4,096 scattered rows (on this repo's CPU
    the scattered Gather was a third of the step); a shared embedding is then read through the same constant
    (`slot` = each token's row in it). `rows_dtype` float16 halves those bytes for the quantized exports."""

    def __init__(self, drafter: DrafterModel, target: GemmaModel, rows_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.d, self.t = drafter, target
        c = drafter.config
        self.shared = c.share_target_embedding
        if c.head == "centroid":
            w = drafter.head_weight.detach()
            self.register_buffer("rows", w[drafter.token_ordering].reshape(c.num_centroids, -1).to(rows_dtype))
            self.register_buffer("slot", torch.argsort(drafter.token_ordering))

    def embed(self, token: torch.Tensor) -> torch.Tensor:
        """token [1] -> [1, 1, d_t], as GemmaModel.embed."""
        if self.d.config.head != "centroid" or not self.shared:
            return self.t.embed(token[:, None])
        e = self.rows.reshape(-1, self.t.config.hidden_size).index_select(0, self.slot.index_select(0, token)).float()
        return (e * torch.tensor(self.t.config.embed_scale, dtype=e.dtype))[None]

    def forward(self, token, h, position, *kv):
        d, c = self.d, self.d.config
        pairs = {kind: (kv[2 * j], kv[2 * j + 1]) for j, kind in enumerate(kinds(c))}
        x = d.pre_projection(torch.cat([self.embed(token).to(h.dtype), h[:, None]], -1))
        for kind, layer in zip(c.layer_types, d.layers, strict=True):
            sliding = kind == SLIDING
            pk, pv = pairs[kind]
            rope = rope_table(position, d.inv_freq_sliding if sliding else d.inv_freq_full)
            k_pos = position[0] - pk.shape[2] + torch.arange(pk.shape[2])
            x = layer(x, rope, pk, pv, draft_mask(position, k_pos, c.sliding_window if sliding else None))
        x = d.norm(x)[0]  # [1, d]
        h_next = d.post_projection(x)[0]
        if c.head == "dense":
            w = self.t.embed_tokens.weight if self.shared else d.head_weight  # the target's own constant if shared
            return softcap(F.linear(x, w).float(), c.final_logit_softcapping)[0], h_next
        top = d.centroids(x).float()[0].topk(c.centroid_top_k).indices
        ids = d.cluster_tokens().index_select(0, top).reshape(-1)
        # F.linear = one Gemm(transB) over the [N, d] rows: ONNX Runtime ran the batched form [C, T, d] @ [d] as a
        # MatMul at 3.7 ms of a 9.7 ms step on this repo's CPU (2 threads, profiled), the Gemm in 0.4 ms
        blocks = self.rows.index_select(0, top).reshape(-1, x.shape[-1]).float()
        logits = softcap(F.linear(x, blocks)[0], c.final_logit_softcapping)
        return ids, logits, h_next

