"""The fit pipeline (elrea.pipeline, elrea.stages): stages declared once, and fingerprints that
stay what earlier versions wrote, so that their run directories resume and load."""

import json

import numpy as np
import pytest

from elrea.config import RunConfig, load_config
from elrea.data import load_records, records_fingerprint
from elrea.pipeline import fingerprints, labels_fingerprint
from elrea.stages import INFERENCE_STAGES, STAGE_NAMES, STAGE_OF_FIELD, STAGES, stage
from elrea.testing import make_toy_records, write_jsonl

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
SETTINGS = {"default": ([], None),
            "centred": (["features.center=true", "clustering.signal=full", "routing.learned_layer=2"], None),
            "labels": (["seed=3"], np.arange(40) % 4)}


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
    other = fingerprints(load_config(None, ["features.center=true"]), "data")
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
