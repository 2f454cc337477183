"""Built-in multi-source instruction mixtures for fine-tuning small models on CPU.

"reasoning-mix" (8 sources, generated offline by `reasoning-gym`) is built so that one LoRA
adapter must serve conflicting rules while experts clustered by gradient can split them.
Every prompt is short (< 250 characters) and says what the answer must look like; every
response is the bare answer. The sources come in four look-alike pairs whose surface forms
match but whose rules differ, meant to make their gradients conflict (measured with
SmolLM2-135M, benchmarks/conflict.py, they do not: every pair's mean gradients are aligned):

  chain_sum      "Compute 31 + 7 - 12."            vs products   "Compute 43 * 8."
  gcd            "... GCD of 12 and 18 ..."        vs lcm        "... LCM of 12 and 18 ..."
  spell_backward reverse the letters of a word     vs letter_counting count a letter in words
  word_sequence_reversal reverse a word list       vs word_sorting sort the same kind of list

"conflict-mix" (8 sources) tightens the pairs so that the same input has opposite answers and
the instructions differ in one word: gcd vs lcm (as above), words sorted in ascending vs
descending order (word_sorting split by direction), a word list written "in reverse order" vs
"in the same order", a word spelled "backward" vs "forward". It exists because measured
training gradients of reasoning-mix's sources do not conflict (benchmarks/conflict.py).

The reasoning-gym question is rewritten into a concise instruction (same meaning) from the
entry's metadata; the answer is reasoning-gym's (for words_kept and spelled_forward, the
input words or word themselves). "toy" holds the four rule-conflicting toy
sources of `make_toy_records` (add, sub, rev, upper).

Splits: each instruction belongs to exactly one split, chosen by a hash of (mixture, seed,
instruction text) with shares train 70% / validation 10% / test 20%, and each split is drawn
from its own derived seeds, so train/validation/test never share an instruction however large
each is and in whichever order they are made. Within a split instructions are unique, sources
are balanced (round-robin counts) and the order is shuffled with the seed. The same seed gives
byte-identical files. When a source cannot supply enough distinct instructions for a split
(only small sizes fit "toy": e.g. rev/upper have 78 distinct prompts in all), reasoning-mix
raises `ElreaError`; toy repeats its distinct prompts within that split, with a warning.

`check_answer`: a prediction is correct if it equals the reference after
`elrea.evaluation.normalize_answer` (the exact-match rule used in evaluation), or, for a
reasoning-gym source, if that dataset's `score_answer` gives >= 1.0 on an entry rebuilt from
the record (answer = response; word_sorting's `metadata.sorted_words` = the response split on
", "). This accepts e.g. "1,000" for 1000 or "a,b" for "a, b". spell_backward is checked by
exact match only: its scorer can exceed 1.0 through float rounding for an answer that merely
starts with the reference (words of 9 letters), and its only other full-credit case,
case-insensitive equality, is already exact match. Toy sources use exact match.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError, ElreaError, unknown_name
from .evaluation import exact_checker, exact_match
from .rundir import write_text

log = logging.getLogger(__name__)

SPLIT_SHARES = {"train": 70, "validation": 10, "test": 20}   # percent of the instruction space
STALL = 5000          # draws in a row without a new instruction before a source counts as spent


@dataclass(frozen=True)
class GymSource:
    """A reasoning-gym dataset, its config, and how to rewrite an entry into an instruction."""

    dataset: str
    config: dict
    render: Callable[[dict], str]
    metadata: Callable[[str], dict] = field(default=lambda response: {})
    answer: Callable[[dict], str] = field(default=lambda e: e["answer"])   # the response
    keep: Callable[[dict], bool] = field(default=lambda e: True)           # which entries qualify


def _words(ws) -> str:
    return ", ".join(ws)


NUMBER_ONLY = "Answer with the number only."
LIST_ONLY = "Answer with the words as a comma-separated list."

GYM_SOURCES: dict[str, GymSource] = {
    "chain_sum": GymSource(
        "chain_sum", dict(min_terms=2, max_terms=3, min_digits=1, max_digits=2),
        lambda e: f"Compute {e['metadata']['expression']}. {NUMBER_ONLY}"),
    "products": GymSource(
        "products", dict(min_terms=2, max_terms=2, min_digits=1, max_digits=2),
        lambda e: f"Compute {e['metadata']['expression']}. {NUMBER_ONLY}"),
    "gcd": GymSource(
        "gcd", dict(min_numbers=2, max_numbers=2, min_value=2, max_value=60),
        lambda e: "Find the greatest common divisor (GCD) of {} and {}. ".format(
            *e["metadata"]["numbers"]) + NUMBER_ONLY),
    "lcm": GymSource(
        "lcm", dict(min_numbers=2, max_numbers=2, min_value=2, max_value=40),
        lambda e: "Find the least common multiple (LCM) of {} and {}. ".format(
            *e["metadata"]["numbers"]) + NUMBER_ONLY),
    "spell_backward": GymSource(
        "spell_backward", dict(min_word_len=3, max_word_len=6),
        lambda e: f"Spell the word \"{e['metadata']['word']}\" backward. "
                  "Answer with the reversed word only."),
    "letter_counting": GymSource(
        "letter_counting", dict(min_words=3, max_words=6),
        lambda e: f"How many times does the letter \"{e['metadata']['target_letter']}\" appear "
                  f"in \"{' '.join(e['metadata']['span'])}\", ignoring case? {NUMBER_ONLY}"),
    "word_sequence_reversal": GymSource(
        "word_sequence_reversal", dict(min_words=3, max_words=5),
        lambda e: f"Reverse the order of these words: {_words(e['metadata']['words'])}. "
                  + LIST_ONLY),
    "word_sorting": GymSource(
        "word_sorting", dict(min_words=3, max_words=5, min_word_length=3, max_word_length=8,
                             transformation="lowercase"),
        lambda e: f"Sort these words in {e['metadata']['direction']} alphabetical order: "
                  f"{_words(e['metadata']['transformed_words'])}. {LIST_ONLY}",
        metadata=lambda response: {"sorted_words": response.split(", ")}),
}
REASONING_MIX = list(GYM_SOURCES)


def _spell(direction: str) -> Callable[[dict], str]:
    return lambda e: f"Spell the word \"{e['metadata']['word']}\" {direction}. Answer with the word only."


def _rewrite(order: str) -> Callable[[dict], str]:
    return lambda e: f"Write these words in {order} order: {_words(e['metadata']['words'])}. " + LIST_ONLY


def _sort(direction: str) -> GymSource:
    return replace(GYM_SOURCES["word_sorting"], keep=lambda e: e["metadata"]["direction"] == direction)


# conflict-mix: four pairs whose instructions differ in one word and whose answers oppose for
# the same input (see the module docstring)
GYM_SOURCES.update({
    "sort_ascending": _sort("ascending"),
    "sort_descending": _sort("descending"),
    "words_reversed": GymSource("word_sequence_reversal", dict(min_words=3, max_words=5), _rewrite("reverse")),
    "words_kept": GymSource("word_sequence_reversal", dict(min_words=3, max_words=5), _rewrite("the same"),
                            answer=lambda e: _words(e["metadata"]["words"])),
    "spelled_backward": GymSource("spell_backward", dict(min_word_len=3, max_word_len=6), _spell("backward")),
    "spelled_forward": GymSource("spell_backward", dict(min_word_len=3, max_word_len=6), _spell("forward"),
                                 answer=lambda e: e["metadata"]["word"]),
})
# exact match only: spell_backward's scorer (see the module docstring), and sources whose answer
# is not the reasoning-gym entry's own, so that dataset's scorer would compare against another rule
EXACT_ONLY = {"spell_backward", "spelled_backward", "spelled_forward", "words_kept"}

# ----------------------------------------------------------------------------- toy mixture

TOY_TASKS = {
    "add": lambda a, b: (f"Add {a} and {b}.", str(a + b)),
    "sub": lambda a, b: (f"Subtract {b} from {a}.", str(a - b)),
    "rev": lambda a, b: (f"Reverse the word {_word(a, b)}.", _word(a, b)[::-1]),
    "upper": lambda a, b: (f"Uppercase the word {_word(a, b)}.", _word(a, b).upper()),
}


def _word(a: int, b: int) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(letters[(a * 7 + b * 3 + i * 5) % 26] for i in range(3 + (a + b) % 3))


def make_toy_records(n: int, seed: int = 0, tasks: list[str] | None = None) -> list[dict]:
    """`n` records from a few simple sources with distinct rules (add, sub, rev, upper)."""
    rng = random.Random(seed)
    tasks = tasks or list(TOY_TASKS)
    rows = []
    for i in range(n):
        src = tasks[i % len(tasks)]
        q, a = TOY_TASKS[src](rng.randint(0, 20), rng.randint(0, 20))
        rows.append({"instruction": q, "response": a, "source": src})
    return rows


TOY_SOURCES = list(TOY_TASKS)

EXPORT_NOTE = "mixture.json"   # beside exported files: which mixture they are (checker "auto")
MIXTURES: dict[str, list[str]] = {
    "reasoning-mix": REASONING_MIX,
    "conflict-mix": ["gcd", "lcm", "sort_ascending", "sort_descending", "words_reversed", "words_kept",
                     "spelled_backward", "spelled_forward"],
    "toy": list(TOY_SOURCES),
}
GYM_MIXTURES = {"reasoning-mix", "conflict-mix"}
# mixtures built from files elsewhere (elrea.bigbench, elrea.recipes): their sources vary by
# export, and their records carry every accepted answer; exact match against those, or for
# paper-math the math-equivalence check (elrea.recipes.math_checker)
EXTERNAL_MIXTURES = ("bigbench-mix", "paper-math", "less-mix")
ALLOW_REPEATS = {"toy"}       # mixtures whose small sources may repeat prompts within a split


# ----------------------------------------------------------------------------- generation

def _derive(*parts) -> int:
    """A 31-bit seed from any parts; far apart for different parts (reasoning-gym seeds item
    i with seed + i, so neighbouring seeds would give shifted copies of the same items)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def _split_of(name: str, seed: int, instruction: str) -> str:
    bucket = _derive("bucket", name, seed, instruction) % 100
    for split, share in SPLIT_SHARES.items():
        if bucket < share:
            return split
        bucket -= share
    raise AssertionError("split shares must sum to 100")


def _import_gym():
    try:
        import reasoning_gym
    except ImportError as e:
        raise ElreaError("the reasoning-mix and conflict-mix mixtures need reasoning-gym: "
                         "pip install reasoning-gym") from e
    return reasoning_gym


def _gym_dataset(source: str, size: int, seed: int):
    spec = GYM_SOURCES[source]
    gym, config = _import_gym(), dict(spec.config)
    if "transformation" in config:      # word_sorting asserts an enum, not its string value
        from reasoning_gym.algorithmic.word_sorting import TextTransformation

        config["transformation"] = TextTransformation(config["transformation"])
    return gym.create_dataset(spec.dataset, size=size, seed=seed, **config)


def _gym_stream(source: str, seed: int) -> Iterator[tuple[str, str]]:
    spec, ds = GYM_SOURCES[source], _gym_dataset(source, 10**9, seed)
    for i in range(10**9):
        entry = ds[i]
        if spec.keep(entry):
            yield spec.render(entry), spec.answer(entry)


def _toy_stream(source: str, seed: int) -> Iterator[tuple[str, str]]:

    for chunk in range(10**9):
        for r in make_toy_records(256, seed=_derive(seed, chunk), tasks=[source]):
            yield r["instruction"], r["response"]


def _draw(name: str, source: str, split: str, need: int, seed: int) -> list[tuple[str, str]]:
    """`need` distinct (instruction, response) pairs of `source` that belong to `split`."""
    stream = (_gym_stream if name in GYM_MIXTURES else _toy_stream)(
        source, _derive(name, seed, split, source))
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    stall = 0
    for instruction, response in stream:
        if len(pool) == need or stall > STALL:
            break
        stall += 1
        if instruction in seen or _split_of(name, seed, instruction) != split:
            continue
        seen.add(instruction)
        pool.append((instruction, response))
        stall = 0
    return pool if len(pool) == need else _short_pool(name, source, split, need, pool)


def _short_pool(name, source, split, need, pool):
    msg = (f"source {source!r} of {name!r} has only {len(pool)} distinct instructions for the "
           f"{split} split ({need} asked)")
    if name not in ALLOW_REPEATS or not pool:
        raise ElreaError(msg + "; ask for fewer records")
    log.warning("%s; repeating them within the split", msg)
    return [pool[i % len(pool)] for i in range(need)]


def make_split(name: str, split: str, n: int, seed: int = 0) -> list[dict]:
    """`n` records of mixture `name` for `split`, balanced over sources and shuffled.

    Records: {"id", "instruction", "response", "source"}; ids are "<name>-<split>-<index>".
    """
    if name not in MIXTURES:
        raise unknown_name("mixture", name, MIXTURES)
    if split not in SPLIT_SHARES:
        raise unknown_name("split", split, SPLIT_SHARES)
    if n < 0:
        raise ConfigError(f"number of records must be >= 0, got {n}")
    sources = MIXTURES[name]
    k = len(sources)
    pools = {s: _draw(name, s, split, n // k + (i < n % k), seed) for i, s in enumerate(sources)}
    rows = [(s, *pools[s][j]) for j in range(n // k + 1) for s in sources if j < len(pools[s])]
    random.Random(_derive("shuffle", name, seed, split)).shuffle(rows)
    return [{"id": f"{name}-{split}-{i:05d}", "instruction": q, "response": a, "source": s}
            for i, (s, q, a) in enumerate(rows)]


# ----------------------------------------------------------------------------- export

def _readme(name: str, seed: int, splits: dict[str, list[dict]]) -> str:
    lines = [f"# {name}", "", f"Built by `elrea.tasks.export_mixture` with seed {seed}.", "",
             "| source | config | " + " | ".join(splits) + " |",
             "|---|---|" + "---|" * len(splits)]
    for s in MIXTURES[name]:
        cfg = json.dumps(GYM_SOURCES[s].config, sort_keys=True) if s in GYM_SOURCES else "toy"
        counts = [str(sum(r["source"] == s for r in rows)) for rows in splits.values()]
        lines.append(f"| {s} | `{cfg}` | " + " | ".join(counts) + " |")
    totals = " | ".join(str(len(rows)) for rows in splits.values())
    lines += [f"| total | | {totals} |", "",
              "Splits share no instruction. Records: id, instruction, response, source.", ""]
    return "\n".join(lines)


def export_mixture(name: str, out: str | Path, train: int = 2000, validation: int = 200,
                   test: int = 400, seed: int = 0) -> dict[str, Path]:
    """Write train/validation/test JSONL (+ README.md) of mixture `name` into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    splits = {s: make_split(name, s, n, seed)
              for s, n in (("train", train), ("validation", validation), ("test", test))}
    paths = {}
    for split, rows in splits.items():
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        paths[split] = write_text(out / f"{split}.jsonl", text)
    write_text(out / "README.md", _readme(name, seed, splits))
    write_text(out / EXPORT_NOTE, json.dumps({"mixture": name, "seed": seed,
                                                 "files": [p.name for p in paths.values()]}, indent=2) + "\n")
    log.info("wrote %s (%s) to %s in %.1fs", name,
             ", ".join(f"{s} {len(r)}" for s, r in splits.items()), out,
             time.perf_counter() - start)
    return paths


# ----------------------------------------------------------------------------- scoring

@functools.lru_cache(maxsize=None)
def _scorer(source: str):
    return _gym_dataset(source, 1, 0).score_answer


def check_answer(source: str, prediction: str, record: dict) -> bool:
    """Whether `prediction` answers `record` (a record of `source`); see the module docstring."""
    if source not in GYM_SOURCES and source not in TOY_SOURCES:
        raise unknown_name("source", source, list(GYM_SOURCES) + TOY_SOURCES)
    reference = record["response"]
    if exact_match(prediction, reference):
        return True
    if source not in GYM_SOURCES or source in EXACT_ONLY:
        return False
    entry = {"question": record["instruction"], "answer": reference,
             "metadata": GYM_SOURCES[source].metadata(reference)}
    return _scorer(source)(prediction, entry) >= 1.0


def mixture_checker(source, prediction: str, record) -> bool:
    """An `evaluate` checker: the built-in mixtures' own check for their sources (check_answer),
    exact match (elrea.evaluation.exact_checker) for any other source."""
    if source in GYM_SOURCES or source in TOY_SOURCES:
        return check_answer(source, prediction, {"instruction": record.instruction,
                                                 "response": record.response, "source": source})
    return exact_checker(source, prediction, record)


def checker(name: str, data: str | Path | None = None) -> Callable:
    """The answer checker called `name`: "exact" (exact match after normalisation), a built-in
    mixture's name (reasoning-mix, conflict-mix, toy: its sources get their own checks, any other
    source exact match), or "auto": the mixture's checker when `data` is a file that `elrea data
    export` wrote (listed in the mixture.json beside it), else exact. A checker whose package is
    missing fails here, before any work starts."""
    if name == "auto":
        name = exported_mixture(data) or "exact"
    if name == "paper-math":
        from .recipes import math_checker

        return math_checker
    if name == "exact" or name in EXTERNAL_MIXTURES:
        return exact_checker
    if name in MIXTURES:
        if any(s in GYM_SOURCES for s in MIXTURES[name]):
            _import_gym()
        return mixture_checker
    raise unknown_name("answer checker", name, CHECKER_NAMES)


def exported_mixture(data: str | Path | None) -> str | None:
    """The built-in mixture that `data` was exported from (`elrea data export`), if any."""
    if data is None:
        return None
    note = Path(data).parent / EXPORT_NOTE
    try:
        info = json.loads(note.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    name = info.get("mixture") if isinstance(info, dict) else None
    known = name in MIXTURES or name in EXTERNAL_MIXTURES
    return name if known and Path(data).name in info.get("files", []) else None


CHECKER_NAMES = ["auto", "exact", *MIXTURES, *EXTERNAL_MIXTURES]
