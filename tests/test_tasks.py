"""Built-in mixtures: disjoint deterministic splits, short records, answer checking."""

from __future__ import annotations

import json
import sys

import pytest

from elrea.errors import ElreaError
from elrea.tasks import MIXTURES, check_answer, export_mixture, make_split

try:
    import reasoning_gym  # noqa: F401
    HAVE_GYM = True
except ImportError:
    HAVE_GYM = False
needs_gym = pytest.mark.skipif(not HAVE_GYM, reason="reasoning-gym is not installed")

SIZES = {"train": 48, "validation": 16, "test": 24}


@pytest.fixture(scope="module",
                params=[pytest.param("reasoning-mix", marks=needs_gym),
                        pytest.param("conflict-mix", marks=needs_gym), "toy"])
def splits(request):
    name = request.param
    return name, {s: make_split(name, s, n, seed=3) for s, n in SIZES.items()}


def _wrong(response: str) -> str:
    try:
        return str(int(response) + 1)
    except ValueError:
        return response + "zz"


def test_sizes_keys_and_short_records(splits):
    name, rows = splits
    for split, n in SIZES.items():
        assert len(rows[split]) == n
        for r in rows[split]:
            assert set(r) == {"id", "instruction", "response", "source"}
            assert all(isinstance(r[k], str) and r[k].strip() for k in r)
            assert len(r["instruction"]) < 300, r
            assert r["source"] in MIXTURES[name]
    ids = [r["id"] for split_rows in rows.values() for r in split_rows]
    assert len(set(ids)) == len(ids)


def test_splits_are_disjoint(splits):
    _, rows = splits
    sets = {s: {r["instruction"] for r in rs} for s, rs in rows.items()}
    assert len(sets["train"]) == SIZES["train"]          # unique within a split too
    assert not sets["train"] & sets["validation"]
    assert not sets["train"] & sets["test"]
    assert not sets["validation"] & sets["test"]


def test_every_source_in_train_balanced(splits):
    name, rows = splits
    counts = {s: sum(r["source"] == s for r in rows["train"]) for s in MIXTURES[name]}
    assert max(counts.values()) - min(counts.values()) <= 1
    assert min(counts.values()) >= 1


def test_check_answer_reference_and_wrong(splits):
    name, rows = splits
    seen = set()
    for r in rows["train"] + rows["test"]:
        assert check_answer(r["source"], r["response"], r), r
        assert check_answer(r["source"], f"  {r['response']}\n", r), r
        assert not check_answer(r["source"], _wrong(r["response"]), r), r
        seen.add(r["source"])
    assert seen == set(MIXTURES[name])


@needs_gym
def test_check_answer_uses_gym_scorer_leniency():
    def rec(response):
        return {"instruction": "", "response": response}

    assert check_answer("chain_sum", "1,000", rec("1000"))
    assert check_answer("word_sorting", "ab,cd,ef", rec("ab, cd, ef"))
    assert not check_answer("word_sorting", "cd, ab, ef", rec("ab, cd, ef"))
    # reasoning-gym's spell_backward scorer gives 1.0000000000000002 to this (float rounding)
    assert not check_answer("spell_backward", "abcdefghiz", rec("abcdefghi"))
    with pytest.raises(ElreaError):
        check_answer("nope", "1", {"instruction": "", "response": "1"})


@needs_gym
def test_export_is_deterministic_and_atomic(tmp_path):
    a = export_mixture("reasoning-mix", tmp_path / "a", train=24, validation=8, test=8, seed=1)
    b = export_mixture("reasoning-mix", tmp_path / "b", train=24, validation=8, test=8, seed=1)
    c = export_mixture("reasoning-mix", tmp_path / "c", train=24, validation=8, test=8, seed=2)
    assert set(a) == {"train", "validation", "test"}
    for split in a:
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()
        rows = [json.loads(line) for line in a[split].read_text(encoding="utf-8").splitlines()]
        assert len(rows) == {"train": 24, "validation": 8, "test": 8}[split]
    assert (tmp_path / "a" / "README.md").read_text(encoding="utf-8").count("seed 1") == 1
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [
        "README.md", "mixture.json", "test.jsonl", "train.jsonl", "validation.jsonl"]


def test_exported_files_load_as_records(tmp_path):
    from elrea.data import load_records

    paths = export_mixture("toy", tmp_path, train=8, validation=4, test=4)
    recs = load_records(paths["train"])
    assert len(recs) == 8 and {r.source for r in recs} == set(MIXTURES["toy"])


def test_bad_arguments():
    with pytest.raises(ElreaError):
        make_split("nope", "train", 4)
    with pytest.raises(ElreaError):
        make_split("toy", "dev", 4)
    assert make_split("reasoning-mix", "test", 0) == []


@needs_gym
def test_exhausted_source(caplog):
    with pytest.raises(ElreaError, match="distinct instructions"):
        make_split("reasoning-mix", "validation", 8 * 400)     # gcd has ~350 for validation
    rows = make_split("toy", "validation", 80)                 # toy repeats, with a warning
    assert len(rows) == 80 and "repeating" in caplog.text
    assert len({r["id"] for r in rows}) == 80


def test_missing_reasoning_gym_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)
    with pytest.raises(ElreaError, match="pip install reasoning-gym"):
        make_split("reasoning-mix", "train", 8, seed=11)


@needs_gym
def test_conflict_mix_pairs_share_the_input_and_oppose():
    """Each pair's instructions differ in one word, and the same input gets opposite answers."""
    rows = make_split("conflict-mix", "train", 64, seed=0)
    by = {}
    for r in rows:
        by.setdefault(r["source"], []).append(r)
    assert set(by) == set(MIXTURES["conflict-mix"]) and all(len(v) == 8 for v in by.values())
    words = lambda r: r["instruction"].split(": ", 1)[1].split(". ")[0].split(", ")   # noqa: E731
    for r in by["words_kept"]:
        assert r["response"].split(", ") == words(r)
    for r in by["words_reversed"]:
        assert r["response"].split(", ") == words(r)[::-1]
    for r in by["sort_ascending"]:
        assert r["response"].split(", ") == sorted(words(r))
    for r in by["sort_descending"]:
        assert r["response"].split(", ") == sorted(words(r), reverse=True)
    for r in by["spelled_forward"] + by["spelled_backward"]:
        word = r["instruction"].split('"')[1]
        assert r["response"] == (word if r["source"] == "spelled_forward" else word[::-1])
    # a pair's templates differ in exactly one word
    a, b = by["words_kept"][0], by["words_reversed"][0]
    assert a["instruction"].replace("the same", "reverse").split(":")[0] == b["instruction"].split(":")[0]
    # exact match only where the reasoning-gym scorer would apply the other rule
    assert not check_answer("spelled_forward", by["spelled_forward"][0]["response"][::-1] + "x",
                            by["spelled_forward"][0])


def test_checker_auto_applies_a_mixture_check_only_to_exported_files(tmp_path, monkeypatch):
    """Issue 14: a user's file whose `source` happens to be a built-in name is exact-matched;
    asking for a mixture's check without its package fails before any work."""
    from elrea.evaluation import exact_checker
    from elrea.tasks import checker, mixture_checker

    paths = export_mixture("toy", tmp_path / "toy", train=8, validation=4, test=4)
    assert checker("auto", paths["test"]) is mixture_checker
    mine = tmp_path / "mine" / "test.jsonl"
    mine.parent.mkdir()
    mine.write_text(json.dumps({"instruction": "Sort: b a", "response": "a b", "source": "word_sorting"}) + "\n")
    assert checker("auto", mine) is exact_checker
    assert checker("auto", None) is exact_checker
    monkeypatch.setitem(sys.modules, "reasoning_gym", None)   # not installed
    with pytest.raises(ElreaError, match="need reasoning-gym"):
        checker("reasoning-mix")
    assert checker("toy") is mixture_checker
