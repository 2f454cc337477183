"""The lm-evaluation-harness backend: lm-eval's own command line on local tasks (no network)."""

import glob
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from elrea.data import Encoded

REPO = Path(__file__).resolve().parents[1]
TASKS = "tests/lm_eval_tasks"   # data_files in the YAMLs are relative to the repository root


@pytest.mark.slow
def test_lm_eval_cli_multiple_choice_and_generation(tmp_path, fitted_run, elrea_model):
    out = tmp_path / "lm_eval"
    r = subprocess.run([sys.executable, "-m", "elrea.cli", "lm-eval", "--model_args",
                        f"run={fitted_run},device=cpu", "--tasks", "elrea_toy_mc", "elrea_toy_gen",
                        "--include_path", TASKS, "--output_path", str(out), "--log_samples",
                        "--batch_size", "auto", "--max_batch_size", "5"],
                       capture_output=True, text=True, timeout=600, cwd=REPO,
                       env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "elrea_toy_mc" in r.stdout and "exact_match" in r.stdout  # lm-eval's own table
    assert "batch_size: auto (5)" in r.stdout   # lm-eval's summary: the batch size the backend chose
    assert r.stderr.count("chat template is not applied") == 1 and "cuda" not in r.stderr
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


REQUESTS = [  # different contexts and lengths, two sharing a context, an empty context, a trailing space
    ("Add 3 and 4.\nAnswer:", " 7"), ("Add 3 and 4.\nAnswer:", " 12 or so"), ("", "Reverse the word abc."),
    ("Reverse the word uzejo.\nAnswer: ", "ojezu"), ("Subtract 9 from 12.", " 3"), ("A", " b c d e f g"),
    ("Add 12 and 13. Add 12 and 13. Add 12 and 13.\nAnswer:", " 25"), ("Add 3 and 4.\nAnswer:", " 8"),
]   # the first and the last differ only in their one-token continuation


def _per_request(m, weights):
    """The unbatched reference: each request alone through engine.score with its own weights."""
    out = []
    for (c, x), w in zip(REQUESTS, weights):
        ctx, cont = m._split_pair(c, x, False)
        out.append(m.engine.score(ctx, [cont], w, greedy=True)[0])
    return out


def _record_batches(monkeypatch, engine):
    seen = []
    real = engine.score_batch

    def spy(requests, weights, greedy=False):
        seen.append(len({tuple(c) for c, _ in requests}) * 1000 + len(requests))
        return real(requests, weights, greedy)
    monkeypatch.setattr(engine, "score_batch", spy)
    return seen


def test_batched_loglikelihood_equals_per_request(elrea_model, monkeypatch):
    m = elrea_model
    gen = torch.Generator().manual_seed(0)
    w = torch.rand(len(REQUESTS), len(m.adapters), generator=gen)
    w[1, 0] = w[3, 1:] = 0   # some rows skip adapters (as top_k routing does)
    w = w / w.sum(1, keepdim=True)
    w[-1] = w[0]             # the same context: the same routing weights
    ref = _per_request(m, w)
    seen, rows = _record_batches(monkeypatch, m.engine), []
    real_rows = m.engine._rows
    monkeypatch.setattr(m.engine, "_rows", lambda adapters, mix=None: rows.append(len(adapters)) or real_rows(adapters))
    for bs in (1, 3, None):   # None: batches sized by memory
        seen.clear()
        rows.clear()
        got = m.loglikelihood(REQUESTS, weights=w, batch_size=bs)
        for (v, g), (rv, rg) in zip(got, ref):
            assert abs(v - rv) < 1e-5 and g == rg
        sizes = [k % 1000 for k in seen]
        assert sizes == ([1] * 8 if bs == 1 else [3, 3, 2] if bs == 3 else [8])
    assert max(k // 1000 for k in seen) > 1  # a forward over several contexts
    # the two requests that differ in their last token only share their rows: one forward row per adapter fewer
    assert sum(rows) == int((w > 0).sum()) - int((w[0] > 0).sum())
    # routed: each distinct context once, the same weights whatever the batch
    routed = m.loglikelihood(REQUESTS, batch_size=2)
    assert all(abs(a[0] - b[0]) < 1e-5 for a, b in zip(routed, m.loglikelihood(REQUESTS, batch_size=5)))


def _lm(run, **kw):
    from elrea.integrations.lm_eval import ELREALM

    return ELREALM(run=str(run), device="cpu", **kw)


def _mc(lm, **kw):
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=lm, tasks=["elrea_toy_mc"], task_manager=TaskManager(include_path=TASKS),
                                   **kw)


def test_backend_batch_size_is_honoured_and_reported(fitted_run, monkeypatch):
    monkeypatch.chdir(REPO)
    lm = _lm(fitted_run, batch_size="4")
    seen = _record_batches(monkeypatch, lm.model.engine)
    res = _mc(lm)
    assert [k % 1000 for k in seen] == [4] * 8            # 8 questions x 4 choices, 4 per forward
    assert res["config"]["batch_sizes"] == []              # lm-eval's summary: its own --batch_size
    assert lm.model.config.generation.batch_size == 4      # generate_until decodes 4 together

    lm = _lm(fitted_run, batch_size="auto:4", max_batch_size="5")
    seen = _record_batches(monkeypatch, lm.model.engine)
    res = _mc(lm)
    assert [k % 1000 for k in seen] == [5] * 6 + [2]       # the memory budget holds more: max_batch_size caps
    assert res["config"]["batch_sizes"] == [5]             # the summary: "batch_size: auto (5)"
    with pytest.raises(Exception, match="batch_size 'big'; valid: a positive integer, auto, auto:N"):
        _lm(fitted_run, batch_size="big")


def test_backend_routes_with_the_runs_router(fitted_run, tmp_path, elrea_model):
    import shutil

    run = tmp_path / "uniform_run"
    shutil.copytree(fitted_run, run)
    cfg = json.loads((run / "run_config.json").read_text())
    cfg["routing"]["router"] = "uniform"
    (run / "run_config.json").write_text(json.dumps(cfg))
    lm = _lm(run)
    got = lm.loglikelihood([SimpleNamespace(args=r) for r in REQUESTS], disable_tqdm=True)
    uniform = torch.full((len(REQUESTS), len(elrea_model.adapters)), 1 / len(elrea_model.adapters))
    routed = elrea_model.loglikelihood(REQUESTS)   # the fitted run's own router (gradient)
    for g, u, r in zip(got, _per_request(elrea_model, uniform), routed):
        assert abs(g[0] - u[0]) < 1e-5
    assert max(abs(g[0] - r[0]) for g, r in zip(got, routed)) > 1e-4
    assert lm.get_model_info()["elrea_router"] == "uniform"
    assert _lm(run, router="gradient").loglikelihood([SimpleNamespace(args=REQUESTS[0])], disable_tqdm=True)[0][0] \
        == pytest.approx(routed[0][0], abs=1e-5)


def test_raw_prompts_warn_once_unless_the_chat_template_is_applied(fitted_run, monkeypatch, caplog):
    monkeypatch.chdir(REPO)
    lm = _lm(fitted_run)
    assert lm.tok.chat_template   # the tiny backbone has one
    with caplog.at_level(logging.WARNING, logger="elrea.integrations.lm_eval"):
        _mc(lm)
        lm.loglikelihood([SimpleNamespace(args=REQUESTS[0])], disable_tqdm=True)
        lm.generate_until([SimpleNamespace(args=("Add 3 and 4.", {"until": ["\n"], "max_gen_toks": 2}))],
                          disable_tqdm=True)
    warned = [r for r in caplog.records if "chat template is not applied" in r.getMessage()]
    assert len(warned) == 1 and "--apply_chat_template" in warned[0].getMessage()
    caplog.clear()
    lm = _lm(fitted_run)
    with caplog.at_level(logging.WARNING, logger="elrea.integrations.lm_eval"):
        _mc(lm, apply_chat_template=True)
    assert not [r for r in caplog.records if "chat template is not applied" in r.getMessage()]


def test_backend_dtype_and_device(fitted_run, elrea_model, caplog):
    from elrea.integrations.lm_eval import ELREALM

    lm = _lm(fitted_run, dtype="bfloat16")
    assert lm.model.engine.dtype == torch.bfloat16
    assert {p.dtype for n, p in lm.model.model.named_parameters() if "lora_" not in n} == {torch.bfloat16}
    assert lm.get_model_info()["model_dtype"] == "torch.bfloat16"
    low = lm.loglikelihood([SimpleNamespace(args=r) for r in REQUESTS], disable_tqdm=True)
    full = elrea_model.loglikelihood(REQUESTS)
    assert 0 < max(abs(a[0] - b[0]) for a, b in zip(low, full)) < 0.5   # bfloat16: close, not equal
    assert _lm(fitted_run, dtype="auto").model.engine.dtype == torch.float32   # the run's model.dtype
    with pytest.raises(Exception, match="dtype 'float8'; valid: auto, float32, bfloat16, float16"):
        _lm(fitted_run, dtype="float8")
    if torch.cuda.is_available():
        return
    with caplog.at_level(logging.DEBUG, logger="elrea.integrations.lm_eval"):
        lm = ELREALM.create_from_arg_obj({"run": str(fitted_run)}, {"device": "cuda:0", "batch_size": 1})
    assert lm.model.device.type == "cpu"   # lm-eval's default cuda:0 on a machine without: quietly the run's
    assert [r.levelno for r in caplog.records if "device" in r.getMessage()] == [logging.DEBUG]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="elrea.integrations.lm_eval"):
        ELREALM.create_from_arg_obj({"run": str(fitted_run), "device": "cuda"}, {"device": "cuda:0"})
    assert [r.levelno for r in caplog.records if "device" in r.getMessage()] == [logging.INFO]


def test_rolling_loglikelihood_batches_windows_of_all_documents(fitted_run, elrea_model):
    """Many documents of many windows each, scored together 3 windows per forward: each
    document's total equals its windows scored one by one (engine.score), with its own routing."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from elrea.integrations.lm_eval import ELREALM

    lm = ELREALM(run=str(fitted_run), device="cpu", batch_size=3, max_length=6)
    docs = ["Add 3 and 4. The answer is 7.", "Reverse the word abc: cba.", "x",
            "Sort these words: pear, apple, fig. apple, fig, pear. And once more: fig."]
    got = lm.loglikelihood_rolling([SimpleNamespace(args=(d,)) for d in docs], disable_tqdm=True)
    eos = lm.tok.eos_token_id
    for doc, total in zip(docs, got):
        ids = lm.tok(doc, add_special_tokens=False)["input_ids"]
        head = ids[:6]
        w = elrea_model.route([Encoded(head, [-100] + head[1:])])[0]
        windows = list(map(make_disjoint_window, get_rolling_token_windows(ids, prefix_token=eos, max_seq_len=6,
                                                                           context_len=1)))
        assert sum(len(p) for _, p in windows) == len(ids)       # every token predicted once
        one_by_one = sum(lm.model.engine.score(list(c), [list(p)], w)[0] for c, p in windows)
        assert abs(total - one_by_one) < 1e-4, (doc, total, one_by_one)
    assert len(set(round(t, 3) for t in got)) == len(docs)
    assert lm.loglikelihood_rolling([], disable_tqdm=True) == []
