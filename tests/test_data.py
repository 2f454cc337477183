"""Data formats, record validation with file:line errors, tokenization and truncation."""

import json
import logging

import pytest

from elrea.config import ModelConfig
from elrea.data import PromptFormatter, load_records
from elrea.errors import DataError
from elrea.models import load_tokenizer


def _write(path, lines):
    path.write_text("".join(lines), encoding="utf-8")
    return path


def test_all_formats_give_the_same_records(tmp_path, toy_rows):
    import datasets
    import pandas as pd

    rows = toy_rows[:5]
    _write(tmp_path / "a.jsonl", [json.dumps(r) + "\n" for r in rows])
    (tmp_path / "a.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "a.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    got = [load_records(tmp_path / name) for name in ("a.jsonl", "a.json", "a.csv", "a.parquet", "ds")]
    for recs in got:
        assert [(r.instruction, r.response, r.source) for r in recs] == \
               [(r["instruction"], r["response"], r["source"]) for r in rows]


def test_alternative_keys_input_and_messages(tmp_path):
    p = _write(tmp_path / "x.jsonl", [
        json.dumps({"prompt": "Q1", "completion": "A1"}) + "\n",
        json.dumps({"instruction": "Translate", "input": "chat", "output": "cat"}) + "\n",
        json.dumps({"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "Hi"},
                                 {"role": "assistant", "content": "Hello"}]}) + "\n"])
    a, b, c = load_records(p)
    assert (a.instruction, a.response) == ("Q1", "A1")
    assert b.instruction == "Translate\n\nchat" and b.response == "cat"
    assert c.messages[0]["role"] == "system" and c.instruction == "Hi" and c.response == "Hello"


@pytest.mark.parametrize("line, match", [
    ('{"instruction": "a", "response": "b"', r"x.jsonl:2: malformed JSON"),
    ('{"response": "b"}', r"x.jsonl:2: missing instruction"),
    ('{"instruction": "a"}', r"x.jsonl:2: missing response"),
    ('{"instruction": "  ", "response": "b"}', r"x.jsonl:2: field 'instruction': is empty"),
    ('{"instruction": 3, "response": "b"}', r"x.jsonl:2: field 'instruction': expected a string, got int"),
    ('{"instruction": "a", "response": "b", "source": 5}', r"field 'source': expected a string"),
    ('[1, 2]', r"x.jsonl:2: expected a JSON object"),
    ('{"instruction": "a", "response": "b", "references": "b"}', r"x.jsonl:2: field 'references': expected a list"),
    ('{"instruction": "a", "response": "b", "references": ["b", 2]}', r"field 'references': expected a string"),
    ('{"messages": [{"role": "user", "content": "a"}]}', r"the last turn must be the assistant"),
])
def test_bad_records_name_file_line_and_field(tmp_path, line, match):
    p = _write(tmp_path / "x.jsonl", ['{"instruction": "ok", "response": "ok"}\n', line + "\n"])
    with pytest.raises(DataError, match=match):
        load_records(p)


def test_non_utf8_empty_file_and_bad_columns(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b'{"instruction": "ok", "response": "ok"}\n{"instruction": "caf\xe9", "response": "b"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:2: not valid UTF-8"):
        load_records(p)
    with pytest.raises(DataError, match="empty"):
        load_records(_write(tmp_path / "e.jsonl", ["\n"]))
    (tmp_path / "c.csv").write_text("question,answer\nq,a\n")
    with pytest.raises(DataError, match=r"c.csv: no instruction column; found columns \['answer', 'question'\]"):
        load_records(tmp_path / "c.csv")
    with pytest.raises(DataError, match="unsupported file type"):
        load_records(_write(tmp_path / "x.txt", ["hi"]))
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "missing.jsonl")


BOM = b"\xef\xbb\xbf"  # what Windows tools write at the start of a UTF-8 file
OK = b'{"instruction": "a", "response": "b"}\n'


@pytest.mark.parametrize("name, content", [
    ("x.jsonl", b'{"instruction": "a", "response": "b"}\r\n{"instruction": "c", "response": "d"}\r\n'),
    ("x.json", b'[{"instruction": "a", "response": "b"},\r\n {"instruction": "c", "response": "d"}]'),
    ("x.csv", b"instruction,response\r\na,b\r\nc,d\r\n"),
])
def test_a_byte_order_mark_at_the_start_is_read_past(tmp_path, name, content):
    (tmp_path / name).write_bytes(BOM + content)
    assert [(r.instruction, r.response) for r in load_records(tmp_path / name)] == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize("name, content, match", [
    ("x.jsonl", OK + BOM + OK, r"^\S*x.jsonl:2: a byte-order mark \(U\+FEFF\) starts this line; only the file's first"),
    ("x.jsonl", b'{"instruction": ' + b"[" * 5000 + b"]" * 5000 + b', "response": "b"}\n',
     r"x.jsonl:1: JSON nested too deeply to read"),
    ("x.json", b"[" * 5000 + b"]" * 5000, r"x.json:1: JSON nested too deeply to read"),
    ("x.jsonl", OK + b'{"instruction": "a", "response": "b", "id": ' + b"9" * 5000 + b"}\n",
     r"x.jsonl:2: unreadable JSON \(Exceeds the limit \(4300 digits\)"),
    ("x.jsonl", b'{"instruction": "half \\ud800", "response": "b"}\n',
     r"x.jsonl:1: field 'instruction': unpaired surrogate '\\ud800' at character 5"),
    ("x.jsonl", b'{"messages": [{"role": "system", "content": "\\udcff"}, {"role": "user", "content": "a"}, '
                b'{"role": "assistant", "content": "b"}]}\n', r"x.jsonl:1: field 'messages\[0\].content': unpaired"),
    ("x.json", BOM + b'[\n{"instruction": "a", "response": "b"},\n{"instruction": "caf\xe9"}]',
     r"x.json:3: not valid UTF-8 \(byte 21 of the line is b'\\xe9'\)"),
    ("x.json", b'[\n{"instruction": "a",\n "response": }]',
     r"x.json:3: malformed JSON \(Expecting value at column 14\)"),
    ("x.csv", b"instruction,response\na,b\nc,d,e\n", r"x.csv:3: fields on the line: 3, columns in the header: 2"),
    ("x.csv", b"instruction,response,source\na,b\n", r"x.csv:2: fields on the line: 2, columns in the header: 3"),
    ("x.csv", b"instruction,response\n" + b"a,b\n" * 5000 + b"\xff,b\n", r"x.csv:5002: not valid UTF-8"),
], ids=["jsonl BOM on line 2", "jsonl nested deep", "json nested deep", "jsonl long integer", "jsonl surrogate",
        "jsonl surrogate in a turn", "json not UTF-8", "json malformed", "csv long row", "csv short row",
        "csv not UTF-8 far in"])
def test_bad_files_fail_with_one_line_naming_file_and_line(tmp_path, name, content, match):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match) as e:
        load_records(tmp_path / name)
    assert "\n" not in str(e.value)


def test_a_corrupt_parquet_file_fails_with_one_line(tmp_path):
    import pandas as pd

    pd.DataFrame([{"instruction": "a", "response": "b"}]).to_parquet(tmp_path / "x.parquet")
    raw = (tmp_path / "x.parquet").read_bytes()
    (tmp_path / "x.parquet").write_bytes(raw.replace(b"response", b"r\xffsponse"))  # a column name not UTF-8
    with pytest.raises(DataError, match=r"x.parquet: cannot read Parquet: [^\n]*$"):
        load_records(tmp_path / "x.parquet")


def test_csv_fields_of_any_length_and_quoted_across_lines(tmp_path):
    long = "x" * 200_000  # over the csv module's default limit of 128 KiB per field
    (tmp_path / "x.csv").write_text(f'instruction,response\n{long},b\n"two\nlines",d\n\n"e",\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"x.csv:6: field 'response': is empty"):
        load_records(tmp_path / "x.csv")
    (tmp_path / "x.csv").write_text(f'instruction,response\n{long},b\n"two\nlines",d\n', encoding="utf-8")
    assert [r.instruction for r in load_records(tmp_path / "x.csv")] == [long, "two\nlines"]


def test_unknown_keys_warn_once(tmp_path, caplog):
    p = _write(tmp_path / "x.jsonl", [json.dumps({"instruction": "a", "response": "b", "meta": i}) + "\n"
                                      for i in range(3)])
    with caplog.at_level(logging.WARNING):
        recs = load_records(p)
    assert len(recs) == 3 and recs[0].extra == {"meta": 0}
    assert sum("unknown record keys: meta" in m for m in caplog.messages) == 1


def test_an_unknown_key_with_a_newline_keeps_the_warning_on_one_line(tmp_path, caplog):
    p = _write(tmp_path / "x.jsonl", [json.dumps({"instruction": "a", "response": "b", "x\ny": 1}) + "\n"])
    with caplog.at_level(logging.WARNING):
        load_records(p)
    assert caplog.messages == [f"{p}: ignoring unknown record keys: 'x\\ny'"]


def test_training_labels_cover_response_only(tiny_model_dir, tmp_path):
    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    fmt = PromptFormatter(tok)
    rec = load_records(_write(tmp_path / "x.jsonl", ['{"instruction": "Add 1 and 2.", "response": "3"}\n']))[0]
    e = fmt.encode_train(rec)
    n_resp = sum(1 for x in e.labels if x != -100)
    assert tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != -100]) == "3<|im_end|>"
    assert e.input_ids[-n_resp:] == e.labels[-n_resp:]
    inst = fmt.encode_instruction(rec.messages)
    text = tok.decode([t for t, l in zip(inst.input_ids, inst.labels) if l != -100])
    assert text.startswith("Add 1 and 2.") and text.endswith("assistant\n")


def test_truncation_left_by_default_strict_on_request(tiny_model_dir, tmp_path):
    tok = load_tokenizer(ModelConfig(name=str(tiny_model_dir)))
    long = "word " * 200
    rec = load_records(_write(tmp_path / "x.jsonl", [json.dumps({"instruction": long + "END", "response": "ok"}) + "\n"]))[0]
    e = PromptFormatter(tok, max_length=64).encode_train(rec)
    assert e.truncated and len(e.input_ids) == 64
    assert "END" in tok.decode(e.input_ids) and tok.decode(e.input_ids).startswith("<|im_start|>user")
    with pytest.raises(DataError, match=r"x.jsonl:1: .*exceed data.max_length=64"):
        PromptFormatter(tok, max_length=64, truncation="strict").encode_train(rec)
