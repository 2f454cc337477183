"""`fit`: the ELREA training pipeline, stage by stage, into a run directory.

    base adapter -> gradient features -> clusters -> experts        (docs/method.md, 1-4)

Each stage reads its inputs from the run directory and writes its outputs there, so it can
be re-run alone. The manifest records each stage's fingerprint (a hash of the config sections
and the data it depends on, chained through the stages before it): a finished stage with an
unchanged fingerprint is skipped, a changed one re-runs with the stages after it, and
`from_stage` forces a stage and the ones after it.
"""

from __future__ import annotations

import copy
import logging
import platform
import time
from pathlib import Path

import numpy as np
import torch

from .clustering import cluster_features
from .config import RunConfig
from .data import PromptFormatter, load_records
from .errors import ConfigError, DataError
from .features import AdamPreconditioner, extract_features, lora_param_names, num_lora_params, \
    sgd_preconditioner
from .models import load_backbone, load_tokenizer, peft_lora_config
from .projection import make_projector
from .rundir import STAGES, FeatureStore, Manifest, atomic_path, file_fingerprint, load_features, \
    read_json, write_json
from .training import load_moments, train_adapter

log = logging.getLogger(__name__)


class _Context:
    """What the stages share for one fit: config, paths, records, tokenizer, fingerprints."""

    def __init__(self, cfg: RunConfig, data: str, out: Path):
        self.cfg, self.data, self.out = cfg, data, out
        self.records = load_records(data)
        self.tok = load_tokenizer(cfg.model)
        self.fmt = PromptFormatter(self.tok, cfg.data.system_prompt, cfg.data.max_length, cfg.data.truncation)
        self.backbone = None
        data_fp = file_fingerprint(data)
        fp = {}
        fp["base"] = _hash(cfg.section_hash("seed", "model", "data", "lora", "base"), data_fp)
        fp["features"] = _hash(fp["base"], cfg.section_hash("features"))
        fp["clusters"] = _hash(fp["features"], cfg.section_hash("clustering"))
        fp["experts"] = _hash(fp["clusters"], cfg.section_hash("experts"))
        self.fp = fp

    def fresh_backbone(self):
        """A clean copy of the frozen backbone (PEFT injects LoRA layers in place)."""
        if self.backbone is None:
            self.backbone = load_backbone(self.cfg.model)
        return copy.deepcopy(self.backbone)

    def encode_train(self, idx=None) -> list:
        recs = self.records if idx is None else [self.records[i] for i in idx]
        enc = [self.fmt.encode_train(r) for r in recs]
        _report_truncation(enc, "training examples")
        return enc


def _hash(*parts: str) -> str:
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


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
    model = get_peft_model(ctx.fresh_backbone(), peft_lora_config(ctx.cfg.lora))
    return train_adapter(model, ctx.encode_train(), ctx.cfg.base, ctx.out / "base", ctx.tok.pad_token_id,
                         seed=seed, save_moments=True, desc="base adapter")


def stage_features(ctx: _Context) -> dict:
    from peft import PeftModel

    cfg = ctx.cfg.features
    model = PeftModel.from_pretrained(ctx.fresh_backbone(), str(ctx.out / "base"), is_trainable=True)
    model.eval()  # dropout off: features are deterministic
    precondition = sgd_preconditioner
    if cfg.train_preconditioner == "adam":
        precondition = AdamPreconditioner(load_moments(ctx.out / "base", lora_param_names(model)),
                                          betas=(0.9, 0.999), eps=1e-8)
    p = num_lora_params(model)
    projector = make_projector(cfg.projection, p, cfg.dim, ctx.cfg.stage_seed("projection"), cfg.sjlt_nnz)
    enc = [ctx.fmt.encode_instruction(r.messages, r.where) for r in ctx.records]
    _report_truncation(enc, "instructions")
    store = FeatureStore(ctx.out / "features" / "train.npy", len(enc), cfg.dim, ctx.fp["features"])
    t0 = time.time()
    extract_features(model, enc, projector, store, ctx.tok.pad_token_id, cfg.batch_size, precondition,
                     checkpoint_every=cfg.checkpoint_every)
    return {"examples": len(enc), "lora_params": p, "dim": cfg.dim, "seconds": round(time.time() - t0, 2)}


def stage_clusters(ctx: _Context) -> dict:
    from safetensors.numpy import save_file

    X = load_features(ctx.out / "features" / "train.npy")
    clusters = cluster_features(X, ctx.cfg.clustering, ctx.cfg.stage_seed("clustering"))
    sources = [r.source for r in ctx.records]
    mix = source_mix(clusters.labels, sources, clusters.num_clusters)
    d = ctx.out / "clusters"
    d.mkdir(parents=True, exist_ok=True)
    with atomic_path(d / "centroids.safetensors") as tmp:
        save_file({"centroids": clusters.centroids}, str(tmp))
    summary = {"num_clusters": clusters.num_clusters, "sizes": clusters.sizes, "source_mix": mix,
               "info": clusters.info}
    write_json(d / "clusters.json", {**summary, "labels": clusters.labels.tolist()})
    log.info("clusters: C=%d, sizes %s", clusters.num_clusters, clusters.sizes)
    return summary


def stage_experts(ctx: _Context, manifest: Manifest) -> dict:
    from peft import PeftModel
    from transformers import set_seed

    labels = np.array(read_json(ctx.out / "clusters" / "clusters.json")["labels"])
    C = int(labels.max())
    st = manifest.stage("experts")
    finished = st.get("finished", {}) if st.get("fingerprint") == ctx.fp["experts"] else {}
    for c in range(1, C + 1):
        out_dir = ctx.out / "experts" / str(c)
        if str(c) in finished and (out_dir / "adapter_model.safetensors").exists():
            log.info("expert %d/%d: already trained, kept", c, C)
            continue
        idx = np.flatnonzero(labels == c)
        seed = ctx.cfg.stage_seed(f"expert-{c}")
        set_seed(seed)
        model = PeftModel.from_pretrained(ctx.fresh_backbone(), str(ctx.out / "base"), is_trainable=True)
        finished[str(c)] = train_adapter(model, ctx.encode_train(idx), ctx.cfg.experts, out_dir,
                                         ctx.tok.pad_token_id, seed=seed, desc=f"expert {c}/{C}")
        manifest.mark("experts", "running", ctx.fp["experts"], finished=finished)
    return {"finished": finished, "num_experts": C}


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


# ----------------------------------------------------------------------------- fit

def fit(data: str | Path, out: str | Path, cfg: RunConfig, from_stage: str | None = None,
        until: str | None = None) -> Path:
    """Run every stage not already done with the same inputs (up to and including `until`);
    return the run directory."""
    for flag, value in (("--from", from_stage), ("--until", until)):
        if value is not None and value not in STAGES:
            raise ConfigError(f"{flag}: unknown stage {value!r}; valid: {', '.join(STAGES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ctx = _Context(cfg, str(data), out)
    need = max(2, cfg.clustering.num_clusters) * cfg.clustering.min_cluster_size
    if len(ctx.records) < need:
        raise DataError(f"{len(ctx.records)} records cannot form {max(2, cfg.clustering.num_clusters)} "
                        f"clusters of at least clustering.min_cluster_size={cfg.clustering.min_cluster_size};"
                        " use more data or lower those settings", path=str(data))
    # Under `accelerate launch`, every process trains (Trainer is data-parallel); features and
    # clustering run on the main process only, and only the main process writes files.
    from accelerate import PartialState

    state = PartialState()
    manifest = Manifest.load(out, create=True)
    manifest.writable = state.is_main_process
    if state.is_main_process:
        _write_header(manifest, ctx)
    forced = STAGES.index(from_stage) if from_stage else len(STAGES)
    runners = {"base": stage_base, "features": stage_features, "clusters": stage_clusters,
               "experts": lambda c: stage_experts(c, manifest)}
    for i, name in enumerate(STAGES):
        fp = ctx.fp[name]
        if i < forced and manifest.is_done(name, fp):
            log.info("stage %s: up to date, skipped", name)
            if name == until:
                break
            continue
        old = manifest.stage(name)
        if old.get("status") == "done" and i < forced:
            log.warning("stage %s: its config or data changed since the last run; re-running it "
                        "and the stages after it", name)
        t0 = time.time()
        if old.get("fingerprint") != fp or i >= forced:  # start over, not resume
            if name == "features":
                (out / "features" / "train.progress.json").unlink(missing_ok=True)
            manifest.mark(name, "running", fp)
        main_only = name in ("features", "clusters")
        info = runners[name](ctx) if state.is_main_process or not main_only else {}
        state.wait_for_everyone()
        manifest.mark(name, "done", fp, **{**info, "seconds": round(time.time() - t0, 2)})
        if name == until:
            break
    return out


def _write_header(manifest: Manifest, ctx: _Context) -> None:
    import peft
    import sklearn
    import transformers

    manifest.data.update({
        "format": 1,
        "backbone": ctx.cfg.model.name,
        "data": str(ctx.data),
        "num_examples": len(ctx.records),
        "config": ctx.cfg.to_dict(),
        "versions": {"elrea": _version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "scikit-learn": sklearn.__version__, "python": platform.python_version()},
    })
    manifest.save()
    write_json(ctx.out / "config.json", ctx.cfg.to_dict())


def _version() -> str:
    from . import __version__

    return __version__

