"""python benchmarks/lm_eval_speed.py --run RUN  -- lm-eval's loglikelihood: the elrea backend vs lm-eval's `hf`.

One multiple-choice task, generated (--questions arithmetic and word-reversal questions, 4
choices each: 4 x questions loglikelihood requests with as many different contexts as
questions), evaluated side by side in one process through lm-eval's `simple_evaluate`:

- anchor: lm-eval's own `hf` backend (HFLM) on the run's backbone with the run's base adapter
  (`peft=RUN/base`), in the run's dtype: one adapter, no routing, what a user would compare with;
- elrea: the `elrea` backend (ELREALM) on the run: every context routed with the run's router,
  then every (request, adapter with weight > 0) row scored and the experts' logits mixed.

Both get the same --batch-size (lm-eval's --batch_size). What is timed is the backends'
`loglikelihood` call alone (models loaded and a 2-question warm-up evaluated first, untimed);
elrea's routing (ELREA.route) is timed apart inside it, and counts the adapters with a weight
per context: scoring costs one forward row per such adapter where hf runs one, so
"without routing" elrea / hf is about that count at best. The report: seconds, requests/s,
accuracy for each, and the ratio elrea / hf. --label names the entry in the JSON (say before /
after a change: run the script with PYTHONPATH pointing at the other checkout's src); the
other labels already in the file are kept.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/lm_eval_speed.py --run /tmp/serve_run --label after
    .venv/bin/python benchmarks/lm_eval_speed.py --run RUN --questions 16 --batch-size auto

Options: --run (required), --questions (default 64), --batch-size (default 8), --device
(default cpu), --top-k (elrea's routing.top_k; default the run's), --threads, --label (default
"current"), --out (default benchmarks/results/lm_eval_speed.json).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, log, machine, machine_note, print_table, setup  # noqa: E402

TASK = "elrea_speed_mc"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", required=True, help="a run directory made by `elrea fit`")
    ap.add_argument("--questions", type=int, default=64)
    ap.add_argument("--batch-size", default="8", help="lm-eval's batch_size for both backends (int, auto)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--top-k", type=int, default=None,
                    help="elrea's routing.top_k (default: the run's): adapters scored per context")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--label", default="current", help="the entry of the JSON report this run writes")
    ap.add_argument("--out", default=str(RESULTS / "lm_eval_speed.json"))
    return ap.parse_args(argv)


def write_task(folder: Path, n: int, seed: int) -> Path:
    """A local multiple-choice task of n questions (no network), as tests/lm_eval_tasks/toy_mc."""
    rng, rows = random.Random(seed), []
    for i in range(n):
        if i % 2:
            a, b = rng.randint(10, 99), rng.randint(10, 99)
            q, right = f"Add {a} and {b}.", str(a + b)
            wrong = {str(a + b + d) for d in (-10, -1, 1, 2, 10)} - {right}
        else:
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))
            q, right = f"Reverse the word {word}.", word[::-1]
            wrong = {word, word[1:][::-1], (word + "x")[::-1], word[::-1].upper()} - {right}
        choices = sorted(wrong)[:3] + [right]
        rng.shuffle(choices)
        rows.append({"question": q, "choices": choices, "answer": choices.index(right)})
    data = folder / "speed_mc.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "speed_mc.yaml").write_text(
        f"task: {TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: \"{{question}}\\nAnswer:\"\n"
        "doc_to_choice: \"{{choices}}\"\ndoc_to_target: \"{{answer}}\"\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\nmetadata:\n  version: 1.0\n")
    return folder


def timed_evaluate(lm, tasks_dir: Path, route=None) -> dict:
    """simple_evaluate on the task, after a 2-question warm-up; the loglikelihood call timed."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    spent = {"loglikelihood": 0.0, "route": 0.0, "requests": 0, "rows": 0, "contexts": 0}
    real = lm.loglikelihood

    def loglikelihood(requests, disable_tqdm=False):
        t = time.perf_counter()
        out = real(requests, disable_tqdm=True)
        spent["loglikelihood"] += time.perf_counter() - t
        spent["requests"] += len(requests)
        return out
    lm.loglikelihood = loglikelihood
    if route is not None:   # ELREA.route, timed apart
        owner, real_route = route, route.route

        def timed_route(*a, **kw):
            t = time.perf_counter()
            w = real_route(*a, **kw)
            spent["route"] += time.perf_counter() - t
            spent["rows"] += int((w > 0).sum())
            spent["contexts"] += w.shape[0]
            return w
        owner.route = timed_route
    tm = TaskManager(include_path=str(tasks_dir))
    lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm, limit=2)   # warm-up, untimed
    spent.update(loglikelihood=0.0, route=0.0, requests=0, rows=0, contexts=0)
    res = lm_eval.simple_evaluate(model=lm, tasks=[TASK], task_manager=tm)
    s = spent["loglikelihood"]
    return {"seconds": round(s, 3), "requests": spent["requests"], "requests_per_s": round(spent["requests"] / s, 2),
            "route_seconds": round(spent["route"], 3) if route is not None else None,
            "adapters_per_context": round(spent["rows"] / spent["contexts"], 2) if spent["contexts"] else None,
            "acc": res["results"][TASK]["acc,none"]}


def run(args) -> dict:
    from lm_eval.models.huggingface import HFLM

    from elrea.integrations.lm_eval import ELREALM
    from elrea.models import resolve_model_path
    from elrea.rundir import Run

    cfg = Run(args.run).config()
    tasks_dir = write_task(Path(tempfile.mkdtemp(prefix="lm_eval_speed_")), args.questions, args.seed)
    bs = args.batch_size if args.batch_size.startswith("auto") else int(args.batch_size)
    log(f"hf: {cfg.model.name} + {args.run}/base, batch_size {bs}")
    hf = HFLM(pretrained=str(resolve_model_path(cfg.model.name)), peft=str(Path(args.run) / "base"),
              device=args.device, dtype=cfg.model.dtype, batch_size=bs)
    anchor = timed_evaluate(hf, tasks_dir)
    del hf
    log(f"elrea: {args.run}, batch_size {bs}")
    lm = ELREALM(run=args.run, device=args.device, batch_size=bs, top_k=args.top_k)
    ens = timed_evaluate(lm, tasks_dir, route=lm.model)
    entry = {"command": command_line(sys.argv[0]), "machine": machine(), "run": str(args.run),
             "backbone": cfg.model.name, "dtype": cfg.model.dtype, "adapters": len(lm.model.adapters),
             "router": cfg.routing.router, "top_k": cfg.routing.top_k if args.top_k is None else args.top_k,
             "questions": args.questions, "batch_size": args.batch_size,
             "device": args.device, "hf": anchor, "elrea": ens,
             "ratio_elrea_over_hf": round(ens["seconds"] / anchor["seconds"], 2),
             # the floor: one forward row per adapter with a weight, where hf runs one
             "ratio_scoring_over_hf": round((ens["seconds"] - ens["route_seconds"]) / anchor["seconds"], 2),
             "note": "compare ratios, not absolute times"}
    return entry


def show(label: str, e: dict) -> None:
    top = f", top_k {e['top_k']}" if e.get("top_k") else ""
    rows = [[name, r["requests"], r.get("adapters_per_context") or 1, r["seconds"], r["requests_per_s"],
             r["route_seconds"], r["acc"]]
            for name, r in (("hf (backbone + base adapter)", e["hf"]), (f"elrea ({e['adapters']} adapters, "
                                                                      f"{e['router']} router{top})", e["elrea"]))]
    print_table(f"lm-eval loglikelihood ({label}): {e['questions']} questions x 4 choices, batch_size {e['batch_size']}",
                ["backend", "requests", "adapters/context", "seconds", "requests/s", "routing s", "acc"], rows,
                [f"elrea / hf wall time: {e['ratio_elrea_over_hf']}; without routing: "
                 f"{e.get('ratio_scoring_over_hf', '-')} (the floor is one row per adapter with a weight)",
                 machine_note(e)])


def main(argv=None) -> dict:
    args = parse_args(argv)
    setup(args)
    entry = run(args)
    show(args.label, entry)
    out = Path(args.out)
    report = json.loads(out.read_text()) if out.exists() else {}
    report[args.label] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
