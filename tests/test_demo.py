"""The demo's code path (export -> fit -> eval -> report with pictures) on the tiny model."""

import json

import pytest

from conftest import FAST

pytest.importorskip("reasoning_gym")


@pytest.mark.slow
def test_demo_writes_report_with_pictures(tmp_path, tiny_model_dir):
    from elrea.demo import run_demo

    out = tmp_path / "demo"
    result = run_demo(out, train=64, test=16, overrides=[f"model.name={tiny_model_dir}", *FAST,
                                                          "clustering.min_cluster_size=8"])
    assert set(result["accuracy"]) == {"elrea", "base"}
    report = (out / "report.md").read_text()
    assert "| elrea |" in report and "| base |" in report
    for png in ("accuracy.png", "features.png", "cluster_source.png", "routing.png"):
        data = (out / "report" / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        assert f"report/{png}" in report
    assert len(json.loads((out / "eval.json").read_text())["examples"]) == 16
    card = (out / "README.md").read_text()  # the model card, with the evaluation table
    assert "## Evaluation" in card and "| elrea |" in card and "## Experts" in card
