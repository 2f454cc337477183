"""The speed benchmarks run end to end (--quick: tiny offline model) and their checks hold.

Each script runs in its own process, as `python benchmarks/<script>.py` would, with one
thread: the quick timings mean nothing, and on a loaded machine several threads make the
tiny model's many small ops far slower. Budget: < 30 s per script.
"""

import json
import statistics
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


def _run_script(script: str, *args, out: Path) -> dict:
    """A benchmark as its own process with one OpenMP thread; its JSON report."""
    import os

    proc = subprocess.run([sys.executable, str(BENCH / script), *args, "--out", str(out)], capture_output=True,
                          text=True, timeout=300, cwd=BENCH.parent, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
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
    methods = {"anchor_merged_static", "single_adapter_peft", "naive_ensemble", "elrea_before", "engine_single",
               "engine", "engine_compiled", "weight_mixing", "base_model_all_rows"}
    for B, b in r["batches"].items():
        assert methods | {"routing", "engine_plus_routing", "checks", "ratios"} <= set(b) and not b["skipped"]
        for m in methods:
            assert b[m]["tokens_per_s"] > 0 and b[m]["tokens"] == int(B) * r["config"]["max_new_tokens"]
        assert b["single_adapter_peft"]["ratio_to_single"] == b["anchor_merged_static"]["ratio_to_anchor"] == 1.0
        assert b["routing"]["ms_per_prompt"] > 0
        c = b["checks"]
        # float32: the engine decodes exactly what the decoder before it did, and one-hot is PEFT's own decoding
        assert c["engine_equals_before"] is True and c["first_mismatch_step"] is None
        assert c["engine_single_equals_peft"] is True and c["engine_equals_naive"] is True
        assert c["engine_compiled_equals_engine"] is True      # --quick compiles with dynamo (traced, eager kernels)
        assert c["all_methods_decode_n_tokens"] is True
        assert b["ratios"]["engine_over_before"] == b["engine"]["tokens_per_s"] / b["elrea_before"]["tokens_per_s"]
        assert b["engine"]["engine"]["slots"] >= 5 * int(B) and b["engine"]["engine"]["stacked_lora"] is True
        assert b["engine_compiled"]["engine"]["compiled_buckets"] and b["engine_compiled"]["engine"]["fallback"] is None
    assert r["targets"]["engine_equals_before"] is True and r["targets"]["engine_single_equals_peft"] is True
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
def test_quality_benchmark_is_elrea_compare_on_a_mixture(tmp_path, tiny_model_dir):
    """benchmarks/quality.py exports a built-in mixture and runs `elrea compare` on it with the
    mixture's checker; its JSON is compare's, plus the command and the machine."""
    pytest.importorskip("reasoning_gym")
    out = tmp_path / "quality.json"
    proc = subprocess.run([sys.executable, str(BENCH / "quality.py"), "--train", "64", "--validation", "8",
                           "--test", "16", "--work", str(tmp_path / "w"), "--out", str(out),
                           f"model.name={tiny_model_dir}", "base.micro_batch_size=8", "experts.micro_batch_size=8",
                           "features.dim=256", "clustering.min_cluster_size=4", "generation.max_new_tokens=4",
                           "base.epochs=1", "experts.epochs=1",
                           "--routers", "gradient", "learned", "--candidates", "", "--tau-grid", "1"],
                          capture_output=True, text=True, timeout=600, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["mixture"] == "reasoning-mix" and r["checker"] == "reasoning-mix" and "quality.py" in r["command"]
    required = {"elrea-gradient", "elrea-gradient-top1", "elrea-learned", "elrea-learned-top1", "lora", "lora-matched",
                "uniform", "random", "source", "arrow", "elrea-half"}
    assert required <= set(r["accuracy"]) <= required | {"elrea-gradient-top2", "elrea-learned-top2"}
    assert r["clusterings"]["source"]["ari"] == 1.0 and r["data"]["validation_carved"] is False
    assert (tmp_path / "w" / "report.md").exists()
    for picture, copy in (("accuracy.png", "quality.png"), ("budget.png", "quality-budget.png")):   # beside the JSON
        assert (tmp_path / copy).read_bytes() == (tmp_path / "w" / picture).read_bytes()
    # the headline beside it, and --headline alone copies it again (as while a long compare runs)
    head = tmp_path / "headline-quality.json"
    h = json.loads(head.read_text())
    assert h["files"]["test"]["accuracy"] == {m: r["accuracy"][m]["mean"] for m in h["methods"]}
    head.unlink()
    again = subprocess.run([*proc.args, "--headline"], capture_output=True, text=True, timeout=120, cwd=BENCH.parent)
    assert again.returncode == 0, again.stderr[-2000:]
    h2 = json.loads(head.read_text())
    assert h2["files"] == h["files"] and "--headline" not in h2["command"] and h2["command"] == r["command"]
    assert (tmp_path / "headline-quality.png").stat().st_size > 0


@pytest.mark.slow
def test_conflict_benchmark(tmp_path, tiny_model_dir):
    """conflict.py's exact per-source mean gradients agree with autograd on the mean loss."""
    out = tmp_path / "conflict.json"
    proc = subprocess.run([sys.executable, str(BENCH / "conflict.py"), "--mixture", "toy", "--train", "32",
                           "--dim", "256", "--batch-size", "8", "--work", str(tmp_path / "w"), "--out", str(out),
                           f"model.name={tiny_model_dir}", "base.micro_batch_size=8", "features.dim=256"],
                          capture_output=True, text=True, timeout=300, cwd=BENCH.parent)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    k = len(r["sources"])
    assert r["sources"] == ["add", "rev", "sub", "upper"] and r["examples_per_source"] == [8.0] * 4
    for key in ("mean_gradient_cosine", "instruction_feature_cosine"):
        M = r[key]
        assert len(M) == k and all(abs(M[i][i] - 1) < 1e-6 for i in range(k))
        assert all(abs(M[i][j] - M[j][i]) < 1e-6 and -1 - 1e-6 <= M[i][j] <= 1 + 1e-6
                   for i in range(k) for j in range(k))
    assert r["source_pairs"] == 6 and 0 <= r["negative_source_pairs"] <= 6
    p = r["example_pairs"]
    assert p["within_source"]["pairs"] == 4 * 28 and p["across_sources"]["pairs"] == 6 * 64
    assert (tmp_path / "conflict.png").stat().st_size > 0


def test_conflict_source_sums_match_autograd(tiny_model_dir, toy_rows):
    """conflict.training_gradients: per-source gradient sums == autograd of each source's summed loss."""
    import numpy as np
    import torch

    from conftest import lora_model
    from elrea.config import ModelConfig
    from elrea.data import PromptFormatter, collate, parse_record
    from elrea.features import per_example_loss
    from elrea.models import load_tokenizer
    from elrea.projection import SparseProjector

    sys.path.insert(0, str(BENCH))
    from conflict import training_gradients

    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    fmt = PromptFormatter(tok)
    recs = [parse_record(r, dict(path="t", line=i)) for i, r in enumerate(toy_rows[:10])]
    enc = [fmt.encode_train(r) for r in recs]
    src = np.array([0, 1, 2, 0, 1, 2, 2, 0, 1, 0])
    model = lora_model(tiny_model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    proj = SparseProjector(sum(p.numel() for p in params), 64, seed=0)
    sums, projected = training_gradients(model, enc, src, 3, tok.pad_token_id, 4, proj)
    for s in range(3):
        b = collate([e for e, k in zip(enc, src) if k == s], tok.pad_token_id)
        loss = per_example_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                b["labels"]).sum()
        ref = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
        assert torch.allclose(sums[s], ref, rtol=1e-4, atol=1e-6), (sums[s] - ref).abs().max()
    assert projected.shape == (10, 64) and projected.norm(dim=1).min() > 0


def test_learned_routing_quick(tmp_path):
    """benchmarks/learned_routing.py: the router's signal with adapters off both ways, equal."""
    r = _run("learned_routing.py", tmp_path / "lr.json")
    _machine_ok(r, "learned_routing.py")
    assert set(r["batches"]) == {"1", "16"} and r["n"] == 32
    for res in r["batches"].values():
        assert res["equal"] and res["elrea"]["ms_per_prompt"] > 0 and res["peft_disable_adapter"]["x_one_token"] > 0
    assert r["ms_per_decoded_token_batch1"] > 0


@pytest.mark.slow
def test_gpu_benchmark_smoke_and_refusal(tmp_path):
    """benchmarks/gpu.py: its code path on a tiny model on the CPU (--smoke), a part stopped by its
    time cap keeps what it measured, and without CUDA a clear refusal of the real run."""
    import torch

    r = _run_script("gpu.py", "--smoke", out=tmp_path / "gpu.json")
    assert r["device"]["device"] == "cpu" and r["device"]["torch"] == torch.__version__
    tiny = r["archs"]["tiny"]
    f, d = tiny["features"], tiny["decoding"]
    assert "errors" not in tiny and "stopped" not in tiny and d["incomplete"] == []
    assert f["agreement_cosine_min"] >= 0.999  # elrea's gradients == the LESS way's, same projection
    assert all(v > 0 for v in f["examples_per_s"].values()) and f["speedup_vs_less"] > 0
    prof = tiny["profile"]["4"]   # issue 24: the phase profile, every phase timed, the shares adding up
    assert prof["timer"] == "wall clock" and all(prof["ms_per_batch"][k] > 0 for k in
                                                 ("forward", "backward", "outer", "adam", "projection", "train_backward"))
    assert sum(prof["share_of_features"][k] for k in ("forward", "backward", "outer", "adam", "projection",
                                                      "normalise")) == pytest.approx(1.0)
    for B in ("1", "2"):
        c = d[B]["checks"]
        # float32 on the CPU: the engine (compiled by dynamo in --smoke) decodes what the decoder
        # before it did, and with one-hot weights what PEFT's generate does
        assert c["engine_equals_before"] and c["engine_single_equals_peft"] and c["engine_equals_naive"], c
        assert c["engine_common_prefix_before"] == c["engine_single_common_prefix_peft"] == 1.0
        assert {"anchor_merged_static", "single_adapter_peft", "elrea_before", "engine_single", "engine"} <= set(d[B])
        assert d[B]["engine"]["tokens_per_s"] > 0 and d[B]["ratios"]["engine_over_anchor"] > 0
        e = d[B]["engine"]["engine"]
        assert e["compile"] == "dynamo" and e["compiled_buckets"] and e["fallback"] is None
        assert d[B]["routing_ms_per_prompt"] > 0
    assert set(r["targets"]["tiny"]) >= {"features_speedup_ge_20x_less", "ensemble_ge_0_8x_single_b1",
                                         "engine_ge_150_tokens_per_s_b1", "engine_ge_0_8x_anchor_b1"}
    assert r["targets"]["tiny"]["engine_ge_1000_tokens_per_s_b32"] is None      # batch 32 did not run
    capped = _run_script("gpu.py", "--smoke", "--parts", "decoding", "--cap", "decoding=1", out=tmp_path / "cap.json")
    tiny = capped["archs"]["tiny"]
    assert "features" not in tiny and "time cap" in tiny["stopped"]["decoding"]
    assert "2" in tiny["decoding"]["incomplete"]             # a 1 s cap cannot cover both batch sizes
    if not torch.cuda.is_available():
        proc = subprocess.run([sys.executable, str(BENCH / "gpu.py")], capture_output=True, text=True,
                              timeout=120, cwd=BENCH.parent)
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_serve_benchmark_quick(tmp_path):
    r = _run_script("serve.py", "--quick", out=tmp_path / "serve.json")
    _machine_ok(r, "serve.py")
    assert r["benchmark"] == "serve" and r["config"]["quick"] is True
    assert set(r["results"]) == {"continuous", "static"}   # one at a time only with --one-at-a-time
    for mode in ("continuous", "static"):
        server = r["results"][mode]["server"]
        assert server["batching"] == mode and server["slots"] == 16   # the same slots, the other policy
        for c, n in (("1", 4), ("4", 8)):
            x = r["results"][mode]["levels"][c]
            assert x["clients"] == int(c) and x["requests"] == n
            assert x["answered"] == n and x["errors"] == 0, x["error_examples"]   # every request answered
            assert 0 < x["completion_tokens"] <= x["max_tokens_sum"] and x["tokens_per_s"] > 0
            assert x["usage_mismatches"] == []   # usage within max_tokens; "length" exactly at it
            assert x["p95_s"] >= x["p50_s"] > 0 and x["ttft_p95_s"] >= x["ttft_p50_s"] > 0
            assert x["ttft_p50_s"] <= x["max_s"] and x["ttft_p95_s"] <= x["max_s"]
            assert x["idle_after"], x["engine_after"]   # no slot left taken, nothing queued
        assert r["results"][mode]["engine"]["requests"] == 4 + 8 + 1   # the levels and the warm-up
    # one client: both servers decode each request alone, so greedy answers are the same text
    one = r["results"]["continuous"]["levels"]["1"]
    assert one["same_text_as_static"] == one["compared_with_static"] == 4
    assert r["results"]["continuous"]["levels"]["4"]["compared_with_static"] == 8
    ratios = r["continuous_over_static"]
    assert set(ratios) == {"1", "4"} and ratios == r["over_static"]["continuous"]
    for c, q in ratios.items():
        x, s = r["results"]["continuous"]["levels"][c], r["results"]["static"]["levels"][c]
        assert q["requests_per_s"] == pytest.approx(x["requests_per_s"] / s["requests_per_s"])
        assert q["p95_s"] == pytest.approx(x["p95_s"] / s["p95_s"]) and q["tokens_per_s"] > 0


def _q4_1_round_trip(model_dir: Path, out: Path) -> Path:
    """A copy of a model whose matrices went through gguf's Q4_1 quantisation and back (what the
    built-in model's conversion does to SmolLM2's weights); norms stay float32, as in the GGUF."""
    import shutil

    import gguf
    import numpy as np
    import torch
    from gguf.quants import dequantize, quantize
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, out)
    weights = load_file(str(out / "model.safetensors"))
    q4_1 = gguf.GGMLQuantizationType.Q4_1
    for name, w in weights.items():
        if w.ndim == 2 and w.shape[1] % 32 == 0:
            weights[name] = torch.from_numpy(np.ascontiguousarray(dequantize(quantize(w.numpy(), q4_1), q4_1)))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_transfer_is_zero_on_the_same_backbone_and_not_on_a_quantised_one(fitted_run, tiny_model_dir, tmp_path):
    """benchmarks/transfer.py: the run's adapters on their own backbone again move nothing; on the
    backbone's Q4_1 round trip the reference tokens' log-likelihoods move."""
    same = _run_script("transfer.py", "--run", str(fitted_run), "--backbone", str(tiny_model_dir),
                       "--max-new-tokens", "4", "--limit", "6", out=tmp_path / "same.json")
    assert same["records"] == 6 and same["reference_tokens"] > 6
    assert same["mean_abs_dlogp_per_token"] == 0 and same["mean_abs_dweight"] == 0
    assert same["greedy_agreement"] == 1
    quantised = _q4_1_round_trip(tiny_model_dir, tmp_path / "tiny-q4_1")
    moved = _run_script("transfer.py", "--run", str(fitted_run), "--backbone", str(quantised),
                        "--max-new-tokens", "4", "--limit", "6", out=tmp_path / "moved.json")
    assert moved["reference_tokens"] == same["reference_tokens"]
    assert moved["mean_abs_dlogp_per_token"] > 1e-4 and moved["max_abs_dlogp"] >= moved["mean_abs_dlogp_per_token"]
    assert moved["mean_logp_per_token_own"] == same["mean_logp_per_token_own"]


def test_padding_counts_what_trainer_samplers_batch(tmp_path, tiny_model_dir, toy_rows):
    """benchmarks/padding.py: one epoch of each sampler's micro-batches, every example once;
    rebalancing each step's micro-batches pads less than random ones, grouping steps by length
    less still, on data of mixed lengths."""
    sys.path.insert(0, str(BENCH))
    import padding

    from elrea.config import ModelConfig
    from elrea.data import PromptFormatter, encode_all, load_records
    from elrea.models import load_tokenizer
    from elrea.testing import write_jsonl

    rows = [dict(r, instruction=r["instruction"] + " please" * (i % 13) * 3) for i, r in enumerate(toy_rows)]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    r = padding.main(["--data", str(data), "--model", str(tiny_model_dir), "--max-length", "256",
                      "--micro-batch-size", "4", "--batch-size", "8", "--out", str(tmp_path / "p.json"),
                      "--eval", str(data), "--generation-batch-size", "4"])
    prompts = r["eval"]["train.jsonl"]["orders"]
    assert prompts["by_length"]["real_tokens"] == prompts["input"]["real_tokens"]
    assert prompts["by_length"]["padded_tokens"] < prompts["input"]["padded_tokens"]   # mixed lengths
    enc = encode_all(PromptFormatter(load_tokenizer(ModelConfig(name=str(tiny_model_dir))), max_length=256),
                     load_records(data), "train")
    real = sum(len(e.input_ids) for e in enc)
    for order in r["orders"].values():
        assert order["real_tokens"] == real and order["micro_batches"] == len(enc) // 4
        assert order["padded_tokens"] >= real
    assert set(r["orders"]) == {"random", "batch_rebalance", "group_by_length"}
    assert r["orders"]["group_by_length"]["padded_tokens"] < r["orders"]["batch_rebalance"]["padded_tokens"] \
        < r["orders"]["random"]["padded_tokens"]
    assert padding.padding([3, 5, 4, 1], [0, 1, 2, 3], 2) == {
        "padded_tokens": 10 + 8, "real_tokens": 13, "padded_per_real": round(18 / 13, 3),
        "micro_batches": 2, "median_width": 4.5}


def test_speed_training_times_each_dropout_on_the_same_batches(tmp_path):
    """benchmarks/speed_training.py --quick: torch's dropout, elrea's with every logit and with
    labelled logits, and none, each timed the asked number of times on the same micro-batches of
    real examples; its ratios follow its times."""
    sys.path.insert(0, str(BENCH))
    import speed_training

    r = speed_training.main(["--quick", "--repeats", "2", "--micro-batches", "3", "--out", str(tmp_path / "t.json")])
    assert json.loads((tmp_path / "t.json").read_text())["torch_over_elrea"] == r["torch_over_elrea"]
    assert {k: len(v) for k, v in r["all_seconds"].items()} == {"torch": 2, "elrea_every_logit": 2, "elrea": 2, "none": 2}
    assert all(t > 0 for v in r["all_seconds"].values() for t in v)
    assert r["lora"]["dropout_layers"] > 0 and r["micro_batches"] == 3
    assert 0 < r["tokens"]["real"] <= r["tokens"]["padded"]
    med = {k: statistics.median(v) for k, v in r["all_seconds"].items()}
    assert r["torch_over_elrea"] == round(med["torch"] / med["elrea"], 3)
    assert r["every_logit_over_labelled"] == round(med["elrea_every_logit"] / med["elrea"], 3)
    assert 0 < r["labelled_tokens"] < r["tokens"]["real"]


def test_speed_precision_times_both_dtypes_and_checks_what_bf16_changes(tmp_path):
    """benchmarks/speed_precision.py --quick: a training micro-batch, a batch of features and an
    ensemble decode, each timed in float32 and bfloat16 the asked number of times; speed-ups
    follow the times; bf16's features point where float32's do, and its loss is float32's within
    bf16's rounding."""
    sys.path.insert(0, str(BENCH))
    import speed_precision

    r = speed_precision.main(["--quick", "--repeats", "2", "--out", str(tmp_path / "p.json")])
    assert json.loads((tmp_path / "p.json").read_text())["speedup"] == r["speedup"]
    stages = ("train", "features", "decode")
    assert {k: len(v) for k, v in r["all_seconds"].items()} == {
        f"{s}_{d}": 2 for s in stages for d in ("float32", "bfloat16")}
    med = {k: statistics.median(v) for k, v in r["all_seconds"].items()}
    for stage in stages:
        assert r["speedup"][stage] == round(med[f"{stage}_float32"] / med[f"{stage}_bfloat16"], 3)
    d = r["decode"]
    assert d["tokens_per_second"]["float32"] == round(d["prompts"] * d["new_tokens"] / med["decode_float32"], 2)
    assert 0 <= d["same_tokens"]["identical"] <= d["same_tokens"]["common_prefix"] <= 1
    assert 0.99 < r["feature_cosine"]["min"] <= r["feature_cosine"]["mean"] <= 1.0 + 1e-6
    assert r["first_loss"]["bfloat16"] == pytest.approx(r["first_loss"]["float32"], rel=0.02)
    assert r["first_loss"]["bfloat16"] != r["first_loss"]["float32"]   # the bf16 path really ran
    assert {"cpu_capability"} <= r["machine"].keys()


def test_speed_prefill_times_each_fix_and_every_way_gives_the_same_tokens(tmp_path):
    """benchmarks/speed_prefill.py --quick: the engine's prefill before the fixes, with each, and
    now, in both dtypes, each timed the asked number of times; ratios follow the times; the
    first tokens agree every way."""
    sys.path.insert(0, str(BENCH))
    import speed_prefill

    from elrea import fastlora

    chunk = fastlora.CHUNK_ROWS
    r = speed_prefill.main(["--quick", "--repeats", "2", "--prompts", "4", "--out", str(tmp_path / "f.json")])
    assert fastlora.CHUNK_ROWS == chunk                          # each way gives the setting back
    assert json.loads((tmp_path / "f.json").read_text())["seconds"] == r["seconds"]
    assert {k: len(v) for k, v in r["all_seconds"].items()} == {
        f"{w}_{d}": 2 for w in speed_prefill.WAYS for d in ("float32", "bfloat16")}
    med = {k: statistics.median(v) for k, v in r["all_seconds"].items()}
    for d in ("float32", "bfloat16"):
        assert r["speedup_over_before"][d]["now"] == round(med[f"before_{d}"] / med[f"now_{d}"], 3)
    assert r["same_first_tokens"] == {"float32": True, "bfloat16": True}
    assert r["rows"] == 4 * 5


def test_shared_decoding_gives_each_routing_its_own_answers_with_fewer_rows(fitted_run, toy_data, tmp_path):
    """benchmarks/shared_decoding.py: the run's routings decoded one by one and together give
    the same answers; together, each (prompt, adapter) row is prefilled once."""
    r = _run_script("shared_decoding.py", "--run", str(fitted_run), "--data", str(toy_data / "test.jsonl"),
                    "--limit", "10", "--routers", "gradient", "learned", "--max-new-tokens", "6", out=tmp_path / "s.json")
    assert r["same_answers"] is True and r["prompts"] == 10
    assert len(r["routings"]) == 6 and "gradient tau 2" in r["routings"] and "learned top-1" in r["routings"]
    one, together = r["ways"]["one_by_one"], r["ways"]["together"]
    assert together["prefill_rows"] == 10 * r["adapters"] < one["prefill_rows"]
    assert together["decode_rows"] <= one["decode_rows"]
    assert r["ratios"]["prefill_rows"] == round(one["prefill_rows"] / together["prefill_rows"], 2)


def test_feature_memory_measures_the_first_batch_and_keeps_the_rest_under_the_cap(tmp_path):
    """benchmarks/feature_memory.py --quick with a tiny share of memory: the cap binds, every
    later batch holds at most the capped tokens (an example longer than the cap alone), each
    measured, and the recorded rate is the first batch's."""
    r = _run_script("feature_memory.py", "--quick", "--memory-fraction", "0.0001", out=tmp_path / "m.json")
    assert r["memory_fraction"] == 0.0001 and set(r["dtypes"]) == {"float32", "bfloat16"}
    for d in r["dtypes"].values():
        first, *later = d["batches"]
        assert first["probe"] and first["padded_tokens"] <= r["probe_tokens"]
        assert 0 < d["token_cap"] < d["default_batch_tokens"], d
        assert later and all(b["padded_tokens"] <= d["token_cap"] or b["rows"] == 1 for b in later)
        assert sum(b["rows"] for b in d["batches"]) == r["examples"]
        assert all(b["peak_bytes"] is not None for b in later)
        fit = 0.0001 * d["free_gib"] * 2 ** 30 / (d["mib_per_token"] * 2 ** 20)    # both rounded in the JSON
        assert d["token_cap"] == 1 if fit < 1 else abs(d["token_cap"] - fit) <= 0.05 * fit + 1, (fit, d)


def test_cluster_signals_reports_each_settings_clusters_and_their_sources(fitted_run, tmp_path):
    """benchmarks/cluster_signals.py on a fitted run: the paper's features, centred ones and
    sentence embeddings, each with C, sizes and the sources of every cluster, which add up to
    the sizes and to every training record once."""
    from elrea.data import load_records
    from elrea.rundir import Run, read_json

    r = _run_script("cluster_signals.py", str(fitted_run), out=tmp_path / "c.json")
    res = r["runs"][str(fitted_run)]
    assert set(res) == {"gradient", "gradient, centred", "sentence embedding"}
    records = load_records(read_json(Run(fitted_run).manifest)["data"])
    for v in res.values():
        assert len(v["members"]) == v["num_clusters"] == len(v["sizes"])
        assert [sum(m.values()) for m in v["members"].values()] == v["sizes"]
        totals = {}
        for m in v["members"].values():
            for s, n in m.items():
                totals[s] = totals.get(s, 0) + n
        assert totals == {s: sum(r.source == s for r in records) for s in {r.source for r in records}}
        assert -1 <= v["ari_vs_source"] <= 1 and 0 <= v["nmi_vs_source"] <= 1


def test_contention_runs_each_setting_alone_and_at_once_in_separate_processes(tmp_path):
    """benchmarks/contention.py --quick: a setting runs as one process and as --copies processes
    at once, each with the threads the setting gives; medians and ratios (to the first row when
    the default is not asked for) follow."""
    r = _run_script("contention.py", "--quick", "--settings", "one thread each", "--copies", "2",
                    "--prompts", "2", "--adapters", "2", "--new-tokens", "4", out=tmp_path / "c.json")
    assert list(r["runs"]) == ["one thread each, alone", "one thread each, 2 at once"]
    assert [len(v) for v in r["runs"].values()] == [1, 2]
    assert {p["threads"] for v in r["runs"].values() for p in v} == {1}
    first = r["median"]["one thread each, alone"]
    for k, v in r["median"].items():
        assert v["prefill_s"] == statistics.median(p["prefill_s"] for p in r["runs"][k]) > 0
        assert r["slowdown_vs_first_row"][k]["step_ms"] == round(v["step_ms"] / first["step_ms"], 2)


def test_center_choice_takes_each_runs_best_validation_trial_and_their_paired_difference(tmp_path, toy_data):
    """benchmarks/center_choice.py on validation answers as the compare writes them: each run's
    best trial per router and over all, the second run's best minus the first's, and no trial of
    one run counted as another's (elrea-center_false-* files are not elrea's)."""
    import numpy as np

    from elrea.data import load_records

    val = toy_data / "test.jsonl"
    records = load_records(val)
    rng = np.random.default_rng(0)
    evals = tmp_path / "work" / "evals"
    evals.mkdir(parents=True)
    answers = {}
    for run in ("elrea", "elrea-center_false"):
        for router in ("gradient", "learned"):
            for tau, k in ((1, 0), (2, 0), (1, 1)):
                correct = rng.integers(0, 2, len(records)).tolist()
                answers[run, router, tau, k] = correct
                (evals / f"validation-{run}-{router}-tau{tau}-top{k}.json").write_text(json.dumps(
                    {"run": str(tmp_path / "work" / "runs" / run), "correct": correct}))
    r = _run_script("center_choice.py", str(tmp_path / "work"), "--validation", str(val), out=tmp_path / "c.json")
    assert r["trials"] == {"elrea": 6, "elrea-center_false": 6}

    def mean_over_sources(correct):
        per = {}
        for rec, c in zip(records, correct):
            per.setdefault(rec.source, []).append(c)
        return float(np.mean([np.mean(v) for v in per.values()]))

    for router in ("gradient", "learned", None):
        picked = {}
        for run in ("elrea", "elrea-center_false"):
            mine = {key: c for key, c in answers.items() if key[0] == run and router in (None, key[1])}
            picked[run] = max(mean_over_sources(c) for c in mine.values())
        got = r["routers"][router or "best of all"]
        for run in picked:
            assert got[run]["validation"] == pytest.approx(picked[run], abs=1e-12)
        d = got["difference"]
        assert abs(d["points"] - 100 * (picked["elrea"] - picked["elrea-center_false"])) < 1e-9
        assert d["ci95"][0] <= d["points"] <= d["ci95"][1]
