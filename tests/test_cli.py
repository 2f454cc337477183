"""End to end through the command line on the tiny model: fit, route, generate, eval, info."""

import json
import os
import subprocess
import sys

import pytest

from conftest import FAST


def elrea(*args, check=True):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, "-m", "elrea.cli", *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"elrea {args} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return r


@pytest.mark.slow
def test_fit_route_generate_eval_info(tmp_path, tiny_model_dir, toy_data):
    run = tmp_path / "run"
    r = elrea("fit", "--model", tiny_model_dir, "--data", toy_data / "train.jsonl", "--out", run,
              *FAST, "clustering.num_clusters=0", "clustering.max_clusters=5")
    assert "clusters (C=" in r.stdout
    manifest = json.loads((run / "elrea.json").read_text())
    assert all(manifest["stages"][s]["status"] == "done" for s in ("base", "features", "clusters", "experts"))
    assert manifest["command"].startswith("elrea fit --model ")  # what `elrea info` offers to resume with
    C = json.loads((run / "clusters" / "clusters.json").read_text())["num_clusters"]
    assert 2 <= C <= 5 and len(list((run / "experts").iterdir())) == C
    for sub in ["base"] + [f"experts/{c}" for c in range(1, C + 1)]:
        assert (run / sub / "adapter_model.safetensors").exists()
        assert (run / sub / "adapter_config.json").exists()
    assert not list(run.rglob("*.bin")) and not list(run.rglob("*.pt")) and not list(run.rglob("*.pkl"))

    # resume: nothing to do, every stage skipped
    r = elrea("fit", "--model", tiny_model_dir, "--data", toy_data / "train.jsonl", "--out", run,
              *FAST, "clustering.num_clusters=0", "clustering.max_clusters=5")
    assert r.stderr.count("up to date, skipped") == 5  # base, features, clusters, experts, router

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Add 2 and 9."}\n{"instruction": "Reverse the word abc."}\n')
    r = elrea("route", run, "--input", prompts)
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(rows) == 2 and len(rows[0]["weights"]) == C + 1
    assert abs(sum(rows[0]["weights"]) - 1) < 1e-5

    out = tmp_path / "gen.jsonl"
    r = elrea("generate", run, "--input", prompts, "--output", out, "--show-weights", "--max-new-tokens", 5)
    assert "routing weights" in r.stdout
    assert [json.loads(x)["prompt"] for x in out.read_text().splitlines()] == ["Add 2 and 9.", "Reverse the word abc."]
    r = elrea("generate", run, "--prompt", "Add 1 and 1.", "--max-new-tokens", 4)
    assert r.returncode == 0

    r = elrea("eval", run, "--data", toy_data / "test.jsonl", "--max-new-tokens", 4)
    assert "accuracy (%)" in r.stdout and "elrea" in r.stdout and "base" in r.stdout
    res = json.loads((run / "eval.json").read_text())
    assert set(res["accuracy"]) == {"elrea", "base"}
    assert set(res["accuracy"]["elrea"]["per_source"]) == {"add", "sub", "rev", "upper"}

    r = elrea("info", run)
    assert "expert_1" in r.stdout and "upper" in r.stdout


@pytest.mark.slow
def test_changed_config_reruns_dependent_stages_only(fitted_run, tmp_path, toy_data, fast_overrides):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    args = ["fit", "--data", toy_data / "train.jsonl", "--out", run, *fast_overrides,
            "clustering.num_clusters=4"]
    before = json.loads((run / "elrea.json").read_text())["stages"]
    r = elrea(*args, "experts.lr=1e-3")
    assert "stage experts: its config, data or backbone changed" in r.stderr
    after = json.loads((run / "elrea.json").read_text())["stages"]
    for s in ("base", "features", "clusters"):
        assert after[s]["time"] == before[s]["time"]
    assert after["experts"]["fingerprint"] != before["experts"]["fingerprint"]
    r = elrea(*args, "experts.lr=1e-3", "--from", "clusters")
    assert "stage clusters: up to date" not in r.stderr and "stage base: up to date, skipped" in r.stderr


@pytest.mark.parametrize("args, match", [
    (["fit", "--data", "missing.jsonl", "--out", "x"], "missing.jsonl: file not found"),
    (["fit", "--data", "{data}", "--out", "{out}", "lora.rank=-2"], "lora.rank: must be > 0"),
    (["fit", "--data", "{data}", "--out", "{out}", "--model", "{out}/no-such-model"], "cannot load"),
    (["info", "{out}/nothing"], "not an elrea run directory"),
])
def test_user_errors_exit_2_without_traceback(tmp_path, toy_data, args, match):
    args = [a.format(data=toy_data / "train.jsonl", out=tmp_path) for a in args]
    r = elrea(*args, check=False)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr and "Traceback" not in r.stderr


def test_quiet_commands_print_only_results(fitted_run):
    """-q: the answer on stdout and nothing on stderr; no library bars ("Loading weights"), no
    bitsandbytes kernel notice, no library deprecation warnings (warnings not silenced here)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}

    def run(*quiet):
        r = subprocess.run([sys.executable, "-m", "elrea.cli", *quiet, "generate", str(fitted_run), "--prompt",
                            "Add 1 and 1.", "--max-new-tokens", "3"], capture_output=True, text=True, env=env,
                           timeout=600)
        assert r.returncode == 0, r.stderr
        return r

    loud, quiet = run(), run("-q")
    assert "Loading weights" in loud.stderr       # what -q must take away is there without it
    assert quiet.stderr == "" and quiet.stdout == loud.stdout != ""


def test_help_and_config_say_what_happens(tmp_path, capsys):
    from elrea.cli import build_parser, main

    gen = build_parser()._subparsers._group_actions[0].choices["generate"].format_help()
    assert "the run's generation.max_new_tokens" in " ".join(gen.split()) and "default 64" not in gen
    assert "texts on stdout" in " ".join(gen.split())
    # a piped table keeps text columns left-aligned: the meaning starts right after its border
    assert main(["config"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("│ seed ")]
    assert rows and rows[0].split("│")[3].startswith(" Run seed;"), rows
    # --dump never overwrites silently; --force does
    path = tmp_path / "c.yaml"
    path.write_text("mine\n")
    assert main(["config", "--dump", str(path)]) == 2
    assert path.read_text() == "mine\n" and "--force" in capsys.readouterr().err
    assert main(["config", "--dump", str(path), "--force"]) == 0 and "model:" in path.read_text()


def test_info_shows_an_interrupted_stage_with_the_command_that_resumes_it(fitted_run, tmp_path):
    import shutil

    from elrea.rundir import RunLock

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    manifest = json.loads((run / "elrea.json").read_text())
    manifest["stages"]["experts"]["status"] = "running"       # as a killed fit leaves it
    manifest["command"] = "elrea demo --out runs/demo"
    (run / "elrea.json").write_text(json.dumps(manifest))
    r = elrea("info", run)
    row = next(line for line in r.stdout.splitlines() if line.startswith("│ experts"))
    assert "interrupted" in row and "running" not in row
    assert "re-run `elrea demo --out runs/demo`" in " ".join(r.stdout.split())
    r = elrea("generate", run, "--prompt", "hi", check=False)
    assert r.returncode == 2 and "elrea demo --out runs/demo" in r.stderr
    with RunLock(run, "elrea fit"):                            # a writer at work: running, no advice
        r = elrea("info", run)
    row = next(line for line in r.stdout.splitlines() if line.startswith("│ experts"))
    assert "running" in row and "re-run" not in r.stdout
