"""python benchmarks/contention.py --data PROMPTS.jsonl  -- two torch processes on one CPU: what OpenMP's waiting costs.

torch's CPU kernels run on OpenMP threads (libgomp on Linux), which spin at every barrier for a
while before they sleep (GOMP_SPINCOUNT, 300,000 by default with OMP_WAIT_POLICY unset). With
every core busy in another process, a spinning thread holds a core that the thread it waits for
needs, so each of the thousands of small ops of a decode step can wait a scheduler slice. This
runs the engine's decoding (a prefill and --new-tokens greedy tokens of --prompts prompts under
--adapters random adapters) alone and as --copies processes at once, under each OpenMP setting:

- default: torch's threads (all cores), libgomp's defaults;
- spin 3000: GOMP_SPINCOUNT=3000, threads spin briefly and then sleep;
- passive: OMP_WAIT_POLICY=PASSIVE, threads sleep at once;
- one thread each: OMP_NUM_THREADS=1 in every process (no more threads than cores).

Each process warms up, waits for the others, then decodes --repeats times, streamed (no EOS:
every row runs every step), and reports its median prefill (with the first token) and its
median later step; the table gives the median over the processes of a setting, and ratios to the first row (the
default alone).

    .venv/bin/python benchmarks/contention.py \\
        --data benchmarks/work/quality-bigbench-mix/data/validation.jsonl   # nothing else running
    .venv/bin/python benchmarks/contention.py --quick           # tiny model, toy data (for tests)

Options: --data, --model (default smollm2-135m-instruct), --dtype bfloat16, --prompts 8,
--adapters 5, --new-tokens 17, --max-length 384, --copies 2, --repeats 3, --settings (default all four),
--seed 0, --quick, --out (default benchmarks/results/contention.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_benchmark_main, parse_data_args, print_table, training_data  # noqa: E402

SETTINGS = {"default": {}, "spin 3000": {"GOMP_SPINCOUNT": "3000"}, "passive": {"OMP_WAIT_POLICY": "PASSIVE"},
            "one thread each": {"OMP_NUM_THREADS": "1"}}
CLEARED = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a JSONL file whose instructions are the prompts")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=17)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--copies", type=int, default=2, help="processes run at once")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--repeats", type=int, default=3, help="decodings timed in each process")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--barrier", help=argparse.SUPPRESS)
    return parse_data_args(ap, argv)


def worker(args) -> dict:
    """One process's decoding, streamed: the median seconds of its prefill (with the first token)
    and milliseconds of a later step, over --repeats decodings."""
    import torch

    from _common import random_experts_model
    from elrea.data import PromptFormatter, load_records
    from elrea.engine import Ensemble
    from elrea.ensemble import sampling

    m, tok, names = random_experts_model(args.model, args.dtype, args.adapters, args.seed)
    fmt = PromptFormatter(tok, max_length=args.max_length)
    prompts = [fmt.encode_instruction(r.messages).input_ids for r in load_records(args.data)[:args.prompts]]
    eng = Ensemble(m, names, pad_id=tok.pad_token_id, compile="off")
    w = torch.full((len(prompts), len(names)), 1.0 / len(names))
    every = sampling(max_new_tokens=args.new_tokens, eos_ids=[])      # no EOS: every row runs every step

    def once() -> tuple[float, list[float]]:
        t0 = time.perf_counter()
        marks = [time.perf_counter() for _ in eng.decode_steps(prompts, w, every, stream=True)]
        return marks[0] - t0, [b - a for a, b in zip(marks, marks[1:])]

    once()                                                            # warm-up
    if args.barrier:                    # the copies start timing together, each warmed up
        Path(args.barrier, str(os.getpid())).touch()
        deadline = time.time() + 600
        while len(os.listdir(args.barrier)) < args.copies and time.time() < deadline:
            time.sleep(0.05)
    prefills, steps = [], []
    for _ in range(args.repeats):
        prefill, step = once()
        prefills.append(prefill)
        steps += step
    return {"prefill_s": round(statistics.median(prefills), 3), "step_ms": round(1000 * statistics.median(steps), 1),
            "threads": torch.get_num_threads()}


def launch(args, data: str, env_extra: dict, copies: int) -> list[dict]:
    """`copies` worker processes under the setting, timing together once each has warmed up;
    their reports."""
    env = {k: v for k, v in os.environ.items() if k not in CLEARED}
    env.update(env_extra)
    with tempfile.TemporaryDirectory(prefix="contention-") as barrier:
        cmd = [sys.executable, __file__, "--worker", "--data", data, "--model", args.model, "--dtype", args.dtype,
               "--prompts", str(args.prompts), "--adapters", str(args.adapters), "--new-tokens", str(args.new_tokens),
               "--max-length", str(args.max_length), "--seed", str(args.seed), "--repeats", str(args.repeats),
               "--copies", str(copies), "--barrier", barrier]
        procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(copies)]
        out = []
        for p in procs:
            stdout, stderr = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"a worker failed ({p.returncode}):\n{stderr[-3000:]}")
            out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def run(args) -> dict:
    data = training_data(args, "contention-")
    runs = {}
    for name in args.settings:
        for copies in (1, args.copies):
            runs[f"{name}, {'alone' if copies == 1 else f'{copies} at once'}"] = launch(args, data, SETTINGS[name], copies)
    med = {k: {f: statistics.median(r[f] for r in v) for f in ("prefill_s", "step_ms")} for k, v in runs.items()}
    base = next(iter(med.values()))           # the first row: the default alone, when asked for
    return {"model": "tiny" if args.quick else args.model, "dtype": args.dtype, "prompts": args.prompts,
            "adapters": args.adapters, "new_tokens": args.new_tokens, "copies": args.copies,
            "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "runs": runs, "median": med,
            "slowdown_vs_first_row": {k: {f: round(v[f] / base[f], 2) for f in v} for k, v in med.items()}}


def show(r: dict) -> None:
    rows = [[k, r["runs"][k][0]["threads"], f"{v['prefill_s']:.2f}", f"{v['step_ms']:.0f}",
             f"{r['slowdown_vs_first_row'][k]['prefill_s']:.2f}x", f"{r['slowdown_vs_first_row'][k]['step_ms']:.2f}x"]
            for k, v in r["median"].items()]
    print_table(f"The engine's decoding, alone and {r['copies']} processes at once on {r['cpus']} CPUs: {r['prompts']} "
                f"prompts x {r['adapters']} adapters, {r['new_tokens']} tokens, {r['dtype']}; {r['model']}",
                ["setting", "threads", "prefill s", "ms a step", "prefill vs first row", "step vs first row"],
                rows, ["median over the processes of each row"])


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return {}
    return data_benchmark_main(__file__, lambda _argv: args, run, show, argv)


if __name__ == "__main__":
    main()
