"""Routers: the weights over the base adapter and the experts that each prompt gets (step 5).

A router reads a *signal* of each prompt and turns it into weights [n, C+1] (column 0 = the base
adapter, rows sum to 1). Every router is one module of this package, which the registry
(`elrea.registry.ROUTERS`) finds under the module's name: the module's `PLUGIN` says how the
router is built for a loaded `elrea.api.ELREA`, and how the router stage of `elrea fit` fits
it, if at all, from which `routing.*` fields. Adding a router is adding one module.

    gradient   the paper's: the prompt's gradient feature against the clusters' mean features
    embedding  the prompt's sentence embedding against the clusters' mean embeddings
    learned    a classifier on the backbone's hidden states of the prompt (no backward pass)
    uniform    equal weights (a baseline)

Modules whose names start with "_" are shared helpers, not routers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

from ..registry import ROUTERS
from ._similarity import keep_top_k, similarity_weights

if TYPE_CHECKING:
    import numpy as np
    import torch


class Router(Protocol):
    """What every router offers: the signal it reads of each prompt, and the weights from it."""

    name: str

    def signal(self, examples: list) -> "torch.Tensor":
        """What the router reads of each prompt (data.Encoded instructions): [n, dim] on the
        model's device ([n, 0] for a router that reads nothing)."""

    def weights(self, signal: "torch.Tensor", n: int, tau: float, top_k: int) -> "torch.Tensor":
        """Routing weights [n, C+1], float32 on the CPU, from `signal` (as `signal` returns it)
        at routing temperature `tau`, keeping the `top_k` largest (0: all)."""


@dataclass
class RouterFit:
    """What the router stage hands a router that is fitted: the folder it writes (the run's
    router/), the PeftModel with the base adapter active, the training instructions (data.Encoded)
    and their cluster labels (1..C), the routing config, a seed, and whether it is the run's
    routing.router (then a missing dependency is an error, not a skip)."""

    folder: Path
    model: Any
    tokenizer: Any
    instructions: list
    labels: "np.ndarray"
    cfg: Any
    seed: int
    selected: bool


@dataclass(frozen=True)
class RouterPlugin:
    """A router module's PLUGIN. `build(model)` makes the router for a loaded ELREA; `fit(job)`
    (None: nothing to fit) saves what it needs under job.folder and returns a summary for the
    manifest, or None when it was skipped; `fit_fields` are the routing.* fields it reads there
    (they enter the router stage's fingerprint)."""

    build: Callable[[Any], Router]
    fit: Callable[[RouterFit], dict | None] | None = None
    fit_fields: tuple[str, ...] = ()


def build_router(name: str, model) -> Router:
    """The router called `name` for a loaded ELREA model."""
    return ROUTERS.get(name).build(model)


__all__ = ["ROUTERS", "Router", "RouterFit", "RouterPlugin", "build_router", "keep_top_k", "similarity_weights"]
