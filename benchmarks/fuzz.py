"""Fuzz the data loader and the config parser: every input loads, or fails with one clear line.

    python benchmarks/fuzz.py                        # 11 targets x 300 inputs, ~30 s on 2 CPU cores
    python benchmarks/fuzz.py --inputs 1000 --seed 1 --targets jsonl csv

Runs the generators of tests/test_fuzz.py (hypothesis, seeded) for a fixed number of inputs per
target: JSONL, JSON, CSV and Parquet files (generated records, and the same files with bytes
spliced in: BOMs, NULs, invalid UTF-8, cuts), YAML configs and command-line overrides. Counts,
per target, the inputs tried, loaded, failed with a clear user error (one line naming the file,
or the config field), failed with an unclear one, and failed with any other exception (a
traceback at the command line); the last two must be 0. Writes benchmarks/results/fuzz.json.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, RESULTS, command_line, machine, print_table, write_report  # noqa: E402

sys.path.insert(0, str(REPO / "tests"))
from test_fuzz import TARGETS  # noqa: E402

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402

KEPT = 3  # examples of each failure kind kept in the report


def fuzz(name: str, n: int, run_seed: int) -> dict:
    """Counts of `n` generated inputs of one target, and a few examples of each failure."""
    generate, check = TARGETS[name]
    counts = {"tried": 0, "loaded": 0, "error": 0, "unclear": 0, "traceback": 0}
    examples: dict[str, list[str]] = {"unclear": [], "traceback": []}
    with tempfile.TemporaryDirectory(prefix="elrea-fuzz-") as tmp:

        # generation only: `run` never fails (it counts), so there is nothing to replay or shrink
        @seed(run_seed)
        @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(generate)
        def run(value):
            counts["tried"] += 1
            try:
                outcome = check(value, Path(tmp))
            except AssertionError as e:  # a user error, but not one clear line
                outcome, detail = "unclear", str(e)
            except Exception as e:  # noqa: BLE001 - what the CLI would print as a traceback
                outcome, detail = "traceback", f"{type(e).__name__}: {e}"
            if outcome in examples and len(examples[outcome]) < KEPT:
                examples[outcome].append(f"{detail[:300]} <- input {value!r:.300}")
            counts[outcome] += 1

        start = time.perf_counter()
        run()
    return {**counts, "seconds": round(time.perf_counter() - start, 1), "examples": examples}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=300, help="generated inputs per target (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="hypothesis seed (default 0)")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS), metavar="TARGET",
                    help=f"which targets (default all: {', '.join(TARGETS)})")
    ap.add_argument("--out", default=str(RESULTS / "fuzz.json"), help="JSON report (default %(default)s)")
    return ap.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.getLogger("elrea").setLevel(logging.ERROR)  # generated records carry unknown keys: one warning each
    report = {"command": command_line(__file__, argv), "machine": machine(),
              "inputs_per_target": args.inputs, "seed": args.seed, "targets": {}}
    for name in args.targets:
        report["targets"][name] = fuzz(name, args.inputs, args.seed)
    rows = [[name, t["tried"], t["loaded"], t["error"], t["unclear"], t["traceback"], t["seconds"]]
            for name, t in report["targets"].items()]
    total = [sum(r[i] for r in rows) for i in range(1, 7)]
    print_table("fuzzing load_records and load_config",
                ["target", "inputs", "loaded", "clear errors", "unclear errors", "tracebacks", "s"],
                rows + [["all", *total]], notes=[f"command: {report['command']}"])
    for name, t in report["targets"].items():
        for kind, shown in t["examples"].items():
            for example in shown:
                print(f"{name}: {kind}: {example}", file=sys.stderr)
    write_report(Path(args.out), report)
    if total[3] or total[4]:
        sys.exit(f"{total[3]} unclear errors and {total[4]} tracebacks")
    return report


if __name__ == "__main__":
    main()
