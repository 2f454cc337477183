import json

import pytest

from elrea.config import RunConfig, describe_fields, load_config
from elrea.errors import ConfigError


def test_defaults_follow_the_method():
    c = load_config()
    assert (c.lora.rank, c.lora.alpha, c.lora.dropout, c.lora.target_modules) == (8, 16.0, 0.05, "all-linear")
    assert (c.base.lr, c.experts.lr, c.base.epochs, c.base.batch_size) == (5e-5, 2e-5, 2.0, 16)
    assert (c.features.dim, c.features.train_preconditioner, c.features.test_preconditioner) == (8192, "adam", "sgd")
    assert (c.clustering.method, c.clustering.max_clusters, c.routing.tau) == ("birch", 8, 1.0)


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
    ("routing.tau=0", r"routing.tau: must be > 0"),
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


def test_yaml_with_a_byte_order_mark_loads(tmp_path):
    y = tmp_path / "run.yaml"
    y.write_bytes(b"\xef\xbb\xbflora:\n  rank: 4\n")  # what Windows tools write
    assert load_config(y).lora.rank == 4


@pytest.mark.parametrize("content, match", [
    (b"lora:\n  rank: 4\n  alpha: \xff\n", r"run.yaml:3: not valid UTF-8 \(byte b'\\xff'\)"),
    (b"lora:\n  rank: 4\n dropout: 0.1\n", r"run.yaml:3:2: not valid YAML: while parsing a block mapping; expected"),
    (b"lora:\n  rank: \x00\n", r"run.yaml:2: not valid YAML: special characters are not allowed \(character U\+0000\)"),
    (b"seed: 2024-13-01\n", r"run.yaml: not valid YAML: month must be in 1..12"),
    (b"lora: " + b"[" * 5000 + b"]" * 5000 + b"\n", r"run.yaml: not valid YAML: nested too deeply to read"),
    (b"0\n", r"run.yaml: expected a mapping of sections, got int"),
    (b'"lo ra":\n  rank: 4\n', r"^'lo ra': unknown field; valid: seed, model"),
    (b"base:\n  lr: .nan\n", r"^base.lr: expected a finite number, got nan"),
    (b"base:\n  lr: 1" + b"0" * 400 + b"\n", r"^base.lr: expected a finite number, got 10{400}$"),
    (b'data:\n  system_prompt: "\\ud800"\n', r"^data.system_prompt: not valid Unicode text, got '\\ud800'"),
    (b'model:\n  device: "cpu\\n"\n', r"^model.device: unknown device 'cpu\\n'"),
    (b"lora:\n  target_modules: [q_proj, 2024-01-01]\n",
     r"^lora.target_modules: expected plain data .* got \['q_proj', datetime.date\(2024, 1, 1\)\]"),
    (b"lora:\n  target_modules: &a [q_proj, *a]\n", r"^lora.target_modules: expected plain data"),
    (b"base:\n  trainer_args: {logging_steps: .nan}\n", r"^base.trainer_args: expected plain data"),
])
def test_bad_config_files_fail_with_one_line(tmp_path, content, match):
    y = tmp_path / "run.yaml"
    y.write_bytes(content)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(y)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("override, match", [
    ("seed=2024-13-01", r"^seed: expected an integer, got '2024-13-01'"),  # no date: read as a string
    ("lora.rank=" + "[" * 5000, r"^lora.rank: expected an integer, got '\[\[\["),
    ("base.lr=inf", r"^base.lr: expected a finite number, got inf"),
    ("data.system_prompt=caf\udce9", r"^data.system_prompt: not valid Unicode text"),  # argv bytes not UTF-8
    ("lora\n.rank=4", r"^'lora\\n': unknown field"),
])
def test_bad_overrides_fail_with_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        load_config(None, [override])
    assert "\n" not in str(e.value)


def test_the_routing_temperature_is_tau_and_its_old_name_still_reads(caplog):
    from elrea.config import RunConfig

    with caplog.at_level("WARNING", logger="elrea.config"):
        cfg = load_config(None, ["routing.temperature=0.5"])
    assert cfg.routing.tau == 0.5 and "routing.temperature is deprecated; use routing.tau" in caplog.text
    caplog.clear()
    old = RunConfig().to_dict()
    old["routing"]["temperature"] = old["routing"].pop("tau") * 3   # a run_config.json written before
    assert RunConfig.from_dict(old).routing.tau == 3.0 and not caplog.text
    with pytest.raises(ConfigError, match="routing.temperature and routing.tau are the same setting"):
        load_config(None, ["routing.temperature=0.5", "routing.tau=2"])


def test_a_run_config_written_before_a_field_existed_reads_the_value_runs_had_then(monkeypatch, tmp_path):
    """A stored config without a field added later takes the value every run had before it, not
    today's default (which may have changed since); a user's config file takes today's default."""
    import elrea.config as C
    from elrea.rundir import Run

    def without(fields):
        old = RunConfig().to_dict()
        for dotted in fields:
            section, name = dotted.split(".")
            del old[section][name]
        return old

    # as shipped: centring became the default after runs without it existed
    assert RunConfig().features.center is True and C.ADDED_LATER["features.center"] is False
    assert RunConfig.from_dict(without(C.ADDED_LATER)).features.center is False
    # and as if every default had changed since
    d = RunConfig()
    before = {"features.block_norm": not d.features.block_norm, "features.center": not d.features.center,
              "clustering.signal": "full" if d.clustering.signal != "full" else "instruction"}
    monkeypatch.setattr(C, "ADDED_LATER", before)
    old = without(before)
    got = RunConfig.from_dict(old)
    assert {"features.block_norm": got.features.block_norm, "features.center": got.features.center,
            "clustering.signal": got.clustering.signal} == before
    (tmp_path / "run_config.json").write_text(json.dumps(old))
    assert Run(tmp_path).config().features.center is before["features.center"]
    # written by this version: every field is there and is read as it is
    assert RunConfig.from_dict(RunConfig().to_dict()) == RunConfig()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("features:\n  dim: 512\n")
    assert load_config(str(cfg), []).features.center == RunConfig().features.center
