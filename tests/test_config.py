import json

import pytest

from elrea.config import RunConfig, describe_fields, load_config
from elrea.errors import ConfigError


def test_defaults_follow_the_method():
    c = load_config()
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 16.0, 0.05, "all-linear")
    assert (c.base.lr, c.experts.lr, c.base.epochs, c.base.batch_size) == (5e-5, 2e-5, 2.0, 16)
    assert (c.features.dim, c.features.train_preconditioner, c.features.test_preconditioner) == (8192, "adam", "sgd")
    assert (c.clustering.method, c.clustering.max_clusters, c.routing.temperature) == ("birch", 8, 1.0)


def test_yaml_then_overrides_and_json_round_trip(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_text("lora:\n  rank: 16\nbase:\n  lr: 1e-4\nclustering:\n  num_clusters: 3\n")
    c = load_config(y, ["lora.rank=4", "routing.top_k=2", "data.system_prompt=Be brief."])
    assert (c.lora.rank, c.base.lr, c.clustering.num_clusters, c.routing.top_k) == (4, 1e-4, 3, 2)
    assert c.data.system_prompt == "Be brief."
    again = load_config(None, base=json.loads(json.dumps(c.to_dict())))
    assert again == c


@pytest.mark.parametrize("override, match", [
    ("lora.rank=-1", r"lora.rank: must be > 0, got -1"),
    ("clustering.method=dbscan", r"clustering.method: unknown value 'dbscan'; valid: birch, kmeans"),
    ("routing.temperature=0", r"routing.temperature: must be > 0"),
    ("features.projection=gauss", r"valid: rademacher, sjlt"),
    ("lora.rnak=4", r"lora.rnak: unknown field; valid: rank, alpha"),
    ("lora.rank=abc", r"lora.rank: expected an integer, got 'abc'"),
    ("clustering.num_clusters=1", r"0 \(automatic\) or >= 2"),
    ("rank", r"expected section.field=value"),
])
def test_invalid_values_name_the_field(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, [override])


def test_stage_seeds_differ_and_are_stable():
    c = RunConfig()
    assert c.stage_seed("base") != c.stage_seed("expert-1")
    assert c.stage_seed("base") == RunConfig().stage_seed("base")
    assert all(h for _, _, h in describe_fields())
