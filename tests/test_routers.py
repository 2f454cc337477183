"""Routers (gradient, embedding, learned, uniform) behind one protocol, their similarity weights,
the router stage, centring,
block normalisation, given clusters, and the registries that config names without importing."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from elrea import config as C
from elrea.routers import ROUTERS, keep_top_k, similarity_weights


PROMPTS = ["Add 3 and 4.", "Reverse the word abc.", "Uppercase the word dog.", "Subtract 2 from 9."]


def test_registries_list_their_plugins_and_resolve_them_lazily():
    from elrea.clustering import birch
    from elrea.features import adam_from_run
    from elrea.projection import SparseProjector
    from elrea.registry import CLUSTERERS, PRECONDITIONERS, PROJECTORS
    from elrea.routers.learned import LearnedRouter
    from elrea.tasks import CHECKER_NAMES, EXTERNAL_MIXTURES, MIXTURES

    # one router per module of elrea/routers/ (not the "_" helpers)
    assert ROUTERS.names() == ("embedding", "gradient", "learned", "uniform")
    assert ROUTERS.get("learned").build is LearnedRouter and ROUTERS.get("learned").fit_fields
    assert ROUTERS.get("gradient").fit is None
    assert PROJECTORS.names() == ("rademacher", "sjlt") and PROJECTORS.get("sjlt") is SparseProjector
    assert PRECONDITIONERS.names() == ("adam", "sgd") and PRECONDITIONERS.get("adam") is adam_from_run
    assert CLUSTERERS.names() == ("birch", "kmeans") and CLUSTERERS.get("birch") is birch
    assert set(CHECKER_NAMES) == {"auto", "exact", *MIXTURES, *EXTERNAL_MIXTURES}


def test_a_plugin_is_one_module_of_its_package(tmp_path, monkeypatch):
    from elrea.registry import Registry

    pkg = tmp_path / "my_plugins"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "_helper.py").write_text("X = 1\n")
    (pkg / "doubler.py").write_text("PLUGIN = lambda x: 2 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("thing", package="my_plugins")
    assert reg.names() == ("doubler",) and "my_plugins.doubler" not in sys.modules  # listed, not imported
    assert reg.get("doubler")(21) == 42
    with pytest.raises(C.ConfigError, match="unknown thing 'tripler'; valid: doubler"):
        reg.get("tripler")


def test_a_router_registered_from_outside_is_validated_and_routes(elrea_model):
    from elrea.routers import RouterPlugin

    class LastExpert:
        name = "last"

        def __init__(self, model):
            self.k = len(model.adapters)

        def signal(self, examples):
            return torch.zeros(len(examples), 0)

        def weights(self, signal, n, tau=1.0, top_k=0):
            return F.one_hot(torch.full((n,), self.k - 1), self.k).float()

    ROUTERS.register("last", RouterPlugin(build=LastExpert))
    try:
        assert C.load_config(None, ["routing.router=last"]).routing.router == "last"
        w = elrea_model.route(PROMPTS, router="last")
        assert (w[:, -1] == 1).all()
    finally:
        ROUTERS.unregister("last")
    with pytest.raises(C.ConfigError, match="valid: embedding, gradient, learned, uniform"):
        C.load_config(None, ["routing.router=last"])


def test_no_import_circles():
    """config validates without importing implementations; evaluation does not import tasks."""
    code = ("import sys, elrea.config as c, elrea.evaluation; c.load_config(None, ['routing.router=learned']);"
            "print(sorted(m for m in sys.modules if m.startswith('elrea.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert not loaded & {"elrea.clustering", "elrea.projection", "elrea.routers", "elrea.tasks", "elrea.features"}


def test_unknown_router_is_a_config_error():
    from elrea.errors import ConfigError

    with pytest.raises(ConfigError, match="routing.router.*valid: embedding, gradient, learned, uniform"):
        C.load_config(None, ["routing.router=nearest"])


def test_router_stage_is_done_and_fingerprinted(fitted_run):
    m = json.loads((fitted_run / "elrea.json").read_text())
    st = m["stages"]["router"]
    assert st["status"] == "done" and st["learned"]["classes"] == [1, 2, 3, 4]
    assert 0 <= st["learned"]["cv_accuracy"] <= 1 and st["learned"]["train_accuracy"] >= st["learned"]["cv_accuracy"] - 1
    assert (fitted_run / "router" / "learned.safetensors").exists()
    assert (fitted_run / "router" / "embedding.safetensors").exists()


@pytest.mark.parametrize("router", sorted(ROUTERS))
def test_every_router_gives_weights_that_sum_to_one(elrea_model, router):
    w = elrea_model.route(PROMPTS, router=router)
    assert w.shape == (len(PROMPTS), len(elrea_model.adapters)) and w.device.type == "cpu"
    assert torch.allclose(w.sum(1), torch.ones(len(PROMPTS)), atol=1e-5) and (w >= 0).all()
    one = elrea_model.route(PROMPTS, router=router, top_k=1)
    if router != "uniform":
        assert ((one > 0).sum(1) == 1).all()
    # precomputed signal: the same weights without recomputing it
    sig = elrea_model.router(router).signal(elrea_model.encode(PROMPTS))
    assert torch.allclose(elrea_model.route(router=router, features=sig), w, atol=1e-6)


def test_learned_router_hidden_states_match_transformers(elrea_model):
    """The early-stopped pooled state equals hidden_states[layer] of a full forward of the
    backbone with adapters disabled, averaged over the instruction tokens."""
    from elrea.data import collate
    from elrea.routers.learned import hidden_states, resolve_layer

    m = elrea_model
    enc = m.encode(PROMPTS)
    layer = resolve_layer(m.model, -1)
    got = hidden_states(m.model, enc, layer, "mean", m.tokenizer.pad_token_id)
    with m.model.disable_adapter(), torch.no_grad():
        for i, e in enumerate(enc):
            b = collate([e], m.tokenizer.pad_token_id)
            hs = m.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            keep = b["labels"][0] != -100
            ref = hs.hidden_states[layer][0][keep].mean(0)
            assert torch.allclose(got[i], ref, atol=1e-5)


def test_learned_router_weights_are_the_classifier_probabilities(elrea_model):
    from sklearn.linear_model import LogisticRegression  # noqa: F401 - the classifier family
    from elrea.routers.learned import classifier_logits

    r = elrea_model.router("learned")
    sig = r.signal(elrea_model.encode(PROMPTS))
    p = torch.softmax(classifier_logits(r.tensors, sig), 1)
    w = r.weights(sig, len(PROMPTS), 1.0, 0)
    assert torch.allclose(w[:, 0], torch.zeros(len(PROMPTS))) and torch.allclose(w[:, 1:], p, atol=1e-6)
    sharp = r.weights(sig, len(PROMPTS), 0.25, 0)[:, 1:]
    assert torch.allclose(sharp, p ** 4 / (p ** 4).sum(1, keepdim=True), atol=1e-5)


def test_learned_router_fits_the_clusters_it_learned(fitted_run, elrea_model):
    """On its own training instructions the classifier reproduces its recorded training accuracy."""
    from elrea.data import load_records
    from elrea.rundir import Run

    rd = Run(fitted_run)
    labels = rd.labels()
    recs = load_records(json.loads((fitted_run / "elrea.json").read_text())["data"])
    w = elrea_model.route([r.messages for r in recs], router="learned")
    acc = float((w.argmax(1).numpy() == labels).mean())
    meta = json.loads((rd.router / "learned.json").read_text())
    assert abs(acc - meta["train_accuracy"]) < 1e-6


def test_embedding_router_matches_its_definition(fitted_run, elrea_model):
    from safetensors.torch import load_file

    from elrea.data import encode_all, load_records
    from elrea.routers.embedding import embed, instruction_texts

    rd_cent = load_file(str(fitted_run / "router" / "embedding.safetensors"))["centroids"]
    recs = load_records(json.loads((fitted_run / "elrea.json").read_text())["data"])
    enc = encode_all(elrea_model.formatter, recs, "instruction")
    texts = instruction_texts(elrea_model.tokenizer, enc)
    assert texts[0].startswith(recs[0].instruction)   # the instruction (and the generation prompt's role)
    X = embed(texts)
    labels = torch.tensor(json.loads((fitted_run / "clusters" / "clusters.json").read_text())["labels"])
    assert torch.allclose(rd_cent[0], X.mean(0), atol=1e-5)
    assert torch.allclose(rd_cent[2], X[labels == 2].mean(0), atol=1e-5)
    w = elrea_model.route(PROMPTS, router="embedding", tau=0.5)
    ref = similarity_weights(embed(instruction_texts(elrea_model.tokenizer, elrea_model.encode(PROMPTS))), rd_cent, 0.5)
    assert torch.allclose(w, ref, atol=1e-5)


def test_block_norm_matches_per_layer_normalised_gradients(tiny_model_dir):
    from conftest import lora_model
    from elrea.data import collate
    from elrea.features import batch_features, layer_of, lora_param_names, per_example_gradients
    from elrea.projection import RademacherProjector
    from elrea.data import Encoded

    model = lora_model(tiny_model_dir).eval()
    batch = collate([Encoded([1, 5, 7, 9], [-100, 5, 7, 9]), Encoded([1, 8, 3], [-100, 8, 3])], 0)
    g = per_example_gradients(model, batch)                       # (2, p)
    names = lora_param_names(model)
    sizes = [p.numel() for n, p in model.named_parameters() if n in set(names)]
    proj = RademacherProjector(g.shape[1], 64, seed=3)
    parts, start = {}, 0
    for n, k in zip(names, sizes):
        parts.setdefault(layer_of(n), []).append(g[:, start:start + k])
        start += k
    scaled = torch.cat([torch.cat(v, 1) / torch.cat(v, 1).norm(dim=1, keepdim=True) for v in parts.values()], 1)
    ref = F.normalize(proj.project(scaled), dim=1)
    got = batch_features(model, batch, proj, block_norm=True)
    assert len(parts) == 2 and torch.allclose(got, ref, atol=1e-5)
    plain = batch_features(model, batch, proj)
    assert not torch.allclose(plain, got, atol=1e-3)


def test_center_and_signal_fingerprints():
    base = C.load_config(None, ["features.center=false"])   # the paper's features, as before centring existed
    center = C.load_config(None, [])
    full = C.load_config(None, ["features.center=false", "clustering.signal=full"])
    block = C.load_config(None, ["features.center=false", "features.block_norm=true"])
    f = lambda c: c.section_hash("features", stage="features")  # noqa: E731
    k = lambda c: c.section_hash("clustering", stage="clusters")  # noqa: E731
    assert f(center) == f(base) and k(center) != k(base)          # centring is the clusters stage's
    assert f(full) != f(base) and k(full) == k(base)              # the signal is the features stage's
    assert f(block) != f(base)
    # a run fitted before these fields existed keeps its fingerprints
    import hashlib
    d = base.to_dict()["features"]
    for name in ("checkpoint_every", "block_norm", "center"):
        d.pop(name)
    old = hashlib.sha256(json.dumps({"features": d}, sort_keys=True).encode()).hexdigest()[:16]
    assert f(base) == old


def test_centred_run_stores_the_mean_and_routes_in_that_space(tmp_path, toy_data, fast_overrides):
    from safetensors.numpy import load_file

    from elrea import ELREA
    from elrea.config import load_config
    from elrea.pipeline import fit
    from elrea.rundir import Run, load_features

    rd = Run(tmp_path / "c")
    fit(toy_data / "train.jsonl", rd.root, load_config(None, fast_overrides + ["clustering.num_clusters=4",
                                                                              "features.center=true"]))
    X = np.asarray(load_features(rd.features)[:])
    stored = load_file(str(rd.centroids))
    assert np.allclose(stored["feature_mean"], X.mean(0), atol=1e-6)
    Xc = (X - X.mean(0)) / np.linalg.norm(X - X.mean(0), axis=1, keepdims=True)
    labels = rd.labels()
    assert np.allclose(stored["centroids"][1], Xc[labels == 1].mean(0), atol=1e-5)
    m = ELREA.from_pretrained(rd.root)
    raw = m.features(PROMPTS)
    sig = m.router("gradient").signal(m.encode(PROMPTS))
    assert torch.allclose(sig, F.normalize(raw - torch.tensor(X.mean(0)), dim=1), atol=1e-5)
    assert json.loads(rd.clusters_json.read_text())["centered"] is True


def test_given_labels_are_the_clusters_and_fingerprinted_by_partition(tmp_path, toy_data, toy_rows, fitted_run,
                                                                      fast_overrides):
    from elrea.config import load_config
    from elrea.pipeline import fit
    from elrea.rundir import Manifest, Run

    cfg = load_config(None, fast_overrides + ["clustering.num_clusters=4"])
    rd = Run(tmp_path / "src").share(fitted_run, ("base", "features"))
    sources = [r["source"] for r in toy_rows]
    fit(toy_data / "train.jsonl", rd.root, cfg, labels=sources, until="clusters")
    info = json.loads(rd.clusters_json.read_text())
    assert info["given_labels"] and info["ari_vs_source"] == 1.0
    m = Manifest.load(rd.root)
    assert m.stage("base")["fingerprint"] == Manifest.load(fitted_run).stage("base")["fingerprint"]
    renamed = {s: f"group-{i}" for i, s in enumerate(sorted(set(sources)))}
    fit(toy_data / "train.jsonl", rd.root, cfg, labels=[renamed[s] for s in sources], until="clusters")
    assert Manifest.load(rd.root).stage("clusters")["time"] == m.stage("clusters")["time"]   # skipped


def test_weights_follow_similarity_and_sum_to_one():
    cent = torch.eye(4)
    feats = torch.tensor([[0.1, 0.9, 0.2, 0.0], [0.0, 0.0, 0.1, 1.0]])
    w = similarity_weights(feats, cent)
    assert torch.allclose(w.sum(1), torch.ones(2))
    assert w[0].argmax() == 1 and w[1].argmax() == 3


def test_standardised_softmax_matches_formula():
    cent = torch.randn(5, 16)
    f = torch.randn(3, 16)
    s = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(cent, dim=1).T
    z = (s - s.mean(1, keepdim=True)) / s.std(1, unbiased=False, keepdim=True)
    for tau in (0.5, 1.0, 2.0):
        assert torch.allclose(similarity_weights(f, cent, tau), torch.softmax(z / tau, 1), atol=1e-6)


def test_equal_similarities_give_uniform_weights():
    cent = torch.ones(3, 4)
    w = similarity_weights(torch.randn(2, 4), cent)
    assert torch.allclose(w, torch.full((2, 3), 1 / 3))


def test_temperature_sharpens_and_top_k_keeps_k():
    cent, f = torch.randn(6, 8), torch.randn(4, 8)
    cold, hot = similarity_weights(f, cent, 0.25), similarity_weights(f, cent, 4.0)
    assert (cold.max(1).values > hot.max(1).values).all()
    w = similarity_weights(f, cent, 1.0, top_k=2)
    assert ((w > 0).sum(1) == 2).all() and torch.allclose(w.sum(1), torch.ones(4))
    assert torch.equal(keep_top_k(w, 0), w)
