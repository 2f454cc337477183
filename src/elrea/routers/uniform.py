"""The uniform router: equal weight on the base adapter and every expert (a baseline)."""

from __future__ import annotations

import torch

from . import RouterPlugin


class UniformRouter:
    name = "uniform"

    def __init__(self, model):
        self.num_adapters = len(model.adapters)

    def signal(self, examples: list) -> torch.Tensor:
        return torch.zeros(len(examples), 0, device="cpu")   # reads nothing; the shape carries the count

    def weights(self, signal, n: int, tau: float = 1.0, top_k: int = 0) -> torch.Tensor:
        return torch.full((n, self.num_adapters), 1.0 / self.num_adapters, device="cpu")


PLUGIN = RouterPlugin(build=UniformRouter)
