"""BIG-bench as a multi-task instruction mixture ("bigbench-mix"), with BIG-Bench-Hard held out.

The task JSONs come from the `bigbench` 1.0.0 source distribution on PyPI (358 MB): read from
the .tar.gz itself or from an unpacked copy (`--bigbench PATH`), or fetched once into elrea's
cache (`$ELREA_CACHE/bigbench/`, default ~/.cache/elrea) from the package index that pip uses.
It is fetched by its index link, not with `pip download`: pip refuses this sdist because its
metadata declares a direct-URL dependency (bleurt), and it has no wheel. The file's SHA-256 is
checked against the index's and against the one this module pins.

Tasks: every `benchmark_tasks/<task>/task.json` with examples (127 in 1.0.0), plus, for the
BBH tasks logical_deduction and tracking_shuffled_objects, the union of their subtasks (three,
five and seven objects), as BBH itself has them. An example becomes a record
{"id", "instruction", "response", "references", "source": <task>} in one of two formats:

- multiple choice, when the task is scored by `multiple_choice_grade` and the example has 2 to
  MAX_OPTIONS options (`target_scores`): the task prefix, the input, then "Options:" and one
  "- option" line each, in BIG-bench's order; the response is the best-scored option, and
  `references` every option with that score (an example whose options all score the same is
  dropped);
- generative, when the task is scored by `exact_str_match` and the example has a `target`: the
  task prefix and the input; the response is the target (the first, when it is a list), and
  `references` all of them; also a multiple-choice example with more than MAX_OPTIONS options,
  no target and one right option (dyck_languages): the right option is the response.

Examples of other tasks (BLEU/ROUGE-only, and the like) are not used: exact match would be the
wrong check for them. Instructions longer than `max_chars` and responses longer than
`max_response_chars` are dropped (a small model on a CPU; both are settings).

Splits: an input belongs to train (70%), validation (10%) or in-distribution test (20%) by a
hash of (seed, input text), so one input is never in two splits, whichever tasks contain it.
Training tasks are drawn with the seed from the eligible non-BBH tasks (`tasks` of them, or the
ones named), each giving `train` / `validation` / `test` records (fewer when it has fewer).

BBH held out: the 20 BBH tasks that are JSON in the sdist (BBH_TASKS; boolean_expressions,
multistep_arithmetic_two and web_of_lies are programmatic there) never enter the training
mixture; `bbh` records of each form `bbh.jsonl`. The contamination check drops any example of
a training task whose normalised input equals a BBH input, counts what it dropped (in the
README and mixture.json), and then asserts that no BBH input is left in train, validation or
test.

Answers are checked by `elrea.evaluation.exact_checker`: exact match after normalisation
against the response or any of `references`; for multiple choice, that is the text of a right
option. `elrea data export` writes mixture.json beside the files, so the checker "auto" knows
them.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import random
import re
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import ConfigError, DataError, ElreaError
from .evaluation import normalize_answer

log = logging.getLogger(__name__)

NAME = "bigbench-mix"
SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
DEFAULT_INDEX = "https://pypi.org/simple"
MAX_OPTIONS = 10
SPLIT_SHARES = {"train": 70, "validation": 10, "test": 20}

# BIG-Bench-Hard (Suzgun et al., 2022): BBH name -> BIG-bench task directory, for the 20 of its
# 23 tasks that are JSON in the 1.0.0 sdist
BBH_TASKS = {
    "causal_judgement": "causal_judgment",
    "date_understanding": "date_understanding",
    "disambiguation_qa": "disambiguation_qa",
    "dyck_languages": "dyck_languages",
    "formal_fallacies": "formal_fallacies_syllogisms_negation",
    "geometric_shapes": "geometric_shapes",
    "hyperbaton": "hyperbaton",
    "logical_deduction": "logical_deduction",
    "movie_recommendation": "movie_recommendation",
    "navigate": "navigate",
    "object_counting": "object_counting",
    "penguins_in_a_table": "penguins_in_a_table",
    "reasoning_about_colored_objects": "reasoning_about_colored_objects",
    "ruin_names": "ruin_names",
    "salient_translation_error_detection": "salient_translation_error_detection",
    "snarks": "snarks",
    "sports_understanding": "sports_understanding",
    "temporal_sequences": "temporal_sequences",
    "tracking_shuffled_objects": "tracking_shuffled_objects",
    "word_sorting": "word_sorting",
}
MERGED_SUBTASKS = {"logical_deduction", "tracking_shuffled_objects"}   # tasks that are their subtasks
_TASK_JSON = re.compile(r"(?:^|/)benchmark_tasks/([^/]+)/(?:([^/]+)/)?task\.json$")


@dataclass
class Task:
    """One BIG-bench task: its name and its examples as records (before splitting)."""

    name: str
    records: list[dict] = field(default_factory=list)   # {"instruction", "response", "references"}
    skipped: int = 0                                     # examples that fit neither format or size


# ----------------------------------------------------------------------------- the sdist

def cache_path() -> Path:
    from .models import cache_dir

    return cache_dir() / "bigbench" / SDIST


def locate(path: str | Path | None = None, download: bool = True, index_url: str | None = None) -> Path:
    """The BIG-bench source to read: `path` (the .tar.gz, an unpacked sdist, or its
    benchmark_tasks folder), else the cached sdist, fetched first when `download`."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.exists():
            raise ConfigError(f"--bigbench {p}: not found; give the {SDIST} file or the folder it "
                              "unpacks to, or leave --bigbench out to fetch it into elrea's cache")
        return p
    cached = cache_path()
    if cached.exists():
        return cached
    if not download:
        raise ElreaError(f"{cached} is missing; run `elrea data export {NAME} --out DIR` once online, "
                         f"or pass --bigbench PATH to a copy of {SDIST}")
    return fetch(cached, index_url)


def fetch(target: Path, index_url: str | None = None) -> Path:
    """Download the sdist from the package index (pip's PIP_INDEX_URL, else PyPI) into `target`,
    checking its SHA-256; written to a temporary file first, so nothing partial is kept."""
    index = (index_url or os.environ.get("PIP_INDEX_URL") or DEFAULT_INDEX).rstrip("/")
    page_url = f"{index}/bigbench/"
    try:
        with urllib.request.urlopen(_index_page(page_url), timeout=60) as r:
            page = r.read().decode("utf-8", "replace")
    except OSError as e:
        raise ElreaError(f"cannot read the package index {page_url} ({e}); pass --bigbench PATH to "
                         f"a downloaded {SDIST} (`pip download` cannot fetch it: it has a direct-URL "
                         "dependency; fetch the file from its PyPI page instead)") from e
    link = next((urllib.parse.urljoin(page_url, href) for href in re.findall(r'href="([^"]+)"', page)
                 if urllib.parse.urlparse(href).path.endswith("/" + SDIST) or href.split("#")[0] == SDIST), None)
    if link is None:
        raise ElreaError(f"{page_url} lists no {SDIST}; pass --bigbench PATH to a copy of it")
    url, _, fragment = link.partition("#")
    listed = dict(kv.split("=", 1) for kv in fragment.split("&") if "=" in kv).get("sha256")
    if listed and listed != SDIST_SHA256:
        raise ElreaError(f"{page_url} lists {SDIST} with SHA-256 {listed}, not the pinned {SDIST_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
    digest = hashlib.sha256()
    log.info("fetching %s (358 MB, once) into %s", url, target.parent)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=120) as r:
            total = int(r.headers.get("Content-Length") or 0) or None
            from tqdm.auto import tqdm

            with tqdm(total=total, unit="B", unit_scale=True, desc=SDIST, disable=None) as bar:
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
        if digest.hexdigest() != SDIST_SHA256:
            raise ElreaError(f"{url}: SHA-256 {digest.hexdigest()} is not the pinned {SDIST_SHA256}; "
                             "nothing was kept")
        os.replace(tmp, target)
    except OSError as e:
        raise ElreaError(f"downloading {url} failed ({e}); nothing was kept. Re-run, or pass "
                         f"--bigbench PATH to a copy of {SDIST}") from e
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


def _index_page(url: str):
    if url.startswith("file:"):     # a local index in pip's layout: <name>/index.html
        return url + "index.html"
    return urllib.request.Request(url, headers={"Accept": "text/html"})


def _task_files(source: Path) -> Iterator[tuple[str, str | None, bytes]]:
    """(task, subtask or None, JSON bytes) of every task.json in `source`."""
    if source.is_dir():
        for p in sorted(source.rglob("task.json")):
            m = _TASK_JSON.search(p.as_posix())
            if m:
                yield m.group(1), m.group(2), p.read_bytes()
        return
    try:
        with tarfile.open(source, mode="r|*") as tar:
            for member in tar:
                m = _TASK_JSON.search(member.name)
                if m and member.isfile():
                    yield m.group(1), m.group(2), tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"not a readable BIG-bench sdist ({e}); fetch it again (delete the file) or "
                        "give the folder it unpacks to", path=str(source)) from e


def read_tasks(source: Path, max_chars: int = 1000, max_response_chars: int = 100,
               names: set[str] | None = None) -> dict[str, Task]:
    """Every usable task in `source` (or those in `names`), its examples as records."""
    tasks: dict[str, Task] = {}
    found = False
    for task, sub, raw in _task_files(source):
        found = True
        if (sub is not None) != (task in MERGED_SUBTASKS) or (names is not None and task not in names):
            continue
        where = f"{source}:{task}" + (f"/{sub}" if sub else "")
        try:
            spec = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise DataError(f"not valid JSON ({e})", path=where) from e
        if not isinstance(spec, dict) or not isinstance(spec.get("examples"), list):
            continue
        t = tasks.setdefault(task, Task(task))
        for i, example in enumerate(spec["examples"]):
            rec = to_record(spec, example, f"{where} example {i}")
            if rec is None or len(rec["instruction"]) > max_chars or len(rec["response"]) > max_response_chars:
                t.skipped += 1
            else:
                t.records.append(rec)
    if not found:
        raise DataError("no benchmark_tasks/<task>/task.json inside; give the bigbench-1.0.0 sdist "
                        "(.tar.gz) or the folder it unpacks to", path=str(source))
    return {k: v for k, v in tasks.items() if v.records}


def to_record(spec: dict, example: dict, where: str = "") -> dict | None:
    """One BIG-bench example as {"instruction", "response", "references", "text": the input alone},
    or None when it fits neither format (see the module docstring)."""
    if not isinstance(example, dict) or not isinstance(example.get("input"), str):
        return None
    metrics = spec.get("metrics") or []
    prefix = (spec.get("task_prefix") or "").strip()
    text = example["input"].strip("\n").rstrip()   # leading spaces may be ASCII art (mnist_ascii)
    if not text.strip():
        return None
    head = f"{prefix}\n\n{text}" if prefix and prefix not in text else text
    target = example.get("target")
    right, options = _options(example.get("target_scores")) if "multiple_choice_grade" in metrics else ([], [])
    if right and len(options) <= MAX_OPTIONS:
        listed = "\n".join(f"- {o}" for o in options)
        return {"instruction": f"{head}\n\nOptions:\n{listed}", "response": right[0], "references": right,
                "text": text}
    if len(right) == 1 and target is None:
        # too many options to list (dyck_languages: every closing sequence): the right one, generated
        return {"instruction": head, "response": right[0], "references": right, "text": text}
    if "exact_str_match" in metrics and target is not None:
        targets = [target] if isinstance(target, str) else target
        if not isinstance(targets, list) or not targets or not all(isinstance(x, str) and x.strip() for x in targets):
            return None
        targets = [x.strip() for x in targets]
        return {"instruction": head, "response": targets[0], "references": targets, "text": text}
    return None


def _options(scores) -> tuple[list[str], list[str]]:
    """(the best-scored options, all options) of `target_scores`; ([], []) when it has fewer than
    two options, a non-numeric score, an empty option, or no option better than another."""
    if not isinstance(scores, dict) or len(scores) < 2:
        return [], []
    try:
        values = {str(k).strip(): float(v) for k, v in scores.items()}
    except (TypeError, ValueError):
        return [], []
    best = max(values.values())
    right = [o for o, v in values.items() if v == best]
    if len(right) == len(values) or any(not o for o in values) or len(values) < len(scores):
        return [], []
    return right, list(values)


# ----------------------------------------------------------------------------- the mixture

def _split_of(seed: int, text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(f"{NAME}\x1f{seed}\x1f{text}".encode()).digest()[:4], "big") % 100
    for split, share in SPLIT_SHARES.items():
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError("split shares must sum to 100")


def build(tasks: dict[str, Task], n_tasks: int = 12, train: int = 300, validation: int = 30,
          test: int = 60, bbh: int = 50, seed: int = 0, include: list[str] | None = None) -> tuple[dict, dict]:
    """The splits {"train", "validation", "test", "bbh"} -> records, and what was done (info)."""
    bbh_dirs = set(BBH_TASKS.values())
    missing_bbh = sorted(n for n, d in BBH_TASKS.items() if d not in tasks)
    bbh_inputs = {normalize_answer(r["text"]) for d in bbh_dirs if d in tasks for r in tasks[d].records}
    eligible = sorted(n for n in tasks if n not in bbh_dirs)
    if include:
        unknown = [n for n in include if n not in tasks]
        if unknown:
            raise ConfigError(f"--task {', '.join(unknown)}: not a usable BIG-bench task here; usable: "
                              + ", ".join(eligible))
        held = [n for n in include if n in bbh_dirs]
        if held:
            raise ConfigError(f"--task {', '.join(held)}: a BBH task, held out for testing; pick others")
        chosen = list(dict.fromkeys(include))
    else:
        need = train + validation + test
        big = [n for n in eligible if len(tasks[n].records) >= need]
        if len(big) < n_tasks:
            raise ConfigError(f"only {len(big)} non-BBH tasks have {need} usable examples ({train} train + "
                              f"{validation} validation + {test} test); ask for fewer tasks or examples")
        chosen = sorted(random.Random(seed).sample(big, n_tasks))
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": [], "bbh": []}
    dropped = {}
    sizes = {"train": train, "validation": validation, "test": test}
    for name in chosen:
        pools: dict[str, list[dict]] = {s: [] for s in sizes}
        seen, dropped[name] = set(), 0
        for rec in tasks[name].records:
            key = normalize_answer(rec["text"])
            if key in bbh_inputs:
                dropped[name] += 1
                continue
            if (key, rec["response"]) in seen:
                continue
            seen.add((key, rec["response"]))
            pools[_split_of(seed, key)].append(rec)
        for split, n in sizes.items():
            pool = pools[split]
            random.Random(f"{seed}/{name}/{split}").shuffle(pool)
            splits[split] += [_row(r, name) for r in pool[:n]]
    for bbh_name, d in BBH_TASKS.items():
        if d in tasks:
            pool = list(tasks[d].records)
            random.Random(f"{seed}/{d}/bbh").shuffle(pool)
            splits["bbh"] += [_row(r, bbh_name) for r in pool[:bbh]]
    leaked = [r for s in ("train", "validation", "test") for r in splits[s]
              if normalize_answer(r["text"]) in bbh_inputs]
    if leaked:   # the drop above makes this impossible; kept as the check the mixture promises
        raise AssertionError(f"{len(leaked)} BBH inputs in the training mixture")
    for split, rows in splits.items():
        random.Random(f"{seed}/shuffle/{split}").shuffle(rows)
        for i, r in enumerate(rows):
            rows[i] = {"id": f"{NAME}-{split}-{i:05d}", **{k: v for k, v in r.items() if k != "text"}}
    info = {"tasks": chosen, "bbh_tasks": [n for n, d in BBH_TASKS.items() if d in tasks],
            "bbh_missing": missing_bbh, "bbh_inputs_dropped": dropped, "seed": seed,
            "counts": {s: {t: sum(r["source"] == t for r in rows) for t in sorted({r["source"] for r in rows})}
                       for s, rows in splits.items()}}
    return splits, info


def _row(rec: dict, source: str) -> dict:
    return {"instruction": rec["instruction"], "response": rec["response"], "references": rec["references"],
            "source": source, "text": rec["text"]}


def export(out: str | Path, source: str | Path | None = None, n_tasks: int = 12, train: int = 300,
           validation: int = 30, test: int = 60, bbh: int = 50, seed: int = 0, include: list[str] | None = None,
           max_chars: int = 1000, max_response_chars: int = 100) -> dict[str, Path]:
    """Write train/validation/test/bbh JSONL, README.md and mixture.json of bigbench-mix into `out`."""
    from .rundir import write_text
    from .tasks import EXPORT_NOTE

    for flag, v in (("--tasks", n_tasks), ("--train", train), ("--validation", validation), ("--test", test),
                    ("--bbh", bbh), ("--max-chars", max_chars), ("--max-response-chars", max_response_chars)):
        if v < 0:
            raise ConfigError(f"{flag} must be >= 0, got {v}")
    start = time.perf_counter()
    src = locate(source)
    tasks = read_tasks(src, max_chars, max_response_chars)
    splits, info = build(tasks, n_tasks, train, validation, test, bbh, seed, include)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        buf = io.StringIO()
        for r in rows:
            buf.write(json.dumps(r, ensure_ascii=False) + "\n")
        paths[split] = write_text(out / f"{split}.jsonl", buf.getvalue())
    info.update(source=str(src), max_chars=max_chars, max_response_chars=max_response_chars)
    write_text(out / "README.md", _readme(info))
    write_text(out / EXPORT_NOTE, json.dumps({"mixture": NAME, "seed": seed, "files": [p.name for p in paths.values()],
                                                 **{k: info[k] for k in ("tasks", "bbh_tasks", "bbh_inputs_dropped")}},
                                                indent=2) + "\n")
    log.info("wrote %s (%s) to %s in %.1fs", NAME, ", ".join(f"{s} {len(r)}" for s, r in splits.items()),
             out, time.perf_counter() - start)
    return paths


def _readme(info: dict) -> str:
    c = info["counts"]
    lines = [f"# {NAME}", "", f"Built by `elrea data export {NAME}` (elrea.bigbench) from {Path(info['source']).name}, "
             f"seed {info['seed']}; instructions of at most {info['max_chars']} characters, responses of at most "
             f"{info['max_response_chars']}.", "",
             "## Training tasks (train / validation / in-distribution test)", "",
             "| task | train | validation | test | dropped: input also in BBH |", "|---|---|---|---|---|"]
    for t in info["tasks"]:
        lines.append(f"| {t} | {c['train'].get(t, 0)} | {c['validation'].get(t, 0)} | {c['test'].get(t, 0)} | "
                     f"{info['bbh_inputs_dropped'].get(t, 0)} |")
    lines += ["", "## Held out: BIG-Bench-Hard (bbh.jsonl), never in training", "", "| BBH task | test |", "|---|---|"]
    lines += [f"| {t} | {c['bbh'].get(t, 0)} |" for t in info["bbh_tasks"]]
    if info["bbh_missing"]:
        lines += ["", "No usable example in this copy: " + ", ".join(info["bbh_missing"])]
    lines += ["", "An input is in one split only; no BBH input is in train, validation or test. Records: id, "
              "instruction, response, references (every accepted answer), source.", ""]
    return "\n".join(lines)

