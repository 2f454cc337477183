"""The speed benchmarks run end to end (--quick: tiny offline model) and their checks hold.

Each script runs in its own process, as `python benchmarks/<script>.py` would, with one
thread: the quick timings mean nothing, and on a loaded machine several threads make the
tiny model's many small ops far slower. Budget: < 30 s per script.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _run(script: str, out: Path) -> dict:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--threads", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr[-4000:]
    print(f"{script} --quick: {elapsed:.1f} s")
    return json.loads(out.read_text())


def _machine_ok(report: dict, script: str):
    assert script in report["command"] and "--quick" in report["command"]
    assert {"platform", "cpu_count", "torch", "torch_threads"} <= set(report["machine"])
    assert report["machine"]["torch_threads"] == 1


@pytest.mark.slow
def test_speed_features_quick(tmp_path):
    r = _run("speed_features.py", tmp_path / "features.json")
    _machine_ok(r, "speed_features.py")
    assert r["benchmark"] == "speed_features" and r["config"]["quick"] is True
    assert set(r["results"]) == {"reference", "elrea", "plain_fwd_bwd", "elrea_dense_projection"}
    for key in ("examples_per_s", "gradient_only_examples_per_s"):
        assert r["results"]["reference"][key] > 0 and r["results"]["elrea"][key] > 0
    assert r["results"]["reference"]["projection_s"] > 0
    assert {"speedup_vs_reference", "gradient_only_speedup", "elrea_over_plain_fwd_bwd"} <= set(r["ratios"])
    for phase in r["phases"].values():
        assert phase["peak_rss_mb"] > 0 and phase["seconds"] > 0
    a = r["agreement"]
    assert a["ok"] is True and a["projected_cosine_min"] >= 0.999
    assert a["projected_cosine_mean"] >= a["projected_cosine_min"]
    assert a["gradient_cosine_min"] >= 0.999
    assert r["targets"]["cosine_ge_0_999"] is True


@pytest.mark.slow
def test_speed_generate_quick(tmp_path):
    r = _run("speed_generate.py", tmp_path / "generate.json")
    _machine_ok(r, "speed_generate.py")
    assert r["benchmark"] == "speed_generate" and r["config"]["quick"] is True
    assert r["config"]["adapters"] == ["base", "expert_1", "expert_2", "expert_3", "expert_4"]
    assert set(r["batches"]) == {"1", "8"}
    methods = {"single_adapter_peft", "single_adapter_elrea_loop", "naive_ensemble", "elrea", "weight_mixing"}
    for b in r["batches"].values():
        assert methods | {"routing", "elrea_plus_routing", "checks"} <= set(b)
        for m in methods:
            assert b[m]["tokens_per_s"] > 0 and b[m]["tokens"] > 0
        assert b["single_adapter_peft"]["ratio_to_single"] == 1.0
        assert b["routing"]["ms_per_prompt"] > 0 and b["weight_mixing"]["mixing_s"] > 0
        assert b["checks"]["elrea_equals_naive"] is True
        assert b["checks"]["first_mismatch_step"] is None
        assert b["checks"]["all_methods_decode_n_tokens"] is True
        assert b["checks"]["elrea_single_equals_peft"] is True
    assert r["targets"]["elrea_equals_naive"] is True
    assert all(min(w) > 0 and abs(sum(w) - 1) < 1e-3 for w in r["config"]["weights"])


def test_scale_features_quick(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run([sys.executable, str(BENCH / "scale_features.py"), "--n", "3000", "--dim", "128",
                           "--work", str(tmp_path / "w"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["found_clusters"] == r["planted_clusters"] and r["ari_vs_planted"] > 0.99
    assert r["peak_rss_gib"] < 4


@pytest.mark.slow
def test_quality_benchmark_code_path(tmp_path, tiny_model_dir):
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--train", "64", "--validation", "8",
                           "--test", "16", "--work", str(tmp_path / "w"), "--out", str(out),
                           f"model.name={tiny_model_dir}", "base.micro_batch_size=8", "experts.micro_batch_size=8",
                           "features.dim=256", "clustering.min_cluster_size=4", "generation.max_new_tokens=4"],
                          capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert set(r["accuracy"]) == {"base", "base-matched", "elrea", "uniform", "top-1", "in-layer", "random",
                                  "embedding", "oracle"}
    chosen = r["chosen_on_validation"]
    assert r["clusterings"]["oracle"]["ari"] == 1.0 and chosen["tau"] in (0.5, 1.0, 2.0)
    assert {t["candidate"] for t in chosen["trials"]} == {"(demo config)", "clustering.num_clusters=8",
                                                         "experts.epochs=4", "features.train_preconditioner=sgd"}
    a = r["analysis"]
    assert sum(sum(c.values()) for c in a["cluster_source_counts"].values()) == 64
    assert set(a["routing"]) == set(r["accuracy"]["elrea"]["per_source"])
    assert all(0 <= v["top1_home"] <= 1 and 0 < v["mean_home_weight"] <= 1 for v in a["routing"].values())
    assert sum(e["examples"] for e in a["experts"].values()) == 64
    best = max(chosen["trials"], key=lambda t: t["validation_mean"])      # the first of the best, as chosen
    assert (best["candidate"], best["tau"], best["top_k"]) == (chosen["candidate"], chosen["tau"], chosen["top_k"])
