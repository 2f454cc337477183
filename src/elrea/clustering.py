"""Clustering unit gradient features into expert groups (step 3 of docs/method.md).

BIRCH (scikit-learn) on unit vectors: Euclidean distance there is sqrt(2 - 2 cos), monotone
in cosine. The number of clusters C is given or chosen in [2, C_max] by the silhouette of
BIRCH's final global clustering step (re-run on the same CF-tree for each C). Clusters
smaller than `min_cluster_size` are merged into the nearest one. With more examples than
`sample_size`, BIRCH is fitted on a seeded sample and the rest go to the nearest centroid.

Labels are 1..C (0 is reserved for the base adapter). Centroid c is the mean of its members'
features; centroid 0 is the mean of all features.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np

from .config import ClusterConfig
from .errors import ConfigError
from .registry import CLUSTERERS  # re-exported: the clustering methods by name

log = logging.getLogger(__name__)


@dataclass
class Clusters:
    labels: np.ndarray                      # (N,) int in 1..C
    centroids: np.ndarray                   # (C+1, d); row 0 = mean of all features
    num_clusters: int
    info: dict = field(default_factory=dict)  # silhouettes, chosen C, merges

    @property
    def sizes(self) -> list[int]:
        return [int((self.labels == c).sum()) for c in range(1, self.num_clusters + 1)]


def birch(X: np.ndarray, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, dict]:
    """0-based labels of X from BIRCH, with the silhouette search when C is automatic."""
    from sklearn.cluster import Birch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import silhouette_score

    threshold = cfg.threshold
    want = cfg.num_clusters or 2
    for _ in range(8):  # halve the threshold until the CF-tree has enough sub-clusters
        brc = Birch(threshold=threshold, branching_factor=cfg.branching_factor, n_clusters=None)
        brc.fit(X)
        if len(brc.subcluster_centers_) >= want:
            break
        log.info("BIRCH threshold %.3g gave %d sub-clusters; halving it", threshold,
                 len(brc.subcluster_centers_))
        threshold /= 2
    n_sub = len(brc.subcluster_centers_)
    if cfg.num_clusters:
        candidates = [cfg.num_clusters]
    else:
        candidates = list(range(2, min(cfg.max_clusters, n_sub, len(X) - 1) + 1)) or [2]
    scores, best = {}, None
    for c in candidates:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            brc.set_params(n_clusters=c)
            brc.partial_fit()  # X=None: redo only the global clustering step
        labels = brc.predict(X)
        if len(candidates) > 1 and len(set(labels)) > 1:
            scores[c] = float(silhouette_score(X, labels, sample_size=min(len(X), 5000),
                                               random_state=seed))
            if best is None or scores[c] > scores[best[0]]:
                best = (c, labels)
        else:
            best = best or (c, labels)
    return best[1], {"threshold": threshold, "subclusters": n_sub, "silhouette": scores,
                     "chosen": best[0]}


def kmeans(X: np.ndarray, cfg: ClusterConfig, seed: int) -> tuple[np.ndarray, dict]:
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    candidates = [cfg.num_clusters] if cfg.num_clusters else range(2, min(cfg.max_clusters, len(X) - 1) + 1)
    best, scores = None, {}
    for c in candidates:
        labels = KMeans(n_clusters=c, n_init=4, random_state=seed).fit_predict(X)
        scores[c] = float(silhouette_score(X, labels, sample_size=min(len(X), 5000), random_state=seed)) \
            if len(set(labels)) > 1 else -1.0
        if best is None or scores[c] > scores[best[0]]:
            best = (c, labels)
    return best[1], {"silhouette": scores, "chosen": best[0]}




def feature_mean(X, chunk: int = 8192) -> np.ndarray:
    """The mean row of X [N, d] (float32), streaming X in chunks."""
    total = np.zeros(X.shape[1])
    for s in range(0, len(X), chunk):
        total += np.asarray(X[s:s + chunk], dtype=np.float64).sum(0)
    return (total / max(1, len(X))).astype(np.float32)


class CenteredFeatures:
    """Rows of X with `mean` subtracted and scaled to unit norm again, computed as they are read
    (features.center): the clustering functions index it as they index X."""

    def __init__(self, X, mean: np.ndarray):
        self.X, self.mean = X, np.asarray(mean, dtype=np.float32)
        self.shape = X.shape

    def __len__(self) -> int:
        return len(self.X)

    def __getitem__(self, idx) -> np.ndarray:
        rows = np.asarray(self.X[idx], dtype=np.float32) - self.mean
        return rows / (np.linalg.norm(rows, axis=-1, keepdims=True) + 1e-12)

    def __array__(self, dtype=None, copy=None):
        return self[:] if dtype is None else self[:].astype(dtype)


def given_clusters(X, labels) -> Clusters:
    """Clusters from given labels (any hashable ids, one per row of X): relabelled 1..C by size."""
    labels = np.asarray(labels)
    if len(labels) != len(X):
        raise ConfigError(f"labels: {len(labels)} given for {len(X)} training examples")
    _, codes = np.unique(labels, return_inverse=True)
    return finalize(X, codes.astype(np.int64), {"given": True})


def cluster_features(X: np.ndarray, cfg: ClusterConfig, seed: int) -> Clusters:
    """Cluster unit feature rows X [N, d] into Clusters with labels 1..C."""
    n = len(X)
    need = max(2, cfg.num_clusters) * cfg.min_cluster_size
    if n < need:
        raise ConfigError(f"clustering: {n} examples cannot form {max(2, cfg.num_clusters)} clusters of "
                          f"at least clustering.min_cluster_size={cfg.min_cluster_size}; use more data "
                          "or lower clustering.num_clusters / clustering.min_cluster_size")
    rng = np.random.default_rng(seed)
    fit_idx = np.sort(rng.choice(n, cfg.sample_size, replace=False)) if n > cfg.sample_size else np.arange(n)
    Xs = np.asarray(X[fit_idx], dtype=np.float32)
    sample_labels, info = CLUSTERERS.get(cfg.method)(Xs, cfg, seed)
    info["fit_examples"] = int(len(fit_idx))
    labels = assign_rest(X, fit_idx, sample_labels)
    labels, merges = merge_small(X, labels, cfg.min_cluster_size)
    info["merged"] = merges
    return finalize(X, labels, info)


def _centroids(X, labels: np.ndarray, ids, chunk: int = 8192) -> np.ndarray:
    """Mean feature of each cluster in `ids`, streaming X in chunks: (len(ids), d)."""
    pos = {int(c): i for i, c in enumerate(ids)}
    index = np.array([pos.get(int(v), -1) for v in labels])
    sums = np.zeros((len(ids), X.shape[1]))
    for s in range(0, len(X), chunk):
        idx = index[s:s + chunk]
        onehot = (idx[None, :] == np.arange(len(ids))[:, None]).astype(np.float64)   # (K, chunk)
        sums += onehot @ np.asarray(X[s:s + chunk], dtype=np.float64)
    return sums / np.bincount(index[index >= 0], minlength=len(ids))[:, None]


def assign_rest(X, fit_idx: np.ndarray, fit_labels: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Labels for all rows: the fitted ones keep theirs, the others go to the nearest centroid."""
    n = len(X)
    if len(fit_idx) == n:
        return np.asarray(fit_labels)
    ids = np.unique(fit_labels)
    cent = _centroids(X[fit_idx], fit_labels, ids)
    cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
    labels = np.empty(n, dtype=np.int64)
    for s in range(0, n, chunk):  # stream: never hold all features in memory at once
        labels[s:s + chunk] = ids[np.argmax(np.asarray(X[s:s + chunk]) @ cent.T, axis=1)]
    labels[fit_idx] = fit_labels
    return labels


def merge_small(X, labels: np.ndarray, min_size: int) -> tuple[np.ndarray, list]:
    """Merge clusters below `min_size` into the cluster with the most similar centroid."""
    labels = labels.copy()
    merges = []
    while True:
        ids, counts = np.unique(labels, return_counts=True)
        if len(ids) <= 1 or counts.min() >= min_size:
            return labels, merges
        small = ids[np.argmin(counts)]
        cent = _centroids(X, labels, ids)
        cent /= np.linalg.norm(cent, axis=1, keepdims=True) + 1e-12
        sims = cent @ cent[list(ids).index(small)]
        sims[list(ids).index(small)] = -np.inf
        into = ids[int(np.argmax(sims))]
        merges.append({"cluster": int(small), "size": int(counts.min()), "into": int(into)})
        labels[labels == small] = into


def finalize(X, labels: np.ndarray, info: dict | None = None) -> Clusters:
    """Relabel to 1..C by decreasing size; centroids with row 0 = mean of all features."""
    ids, counts = np.unique(labels, return_counts=True)
    order = ids[np.lexsort((ids, -counts))]
    remap = {int(old): new for new, old in enumerate(order, start=1)}
    new = np.array([remap[int(v)] for v in labels], dtype=np.int64)
    C = len(order)
    per_cluster = _centroids(X, new, range(1, C + 1))
    overall = (per_cluster * np.bincount(new, minlength=C + 1)[1:, None]).sum(0) / len(X)
    cent = np.vstack([overall, per_cluster])
    return Clusters(labels=new, centroids=cent.astype(np.float32), num_clusters=C, info=info or {})


def purity(labels: np.ndarray, sources: list) -> dict:
    """Adjusted Rand index and NMI of the clusters against the records' sources, when they have them."""
    if not all(s is not None for s in sources) or len(set(sources)) < 2:
        return {}
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    src = [str(s) for s in sources]
    return {"ari_vs_source": round(float(adjusted_rand_score(src, labels)), 4),
            "nmi_vs_source": round(float(normalized_mutual_info_score(src, labels)), 4)}


def cluster_metrics(X, labels: np.ndarray, sources: list) -> dict:
    """What a clustering of rows X [N, d] into `labels` is like: C, sizes (in label order), ARI and
    NMI against the sources (when the records have them) and the silhouette (cosine on unit rows;
    a sample of at most 5,000), the one measure compare, the report and benchmarks use."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels)
    X = np.asarray(X[:], dtype=np.float32)
    values, sizes = np.unique(labels, return_counts=True)
    sil = float(silhouette_score(X, labels, sample_size=min(len(X), 5000), random_state=0)) \
        if len(values) > 1 else None
    return {"num_clusters": int(len(values)), "sizes": sizes.tolist(), **purity(labels, sources), "silhouette": sil}
