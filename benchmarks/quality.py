"""Quality on a built-in mixture: a thin caller of `elrea compare`.

    python benchmarks/quality.py --mixture reasoning-mix      # hours on 2 CPU cores: run it in the background
    python benchmarks/quality.py --mixture conflict-mix --tau-grid 1 2
    python benchmarks/quality.py --mixture bigbench-mix --max-chars 600 \
        generation.max_new_tokens=40 clustering.max_clusters=12 --tau-grid 1 2   # a day or more on 2 CPU cores

bigbench-mix (elrea.bigbench): --tasks training tasks (default 12), --train / --validation /
--test records per task (defaults 300 / 30 / 60), --bbh records per held-out BBH task (50),
--bigbench PATH to the sdist (default: elrea's cache, fetched once); compare tests on the
in-distribution test file and on bbh.jsonl (a table of its own).

Exports the mixture's train / validation / test files (`elrea data export`), runs
`elrea compare` on them with the demo config (SmolLM2-135M-Instruct) and the mixture's own
answer checker, and writes the compare report plus the command and the machine to
benchmarks/results/compare-<mixture>.json. Everything the comparison does (methods, choices
on validation, paired intervals, routing cost, clusters against sources) is `elrea compare`'s;
its report.md and pictures stay in the work directory. Resumable: the same command picks up
where it stopped. The compare's headline (the chosen ELREA, lora and lora-matched on every test
file) comes hours before the rest on a CPU: the same command with --headline copies it to
benchmarks/results/headline-<mixture>.json, and draws it as headline-<mixture>.png, as soon as
it is written (a finished run does too).
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
from elrea.errors import ElreaError  # noqa: E402
from elrea.rundir import atomic_path  # noqa: E402
from elrea.tasks import MIXTURES, export_mixture  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mixture", default="reasoning-mix", choices=[m for m in MIXTURES if m != "toy"] + ["bigbench-mix"])
    ap.add_argument("--train", type=int, help="training records (default 640; bigbench-mix: per task, 300)")
    ap.add_argument("--validation", type=int, help="validation records (default 80; bigbench-mix: per task, 30)")
    ap.add_argument("--test", type=int, help="test records (default 240; bigbench-mix: per task, 60)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", type=int, default=12, help="bigbench-mix: training tasks")
    ap.add_argument("--task", action="append", metavar="NAME",
                    help="bigbench-mix: a training task by name (repeat; instead of --tasks drawn at random), e.g. "
                         "to keep a smaller run on the tasks of a larger one")
    ap.add_argument("--bbh", type=int, default=50, help="bigbench-mix: records per held-out BBH task")
    ap.add_argument("--bigbench", help="bigbench-mix: the bigbench-1.0.0 sdist or its unpacked folder")
    ap.add_argument("--max-chars", type=int, default=1000, help="bigbench-mix: longest instruction kept")
    ap.add_argument("--work", help="elrea compare's output directory (default benchmarks/work/quality-<mixture>)")
    ap.add_argument("--out", help="results JSON (default benchmarks/results/compare-<mixture>.json)")
    ap.add_argument("--headline", action="store_true",
                    help="run nothing: copy the compare's headline.json (the chosen ELREA, lora and lora-matched on "
                         "every test file, written hours before the rest on a CPU) from --work to "
                         "headline-<mixture>.json beside the results JSON, with the command (without this flag) and "
                         "the machine, and draw it (headline-<mixture>.png); a finished run writes both too")
    args, compare_args = ap.parse_known_args(argv)
    work = Path(args.work or f"benchmarks/work/quality-{args.mixture}")
    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--headline"]
    if args.headline:
        if not (work / "headline.json").exists():
            sys.exit(f"quality.py: {work / 'headline.json'} is not written yet: the compare writes it once the "
                     "candidates are chosen on validation and lora-matched is trained")
        _write_headline(work, _headline_path(args), args.mixture, argv)
        return
    if args.mixture == "bigbench-mix":
        from elrea import bigbench

        sizes = {k: v for k, v in (("train", args.train), ("validation", args.validation), ("test", args.test))
                 if v is not None}
        try:
            paths = bigbench.export(work / "data", args.bigbench, n_tasks=args.tasks, bbh=args.bbh, seed=args.seed,
                                    max_chars=args.max_chars, include=args.task, **sizes)
        except ElreaError as e:   # a task, size or sdist the user named: say which, no traceback
            sys.exit(f"quality.py: {e}")
        tests = [str(paths["test"]), str(paths["bbh"])]
    else:
        paths = export_mixture(args.mixture, work / "data", train=args.train or 640,
                               validation=args.validation or 80, test=args.test or 240, seed=args.seed)
        tests = [str(paths["test"])]
    rc = elrea_main(["compare", "--data", str(paths["train"]), "--validation", str(paths["validation"]),
                     "--test", *tests, "--out", str(work), "--config", str(demo_config_path()),
                     "--checker", args.mixture, "--seed", str(args.seed), *compare_args])
    if rc:   # stopped (a signal: re-run to resume) or refused: compare said why
        sys.exit(rc)
    report = json.loads((work / "compare.json").read_text())
    report = {"command": command_line(__file__, argv), "machine": machine(), "mixture": args.mixture, **report}
    out = Path(args.out or RESULTS / f"compare-{args.mixture}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(report, indent=2))
    for picture in _copy_pictures(work, out):
        print(f"wrote {picture}")
    _write_headline(work, _headline_path(args), args.mixture, argv)
    print(f"wrote {out}; report: {work / 'report.md'}")


PICTURES = {"accuracy.png": "", "budget.png": "-budget", "per_source.png": "-per-source"}


def _copy_pictures(work: Path, out: Path) -> list[Path]:
    """The report's pictures beside the results JSON, named after it (compare-<mixture>.png,
    -budget.png, -per-source.png), so that docs show the figures of the JSON they cite."""
    written = []
    for name, suffix in PICTURES.items():
        if (work / name).exists():
            target = out.with_name(f"{out.stem}{suffix}.png")
            with atomic_path(target) as tmp:
                tmp.write_bytes((work / name).read_bytes())
            written.append(target)
    return written


def _headline_path(args) -> Path:
    """headline-<mixture>.json beside the results JSON (compare-<mixture>.json by default)."""
    if not args.out:
        return RESULTS / f"headline-{args.mixture}.json"
    out = Path(args.out)
    return out.with_name(out.name.replace("compare-", "headline-", 1) if out.name.startswith("compare-")
                         else f"headline-{out.name}")


def _write_headline(work: Path, out: Path, mixture: str, argv) -> Path:
    headline = {"command": command_line(__file__, argv), "machine": machine(), "mixture": mixture,
                **json.loads((work / "headline.json").read_text())}
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(headline, indent=2))
    print(f"wrote {out}")
    print(f"wrote {_headline_picture(headline, out.with_suffix('.png'))}")
    return out


def _headline_picture(headline: dict, out: Path) -> Path:
    """Per test file: each method's mean accuracy (bars), and the paired differences against lora
    and lora-matched with their 95% intervals (points and whiskers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files, methods = headline["files"], headline["methods"]
    fig, axes = plt.subplots(2, len(files), figsize=(5.4 * len(files), 5.6), squeeze=False)
    for col, (name, f) in enumerate(files.items()):
        ax = axes[0, col]
        acc = [100 * f["accuracy"][m] for m in methods]
        bars = ax.bar(range(len(methods)), acc, color=["tab:blue", "tab:gray", "tab:olive"][:len(methods)])
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(methods)), methods, fontsize=8)
        ax.set_title(f"{name}: {f['examples']} prompts", fontsize=10)
        ax.set_ylabel("mean accuracy over tasks (%)" if col == 0 else "")
        ax.set_ylim(0, max(acc) * 1.2 + 1)
        bx = axes[1, col]
        # each pair once: lora - lora-matched is lora-matched - lora reversed
        diffs = [(f"{m} - {against}", v) for key, against in (("versus_lora_matched", "lora-matched"),
                                                             ("versus_lora", "lora"))
                 for m, v in f.get(key, {}).items() if (m, against) != ("lora", "lora-matched")]
        ys = range(len(diffs) - 1, -1, -1)    # first at the top
        for y, (label, v) in zip(ys, diffs):
            lo, hi = v["ci95"]
            bx.errorbar(v["points"], y, xerr=[[v["points"] - lo], [hi - v["points"]]], fmt="o", capsize=3,
                        color="tab:green" if lo > 0 else "tab:red" if hi < 0 else "tab:gray")
        bx.axvline(0, color="black", lw=0.8)
        bx.set_yticks(list(ys), [d[0] for d in diffs], fontsize=7)
        bx.set_ylim(-0.6, len(diffs) - 0.4)
        bx.set_xlabel("points, 95% paired interval", fontsize=8)
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    main()
