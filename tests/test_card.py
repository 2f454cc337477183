"""The model card and `elrea push` (elrea.card): runs as artifacts other tools and machines use:
model card, hub ids, push, the run config name,
hub data sets, Trainer logs, and the CLI conventions users type without thinking."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import FAST
from elrea.errors import DataError, RunDirError
from elrea.testing import make_toy_records, write_jsonl


def elrea(*args, env=None):
    return subprocess.run([sys.executable, "-m", "elrea.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def test_run_directory_is_portable_and_has_a_model_card(fitted_run, tiny_model_dir):
    from elrea.models import portable_name

    # the elrea config is not called config.json (transformers tools read that as a model config)
    assert (fitted_run / "run_config.json").exists() and not (fitted_run / "config.json").exists()
    for adapter in ["base", "experts/1"]:
        cfg = json.loads((fitted_run / adapter / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == str(tiny_model_dir.resolve())
    assert portable_name("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = (fitted_run / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: peft\nbase_model: ")
    for expected in ["## Experts", "| expert_1 |", "## Routing", "ELREA.from_pretrained", "elrea serve"]:
        assert expected in card, expected


def test_old_run_config_name_is_still_read_and_save_pretrained_writes_the_new_one(fitted_run, tmp_path):
    from elrea import ELREA

    old = tmp_path / "old"
    shutil.copytree(fitted_run, old)
    os.replace(old / "run_config.json", old / "config.json")  # a run made before the rename
    m = ELREA.from_pretrained(old, device="cpu")
    out = m.save_pretrained(tmp_path / "exported")
    assert (out / "run_config.json").exists() and not (out / "config.json").exists()
    assert (out / "README.md").read_text().count("## Experts") == 1
    assert ELREA.from_pretrained(out, device="cpu").adapters == m.adapters


def test_hub_ids_fail_clearly_offline(tmp_path, monkeypatch):
    from elrea import ELREA
    from elrea.data import load_records

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RunDirError, match="not a local run directory, and the hub repository could not"):
        ELREA.from_pretrained("someone/some-elrea-run")
    with pytest.raises(DataError, match="someone/some-data: not a local file, and the hub data set could not"):
        load_records("someone/some-data", split="train")
    r = elrea("fit", "--data", "someone/some-data", "--data-split", "train", "--out", tmp_path / "run")
    assert r.returncode == 2 and "hub data set could not be loaded" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "run").exists()  # the data is checked before --out is created


def test_push_dry_run_lists_what_inference_needs(fitted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text("{}\n")  # private data must never be uploaded
    r = elrea("push", run, "me/my-run", "--dry-run")
    assert r.returncode == 0, r.stderr
    for f in ["README.md", "elrea.json", "run_config.json", "base/adapter_model.safetensors",
              "experts/1/adapter_config.json", "clusters/centroids.safetensors"]:
        assert f in r.stdout, f
    assert "train.jsonl" not in r.stdout and "features" not in r.stdout
    assert "ELREA.from_pretrained('me/my-run')" in (run / "README.md").read_text()


def test_a_pushed_run_loads_back_by_hub_id_with_its_routers(fitted_run, elrea_model, tmp_path):
    """What `elrea push` uploads, laid out as the hub cache holds a downloaded repository, loads
    back by its hub id with the learned and embedding routers' files and routes as the run does."""
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    r = elrea("push", run, "me/my-run", "--dry-run")
    assert r.returncode == 0, r.stderr
    listed = [line.strip("│| ").strip() for line in r.stdout.splitlines()]
    assert "router/learned.safetensors" in listed and "router/learned.json" in listed
    snapshot = tmp_path / "hub" / "models--me--my-run" / "snapshots" / ("0" * 40)
    for f in [f for f in listed if (run / f).is_file()]:
        (snapshot / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run / f, snapshot / f)
    (tmp_path / "hub" / "models--me--my-run" / "refs").mkdir()
    (tmp_path / "hub" / "models--me--my-run" / "refs" / "main").write_text("0" * 40)
    prompts = [rec["instruction"] for rec in make_toy_records(6, seed=3)]
    code = ("import json, sys; from elrea import ELREA; m = ELREA.from_pretrained('me/my-run', device='cpu'); "
            "print(json.dumps({'dir': str(m.run_dir), 'w': m.route(json.loads(sys.argv[1]), router='learned').tolist()}))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(prompts)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dir"] == str(snapshot)
    want = elrea_model.route(prompts, router="learned")
    assert torch.allclose(torch.tensor(got["w"]), want, atol=1e-5)


def test_datasets_directory_splits_and_parallel_tokenisation(tmp_path, tiny_model_dir):
    import datasets

    from elrea.config import ModelConfig
    from elrea.data import PromptFormatter, encode_all, load_records, records_fingerprint
    from elrea.models import load_tokenizer

    rows = make_toy_records(40, seed=2)
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                               "dev": datasets.Dataset.from_list(rows[:8])})
    dd.save_to_disk(str(tmp_path / "ds"))
    assert len(load_records(tmp_path / "ds")) == 40 and len(load_records(tmp_path / "ds", split="dev")) == 8
    with pytest.raises(DataError, match="without a 'test' split.*--data-split"):
        load_records(tmp_path / "ds", split="test")
    recs = load_records(write_jsonl(tmp_path / "t.jsonl", rows))
    assert records_fingerprint(recs) == records_fingerprint(load_records(tmp_path / "ds"))
    fmt = PromptFormatter(load_tokenizer(ModelConfig(name=str(tiny_model_dir))))
    for kind in ("train", "instruction"):
        serial = encode_all(fmt, recs, kind)
        parallel = encode_all(fmt, recs, kind, num_proc=2, min_parallel=1)  # through datasets.map
        assert [(e.input_ids, e.labels, e.truncated) for e in parallel] == \
               [(e.input_ids, e.labels, e.truncated) for e in serial]


def test_trainer_logs_and_extra_arguments(tmp_path, tiny_model_dir, toy_data):
    from elrea.config import load_config
    from elrea.errors import ConfigError
    from elrea.pipeline import fit

    cfg = load_config(None, [f"model.name={tiny_model_dir}", *FAST, "base.max_steps=4",
                             "base.trainer_args={lr_scheduler_type: constant, logging_steps: 1}"])
    run = fit(toy_data / "train.jsonl", tmp_path / "run", cfg, until="base")
    meta = json.loads((run / "base" / "training.json").read_text())
    losses = [h for h in meta["log_history"] if "loss" in h]
    assert len(losses) == 4 and {h["learning_rate"] for h in losses} == {2e-3}  # constant schedule
    with pytest.raises(ConfigError, match="base.trainer_args: learning_rate are set by elrea; use base.lr"):
        load_config(None, ["base.trainer_args={learning_rate: 0.1}"])
    with pytest.raises(ConfigError, match="trainer_args: .*no_such_field"):
        fit(toy_data / "train.jsonl", tmp_path / "bad", load_config(None, [
            f"model.name={tiny_model_dir}", *FAST, "base.trainer_args={no_such_field: 1}"]), until="base")
    assert load_config(None, ["base.report_to=tensorboard"]).base.report_to == ["tensorboard"]


def test_cli_conventions(tmp_path, fitted_run):
    from elrea import __version__

    r = elrea("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"elrea {__version__}"
    r = elrea("config")
    assert "experts.lr" not in r.stdout and "2e-05" in r.stdout and "(override: experts.FIELD=VALUE)" in r.stdout
    r = elrea("config", "--dump", tmp_path / "run.yaml")
    assert r.returncode == 0 and (tmp_path / "run.yaml").read_text().count("\n  # ") > 30
    r = elrea("info", fitted_run, "-q")  # -q after the command
    assert r.returncode == 0 and "INFO" not in r.stderr
    r = elrea("generate", tmp_path / "not-a-run")  # arguments checked before any model loads
    assert r.returncode == 2 and "give --prompt TEXT or --input" in r.stderr
    r = elrea("route", fitted_run, "--input", tmp_path / "missing.jsonl")
    assert r.returncode == 2 and "missing.jsonl: file not found" in r.stderr and "Loading weights" not in r.stderr
