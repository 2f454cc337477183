"""The fit pipeline (elrea.pipeline, elrea.stages): stages declared once, fingerprints that stay
what earlier versions wrote (their run directories resume and load), interruption (SIGKILL) and
resumption, reproducibility, and damaged run directories."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import FAST
from elrea.config import RunConfig, load_config
from elrea.data import load_records, records_fingerprint
from elrea.errors import ModelError, RunDirError
from elrea.pipeline import fingerprints, labels_fingerprint
from elrea.rundir import atomic_path, write_json
from elrea.stages import INFERENCE_STAGES, STAGE_NAMES, STAGE_OF_FIELD, STAGES, stage
from elrea.testing import make_tiny_model, make_toy_records, write_jsonl


# Computed by elrea at e4bcf26 (before the stage table) for the settings below: a run directory
# written by that version is skipped stage by stage, not refitted, by this one. The router stage
# is the exception: its fingerprint now hashes the fields each fitted router declares
# (RouterPlugin.fit_fields), so such a run re-fits its routers once (the cheapest stage).
BEFORE = {
    "default": {"base": "38097281c4d29941", "features": "155e15b0b8a2b228", "clusters": "841e14b888e9f49b",
                "experts": "deff9ec9a9ce736d", "router": "b9290822d7241319"},
    "centred": {"base": "38097281c4d29941", "features": "e8531574131641bf", "clusters": "aab634bf861c9911",
                "experts": "5be17e7a669df26a", "router": "8a3b2f79060a91e9"},
    "labels": {"base": "047e668c473a5c53", "features": "ed83957f6251bd41", "clusters": "97368d569151dbd9",
               "experts": "c598e895bc3bedd0", "router": "684f6bb83710a01f"},
}
SETTINGS = {"default": (["features.center=false"], None),   # the defaults of those versions
            "centred": (["features.center=true", "clustering.signal=full", "routing.learned_layer=2"], None),
            "labels": (["seed=3", "features.center=false"], np.arange(40) % 4)}


@pytest.mark.parametrize("name", list(BEFORE))
def test_fingerprints_are_those_earlier_versions_wrote(tmp_path, name):
    write_jsonl(tmp_path / "toy.jsonl", make_toy_records(40, seed=0))
    records = load_records(tmp_path / "toy.jsonl")
    overrides, labels = SETTINGS[name]
    cfg = load_config(None, ["model.name=some-org/some-model"] + overrides)
    given = {} if labels is None else {"clusters": [f"labels:{labels_fingerprint(labels)}"]}
    now = fingerprints(cfg, records_fingerprint(records), given)
    assert {s: now[s] for s in STAGE_NAMES if s != "router"} == {s: v for s, v in BEFORE[name].items() if s != "router"}
    assert now["router"] != BEFORE[name]["router"]


def test_fingerprints_chain_through_the_declared_stages():
    cfg = RunConfig().validate()
    fp = fingerprints(cfg, "data")
    assert list(fp) == list(STAGE_NAMES)
    for section, changed in [("experts", "experts.lr=1e-3"), ("clustering", "clustering.threshold=0.3"),
                             ("features", "features.dim=1024")]:
        other = fingerprints(load_config(None, [changed]), "data")
        moved = {s for s in STAGE_NAMES if other[s] != fp[s]}
        first = next(s for s in STAGES if section in s.sections)
        after = {s.name for s in STAGES if _depends_on(s.name, first.name)}
        assert moved == after, (changed, moved, after)
    # a field given to another stage moves that stage, not its section's
    other = fingerprints(load_config(None, ["features.center=false"]), "data")
    assert other["features"] == fp["features"] and other["clusters"] != fp["clusters"]
    assert STAGE_OF_FIELD["features.center"] == "clusters"


def _depends_on(name: str, root: str) -> bool:
    while name is not None:
        if name == root:
            return True
        name = stage(name).after
    return False


def test_the_stage_table_is_the_one_source():
    from elrea import rundir

    assert STAGE_NAMES == ("base", "features", "clusters", "experts", "router")
    assert INFERENCE_STAGES == ("base", "clusters", "experts")
    assert rundir.check_readable.__defaults__[0] == INFERENCE_STAGES
    for s in STAGES:
        assert callable(s.function()) and (s.after is None or STAGE_NAMES.index(s.after) < STAGE_NAMES.index(s.name))
    with pytest.raises(Exception, match="unknown stage 'nope'; valid: base, features"):
        stage("nope")
    assert json.dumps(STAGE_OF_FIELD)  # plain data: config reads it without importing torch


def _fit_cmd(model, data, out, *extra):
    return [sys.executable, "-m", "elrea.cli", "fit", "--model", str(model), "--data", str(data),
            "--out", str(out), *FAST, "clustering.num_clusters=3", *extra]


def _run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    return r


def _kill_when(cmd, ready, timeout=300):
    """Start cmd, SIGKILL it as soon as ready() is true; fail if it finishes first."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail("the job finished before it could be interrupted")
        if ready():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.005)
    proc.kill()
    pytest.fail("timed out waiting for the interruption point")


def _json(path):
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _features_done(run):
    """Rows committed by every shard's progress record (features/train.progress/rows-*.json)."""
    records = [_json(f) for f in (run / "features" / "train.progress").glob("rows-*.json")]
    return sum(r.get("done", 0) - r.get("start", 0) for r in records)


@pytest.mark.slow
def test_sigkill_during_features_resumes_to_identical_features(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", make_toy_records(300, seed=3))
    run = tmp_path / "run"
    cmd = _fit_cmd(tiny_model_dir, data, run, "base.max_steps=1", "features.batch_size=1",
                   "features.checkpoint_every=1", "experts.max_steps=1")
    _kill_when(cmd, lambda: 20 <= _features_done(run) < 250)
    done_at_kill = _features_done(run)
    assert _json(run / "elrea.json")["stages"]["features"]["status"] == "running"
    r = _run(cmd)
    assert f"resuming at example {done_at_kill}" in r.stderr or "resuming at example" in r.stderr
    assert "stage base: up to date, skipped" in r.stderr
    resumed = np.load(run / "features" / "train.npy")
    fresh = tmp_path / "fresh"
    shutil.copytree(run, fresh)
    _run(_fit_cmd(tiny_model_dir, data, fresh, "base.max_steps=1", "features.batch_size=1",
                  "features.checkpoint_every=1", "experts.max_steps=1", "--from", "features"))
    assert np.array_equal(resumed, np.load(fresh / "features" / "train.npy"))
    assert np.allclose(np.linalg.norm(resumed, axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_sigkill_during_experts_keeps_finished_experts(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", make_toy_records(96, seed=4))
    run = tmp_path / "run"
    cmd = _fit_cmd(tiny_model_dir, data, run, "experts.epochs=40")
    finished = lambda: _json(run / "elrea.json").get("stages", {}).get("experts", {}).get("finished", {})
    _kill_when(cmd, lambda: 1 <= len(finished()) < 3)
    kept = {c: (run / "experts" / c / "adapter_model.safetensors").stat().st_mtime_ns for c in finished()}
    r = _run(cmd)
    assert "already trained, kept" in r.stderr
    for c, mtime in kept.items():
        assert (run / "experts" / c / "adapter_model.safetensors").stat().st_mtime_ns == mtime
    assert _json(run / "elrea.json")["stages"]["experts"]["status"] == "done"
    assert sorted(os.listdir(run / "experts")) == ["1", "2", "3"]


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_same_seed_same_clusters_and_bitwise_identical_adapters(tmp_path, tiny_model_dir, toy_data,
                                                                fitted_run, fast_overrides):
    from elrea.config import load_config
    from elrea.pipeline import fit

    again = tmp_path / "again"
    fit(toy_data / "train.jsonl", again, load_config(None, fast_overrides + ["clustering.num_clusters=4"]))
    a, b = (json.loads((d / "clusters" / "clusters.json").read_text()) for d in (fitted_run, again))
    assert a["labels"] == b["labels"]
    files = ["base/adapter_model.safetensors", "base/adam_moments.safetensors"] + \
            [f"experts/{c}/adapter_model.safetensors" for c in range(1, 5)]
    for f in files:
        assert _digest(fitted_run / f) == _digest(again / f), f
    assert np.array_equal(np.load(fitted_run / "features/train.npy"), np.load(again / "features/train.npy"))


@pytest.mark.slow
def test_changed_data_reruns_everything_and_says_so(tmp_path, fitted_run, toy_data, fast_overrides, caplog):
    import logging

    from elrea.config import load_config
    from elrea.pipeline import fit

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    data = write_jsonl(tmp_path / "changed.jsonl", make_toy_records(64, seed=99))
    with caplog.at_level(logging.INFO):
        fit(data, run, load_config(None, fast_overrides + ["clustering.num_clusters=4"]))
    assert any("stage base: its config, data or backbone changed" in m for m in caplog.messages)
    assert not any("up to date, skipped" in m for m in caplog.messages)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def _without_hashes(run):
    manifest = json.loads((run / "elrea.json").read_text())
    for st in manifest["stages"].values():
        st.pop("files", None)
    (run / "elrea.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage, match", [
    (lambda r: (r / "elrea.json").write_text('{"format": 1, "sta'), "elrea.json: truncated or corrupt JSON"),
    (lambda r: (r / "elrea.json").unlink(), "not an elrea run directory"),
    (lambda r: (r / "experts/2/adapter_model.safetensors").unlink(),
     "experts/2/adapter_model.safetensors: missing or changed since `elrea fit` wrote it"),
    (lambda r: (r / "base/adapter_model.safetensors").write_bytes(b"\x00" * 10),
     "base/adapter_model.safetensors: missing or changed"),
    (lambda r: (r / "clusters/centroids.safetensors").write_bytes(b"{}"), "centroids.safetensors: missing or changed"),
    # a run without the files' hashes (written before they were recorded): the loaders' own errors
    (lambda r: _without_hashes(r) or (r / "experts/2/adapter_model.safetensors").unlink(), "experts/2: adapter missing"),
    (lambda r: _without_hashes(r) or (r / "base/adapter_model.safetensors").write_bytes(b"\x00" * 10),
     "base: cannot load adapter"),
    (lambda r: _without_hashes(r) or (r / "clusters/centroids.safetensors").write_bytes(b"{}"),
     "centroids.safetensors: missing or corrupt"),
])
def test_damaged_run_directory_is_a_clear_error(tmp_path, fitted_run, damage, match):
    from elrea import ELREA

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    damage(run)
    with pytest.raises(RunDirError, match=match):
        ELREA.from_pretrained(run)


def test_truncated_feature_store_is_a_clear_error(tmp_path, fitted_run):
    from elrea.rundir import load_features

    f = tmp_path / "train.npy"
    data = (fitted_run / "features" / "train.npy").read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(RunDirError, match="truncated"):
        load_features(f)


def test_expert_from_another_backbone_is_rejected(tmp_path, fitted_run):
    from peft import get_peft_model

    from elrea import ELREA
    from elrea.config import LoraConfig, ModelConfig
    from elrea.models import load_backbone, peft_lora_config

    other = make_tiny_model(tmp_path / "other", ["some text to train a tokenizer on"] * 5, hidden=48)
    adapter = get_peft_model(load_backbone(ModelConfig(name=str(other))), peft_lora_config(LoraConfig()))
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    shutil.rmtree(run / "experts" / "1")
    adapter.save_pretrained(str(run / "experts" / "1"))
    _without_hashes(run)   # else its changed files are refused before it is loaded
    with pytest.raises(RunDirError, match="experts/1: adapter does not fit this backbone"):
        ELREA.from_pretrained(run)


def test_not_a_causal_lm_is_a_clear_error(tmp_path):
    from transformers import DistilBertConfig

    from elrea.config import ModelConfig
    from elrea.models import load_backbone

    DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=37).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal LM"):
        load_backbone(ModelConfig(name=str(tmp_path)))
    with pytest.raises(ModelError, match="cannot load model"):
        load_backbone(ModelConfig(name=str(tmp_path / "nope")))


@pytest.mark.slow
def test_from_experts_retrains_every_expert(tmp_path, fitted_run, toy_data, fast_overrides):
    """--from forces a stage even when its fingerprint and finished experts say it is done."""
    from elrea.config import load_config
    from elrea.pipeline import fit

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    before = {c: (run / "experts" / str(c) / "adapter_model.safetensors").stat().st_mtime_ns for c in range(1, 5)}
    time.sleep(0.01)
    fit(toy_data / "train.jsonl", run, load_config(None, fast_overrides + ["clustering.num_clusters=4"]),
        from_stage="experts")
    for c, mtime in before.items():
        assert (run / "experts" / str(c) / "adapter_model.safetensors").stat().st_mtime_ns != mtime
    assert _json(run / "elrea.json")["stages"]["experts"]["status"] == "done"


def test_new_weights_under_the_same_model_path_retrain_the_run(tmp_path, toy_data, caplog):
    import logging

    from elrea.pipeline import fit

    texts = [r["instruction"] + " " + r["response"] for r in make_toy_records(400, seed=1)]
    model = make_tiny_model(tmp_path / "model", texts, seed=0)
    cfg = load_config(None, [f"model.name={model}"] + FAST)
    run = tmp_path / "run"
    fit(toy_data / "train.jsonl", run, cfg, until="base")
    first = _json(run / "elrea.json")["stages"]["base"]
    assert first["backbone"]
    make_tiny_model(tmp_path / "model", texts, seed=1)   # other weights, same shapes, same path
    with caplog.at_level(logging.WARNING, logger="elrea.pipeline"):
        fit(toy_data / "train.jsonl", run, cfg, until="base")
    second = _json(run / "elrea.json")["stages"]["base"]
    assert second["backbone"] != first["backbone"] and second["fingerprint"] != first["fingerprint"]
    assert "stage base: its config, data or backbone changed" in caplog.text

    # a run recorded before backbones were fingerprinted resumes as it was
    manifest = _json(run / "elrea.json")
    legacy = fingerprints(cfg, records_fingerprint(load_records(toy_data / "train.jsonl")))["base"]
    manifest["stages"]["base"] = {k: v for k, v in second.items() if k != "backbone"} | {"fingerprint": legacy}
    (run / "elrea.json").write_text(json.dumps(manifest))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="elrea.pipeline"):
        fit(toy_data / "train.jsonl", run, cfg, until="base")
    assert "stage base: up to date, skipped" in caplog.text and "predates backbone fingerprints" in caplog.text
