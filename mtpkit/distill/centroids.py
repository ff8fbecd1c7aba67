"""Token ordering for the centroid head: equal-size clusters of the target's embedding rows.

Logits are x . E[t], so tokens whose (unit) embedding rows point the same way compete for the same
hidden states and belong in one cluster. The clusters come from balanced recursive bisection along
principal axes: a group that must hold m clusters is split at the projection rank that leaves
floor(m/2) * n and the rest of its tokens on either side (n = tokens_per_centroid), down to single
clusters. Every cluster gets exactly n tokens, the result is a permutation of range(V), and it costs
O(V d log C): about a second on a GPU and ~15 s on two CPU cores for 262144 x 640.
"""

from __future__ import annotations

import torch

from mtpkit.model.drafter import DrafterModel


def _principal_axis(x: torch.Tensor, iters: int, gen: torch.Generator) -> torch.Tensor:
    """x [n, d] centered -> [d] unit vector, approximately the top principal direction (power iteration)."""
    v = torch.randn(x.shape[1], generator=gen, dtype=torch.float32).to(x)
    for _ in range(iters):
        v = x.T @ (x @ v)
        v = v / v.norm().clamp_min(1e-12)
    return v


@torch.no_grad()
def balanced_ordering(embed: torch.Tensor, num_clusters: int, *, iters: int = 6, seed: int = 0) -> torch.Tensor:
    """embed [V, d] -> token_ordering [V] long: a permutation; cluster j = ordering[j*n:(j+1)*n], n = V // C."""
    V = embed.shape[0]
    if V % num_clusters:
        raise ValueError(f"vocab {V} is not a multiple of {num_clusters} clusters")
    n = V // num_clusters
    x = embed.float()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    gen = torch.Generator().manual_seed(seed)
    order = torch.arange(V, device=embed.device)
    groups = [(0, num_clusters)]  # (start row in `order`, clusters); a group spans m * n consecutive rows
    while any(m > 1 for _, m in groups):
        xs = x[order]  # this level's rows, each group contiguous: slices below are views
        nxt = []
        for start, m in groups:
            if m == 1:
                nxt.append((start, m))
                continue
            xi = xs[start:start + m * n]
            sample = xi[::max(1, xi.shape[0] // 2048)]  # the axis from <= ~4k rows; the split uses all
            proj = xi @ _principal_axis(sample - sample.mean(0, keepdim=True), iters, gen)
            order[start:start + m * n] = order[start:start + m * n][proj.argsort(stable=True)]
            m1 = m // 2
            nxt += [(start, m1), (start + m1 * n, m - m1)]
        groups = nxt
    return order.cpu()


@torch.no_grad()
def init_centroid_head(drafter: DrafterModel, target_embed: torch.Tensor, *, seed: int = 0) -> None:
    """Set `token_ordering` from the target embedding and start the router at each cluster's mean row
    (router logit = x . mean(E[cluster]) = the cluster's mean token logit)."""
    c = drafter.config
    order = balanced_ordering(target_embed, c.num_centroids, seed=seed)
    drafter.token_ordering.copy_(order.to(drafter.token_ordering.device))
    means = target_embed.float()[order.to(target_embed.device)].view(c.num_centroids, c.tokens_per_centroid, -1).mean(1)
    if means.shape[1] == c.hidden_size:
        drafter.centroids.weight.copy_(means)
