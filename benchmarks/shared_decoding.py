"""python benchmarks/shared_decoding.py --run RUN --data FILE  -- several routings of the same prompts: one by one, or together.

`elrea compare` chooses each router's temperature and top-k on validation, so it decodes the
same prompts under many routings of one run (every router x every temperature with all
experts, and top-1: 9 with the default routers and a grid of 2); `elrea eval` decodes the
ensemble and the base adapter. A row of the engine is a (prompt, adapter, tokens so far)
state whatever weight a routing gives it, so the engine decodes a call's copies of a prompt on
shared rows and forks a row only where the routings' tokens part (elrea.engine.Slots).

This decodes the first --limit prompts of --data (greedy, the run's generation settings, in
batches of its generation.batch_size) under each routing of the run:

- one by one: one `ELREA.generate` call per routing (what compare did before);
- together: one call with every routing's copy of each prompt (what `answer_all` does now).

It reports seconds, the (prompt, adapter) rows prefilled and the rows computed by decode
steps, the forks, and checks that each routing's answers are the same both ways. The saving
depends on how often the routings choose alike: it is the run's, not a constant.

    .venv/bin/python benchmarks/shared_decoding.py --run runs/demo --data runs/demo/data/validation.jsonl

Options: --run (a fitted run), --data (JSONL; default the run's data/validation.jsonl), --limit
64, --routers (default: those the run has fitted of gradient, embedding, learned), --tau-grid 1
2, --top-k 1 (each router at tau 1 keeping k experts; 0 for none), --max-new-tokens (default the
run's), --repeats 1, --out (default benchmarks/results/shared_decoding.json).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, print_table, write_report  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a fitted run directory")
    ap.add_argument("--data", help="prompts (JSONL); default the run's data/validation.jsonl")
    ap.add_argument("--limit", type=int, default=64, help="prompts decoded")
    ap.add_argument("--routers", nargs="*", default=None)
    ap.add_argument("--tau-grid", nargs="*", type=float, default=[1.0, 2.0])
    ap.add_argument("--top-k", nargs="*", type=int, default=[1])
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=1, help="timed repetitions of each way (the median)")
    ap.add_argument("--ways", nargs="*", default=["one_by_one", "together"], choices=["one_by_one", "together"],
                    help="which ways to run (one_by_one alone runs on an engine without row counts too: with "
                         "PYTHONPATH=<an older checkout>/src, for a before/after)")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def routings(model, enc, routers, taus, top_ks) -> dict:
    """{name: weights [n, C+1]} of each router at each temperature (all experts) and at tau 1
    keeping each top-k; routers the run cannot serve are left out."""
    out = {}
    for router in routers:
        try:
            signal = model.router(router).signal(enc)
        except Exception as e:  # noqa: BLE001 - a router the run has not fitted
            print(f"router {router}: {e}; left out", file=sys.stderr)
            continue
        for tau in taus:
            out[f"{router} tau {tau:g}"] = model.route(None, router=router, tau=tau, top_k=0, features=signal)
        for k in top_ks:
            if 0 < k < len(model.adapters) - 1:
                out[f"{router} top-{k}"] = model.route(None, router=router, tau=1.0, top_k=k, features=signal)
    return out


def run(args) -> dict:
    import statistics

    import torch

    from elrea import ELREA
    from elrea.data import load_records

    model = ELREA.from_pretrained(args.run)
    data = Path(args.data) if args.data else Path(args.run) / "data" / "validation.jsonl"
    records = load_records(data)[:args.limit]
    enc = model.encode([r.messages for r in records])
    ways = routings(model, enc, args.routers or ["gradient", "embedding", "learned"], args.tau_grid, args.top_k)
    if len(ways) < 2:
        raise SystemExit("fewer than 2 routings: nothing to share (fit more routers or widen --tau-grid)")
    names, ws = list(ways), list(ways.values())
    stats = model.engine.stats

    def one_by_one():
        return [model.generate(enc, weights=w, max_new_tokens=args.max_new_tokens) for w in ws]

    def together():
        texts = model.generate(enc * len(ws), weights=torch.cat(ws), max_new_tokens=args.max_new_tokens)
        return [texts[i * len(enc):(i + 1) * len(enc)] for i in range(len(ws))]

    result = {}
    for way, fn in (("one_by_one", one_by_one), ("together", together)):
        if way not in args.ways:
            continue
        times = []
        for _ in range(args.repeats):
            p, d, forks, moves = (_count(stats, k) for k in ("prefill_rows", "decode_rows", "forks", "moves"))
            t = time.perf_counter()
            answers = fn()
            times.append(time.perf_counter() - t)
            rows = {"prefill_rows": _count(stats, "prefill_rows") - p, "decode_rows": _count(stats, "decode_rows") - d}
        result[way] = {"seconds": round(statistics.median(times), 2), "all_seconds": [round(x, 2) for x in times],
                       **rows, "answers": answers}
        if way == "together":
            result[way]["forks"] = _count(stats, "forks") - forks
        result[way]["rows_moved"] = _count(stats, "moves") - moves
    report = {"elrea": _source(), "run": str(args.run), "data": str(data), "prompts": len(enc), "adapters": len(model.adapters),
              "routings": names, "generation_batch_size": model.config.generation.batch_size,
              "max_new_tokens": args.max_new_tokens or model.config.generation.max_new_tokens, "ways": result}
    if len(result) == 2:
        a, b = result["one_by_one"], result["together"]
        report["same_answers"] = a["answers"] == b["answers"]
        report["ratios"] = {"seconds": round(a["seconds"] / b["seconds"], 2),
                            "prefill_rows": round(a["prefill_rows"] / b["prefill_rows"], 2),
                            "decode_rows": round(a["decode_rows"] / max(1, b["decode_rows"]), 2)}
    for way in result.values():
        way["answers_digest"] = _digest(way.pop("answers"))
    return report


def _source() -> dict:
    """Which elrea decoded: its source directory and that checkout's commit (PYTHONPATH may point
    at an older one)."""
    import subprocess

    import elrea

    src = Path(elrea.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=src, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"source": str(src), "commit": commit}


def _count(stats, name: str) -> int:
    return getattr(stats, name, 0)        # an engine from before these counts: 0


def _digest(answers) -> str:
    """A hash of every routing's answers: runs on other engines (--ways, PYTHONPATH) compare by it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(answers).encode()).hexdigest()[:16]


def show(r: dict) -> None:
    rows = [[way, v["seconds"], v["prefill_rows"], v["decode_rows"], v.get("forks", ""), v["rows_moved"],
             v["answers_digest"]] for way, v in r["ways"].items()]
    notes = []
    if "ratios" in r:
        notes.append(f"one by one / together: {r['ratios']['seconds']}x the time, {r['ratios']['prefill_rows']}x the "
                     f"prefill rows, {r['ratios']['decode_rows']}x the decode rows; same answers: {r['same_answers']}")
    print_table(f"{len(r['routings'])} routings of {r['prompts']} prompts, {r['adapters']} adapters ({r['run']})",
                ["way", "seconds", "rows prefilled", "rows decoded", "forks", "rows moved", "answers"], rows, notes)


def main(argv=None) -> dict:
    args = parse_args(argv)
    report = {"command": command_line(sys.argv[0] if argv is None else __file__, argv), "machine": machine()}
    report.update(run(args))
    show(report)
    write_report(Path(args.out) if args.out else RESULTS / "shared_decoding.json", report)
    return report


if __name__ == "__main__":
    main()
