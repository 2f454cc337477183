"""The paper's own data recipes, for users who are online: "paper-math" and "less-mix".

Each reads public data sets from the Hugging Face hub (or, with `--hub-dir DIR`, from a local
folder that holds them in the hub's own layout, DIR/<org>/<name>/<files>; that is how they are
tested here, where the hub is unreachable), writes train / validation / test JSONL and
mixture.json like `elrea data export`, and ships the paper's settings as a config file
(`elrea/configs/<recipe>.yaml`: Gemma-2b-it, QLoRA 4-bit, LoRA r8 on all linear layers, lr 5e-5
for the base adapter and 2e-5 for the experts, 2 epochs, max length 2,048, d_proj 8,192) and the
lm-eval tasks to run after.

- paper-math: GSM8K (openai/gsm8k, main/), MATH (EleutherAI/hendrycks_math, one folder per
  subject), SVAMP (ChilleD/SVAMP, data/), MathQA (allenai/math_qa, its parquet conversion under
  refs/convert/parquet, default/). Each record: the problem as the instruction, the worked
  solution ending in "The answer is X." as the response, X as the reference. Checked by
  `math_equal` (checker "paper-math"): the final answers (\\boxed{..}, "#### x", "The answer is
  x", else the last number) are equal as text after LaTeX normalisation or as numbers.
- less-mix: the pre-processed Flan V2 / CoT / Dolly / Open Assistant mixture that LESS
  (Xia et al., 2024) published and the paper trained on (princeton-nlp/less_data,
  train/processed/<name>/<name>_data.jsonl, open-instruct chat records); `source` is the
  sub-collection. Its tests are lm-eval's `mmlu` and `bbh`; validation and test are carved
  from the mixture (held out from training) for `elrea compare`.

Splits where a source has its own test split (GSM8K, MATH, SVAMP, MathQA): test from it,
validation carved from its training split by a seeded hash of the instruction; otherwise all
three from one pool the same way. Sizes are per source.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from .errors import ConfigError, DataError, unknown_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Source:
    """One public data set: where it lives on the hub, and how a row becomes a record."""

    name: str
    repo: str
    convert: Callable[[dict], dict | None]        # row -> {"instruction", "response", "references"}
    subsets: tuple = (None,)                      # folders (data_dir) read and concatenated
    splits: dict = field(default_factory=lambda: {"train": "train", "test": "test"})
    revision: str | None = None
    jsonl: str | None = None                      # a JSONL file in the repo instead of a parquet data set


@dataclass(frozen=True)
class Recipe:
    sources: tuple
    config: str                                   # elrea/configs/<config>
    lm_eval_tasks: tuple
    checker: str


# ----------------------------------------------------------------------------- math answers

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER_IS = re.compile(r"answer is[:\s]*\$?([^\n$]+?)\$?\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_answer(text: str) -> str:
    """The final answer of a worked solution: the last \\boxed{..}, else what follows "####",
    else "The answer is x", else the last number; else the text itself."""
    starts = [m.end() for m in _BOXED.finditer(text)]
    if starts:
        i, depth = starts[-1], 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    found = _ANSWER_IS.findall(text)
    if found:
        return found[-1].strip()
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else text.strip()


def _normalise(ans: str) -> str:
    a = ans.strip().strip("$").strip()
    a = re.sub(r"\\text\{([^}]*)\}", r"\1", a)
    for old, new in (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("dfrac", "frac"),
                     ("tfrac", "frac"), ("^\\circ", ""), ("^{\\circ}", ""), ("\\%", ""), ("%", ""), ("\\$", "")):
        a = a.replace(old, new)
    a = re.sub(r"^[a-zA-Z]\s*=\s*", "", a)           # "x = 5" -> "5"
    a = a.replace(" ", "").rstrip(".")
    return a


def _number(a: str) -> Fraction | None:
    m = re.fullmatch(r"\\frac\{?(-?\d+)\}?\{?(-?\d+)\}?", a) or re.fullmatch(r"(-?\d+)/(-?\d+)", a)
    try:
        if m:
            return Fraction(int(m.group(1)), int(m.group(2)))
        return Fraction(a.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def math_equal(prediction: str, reference: str) -> bool:
    """Whether two solutions reach the same final answer (see the module docstring)."""
    p, r = _normalise(final_answer(prediction)), _normalise(final_answer(reference))
    if p == r:
        return True
    a, b = _number(p), _number(r)
    return a is not None and b is not None and math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-9)


def math_checker(source, prediction: str, record) -> bool:
    """An `evaluate` checker: math_equal against the response or any reference."""
    return any(math_equal(prediction, a) for a in getattr(record, "answers", [record.response]))


# ----------------------------------------------------------------------------- row converters

def _with_answer(solution: str, answer: str) -> dict:
    solution = solution.strip()
    return {"response": f"{solution}\nThe answer is {answer}.", "references": [answer]}


def _gsm8k(row: dict) -> dict | None:
    work, _, answer = str(row.get("answer", "")).rpartition("####")
    if not answer.strip():
        return None
    return {"instruction": row["question"].strip(), **_with_answer(work, answer.strip().replace(",", ""))}


def _math(row: dict) -> dict | None:
    solution = str(row.get("solution", ""))
    answer = final_answer(solution) if _BOXED.search(solution) else ""
    if not answer:
        return None
    return {"instruction": row["problem"].strip(), "response": solution.strip(), "references": [answer]}


def _svamp(row: dict) -> dict | None:
    value = float(row["Answer"])
    answer = str(int(value)) if value == int(value) else f"{value:g}"
    question = f"{str(row['Body']).strip()} {str(row['Question']).strip()}".strip()
    return {"instruction": question, **_with_answer(f"{str(row['Equation']).strip()} = {answer}", answer)}


def _mathqa(row: dict) -> dict | None:
    options = dict(re.findall(r"([a-e])\s*\)\s*([^,]+?)\s*(?:,|$)", str(row.get("options", ""))))
    correct = str(row.get("correct", "")).strip()
    if correct not in options:
        return None
    listed = "\n".join(f"({k}) {v}" for k, v in options.items())
    answer = options[correct]
    rationale = str(row.get("Rationale", "")).strip().strip('"')
    return {"instruction": f"{str(row['Problem']).strip()}\nOptions:\n{listed}",
            "response": f"{rationale}\nThe answer is {answer}.", "references": [answer, f"({correct})"]}


def _chat(row: dict) -> dict | None:
    msgs = row.get("messages")
    if not isinstance(msgs, list) or len(msgs) < 2 or msgs[-1].get("role") != "assistant":
        return None
    return {"messages": [{"role": m["role"], "content": m["content"]} for m in msgs]}


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")
LESS_PARTS = ("flan_v2", "cot", "dolly", "oasst1")

RECIPES: dict[str, Recipe] = {
    "paper-math": Recipe(
        sources=(Source("gsm8k", "openai/gsm8k", _gsm8k, subsets=("main",)),
                 Source("math", "EleutherAI/hendrycks_math", _math, subsets=MATH_SUBJECTS),
                 Source("svamp", "ChilleD/SVAMP", _svamp, subsets=("data",)),
                 Source("mathqa", "allenai/math_qa", _mathqa, subsets=("default",), revision="refs/convert/parquet")),
        config="paper-math.yaml", lm_eval_tasks=("gsm8k", "minerva_math"), checker="paper-math"),
    "less-mix": Recipe(
        sources=tuple(Source(p, "princeton-nlp/less_data", _chat, splits={},
                             jsonl=f"train/processed/{p}/{p}_data.jsonl") for p in LESS_PARTS),
        config="less-mix.yaml", lm_eval_tasks=("mmlu", "bbh"), checker="exact"),
}


# ----------------------------------------------------------------------------- reading

def _rows(src: Source, split: str, hub_dir: Path | None) -> list[dict]:
    """Every row of `src`'s `split` (or of its one JSONL file), from the hub or `hub_dir`."""
    where = str(hub_dir / src.repo) if hub_dir else src.repo
    if src.jsonl:
        if hub_dir:
            path = hub_dir / src.repo / src.jsonl
        else:
            path = Path(_download(src.repo, src.jsonl, src.revision))
        if not path.exists():
            raise DataError(f"missing; expected the hub's layout, {src.repo}/{src.jsonl}", path=str(path))
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except ValueError as e:
                        raise DataError(f"malformed JSON ({e})", path=str(path), line=i) from None
        return rows
    import datasets

    rows = []
    for subset in src.subsets:
        try:
            ds = datasets.load_dataset(where, data_dir=subset, split=src.splits[split],
                                       revision=None if hub_dir else src.revision)
        except Exception as e:  # noqa: BLE001 - offline, moved, gated, or a local folder in another layout
            raise DataError(f"could not load {src.repo} ({subset or 'all'}, split {src.splits[split]!r}): "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}; online, check the "
                            f"hub; offline, pass --hub-dir DIR with DIR/{src.repo}/ in the hub's layout",
                            path=where) from None
        rows += list(ds)
    return rows


def _download(repo: str, filename: str, revision: str | None) -> str:
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo, filename, repo_type="dataset", revision=revision)
    except Exception as e:  # noqa: BLE001 - offline or moved
        raise DataError(f"could not download {filename} ({type(e).__name__}); online, check the hub; offline, "
                        f"pass --hub-dir DIR with DIR/{repo}/{filename}", path=repo) from None


def _hash_split(seed: int, text: str, validation_share: float) -> bool:
    import hashlib

    h = int.from_bytes(hashlib.sha256(f"{seed}\x1f{text}".encode()).digest()[:4], "big")
    return (h % 10_000) < validation_share * 10_000


def build(name: str, train: int | None, validation: int | None, test: int | None, seed: int = 0,
          hub_dir: str | Path | None = None) -> dict[str, list[dict]]:
    """The splits of recipe `name`: records {"instruction"/"messages", "response", "references",
    "source"}, at most the given sizes per source (None: all), shuffled with the seed."""
    if name not in RECIPES:
        raise unknown_name("recipe", name, RECIPES)
    hub = Path(hub_dir).expanduser() if hub_dir else None
    if hub is not None and not hub.is_dir():
        raise ConfigError(f"--hub-dir {hub}: not a folder")
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    sizes = {"train": train, "validation": validation, "test": test}
    for src in RECIPES[name].sources:
        pools: dict[str, list[dict]] = {s: [] for s in splits}
        own_test = "test" in src.splits
        for split in (["train", "test"] if own_test else ["train"]):
            for row in _rows(src, split, hub):
                rec = src.convert(row)
                if rec is None:
                    continue
                key = rec.get("instruction") or json.dumps(rec["messages"][:-1], sort_keys=True)
                if split == "test":
                    pools["test"].append(rec)
                elif own_test:
                    pools["validation" if _hash_split(seed, key, 0.1) else "train"].append(rec)
                else:
                    h = _hash_split(seed, key, 0.2)
                    pools["train" if not h else ("validation" if _hash_split(seed + 1, key, 0.5) else "test")].append(rec)
        for split, pool in pools.items():
            random.Random(f"{seed}/{src.name}/{split}").shuffle(pool)
            splits[split] += [dict(r, source=src.name) for r in pool[:sizes[split]]]
        log.info("%s: %s", src.name, ", ".join(f"{s} {len(p[:sizes[s]])}" for s, p in pools.items()))
    for split, rows in splits.items():
        random.Random(f"{seed}/shuffle/{split}").shuffle(rows)
        for i, r in enumerate(rows):
            rows[i] = {"id": f"{name}-{split}-{i:05d}", **r}
    return splits


def export(name: str, out: str | Path, train: int | None = None, validation: int | None = 100,
           test: int | None = 500, seed: int = 0, hub_dir: str | Path | None = None) -> dict[str, Path]:
    """Write recipe `name`'s train/validation/test JSONL, README.md and mixture.json into `out`."""
    from .rundir import write_text
    from .tasks import EXPORT_NOTE

    recipe = RECIPES.get(name) or {}
    splits = build(name, train, validation, test, seed, hub_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {s: write_text(out / f"{s}.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
             for s, rows in splits.items()}
    config = config_path(name)
    counts = {s: {src.name: sum(r["source"] == src.name for r in rows) for src in recipe.sources}
              for s, rows in splits.items()}
    lines = [f"# {name}", "", f"Built by `elrea data export {name}` (elrea.recipes), seed {seed}, from "
             f"{'the hub' if hub_dir is None else hub_dir}.", "", "| source | hub data set | train | validation | test |",
             "|---|---|---|---|---|"]
    lines += [f"| {src.name} | {src.repo} | {counts['train'][src.name]} | {counts['validation'][src.name]} | "
              f"{counts['test'][src.name]} |" for src in recipe.sources]
    lines += ["", f"The paper's settings: `elrea fit --config {config} --data {out / 'train.jsonl'} --out RUN`; "
              f"then `elrea lm-eval RUN --tasks {','.join(recipe.lm_eval_tasks)}`.", ""]
    write_text(out / "README.md", "\n".join(lines))
    write_text(out / EXPORT_NOTE, json.dumps({"mixture": name, "seed": seed, "files": [p.name for p in paths.values()],
                                                 "config": str(config), "lm_eval_tasks": list(recipe.lm_eval_tasks)},
                                                indent=2) + "\n")
    return paths


def config_path(name: str) -> Path:
    from importlib import resources

    return Path(str(resources.files("elrea") / "configs" / RECIPES[name].config))
