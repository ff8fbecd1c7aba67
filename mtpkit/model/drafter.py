"""Reference assistant drafter (Gemma 4 "assistant" design, DESIGN.md §2), plain PyTorch.

One draft step: x = pre_projection(concat(target_embed(token) * sqrt(d_target), h)); a few blocks whose
attention has queries only and reads the *target's* K/V (sliding blocks: its last sliding layer, full
blocks: its last full layer) straight from the target's KVCache buffers, no copy; final norm; logits
from a dense head tied to the drafter's `embed_tokens` or from a centroid-sparse head; and
post_projection(normed) = the next step's h. All steps of one round query at the same position (the
bonus token's); a query at position q sees target keys k < q (the bonus's own K/V is not cached yet).

With `share_target_embedding` the head reads the *target's* embedding matrix instead of its own: it is
bound with `bind_target(weight)` (a plain reference, not a parameter or buffer, so `state_dict`, save and
load never contain it and `num_parameters` does not count it); `draft_step` binds it from the target it
is given. `forward` = `body` (blocks + final norm + post_projection) then `head` (logits); training
calls the two separately so it can compute vocabulary-sized logits in chunks.

Canonical keys: `pre_projection.weight`, `layers.{i}.{input_layernorm,post_attention_layernorm,
pre_feedforward_layernorm,post_feedforward_layernorm}.weight`, `layers.{i}.self_attn.{q_proj,o_proj,q_norm}.weight`,
`layers.{i}.mlp.{gate,up,down}_proj.weight`, `layers.{i}.layer_scalar`, `norm.weight`, `embed_tokens.weight`,
`post_projection.weight` (no `embed_tokens.weight` when the target's is shared), and for the centroid head
`centroids.weight` + `token_ordering`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from mtpkit.errors import MtpkitError
from mtpkit.model.cache import KVCache
from mtpkit.model.config import SLIDING, DrafterConfig, GemmaConfig
from mtpkit.model.layers import GeGLU, RMSNorm, apply_rope, attend, rope_inv_freq, rope_table, softcap


class DraftOutput(NamedTuple):
    logits: torch.Tensor  # dense: [B, T, V]; centroid: [B, T, N] logits of the candidate ids
    hidden: torch.Tensor  # [B, T, d_target] next step's h
    ids: torch.Tensor | None = None  # centroid head: [B, T, N] candidate token ids (N = top_k * tokens_per_centroid)
    centroid_logits: torch.Tensor | None = None  # centroid head: [B, T, num_centroids] router logits

    def dense_logits(self, vocab_size: int, floor: float = float("-inf")) -> torch.Tensor:
        """[B, T, V] logits; with the centroid head, tokens outside the chosen clusters get `floor`."""
        if self.ids is None:
            return self.logits
        out = self.logits.new_full((*self.logits.shape[:-1], vocab_size), floor)
        return out.scatter(-1, self.ids, self.logits)


def draft_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """[T, S] bool: a drafter query at q sees target keys 0 <= k < q (and q - k < window when sliding)."""
    k, q = k_pos[None, :], q_pos[:, None]
    m = (k >= 0) & (k < q)
    if window:
        m = m & ((q - k) < window)  # not &=: traced to an in-place op the Core ML converter lacks
    return m


class QOnlyAttention(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.n_heads, self.hd, self.scale = c.num_attention_heads, c.head_dim, c.attn_scale
        self.q_proj = nn.Linear(c.hidden_size, self.n_heads * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, c.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.hd, c.rms_norm_eps)

    def forward(self, x, rope, k, v, mask):
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2))
        q = apply_rope(q, rope)
        out = attend(q, k.to(q.dtype), v.to(q.dtype), mask, self.scale)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


class DrafterBlock(nn.Module):
    def __init__(self, c: DrafterConfig):
        super().__init__()
        self.self_attn = QOnlyAttention(c)
        self.mlp = GeGLU(c.hidden_size, c.intermediate_size)
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.layer_scalar = nn.Parameter(torch.ones(1))

    def forward(self, x, rope, k, v, mask):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, k, v, mask))
        x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
        return x * self.layer_scalar


class DrafterModel(nn.Module):
    def __init__(self, config: DrafterConfig):
        super().__init__()
        self.config = c = config
        self.pre_projection = nn.Linear(2 * c.target_hidden_size, c.hidden_size, bias=False)
        self.layers = nn.ModuleList(DrafterBlock(c) for _ in c.layer_types)
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        if not c.share_target_embedding:
            self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)  # the head's weight (tied)
        self.__dict__["_target_embedding"] = None  # bound by bind_target; kept out of nn.Module's registries
        self.post_projection = nn.Linear(c.hidden_size, c.target_hidden_size, bias=False)
        if c.head == "centroid":
            self.centroids = nn.Linear(c.hidden_size, c.num_centroids, bias=False)
            # token_ordering[j * tokens_per_centroid : (j + 1) * tokens_per_centroid] = token ids of cluster j
            self.register_buffer("token_ordering", torch.arange(c.vocab_size))
        self.register_buffer("inv_freq_full", rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor),
                             persistent=False)
        self.register_buffer("inv_freq_sliding", rope_inv_freq(c.head_dim, c.rope_local_base_freq), persistent=False)

    def fuse(self) -> DrafterModel:
        """Each block's gate/up as one GEMM (GemmaModel.fuse)."""
        for layer in self.layers:
            layer.mlp.fuse()
        return self

    def num_parameters(self) -> int:
        """The drafter's own parameters; a bound target embedding is the target's and is not counted."""
        return sum(p.numel() for p in self.parameters())

    def bind_target(self, embed_weight: torch.Tensor) -> None:
        """Use the target's embedding matrix [V, d] as the head (only with share_target_embedding).

        Keeps a reference to the tensor (pass the target's nn.Parameter itself so `target.to(...)`, which
        swaps `.data` in place, is followed); it is never saved, moved or trained through the drafter.
        """
        c = self.config
        if not c.share_target_embedding:
            raise MtpkitError("bind_target: this drafter has its own embedding (share_target_embedding is False)")
        if tuple(embed_weight.shape) != (c.vocab_size, c.hidden_size):
            raise MtpkitError(f"bind_target: target embedding has shape {tuple(embed_weight.shape)}, "
                              f"the drafter needs {(c.vocab_size, c.hidden_size)}")
        self.__dict__["_target_embedding"] = embed_weight

    @property
    def is_bound(self) -> bool:
        return not self.config.share_target_embedding or self._target_embedding is not None

    @property
    def head_weight(self) -> torch.Tensor:
        """[V, d] the matrix the head is tied to: the drafter's embed_tokens or the bound target embedding."""
        if not self.config.share_target_embedding:
            return self.embed_tokens.weight
        if self._target_embedding is None:
            raise MtpkitError("drafter shares the target's embedding: call drafter.bind_target(target.embed_tokens.weight)")
        return self._target_embedding

    def forward(self, token_embeds: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor,
                kv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]], attn: dict | None = None) -> DraftOutput:
        """token_embeds [B, T, d_t] (already * sqrt(d_t)), h [B, T, d_t], q_pos [T] query positions,
        kv {SLIDING|FULL: (k [B, KV, S, D], v, key_pos [S])} -> DraftOutput.

        T > 1 is for training (each row its own position); the runtime drafts with T = 1.
        `attn` = attention_inputs(q_pos, kv) if the caller already has it (a draft round reuses it).
        """
        x, h_next = self.body(token_embeds, h, q_pos, kv, attn)
        return self.head(x, h_next)

    def attention_inputs(self, q_pos: torch.Tensor, kv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
                         ) -> dict[str, tuple]:
        """{SLIDING|FULL: (rope, k, v, mask)} for queries at q_pos [T]. Every step of a draft round queries
        at the same position, so the runtime builds this once per round instead of once per step."""
        c = self.config
        out = {}
        for kind in set(c.layer_types):
            k, v, k_pos = kv[kind]
            sliding = kind == SLIDING
            rope = rope_table(q_pos, self.inv_freq_sliding if sliding else self.inv_freq_full)
            out[kind] = (rope, k, v, draft_mask(q_pos, k_pos, c.sliding_window if sliding else None))
        return out

    def body(self, token_embeds: torch.Tensor, h: torch.Tensor, q_pos: torch.Tensor,
             kv: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
             attn: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Same inputs as `forward` -> (x [B, T, d] final-normed features the head reads, h_next [B, T, d_t])."""
        c = self.config
        dt = self.pre_projection.weight.dtype  # the drafter may run in another dtype than the target
        x = self.pre_projection(torch.cat([token_embeds.to(dt), h.to(dt)], dim=-1))
        attn = self.attention_inputs(q_pos, kv) if attn is None else attn
        for kind, layer in zip(c.layer_types, self.layers, strict=True):
            x = layer(x, *attn[kind])
        x = self.norm(x)
        return x, self.post_projection(x)

    def head(self, x: torch.Tensor, h_next: torch.Tensor) -> DraftOutput:
        """x [B, T, d] from `body` -> DraftOutput (dense logits, or the centroid head's candidates)."""
        if self.config.head == "dense":
            return DraftOutput(self.dense_logits(x), h_next)
        return self._centroid_head(x, h_next)

    def dense_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d] -> float32 logits [..., V] over the whole vocabulary (any head type)."""
        w = self.head_weight
        return softcap((x.to(w.dtype) @ w.T).float(), self.config.final_logit_softcapping)

    def cluster_tokens(self) -> torch.Tensor:
        """[num_centroids, tokens_per_centroid] token ids of each cluster (centroid head)."""
        c = self.config
        return self.token_ordering.view(c.num_centroids, c.tokens_per_centroid)

    def _centroid_head(self, x: torch.Tensor, h_next: torch.Tensor) -> DraftOutput:
        c = self.config
        router = self.centroids(x).float()  # [B, T, C]
        top = router.topk(c.centroid_top_k, dim=-1).indices  # [B, T, K]
        ids = self.cluster_tokens()[top].flatten(-2)  # [B, T, K * tokens_per_centroid]
        w = F.embedding(ids, self.head_weight)  # [B, T, N, d]
        logits = softcap(torch.einsum("btd,btnd->btn", x.to(w.dtype), w).float(), c.final_logit_softcapping)
        return DraftOutput(logits, h_next, ids, router)


def target_kv(cache: KVCache, target: GemmaConfig,
              length: int | torch.Tensor | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The K/V views the drafter reads: the target's last sliding and last full layer (no copy).

    `length` (default cache.length) may be a device tensor, for CUDA-graph capture."""
    out = {}
    for kind in set(target.layer_types):
        i = target.last_layer_of(kind)
        out[kind] = (cache.k[i], cache.v[i], cache.key_positions(i, length))
    return out


def draft_step(target, drafter: DrafterModel, token: torch.Tensor, h: torch.Tensor,
               cache: KVCache) -> DraftOutput:
    """One runtime draft step: token [B], h [B, d_t] -> DraftOutput with T = 1.

    Queries at position cache.length (the bonus token's); reads target K/V < cache.length.
    `target` is the GemmaModel whose embedding and cache the drafter shares (a drafter with
    share_target_embedding that is not bound yet gets bound to it here).
    """
    if not drafter.is_bound:
        drafter.bind_target(target.embed_tokens.weight)
    q_pos = torch.tensor([cache.length], device=token.device)
    emb = target.embed(token[:, None])
    return drafter(emb, h[:, None].to(emb.dtype), q_pos, target_kv(cache, target.config))
