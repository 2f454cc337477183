"""The work of `elrea compare` (see the package docstring)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import load_config
from ..data import load_records
from ..errors import ConfigError, ElreaError
from ..evaluation import Method, RowLog, answer_all, answers_key, evaluation_key
from ..rundir import Run, RunLock, atomic_path, read_json, write_json
from .stats import accuracy, paired_difference, validation_rank

log = logging.getLogger(__name__)
ARROW_TOP_K = 3   # PEFT's ArrowConfig default and the Arrow paper's choice
COST_PROMPTS = 16  # test prompts each method decodes alone to measure its inference cost


@dataclass
class CompareOptions:
    routers: tuple = ("gradient", "embedding", "learned")
    candidates: list = field(default_factory=lambda: [[], ["features.center=false"]])
    tau_grid: tuple = (0.5, 1.0, 2.0)
    # sparse ensembles tried on validation besides all experts: top-1 (tau 1; one adapter), and
    # top-k for 2 <= k <= C at the temperature that was best for all experts (the base adapter
    # is one of the C + 1 weights)
    top_ks: tuple = (1, 2)
    # the budget curve: ELREA refitted with base and experts at half their epochs, so that it meets
    # one LoRA at (about) equal optimizer steps
    budget_curve: bool = True
    checker: str = "auto"
    validation_share: float = 0.1
    seed: int = 0
    baselines: tuple = ("uniform", "random", "source", "arrow")
    # settings whose clusters are reported (against sources) without training experts on them
    cluster_settings: list = field(default_factory=lambda: [["clustering.signal=full"]])


def compare(train: str | Path, test: str | Path | list, out: str | Path, config: str | None = None,
            overrides: list[str] | None = None, validation: str | Path | None = None,
            options: CompareOptions | None = None) -> dict:
    """Fit and evaluate every method; write OUT/compare.json and OUT/report.md; return the result.

    `test` is one file or several: the first is "the" test set (the headline table, the pictures);
    each further one (e.g. held-out tasks, bbh.jsonl) gets its own table and paired intervals,
    under its file name in `report["held_out"]`."""
    from ..tasks import checker as make_checker

    opt = options or CompareOptions()
    overrides = list(overrides or [])
    paths = [Path(t) for t in (test if isinstance(test, (list, tuple)) else [test])]
    names = _test_names(paths)
    checks = {n: make_checker(opt.checker, p) for n, p in zip(names, paths)}  # a missing package fails first
    load_config(config, overrides)  # a bad config fails before anything is written
    _check_candidates(config, overrides, opt.candidates)
    tests = {n: (p, load_records(p), checks[n]) for n, p in zip(names, paths)}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with RunLock(out):  # one compare per directory; its fits lock their own runs
        return _compare(train, tests, out, config, overrides, validation, opt)


def _check_candidates(config, overrides: list[str], candidates: list) -> None:
    """Refuse candidates that are the same run twice: the same settings once resolved (e.g. one
    setting a field to its default), or the same run directory name."""
    seen: dict = {}
    for cand in candidates:
        settings = json.dumps(load_config(config, overrides + list(cand)).to_dict(), sort_keys=True)
        for what in (settings, _run_name(cand)):
            if what in seen:
                raise ConfigError(f"--candidates: {','.join(cand)!r} and {','.join(seen[what])!r} give the same "
                                  "run; drop one")
            seen[what] = cand


def _test_names(paths: list[Path]) -> list[str]:
    """"test" for the first file; each other its file name's stem, made unique."""
    names = ["test"]
    for p in paths[1:]:
        name, i = p.stem, 2
        while name in names:
            name, i = f"{p.stem}-{i}", i + 1
        names.append(name)
    return names


def _compare(train, tests: dict, out: Path, config, overrides: list[str], validation,
             opt: CompareOptions) -> dict:
    test, test_records, check = tests["test"]
    from .report import show, write_report

    train, val_path, carved = _validation_split(train, validation, out, opt)
    val_records = load_records(val_path)
    work = _Work(out, check, opt.checker)
    times: dict[str, float] = {}

    # ELREA candidates: the first is the run the others share their base adapter and features with
    runs = {}
    for cand in opt.candidates:
        name = _run_name(cand)
        rd = Run(out / "runs" / name)
        cfg = load_config(config, overrides + list(cand))
        if runs:
            _share(rd, next(iter(runs.values()))["run"], cfg)
        t = time.time()
        _fit(train, rd, cfg)
        times[f"fit {name}"] = round(time.time() - t, 1)
        runs[name] = {"run": rd, "overrides": list(cand), "config": cfg}

    # choose on validation: per router, the candidate and temperature (full ensemble) and the
    # candidate for top-1; the best of all of them is "elrea"
    trials = []
    for name, r in runs.items():
        trials += work.validate(name, r["run"], val_records, opt)
    chosen = _choose(trials, opt.routers)
    best = max(chosen.values(), key=validation_rank)
    log.info("chosen on validation: %s", ", ".join(f"{k}: {v['run']} tau={v['tau']} top_k={v['top_k']}"
                                                    for k, v in chosen.items()))

    # baselines
    first_name = next(iter(runs))
    first = runs[first_name]["run"]
    stages = read_json(first.manifest)["stages"]
    steps = steps_of(first)
    matched = Run(out / "runs" / "lora-matched")
    t = time.time()
    _fit(train, matched, load_config(config, overrides + [f"base.max_steps={steps}"]), until="base")
    times["fit lora-matched"] = round(time.time() - t, 1)
    elrea_methods = _elrea_methods(trials, chosen, runs, opt)
    best_method = f"elrea-{best['router']}" + (f"-top{best['top_k']}" if best["top_k"] else "")
    # the headline first: the chosen ELREA against one LoRA at its epochs and at ELREA's steps, on
    # every test file, before the other baselines train (hours, on a CPU); the answers are cached
    # and count again below
    _headline(work, out, tests, {best_method: elrea_methods[best_method], "lora": (first, Method(column=0)),
                                 "lora-matched": (first, Method(adapter=str(matched.base)))}, opt.seed)
    best_run = runs[best["run"]]
    extra_runs = {}
    train_records = load_records(train)
    labels = best_run["run"].labels()
    rng = np.random.default_rng(opt.seed)
    given = {}
    if "random" in opt.baselines:
        given["random"] = rng.permutation(labels)
    if "source" in opt.baselines and all(r.source is not None for r in train_records):
        given["source"] = np.array([str(r.source) for r in train_records])
    for name, lab in given.items():
        rd = Run(out / "runs" / name)
        _share(rd, best_run["run"], best_run["config"])
        t = time.time()
        _fit(train, rd, best_run["config"], labels=lab, until="experts")
        times[f"fit {name}"] = round(time.time() - t, 1)
        extra_runs[name] = rd

    if opt.budget_curve:   # ELREA at half its epochs (the chosen setting): one LoRA's steps, about
        bc = best_run["config"]
        half = Run(out / "runs" / "elrea-half")
        t = time.time()
        _fit(train, half, load_config(config, overrides + list(best_run["overrides"]) + [
            f"base.epochs={bc.base.epochs / 2:g}", f"experts.epochs={bc.experts.epochs / 2:g}"]))
        times["fit elrea-half"] = round(time.time() - t, 1)

    # clusters of other settings, reported only (features and clusters, no experts)
    cluster_runs = {}
    for setting in opt.cluster_settings:
        rd = Run(out / "runs" / ("clusters-" + _run_name(setting)[len("elrea-"):]))
        cfg = load_config(config, overrides + list(setting))
        _share(rd, first, cfg)   # clustering.signal=full computes features of its own
        t = time.time()
        _fit(train, rd, cfg, until="clusters")
        times[f"fit {rd.root.name}"] = round(time.time() - t, 1)
        cluster_runs[rd.root.name] = rd

    # test, then each held-out file
    results, methods = {}, dict(elrea_methods)
    methods["lora"] = (first, Method(column=0))
    methods["lora-matched"] = (first, Method(adapter=str(matched.base)))
    if "uniform" in opt.baselines:
        methods["uniform"] = (best_run["run"], Method(router="uniform", tau=1.0, top_k=0))
    if "arrow" in opt.baselines:   # a peer: PEFT's Arrow routing over the chosen run's experts
        methods["arrow"] = (best_run["run"], Method(arrow=ARROW_TOP_K))
    # random and source: the chosen run's own full gradient ensemble with its clusters replaced,
    # at the temperature chosen for that ensemble on validation (only the grouping differs)
    mine = [t for t in trials if t["run"] == best["run"]]
    tau = _best(mine, "gradient", 0)["tau"] if any(t["router"] == "gradient" and t["top_k"] == 0 for t in mine) \
        else best["tau"]
    for name, rd in extra_runs.items():
        methods[name] = (rd, Method(router="gradient", tau=tau, top_k=0))
    if opt.budget_curve:
        methods["elrea-half"] = (half, Method(router=best["router"], tau=best["tau"], top_k=best["top_k"]))
    outputs = work.outputs_all("test", methods, test_records)
    for m in methods:
        results[m] = accuracy(test_records, outputs[m]["correct"])
        log.info("test %s: mean accuracy %.3f", m, results[m]["mean"])
    seconds = {m: work.cost(m, rd, test_records, method) for m, (rd, method) in methods.items()}
    tokens = _TokensSeen(train)
    budget = {m: {"steps": stages["base"]["steps"] if m == "lora" else
                  (steps_of(matched) if m == "lora-matched" else steps_of(rd)),
                  "tokens": tokens(first, base_only=True) if m == "lora" else
                  tokens(matched if m == "lora-matched" else rd),
                  "test_mean": results[m]["mean"], "seconds_per_prompt": round(seconds[m], 4)}
              for m, (rd, _) in methods.items()}
    versus = _versus(test_records, results, opt.seed)
    versus_lora = _versus(test_records, results, opt.seed, "lora")
    held_out = {}
    for name, (path, records, file_check) in tests.items():
        if name == "test":
            continue
        acc = {}
        outputs = work.outputs_all(f"test-{name}", methods, records, check=file_check)
        for m in methods:
            acc[m] = accuracy(records, outputs[m]["correct"])
            log.info("%s %s: mean accuracy %.3f", name, m, acc[m]["mean"])
        held_out[name] = {"path": str(path), "examples": len(records), "accuracy": acc,
                          "versus_lora_matched": _versus(records, acc, opt.seed),
                          "versus_lora": _versus(records, acc, opt.seed, "lora")}

    report = {
        "data": {"train": str(train), "validation": str(val_path), "validation_carved": carved,
                 "test": str(test), "examples": {"train": len(train_records), "validation": len(val_records),
                                                 "test": len(test_records)}},
        "checker": opt.checker, "options": _jsonable(dataclasses.asdict(opt)),
        "compute_matched_steps": steps, "chosen": {k: _clean(v) for k, v in chosen.items()},
        "elrea": _clean(best), "trials": [_clean(t) for t in trials], "accuracy": results,
        "versus_lora_matched": versus, "versus_lora": versus_lora, "held_out": held_out,
        "budget": {"methods": budget, "elrea": best_method, "curves": {
            "one LoRA": ["lora", "lora-matched"],
            "ELREA (chosen)": (["elrea-half"] if opt.budget_curve else []) + [best_method]}},
        "clusterings": _clusterings(runs, {**cluster_runs, **extra_runs}, train_records, best_run["config"]),
        "routing_cost": work.routing_cost(runs[best["run"]]["run"], test_records, opt.routers),
        "stage_seconds": {name: _stage_seconds(rd) for name, rd in
                          [(n, r["run"]) for n, r in runs.items()] + [("lora-matched", matched)]
                          + list(extra_runs.items()) + ([("elrea-half", half)] if opt.budget_curve else [])},
        "fit_seconds_this_process": times,   # a resumed fit's skipped stages take ~0: see stage_seconds
    }
    with atomic_path(out / "compare.json") as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    show(report)
    write_report(out, report)
    return report


# ----------------------------------------------------------------------------- pieces

def _share(rd: Run, source: Run, cfg, stages=("base", "features")) -> None:
    """Share `stages` of `source` with `rd` (Run.share), up to the first whose settings under `cfg`
    are not source's: `fit` would recompute that one, and sharing it again at every resume would
    overwrite what `rd` computed of its own."""
    from ..pipeline import fingerprints

    mine, theirs = fingerprints(cfg, ""), fingerprints(source.config(), "")
    same = list(itertools.takewhile(lambda s: mine[s] == theirs[s], stages))  # fingerprints chain
    if same:
        rd.share(source, same)


def _fit(train, rd: Run, cfg, **kw):
    from ..pipeline import fit

    return fit(train, rd.root, cfg, **kw)


def steps_of(rd: Run) -> int:
    """Optimizer steps a run's adapters took: its base adapter's and all its experts'."""
    stages = read_json(rd.manifest)["stages"]
    experts = stages.get("experts", {}).get("finished", {})
    return stages["base"]["steps"] + sum(e["steps"] for e in experts.values())


class _TokensSeen:
    """Non-padding tokens a run's adapters trained on (elrea.pipeline.trained_tokens, once a run):
    its base adapter's, and unless `base_only` all its experts'."""

    def __init__(self, train):
        self.train, self.runs = train, {}

    def __call__(self, rd: Run, base_only: bool = False) -> int:
        from ..pipeline import trained_tokens

        if rd.root not in self.runs:
            self.runs[rd.root] = trained_tokens(rd, self.train)
        t = self.runs[rd.root]
        return t["base"] + (0 if base_only else sum(t["experts"].values()))


def _versus(records, results: dict, seed: int, against: str = "lora-matched") -> dict:
    """{method: its paired difference (points, 95% interval) to `against`} for the other methods:
    lora-matched (ELREA's compute) or lora (one LoRA at the config's epochs, the paper's comparison)."""
    base = results[against]["correct"]
    return {m: paired_difference(records, r["correct"], base, seed=seed) for m, r in results.items()
            if m != against}


def _run_name(overrides: list[str]) -> str:
    if not overrides:
        return "elrea"
    def part(o: str) -> str:
        key, _, value = o.partition("=")
        key = key.split(".")[-1]
        return key if value.strip().lower() == "true" else f"{key}_{value}"

    slug = "-".join(re.sub(r"[^A-Za-z0-9_]+", "_", part(o)).strip("_") for o in overrides)
    return f"elrea-{slug}"


def _validation_split(train, validation, out: Path, opt: CompareOptions):
    """(train file, validation file, carved?): a seeded share of the training records per source
    becomes validation when no validation file is given."""
    if validation is not None:
        return Path(train), Path(validation), False
    records = load_records(train)
    rng = np.random.default_rng(opt.seed)
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_source.setdefault(str(r.source), []).append(i)
    val_idx = set()
    for idx in by_source.values():
        k = max(1, int(round(opt.validation_share * len(idx))))
        val_idx.update(rng.choice(idx, size=min(k, len(idx) - 1), replace=False).tolist())
    if not val_idx:
        raise ConfigError(f"{train}: too few records to carve a validation split; give --validation")
    d = out / "data"
    d.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, keep in (("train", lambda i: i not in val_idx), ("validation", lambda i: i in val_idx)):
        rows = [_record_dict(r) for i, r in enumerate(records) if keep(i)]
        with atomic_path(d / f"{split}.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows), encoding="utf-8")
        paths[split] = d / f"{split}.jsonl"
    log.warning("no --validation given: carved %d of %d training records (%.0f%% per source, seed %d) into %s; "
                "the runs train on the other %d", len(val_idx), len(records), 100 * opt.validation_share, opt.seed,
                paths["validation"], len(records) - len(val_idx))
    return paths["train"], paths["validation"], True


def _record_dict(r) -> dict:
    d = {"instruction": r.instruction, "response": r.response}
    return d if r.source is None else {**d, "source": r.source}


def _choose(trials: list[dict], routers) -> dict:
    chosen = {}
    for router in routers:
        mine = [t for t in trials if t["router"] == router]
        if mine:
            chosen[router] = max(mine, key=validation_rank)
    if not chosen:
        raise ElreaError("compare: no router could be evaluated on validation")
    return chosen


def _elrea_methods(trials: list[dict], chosen: dict, runs: dict, opt: CompareOptions) -> dict:
    """{elrea-ROUTER[-topK]: (run, Method)}: per router, its best full ensemble and its best top-k
    for each k tried, each at the candidate and temperature best on validation."""
    methods = {}
    for router in chosen:
        full = _best(trials, router, 0)
        methods[f"elrea-{router}"] = (runs[full["run"]]["run"], Method(router=router, tau=full["tau"], top_k=0))
        for k in opt.top_ks:
            if any(t["router"] == router and t["top_k"] == k for t in trials):
                top = _best(trials, router, k)
                methods[f"elrea-{router}-top{k}"] = (runs[top["run"]]["run"],
                                                     Method(router=router, tau=top["tau"], top_k=k))
    return methods


def _headline(work: _Work, out: Path, tests: dict, methods: dict, seed: int) -> dict:
    """Decode `methods` (the chosen ELREA, lora, lora-matched) on every test file and write
    OUT/headline.json: accuracy (mean and per source) and the paired differences against
    lora-matched and lora, per file. It comes hours before compare.json on a CPU, which repeats
    these numbers among the rest."""
    result = {"methods": list(methods), "files": {}}
    for name, (path, records, check) in tests.items():
        split = "test" if name == "test" else f"test-{name}"
        outputs = work.outputs_all(split, methods, records, check=check)
        acc = {m: accuracy(records, outputs[m]["correct"]) for m in methods}
        versus = {against: _versus(records, acc, seed, against) for against in ("lora-matched", "lora")}
        result["files"][name] = {"path": str(path), "examples": len(records),
                                 "accuracy": {m: a["mean"] for m, a in acc.items()},
                                 "per_source": {m: a["per_source"] for m, a in acc.items()},
                                 "versus_lora_matched": versus["lora-matched"], "versus_lora": versus["lora"]}
        for against, diffs in versus.items():
            for m, v in diffs.items():
                log.info("headline, %s: %s vs %s %+.1f points, 95%% interval [%+.1f, %+.1f]", name, m, against,
                         v["points"], *v["ci95"])
    write_json(out / "headline.json", result)
    return result


def _best(trials, router, top_k: int) -> dict:
    mine = [t for t in trials if t["router"] == router and t["top_k"] == top_k]
    return max(mine, key=validation_rank)


def _group_name(methods: dict) -> str:
    """A short name for a set of method keys (the partial directory of their joint decoding)."""
    import hashlib

    keys = sorted(methods)
    return keys[0] if len(keys) == 1 else f"{len(keys)}-methods-" + hashlib.sha256(
        "\n".join(keys).encode()).hexdigest()[:10]


def _clean(t: dict) -> dict:
    return {k: v for k, v in t.items() if k != "correct"}


def _jsonable(d):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _stage_seconds(rd: Run) -> dict:
    return {k: v.get("seconds") for k, v in read_json(rd.manifest)["stages"].items()}


def _clusterings(runs: dict, extra: dict, records, cfg) -> dict:
    """C, sizes, ARI / NMI against sources, and silhouette of every run's clusters; and, for
    reference, BIRCH with the same settings on the instructions' sentence embeddings."""
    from ..clustering import CenteredFeatures
    from ..rundir import load_features

    out = {}
    sources = [r.source for r in records]
    for name, rd in [(n, r["run"]) for n, r in runs.items()] + list(extra.items()):
        info = read_json(rd.clusters_json)
        X = load_features(rd.features)
        mean = _stored_mean(rd)
        out[name] = {**_metrics(CenteredFeatures(X, mean) if mean is not None else X, info["labels"], sources),
                     "centered": info.get("centered", False),
                     "signal": read_json(rd.manifest)["stages"]["features"].get("signal", "instruction")}
    out.update(_embedding_clusters(records, cfg))
    return out


def _metrics(X, labels, sources) -> dict:
    from ..clustering import cluster_metrics

    m = cluster_metrics(X, np.asarray(labels), sources)
    return {"num_clusters": m["num_clusters"], "sizes": m["sizes"], "ari": m.get("ari_vs_source"),
            "nmi": m.get("nmi_vs_source"), "silhouette": m["silhouette"]}


def _embedding_clusters(records, cfg) -> dict:
    """BIRCH (the run's clustering settings) on unit sentence embeddings of the instructions."""
    from ..clustering import cluster_features
    from ..routers.embedding import available, embed

    if not available(cfg.routing.embedding_model):
        return {}
    X = embed([r.instruction for r in records], cfg.routing.embedding_model).numpy()
    cl = cluster_features(X, cfg.clustering, cfg.stage_seed("clustering"))
    return {"sentence-embedding clusters": {**_metrics(X, cl.labels, [r.source for r in records]),
                                            "centered": False, "signal": "embedding"}}


def _stored_mean(rd: Run):
    from safetensors.numpy import load_file

    return load_file(str(rd.centroids)).get("feature_mean")


class _Work:
    """Loaded models (one at a time) and the cache of decoded splits under OUT/evals. A cached
    answer file is reused only under its key (elrea.evaluation.answers_key: the run's stage
    fingerprints, the records, the generation and routing config, the method, an adapter
    folder's contents and the checker): a refitted run or a changed setting decodes again."""

    def __init__(self, out: Path, check, checker_name: str = ""):
        self.out, self.check, self.checker_name = out, check, checker_name
        self.model, self.loaded = None, None

    def key(self, rd: Run, records, method: Method) -> str:
        return answers_key(rd.root, rd.config(), records, {"method": method}, self.checker_name)

    def load(self, rd: Run):
        from ..api import ELREA

        if self.loaded != rd.root:
            self.model = None
            self.model = ELREA.from_pretrained(rd.root)
            self.loaded = rd.root
        return self.model

    def outputs_all(self, split: str, methods: dict, records, signals: dict | None = None, check=None) -> dict:
        """{key: decoded outputs and 0/1 results} of methods {key: (run, Method)} on one split, each
        cached as OUT/evals/<split>-<key>.json. What is not cached is answered by
        elrea.evaluation.answer_all: the methods that weigh one run's own adapters (routed, or a
        column) in one call per run, which decodes their copies of a prompt on shared rows;
        the others (an adapter folder, Arrow) alone. Finished batches survive interruption.
        signals: {key: the router's signal for every record}, where computed before."""
        check = check or self.check
        out = {}
        groups: dict[tuple, dict] = {}
        for key, (rd, method) in methods.items():
            cached = self._cached(split, key, rd, records, method)
            if cached is not None:
                out[key] = cached
                continue
            alone = method.adapter is not None or method.arrow is not None
            groups.setdefault((str(rd.root), key if alone else ""), {})[key] = (rd, method)
        for group in groups.values():
            rd = next(iter(group.values()))[0]
            model = self.load(rd)
            wanted = {k: m for k, (_, m) in group.items()}
            partial = self.out / "evals" / f"{split}-{_group_name(wanted)}.partial"
            t = time.time()
            sig = {k: (signals or {}).get(k) for k in wanted}
            rows = answer_all(model, records, wanted, check, resume=partial, signal=sig,
                              desc=f"{split} {', '.join(wanted)}",
                              key=evaluation_key(model, records, wanted, self.checker_name))
            seconds = round(time.time() - t, 2)
            for k, method in wanted.items():
                out[k] = {"run": str(rd.root), "how": method.key(), "key": self.key(rd, records, method),
                          "outputs": [r[f"{k}_output"] for r in rows], "correct": [int(r[k]) for r in rows],
                          "seconds": seconds, "decoded_with": sorted(wanted)}
                write_json(self.out / "evals" / f"{split}-{k}.json", out[k])
            RowLog(partial, "").clear()
        return out

    def _cached(self, split: str, key: str, rd: Run, records, method: Method) -> dict | None:
        path = self.out / "evals" / f"{split}-{key}.json"
        if path.exists():
            cached = read_json(path)
            if cached.get("key") == self.key(rd, records, method):
                return cached
        return None

    def cost(self, key: str, rd: Run, records, method: Method, n: int = COST_PROMPTS) -> float:
        """Decoding seconds per prompt of one method alone, on the first `n` test prompts (cached
        as OUT/evals/cost-<key>.json): its inference cost beside its accuracy. The test answers
        themselves are decoded several methods at once, so their time is not one method's."""
        path = self.out / "evals" / f"cost-{key}.json"
        sample = records[:n]
        if path.exists():
            cached = read_json(path)
            if cached.get("key") == self.key(rd, sample, method):
                return cached["seconds_per_prompt"]
        model = self.load(rd)
        t = time.time()
        answer_all(model, sample, {key: method}, self.check, desc=None)
        result = {"run": str(rd.root), "how": method.key(), "key": self.key(rd, sample, method), "prompts": len(sample),
                  "seconds_per_prompt": round((time.time() - t) / max(1, len(sample)), 4)}
        write_json(path, result)
        return result["seconds_per_prompt"]

    def validate(self, name: str, rd: Run, val, opt: CompareOptions) -> list[dict]:
        """Validation accuracy of every router x temperature (all experts), of top-1 (tau 1) and of
        each other top-k of `opt.top_ks` (at the temperature best for all experts); the trials of
        each round decoded together (`outputs_all`)."""
        from ..errors import RunDirError

        model = self.load(rd)
        n_experts = len(model.adapters) - 1   # top-k keeps k of the C + 1 weights (base adapter included)
        signals, trials = {}, []

        def round_(settings: list[tuple]) -> None:
            methods, sigs, where = {}, {}, {}
            for router, tau, k in settings:
                method = Method(router=router, tau=tau, top_k=k)
                key = f"{name}-{router}-tau{tau:g}-top{k}"
                if self._cached("validation", key, rd, val, method) is None:
                    if router not in signals:
                        try:
                            signals[router] = model.router(router).signal(model.encode([r.messages for r in val]))
                        except (RunDirError, ConfigError) as e:
                            log.warning("router %s: %s; left out", router, e)
                            signals[router] = False
                    if signals[router] is False:
                        continue
                    sigs[key] = signals[router]
                methods[key] = (rd, method)
                where[key] = (router, tau, k)
            results = self.outputs_all("validation", methods, val, sigs)
            for key, (router, tau, k) in where.items():
                trials.append({"run": name, "router": router, "tau": tau, "top_k": k,
                               "validation": accuracy(val, results[key]["correct"])["mean"],
                               "num_clusters": n_experts})
                log.info("validation %s: %.3f", key, trials[-1]["validation"])

        # all experts at each temperature, and top-1; then each other top-k at the temperature that
        # served all experts best
        round_([(r, tau, 0) for r in opt.routers for tau in opt.tau_grid]
               + [(r, 1.0, 1) for r in opt.routers if 1 in opt.top_ks])
        sparse = []
        for router in opt.routers:
            full = [t for t in trials if t["router"] == router and t["top_k"] == 0]
            if full:
                tau = max(full, key=validation_rank)["tau"]
                sparse += [(router, tau, k) for k in opt.top_ks if 1 < k < len(model.adapters)]
        round_(sparse)
        return trials

    def routing_cost(self, rd: Run, records, routers, n_single: int = 8) -> dict:
        """Milliseconds per prompt of each router's signal + weights at the routing batch size and
        at batch 1, and of one decoded token at batch 1 (one adapter, EOS ignored)."""

        model = self.load(rd)
        enc = model.encode([r.messages for r in records])
        single = enc[:n_single]
        out = {}
        for router in routers:
            try:
                model.route(single[:1], router=router)            # warm up, and skip an unfitted router
            except Exception as e:  # noqa: BLE001
                log.warning("routing cost of %s: %s", router, e)
                continue
            t = time.perf_counter()
            model.route(enc, router=router)
            batched = (time.perf_counter() - t) / len(enc)
            t = time.perf_counter()
            for e in single:
                model.route([e], router=router)
            out[router] = {"ms_per_prompt_batched": 1000 * batched,
                           "ms_per_prompt_batch1": 1000 * (time.perf_counter() - t) / len(single)}
        token_ms = model.engine.decoded_token_ms([e.input_ids for e in single[:4]])
        for v in out.values():
            v["ratio_to_one_token"] = v["ms_per_prompt_batch1"] / token_ms
        return {"routers": out, "ms_per_decoded_token_batch1": token_ms}
