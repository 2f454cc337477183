"""The gradient router (the paper's, docs/method.md step 5): the prompt's instruction-only
gradient feature of the base adapter against the clusters' mean training features.

When the run centred its features (features.center), the prompt's feature has the stored mean
training feature subtracted and is normalised again, as the training features were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import RouterPlugin
from ._similarity import similarity_weights


class GradientRouter:
    name = "gradient"

    def __init__(self, model):
        self.model = model
        self.centroids = model.centroids                 # (C+1, d) on the model's device
        self.mean = model.feature_mean                   # (d,) or None

    def signal(self, examples: list) -> torch.Tensor:
        f = self.model.features(examples)
        return center(f, self.mean)

    def weights(self, signal: torch.Tensor, n: int, tau: float = 1.0, top_k: int = 0) -> torch.Tensor:
        return similarity_weights(signal, self.centroids, tau, top_k).cpu()


def center(features: torch.Tensor, mean: torch.Tensor | None) -> torch.Tensor:
    """Unit features with the mean training feature removed (unchanged when mean is None)."""
    if mean is None:
        return features
    return F.normalize(features.float() - mean.to(features.device, torch.float32), dim=1)


PLUGIN = RouterPlugin(build=GradientRouter)  # its centroids are the clusters stage's: nothing to fit
