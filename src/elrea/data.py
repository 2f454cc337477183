"""Data: read instruction records from files, validate them, and tokenize them.

Accepted files: JSONL, JSON (a list of records), CSV, Parquet, or a `datasets` dataset
(a directory saved with `save_to_disk`, or a hub id when the machine is online).

Accepted records (docs/method.md, "Data"):
  {"instruction" | "prompt": str, "response" | "completion" | "output": str,
   "input": str (optional, appended to the instruction), "source": str (optional),
   "references": [str, ...] (optional: other accepted answers, for the exact-match check)}
  {"messages": [{"role": ..., "content": ...}, ...]}  (the last assistant turn is the response)

Text files are UTF-8, with or without the byte-order mark that Windows tools write. A bad file
or record raises `DataError`, one line naming the file, the line (or row) and the field; nothing
is dropped silently. Unknown keys are kept and ignored with one warning.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import reprlib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

INSTRUCTION_KEYS = ("instruction", "prompt")
RESPONSE_KEYS = ("response", "completion", "output")
KNOWN_KEYS = set(INSTRUCTION_KEYS + RESPONSE_KEYS + ("input", "source", "messages", "id", "references"))
PLAIN_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
# Values quoted in error messages: bounded in length and depth, whatever the record holds
_SHOW = reprlib.Repr()
_SHOW.maxlevel, _SHOW.maxstring, _SHOW.maxother = 3, 60, 60


@dataclass
class Record:
    """One example: the chat turns before the response, the response, and its origin."""

    messages: list[dict]          # prompt turns: [{"role": "user", "content": ...}, ...]
    response: str | None
    source: str | None = None
    where: str = ""               # "file:line" for error messages
    extra: dict = field(default_factory=dict)
    references: list[str] = field(default_factory=list)   # other accepted answers

    @property
    def answers(self) -> list[str]:
        """Every accepted answer: the response, then the references."""
        return [a for a in [self.response, *self.references] if a is not None]

    @property
    def instruction(self) -> str:
        return self.messages[-1]["content"]


# ----------------------------------------------------------------------------- reading

def load_records(path: str | Path, require_response: bool = True, config: str | None = None,
                 split: str = "train", revision: str | None = None) -> list[Record]:
    """Read and validate every record of a data file, a datasets directory (`split`), or a hub
    data set id such as `org/name` (`config`, `split`, `revision`; online only)."""
    p = Path(path)
    if p.is_dir():
        rows = _read_datasets_dir(p, split)
    elif p.exists():
        suffix = p.suffix.lower()
        readers = {".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
                   ".parquet": _read_parquet}
        if suffix not in readers:
            raise DataError(f"unsupported file type {suffix!r}; use one of "
                            f"{', '.join(readers)} or a datasets directory", path=str(p))
        rows = readers[suffix](p)
    elif "/" in str(path) and not str(path).startswith((".", "/")):
        rows = _read_hub(str(path), config, split, revision)
    else:
        raise DataError("file not found", path=str(p))
    records, unknown = [], set()
    for loc, row in rows:
        rec = parse_record(row, loc, require_response)
        unknown |= set(rec.extra)
        records.append(rec)
    if not records:
        raise DataError("no records: the file is empty", path=str(path))
    if unknown:
        shown = (k if k.isprintable() else repr(k) for k in sorted(unknown))  # a key may hold a newline
        log.warning("%s: ignoring unknown record keys: %s", path, ", ".join(shown))
    return records


def _decode(p: Path, raw: bytes, line: int = 1) -> str:
    """UTF-8 text of `raw`, the bytes of file `p` from the start of `line` on. A byte-order mark
    is dropped at the start of the file only (Windows tools write one)."""
    if line == 1:
        raw = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        column = e.start - raw.rfind(b"\n", 0, e.start)  # 1-based byte of its line
        raise DataError(f"not valid UTF-8 (byte {column} of the line is {raw[e.start:e.start + 1]!r}); re-save "
                        "the file as UTF-8", path=str(p), line=line + raw.count(b"\n", 0, e.start)) from None


def _parse_json(p: Path, text: str, line: int = 1, expected: str = ""):
    """json.loads, with every failure a DataError naming the line (`text` starts at `line`)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"malformed JSON ({e.msg} at column {e.colno}){expected}", path=str(p),
                        line=line + e.lineno - 1) from None
    except RecursionError:
        raise DataError("JSON nested too deeply to read", path=str(p), line=line) from None
    except ValueError as e:  # an integer of more digits than Python converts (4300 by default)
        raise DataError(f"unreadable JSON ({_first_line(e)})", path=str(p), line=line) from None


def _first_line(e: Exception) -> str:
    """An exception's message as one line (library messages may span several)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _read_jsonl(p: Path):
    with open(p, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            text = _decode(p, raw, line=i)
            if text.startswith("\ufeff"):  # e.g. files written on Windows, then concatenated
                raise DataError("a byte-order mark (U+FEFF) starts this line; only the file's first line may "
                                "have one", path=str(p), line=i)
            if text.strip():  # (without its newline, JSON's errors at the end of the line name this line)
                yield dict(path=str(p), line=i), _parse_json(p, text.rstrip("\n"), i,
                                                             "; each line must be one JSON object")


def _read_json(p: Path):
    data = _parse_json(p, _decode(p, p.read_bytes()))
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError("expected a JSON list of records (or {\"data\": [...]})", path=str(p))
    for i, row in enumerate(data):
        yield dict(path=str(p), line=f"record {i}"), row


def _read_csv(p: Path):
    text = _decode(p, p.read_bytes())
    # the csv module refuses fields over 128 KiB by default; no field is longer than its file
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, [])
    _check_columns(p, header)
    for cells in reader:
        if not cells:  # a blank line
            continue
        loc = dict(path=str(p), line=reader.line_num)  # the record's last line (quoted fields span lines)
        if len(cells) != len(header):
            raise DataError(f"fields on the line: {len(cells)}, columns in the header: {len(header)}", **loc)
        yield loc, {k: v for k, v in zip(header, cells) if v != "" or k in INSTRUCTION_KEYS + RESPONSE_KEYS}


def _read_parquet(p: Path):
    import pyarrow.parquet as pq

    try:  # a corrupt file can also fail late, on a column name or a value that is not UTF-8
        table = pq.read_table(p)
        columns, rows = table.column_names, table.to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for a bad file
        raise DataError(f"cannot read Parquet: {_first_line(e)}", path=str(p)) from None
    _check_columns(p, columns)
    for i, row in enumerate(rows):
        yield dict(path=str(p), line=f"row {i}"), row


def _read_datasets_dir(p: Path, split: str = "train"):
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as e:  # noqa: BLE001
        raise DataError(f"not a datasets directory saved with save_to_disk ({_first_line(e)})",
                        path=str(p)) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"DatasetDict without a {split!r} split (has {list(ds)}); choose one with "
                            "--data-split", path=str(p))
        ds = ds[split]
    _check_columns(p, ds.column_names)
    for i, row in enumerate(ds):
        yield dict(path=str(p), line=f"row {i}"), row


def _read_hub(name: str, config: str | None = None, split: str = "train", revision: str | None = None):
    import datasets

    try:
        ds = datasets.load_dataset(name, config, split=split, revision=revision)
    except Exception as e:  # noqa: BLE001 - offline, unknown id, gated, bad config or split
        raise DataError(f"not a local file, and the hub data set could not be loaded ({type(e).__name__}: "
                        f"{_first_line(e)})", path=name) from None
    _check_columns(name, ds.column_names)
    for i, row in enumerate(ds):
        yield dict(path=name, line=f"row {i}"), row


def _check_columns(p, columns):
    cols = set(columns)
    if "messages" in cols or (cols & set(INSTRUCTION_KEYS)):
        return
    raise DataError(f"no instruction column; found columns {sorted(cols)}, expected one of "
                    f"{list(INSTRUCTION_KEYS)} (plus one of {list(RESPONSE_KEYS)}) or 'messages'",
                    path=str(p))


def records_fingerprint(records: list[Record]) -> str:
    """sha256 of what training reads from the records (turns, response, source): the data part
    of every stage fingerprint, whatever the records came from (a file, a directory, the hub)."""
    import hashlib

    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.messages, r.response, r.source], ensure_ascii=False, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- validation

def parse_record(row, loc: dict, require_response: bool = True) -> Record:
    """Validate one raw row into a Record, or raise DataError naming where and which field.

    `loc` is {"path": ..., "line": int line number or "row N" label}.
    """
    where = DataError("", **loc).args[0].rstrip(": ")
    if not isinstance(row, dict):
        raise DataError(f"expected a JSON object, got {type(row).__name__}", **loc)
    extra = {k: v for k, v in row.items() if k not in KNOWN_KEYS}
    source = row.get("source")
    if source is not None:
        _string(source, "source", loc)
    if "messages" in row:
        messages, response = _parse_messages(row["messages"], loc, require_response)
    else:
        key = next((k for k in INSTRUCTION_KEYS if k in row), None)
        if key is None:
            raise DataError(f"missing instruction: expected one of {list(INSTRUCTION_KEYS)} or "
                            f"'messages'; keys present: {_SHOW.repr(sorted(row))}", **loc)
        instruction = _text(row[key], key, loc)
        extra_input = row.get("input")
        if extra_input not in (None, ""):
            instruction += "\n\n" + _text(extra_input, "input", loc)
        messages = [{"role": "user", "content": instruction}]
        rkey = next((k for k in RESPONSE_KEYS if k in row), None)
        response = None
        if rkey is not None:
            response = _text(row[rkey], rkey, loc)
        elif require_response:
            raise DataError(f"missing response: expected one of {list(RESPONSE_KEYS)}; "
                            f"keys present: {_SHOW.repr(sorted(row))}", **loc)
    references = row.get("references") or []
    if not isinstance(references, list):
        raise DataError(f"expected a list of strings, got {type(references).__name__}", field="references", **loc)
    references = [_string(r, "references", loc) for r in references]
    return Record(messages=messages, response=response, source=source, where=where, extra=extra,
                  references=references)


def _string(value, key, loc) -> str:
    """A string that UTF-8 can encode, as every tokenizer and file writer needs."""
    if not isinstance(value, str):
        raise DataError(f"expected a string, got {type(value).__name__} {_SHOW.repr(value)}", field=key, **loc)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:  # JSON's \ud800-style escapes can encode half a character
        raise DataError(f"unpaired surrogate {value[e.start]!r} at character {e.start} (a \\uD800-\\uDFFF "
                        "escape without its other half)", field=key, **loc) from None
    return value


def _text(value, key, loc) -> str:
    if not _string(value, key, loc).strip():
        raise DataError("is empty", field=key, **loc)
    return value


def _parse_messages(messages, loc, require_response):
    if not isinstance(messages, list) or not messages:
        raise DataError("expected a non-empty list of {role, content} turns", field="messages", **loc)
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise DataError(f"turn {j} must be an object with string 'role' and 'content', got "
                            f"{_SHOW.repr(m)}", field="messages", **loc)
        _string(m["role"], f"messages[{j}].role", loc)
        _string(m["content"], f"messages[{j}].content", loc)
    response = None
    if messages[-1]["role"] == "assistant":
        response = _text(messages[-1]["content"], "messages[-1].content", loc)
        messages = messages[:-1]
    elif require_response:
        raise DataError("the last turn must be the assistant's response", field="messages", **loc)
    if not messages or messages[-1]["role"] != "user":
        raise DataError("the turn before the response must be a user turn", field="messages", **loc)
    _text(messages[-1]["content"], "messages[-2].content", loc)
    return [dict(role=m["role"], content=m["content"]) for m in messages], response


# ----------------------------------------------------------------------------- tokenizing

@dataclass
class Encoded:
    """Token ids and labels (-100 = no loss, transformers' shift convention) of one example."""

    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


class PromptFormatter:
    """Turns records into token ids with the tokenizer's chat template (or a plain template).

    Training examples carry loss on the response tokens only. Instruction-only examples (for
    gradient features) carry loss on the last user turn and the generation prompt; tokens of
    earlier turns and of a system prompt are context only, because they are shared by many
    examples and would add the same gradient to every feature.
    """

    def __init__(self, tokenizer, system_prompt: str | None = None, max_length: int = 2048,
                 truncation: str = "left"):
        self.tok = tokenizer
        self.system_prompt = system_prompt
        self.max_length = max_length
        self.truncation = truncation
        self.has_template = bool(getattr(tokenizer, "chat_template", None))

    def prompt_text(self, messages: list[dict]) -> str:
        if self.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}] + messages
        if self.has_template:
            return self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        context = "".join(f"{m['content']}\n\n" for m in messages[:-1])
        return context + PLAIN_TEMPLATE.format(instruction=messages[-1]["content"])

    def prompt_ids(self, messages: list[dict]) -> tuple[list[int], int]:
        """(ids of the formatted prompt, number of leading context tokens)."""
        text = self.prompt_text(messages)
        special = not self.has_template  # chat templates already write BOS themselves
        ids = self.tok(text, add_special_tokens=special)["input_ids"]
        cut = text.rfind(messages[-1]["content"])
        n_ctx = len(self.tok(text[:cut], add_special_tokens=special)["input_ids"]) if cut > 0 else 0
        return ids, min(n_ctx, len(ids) - 1)

    def _truncate(self, ids: list[int], n_ctx: int, budget: int, where: str) -> tuple[list[int], bool]:
        overflow = len(ids) - budget
        if overflow <= 0:
            return ids, False
        if self.truncation == "strict":
            raise DataError(f"{len(ids) + (self.max_length - budget)} tokens exceed data.max_length="
                            f"{self.max_length}; raise it, or set data.truncation=left to cut the "
                            "instruction from the left", path=where)
        if n_ctx + overflow < len(ids):  # cut the start of the instruction, keep the template head
            return ids[:n_ctx] + ids[n_ctx + overflow:], True
        return ids[overflow:], True

    def encode_train(self, rec: Record) -> Encoded:
        """Prompt + response + EOS; loss on the response (and EOS) only."""
        ids, n_ctx = self.prompt_ids(rec.messages)
        resp = self.tok(rec.response, add_special_tokens=False)["input_ids"]
        if self.tok.eos_token_id is not None:
            resp = resp + [self.tok.eos_token_id]
        if len(resp) >= self.max_length:
            raise DataError(f"the response alone has {len(resp)} tokens, over data.max_length="
                            f"{self.max_length}", path=rec.where, field="response")
        ids, cut = self._truncate(ids, n_ctx, self.max_length - len(resp), rec.where)
        return Encoded(ids + resp, [-100] * len(ids) + resp, cut)

    def encode_raw(self, text: str, add_special_tokens: bool = True) -> Encoded:
        """Text as it is (no chat template: a completion prompt, an lm-eval context); every token
        after the first carries the routing loss. Over-long text keeps its end."""
        ids = self.tok(text, add_special_tokens=add_special_tokens)["input_ids"] or \
            ([self.tok.bos_token_id] if self.tok.bos_token_id is not None else [self.tok.eos_token_id])
        cut = len(ids) > self.max_length
        ids = ids[-self.max_length:]
        return Encoded(ids, [-100] + ids[1:], cut)

    def encode_instruction(self, messages: list[dict], where: str = "") -> Encoded:
        """The prompt alone (no response); loss on the last user turn + generation prompt."""
        ids, n_ctx = self.prompt_ids(messages)
        ids, cut = self._truncate(ids, n_ctx, self.max_length, where)
        if cut:
            n_ctx = min(n_ctx, len(ids) - 1)
        return Encoded(ids, [-100] * n_ctx + ids[n_ctx:], cut)


def is_token_ids(prompts) -> bool:
    """Whether `prompts` are token ids in a form transformers' generate takes (a tensor or array,
    an int or a list of them, a list of such rows, a BatchEncoding or dict with input_ids), not
    text, chats or Encoded examples."""
    from collections.abc import Mapping
    from numbers import Integral

    def row_or_id(x) -> bool:
        return (isinstance(x, Integral) and not isinstance(x, bool)) or hasattr(x, "dtype") or \
            (isinstance(x, (list, tuple)) and bool(x) and isinstance(x[0], Integral))

    if isinstance(prompts, Mapping):
        return "input_ids" in prompts
    if hasattr(prompts, "dtype"):
        return True
    return isinstance(prompts, (list, tuple)) and bool(prompts) and row_or_id(prompts[0])


def token_id_rows(input_ids, attention_mask=None, pad_id: int | None = None,
                  vocab_size: int | None = None) -> list[list[int]]:
    """One list of ids per prompt, padding removed, from token ids as transformers' generate takes
    them: a LongTensor [n, T] or [T], a list of ints, a list of lists of ints, or a BatchEncoding /
    dict with input_ids (and attention_mask). Padding is where attention_mask is 0 (on either
    side); without a mask, `pad_id` at the start or end of a row. Ids must lie in [0, vocab_size)."""
    from collections.abc import Mapping

    if isinstance(input_ids, Mapping):
        if attention_mask is not None and input_ids.get("attention_mask") is not None:
            raise ConfigError("attention_mask: given twice (in the inputs and as attention_mask=); give it once")
        input_ids, attention_mask = input_ids["input_ids"], input_ids.get("attention_mask", attention_mask)
    rows = _rows(input_ids, "input_ids")
    masks = None if attention_mask is None else _rows(attention_mask, "attention_mask")
    if masks is not None and [len(m) for m in masks] != [len(r) for r in rows]:
        raise ConfigError(f"attention_mask: its shape ({len(masks)} rows of {sorted({len(m) for m in masks})} "
                          f"columns) is not that of input_ids ({len(rows)} rows of {sorted({len(r) for r in rows})})")
    out = []
    for i, row in enumerate(rows):
        if masks is not None:
            row = [t for t, keep in zip(row, masks[i]) if keep]
        elif pad_id is not None:
            lo, hi = 0, len(row)
            while lo < hi and row[lo] == pad_id:
                lo += 1
            while hi > lo and row[hi - 1] == pad_id:
                hi -= 1
            row = row[lo:hi]
        if not row:
            raise ConfigError(f"input_ids: prompt {i} has no tokens once its padding is removed")
        bad = next((t for t in row if t < 0 or (vocab_size is not None and t >= vocab_size)), None)
        if bad is not None:
            raise ConfigError(f"input_ids: prompt {i} holds the id {bad}, outside the model's vocabulary "
                              f"[0, {vocab_size})")
        out.append(row)
    return out


def _rows(x, name: str) -> list[list[int]]:
    """A tensor, array or nested list of integers, [T] or [n, T], as a list of rows of Python ints."""
    import torch

    if isinstance(x, (list, tuple)) and x and all(hasattr(r, "dtype") for r in x):   # a list of 1-D tensors
        return [r for t in x for r in _rows(t, name)]
    if isinstance(x, (list, tuple)) and x and isinstance(x[0], (list, tuple)):        # ragged rows are fine
        return [r for t in x for r in _rows(list(t), name)]
    try:
        t = torch.as_tensor(x, device="cpu")
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(f"{name}: expected integers as a tensor [n, T] or [T] or (nested) lists, got "
                          f"{type(x).__name__} ({e})") from None
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dim() not in (1, 2) or t.numel() == 0:
        raise ConfigError(f"{name}: expected a non-empty integer tensor [n, T] or [T], got {t.dtype} of shape "
                          f"{list(t.shape)}")
    return t.reshape(-1, t.shape[-1]).long().tolist()


def encode_ids(ids: list[int]) -> Encoded:
    """Token ids taken as they are (no template, no truncation): every token after the first
    carries the routing loss, as encode_raw's."""
    return Encoded(list(ids), [-100] + list(ids[1:]))


def encode_all(fmt: PromptFormatter, records: list[Record], kind: str = "train", num_proc: int | None = None,
               min_parallel: int = 20_000) -> list[Encoded]:
    """Encode many records: `train` (prompt + response) or `instruction` (prompt only).

    From `min_parallel` records on, tokenisation runs through `datasets.map` in `num_proc`
    processes (default: the CPUs, at most 8); the result is the same as encoding one by one.
    """
    import os

    if kind not in ("train", "instruction"):
        raise ValueError(f"kind: 'train' or 'instruction', got {kind!r}")

    def encode(r: Record) -> Encoded:
        return fmt.encode_train(r) if kind == "train" else fmt.encode_instruction(r.messages, r.where)

    n_proc = min(8, num_proc or os.cpu_count() or 1)
    if len(records) < min_parallel or n_proc < 2:
        return [encode(r) for r in records]
    import datasets

    def batch(rows):
        enc = [encode(records[i]) for i in rows["i"]]
        return {"input_ids": [e.input_ids for e in enc], "labels": [e.labels for e in enc],
                "truncated": [e.truncated for e in enc]}

    ds = datasets.Dataset.from_dict({"i": list(range(len(records)))})
    out = ds.map(batch, batched=True, batch_size=1000, num_proc=n_proc, remove_columns=["i"],
                 keep_in_memory=True, desc=f"tokenizing ({kind})")
    return [Encoded(a, b, c) for a, b, c in zip(out["input_ids"], out["labels"], out["truncated"])]


def collate(batch: list[Encoded], pad_id: int, side: str = "right") -> dict:
    """Pad a list of examples into CPU tensors: input_ids, attention_mask, labels [n, T].

    (Trainer moves them to the model's device; so do the feature and decoding paths.)
    """
    import torch

    T = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), T), pad_id, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(batch), T), dtype=torch.long, device="cpu")
    labels = torch.full((len(batch), T), -100, dtype=torch.long, device="cpu")
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        sl = slice(T - n, T) if side == "left" else slice(0, n)
        # as_tensor: ids may come as tensors (torch.tensor(tensor) warns, and copies twice)
        ids[i, sl] = torch.as_tensor(e.input_ids, dtype=torch.long, device="cpu")
        mask[i, sl] = 1
        labels[i, sl] = torch.as_tensor(e.labels, dtype=torch.long, device="cpu")
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
