"""Fuzzing the data loader and the config parser (hypothesis).

Property: every input either loads (records that fit can use, a RunConfig that survives its
JSON round trip) or raises the project's user error as one line naming the file (data: and the
line or record, and the field where there is one; config: the file, or the field or override)
- never another exception, which the CLI would print as a traceback.

TARGETS holds, per target, a generator of inputs and the check of that property;
benchmarks/fuzz.py runs the same generators for a fixed number of inputs per target.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elrea.cli import main as cli_main
from elrea.config import describe_fields, load_config
from elrea.data import KNOWN_KEYS, load_records, records_fingerprint
from elrea.errors import ConfigError, DataError

BOM = codecs.BOM_UTF8

# ----------------------------------------------------------------------------- generators: values

def mostly(usual, odd):
    """`usual` three times in four, else `odd`: most inputs are near-valid, so that a file of
    several records still loads now and then."""
    return st.integers(0, 3).flatmap(lambda i: odd if i == 0 else usual)


# characters that have broken parsers: NUL, BOM, line and paragraph separators, CR, quotes and
# separators, a zero-width space, an emoji, and unpaired surrogates (from JSON \ud800 escapes,
# or undecodable bytes in a command-line argument)
ODD_CHARS = "\x00\ufeff\u2028\u2029\r\n\t\"',\\é\u200b🙂\ud800\udcff"
texts = st.text(min_size=1, max_size=12)                                   # any unicode but surrogates
odd_texts = st.text(st.one_of(st.characters(), st.sampled_from(ODD_CHARS)), max_size=12)
names = st.text(max_size=8)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | odd_texts,   # floats include nan, inf
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(names, inner, max_size=4),
    max_leaves=12)

# ----------------------------------------------------------------------------- generators: records

DATA_KEYS = sorted(KNOWN_KEYS) + ["meta"]
ROLES = ["system", "user", "assistant"]
record_texts = mostly(texts, odd_texts)
turns = st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": record_texts})
good_records = st.fixed_dictionaries(
    {"instruction": record_texts, "response": record_texts},
    optional={"input": record_texts, "source": record_texts, "meta": json_values}) | st.builds(
    lambda history, q, a: {"messages": history + [{"role": "user", "content": q},
                                                  {"role": "assistant", "content": a}]},
    st.lists(turns, max_size=2), record_texts, record_texts)
any_records = st.dictionaries(st.sampled_from(DATA_KEYS) | names,
                              odd_texts | json_values | st.lists(turns | json_values, max_size=3), max_size=5)


@st.composite
def nested(draw, inner=good_records) -> str:
    """A JSON text nested 0 to 3,000 levels deep (lists or objects) around a value."""
    depth = draw(st.integers(0, 3000))
    opener, closer = draw(st.sampled_from([("[", "]"), ('{"a": ', "}")]))
    return opener * depth + json.dumps(draw(inner)) + closer * depth


@st.composite
def json_texts(draw, usual=good_records) -> str:
    """One record as JSON: mostly `usual`; else any object or value, or one nested deep, alone
    or as a field's value, or a field holding a number too long for Python to convert."""
    value = nested(odd_texts) | st.integers(4000, 5000).map(lambda n: "9" * n)
    field = st.tuples(st.sampled_from(["input", "meta"]), value).map(
        lambda kv: f'{{"instruction": "q", "response": "a", "{kv[0]}": {kv[1]}}}')
    odd = any_records.map(json.dumps) | json_values.map(json.dumps) | nested() | field
    return draw(mostly(usual.map(lambda r: json.dumps(r, ensure_ascii=draw(st.booleans()))), odd))


@st.composite
def encoded(draw, text: str) -> bytes:
    """UTF-8 bytes of `text`, maybe after a byte-order mark; unpaired surrogates become the
    invalid bytes that some writers produce."""
    return (BOM if draw(st.booleans()) else b"") + text.encode("utf-8", "surrogatepass")


# ----------------------------------------------------------------------------- generators: files

@st.composite
def jsonl_files(draw) -> bytes:
    lines = draw(st.lists(json_texts(), max_size=4))
    newline = draw(st.sampled_from(["\n", "\r\n", "\n\n"]))
    return draw(encoded(newline.join(lines) + draw(st.sampled_from(["", newline]))))


@st.composite
def json_files(draw) -> bytes:
    rows = "[" + ", ".join(draw(st.lists(json_texts(), max_size=4))) + "]"
    text = draw(mostly(st.sampled_from([rows, f'{{"data": {rows}}}']), json_texts(json_values)))
    return draw(encoded(text))


@st.composite
def csv_files(draw) -> bytes:
    header = draw(mostly(st.sampled_from([["instruction", "response"], ["prompt", "completion", "source"]]),
                         st.lists(st.sampled_from(DATA_KEYS) | names, min_size=1, max_size=4)))
    widths = mostly(st.just(len(header)), st.integers(max(0, len(header) - 1), len(header) + 1))
    cells = mostly(texts, odd_texts)
    rows = [draw(st.lists(cells, min_size=w, max_size=w)) for w in draw(st.lists(widths, max_size=4))]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=draw(st.sampled_from(["\n", "\r\n"])))
    writer.writerow(header)
    writer.writerows(rows)
    return draw(encoded(buf.getvalue()))


@st.composite
def parquet_files(draw) -> bytes:
    """Typed columns, as Parquet stores them: text, numbers, booleans, bytes, chat turns or nulls."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = draw(st.integers(0, 4))
    kinds = [texts, st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(), st.booleans(), st.binary(max_size=8),
             st.lists(turns, max_size=3)]
    table = {}
    if draw(st.booleans()):
        table = {"instruction": draw(st.lists(texts, min_size=n, max_size=n)),
                 "response": draw(st.lists(texts, min_size=n, max_size=n))}
    for name in draw(st.lists(st.sampled_from(DATA_KEYS) | names, max_size=3, unique=True)):
        table[name] = draw(st.lists(draw(st.sampled_from(kinds)) | st.none(), min_size=n, max_size=n))
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(table or {"x": [None] * n}), sink)
    return sink.getvalue().to_pybytes()


SPLICES = st.sampled_from([BOM, b"\x00", b"\xff", b"\xc3", b"\xed\xa0\x80", b"\n", b"\r", b'"', b",", b"{",
                           b"]", b": "]) | st.binary(min_size=1, max_size=4)


@st.composite
def spliced(draw, files) -> bytes:
    """A generated file with one to three edits: bytes (a BOM, NUL, invalid UTF-8, a quote...)
    inserted or overwritten anywhere, or the end cut off; one in ten is random bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    data = bytearray(draw(files))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        edit = draw(st.sampled_from(["insert", "overwrite", "cut"]))
        if edit == "cut":
            del data[at:]
        else:
            chunk = draw(SPLICES)
            data[at:at + (len(chunk) if edit == "overwrite" else 0)] = chunk
    return bytes(data)


# ----------------------------------------------------------------------------- generators: configs

DEFAULTS = {name: default for name, default, _ in describe_fields()}
# values YAML reads in odd ways: impossible dates, binary, NaN, self-referencing anchors, sets,
# Python tags, block text, escapes of half a character, unclosed brackets and quotes, numbers
# beyond the range of floats
YAML_SNIPPETS = ["2024-13-01", "2024-01-01", "!!binary aGk=", ".nan", "-.inf", "&a [*a]", "!!set {a, b}", "~",
                 '"\\ud800"', "0x1F", "1_000", "1e-3", "yes", "[]", "{}", "!!python/tuple [1]", "|\n    two\n    lines",
                 "!foo bar", "'open", "[1, 2", "{a: 1}", "? [a]\n  : b", "*undefined", "@x", "%", "`", "- a\n- b",
                 "[2024-01-01]", "{a: !!binary aGk=}", "{a: .nan}", "{1: a}", "1" + "0" * 400]
config_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | odd_texts,
                             lambda inner: st.lists(inner, max_size=3) | st.dictionaries(names, inner, max_size=3),
                             max_leaves=6)
field_names = mostly(st.sampled_from(sorted(DEFAULTS)), names)


@st.composite
def yaml_files(draw) -> bytes:
    """A structure written by yaml.safe_dump (mostly fields at their defaults), or hand-written
    `section: field: value` lines with odd YAML scalars."""
    if draw(st.booleans()):
        doc: dict = {}
        for dotted in draw(st.lists(field_names, max_size=5)):
            section, _, name = dotted.rpartition(".")
            node = doc.setdefault(section, {}) if section else doc
            if isinstance(node, dict):  # not when a random top-level key took the section's name
                node[name] = draw(mostly(st.just(DEFAULTS.get(dotted)), config_values))
        text = yaml.safe_dump(doc, allow_unicode=draw(st.booleans()))
    else:
        lines = []
        for dotted in draw(st.lists(field_names, max_size=4)):
            section, _, name = dotted.rpartition(".")
            value = draw(st.sampled_from(YAML_SNIPPETS) | odd_texts)
            lines.append(f"{section}:\n  {name}: {value}" if section else f"{name}: {value}")
        text = "\n".join(lines) + "\n"
    return draw(encoded(text))


@st.composite
def overrides(draw) -> str:
    """`section.field=value`: mostly a field at its default (as JSON, which YAML reads), else odd."""
    name = draw(field_names)
    value = draw(mostly(st.just(json.dumps(DEFAULTS.get(name))), st.sampled_from(YAML_SNIPPETS) | odd_texts))
    return draw(mostly(st.just(f"{name}={value}"), odd_texts))


override_lists = st.lists(overrides(), max_size=4)

# ----------------------------------------------------------------------------- the property


def _one_line(message: str):
    assert len(message.splitlines()) == 1 and "\n" not in message, f"not one line: {message!r}"


def check_data(suffix: str):
    """load_records on a file with that suffix: 'loaded' (records whose every text encodes, as
    fit needs to fingerprint them) or 'error' (a clear DataError); anything else propagates."""
    def check(content: bytes, tmp: Path) -> str:
        path = tmp / f"data{suffix}"
        path.write_bytes(content)
        try:
            records_fingerprint(load_records(path))
        except DataError as e:
            _one_line(str(e))
            assert str(e).startswith(str(path)), f"does not name the file: {e}"
            assert e.field is None or e.line is not None, f"names a field but not its line or record: {e}"
            return "error"
        return "loaded"
    return check


# a config error names the file, or starts with the field (or override) it is about
_NAMES_FIELD = re.compile(r"(override |[\w.]+: |'.*': |\".*\": )")


def _config_outcome(run, path: Path | None = None) -> str:
    try:
        cfg = run()
    except ConfigError as e:
        _one_line(str(e))
        assert (path is not None and str(e).startswith(str(path))) or _NAMES_FIELD.match(str(e)), \
            f"names neither the file nor the field: {e}"
        return "error"
    # the run directory keeps the resolved config as JSON and resumes from it
    assert load_config(None, base=json.loads(json.dumps(cfg.to_dict()))) == cfg
    return "loaded"


def check_yaml(content: bytes, tmp: Path) -> str:
    path = tmp / "run.yaml"
    path.write_bytes(content)
    return _config_outcome(lambda: load_config(path), path)


def check_overrides(items: list[str], tmp: Path) -> str:
    return _config_outcome(lambda: load_config(None, items))


TARGETS = {  # name: (generator, check)
    "jsonl": (jsonl_files(), check_data(".jsonl")),
    "jsonl bytes": (spliced(jsonl_files()), check_data(".jsonl")),
    "json": (json_files(), check_data(".json")),
    "json bytes": (spliced(json_files()), check_data(".json")),
    "csv": (csv_files(), check_data(".csv")),
    "csv bytes": (spliced(csv_files()), check_data(".csv")),
    "parquet": (parquet_files(), check_data(".parquet")),
    "parquet bytes": (spliced(parquet_files()), check_data(".parquet")),
    "config yaml": (yaml_files(), check_yaml),
    "config yaml bytes": (spliced(yaml_files()), check_yaml),
    "config overrides": (override_lists, check_overrides),
}

FUZZ = settings(max_examples=200, deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_input_loads_or_fails_with_one_clear_line(target, tmp_path):
    generate, check = TARGETS[target]

    @FUZZ
    @given(generate)
    def run(value):
        assert check(value, tmp_path) in ("loaded", "error")

    run()


# ----------------------------------------------------------------------------- through the CLI

def _cli(args: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = cli_main(args)
    return code, err.getvalue()


@settings(FUZZ, max_examples=20)
@given(data=st.data())
def test_cli_fit_on_bad_data_or_config_exits_2_with_one_line(data, tmp_path_factory):
    """Generated inputs are too few records to fit (16 at the least), or not a config and data at all:
    every one must stop at exit status 2 with one `elrea: error:` line."""
    tmp = tmp_path_factory.mktemp("cli")
    target = data.draw(st.sampled_from(list(TARGETS)))
    generate, _ = TARGETS[target]
    value = data.draw(generate)
    if target == "config overrides":  # after "--": an override may start with "-"
        args = ["--data", str(tmp / "missing.jsonl"), "--out", str(tmp / "run"), "--", *value]
    elif target.startswith("config"):
        (tmp / "run.yaml").write_bytes(value)
        args = ["--config", str(tmp / "run.yaml"), "--data", str(tmp / "missing.jsonl"), "--out", str(tmp / "run")]
    else:
        data_file = tmp / f"data.{target.split()[0]}"
        data_file.write_bytes(value)
        args = ["--data", str(data_file), "--out", str(tmp / "run")]
    code, err = _cli(["fit", *args])
    assert code == 2 and err.startswith("elrea: error: ") and "Traceback" not in err, err
    _one_line(err.rstrip("\n"))
    assert not (tmp / "run").exists()  # bad input fails before the run directory is made


@pytest.mark.parametrize("content, expected", [
    (b'{"instruction": "a", "response": "b"}\n\xef\xbb\xbf{"instruction": "c", "response": "d"}\n',
     r"data.jsonl:2: a byte-order mark \(U\+FEFF\) starts this line"),
    (b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b', "response": "b"}\n',
     r"data.jsonl:1: JSON nested too deeply"),
], ids=["BOM on line 2", "nested 5000 deep"])
def test_the_installed_command_prints_one_line_without_traceback(tmp_path, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_bytes(content)
    elrea = Path(sys.executable).with_name("elrea")
    r = subprocess.run([str(elrea), "fit", "--data", str(data), "--out", str(tmp_path / "run")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("elrea: error: ")]
    assert len(errors) == 1 and re.search(expected, errors[0]), r.stderr
