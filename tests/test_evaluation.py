"""Evaluation (elrea.evaluation): answer normalisation, the Method objects every evaluation
(`elrea eval`, `elrea compare`) answers with, checked against the engine and PEFT's own adapter,
and the resumable evaluator both use."""

import pytest
import torch

from elrea.evaluation import Method, answer_all, evaluate, normalize_answer
from elrea.testing import make_toy_records, write_jsonl


@pytest.mark.parametrize("raw, norm", [(" 3.0 ", "3"), ("1,000", "1000"), ("-0.50", "-0.5"), ("'Yes'.", "yes"),
                                       ("A  b", "a b"), ("-0", "0")])
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    from elrea.data import load_records

    path = write_jsonl(tmp_path_factory.mktemp("eval") / "test.jsonl", make_toy_records(10, seed=11))
    return load_records(path)


def _answers(model, records, method):
    return [r["m_output"] for r in answer_all(model, records, {"m": method}, desc=None)]


def test_methods_answer_as_the_engine_and_the_adapter_folder_do(elrea_model, records):
    m = elrea_model
    enc = m.encode([r.messages for r in records])
    base = torch.zeros(len(records), len(m.adapters))
    base[:, 0] = 1.0
    assert _answers(m, records, Method(column=0)) == m.generate(enc, weights=base)
    # the base adapter's folder decoded alone (an extra adapter) answers as its column does
    assert _answers(m, records, Method(adapter=str(m.run.base))) == m.generate(enc, weights=base)
    routed = Method(router="gradient", tau=0.5, top_k=2)
    assert _answers(m, records, routed) == m.generate(enc, weights=m.route(enc, tau=0.5, top_k=2))
    assert routed.key() == {"router": "gradient", "tau": 0.5, "top_k": 2}
    assert "arrow_router" not in m.engine.names and "lora_single" not in m.engine.names  # removed after


def test_added_adapters_and_routed_methods_answer_in_one_call_as_each_alone(elrea_model, records):
    """Arrow and an adapter folder are added to the engine while their methods answer: routed
    methods and columns over the run's own adapters, answering in the same call, get zero weight
    on them and the answers they give alone (they used to fail, their weights one column short)."""
    m = elrea_model
    methods = {"arrow": Method(arrow=2), "folder": Method(adapter=str(m.run.base)),
               "routed": Method(router="gradient", tau=0.5, top_k=0), "base": Method(column=0)}
    alone = {n: _answers(m, records, method) for n, method in methods.items()}
    rows = answer_all(m, records, methods, desc=None)
    assert {n: [r[f"{n}_output"] for r in rows] for n in methods} == alone
    assert all(len(r["routed_weights"]) == len(m.adapters) for r in rows)
    assert m.engine.names == m.adapters


def test_the_engine_refuses_weights_of_another_width(elrea_model):
    e, k = elrea_model.engine, len(elrea_model.adapters)
    prompts = [[5, 6, 7]]
    for width in (k - 1, k + 1):
        with pytest.raises(ValueError, match=f"weights have {width} columns; this engine's adapters are {k}"):
            e.generate(prompts, torch.full((1, width), 1.0 / width), max_new_tokens=2)
    with e.arrow(elrea_model.adapters[1:], top_k=1) as name:
        # over the adapters before Arrow's: a zero column for it; over more: refused
        w = torch.zeros(1, k)
        w[0, 0] = 1.0
        assert e.weights(w).tolist() == [[1.0] + [0.0] * k]
        with pytest.raises(ValueError, match=f"weights have {k + 2} columns"):
            e.weights(torch.zeros(1, k + 2))
        assert e.generate(prompts, w, max_new_tokens=3) == e.generate(prompts, e.one_hot(e.names[0], 1), max_new_tokens=3)
        assert name == e.names[-1]


def test_methods_of_one_run_answer_together_as_each_alone(elrea_model, records, monkeypatch):
    """Routings and columns of the run's adapters answer a batch in one decoding call whose
    copies of a prompt share rows: each method's answers are those it gives alone, and each
    (prompt, adapter) is prefilled once."""
    m = elrea_model
    methods = {"tau0.5": Method(router="gradient", tau=0.5, top_k=0), "tau2": Method(router="gradient", tau=2.0, top_k=0),
               "top1": Method(router="gradient", tau=1.0, top_k=1), "base": Method(column=0)}
    alone = {n: _answers(m, records, method) for n, method in methods.items()}
    calls = []
    original = m.generate
    monkeypatch.setattr(m, "generate", lambda enc, **kw: calls.append(len(enc)) or original(enc, **kw))
    before = m.engine.stats.prefill_rows
    rows = answer_all(m, records, methods, desc=None)
    assert {n: [r[f"{n}_output"] for r in rows] for n in methods} == alone
    assert m.engine.stats.prefill_rows - before == len(records) * len(m.adapters)
    b = m.config.generation.batch_size
    assert calls == [len(methods) * min(b, len(records) - s) for s in range(0, len(records), b)]


def test_evaluation_resumes_from_its_finished_batches(elrea_model, records, tmp_path, monkeypatch):
    m = elrea_model
    whole = evaluate(m, records, progress=False)
    assert set(whole["examples"][0]) >= {"elrea_output", "base_output", "elrea", "base", "weights", "source"}
    # a run interrupted in its second batch: the next run decodes only what is left
    calls = []
    original = m.generate

    def crash_in_second_batch(enc, **kw):
        if len(calls) == 1:   # the first batch is done (its ensemble and base adapter in one call)
            raise KeyboardInterrupt
        calls.append(len(enc))
        return original(enc, **kw)

    monkeypatch.setattr(m, "generate", crash_in_second_batch)
    with pytest.raises(KeyboardInterrupt):
        evaluate(m, records, progress=False, resume=tmp_path / "partial")
    calls.clear()
    monkeypatch.setattr(m, "generate", lambda enc, **kw: calls.append(len(enc)) or original(enc, **kw))
    resumed = evaluate(m, records, progress=False, resume=tmp_path / "partial")
    assert sum(calls) == 2 * (len(records) - m.config.generation.batch_size)  # ensemble and base, rest only
    assert resumed == whole


def test_batches_hold_prompts_of_similar_lengths_and_rows_come_back_in_input_order(elrea_model, monkeypatch):
    """answer_all decodes the longest prompts together first; its rows are in the input's order
    and the same answers each prompt gets decoded alone."""
    from elrea.data import Record

    m = elrea_model
    words = [3, 40, 5, 38, 1, 36, 4, 39, 2, 37, 6, 35]
    recs = [Record(messages=[{"role": "user", "content": " ".join(["count"] * n)}], response=str(n), source=f"s{n}")
            for n in words]
    seen = []
    original = m.generate
    monkeypatch.setattr(m, "generate", lambda enc, **kw: seen.append([len(e.input_ids) for e in enc])
                        or original(enc, **kw))
    rows = answer_all(m, recs, {"m": Method(column=0)}, desc=None)
    assert [r["source"] for r in rows] == [r.source for r in recs]
    b = m.config.generation.batch_size
    assert len(seen) == -(-len(recs) // b) and b < len(recs)
    assert min(seen[0]) >= max(seen[1])            # the long prompts in the first batch, the short in the next
    alone = [original(m.encode([r.messages]), weights=torch.eye(len(m.adapters))[:1])[0] for r in recs]
    assert [r["m_output"] for r in rows] == alone
