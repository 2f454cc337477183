"""The docs' figures are the committed JSON's: every marked figure in README.md and docs/*.md
equals its value in benchmarks/results/, and README's "Results so far" has no decimal without a
marker (benchmarks/figures.py; a figure is copied from its JSON, never retyped). No models."""

import importlib.util
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load_figures():
    spec = importlib.util.spec_from_file_location("benchmark_figures", ROOT / "benchmarks" / "figures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


figures = _load_figures()

# A decimal written as a figure: not part of a name or version (Llama-3.2-1B, 2.13.0+cpu, v1.2).
DECIMAL = re.compile(r"(?<![\w.])(?<![A-Za-z]-)\d[\d,]*\.\d+(?!\d|\.\d)")


def unmarked(text: str) -> list[str]:
    """Decimals of `text` that carry no figure marker (HTML comments and marked figures removed)."""
    text = figures.MARK.sub("", text)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return DECIMAL.findall(text)


def results_section() -> tuple[int, str]:
    """README's "Results so far" section and the line it starts on."""
    text = (ROOT / "README.md").read_text()
    start = text.index("\n## Results so far") + 1
    end = text.index("\n## ", start)
    return text.count("\n", 0, start) + 1, text[start:end]


def test_every_marked_figure_equals_its_json():
    found = [f for doc in figures.DOCS for f in figures.figures(doc)]
    readme = [f for f in found if f.doc.name == "README.md"]
    assert len(readme) >= 40, f"README.md has {len(readme)} marked figures; its results section lost its markers?"
    bad = [str(f) for f in found if not f.ok]
    assert not bad, ("figures that differ from their JSON (python benchmarks/figures.py --write copies them in):\n"
                     + "\n".join(bad))


def test_every_decimal_in_readme_results_is_marked():
    first, section = results_section()
    bad = [f"README.md:{first + i}: {n}  in: {line.strip()}"
           for i, line in enumerate(section.split("\n")) for n in unmarked(line)]
    assert not bad, ("decimals in README's 'Results so far' without a <!-- fig FILE.json KEY --> marker "
                     "(copy them from benchmarks/results/, never retype them):\n" + "\n".join(bad))


def test_unmarked_finds_figures_not_names():
    assert unmarked("features 35.9x faster, at 1.11x; (-0.8 points), 0.95-1.12 tokens, 3,300.5 s") == [
        "35.9", "1.11", "0.8", "0.95", "1.12", "3,300.5"]
    assert unmarked("Llama-3.2-1B shapes, torch 2.13.0+cpu, v1.2, SmolLM2-135M, 240 prompts") == []
    assert unmarked("<!-- fig a.json b -->**34.9x** and <!-- an editor's note: 1.5 -->") == []


def test_checker_catches_a_drifted_figure_and_write_copies_it(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps(
        {"ratios": {"speedup": 34.89223944591201}, "archs": {"llama-3.2-1b": {"x": 1.2599}},
         "acc": [{"mean": 0.225}], "t": {"a": {"n": 1500}, "b": {"n": 1800}}}))
    doc = tmp_path / "doc.md"
    doc.write_text("- features <!-- fig run.json ratios.speedup -->**35.9x** faster,\n"
                   "  at <!-- fig run.json archs.llama-3.2-1b.x -->1.26x a step,\n"
                   "  scoring <!-- fig run.json acc.0.mean *100 -->22.5% over "
                   "<!-- fig run.json t.*.n -->3,300 inputs\n")
    figs = figures.figures(doc, results=tmp_path)
    assert [f.ok for f in figs] == [False, True, True, True]
    assert "doc.md:1: 35.9" in str(figs[0]) and "JSON 34.9" in str(figs[0])

    assert figures.write(doc, results=tmp_path) == 1
    assert "-->**34.9x** faster" in doc.read_text()
    assert all(f.ok for f in figures.figures(doc, results=tmp_path))


def test_checker_reports_missing_keys_files_and_broken_markers(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"ratios": {"speedup": 34.9}, "name": "x"}))
    doc = tmp_path / "doc.md"
    doc.write_text("a <!-- fig run.json ratios.speed -->34.9x, b <!-- fig gone.json ratios.speedup -->34.9x,\n"
                   "c <!-- fig run.json name -->1, d <!-- fig run.json\n"
                   "<!-- fig run.json ratios.speedup -->34.9x starts a line and ends the paragraph\n")
    errors = [f.error for f in figures.figures(doc, results=tmp_path)]
    assert len(errors) == 5 and all(errors), errors
    assert "'speed' not among ['speedup']" in errors[0]
    assert "gone.json" in errors[1] and "not a number" in errors[2]
    assert "not a figure" in errors[3] and "starts a line" in errors[4]
    assert figures.main(["--check", str(doc)]) == 1
