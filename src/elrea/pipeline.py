"""`fit`: the ELREA training pipeline, stage by stage, into a run directory.

    base adapter -> gradient features -> clusters -> experts -> router    (docs/method.md, 1-5)

Each stage reads its inputs from the run directory and writes its outputs there, so it can
be re-run alone. The manifest records each stage's fingerprint (a hash of the config sections
and the data it depends on, chained through the stages before it): a finished stage with an
unchanged fingerprint is skipped, a changed one re-runs with the stages after it, and
`from_stage` forces a stage and the ones after it.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from .card import write_model_card
from .clustering import CenteredFeatures, cluster_features, feature_mean, given_clusters, purity
from .config import RunConfig
from .data import PromptFormatter, encode_all, load_records, records_fingerprint
from .distributed import Processes, alone, processes
from .errors import ConfigError, DataError, RunDirError
from .features import Featurizer
from .models import absolute_if_local, backbone_fingerprint, describe_backbone, load_backbone, load_tokenizer, \
    peft_lora_config, portable_name, resolve_model_path
from .rundir import (FeatureStore, Manifest, Run, RunLock, atomic_path, invocation, load_features, make_dir,
                     write_json)
from .stages import STAGE_NAMES, STAGES
from .training import epoch_steps, train_adapter, trained_summary

log = logging.getLogger(__name__)


class _Context:
    """What the stages of one fit share: config, paths, records, tokenizer, fingerprints, this
    process's place in the job, and the one backbone of this process (with its adapters)."""

    def __init__(self, cfg: RunConfig, data: str, records: list, out: Path, procs: Processes,
                 labels: np.ndarray | None = None):
        self.cfg, self.data, self.records, self.out, self.procs = cfg, data, records, out, procs
        self.run = Run(out)
        self.labels = labels  # given clusters (fit(labels=...)), else None
        self.tok = load_tokenizer(cfg.model)
        self.fmt = PromptFormatter(self.tok, cfg.data.system_prompt, cfg.data.max_length, cfg.data.truncation)
        self.model = None   # the PeftModel of this process, once a stage has made it
        self.fresh: set[str] = set()  # stages that start over (not resume) in this call
        self.manifest: Manifest | None = None  # the run's manifest, once _run_stages has read it
        self._given = {} if labels is None else {"clusters": [f"labels:{labels_fingerprint(labels)}"]}
        self._data_fp = records_fingerprint(records)
        self.backbone_fp: str | None = None  # the backbone weights' fingerprint (see use_backbone)
        self.fp = fingerprints(cfg, self._data_fp, self._given)

    def use_backbone(self, manifest: Manifest) -> None:
        """Fold the backbone weights' fingerprint (elrea.models.backbone_fingerprint) into the
        base stage's, so that new weights under the same model name retrain the run. A run whose
        base stage was recorded before backbones were fingerprinted keeps its fingerprints (it
        resumes as it was; its backbone is not checked)."""
        base = manifest.stage("base")
        if base and "backbone" not in base:
            log.info("this run predates backbone fingerprints: the backbone's weights are not checked")
            return
        self.backbone_fp = backbone_fingerprint(self.cfg.model.name)
        extra = {**self._given, "base": [f"backbone:{self.backbone_fp}"]}
        self.fp = fingerprints(self.cfg, self._data_fp, extra)

    def backbone(self):
        """The frozen backbone on this process's device. Loaded once: every stage attaches its
        adapters to it (PEFT injects LoRA layers in place), so a process holds one copy."""
        if self.model is not None:
            raise RuntimeError("the backbone already carries adapters; use base_model()")
        return load_backbone(self.cfg.model, self.procs.device, training=True)

    def base_model(self):
        """The PeftModel with the trained base adapter "base" active, in eval mode."""
        from peft import PeftModel

        if self.model is None:
            self.model = PeftModel.from_pretrained(self.backbone(), str(self.run.base), adapter_name="base")
        self.model.set_adapter("base")
        return self.model.eval()

    def encode_train(self, idx=None) -> list:
        recs = self.records if idx is None else [self.records[i] for i in idx]
        enc = encode_all(self.fmt, recs, "train")
        _report_truncation(enc, "training examples")
        return enc


def fingerprints(cfg: RunConfig, data_fp: str, extra: dict | None = None) -> dict[str, str]:
    """{stage: fingerprint}: a hash of the stage's settings (elrea.stages.STAGES) chained through
    the fingerprint of the stage it comes after (the first stage: the data's), plus `extra`
    inputs per stage (the given cluster labels of fit(labels=...))."""
    fp: dict[str, str] = {}
    for st in STAGES:
        own = st.settings_hash(cfg)
        parts = [own, data_fp] if st.after is None else [fp[st.after], own]
        fp[st.name] = _hash(*parts, *(extra or {}).get(st.name, []))
    return fp


def _hash(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def labels_fingerprint(labels) -> str:
    """A hash of given cluster labels (fit(labels=...)): their partition, not their names."""
    _, codes = np.unique(np.asarray(labels), return_inverse=True)
    first: dict[int, int] = {}
    canonical = [first.setdefault(int(c), len(first)) for c in codes]   # ids in order of appearance
    return _hash(",".join(map(str, canonical)))


def router_settings(cfg: RunConfig) -> str:
    """What the router stage computes from: the routing.* fields each fitted router declares
    (RouterPlugin.fit_fields; not tau or top-k, which only weigh at inference), and its seed."""
    from .registry import ROUTERS

    fields = {name: {f: getattr(cfg.routing, f) for f in ROUTERS.get(name).fit_fields} for name in ROUTERS.names()}
    return _hash(json.dumps(fields, sort_keys=True), str(cfg.stage_seed("router")))


def _report_truncation(enc, what):
    n = sum(e.truncated for e in enc)
    if n:
        log.warning("%d of %d %s were longer than data.max_length and had their instruction "
                    "truncated from the left", n, len(enc), what)


# ----------------------------------------------------------------------------- stages

def stage_base(ctx: _Context) -> dict:
    from peft import get_peft_model
    from transformers import set_seed

    seed = ctx.cfg.stage_seed("base")
    set_seed(seed)
    ctx.model = get_peft_model(ctx.backbone(), peft_lora_config(ctx.cfg.lora), adapter_name="base")
    # the adapters' base_model_name_or_path: a hub id or absolute path, not the conversion cache
    ctx.model.peft_config["base"].base_model_name_or_path = portable_name(ctx.cfg.model.name)
    return train_adapter(ctx.model, ctx.encode_train(), ctx.cfg.base, ctx.run.base, ctx.tok.pad_token_id,
                         seed=seed, save_moments=True, desc="base adapter", precision=ctx.cfg.model.dtype,
                         fingerprint=ctx.fp["base"], logs_dir=ctx.run.logs("base"),
                         checkpoint_dir=ctx.run.checkpoints("base"), resume="base" not in ctx.fresh)


def stage_features(ctx: _Context) -> dict:
    """Every process computes its contiguous share of the batches into the one feature store:
    instruction-only gradients, or whole-example ones with clustering.signal = full."""
    cfg, procs = ctx.cfg.features, ctx.procs
    featurizer = Featurizer.for_run(ctx.base_model(), ctx.cfg, ctx.run.base, ctx.tok.pad_token_id,
                                    cfg.train_preconditioner)
    full = ctx.cfg.clustering.signal == "full"
    enc = encode_all(ctx.fmt, ctx.records, "train" if full else "instruction")
    if procs.is_main:
        _report_truncation(enc, "training examples" if full else "instructions")
    store = FeatureStore(ctx.run.features, len(enc), cfg.dim, ctx.fp["features"])
    if procs.is_main:
        if "features" in ctx.fresh:
            store.reset()
        store.prepare()
    procs.barrier("preparing the feature store")
    t0 = time.time()
    featurizer.extract(enc, store, procs, checkpoint_every=cfg.checkpoint_every)
    procs.barrier("computing gradient features")
    if not store.complete():
        raise RunDirError(f"{store.path}: rows {store.covered()} of {len(enc)} are complete after every "
                          "process finished; re-run `elrea fit --from features`")
    return {"examples": len(enc), "lora_params": featurizer.projector.num_params, "dim": cfg.dim,
            "signal": ctx.cfg.clustering.signal, "block_norm": cfg.block_norm,
            "processes": procs.world, "seconds": round(time.time() - t0, 2)}


def stage_clusters(ctx: _Context) -> dict:
    """BIRCH (or the given labels) on the training features, centred first with features.center;
    the centroids (in the same space) are what the gradient router compares prompts with."""
    from safetensors.numpy import save_file

    X = load_features(ctx.run.features)
    _check_finite_rows(X, ctx.run.features)
    tensors = {}
    if ctx.cfg.features.center:
        tensors["feature_mean"] = feature_mean(X)
        X = CenteredFeatures(X, tensors["feature_mean"])
    if ctx.labels is not None:
        clusters = given_clusters(X, ctx.labels)
    else:
        clusters = cluster_features(X, ctx.cfg.clustering, ctx.cfg.stage_seed("clustering"))
    _check_cluster_count(clusters.num_clusters, ctx.cfg.clustering, ctx.labels is not None)
    sources = [r.source for r in ctx.records]
    mix = source_mix(clusters.labels, sources, clusters.num_clusters)
    ctx.run.clusters.mkdir(parents=True, exist_ok=True)
    with atomic_path(ctx.run.centroids) as tmp:
        save_file({"centroids": clusters.centroids, **tensors}, str(tmp))
    summary = {"num_clusters": clusters.num_clusters, "sizes": clusters.sizes, "source_mix": mix,
               "info": clusters.info, "centered": bool(ctx.cfg.features.center),
               "given_labels": ctx.labels is not None, **purity(clusters.labels, sources)}
    write_json(ctx.run.clusters_json, {**summary, "fingerprint": ctx.fp["clusters"], "labels": clusters.labels.tolist()})
    log.info("clusters: C=%d, sizes %s", clusters.num_clusters, clusters.sizes)
    return summary


def _check_finite_rows(X, path: Path, chunk: int = 8192) -> None:
    """Refuse feature rows with NaN or inf (clustering them would fail, or place them anywhere)."""
    bad = []
    for s in range(0, len(X), chunk):
        bad += (s + np.flatnonzero(~np.isfinite(np.asarray(X[s:s + chunk])).all(1))).tolist()
    if bad:
        raise RunDirError(f"{path}: {len(bad)} feature rows hold NaN or inf (first: row {bad[0]}, training example "
                          f"{bad[0] + 1}); rebuild them with `elrea fit --from features`, and if they come back, the "
                          "base adapter's gradients are not finite: lower base.lr and run `elrea fit --from base`")


def _check_cluster_count(C: int, cfg, given: bool) -> None:
    """Refuse fewer than two clusters before experts and routers are built on them; warn when
    fewer came out than were asked for."""
    if C < 2:
        raise DataError(f"clustering found {C} cluster of the training examples: their gradient features do not "
                        "separate (identical or near-identical records?). ELREA needs at least two; use more "
                        "varied data" + (" or other labels" if given else ""))
    if cfg.num_clusters and C < cfg.num_clusters and not given:
        log.warning("clustering: %d clusters asked for (clustering.num_clusters), %d came out (clusters smaller "
                    "than clustering.min_cluster_size=%d are merged)", cfg.num_clusters, C, cfg.min_cluster_size)


def stage_experts(ctx: _Context) -> dict:
    """Expert c continues the base adapter on cluster c. With N processes, `experts.parallel`
    = data trains each expert on all of them in turn (DDP through Trainer); = experts trains
    expert c alone on process c mod N. Resuming (not forced by --from, same fingerprint), an
    expert whose folder holds a summary under this stage's fingerprint is finished and kept."""
    from transformers import set_seed

    procs, fp = ctx.procs, ctx.fp["experts"]
    labels = ctx.run.labels()
    C = int(labels.max())
    mode = ctx.cfg.experts.parallel if procs.world > 1 else "data"
    model = ctx.base_model()
    for c in range(1, C + 1):
        out_dir = ctx.run.expert(c)
        if mode == "experts" and c % procs.world != procs.rank:
            continue
        if "experts" not in ctx.fresh and trained_summary(out_dir, fp) is not None:
            log.info("expert %d/%d: already trained, kept", c, C)
            continue
        seed = ctx.cfg.stage_seed(f"expert-{c}")
        set_seed(seed)
        model.load_adapter(str(ctx.run.base), adapter_name="expert", is_trainable=True)
        model.set_adapter("expert")
        try:
            with alone() if mode == "experts" else contextlib.nullcontext():
                train_adapter(model, ctx.encode_train(np.flatnonzero(labels == c)), ctx.cfg.experts, out_dir,
                              ctx.tok.pad_token_id, seed=seed, desc=f"expert {c}/{C}",
                              precision=ctx.cfg.model.dtype, fingerprint=fp, logs_dir=ctx.run.logs(f"expert-{c}"),
                              checkpoint_dir=ctx.run.checkpoints(f"expert-{c}"), resume="experts" not in ctx.fresh,
                              meta={"processes": [procs.rank] if mode == "experts" else list(range(procs.world))})
        finally:
            model.set_adapter("base")
            model.delete_adapter("expert")
        if procs.is_main:
            ctx.manifest.mark("experts", "running", fp, finished=_finished_experts(ctx.run, C, fp))
    procs.barrier("training experts")
    finished = _finished_experts(ctx.run, C, fp)
    missing = [c for c in range(1, C + 1) if str(c) not in finished]
    if missing:
        raise RunDirError(f"{ctx.run.experts}: experts {missing} were not saved after every process "
                          "finished; re-run the same command to train them")
    return {"finished": finished, "num_experts": C, "parallel": mode, "processes": procs.world}


def stage_router(ctx: _Context) -> dict:
    """Fit every router that is fitted (elrea.routers: the learned router, the embedding router's
    cluster means) on the training instructions and the cluster labels; {router: its summary}."""
    from .registry import ROUTERS
    from .routers import RouterFit

    cfg = ctx.cfg.routing
    job = RouterFit(folder=ctx.run.router, model=ctx.base_model(), tokenizer=ctx.tok,
                    instructions=encode_all(ctx.fmt, ctx.records, "instruction"), labels=ctx.run.labels(), cfg=cfg,
                    seed=ctx.cfg.stage_seed("router"), selected=False)
    info = {}
    for name in ROUTERS.names():
        plugin = ROUTERS.get(name)
        if plugin.fit is not None:
            job.selected = name == cfg.router
            summary = plugin.fit(job)
            if summary is not None:
                info[name] = summary
    # the clusters the routers were fitted on: readers refuse them once the clusters change
    return {**info, "clusters": ctx.fp["clusters"]}


def _finished_experts(run: Run, C: int, fingerprint: str) -> dict:
    """{c: training summary} of the experts saved under this fingerprint."""
    found = {str(c): trained_summary(run.expert(c), fingerprint) for c in range(1, C + 1)}
    return {c: {k: v for k, v in s.items() if k not in ("fingerprint", "log_history")}
            for c, s in found.items() if s is not None}


def source_mix(labels: np.ndarray, sources: list, C: int) -> dict:
    """{cluster: {source: count}} when records carry sources, else {}."""
    if not any(s is not None for s in sources):
        return {}
    mix = {}
    for c in range(1, C + 1):
        counts: dict[str, int] = {}
        for lab, s in zip(labels, sources):
            if lab == c:
                counts[str(s)] = counts.get(str(s), 0) + 1
        mix[str(c)] = dict(sorted(counts.items()))
    return mix


def trained_tokens(run: str | Path | Run, data: str | Path, data_options: dict | None = None) -> dict:
    """{"base": n, "experts": {"1": n, ...}}: the non-padding tokens each adapter of the fitted
    run trained on, `data` being the training data it was fitted on.

    Trainer's count where the stage recorded one (`tokens` in the manifest and training.json).
    Adapters trained before elrea counted are computed from the data and the run's config: the
    encoded length of each of its examples times the epochs it ran (its optimizer steps over the
    steps of one epoch on one process), which is Trainer's count for whole epochs on one process.
    """
    run = Run(run)
    stages = Manifest.load(run.root).data.get("stages", {})
    base = stages.get("base", {})
    if base.get("status") != "done":
        raise RunDirError(f"{run.manifest}: the base adapter is not trained; run `elrea fit` first")
    experts = stages.get("experts", {}).get("finished", {})

    @functools.cache
    def encoded() -> tuple[RunConfig, np.ndarray, np.ndarray | None]:   # only for adapters without a count
        cfg = run.config()
        records = load_records(data, **(data_options or {}))
        if len(records) != base.get("examples", len(records)):
            raise DataError(f"{len(records)} records, but the run at {run.root} was fitted on {base['examples']}: "
                            "give the training data it was fitted on", path=str(data))
        fmt = PromptFormatter(load_tokenizer(cfg.model), cfg.data.system_prompt, cfg.data.max_length,
                              cfg.data.truncation)
        lengths = np.array([len(e.input_ids) for e in encode_all(fmt, records, "train")], dtype=np.int64)
        return cfg, lengths, run.labels() if experts else None

    def count(summary: dict, stage: str, cluster: int | None = None) -> int:
        if "tokens" in summary:
            return int(summary["tokens"])
        cfg, lengths, labels = encoded()
        mine = lengths if cluster is None else lengths[labels == cluster]
        return round(int(mine.sum()) * summary["steps"] / epoch_steps(len(mine), getattr(cfg, stage)))

    return {"base": count(base, "base"), "experts": {c: count(e, "experts", int(c)) for c, e in experts.items()}}


# ----------------------------------------------------------------------------- fit

def fit(data: str | Path, out: str | Path, cfg: RunConfig, from_stage: str | None = None,
        until: str | None = None, data_options: dict | None = None, labels=None) -> Path:
    """Run every stage not already done with the same inputs (up to and including `until`);
    return the run directory.

    labels: given clusters, one id per record (any ids: source names, integers), used instead of
    clustering the features (fingerprinted by their partition): baselines such as random or
    by-source experts are plain fits. Centroids are still the clusters' mean features.

    data: a file, a `datasets` directory, or a hub data set id (`data_options`: config, split,
    revision). Under `accelerate launch` / `torchrun` every process runs this: base adapter and
    `data` experts train data-parallel through Trainer, every process computes its share of
    the features, clustering runs on the main process, and only the main process writes the
    manifest and the shared files.
    """
    import dataclasses

    for flag, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in STAGE_NAMES:
            raise ConfigError(f"{flag}: unknown stage {value!r}; valid: {', '.join(STAGE_NAMES)}")
    # a relative model directory would not load from anywhere else: record it absolute
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, name=absolute_if_local(cfg.model.name)))
    records = load_records(data, **(data_options or {}))  # bad data fails before anything is created
    need = max(2, cfg.clustering.num_clusters) * cfg.clustering.min_cluster_size
    if len(records) < need:
        raise DataError(f"{len(records)} records cannot form {max(2, cfg.clustering.num_clusters)} "
                        f"clusters of at least clustering.min_cluster_size={cfg.clustering.min_cluster_size};"
                        " use more data or lower those settings", path=str(data))
    if labels is not None and len(labels) != len(records):
        raise ConfigError(f"labels: {len(labels)} given for {len(records)} records of {data}")
    procs = processes(cfg.model.device)
    out = Path(out)
    if procs.is_main:
        make_dir(out, "run directory")
    # one writer per run directory: a second `fit` into it refuses at once, naming this one
    with RunLock(out) if procs.is_main else contextlib.nullcontext():
        if procs.is_main:
            resolve_model_path(cfg.model.name)  # converts the built-in model once, before others read it
        procs.barrier("preparing the run directory")
        ctx = _Context(cfg, str(data), records, out, procs, None if labels is None else np.asarray(labels))
        _run_stages(ctx, from_stage, until)
    return out


def _run_stages(ctx: _Context, from_stage: str | None, until: str | None) -> None:
    procs, out = ctx.procs, ctx.out
    manifest = Manifest.load(out, create=True)
    manifest.writable = procs.is_main
    procs.barrier("reading the manifest")
    if procs.is_main:
        _write_header(manifest, ctx)
    ctx.manifest = manifest
    ctx.use_backbone(manifest)
    forced = STAGE_NAMES.index(from_stage) if from_stage else len(STAGES)
    for i, st in enumerate(STAGES):
        name, fp = st.name, ctx.fp[st.name]
        if i < forced and manifest.is_done(name, fp):
            bad = ctx.run.damaged(manifest.stage(name).get("files")) if st.hashed else []
            if not bad:
                log.info("stage %s: up to date, skipped", name)
                if name == until:
                    break
                continue
            _remove_damaged(ctx, name, bad)
            forced = min(forced, i + 1)  # what follows was built on the damaged files: rebuild it too
        old = manifest.stage(name)
        if old.get("status") == "done" and i < forced and procs.is_main:
            log.warning("stage %s: its config, data or backbone changed since the last run; re-running it "
                        "and the stages after it", name)
        t0 = time.time()
        if old.get("fingerprint") != fp or i >= forced:  # start over, not resume
            ctx.fresh.add(name)
        mine = {"backbone": ctx.backbone_fp} if name == "base" and ctx.backbone_fp else {}
        manifest.mark(name, "running", fp, **mine)  # readers refuse the run until it is done again
        info = st.function()(ctx) if procs.is_main or not st.main_only else {}
        procs.barrier(f"stage {name}")
        files = {"files": ctx.run.file_hashes(name)} if st.hashed and procs.is_main else {}
        manifest.mark(name, "done", fp, **{**info, **mine, **files, "seconds": round(time.time() - t0, 2)})
        if name == until:
            break
    if procs.is_main and all(manifest.stage(s).get("status") == "done" for s in STAGE_NAMES):
        write_model_card(out)


def _remove_damaged(ctx: _Context, stage: str, bad: list[str]) -> None:
    """A finished stage whose files are missing or changed (damage, a partial copy): remove the
    folders holding them (an expert's folder, or the stage's), so that re-running the stage
    rebuilds them and keeps what is intact (other experts)."""
    if ctx.procs.is_main:
        log.warning("stage %s: %s missing or changed since it finished; rebuilding %s and the stages after it",
                    stage, ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else ""), stage)
        top = ctx.run.stage_dir(stage)
        for rel in bad:
            folder = (ctx.run.root / rel).parent
            shutil.rmtree(folder if folder != top.parent else top, ignore_errors=True)
    ctx.procs.barrier(f"removing the damaged files of stage {stage}")


def _write_header(manifest: Manifest, ctx: _Context) -> None:
    import peft
    import sklearn
    import transformers

    manifest.data.update({
        "format": 1,
        "backbone": ctx.cfg.model.name,
        "backbone_weights": describe_backbone(ctx.cfg.model.name),  # exactly which weights (the card, `elrea info`)
        "data": str(ctx.data),
        "num_examples": len(ctx.records),
        "command": invocation(),  # what resumes the run if it is interrupted (`elrea info` says it)
        "config": ctx.cfg.to_dict(),
        "versions": {"elrea": _version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "scikit-learn": sklearn.__version__, "python": platform.python_version()},
    })
    manifest.save()
    ctx.run.write_config(ctx.cfg.to_dict())


def _version() -> str:
    from . import __version__

    return __version__

