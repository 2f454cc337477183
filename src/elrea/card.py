"""The model card: README.md in every run directory (and in the copies elrea.publish writes).

What a person landing on the folder (or its hub page) needs: the backbone, the data, the
clusters and what they contain, the routing settings, the evaluation table when `elrea eval`
has run (with the test count per source), and how to load, query and serve it. The YAML header
is the hub's model-card metadata (library, license, base model when it has a hub id, tags).
"""

from __future__ import annotations

from pathlib import Path

from .rundir import Run, atomic_path, read_json


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def cluster_rows(clusters: dict) -> tuple[list[str], list[list]]:
    """(sources, rows [adapter, size, count per source]) of clusters/clusters.json, for tables."""
    mix = clusters.get("source_mix") or {}
    sources = sorted({s for c in mix.values() for s in c})
    rows = [[f"expert_{c}", size] + [mix.get(str(c), {}).get(s, 0) for s in sources]
            for c, size in enumerate(clusters["sizes"], start=1)]
    return sources, rows


def local_name(path: str) -> str:
    """A path of this machine as the file's name alone (the card and pushed copies never name local
    paths); anything else (a hub data set id) as it is."""
    p = Path(path).expanduser()
    return p.name if p.is_absolute() or p.exists() or str(path).startswith((".", "~")) else str(path)


def test_counts(evaluation: dict) -> dict[str, int]:
    """{source: number of test examples} of an evaluation result (eval.json)."""
    counts: dict[str, int] = {}
    for row in evaluation.get("examples", []):
        counts[str(row.get("source"))] = counts.get(str(row.get("source")), 0) + 1
    return counts


def model_card(run_dir: str | Path, repo_id: str | None = None, base_model: str | None = None,
               license: str | None = None, where: str | None = None) -> str:
    """The card's Markdown. repo_id: the title and the name the load lines use (default: the folder's
    name, and `where`, default the run directory); base_model: the backbone's hub id for the
    metadata (default: models.hub_id of the run's backbone; none for a local directory); license:
    default the backbone's when elrea knows it, else "other" with a note."""
    from .models import ALIASES, backbone_license, describe_backbone, hub_id

    run = Run(run_dir)
    manifest = read_json(run.manifest)
    cfg = run.config_dict()
    name = cfg["model"]["name"]
    base_model = base_model or hub_id(name)
    license = license or backbone_license(name)
    weights = manifest.get("backbone_weights") or describe_backbone(name)
    title = repo_id or run.root.resolve().name
    stages = manifest.get("stages", {})
    out = ["---", "library_name: peft", f"license: {license or 'other'}"]
    out += [f"base_model: {base_model}"] if base_model else []
    out += ["tags:", "- elrea", "- lora", "- peft", "- mixture-of-experts", "---", "", f"# {title}", "",
            "An [ELREA](https://arxiv.org/abs/2502.00089) ensemble of LoRA experts, fitted with "
            f"[elrea](https://pypi.org/project/elrea/) {manifest.get('versions', {}).get('elrea', '')}: "
            "a base adapter trained on all the data, one expert adapter per cluster of training examples grouped by "
            "gradient direction, and a router that mixes the experts' next-token logits by each input's own "
            "gradient.", "", f"Backbone the adapters were trained and evaluated on: {weights}."]
    if base_model and name.lower() in ALIASES:  # trained on dequantised weights, named after the originals
        out += ["", f"The adapters' `base_model_name_or_path` is `{base_model}`, so that PEFT loads them on it; their "
                "outputs there differ from the ones this card reports (`benchmarks/transfer.py` in elrea's "
                "repository measures by how much)."]
    if not license:
        out += ["", "License: `other`: elrea does not know the backbone's license; the adapters inherit its terms "
                "(`elrea push --license ID` names it)."]
    out += ["", "## Training data", "", f"{manifest.get('num_examples', '?')} examples from "
            f"`{local_name(str(manifest.get('data', '?')))}`; LoRA rank {cfg['lora']['rank']}, alpha "
            f"{cfg['lora']['alpha']} on `{cfg['lora']['target_modules']}`; base adapter lr {cfg['base']['lr']} for "
            f"{cfg['base']['epochs']} epochs, experts lr {cfg['experts']['lr']} for {cfg['experts']['epochs']} "
            f"epochs; backbone dtype {cfg['model']['dtype']}"
            + (f", quantization {cfg['model']['quantization']}" if cfg["model"].get("quantization", "none") != "none"
               else "") + ".", ""]
    if run.clusters_json.exists():
        cl = read_json(run.clusters_json)
        sources, rows = cluster_rows(cl)
        out += ["## Experts", "", f"{cl['num_clusters']} clusters of the training examples' gradient features; "
                "expert_c is the adapter in `experts/c/`, trained on cluster c (examples per cluster, by source "
                "where the data names one):", "", _table(["adapter", "examples"] + sources, rows), ""]
    r = cfg["routing"]
    out += ["## Routing", "", f"Each input's instruction-only gradient feature is compared with the cluster "
            f"centroids (cosine), standardised and turned into weights by a softmax at temperature "
            f"tau = {r['tau']}" + (f", keeping the top {r['top_k']}" if r.get("top_k") else "") +
            "; column 0 of the weights is the base adapter.", ""]
    if run.eval.exists():
        out += _evaluation(read_json(run.eval))
    if stages:
        out += ["## Stages", "", _table(["stage", "status", "seconds"],
                                        [[k, v.get("status"), v.get("seconds", "")] for k, v in stages.items()]), ""]
    where = where or repo_id or str(run.root)
    out += ["## Use", "", "```python", "from elrea import ELREA", "",
            f"model = ELREA.from_pretrained({where!r})   # a local directory or a hub id",
            'model.generate(["Compute 12 * 7. Answer with the number only."], max_new_tokens=32)',
            'model.route(["Compute 12 * 7."])                            # weights over [base, experts]', "```", "",
            "```bash", f"pip install elrea && elrea serve {where}     # OpenAI-compatible server on :8000",
            f"elrea lm-eval --model_args run={where} --tasks mmlu    # lm-evaluation-harness", "```", "",
            "Each adapter folder (`base/`, `experts/<c>/`) is an ordinary PEFT adapter of the base model.", ""]
    return "\n".join(out)


def _evaluation(evaluation: dict) -> list[str]:
    """The card's evaluation section: accuracy per method and source, each source with its test count."""
    acc, n = evaluation["accuracy"], test_counts(evaluation)
    srcs = list(acc["elrea"]["per_source"])
    header = ["method"] + [f"{s} (n={n.get(s, '?')})" for s in srcs] + [f"overall (n={sum(n.values())})"]
    rows = [[m] + [f"{100 * acc[m]['per_source'][s]:.1f}" for s in srcs] + [f"{100 * acc[m]['overall']:.1f}"]
            for m in acc]
    return ["## Evaluation", "", "Exact-match accuracy (%) of `elrea eval` on held-out test examples (n per "
            "source), the ensemble against its base adapter alone:", "", _table(header, rows), ""]


def write_model_card(run_dir: str | Path, repo_id: str | None = None, out: str | Path | None = None, **card) -> Path:
    """Write the card of run `run_dir` to `out` (default the run's README.md); `card`: model_card's options."""
    path = Path(out) if out is not None else Run(run_dir).card
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(run_dir, repo_id, **card), encoding="utf-8")
    return path
