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


def test_unknown_keys_warn_once(tmp_path, caplog):
    p = _write(tmp_path / "x.jsonl", [json.dumps({"instruction": "a", "response": "b", "meta": i}) + "\n"
                                      for i in range(3)])
    with caplog.at_level(logging.WARNING):
        recs = load_records(p)
    assert len(recs) == 3 and recs[0].extra == {"meta": 0}
    assert sum("unknown record keys: meta" in m for m in caplog.messages) == 1


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
