"""Routers: the weights over the base adapter and the experts that each prompt gets (step 5).

A router reads a *signal* of each prompt and turns it into weights [n, C+1] (column 0 = the base
adapter, rows sum to 1). Every router family has its own module:

    gradient   the paper's: the prompt's gradient feature against the clusters' mean features
    embedding  the prompt's sentence embedding against the clusters' mean embeddings
    learned    a classifier on the backbone's hidden states of the prompt (no backward pass)
    uniform    equal weights (a baseline)

`ROUTERS` maps each name to its class; `ROUTERS[name](model)` builds it from a loaded
`elrea.api.ELREA` (what it needs of the run directory comes from `model.run_dir`). The names
are also listed in `elrea.config.ROUTER_NAMES`, which validates configs without importing this.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from .embedding import EmbeddingRouter
from .gradient import GradientRouter
from .learned import LearnedRouter
from .similarity import keep_top_k, similarity_weights
from .uniform import UniformRouter

if TYPE_CHECKING:
    import torch


class Router(Protocol):
    """What every router offers: the signal it reads of each prompt, and the weights from it."""

    name: str

    def signal(self, examples: list) -> "torch.Tensor":
        """What the router reads of each prompt (data.Encoded instructions): [n, dim] on the
        model's device ([n, 0] for a router that reads nothing)."""

    def weights(self, signal: "torch.Tensor", n: int, temperature: float, top_k: int) -> "torch.Tensor":
        """Routing weights [n, C+1], float32 on the CPU, from `signal` (as `signal` returns it)."""


ROUTERS: dict[str, type] = {
    "gradient": GradientRouter,
    "embedding": EmbeddingRouter,
    "learned": LearnedRouter,
    "uniform": UniformRouter,
}


def build_router(name: str, model) -> Router:
    """The router called `name` for a loaded ELREA model."""
    from ..errors import unknown_name

    if name not in ROUTERS:
        raise unknown_name("router", name, ROUTERS)
    return ROUTERS[name](model)


__all__ = ["ROUTERS", "Router", "build_router", "keep_top_k", "similarity_weights", "GradientRouter",
           "EmbeddingRouter", "LearnedRouter", "UniformRouter"]
