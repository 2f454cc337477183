"""Evaluation: exact-match accuracy of generated answers, overall and per source.

Answer normalisation (docs/method.md, "Evaluation"), applied to prediction and reference:
  1. Unicode NFKC; strip surrounding whitespace; collapse runs of whitespace to one space;
  2. lower-case; strip one trailing period and surrounding quotes;
  3. a number (optional sign, digits with optional thousands commas, optional decimals) is
     rewritten canonically: "3.0" -> "3", "1,000" -> "1000", "-0.50" -> "-0.5".
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import unicodedata
from dataclasses import dataclass
from pathlib import Path

from .rundir import out_of_space

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


@dataclass(frozen=True)
class Method:
    """One way of answering with a loaded run (elrea.api.ELREA): its ensemble routed by `router`
    (default the run's) at `tau` keeping `top_k` (None: the run's), one of its adapters alone
    (`column`: 0 = the base adapter, c = expert c), a LoRA adapter folder alone on its backbone
    (`adapter`), or PEFT's Arrow routing over its experts with top-k `arrow`."""

    router: str | None = None
    tau: float | None = None
    top_k: int | None = None
    column: int | None = None
    adapter: str | None = None
    arrow: int | None = None

    def key(self) -> dict:
        """The fields that are set: what a cached answer must share."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @contextlib.contextmanager
    def answering(self, model, max_new_tokens: int | None = None):
        """While inside: answer(encoded batch, signal rows or None) -> (texts, weights [n, C+1] or None).
        An extra adapter (a folder, or Arrow's) is added to the model for that time only."""
        import torch

        def alone(name):
            decoding = model.decoding(**({} if max_new_tokens is None else {"max_new_tokens": max_new_tokens}))

            def answer(batch, signal=None):
                ids = [e.input_ids for e in batch]
                toks = model.engine.generate(ids, model.engine.one_hot(name, len(ids)), decoding)
                return [model.tokenizer.decode(t, skip_special_tokens=True) for t in toks], None
            return answer

        if self.adapter is not None:
            with model.engine.extra_adapter(Path(self.adapter), "lora_single") as name:
                yield alone(name)
        elif self.arrow is not None:
            experts = model.adapters[1:]
            with model.engine.arrow(experts, top_k=min(self.arrow, len(experts))) as name:
                yield alone(name)
        else:
            def weights(batch, signal=None):
                if self.column is not None:
                    w = torch.zeros(len(batch), len(model.adapters))
                    w[:, self.column] = 1.0
                    return w
                return model.route(batch if signal is None else None, router=self.router, tau=self.tau,
                                   top_k=self.top_k, features=signal)

            def answer(batch, signal=None):
                w = weights(batch, signal)
                return model.generate(batch, weights=w, max_new_tokens=max_new_tokens), w
            answer.weights = weights       # what answer_all needs to decode several such methods at once
            yield answer


def answer_all(model, records, methods: dict[str, Method], checker=exact_checker, procs=None,
               max_new_tokens: int | None = None, resume: str | Path | None = None, key: str = "",
               signal=None, desc: str | None = "evaluating") -> list[dict]:
    """Each record answered by each of `methods` ({name: Method}) and checked: rows in input order,
    {"source", "reference", "<name>_output": text, "<name>": right or not, "<name>_weights":
    the routing weights, for the methods that route}. The methods that weigh the run's own
    adapters (routed, or one column) answer each batch in one call: the engine decodes their
    copies of a prompt on shared rows until their tokens part (elrea.engine.Slots), so k
    routings of a run cost about one prefill and their distinct continuations, not k decodes.

    Batches hold prompts of similar lengths, longest first (as lm-eval's and vLLM's batching
    do): a batch's prompts are padded to its longest, and on a mixture of tasks batches in input
    order padded about twice the real prompt tokens (docs/benchmarks.md).

    With `procs` (elrea.distributed.Processes) of N processes, each answers its contiguous share
    of the batches and every process returns every row. With `resume` (a directory), each
    finished batch of rows is kept there (RowLog) and a re-run with the same `key` (say, the
    evaluation_key) continues after them: the rows equal an uninterrupted run's. `signal` [n, d]:
    the routers' signal computed before for every record (one routed method only), or
    {method name: [n, d]} for several."""
    import torch

    from .distributed import Processes, map_batches

    procs = procs or Processes(0, 1, model.device)
    enc_all = model.encode([r.messages for r in records])
    order = by_length([len(e.input_ids) for e in enc_all])

    def run(idx: list[int]) -> list[dict]:
        recs = [records[i] for i in idx]
        batch = [enc_all[i] for i in idx]
        rows = [{"source": r.source, "reference": r.response} for r in recs]
        signals = {n: (signal.get(n) if isinstance(signal, dict) else signal) for n in answers}
        signals = {n: (None if sig is None else sig[idx]) for n, sig in signals.items()}
        together = [n for n, a in answers.items() if hasattr(a, "weights")]
        done = {}
        if len(together) > 1:                  # one call: the engine shares their rows per prompt
            ws = [answers[n].weights(batch, signals[n]) for n in together]
            texts = model.generate(batch * len(ws), weights=torch.cat(ws), max_new_tokens=max_new_tokens)
            done = {n: (texts[k * len(batch):(k + 1) * len(batch)], w) for k, (n, w) in enumerate(zip(together, ws))}
        for name, answer in answers.items():
            texts, w = done[name] if name in done else answer(batch, signals[name])
            for i, (row, r, t) in enumerate(zip(rows, recs, texts)):
                row[f"{name}_output"], row[name] = t, bool(checker(r.source, t, r))
                if w is not None and methods[name].column is None:
                    row[f"{name}_weights"] = [round(float(x), 4) for x in w[i]]
        return rows

    batch_size = model.config.generation.batch_size
    # the batches' order is part of what a kept batch means: logs of another order are not resumed
    rows_log = RowLog(resume, f"{key}/by-length", procs.rank) if resume is not None else None
    done = rows_log.done() if rows_log else {}
    if done and procs.is_main:
        log.info("evaluation: resuming after %d finished batches of %d examples kept in %s",
                 len(done), batch_size, resume)
    with contextlib.ExitStack() as stack:
        answers = {n: stack.enter_context(m.answering(model, max_new_tokens)) for n, m in methods.items()}
        rows = map_batches(procs, order, batch_size, run, desc=desc,
                           done=done, on_batch=rows_log.add if rows_log else None)
    in_order = [None] * len(rows)
    for i, row in zip(order, rows):
        in_order[i] = row
    return in_order


def by_length(lengths: list[int]) -> list[int]:
    """Indices, longest first (ties in input order): consecutive batches of them pad little."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def evaluate(model, records, max_new_tokens: int | None = None, progress: bool = True,
             checker=exact_checker, procs=None, router: str | None = None,
             resume: str | Path | None = None, resume_key: str = "") -> dict:
    """Accuracy of the ELREA ensemble (routed by `router`, default the run's) and of its base
    adapter alone on `records`: {"accuracy": table, "examples": rows with "elrea_output",
    "base_output", "elrea", "base" and the ensemble's "weights"}. Processes and resuming as
    answer_all (resume_key: e.g. the checker's name)."""
    methods = {"elrea": Method(router=router), "base": Method(column=0)}
    key = evaluation_key(model, records, methods, max_new_tokens, model.config.generation.batch_size, resume_key)
    rows = answer_all(model, list(records), methods, checker, procs, max_new_tokens, resume, key,
                      desc="evaluating" if progress else None)
    for row in rows:
        row["weights"] = row.pop("elrea_weights")
    return {"accuracy": accuracy_table(rows, ["elrea", "base"]), "examples": rows}


def evaluate_to_file(model, records, out: str | Path, checker=exact_checker, checker_name: str = "auto",
                     router: str | None = None, max_new_tokens: int | None = None, procs=None) -> dict | None:
    """`elrea eval`: evaluate (as `evaluate`) and write the result to `out`, resumably.

    Finished batches are kept in OUT.partial/ (a re-run with the same settings continues after
    them), under a lock that one evaluation holds at a time; the result is written atomically,
    under the run's lock when `out` is in the run directory, and the run's eval.json also
    refreshes its model card. Returns the result on the main process, None on the others."""
    from .rundir import Run, RunLock, write_json

    out = Path(out)
    run = Run(model.run_dir)
    partial = out.with_name(out.name + ".partial")
    is_main = procs is None or procs.is_main
    with RunLock(partial, "elrea eval") if is_main else contextlib.nullcontext():
        result = evaluate(model, records, max_new_tokens=max_new_tokens, procs=procs, checker=checker,
                          router=router, resume=partial, resume_key=checker_name)
    if not is_main:
        return None
    in_run = out.resolve().parent == run.root.resolve()
    with RunLock(run.root, "elrea eval") if in_run else contextlib.nullcontext():
        model.check_current()  # the run may have been refitted while this evaluation ran
        write_json(out, result)
        if out.resolve() == run.eval.resolve():
            from .card import write_model_card

            write_model_card(run.root)  # the model card shows the evaluation table
    RowLog(partial, "").clear()
    return result


def evaluation_key(model, records, methods: dict, *settings) -> str:
    """What a resumed evaluation must share with the interrupted one (answers_key of the loaded
    model's run and config)."""
    return answers_key(model.run_dir, model.config, records, methods, *settings)


def answers_key(run_dir, config, records, methods: dict, *settings) -> str:
    """What answers must share to be reused: the run (its directory and stage fingerprints), the
    records and what counts as right for each, the generation and routing config, the methods,
    the contents of any adapter folder a method decodes alone (`Method.adapter`: another run's,
    refitted or not) and `settings` (e.g. the checker's name)."""
    import hashlib
    import json

    from .data import records_fingerprint
    from .rundir import Manifest

    stages = Manifest.load(run_dir).data.get("stages", {})
    # how fast the engine decodes (compile, sync_every) does not change what it decodes
    generation = {k: v for k, v in dataclasses.asdict(config.generation).items()
                  if k not in ("compile", "sync_every")}
    parts = [str(run_dir), {s: st.get("fingerprint") for s, st in stages.items()}, records_fingerprint(records),
             [getattr(r, "references", []) for r in records],   # what counts as right is kept per row
             generation, dataclasses.asdict(config.routing), {n: m.key() for n, m in methods.items()},
             {n: _folder_digest(m.adapter) for n, m in methods.items() if m.adapter is not None},
             list(settings)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _folder_digest(folder) -> str:
    """sha256 of an adapter folder's config and weights (a few MB): which adapter it holds now."""
    import hashlib

    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        path = Path(folder) / name
        if path.exists():
            h.update(name.encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


class RowLog:
    """Finished batches of JSON rows that survive interruption: a directory of
    `batches-<rank>.jsonl` files, one line per batch ({"key", "batch", "rows"}) appended and
    fsynced as each batch finishes. A kill mid-write leaves at most a torn last line, which is
    cut off when the file is next opened; lines of another `key` (other model, data or
    settings) are ignored. Batches are numbered over the whole input, so a re-run resumes
    whatever the number of processes that wrote them.

        rows = RowLog(path, key, rank)
        done = rows.done()          # {batch index: rows}
        rows.add(i, batch_rows)     # durable before it returns
        rows.clear()                # after the final result is written
    """

    def __init__(self, directory: str | Path, key: str, rank: int = 0):
        self.dir, self.key = Path(directory), key
        self.file = self.dir / f"batches-{rank}.jsonl"
        self._cut = False  # torn tail of an earlier run removed (once, before the first append)

    def done(self) -> dict[int, list]:
        out: dict[int, list] = {}
        for f in sorted(self.dir.glob("batches-*.jsonl")) if self.dir.is_dir() else []:
            for line in f.read_bytes().split(b"\n"):
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a torn last line (or an empty one)
                if isinstance(rec, dict) and rec.get("key") == self.key:
                    out[int(rec["batch"])] = rec["rows"]
        return out

    def add(self, batch: int, rows: list) -> None:
        line = json.dumps({"key": self.key, "batch": batch, "rows": rows}, ensure_ascii=False) + "\n"
        self.dir.mkdir(parents=True, exist_ok=True)
        with out_of_space(self.file), open(self.file, "ab") as fh:
            if not self._cut:
                self._cut_torn_line(fh)
                self._cut = True
            fh.write(line.encode("utf-8"))
            fh.flush()
            os.fsync(fh.fileno())

    @staticmethod
    def _cut_torn_line(fh) -> None:
        """Truncate an appended-to file after its last complete line."""
        with open(fh.name, "rb") as r:
            data = r.read()
        if data and not data.endswith(b"\n"):
            fh.truncate(data.rfind(b"\n") + 1)

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)
