"""The lm-evaluation-harness backend: lm-eval's own command line on local tasks (no network)."""

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
TASKS = "tests/lm_eval_tasks"   # data_files in the YAMLs are relative to the repository root


@pytest.mark.slow
def test_lm_eval_cli_multiple_choice_and_generation(tmp_path, fitted_run, elrea_model):
    out = tmp_path / "lm_eval"
    r = subprocess.run([sys.executable, "-m", "elrea.cli", "lm-eval", "--model_args",
                        f"run={fitted_run},device=cpu", "--tasks", "elrea_toy_mc", "elrea_toy_gen",
                        "--include_path", TASKS, "--output_path", str(out), "--log_samples"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "elrea_toy_mc" in r.stdout and "exact_match" in r.stdout  # lm-eval's own table
    results = json.loads(Path(glob.glob(str(out / "*" / "results_*.json"))[0]).read_text())["results"]
    assert 0 <= results["elrea_toy_mc"]["acc,none"] <= 1
    assert 0 <= results["elrea_toy_gen"]["exact_match,none"] <= 1

    m = elrea_model
    samples = [json.loads(x) for x in open(glob.glob(str(out / "*" / "samples_elrea_toy_mc_*.jsonl"))[0])]
    assert len(samples) == 8
    for s in samples:  # every loglikelihood lm-eval got is the ensemble's, request by request
        for k, args in enumerate(s["arguments"].values()):
            logp, greedy = m.loglikelihood([(args["arg_0"], args["arg_1"])])[0]
            got = s["resps"][k][0]
            assert abs(float(got[0]) - logp) < 1e-4 and got[1] == str(greedy)
    gen = [json.loads(x) for x in open(glob.glob(str(out / "*" / "samples_elrea_toy_gen_*.jsonl"))[0])]
    for s in gen:  # generations: the ensemble's greedy text before the first "\n"
        ctx = s["arguments"]["gen_args_0"]["arg_0"]
        enc = m.formatter.encode_raw(ctx, add_special_tokens=False)
        expected = m.generate([enc], max_new_tokens=6, stop_strings=["\n"])[0].split("\n")[0]
        assert s["resps"][0][0] == expected


def test_simple_evaluate_with_an_elrealm_and_rolling_loglikelihood(fitted_run, elrea_model, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from elrea.integrations.lm_eval import ELREALM

    monkeypatch.chdir(REPO)
    lm = ELREALM(run=str(fitted_run), device="cpu")
    res = lm_eval.simple_evaluate(model=lm, tasks=["elrea_toy_mc"], task_manager=TaskManager(include_path=TASKS))
    assert "acc,none" in res["results"]["elrea_toy_mc"]

    doc = "Add 3 and 4. The answer is 7. Reverse the word abc: cba."
    ids = lm.tok(doc, add_special_tokens=False)["input_ids"]
    one_window = lm.loglikelihood_rolling([SimpleNamespace(args=(doc,))], disable_tqdm=True)[0]
    w = elrea_model.route([elrea_model.formatter.encode_raw(doc, add_special_tokens=False)])[0]
    direct = lm.model.engine.score([lm.tok.eos_token_id], [ids], w)[0]
    assert abs(one_window - direct) < 1e-4  # a document shorter than max_length: one window after EOS
    lm.model.config.routing.router = "uniform"  # the backend routes with the run's router unless told
    uniform = lm.loglikelihood_rolling([SimpleNamespace(args=(doc,))], disable_tqdm=True)[0]
    w = elrea_model.route([elrea_model.formatter.encode_raw(doc, add_special_tokens=False)], router="uniform")[0]
    assert abs(uniform - lm.model.engine.score([lm.tok.eos_token_id], [ids], w)[0]) < 1e-4
    assert abs(uniform - one_window) > 1e-4
    lm.model.config.routing.router = "gradient"
    lm.max_length = 6  # many windows: still every token predicted once
    many = lm.loglikelihood_rolling([SimpleNamespace(args=(doc,))], disable_tqdm=True)[0]
    assert many < 0 and many != one_window


def test_bad_model_args_are_clear_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "elrea.cli", "lm-eval", "--model_args", f"run={tmp_path / 'nope'}",
                        "--tasks", "elrea_toy_mc", "--include_path", TASKS], capture_output=True, text=True,
                       timeout=300, cwd=REPO, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 2 and "not an elrea run directory" in r.stderr and "Traceback" not in r.stderr
