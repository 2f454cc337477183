"""Routing: weights over the base adapter and the experts for each input (step 5).

With delta the input's unit gradient feature and mu_c the centroids (c = 0 is the base
adapter, the mean of all training features):

    s_c = cos(delta, mu_c),   z_c = (s_c - mean(s)) / std(s),   w = softmax(z / tau)

then optionally keep the top-k weights and renormalise. If every s_c is equal, w is uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def gradient_weights(features: torch.Tensor, centroids: torch.Tensor, temperature: float = 1.0,
                     top_k: int = 0) -> torch.Tensor:
    """Routing weights [n, C+1] from features [n, d] and centroids [C+1, d] (same device)."""
    s = F.normalize(features.float(), dim=1) @ F.normalize(centroids.float().to(features.device), dim=1).T
    std = s.std(dim=1, unbiased=False, keepdim=True)
    z = torch.where(std > 1e-12, (s - s.mean(1, keepdim=True)) / std.clamp(min=1e-12), torch.zeros_like(s))
    return keep_top_k(torch.softmax(z / temperature, dim=1), top_k)


def uniform_weights(features: torch.Tensor, centroids: torch.Tensor, temperature: float = 1.0,
                    top_k: int = 0) -> torch.Tensor:
    """Equal weight on every adapter (a baseline); ignores the features."""
    n, k = features.shape[0], centroids.shape[0]
    return torch.full((n, k), 1.0 / k, device=features.device)


def keep_top_k(w: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest weights of each row and renormalise (k = 0 keeps all)."""
    if k <= 0 or k >= w.shape[1]:
        return w
    idx = w.topk(k, dim=1).indices
    kept = torch.zeros_like(w).scatter_(1, idx, w.gather(1, idx))
    return kept / kept.sum(1, keepdim=True)


ROUTERS = {"gradient": gradient_weights, "uniform": uniform_weights}
