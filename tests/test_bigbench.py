"""bigbench-mix: the BIG-bench mixture with BBH held out, built from a small fake sdist tree
(the real one is 358 MB and never downloaded in tests)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from elrea import bigbench
from elrea.data import load_records
from elrea.errors import ConfigError, DataError, ElreaError
from elrea.tasks import checker, exported_mixture

ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks"
SHARED = "The trophy does not fit in the suitcase. What is too big?"   # in a BBH task and a training task


def _mc(task_prefix, rows, **extra):
    return {"name": "x", "metrics": ["multiple_choice_grade"], "task_prefix": task_prefix, **extra,
            "examples": [{"input": q, "target_scores": {o: int(o == a) for o in opts}} for q, opts, a in rows]}


def _gen(rows, metrics=("exact_str_match",)):
    return {"name": "x", "metrics": list(metrics), "examples": [{"input": q, "target": a} for q, a in rows]}


def fake_tasks() -> dict[str, dict]:
    """relative path under benchmark_tasks -> task JSON."""
    n = 60
    return {
        "add/task.json": _gen([(f"What is {i} plus {i + 1}?", [str(2 * i + 1), f"{2 * i + 1}.0"]) for i in range(n)]),
        "reverse/task.json": _gen([(f"Reverse the word w{i}ord.", f"drow{i}") for i in range(n)]),
        "yesno/task.json": _mc("Answer the question.", [(f"Is {i} even?", ["yes", "no"], "yes" if i % 2 == 0 else "no")
                                                        for i in range(n)] + [(SHARED, ["yes", "no"], "no")]),
        "colors/task.json": _mc("", [(f"Which color is item {i}?", ["red", "green", "blue"], ["red", "green", "blue"][i % 3])
                                     for i in range(n)]),
        "bleu_only/task.json": _gen([(f"Summarise text {i}.", f"summary {i}") for i in range(n)], metrics=["bleu"]),
        "empty/task.json": {"name": "empty", "metrics": ["exact_str_match"], "examples": []},
        # BBH tasks: one multiple choice, one with subtasks, one generative
        "sports_understanding/task.json": _mc("Plausible?", [(f"Player {i} scored a touchdown.", ["plausible", "implausible"],
                                                              "plausible") for i in range(30)]
                                              + [(SHARED, ["plausible", "implausible"], "implausible")]),
        "logical_deduction/task.json": {"name": "ld", "metrics": ["multiple_choice_grade"], "subtasks": ["three_objects"]},
        "logical_deduction/three_objects/task.json": _mc("", [(f"Order {i}: which is first?", ["A", "B", "C"], "B")
                                                              for i in range(20)]),
        "logical_deduction/five_objects/task.json": _mc("", [(f"Five {i}: which is first?", ["A", "B", "C", "D", "E"], "E")
                                                             for i in range(20)]),
        "word_sorting/task.json": _gen([(f"Sort: zeta alpha {i}", f"{i} alpha zeta") for i in range(30)]),
        "dyck_languages/task.json": _mc("Close it.", [(f"{'[' * (i % 5 + 1)}", [("]" * k) for k in range(1, 13)],
                                                       "]" * (i % 5 + 1)) for i in range(30)]),
    }


def write_tree(root: Path) -> Path:
    for rel, spec in fake_tasks().items():
        p = root / ROOT / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(spec))
    (root / "bigbench-1.0.0" / "setup.py").write_text("# not read\n")
    return root / "bigbench-1.0.0"


def write_sdist(path: Path, tree: Path) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        tar.add(tree, arcname="bigbench-1.0.0")
    return path


@pytest.fixture()
def tree(tmp_path):
    return write_tree(tmp_path / "src")


SMALL = dict(n_tasks=3, train=20, validation=3, test=6, bbh=10, seed=0)


def rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_formats_and_task_selection(tree):
    tasks = bigbench.read_tasks(tree)
    assert "bleu_only" not in tasks and "empty" not in tasks          # not exact-match scorable
    assert set(tasks) == {"add", "reverse", "yesno", "colors", "sports_understanding", "logical_deduction",
                          "word_sorting", "dyck_languages"}
    assert len(tasks["logical_deduction"].records) == 40             # its subtasks, merged
    mc = next(r for r in tasks["yesno"].records if r["instruction"].startswith("Answer the question.\n\nIs 3 even?"))
    assert mc["instruction"].endswith("Options:\n- yes\n- no") and mc["response"] == "no" and mc["references"] == ["no"]
    gen = tasks["add"].records[4]
    assert gen == {"instruction": "What is 4 plus 5?", "response": "9", "references": ["9", "9.0"],
                   "text": "What is 4 plus 5?"}
    dyck = tasks["dyck_languages"].records[2]                        # 12 options: generated, not listed
    assert "Options" not in dyck["instruction"] and dyck["response"] == "]]]"


def test_bbh_is_held_out_and_splits_are_disjoint(tree, tmp_path):
    paths = bigbench.export(tmp_path / "out", tree, include=["add", "yesno", "colors"], **{
        k: v for k, v in SMALL.items() if k != "n_tasks"})
    split = {s: rows(p) for s, p in paths.items()}
    bbh_names = set(bigbench.BBH_TASKS)
    train_sources = {r["source"] for s in ("train", "validation", "test") for r in split[s]}
    assert train_sources == {"add", "yesno", "colors"} and not train_sources & bbh_names
    assert {r["source"] for r in split["bbh"]} == {"sports_understanding", "logical_deduction", "word_sorting",
                                                   "dyck_languages"}
    assert any(SHARED in r["instruction"] for r in split["bbh"])
    for s in ("train", "validation", "test"):
        assert not any(SHARED in r["instruction"] for r in split[s])   # the shared input was dropped
    note = json.loads((tmp_path / "out" / "mixture.json").read_text())
    assert note["bbh_inputs_dropped"]["yesno"] == 1
    inputs = {s: {r["instruction"] for r in split[s]} for s in ("train", "validation", "test")}
    assert not inputs["train"] & inputs["test"] and not inputs["train"] & inputs["validation"]
    per_task = {t: sum(r["source"] == t for r in split["train"]) for t in ("add", "yesno", "colors")}
    assert all(0 < n <= 20 for n in per_task.values())
    assert sum(r["source"] == "logical_deduction" for r in split["bbh"]) == 10
    assert "dropped: input also in BBH" in (tmp_path / "out" / "README.md").read_text()


def test_tarball_and_folder_give_the_same_files(tree, tmp_path):
    sdist = write_sdist(tmp_path / bigbench.SDIST, tree)
    a = bigbench.export(tmp_path / "a", tree, **SMALL)
    b = bigbench.export(tmp_path / "b", sdist, **SMALL)
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
    assert len(json.loads((tmp_path / "a" / "mixture.json").read_text())["tasks"]) == 3


def test_auto_checker_accepts_every_reference(tree, tmp_path):
    paths = bigbench.export(tmp_path / "out", tree, include=["add"], train=10, validation=2, test=5, bbh=2)
    assert exported_mixture(paths["test"]) == "bigbench-mix" and exported_mixture(paths["bbh"]) == "bigbench-mix"
    check = checker("auto", paths["test"])
    rec = load_records(paths["test"])[0]
    assert rec.references and rec.references[0] == rec.response
    assert check(rec.source, rec.references[1], rec) and check(rec.source, rec.response + ".", rec)
    assert not check(rec.source, "wrong", rec)


def test_bad_requests_say_what_to_do(tree, tmp_path):
    with pytest.raises(ConfigError, match="held out"):
        bigbench.export(tmp_path / "o", tree, include=["sports_understanding"])
    with pytest.raises(ConfigError, match="usable: add, colors"):
        bigbench.export(tmp_path / "o", tree, include=["nope"])
    with pytest.raises(ConfigError, match="only 4 non-BBH tasks"):
        bigbench.export(tmp_path / "o", tree, n_tasks=5, train=10, validation=1, test=1)
    with pytest.raises(ConfigError, match="not found"):
        bigbench.locate(tmp_path / "missing.tar.gz")
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="bad.tar.gz: not a readable BIG-bench sdist"):
        bigbench.read_tasks(bad)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no benchmark_tasks"):
        bigbench.read_tasks(tmp_path / "empty")
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.jsonl"))


def _index(tmp_path, sdist: Path, sha: str) -> str:
    page = tmp_path / "index" / "bigbench"
    page.mkdir(parents=True)
    (page / "index.html").write_text(f'<a href="{sdist.as_uri()}#sha256={sha}">{sdist.name}</a><br/>\n')
    return (tmp_path / "index").as_uri()


def test_fetch_from_an_index_checks_the_hash(tree, tmp_path, monkeypatch):
    sdist = write_sdist(tmp_path / bigbench.SDIST, tree)
    sha = hashlib.sha256(sdist.read_bytes()).hexdigest()
    target = tmp_path / "cache" / bigbench.SDIST
    monkeypatch.setattr(bigbench, "SDIST_SHA256", "0" * 64)
    with pytest.raises(ElreaError, match="not the pinned"):
        bigbench.fetch(target, _index(tmp_path / "one", sdist, sha))
    assert not target.exists() and not list(target.parent.glob("*.part"))
    monkeypatch.setattr(bigbench, "SDIST_SHA256", sha)
    assert bigbench.fetch(target, _index(tmp_path / "two", sdist, sha)).read_bytes() == sdist.read_bytes()


def test_cli_export(tree, tmp_path):
    env_out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "elrea.cli", "data", "export", "bigbench-mix", "--out", str(env_out), "--bigbench", str(tree),
           "--tasks", "2", "--train", "10", "--validation", "2", "--test", "4", "--bbh", "3"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "bbh:" in done.stdout and len(rows(env_out / "bbh.jsonl")) == 3 * 4
    bad = subprocess.run([sys.executable, "-m", "elrea.cli", "data", "export", "toy", "--out", str(tmp_path / "t"),
                          "--bbh", "3"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--bbh: only for bigbench-mix" in bad.stderr and "Traceback" not in bad.stderr
    bad = subprocess.run(cmd[:-2] + ["--task", "sports_understanding"], capture_output=True, text=True)
    assert bad.returncode == 2 and "held out" in bad.stderr and "Traceback" not in bad.stderr


def test_quality_benchmark_keeps_the_named_tasks(tree, tmp_path, monkeypatch, capsys):
    """benchmarks/quality.py --task NAME: a smaller run on a larger run's tasks. The mixture is
    exported before the compare starts (here refused at once: 20 records are too few to cluster)."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import quality

    args = ["--mixture", "bigbench-mix", "--bigbench", str(tree), "--train", "10", "--validation", "2", "--test", "4",
            "--bbh", "3", "--work", str(tmp_path / "w")]
    with pytest.raises(SystemExit) as done:
        quality.main(args + ["--task", "colors", "--task", "reverse"])
    assert done.value.code == 2 and "cannot form 2 clusters" in capsys.readouterr().err
    assert {r["source"] for r in rows(tmp_path / "w" / "data" / "train.jsonl")} == {"colors", "reverse"}
    with pytest.raises(SystemExit) as bad:
        quality.main(args + ["--task", "nope"])
    assert "--task nope" in str(bad.value.code)                       # a message, not a traceback
