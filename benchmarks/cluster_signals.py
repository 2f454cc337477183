"""Clusters against sources for each feature setting of a fitted run, without training experts.

    python benchmarks/cluster_signals.py RUN [RUN ...]

For each run directory (after its features stage), clusters its stored gradient features with
the run's clustering settings, both as stored (row `gradient`: the paper's uncentred features,
whatever the run's features.center) and centred (row `gradient, centred`), and BIRCH with the same
settings on the sentence embeddings of the instructions, and prints C, sizes, ARI / NMI against
the records' sources and the silhouette; JSON to benchmarks/results/cluster_signals.json, with
each cluster's sources (`members`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, print_table, write_report  # noqa: E402

from elrea.clustering import CenteredFeatures, cluster_features, cluster_metrics, feature_mean  # noqa: E402
from elrea.config import RunConfig  # noqa: E402
from elrea.data import load_records  # noqa: E402
from elrea.routers.embedding import embed  # noqa: E402
from elrea.rundir import Run, load_features, read_json  # noqa: E402


def describe(X, labels, sources) -> dict:
    """cluster_metrics, and which sources each cluster holds ({label: {source: count}}, largest first)."""
    from collections import Counter

    members = {}
    for lab in sorted(set(labels.tolist())):
        counts = Counter(str(s) for s, c in zip(sources, labels.tolist()) if c == lab)
        members[str(lab)] = dict(counts.most_common())
    return {**cluster_metrics(X, labels, sources), "members": members}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", default=str(RESULTS / "cluster_signals.json"))
    args = ap.parse_args(argv)
    report = {"command": command_line(__file__, argv), "machine": machine(), "runs": {}}
    rows = []
    for run in args.runs:
        rd = Run(run)
        man = read_json(rd.manifest)
        cfg = RunConfig.from_dict(man["config"]).validate()
        records = load_records(man["data"])
        sources = [r.source for r in records]
        X = load_features(rd.features)
        seed = cfg.stage_seed("clustering")
        res = {}
        for name, feats in (("gradient", X), ("gradient, centred", CenteredFeatures(X, feature_mean(X)))):
            res[name] = describe(feats, cluster_features(feats, cfg.clustering, seed).labels, sources)
        E = embed([r.instruction for r in records]).numpy()
        res["sentence embedding"] = describe(E, cluster_features(E, cfg.clustering, seed).labels, sources)
        report["runs"][run] = res
        for name, v in res.items():
            rows.append([run, name, v["num_clusters"], " ".join(map(str, v["sizes"])), v.get("ari_vs_source"),
                         v.get("nmi_vs_source"), v["silhouette"]])
    print_table("clusters against sources", ["run", "signal", "C", "sizes", "ARI", "NMI", "silhouette"], rows)
    write_report(Path(args.out), report)


if __name__ == "__main__":
    main()
