"""Paper features or centred ones: the two candidate runs of an `elrea compare`, on validation.

    python benchmarks/center_choice.py WORK --validation VAL.jsonl [--runs elrea-center_false elrea]

Reads the validation answers the compare in WORK has decoded so far (WORK/evals/validation-*.json,
written as each round of trials ends, long before compare.json) and, for each router and over
all of them, takes each run's best trial (temperature and experts chosen on validation, as the
compare chooses) and the paired difference of the second run's best minus the first's, with a 95%
bootstrap interval (prompts resampled together within each source). This is the evidence
issue 20 asks the `features.center` default to be settled on: clusters that separate tasks, and
scores at least as good. JSON to benchmarks/results/center_choice.json.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, print_table, write_report  # noqa: E402

from elrea.compare.stats import accuracy, paired_difference, validation_rank  # noqa: E402
from elrea.data import load_records  # noqa: E402
from elrea.rundir import read_json  # noqa: E402

TRIAL = re.compile(r"validation-(?P<run>.+)-(?P<router>[a-z]+)-tau(?P<tau>[0-9.]+)-top(?P<k>[0-9]+)\.json")


def trials(work: Path, run: str, records) -> list[dict]:
    """Every validation trial of `run` decoded in `work`, with its accuracy."""
    found = []
    for path in sorted((work / "evals").glob(f"validation-{run}-*.json")):
        m = TRIAL.fullmatch(path.name)
        saved = read_json(path)
        if m is None or m["run"] != run or Path(saved["run"]).name != run:
            continue
        if len(saved["correct"]) != len(records):
            raise SystemExit(f"{path}: {len(saved['correct'])} answers for {len(records)} validation records: "
                             "give the validation file the compare used (--validation)")
        found.append({"router": m["router"], "tau": float(m["tau"]), "top_k": int(m["k"]),
                      "validation": accuracy(records, saved["correct"])["mean"], "correct": saved["correct"]})
    return found


def best(ts: list[dict], router: str | None = None) -> dict | None:
    ts = [t for t in ts if router is None or t["router"] == router]
    return max(ts, key=validation_rank) if ts else None


def choose(work: Path, records, first: str, second: str, seed: int = 0) -> dict:
    """{router or "best of all": each run's best trial and the second minus the first}."""
    runs = {first: trials(work, first, records), second: trials(work, second, records)}
    routers = sorted({t["router"] for ts in runs.values() for t in ts})
    out = {}
    for router in [*routers, None]:
        a, b = best(runs[first], router), best(runs[second], router)
        if a is None or b is None:
            continue
        out[router or "best of all"] = {
            **{run: {k: v for k, v in t.items() if k != "correct"} for run, t in ((first, a), (second, b))},
            "difference": paired_difference(records, b["correct"], a["correct"], seed=seed)}
    return {"trials": {run: len(ts) for run, ts in runs.items()}, "routers": out}


def _trial(t: dict) -> str:
    experts = f"top-{t['top_k']}" if t["top_k"] else "all"
    return f"{100 * t['validation']:.1f} (tau {t['tau']:g}, {experts})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work", help="the compare's output directory (its --out)")
    ap.add_argument("--validation", required=True, help="the validation JSONL the compare decoded")
    ap.add_argument("--runs", nargs=2, default=["elrea-center_false", "elrea"], metavar=("FIRST", "SECOND"),
                    help="the two candidate runs (default: the paper's features, then centred ones, as "
                         "`elrea compare` names them; compares run before centring was the default "
                         "named them elrea and elrea-center)")
    ap.add_argument("--out", default=str(RESULTS / "center_choice.json"))
    args = ap.parse_args(argv)
    records = load_records(args.validation)
    first, second = args.runs
    result = choose(Path(args.work), records, first, second)
    if not result["routers"]:
        raise SystemExit(f"{args.work}/evals: no validation trials of both {first} and {second} yet")
    report = {"command": command_line(__file__, argv), "machine": machine(), "validation": args.validation, "prompts": len(records),
              "runs": args.runs, **result}
    rows = [[r, _trial(v[first]), _trial(v[second]), f"{v['difference']['points']:+.1f}",
             "[{:+.1f}, {:+.1f}]".format(*v["difference"]["ci95"])] for r, v in result["routers"].items()]
    print_table(f"best validation accuracy (%), {len(records)} prompts", ["router", first, second,
                f"{second} - {first}", "95% paired CI"], rows)
    write_report(Path(args.out), report)


if __name__ == "__main__":
    main()
