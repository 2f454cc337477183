"""Shared fixtures: a tiny Llama built from a config, toy multi-source data, a fitted run."""

import logging
import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models gain nothing from threads, and two OpenMP pools spinning on 2 shared cores (the
# test process and a CLI subprocess) slow each other down by orders of magnitude.
os.environ["OMP_NUM_THREADS"] = "1"
torch.set_num_threads(1)

from elrea.testing import make_tiny_model, make_toy_records, write_jsonl  # noqa: E402

FAST = ["base.epochs=2", "experts.epochs=1", "base.lr=2e-3", "experts.lr=2e-3", "features.dim=512",
        "clustering.min_cluster_size=4", "base.micro_batch_size=8", "experts.micro_batch_size=8",
        "generation.max_new_tokens=6"]


@pytest.fixture(scope="session", autouse=True)
def _cache(tmp_path_factory):
    os.environ["ELREA_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def toy_rows():
    return make_toy_records(64, seed=0)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, toy_rows):
    texts = [r["instruction"] + " " + r["response"] for r in make_toy_records(400, seed=1)]
    return make_tiny_model(tmp_path_factory.mktemp("tiny"), texts)


@pytest.fixture(scope="session")
def tiny64_model_dir(tmp_path_factory):
    """Hidden size 64: bitsandbytes' CPU 4-bit kernels quantize in blocks of 64 input features."""
    texts = [r["instruction"] + " " + r["response"] for r in make_toy_records(400, seed=1)]
    return make_tiny_model(tmp_path_factory.mktemp("tiny64"), texts, hidden=64)


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory, toy_rows):
    d = tmp_path_factory.mktemp("data")
    write_jsonl(d / "train.jsonl", toy_rows)
    write_jsonl(d / "test.jsonl", make_toy_records(12, seed=7))
    return d


@pytest.fixture(scope="session")
def fast_overrides(tiny_model_dir):
    return [f"model.name={tiny_model_dir}"] + FAST


@pytest.fixture(scope="session")
def fitted_run(tmp_path_factory, toy_data, fast_overrides):
    from elrea.config import load_config
    from elrea.pipeline import fit

    out = tmp_path_factory.mktemp("runs") / "toy"
    fit(toy_data / "train.jsonl", out, load_config(None, fast_overrides + ["clustering.num_clusters=4"]))
    return out


@pytest.fixture(scope="session")
def elrea_model(fitted_run):
    from elrea import ELREA

    return ELREA.from_pretrained(fitted_run)


def lora_model(model_dir, seed=0, randomize_b=True):
    """A PEFT LoRA model on the tiny backbone, with non-zero B so every gradient is non-trivial."""
    from peft import get_peft_model

    from elrea.config import LoraConfig, ModelConfig
    from elrea.models import load_backbone, peft_lora_config

    torch.manual_seed(seed)
    model = get_peft_model(load_backbone(ModelConfig(name=str(model_dir))), peft_lora_config(LoraConfig()))
    if randomize_b:
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.2)
    return model.eval()
