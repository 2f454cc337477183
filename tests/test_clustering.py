"""Contract 4: planted clusters are recovered, and the automatic count finds their number."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from elrea.clustering import assign_rest, cluster_features, merge_small
from elrea.config import ClusterConfig
from elrea.errors import ConfigError


def planted(k=4, per=40, d=64, spread=0.25, seed=0, sizes=None):
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(k, d))
    sizes = sizes or [per] * k
    X = np.vstack([centers[i] + spread * rng.normal(size=(s, d)) for i, s in enumerate(sizes)])
    y = np.concatenate([[i] * s for i, s in enumerate(sizes)])
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    return X.astype(np.float32), y


@pytest.mark.parametrize("method", ["birch", "kmeans"])
def test_recovers_planted_clusters_given_count(method):
    X, y = planted()
    cl = cluster_features(X, ClusterConfig(method=method, num_clusters=4), seed=0)
    assert cl.num_clusters == 4
    assert adjusted_rand_score(y, cl.labels) == 1.0
    assert set(cl.labels) == {1, 2, 3, 4}


@pytest.mark.parametrize("k", [3, 5])
def test_automatic_count_finds_planted_number(k):
    X, y = planted(k=k, seed=k)
    cl = cluster_features(X, ClusterConfig(num_clusters=0, max_clusters=8), seed=0)
    assert cl.num_clusters == k
    assert adjusted_rand_score(y, cl.labels) == 1.0
    assert max(cl.info["silhouette"], key=cl.info["silhouette"].get) == k


def test_centroids_and_base_centroid():
    X, _ = planted()
    cl = cluster_features(X, ClusterConfig(num_clusters=4), seed=0)
    assert cl.centroids.shape == (5, X.shape[1])
    np.testing.assert_allclose(cl.centroids[0], X.mean(0), atol=1e-5)
    for c in range(1, 5):
        np.testing.assert_allclose(cl.centroids[c], X[cl.labels == c].mean(0), atol=1e-5)
    assert cl.sizes == sorted(cl.sizes, reverse=True)


def test_small_clusters_are_merged_into_nearest():
    X, y = planted(k=3, sizes=[40, 40, 3])
    labels, merges = merge_small(X, y + 1, min_size=5)
    assert len(set(labels)) == 2 and merges[0]["size"] == 3
    cent = [X[y == i].mean(0) for i in range(3)]
    nearest = 1 + int(np.argmax([cent[2] @ cent[0], cent[2] @ cent[1]]))
    assert merges[0]["into"] == nearest


def test_fit_on_sample_assigns_the_rest():
    X, y = planted(k=4, per=300, seed=1)
    cl = cluster_features(X, ClusterConfig(num_clusters=4, sample_size=200), seed=0)
    assert cl.info["fit_examples"] == 200
    assert adjusted_rand_score(y, cl.labels) > 0.99
    fit_idx = np.arange(0, len(X), 2)
    labels = assign_rest(X, fit_idx, y[fit_idx])
    assert (labels == y).all()


def test_too_few_examples_is_a_clear_error():
    X, _ = planted(k=2, per=3)
    with pytest.raises(ConfigError, match="min_cluster_size"):
        cluster_features(X, ClusterConfig(num_clusters=2, min_cluster_size=8), seed=0)
