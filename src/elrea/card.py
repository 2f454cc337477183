"""The model card: README.md in every run directory (and `save_pretrained` / `elrea push` output).

What a person landing on the folder (or its hub page) needs: the backbone, the data, the
clusters and what they contain, the routing settings, the evaluation table when `elrea eval`
has run, and how to load, query and serve it. The YAML header is the hub's model-card
metadata (library, base model, tags).
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


def model_card(run_dir: str | Path, repo_id: str | None = None) -> str:
    from .models import portable_name

    run = Run(run_dir)
    manifest = read_json(run.manifest)
    cfg = run.config_dict()
    base_model = portable_name(cfg["model"]["name"])
    name = repo_id or run.root.resolve().name
    stages = manifest.get("stages", {})
    out = ["---", "library_name: peft", f"base_model: {base_model}", "tags:", "- elrea", "- lora", "- peft",
           "- mixture-of-experts", "---", "", f"# {name}", "",
           f"An [ELREA](https://arxiv.org/abs/2502.00089) ensemble of LoRA experts on `{base_model}`, fitted with "
           f"[elrea](https://pypi.org/project/elrea/) {manifest.get('versions', {}).get('elrea', '')}: a base "
           "adapter trained on all the data, one expert adapter per cluster of training examples grouped by "
           "gradient direction, and a router that mixes the experts' next-token logits by each input's own "
           "gradient.", ""]
    out += ["## Training data", "", f"{manifest.get('num_examples', '?')} examples from `{manifest.get('data', '?')}`; "
            f"LoRA rank {cfg['lora']['rank']}, alpha {cfg['lora']['alpha']} on `{cfg['lora']['target_modules']}`; "
            f"base adapter lr {cfg['base']['lr']} for {cfg['base']['epochs']} epochs, experts lr "
            f"{cfg['experts']['lr']} for {cfg['experts']['epochs']} epochs; backbone dtype {cfg['model']['dtype']}"
            + (f", quantization {cfg['model']['quantization']}" if cfg["model"].get("quantization", "none") != "none"
               else "") + ".", ""]
    if run.clusters_json.exists():
        cl = read_json(run.clusters_json)
        sources, rows = cluster_rows(cl)
        out += ["## Experts", "", f"{cl['num_clusters']} clusters of the training examples' gradient features "
                "(examples per cluster, by source where the data names one):", "",
                _table(["adapter", "examples"] + sources, rows), ""]
    r = cfg["routing"]
    out += ["## Routing", "", f"Each input's instruction-only gradient feature is compared with the cluster "
            f"centroids (cosine), standardised and turned into weights by a softmax at temperature "
            f"tau = {r['tau']}" + (f", keeping the top {r['top_k']}" if r.get("top_k") else "") +
            "; column 0 of the weights is the base adapter.", ""]
    if run.eval.exists():
        acc = read_json(run.eval)["accuracy"]
        srcs = list(acc["elrea"]["per_source"])
        rows = [[m] + [f"{100 * acc[m]['per_source'][s]:.1f}" for s in srcs] + [f"{100 * acc[m]['overall']:.1f}"]
                for m in acc]
        out += ["## Evaluation", "", "Exact-match accuracy (%) of `elrea eval`, the ensemble against its base "
                "adapter alone:", "", _table(["method"] + srcs + ["overall"], rows), ""]
    if stages:
        out += ["## Stages", "", _table(["stage", "status", "seconds"],
                                        [[k, v.get("status"), v.get("seconds", "")] for k, v in stages.items()]), ""]
    where = repo_id or str(run.root)
    out += ["## Use", "", "```python", "from elrea import ELREA", "",
            f"model = ELREA.from_pretrained({where!r})   # a local directory or a hub id",
            'model.generate(["Compute 12 * 7. Answer with the number only."], max_new_tokens=32)',
            'model.route(["Compute 12 * 7."])                            # weights over [base, experts]', "```", "",
            "```bash", f"pip install elrea && elrea serve {where}     # OpenAI-compatible server on :8000",
            f"elrea lm-eval --model_args run={where} --tasks mmlu    # lm-evaluation-harness", "```", "",
            "Each adapter folder (`base/`, `experts/<c>/`) is an ordinary PEFT adapter of the base model.", ""]
    return "\n".join(out)


def write_model_card(run_dir: str | Path, repo_id: str | None = None) -> Path:
    path = Run(run_dir).card
    with atomic_path(path) as tmp:
        tmp.write_text(model_card(run_dir, repo_id), encoding="utf-8")
    return path


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         dry_run: bool = False) -> list[str]:
    """Upload a run to the Hugging Face Hub (model card first); returns the files uploaded.

    dry_run lists them without the network. Needs `huggingface_hub` (installed with transformers)."""
    import shutil

    run = Run(run_dir)
    if run.config_path != run.new_config_path:  # a run from before run_config.json: upload it under the new name
        shutil.copy2(run.config_path, run.new_config_path)
    write_model_card(run.root, repo_id)
    files = run.shipped()  # Run.SHIPPED: what save_pretrained copies and loading a hub id downloads
    if dry_run:
        return files
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(run.root), allow_patterns=files,
                      commit_message="Upload ELREA run (elrea push)")
    return files
