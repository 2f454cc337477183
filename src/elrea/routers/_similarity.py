"""Weights from similarities to the clusters, shared by the gradient and embedding routers.

With x the prompt's unit signal and mu_c the cluster means (c = 0: the base adapter, the mean
over all training examples):

    s_c = cos(x, mu_c),   z_c = (s_c - mean(s)) / std(s),   w = softmax(z / tau)

then optionally keep the top-k weights and renormalise. If every s_c is equal, w is uniform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def similarity_weights(signal: torch.Tensor, centroids: torch.Tensor, tau: float = 1.0,
                       top_k: int = 0) -> torch.Tensor:
    """Routing weights [n, C+1] from signals [n, d] and centroids [C+1, d], on the signal's device."""
    s = F.normalize(signal.float(), dim=1) @ F.normalize(centroids.float().to(signal.device), dim=1).T
    return standardized_softmax(s, tau, top_k)


# Below this the softmax is a one-hot of the largest similarity already (|z| <= sqrt(C + 1), so
# z / tau stays finite in float32); a smaller tau (1e-300) would make inf - inf = NaN weights.
MIN_TAU = 1e-6


def standardized_softmax(s: torch.Tensor, tau: float = 1.0, top_k: int = 0) -> torch.Tensor:
    std = s.std(dim=1, unbiased=False, keepdim=True)
    z = torch.where(std > 1e-12, (s - s.mean(1, keepdim=True)) / std.clamp(min=1e-12), torch.zeros_like(s))
    return keep_top_k(torch.softmax(z / max(tau, MIN_TAU), dim=1), top_k)


def keep_top_k(w: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest weights of each row and renormalise (k = 0 keeps all)."""
    if k <= 0 or k >= w.shape[1]:
        return w
    idx = w.topk(k, dim=1).indices
    kept = torch.zeros_like(w).scatter_(1, idx, w.gather(1, idx))
    return kept / kept.sum(1, keepdim=True)
