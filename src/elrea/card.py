"""The model card, README.md in every run directory, and what leaves the machine with it.

What a person landing on the folder (or its hub page) needs: the backbone, the data, the
clusters and what they contain, the routing settings, the evaluation table when `elrea eval`
has run (with the test count per source), and how to load, query and serve it. The YAML header
is the hub's model-card metadata (library, license, base model when it has a hub id, tags).

What leaves the machine: the copy of a run that `elrea push` uploads and `save_pretrained` writes.

    stage_copy(run, out)   Run.shipped's files copied into out/, the model card built from the
                           run, local paths rewritten (portable=True), and the manifest's SHA-256
                           records made to describe the copy, so that it loads and verifies
    push(run, repo_id)     stage_copy into a temporary folder, then upload that folder (dry_run:
                           list it); the run directory itself is only read

The copy holds what inference and the card need (Run.SHIPPED): eval.json, which holds every test
prompt, reference and output, only when asked; the base optimizer's moments only when routing
reads them; never PEFT's template READMEs. A portable copy names no path of this machine: the
backbone becomes its hub id when it has one (`base_model`, else models.hub_id; the built-in
model keeps its alias in the run config, which loads the same dequantised weights, while the
adapters' base_model_name_or_path is its hub id), else the directory's name; the training data
its file name; any other absolute path its last part. A copy in which a local path remains is
refused, naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from .errors import RunDirError
from .rundir import RUN_CONFIG, Manifest, Run, atomic_path, read_json, sha256_file, write_json


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


# ----------------------------------------------------------------------------- what leaves the machine

log = logging.getLogger(__name__)


def stage_copy(run_dir: str | Path, out: str | Path, repo_id: str | None = None, base_model: str | None = None,
               license: str | None = None, include_eval: bool = False, portable: bool = True,
               where: str | None = None) -> list[str]:
    """Write the shipped copy of run `run_dir` into the new, empty folder `out`; returns its files
    (relative, sorted). repo_id, license, where: the card's (card.model_card); base_model: the
    backbone's hub id when the run names a local directory that has one; portable: rewrite
    local paths (push), or keep them so that the copy loads on this machine (save_pretrained)."""
    from .models import hub_id

    run, out = Run(run_dir), Path(out)
    stages = Manifest.load(run.root).data.get("stages", {})
    # a damaged file must not leave under a freshly computed hash
    run.verify(stages, [s for s, st in stages.items() if st.get("files")])
    files = set(run.copy_shipped(out, include_eval)) | {"README.md"}
    name = run.config().model.name
    backbone, adapters_base = portable_backbone(name, base_model) if portable else (name, None)
    write_model_card(run.root, repo_id, out=out / "README.md", license=license, where=where,
                     base_model=base_model or hub_id(name))
    copy = Run(out)
    if portable:
        _rewrite_paths(copy, backbone, adapters_base)
    _record_copy(copy, stages, files)
    if portable:
        check_no_local_paths(out, _local_markers(run, name))
    return sorted(files)


def push(run_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None,
         dry_run: bool = False, include_eval: bool = False, base_model: str | None = None,
         license: str | None = None) -> list[str]:
    """Upload the portable copy of a run (stage_copy) to the Hugging Face Hub repository `repo_id`;
    returns its files. dry_run: build the copy and list it, upload nothing. Files of an earlier push
    that this copy lacks (an eval.json, the optimizer's moments) are deleted from the repository."""
    with tempfile.TemporaryDirectory(prefix="elrea-push-") as tmp:
        staged = Path(tmp) / "run"
        files = stage_copy(run_dir, staged, repo_id=repo_id, base_model=base_model, license=license,
                           include_eval=include_eval)
        if dry_run:
            return files
        from huggingface_hub import HfApi

        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, folder_path=str(staged), delete_patterns=list(Run.SHIPPED),
                          commit_message="Upload ELREA run (elrea push)")
    return files


def portable_backbone(name: str, base_model: str | None = None) -> tuple[str, str]:
    """(the backbone the copy's config names, the base model its adapters name) for backbone `name`."""
    from .models import ALIASES, hub_id

    if base_model:
        return base_model, base_model
    hub = hub_id(name)
    if name.lower() in ALIASES:
        return name, hub
    if hub:
        return hub, hub
    folder = Path(name).expanduser().resolve().name
    log.warning("the backbone %s is a local directory with no known hub id: the pushed run names it %r; "
                "give its hub id with `elrea push --base-model ORG/NAME`, or load the run with "
                "ELREA.from_pretrained(..., backbone=model)", name, folder)
    return folder, folder


def _rewrite_paths(copy: Run, backbone: str, adapters_base: str) -> None:
    """The copy's manifest, run config and adapter configs, naming `backbone` and no local path."""
    manifest = json.loads(copy.manifest.read_text(encoding="utf-8"))
    config = json.loads((copy / RUN_CONFIG).read_text(encoding="utf-8"))
    for cfg in (config, manifest.get("config")):
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            cfg["model"]["name"] = backbone
    manifest["backbone"] = backbone
    manifest.pop("command", None)   # the command line that made the run names this machine's paths
    if "data" in manifest:
        manifest["data"] = local_name(str(manifest["data"]))
    write_json(copy / RUN_CONFIG, _names_only(config))
    write_json(copy.manifest, _names_only(manifest))
    for path in [copy.base / "adapter_config.json", *copy.experts.glob("*/adapter_config.json")]:
        if path.is_file():
            adapter = json.loads(path.read_text(encoding="utf-8"))
            adapter["base_model_name_or_path"] = adapters_base
            write_json(path, _names_only(adapter))


def _names_only(obj):
    """`obj` (JSON data) with every absolute path (or ~ path) replaced by its last part."""
    if isinstance(obj, dict):
        return {k: _names_only(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_names_only(v) for v in obj]
    if isinstance(obj, str) and (os.path.isabs(obj) or obj.startswith("~")):
        return Path(obj).name
    return obj


def _record_copy(copy: Run, stages: dict, files: set[str]) -> None:
    """Make the copy's manifest describe the copy: each stage's SHA-256 records keep the files it
    holds (with their hashes now: rewritten adapter configs change) and drop the ones left out,
    which `left_out` lists."""
    manifest = json.loads(copy.manifest.read_text(encoding="utf-8"))
    left_out = []
    for stage, st in manifest.get("stages", {}).items():
        recorded = (stages.get(stage) or {}).get("files")
        if not recorded:
            continue
        left_out += [rel for rel in recorded if rel not in files]
        st["files"] = {rel: sha256_file(copy / rel) for rel in recorded if rel in files}
    manifest["left_out"] = sorted(left_out)   # recorded at fit, not shipped (Run.SHIPPED says why)
    write_json(copy.manifest, manifest)


def _local_markers(run: Run, backbone: str) -> set[str]:
    """Strings that would give away where things are on this machine."""
    from .models import cache_dir

    # the cache holds the built-in model's converted copy: its path, not a conversion, is wanted here
    markers = {str(run.root.resolve()), str(cache_dir().expanduser().resolve())}
    home = str(Path.home())
    if len(home) > 1:
        markers.add(home.rstrip("/") + "/")
    if Path(backbone).expanduser().is_dir():
        markers.add(str(Path(backbone).expanduser().resolve()))
    return markers


def check_no_local_paths(folder: str | Path, markers: set[str]) -> None:
    """Refuse (RunDirError naming the file) a copy whose text files (JSON, Markdown) contain any of
    `markers`: a local path about to leave the machine."""
    folder = Path(folder)
    for f in sorted(folder.rglob("*")):
        if f.is_file() and f.suffix in (".json", ".md", ".txt"):
            text = f.read_text(encoding="utf-8", errors="replace")
            found = next((m for m in sorted(markers) if m and m in text), None)
            if found:
                raise RunDirError(f"{f.relative_to(folder)}: would upload the local path {found!r}; "
                                  "nothing was uploaded (a bug in elrea: please report it)")

