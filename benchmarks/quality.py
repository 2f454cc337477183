"""Quality on a built-in mixture: a thin caller of `elrea compare`.

    python benchmarks/quality.py --mixture reasoning-mix      # hours on 2 CPU cores: run it in the background
    python benchmarks/quality.py --mixture conflict-mix --tau-grid 1 2

Exports the mixture's train / validation / test files (`elrea data export`), runs
`elrea compare` on them with the demo config (SmolLM2-135M-Instruct) and the mixture's own
answer checker, and writes the compare report plus the command and the machine to
benchmarks/results/compare-<mixture>.json. Everything the comparison does (methods, choices
on validation, paired intervals, routing cost, clusters against sources) is `elrea compare`'s;
its report.md and pictures stay in the work directory. Resumable: the same command picks up
where it stopped.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine  # noqa: E402

from elrea.cli import main as elrea_main  # noqa: E402
from elrea.demo import demo_config_path  # noqa: E402
from elrea.rundir import atomic_path  # noqa: E402
from elrea.tasks import MIXTURES, export_mixture  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixture", default="reasoning-mix", choices=[m for m in MIXTURES if m != "toy"])
    ap.add_argument("--train", type=int, default=640)
    ap.add_argument("--validation", type=int, default=80)
    ap.add_argument("--test", type=int, default=240)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", help="elrea compare's output directory (default benchmarks/work/quality-<mixture>)")
    ap.add_argument("--out", help="results JSON (default benchmarks/results/compare-<mixture>.json)")
    args, compare_args = ap.parse_known_args(argv)
    work = Path(args.work or f"benchmarks/work/quality-{args.mixture}")
    paths = export_mixture(args.mixture, work / "data", train=args.train, validation=args.validation,
                           test=args.test, seed=args.seed)
    elrea_main(["compare", "--data", str(paths["train"]), "--validation", str(paths["validation"]),
                "--test", str(paths["test"]), "--out", str(work), "--config", str(demo_config_path()),
                "--checker", args.mixture, "--seed", str(args.seed), *compare_args])
    report = json.loads((work / "compare.json").read_text())
    report = {"command": command_line(__file__, argv), "machine": machine(), "mixture": args.mixture, **report}
    out = Path(args.out or RESULTS / f"compare-{args.mixture}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}; report: {work / 'report.md'}")


if __name__ == "__main__":
    main()
