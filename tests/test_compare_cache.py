"""`elrea compare`'s pieces on a fitted tiny run: which cached answers are reused (only those of
the same run, records, settings, adapter and checker), which stages a baseline shares, and which
top-k trials a run with few clusters gets."""

import json

import pytest


@pytest.fixture
def work(tmp_path):
    from elrea.compare.runner import _Work
    from elrea.evaluation import exact_checker

    return _Work(tmp_path / "cmp", exact_checker, "exact")


@pytest.fixture
def val(toy_data):
    from elrea.data import load_records

    return load_records(toy_data / "test.jsonl")[:6]


def test_cached_answers_are_reused_only_under_the_same_key(tmp_path, work, val, fitted_run, fast_overrides):
    import dataclasses
    import shutil

    from elrea.compare.runner import _Work
    from elrea.evaluation import Method, exact_checker
    from elrea.rundir import Run

    rd = Run(fitted_run)
    methods = {"lora": (rd, Method(column=0)), "expert": (rd, Method(adapter=str(rd.expert(1))))}
    first = work.outputs_all("validation", methods, val)
    for name, (_, method) in methods.items():
        assert work._cached("validation", name, rd, val, method) == first[name]
        assert json.loads((work.out / "evals" / f"validation-{name}.json").read_text())["key"] == \
            work.key(rd, val, method)
    # another checker, other references, another generation setting: decoded again
    other = _Work(work.out, exact_checker, "multiple_choice")
    assert other._cached("validation", "lora", rd, val, Method(column=0)) is None
    changed = [dataclasses.replace(val[0], response=val[0].response + " 1")] + val[1:]
    assert work._cached("validation", "lora", rd, changed, Method(column=0)) is None
    assert work._cached("validation", "lora", rd, val, Method(column=0, tau=2.0)) is None
    copy = Run(shutil.copytree(fitted_run, tmp_path / "copy"))
    before = work.key(copy, val, Method(column=0))
    cfg = json.loads(copy.config_path.read_text())
    cfg["generation"]["max_new_tokens"] += 1
    copy.config_path.write_text(json.dumps(cfg))
    assert work.key(copy, val, Method(column=0)) != before
    # an adapter folder refitted in place (here: another expert's weights) is another adapter
    folder = shutil.copytree(rd.expert(1), tmp_path / "adapter")
    method = Method(adapter=str(folder))
    key = work.key(rd, val, method)
    shutil.copy(rd.expert(2) / "adapter_model.safetensors", folder / "adapter_model.safetensors")
    assert work.key(rd, val, method) != key
    # and the same everything is the same key (what lets a re-run resume)
    assert work.key(Run(fitted_run), list(val), Method(column=0)) == work.key(rd, val, Method(column=0))


def test_a_cluster_setting_with_other_features_shares_only_the_base_adapter(tmp_path, fitted_run, fast_overrides):
    from elrea.compare.runner import _share
    from elrea.config import load_config
    from elrea.rundir import Manifest, Run

    src = Manifest.load(fitted_run)
    same = Run(tmp_path / "same")
    _share(same, Run(fitted_run), load_config(None, fast_overrides + ["clustering.num_clusters=4",
                                                                      "features.center=false"]))
    assert {s: Manifest.load(same.root).stage(s)["fingerprint"] for s in ("base", "features")} == \
        {s: src.stage(s)["fingerprint"] for s in ("base", "features")}
    full = Run(tmp_path / "full")
    _share(full, Run(fitted_run), load_config(None, fast_overrides + ["clustering.signal=full"]))
    mine = Manifest.load(full.root)
    assert mine.stage("base")["fingerprint"] == src.stage("base")["fingerprint"] and not mine.stage("features")
    assert not full.features.exists()


def test_top_k_counts_the_base_adapter_among_the_weights(tmp_path, work, val, toy_data, fitted_run, fast_overrides):
    """With C = 2 experts a routing weighs 3 adapters: top-2 is a sparse ensemble of its own
    (tried), top-3 is all of them (not tried again)."""
    from elrea.compare.runner import CompareOptions
    from elrea.config import load_config
    from elrea.pipeline import fit
    from elrea.rundir import Run

    rd = Run(tmp_path / "two").share(fitted_run, ("base", "features"))
    fit(toy_data / "train.jsonl", rd.root, load_config(None, fast_overrides + ["clustering.num_clusters=2"]))
    trials = work.validate("two", rd, val, CompareOptions(routers=("gradient",), tau_grid=(1.0,), top_ks=(1, 2, 3)))
    assert {t["num_clusters"] for t in trials} == {2}
    assert sorted(t["top_k"] for t in trials) == [0, 1, 2]
