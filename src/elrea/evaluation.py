"""Evaluation: exact-match accuracy of generated answers, overall and per source.

Answer normalisation (docs/method.md, "Evaluation"), applied to prediction and reference:
  1. Unicode NFKC; strip surrounding whitespace; collapse runs of whitespace to one space;
  2. lower-case; strip one trailing period and surrounding quotes;
  3. a number (optional sign, digits with optional thousands commas, optional decimals) is
     rewritten canonically: "3.0" -> "3", "1,000" -> "1000", "-0.50" -> "-0.5".
"""

from __future__ import annotations

import dataclasses
import logging
import re
import unicodedata
from pathlib import Path

log = logging.getLogger(__name__)
_NUMBER = re.compile(r"^[+-]?(\d{1,3}(,\d{3})+|\d+)(\.\d+)?$")


def normalize_answer(text: str) -> str:
    t = unicodedata.normalize("NFKC", text).strip()
    t = re.sub(r"\s+", " ", t).lower()
    if t.endswith("."):
        t = t[:-1].rstrip()
    t = t.strip("\"'`")
    if _NUMBER.match(t):
        value = float(t.replace(",", ""))
        t = str(int(value)) if value == int(value) else repr(value)
        if t == "-0":
            t = "0"
    return t


def exact_match(prediction: str, reference: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(reference)


def accuracy_table(rows: list[dict], methods: list[str]) -> dict:
    """rows: {"source": s, "<method>": bool, ...} -> {method: {"overall": acc, "per_source": {...}}}."""
    out = {}
    sources = sorted({str(r.get("source")) for r in rows})
    for m in methods:
        per = {}
        for s in sources:
            hits = [r[m] for r in rows if str(r.get("source")) == s]
            per[s] = sum(hits) / len(hits)
        out[m] = {"overall": sum(r[m] for r in rows) / max(1, len(rows)), "per_source": per,
                  "n": len(rows)}
    return out


def exact_checker(source, prediction: str, record) -> bool:
    """The default answer check: exact match after normalisation against the record's response
    or any of its `references`. (Built-in mixtures' own checks: elrea.tasks.checker.)"""
    return any(exact_match(prediction, a) for a in getattr(record, "answers", [record.response]))


def evaluate(model, records, max_new_tokens: int | None = None, progress: bool = True,
             checker=exact_checker, procs=None, router: str | None = None,
             resume: str | Path | None = None, resume_key: str = "") -> dict:
    """Accuracy of the ELREA ensemble and of the base adapter alone on `records`.

    With `procs` (elrea.distributed.Processes) of N processes, each evaluates its contiguous
    share of the batches and every process returns the whole result, rows in input order.
    With `resume` (a directory), each finished batch of rows is kept there (elrea.rundir.RowLog)
    and a re-run with the same model, records and settings (and `resume_key`, e.g. the checker's
    name) continues after them: the result equals an uninterrupted run's.
    """
    import torch

    from .distributed import Processes, map_batches
    from .rundir import RowLog

    procs = procs or Processes(0, 1, model.device)

    def run(recs):
        chunk = model.encode([r.messages for r in recs])  # once, for routing and both decodings
        w = model.route(chunk, router=router)
        base_w = torch.zeros_like(w)
        base_w[:, 0] = 1.0
        ens = model.generate(chunk, weights=w, max_new_tokens=max_new_tokens)
        base = model.generate(chunk, weights=base_w, max_new_tokens=max_new_tokens)
        return [{"source": r.source, "reference": r.response, "elrea_output": e, "base_output": b,
                 "elrea": checker(r.source, e, r), "base": checker(r.source, b, r),
                 "weights": [round(float(x), 4) for x in wr]}
                for r, e, b, wr in zip(recs, ens, base, w)]

    batch_size = model.config.generation.batch_size
    rows_log = None
    if resume is not None:
        key = evaluation_key(model, records, router, max_new_tokens, batch_size, resume_key)
        rows_log = RowLog(resume, key, procs.rank)
    done = rows_log.done() if rows_log else {}
    if done and procs.is_main:
        log.info("evaluation: resuming after %d finished batches of %d examples kept in %s",
                 len(done), batch_size, resume)
    rows = map_batches(procs, list(records), batch_size, run, desc="evaluating" if progress else None,
                       done=done, on_batch=rows_log.add if rows_log else None)
    return {"accuracy": accuracy_table(rows, ["elrea", "base"]), "examples": rows}


def evaluation_key(model, records, *settings) -> str:
    """What a resumed evaluation must share with the interrupted one: the run's stage
    fingerprints, the records, the generation config and `settings`."""
    import hashlib
    import json

    from .data import records_fingerprint
    from .rundir import Manifest

    stages = Manifest.load(model.run_dir).data.get("stages", {})
    # how fast the engine decodes (compile, sync_every) does not change what it decodes
    generation = {k: v for k, v in dataclasses.asdict(model.config.generation).items()
                  if k not in ("compile", "sync_every")}
    parts = [{s: st.get("fingerprint") for s, st in stages.items()}, records_fingerprint(records),
             [getattr(r, "references", []) for r in records],   # what counts as right is kept per row
             generation, dataclasses.asdict(model.config.routing), list(settings)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
