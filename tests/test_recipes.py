"""The paper's recipes (paper-math, less-mix) read from a local folder in the hub's layout (the
hub is unreachable here), the math-equivalence check, and the shipped configs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from elrea import recipes
from elrea.config import load_config
from elrea.data import load_records
from elrea.errors import DataError
from elrea.recipes import final_answer, math_equal
from elrea.tasks import checker, exported_mixture


def _parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    for split, n in (("train", 30), ("test", 6)):
        _parquet(root / "openai/gsm8k/main" / f"{split}-00000-of-00001.parquet",
                 [{"question": f"Tom has {i} apples and buys {i + 2} more. How many? ({split})",
                   "answer": f"He has {i} + {i + 2} = <<{i}+{i + 2}={2 * i + 2}>>{2 * i + 2} apples.\n#### {2 * i + 2}"}
                  for i in range(n)])
        for subject in recipes.MATH_SUBJECTS:
            _parquet(root / "EleutherAI/hendrycks_math" / subject / f"{split}-00000-of-00001.parquet",
                     [{"problem": f"{subject}: what is $\\frac{{{i}}}{{2}}$ doubled? ({split})", "level": "Level 1",
                       "type": subject, "solution": f"Doubling gives $\\boxed{{{i}}}$."} for i in range(4)])
        _parquet(root / "ChilleD/SVAMP/data" / f"{split}-00000-of-00001.parquet",
                 [{"ID": f"s{i}", "Body": f"There are {i} birds.", "Question": f"If {i} more come, how many? ({split})",
                   "Equation": f"( {i}.0 + {i}.0 )", "Answer": float(2 * i), "Type": "Addition"} for i in range(n)])
        _parquet(root / "allenai/math_qa/default" / split / "0000.parquet",
                 [{"Problem": f"what is {i} times 3 ? ({split})", "Rationale": f"\"{i} * 3 = {3 * i}\"",
                   "options": f"a ) {3 * i} , b ) {3 * i + 1} , c ) 7 , d ) 8 , e ) none", "correct": "a",
                   "annotated_formula": "", "linear_formula": "", "category": "general"} for i in range(n)])
    for part in recipes.LESS_PARTS:
        p = root / "princeton-nlp/less_data/train/processed" / part / f"{part}_data.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("".join(json.dumps({"dataset": part, "id": f"{part}_{i}", "messages": [
            {"role": "user", "content": f"{part} question {i}"}, {"role": "assistant", "content": f"answer {i}"}]}) + "\n"
            for i in range(40)))
    return root


@pytest.mark.parametrize("pred, ref, same", [
    ("so the answer is $\\boxed{\\frac{1}{2}}$", "#### 0.5", True),
    ("The answer is 1,000.", "He paid 1000 dollars.\n#### 1000", True),
    ("x = 3", "\\boxed{3}", True),
    ("\\boxed{\\dfrac{3}{4}}", "\\boxed{\\frac34}", True),
    ("The answer is 12.", "#### 13", False),
    ("\\boxed{x^2+1}", "\\boxed{x^2 + 1}", True),
    ("\\boxed{\\text{(B)}}", "The answer is (B).", True),
])
def test_math_equal(pred, ref, same):
    assert math_equal(pred, ref) is same


def test_final_answer_takes_the_last_balanced_box():
    assert final_answer("first \\boxed{1}, then \\boxed{\\frac{a}{b}} done") == "\\frac{a}{b}"


def test_paper_math_from_a_local_hub_copy(hub, tmp_path):
    paths = recipes.export("paper-math", tmp_path / "pm", train=20, validation=2, test=5, hub_dir=hub)
    rows = {s: [json.loads(x) for x in p.read_text().splitlines()] for s, p in paths.items()}
    assert {r["source"] for r in rows["train"]} == {"gsm8k", "math", "svamp", "mathqa"}
    assert sum(r["source"] == "math" for r in rows["test"]) == 5             # from MATH's own test split
    assert all("(test)" in r["instruction"] for r in rows["test"])
    assert not any("(test)" in r["instruction"] for r in rows["train"] + rows["validation"])
    train_q = {r["instruction"] for r in rows["train"]}
    assert not train_q & {r["instruction"] for r in rows["validation"]}
    g = next(r for r in rows["train"] if r["source"] == "gsm8k")
    assert g["response"].endswith(f"The answer is {g['references'][0]}.") and "####" not in g["response"]
    q = next(r for r in rows["train"] if r["source"] == "mathqa")
    assert "Options:\n(a)" in q["instruction"] and q["references"][1] == "(a)"
    # checker "auto" knows the files, and compares final answers
    assert exported_mixture(paths["test"]) == "paper-math"
    check = checker("auto", paths["test"])
    rec = next(r for r in load_records(paths["test"]) if r.source == "svamp")
    assert check(rec.source, f"so it is {rec.references[0]}.0 birds. The answer is {rec.references[0]}.", rec)
    assert not check(rec.source, "The answer is 12345.", rec)
    note = json.loads((tmp_path / "pm" / "mixture.json").read_text())
    assert note["lm_eval_tasks"] == ["gsm8k", "minerva_math"] and note["config"].endswith("paper-math.yaml")


def test_less_mix_from_a_local_hub_copy(hub, tmp_path):
    paths = recipes.export("less-mix", tmp_path / "lm", train=None, validation=10, test=10, hub_dir=hub)
    recs = {s: load_records(p) for s, p in paths.items()}
    assert {r.source for r in recs["train"]} == set(recipes.LESS_PARTS)
    assert all(r.messages[-1]["role"] == "user" and r.response.startswith("answer") for r in recs["train"])
    seen = {s: {r.instruction + (r.source or "") for r in v} for s, v in recs.items()}
    assert not seen["train"] & seen["test"] and not seen["train"] & seen["validation"]
    assert sum(len(v) for v in recs.values()) == 4 * 40
    assert json.loads((tmp_path / "lm" / "mixture.json").read_text())["lm_eval_tasks"] == ["mmlu", "bbh"]


@pytest.mark.parametrize("name", ["paper-math", "less-mix"])
def test_the_papers_settings_ship_as_configs(name):
    cfg = load_config(str(recipes.config_path(name)), [])
    assert (cfg.model.name, cfg.model.quantization, cfg.lora.rank, cfg.lora.target_modules) == \
        ("google/gemma-2b-it", "4bit", 8, "all-linear")
    assert (cfg.base.lr, cfg.experts.lr, cfg.base.epochs, cfg.data.max_length, cfg.features.dim) == \
        (5e-5, 2e-5, 2, 2048, 8192)
    assert cfg.features.center is False and load_config(None, []).features.center is True  # the paper's, not ours


def test_a_missing_source_says_where_it_was_looked_for(hub, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="--hub-dir DIR with DIR/openai/gsm8k/"):
        recipes.build("paper-math", 1, 1, 1, hub_dir=empty)
    r = subprocess.run([sys.executable, "-m", "elrea.cli", "data", "export", "less-mix", "--out", str(tmp_path / "o"),
                        "--hub-dir", str(empty)], capture_output=True, text=True)
    assert r.returncode == 2 and "princeton-nlp/less_data/train/processed/flan_v2" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "elrea.cli", "data", "export", "toy", "--out", str(tmp_path / "t"),
                        "--hub-dir", str(hub)], capture_output=True, text=True)
    assert r.returncode == 2 and "--hub-dir: only for paper-math and less-mix" in r.stderr
