"""`elrea compare` end to end on the tiny model: every method, choices on validation, paired
intervals, report and pictures, resuming, and user mistakes."""

import json
import os
import subprocess
import sys

import pytest

FAST = ["base.epochs=2", "experts.epochs=1", "base.lr=2e-3", "experts.lr=2e-3", "features.dim=512",
        "clustering.min_cluster_size=4", "base.micro_batch_size=8", "experts.micro_batch_size=8",
        "generation.max_new_tokens=6", "clustering.num_clusters=4"]


def _best_on_validation(trials: list[dict]) -> dict:
    """The trial compare must pick, written out: the most accurate (to 1e-9, so that equally many
    right answers tie), then the fewest experts (top_k 0 is all of them), then the first."""
    top = max(round(t["validation"], 9) for t in trials)
    tied = [t for t in trials if round(t["validation"], 9) == top]
    fewest = min(t["top_k"] or float("inf") for t in tied)
    return next(t for t in tied if (t["top_k"] or float("inf")) == fewest)


def test_validation_ties_go_to_the_cheaper_ensemble_not_to_rounding():
    from types import SimpleNamespace

    from elrea.compare.runner import _choose
    from elrea.compare.stats import accuracy

    # 20 validation prompts in two tasks; two routings with 3 answers right each (1 + 2 and 0 + 3),
    # whose means over the tasks come out 1 ulp apart
    records = [SimpleNamespace(source=s) for s in "a" * 10 + "b" * 10]
    right = lambda a, b: [1] * a + [0] * (10 - a) + [1] * b + [0] * (10 - b)  # noqa: E731
    trial = lambda router, tau, k, v: {"run": "elrea", "router": router, "tau": tau, "top_k": k, "validation": v}  # noqa: E731
    noisy = [trial("gradient", 2.0, 0, accuracy(records, right(1, 2))["mean"]),
             trial("gradient", 1.0, 1, accuracy(records, right(0, 3))["mean"])]
    assert noisy[0]["validation"] > noisy[1]["validation"]   # the noise is there ...
    chosen = _choose(noisy, ["gradient"])["gradient"]
    assert (chosen["tau"], chosen["top_k"]) == (1.0, 1)      # ... and a tie is a tie: top-1, the cheaper
    assert chosen is _best_on_validation(noisy)
    # on a tie of cost, the first trial (lower temperature); a better score wins at any cost
    flat = [trial("learned", 1.0, 0, 0.3), trial("learned", 2.0, 0, 0.3), trial("learned", 2.0, 2, 0.3 - 1e-3)]
    assert _choose(flat, ["learned"])["learned"]["tau"] == 1.0
    flat.append(trial("learned", 1.0, 1, 0.2))
    assert _choose(flat, ["learned"])["learned"]["top_k"] == 0


def _compare(*args, timeout=900):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "elrea.cli", "compare", "-q", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, env=env)


@pytest.mark.slow
def test_compare_on_users_files(tmp_path, tiny_model_dir, toy_data):
    out = tmp_path / "cmp"
    from elrea.tasks import make_toy_records

    held = tmp_path / "held.jsonl"    # a second test file: its own table and intervals
    held.write_text("".join(json.dumps(r) + "\n" for r in make_toy_records(8, seed=11)))
    args = ["--model", tiny_model_dir, "--data", toy_data / "train.jsonl", "--test", toy_data / "test.jsonl", held,
            "--out", out, *FAST, "--routers", "gradient", "learned",
            "--tau-grid", "1", "2", "--cluster-settings", "clustering.signal=full"]
    r = _compare(*args)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "carved" in r.stderr and "vs lora-matched" in r.stdout
    rep = json.loads((out / "compare.json").read_text())
    assert rep["data"]["validation_carved"] and rep["data"]["examples"]["train"] + \
        rep["data"]["examples"]["validation"] == 64
    assert set(rep["accuracy"]) == {"elrea-gradient", "elrea-gradient-top1", "elrea-gradient-top2", "elrea-learned",
                                    "elrea-learned-top1", "elrea-learned-top2", "lora", "lora-matched", "uniform",
                                    "random", "source", "elrea-half", "arrow"}
    b = rep["budget"]["methods"]   # accuracy against training compute
    assert b["lora-matched"]["steps"] == rep["compute_matched_steps"] == b["elrea-gradient"]["steps"]
    assert b["lora"]["steps"] < b["lora-matched"]["steps"] and b["elrea-half"]["steps"] < b[rep["budget"]["elrea"]]["steps"]
    assert all(v["seconds_per_prompt"] > 0 and v["test_mean"] == rep["accuracy"][m]["mean"] for m, v in b.items())
    assert (out / "budget.png").stat().st_size > 1000
    # tokens seen, as Trainer counted them: ELREA's experts split the data and each ran one epoch
    # of its share, its base adapter two epochs of all of it, as `lora` did
    assert 2 * b["elrea-gradient"]["tokens"] == 3 * b["lora"]["tokens"] > 0
    assert b["lora"]["tokens"] < b["lora-matched"]["tokens"] and \
        b["elrea-half"]["tokens"] < b[rep["budget"]["elrea"]]["tokens"]
    assert "tokens seen (M)" in r.stdout
    for t in rep["trials"]:   # top-2 ran at the temperature best for all experts of its run and router
        if t["top_k"] == 2:
            full = [u for u in rep["trials"] if (u["run"], u["router"], u["top_k"]) == (t["run"], t["router"], 0)]
            assert t["tau"] == _best_on_validation(full)["tau"]
    # every choice was made on validation: the chosen setting is the best validation trial
    for router, c in rep["chosen"].items():
        best = _best_on_validation([t for t in rep["trials"] if t["router"] == router])
        assert (c["run"], c["tau"], c["top_k"]) == (best["run"], best["tau"], best["top_k"])
    assert {t["run"] for t in rep["trials"]} == {"elrea", "elrea-center_false"}   # the default candidates
    ref = rep["accuracy"]["lora-matched"]
    for m, v in rep["versus_lora_matched"].items():
        acc = rep["accuracy"][m]
        assert len(acc["correct"]) == len(ref["correct"]) == 12
        assert abs(v["points"] - 100 * (acc["mean"] - ref["mean"])) < 1e-6
        assert v["ci95"][0] - 1e-9 <= v["points"] <= v["ci95"][1] + 1e-9
    # and against one LoRA at the config's epochs (the paper's comparison), paired the same way
    assert set(rep["versus_lora"]) == set(rep["accuracy"]) - {"lora"}
    assert rep["versus_lora"]["lora-matched"]["points"] == pytest.approx(-rep["versus_lora_matched"]["lora"]["points"])
    for m, v in rep["versus_lora"].items():
        assert abs(v["points"] - 100 * (rep["accuracy"][m]["mean"] - rep["accuracy"]["lora"]["mean"])) < 1e-6
    cl = rep["clusterings"]
    assert cl["source"]["ari"] == 1.0 and cl["elrea"]["centered"] and not cl["elrea-center_false"]["centered"] \
        and cl["clusters-signal_full"]["signal"] == "full"
    assert sum(cl["random"]["sizes"]) == sum(cl["elrea"]["sizes"]) == 56
    rc = rep["routing_cost"]
    assert set(rc["routers"]) == {"gradient", "learned"} and rc["ms_per_decoded_token_batch1"] > 0
    # the compute-matched LoRA trained as many steps as ELREA's base adapter and experts
    runs = out / "runs"
    m = json.loads((runs / "elrea" / "elrea.json").read_text())["stages"]
    steps = m["base"]["steps"] + sum(e["steps"] for e in m["experts"]["finished"].values())
    assert rep["compute_matched_steps"] == steps
    assert json.loads((runs / "lora-matched" / "elrea.json").read_text())["stages"]["base"]["steps"] == steps
    # baselines shared ELREA's base adapter instead of training their own
    fp = lambda run: json.loads((runs / run / "elrea.json").read_text())["stages"]["base"]["fingerprint"]  # noqa: E731
    assert fp("random") == fp("source") == fp("elrea-center_false") == fp("elrea")
    # the headline came first: the chosen ELREA, lora and lora-matched on every test file, written
    # before any other baseline began training, with the numbers compare.json gives them
    head = json.loads((out / "headline.json").read_text())
    best = rep["budget"]["elrea"]
    assert head["methods"] == [best, "lora", "lora-matched"] and set(head["files"]) == {"test", "held"}
    for name, acc, versus in [("test", rep["accuracy"], rep["versus_lora_matched"]),
                              ("held", rep["held_out"]["held"]["accuracy"], rep["held_out"]["held"]["versus_lora_matched"])]:
        f = head["files"][name]
        assert f["accuracy"] == {m: acc[m]["mean"] for m in head["methods"]}
        assert f["per_source"] == {m: acc[m]["per_source"] for m in head["methods"]}
        assert f["versus_lora_matched"] == {m: versus[m] for m in (best, "lora")}
        assert f["versus_lora"] == {m: (rep if name == "test" else rep["held_out"]["held"])["versus_lora"][m]
                                    for m in (best, "lora-matched")}
    later = min(p.stat().st_mtime for p in (runs / "random" / "experts").rglob("*") if p.is_file())  # trained there
    assert (out / "headline.json").stat().st_mtime < later
    h = rep["held_out"]["held"]
    assert h["examples"] == 8 and set(h["accuracy"]) == set(rep["accuracy"])
    assert all(len(a["correct"]) == 8 for a in h["accuracy"].values()) and set(h["versus_lora_matched"]) == \
        set(rep["versus_lora_matched"])
    assert (out / "evals" / "test-held-lora.json").exists() and "accuracy on held (%)" in r.stdout
    report = (out / "report.md").read_text()
    assert "## Accuracy on held (%), held out" in report and "vs lora (95% CI)" in report
    assert "![accuracy](accuracy.png)" in report and (out / "accuracy.png").stat().st_size > 1000
    assert (out / "per_source.png").exists()

    # a run trained before elrea counted tokens: the count computed from its data is Trainer's
    import shutil

    from elrea.pipeline import trained_tokens

    counted = trained_tokens(runs / "elrea", rep["data"]["train"])
    legacy = shutil.copytree(runs / "elrea", tmp_path / "legacy")
    man = json.loads((legacy / "elrea.json").read_text())
    for summary in [man["stages"]["base"], *man["stages"]["experts"]["finished"].values()]:
        del summary["tokens"]
    (legacy / "elrea.json").write_text(json.dumps(man))
    assert trained_tokens(legacy, rep["data"]["train"]) == counted

    # random and source: the chosen run's full gradient ensemble at the temperature chosen for it
    mine = [t for t in rep["trials"] if t["run"] == rep["elrea"]["run"] and t["router"] == "gradient"
            and t["top_k"] == 0]
    for name in ("random", "source"):
        how = json.loads((out / "evals" / f"test-{name}.json").read_text())["how"]
        assert how == {"router": "gradient", "tau": _best_on_validation(mine)["tau"], "top_k": 0}

    # resuming: nothing is fitted or decoded again (a cluster setting's own features neither:
    # only the base adapter is shared with it), and the result is the same
    before = {p: p.stat().st_mtime for p in (out / "evals").iterdir()}
    full = runs / "clusters-signal_full" / "features" / "train.npy"
    full_before = full.stat().st_mtime
    r2 = _compare(*args)
    assert r2.returncode == 0, r2.stderr[-4000:]
    assert {p: p.stat().st_mtime for p in (out / "evals").iterdir()} == before
    assert full.stat().st_mtime == full_before
    assert "changed since the last run" not in r2.stderr
    again = json.loads((out / "compare.json").read_text())
    assert again["accuracy"] == rep["accuracy"]


def test_compare_user_mistakes_are_one_line_errors(tmp_path, toy_data):
    r = _compare("--data", toy_data / "train.jsonl", "--test", tmp_path / "missing.jsonl", "--out", tmp_path / "o")
    assert r.returncode != 0 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
    r = _compare("--data", toy_data / "train.jsonl", "--test", toy_data / "test.jsonl", "--out", tmp_path / "o",
                 "routing.router=nearest")
    assert r.returncode != 0 and "routing.router" in r.stderr and "Traceback" not in r.stderr
    # a candidate that sets a field to its default is the first candidate again
    r = _compare("--data", toy_data / "train.jsonl", "--test", toy_data / "test.jsonl", "--out", tmp_path / "o",
                 "--candidates", "", "base.epochs=2")
    assert r.returncode != 0 and "'base.epochs=2' and '' give the same run" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()
