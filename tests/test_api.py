"""The inference facade (elrea.api.ELREA): the routing checks every caller shares, and the device
rule: every inference path builds its tensors on the backbone's device.

With `torch.set_default_device("meta")` active while the model sits on the CPU, any tensor
created without naming a device lands on "meta" and the first operation mixing it with the
model's CPU tensors fails, so a path that would break on a GPU (a device mismatch) breaks
here first.
"""

import contextlib

import numpy as np
import pytest
import torch

from elrea import fastlora
from elrea.config import ModelConfig
from elrea.config import check_device_name
from elrea.distributed import processes, resolve_device
from elrea.errors import ConfigError, ModelError

PROMPTS = ["Add 3 and 4.", "Reverse the word hello please.", "Uppercase the word kiwi."]


@contextlib.contextmanager
def default_device_meta():
    torch.set_default_device("meta")
    try:
        yield
    finally:
        torch.set_default_device(None)


def _outputs(m):
    w = m.route(PROMPTS)
    greedy = m.generate(PROMPTS, weights=w, max_new_tokens=5)
    sampled = m.generate(PROMPTS, weights=w, max_new_tokens=5, temperature=0.8, top_p=0.9, seed=3)
    scores = m.score(PROMPTS[0], ["7", "8 and more"])
    uniform = m.route(PROMPTS, router="uniform")
    return w, greedy, sampled, scores, uniform


@pytest.mark.parametrize("grouped", [True, False], ids=["grouped-lora", "peft-mixed-batch"])
def test_inference_follows_the_model_device(elrea_model, monkeypatch, grouped):
    m = elrea_model
    if not grouped:  # PEFT's own mixed-adapter batches (QLoRA, DoRA, ... take this path)
        monkeypatch.setattr(fastlora, "supported", lambda model, adapters: False)
    expected = _outputs(m)
    with default_device_meta():
        got = _outputs(m)
        feats = m.features(PROMPTS)
    assert feats.device == m.device and feats.dtype == torch.float32
    # on a GPU the model is on CUDA, whose backward reductions are not bitwise repeatable
    # (measured on an H200: routing weights equal to 4 decimals, not bit for bit)
    assert torch.allclose(got[0], expected[0], atol=1e-5) and got[0].device.type == "cpu"
    assert got[1] == expected[1] and got[2] == expected[2]
    assert np.allclose(got[3], expected[3]) and torch.equal(got[4], expected[4])


def test_training_features_follow_the_model_device(elrea_model, tmp_path):
    """The fit features stage's path (Featurizer.extract into the feature store) under the guard."""
    from elrea.rundir import FeatureStore

    m = elrea_model
    enc = [m.formatter.encode_instruction([{"role": "user", "content": p}]) for p in PROMPTS * 3]
    store = FeatureStore(tmp_path / "f.npy", len(enc), m.featurizer.projector.dim, "x")
    store.prepare()
    reference = m.featurizer.features(enc).cpu().numpy()
    with default_device_meta():
        m.featurizer.extract(enc, store, checkpoint_every=1)
    assert store.complete()
    assert np.allclose(np.load(tmp_path / "f.npy"), reference, atol=1e-6)


def test_device_names_are_checked():
    check_device_name("auto")
    check_device_name("cuda:1")
    for bad in ["gpu", "cuda:x", "tpu"]:
        with pytest.raises(ConfigError, match="valid: auto, cpu, cuda"):
            check_device_name(bad)
    assert resolve_device("cpu") == torch.device("cpu")
    assert processes("auto").device == (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_missing_cuda_is_a_clear_error(tiny_model_dir):
    from elrea.models import load_backbone

    with pytest.raises(ModelError, match="CUDA is not available on this machine.*--device cpu"):
        load_backbone(ModelConfig(name=str(tiny_model_dir), device="cuda"))


def test_device_is_not_part_of_any_fingerprint():
    from elrea.config import load_config

    a = load_config(None, ["model.device=cpu", "base.gradient_checkpointing=true"])
    b = load_config(None, ["model.device=cuda:3", "features.checkpoint_every=2"])
    for sections in [("model",), ("base",), ("features",), ("seed", "model", "data", "lora", "base")]:
        assert a.section_hash(*sections) == b.section_hash(*sections)
    assert load_config(None, ["model.dtype=bfloat16"]).section_hash("model") != a.section_hash("model")


def test_routing_settings_are_checked_once_for_every_caller(elrea_model):
    k = len(elrea_model.adapters)
    elrea_model.check_routing(weights=[1.0] + [0.0] * (k - 1), router="learned", tau=0.5, top_k=1)
    for kwargs, param, message in [
        (dict(weights=[1.0]), "weights", f"{k} non-negative numbers summing to 1"),
        (dict(weights=[0.5] * k), "weights", "summing to 1"),
        (dict(router="magic"), "router", "unknown 'magic'; valid: embedding, gradient, learned, uniform"),
        (dict(tau=0.0), "tau", "must be > 0"),
        (dict(top_k=-1), "top_k", "must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=message) as e:
            elrea_model.check_routing(**kwargs)
        assert e.value.param == param and str(e.value).startswith(f"{param}: ")
