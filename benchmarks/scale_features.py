"""Scale: 100,000 synthetic 8192-dimensional features through the feature store, then clustering.

    python benchmarks/scale_features.py                 # ~3-5 min on 2 CPU cores, ~3.3 GB of disk
    python benchmarks/scale_features.py --n 2000 --dim 256 --work /tmp/x    # quick

Writes the features in batches through `FeatureStore` (streamed to disk, committed as it goes),
then clusters them the way `elrea fit` does (BIRCH on a 5,000-example sample, the rest assigned
to the nearest centroid, reading the file in chunks). Reports the time of each phase and the
process's peak resident memory, which must stay under 4 GiB: the store never holds all features
in memory (100,000 x 8192 float32 is 3.05 GiB). Planted clusters make the result checkable.
Writes benchmarks/results/scale_features.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, print_table  # noqa: E402

from elrea.clustering import cluster_features  # noqa: E402
from elrea.config import ClusterConfig  # noqa: E402
from elrea.rundir import FeatureStore, atomic_path, load_features  # noqa: E402


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # ru_maxrss is KiB on Linux


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--clusters", type=int, default=6)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--work", default="benchmarks/work/scale")
    ap.add_argument("--out", default=str(RESULTS / "scale_features.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(args.clusters, args.dim)).astype(np.float32)
    truth = rng.integers(0, args.clusters, size=args.n)

    t0 = time.time()
    store = FeatureStore(work / "train.npy", args.n, args.dim, fingerprint="scale")
    store.prepare()
    shard = store.shard(0, args.n)
    for s in range(0, args.n, args.batch):
        y = truth[s:s + args.batch]
        x = centers[y] + 0.6 * rng.normal(size=(len(y), args.dim)).astype(np.float32)
        shard.write(s, x / np.linalg.norm(x, axis=1, keepdims=True))
        shard.commit(min(s + args.batch, args.n))
    shard.close()
    t_write = time.time() - t0
    rss_after_write = peak_rss_gib()

    t0 = time.time()
    X = load_features(work / "train.npy")
    cl = cluster_features(X, ClusterConfig(num_clusters=0, max_clusters=8, sample_size=5000), seed=0)
    t_cluster = time.time() - t0
    from sklearn.metrics import adjusted_rand_score

    ari = float(adjusted_rand_score(truth, cl.labels))
    report = {"command": command_line(__file__, argv), "machine": machine(), "n": args.n, "dim": args.dim,
              "file_gib": (work / "train.npy").stat().st_size / 2 ** 30,
              "write_seconds": round(t_write, 1), "cluster_seconds": round(t_cluster, 1),
              "peak_rss_gib_after_write": round(rss_after_write, 3), "peak_rss_gib": round(peak_rss_gib(), 3),
              "found_clusters": cl.num_clusters, "planted_clusters": args.clusters, "ari_vs_planted": ari}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print_table(f"feature store + clustering: {args.n} x {args.dim}", ["phase", "seconds", "peak RSS (GiB)"],
                [["write (streamed)", report["write_seconds"], report["peak_rss_gib_after_write"]],
                 ["cluster (sample 5000 + assign)", report["cluster_seconds"], report["peak_rss_gib"]]],
                notes=[f"found C={cl.num_clusters} (planted {args.clusters}), ARI {ari:.3f}; "
                       f"file {report['file_gib']:.2f} GiB"])
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
