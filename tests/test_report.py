"""report.md and its pictures (elrea.report), on a fitted run with a made-up evaluation: what each
picture shows, its axes and names, and that report.md links every one."""

import shutil

import numpy as np

from elrea import evaluation, report


def _evaluation(adapters: int) -> dict:
    rng = np.random.default_rng(0)
    rows = []
    for i, source in enumerate(["add"] * 3 + ["rev"] * 2):
        w = rng.dirichlet(np.ones(adapters)).tolist()
        rows.append({"source": source, "prompt": f"p{i}", "elrea": i % 2 == 0, "base": i == 1, "weights": w})
    return {"accuracy": evaluation.accuracy_table(rows, ["elrea", "base"]), "examples": rows}


def test_report_pictures_are_labelled_named_after_the_adapters_and_linked(fitted_run, tmp_path, monkeypatch):
    from elrea.rundir import Run

    run = Run(tmp_path / "run")
    shutil.copytree(fitted_run, run.root)
    C = len(set(run.labels().tolist()))
    adapters = ["base"] + [f"expert_{c}" for c in range(1, C + 1)]
    figures = {}
    save = report._save

    def keep(fig, path):  # what each picture shows, read before it is closed
        figures[path.name] = [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title(),
                               [t.get_text() for t in (ax.get_legend().get_texts() if ax.get_legend() else [])],
                               [t.get_text() for t in ax.get_xticklabels()],
                               [t.get_text() for t in ax.get_yticklabels()]) for ax in fig.axes]
        save(fig, path)

    monkeypatch.setattr(report, "_save", keep)
    sources = ["add" if i % 2 else "rev" for i in range(len(run.labels()))]
    md = report.write_report(run, _evaluation(len(adapters)), adapters, sources).read_text()
    for png in ("accuracy.png", "features.png", "cluster_source.png", "routing.png"):
        assert run.picture(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png
        assert f"](report/{png})" in md, png
    # accuracy: one bar group per source (with its test count) and overall, one bar colour per method
    (xlabel, ylabel, _, legend, ticks, _), = figures["accuracy.png"]
    assert ylabel == "exact-match accuracy (%)" and legend == ["elrea", "base"]
    assert ticks == ["add\n(n=3)", "rev\n(n=2)", "overall\n(n=5)"]
    assert "| method | add (n=3) | rev (n=2) | mean over sources | overall (n=5) |" in md
    # PCA axes say which component and how much variance it holds; clusters are named as adapters
    by_cluster, by_source = figures["features.png"]
    for ax in (by_cluster, by_source):
        assert ax[0].startswith("PC1 (") and ax[0].endswith("% of variance)") and ax[1].startswith("PC2 (")
    assert by_cluster[3] == [f"expert_{c}" for c in range(1, C + 1)]
    assert sorted(by_source[3]) == ["add", "rev"]
    assert figures["cluster_source.png"][0][5] == adapters[1:]  # rows: the experts, by their adapters' names
    assert figures["routing.png"][0][5] == adapters
