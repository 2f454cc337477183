"""python benchmarks/figures.py --check | --write  -- the docs' figures, copied from their results JSON.

A figure in README.md or docs/*.md is marked by an HTML comment (invisible once rendered) that
names its JSON file in benchmarks/results/, a dotted key path, and optionally a scale:

    <!-- fig speed_features.json ratios.speedup_vs_reference -->**34.9x**
    <!-- fig quality.json accuracy.elrea.mean *100 -->22.5%
    <!-- fig fuzz.json targets.*.tried -->3,300

The figure is the number right after the comment (inside ** ** when bold). It must equal the JSON
value times the scale at the decimals it shows (|shown - value| <= half its last digit). In the
path an integer part indexes a list, `*` sums over every entry, and a key that holds dots itself
(`llama-3.2-1b`) is matched whole.

--check lists every marked figure beside its JSON value and exits 1 on a mismatch or a missing
file or key; --write rewrites each mismatched figure from its JSON, keeping its decimals, its
thousands commas and its sign: a figure is copied, never retyped.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
MARK = re.compile(r"<!-- fig (?P<file>\S+\.json) (?P<path>.+?)(?: \*(?P<scale>-?[\d.]+))? -->"
                  rf"(?P<bold>\**)(?P<shown>{NUMBER})")


@dataclass
class Figure:
    doc: Path
    line: int
    mark: str       # the comment, as written
    shown: str      # the number after it, as written
    value: float | None = None  # JSON value x scale; None when `error` says why not
    error: str = ""

    @property
    def decimals(self) -> int:
        return len(self.shown.partition(".")[2])

    @property
    def expected(self) -> str:
        """The JSON value written the way the figure is: same decimals, commas and sign."""
        sign = "+" if self.shown.startswith("+") else ""
        comma = "," if "," in self.shown else ""
        return f"{self.value:{sign}{comma}.{self.decimals}f}"

    @property
    def ok(self) -> bool:
        return not self.error and abs(float(self.shown.replace(",", "")) - self.value) <= (
            0.5 * 10 ** -self.decimals + 1e-9)

    def __str__(self) -> str:
        where = f"{self.doc.relative_to(ROOT) if self.doc.is_relative_to(ROOT) else self.doc}:{self.line}"
        got = self.error or f"JSON {self.expected} ({self.value:.6g})"
        return f"{'ok ' if self.ok else 'BAD'} {where}: {self.shown} <- {self.mark} -> {got}"


def lookup(obj, parts: list[str]):
    """The value at a dotted path; `*` sums over every entry; keys with dots are matched whole."""
    if not parts:
        return obj
    head, rest = parts[0], parts[1:]
    if head == "*":
        return sum(lookup(v, rest) for v in (obj.values() if isinstance(obj, dict) else obj))
    if isinstance(obj, list):
        return lookup(obj[int(head)], rest)
    if not isinstance(obj, dict):
        raise KeyError(f"{head!r}: {obj!r} has no keys")
    for n in range(len(parts), 0, -1):  # the longest run of parts that is a key
        if ".".join(parts[:n]) in obj:
            return lookup(obj[".".join(parts[:n])], parts[n:])
    raise KeyError(f"{head!r} not among {sorted(obj)}")


def figures(doc: Path, results: Path = RESULTS) -> list[Figure]:
    """Every marked figure of one markdown file, each with its JSON value or why it has none."""
    text = doc.read_text()
    marks = {m.start(): m for m in MARK.finditer(text)}
    found = []
    for start in (m.start() for m in re.finditer("<!-- fig ", text)):
        line = text.count("\n", 0, start) + 1
        if (m := marks.get(start)) is None:  # a typo or a line break inside: say so, don't skip it
            found.append(Figure(doc, line, text[start:].partition("\n")[0], "", error=(
                "not a figure: want <!-- fig FILE.json KEY.PATH [*SCALE] -->NUMBER on one line")))
            continue
        fig = Figure(doc, line, m.group(0)[: m.start("bold") - start], m["shown"])
        try:
            value = lookup(json.loads((results / m["file"]).read_text()), m["path"].split("."))
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{m['path']} is {value!r}, not a number")
            fig.value = value * float(m["scale"] or 1)
        except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
            fig.error = f"{type(e).__name__}: {e}"
        if not text[text.rfind("\n", 0, start) + 1: start].strip():
            fig.error = "; ".join(filter(None, [
                fig.error, "starts a line, which ends the paragraph in markdown: put a word before it"]))
        found.append(fig)
    return found


def write(doc: Path, results: Path = RESULTS) -> int:
    """Rewrite each mismatched figure of `doc` from its JSON; the number of figures changed."""
    found = figures(doc, results)
    if errors := [f for f in found if f.error]:
        raise ValueError("\n".join(map(str, errors)))
    fixes = iter(found)  # MARK.sub meets the figures in the order figures() found them

    def fix(m: re.Match) -> str:
        fig = next(fixes)
        return m.group(0) if fig.ok else m.group(0)[: m.start("shown") - m.start()] + fig.expected

    if changed := sum(not f.ok for f in found):
        doc.write_text(MARK.sub(fix, doc.read_text()))
    return changed


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="list every figure; exit 1 on a mismatch")
    mode.add_argument("--write", action="store_true", help="rewrite mismatched figures from their JSON")
    ap.add_argument("docs", nargs="*", type=Path, default=DOCS,
                    help="markdown files (default: README.md docs/*.md)")
    args = ap.parse_args(argv)
    if args.write:
        for doc in args.docs:
            print(f"{doc}: {write(doc)} figure(s) rewritten")
    found = [f for doc in args.docs for f in figures(doc)]
    for f in found:
        print(f)
    bad = [f for f in found if not f.ok]
    print(f"{len(found)} figures, {len(bad)} not matching their JSON")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
