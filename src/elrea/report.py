"""Reports: pictures and a Markdown page for a fitted and evaluated run.

    accuracy.png        test accuracy per method, grouped by source (and overall)
    features.png        gradient features in 2-D (PCA), coloured by cluster and by source
    cluster_source.png  cluster x source counts
    routing.png         mean routing weight of each adapter per test source
    report.md           the accuracy table, cluster summary and the pictures

Clusters are named after the adapter trained on them everywhere: cluster c is `expert_c`, the
adapter in experts/c/ (ELREA.adapters, the card's and `elrea info`'s tables).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from .card import test_counts
from .rundir import Run, atomic_path, load_features, read_json

log = logging.getLogger(__name__)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)


def plot_features(run: Run, sources: list, out: Path, max_points: int = 3000) -> Path:
    from sklearn.decomposition import PCA

    run = Run(run)
    X = load_features(run.features)
    labels = run.labels()
    idx = np.random.default_rng(0).permutation(len(X))[:max_points]
    idx = np.sort(idx)
    pca = PCA(n_components=2, random_state=0)
    xy = pca.fit_transform(np.asarray(X[idx]))
    share = 100 * pca.explained_variance_ratio_
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for ax, key, values in [(axes[0], "cluster", labels[idx]),
                            (axes[1], "source", np.array([str(sources[i]) for i in idx]))]:
        for v in sorted(set(values.tolist()), key=str):
            m = values == v
            ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, label=f"expert_{v}" if key == "cluster" else v)
        ax.set_title(f"gradient features (PCA), coloured by {'cluster (its expert)' if key == 'cluster' else key}")
        ax.set_xlabel(f"PC1 ({share[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({share[1]:.1f}% of variance)")
        ax.legend(fontsize=7, markerscale=2, loc="best")
    _save(fig, out)
    return out


def _heatmap(matrix, rows, cols, title, out: Path, fmt="{:.0f}") -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.1 * len(cols) + 2, 0.5 * len(rows) + 1.8))
    im = ax.imshow(matrix, cmap="Blues", aspect="auto")
    ax.set_xticks(range(len(cols)), cols, rotation=35, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    top = matrix.max() if matrix.size else 1
    for i in range(len(rows)):
        for j in range(len(cols)):
            ax.text(j, i, fmt.format(matrix[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[i, j] > 0.6 * top else "black")
    ax.set_title(title)
    fig.colorbar(im, ax=ax)
    _save(fig, out)
    return out


def plot_cluster_sources(run: Run, out: Path) -> Path | None:
    cl = read_json(Run(run).clusters_json)
    mix = cl.get("source_mix") or {}
    if not mix:
        return None
    sources = sorted({s for c in mix.values() for s in c})
    rows = [f"expert_{c}" for c in range(1, cl["num_clusters"] + 1)]
    M = np.array([[mix[str(c)].get(s, 0) for s in sources] for c in range(1, cl["num_clusters"] + 1)])
    return _heatmap(M, rows, sources, "training examples: cluster x source", out)


def plot_accuracy(accuracy: dict, counts: dict[str, int], out: Path) -> Path:
    """Grouped bars: exact-match accuracy (%) of each method ({method: {"per_source", "overall"}},
    evaluation.accuracy_table) per test source and overall, each group labelled with its n."""
    plt = _plt()
    methods = list(accuracy)
    srcs = list(accuracy[methods[0]]["per_source"])
    groups = [f"{s}\n(n={counts.get(s, '?')})" for s in srcs] + [f"overall\n(n={sum(counts.values())})"]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(groups) * max(1, len(methods) / 2)), 3.8))
    for i, m in enumerate(methods):
        values = [100 * accuracy[m]["per_source"][s] for s in srcs] + [100 * accuracy[m]["overall"]]
        x = np.arange(len(groups)) + (i - (len(methods) - 1) / 2) * width
        bars = ax.bar(x, values, width, label=m)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(groups)), groups, fontsize=8)
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title("held-out test accuracy per source")
    ax.legend(fontsize=8)
    _save(fig, out)
    return out


def plot_routing(eval_rows: list[dict], adapters: list[str], out: Path) -> Path:
    sources = sorted({str(r["source"]) for r in eval_rows})
    W = np.array([np.mean([r["weights"] for r in eval_rows if str(r["source"]) == s], axis=0)
                  for s in sources])
    return _heatmap(W.T, adapters, sources, "mean routing weight per test source", out, fmt="{:.2f}")


def write_report(run: Run | Path, evaluation: dict, adapters: list[str], sources: list,
                 title: str = "ELREA run report", extra: str = "") -> Path:
    run = Run(run)
    run.picture("features.png").parent.mkdir(exist_ok=True)
    plot_features(run, sources, run.picture("features.png"))
    has_mix = plot_cluster_sources(run, run.picture("cluster_source.png")) is not None
    plot_routing(evaluation["examples"], adapters, run.picture("routing.png"))
    acc, n = evaluation["accuracy"], test_counts(evaluation)
    plot_accuracy(acc, n, run.picture("accuracy.png"))
    srcs = list(acc["elrea"]["per_source"])
    lines = [f"# {title}", "", extra, "", "## Exact-match accuracy on held-out test data", "",
             "| method | " + " | ".join(f"{s} (n={n.get(s, '?')})" for s in srcs)
             + f" | mean over sources | overall (n={sum(n.values())}) |",
             "|---|" + "---|" * (len(srcs) + 2)]
    for m, a in acc.items():
        per = [a["per_source"][s] for s in srcs]
        lines.append(f"| {m} | " + " | ".join(f"{100 * v:.1f}" for v in per)
                     + f" | {100 * np.mean(per):.1f} | {100 * a['overall']:.1f} |")
    def rel(name: str) -> str:  # the picture's link from report.md
        return run.picture(name).relative_to(run.report.parent).as_posix()

    cl = read_json(run.clusters_json)
    lines += ["", f"![accuracy per method and source]({rel('accuracy.png')})", "",
              f"## Clusters: C = {cl['num_clusters']}, sizes {cl['sizes']}", "",
              "Cluster c is named after the adapter trained on it: expert_c, in experts/c/.", "",
              f"![features]({rel('features.png')})", ""]
    if has_mix:
        lines += [f"![cluster x source]({rel('cluster_source.png')})", ""]
    lines += ["## Routing", "", f"![routing]({rel('routing.png')})", ""]
    with atomic_path(run.report) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run.report
