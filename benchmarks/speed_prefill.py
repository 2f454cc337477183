"""python benchmarks/speed_prefill.py --data PROMPTS.jsonl  -- what a prefill of the decoding engine costs, and why.

A prefill runs every (prompt, adapter) row of a batch through the backbone at once. On a CPU
two things around the matmuls used to cost more than the matmuls themselves:

- the LM head: transformers keeps the last position's logits by handing the head
  `hidden[:, -1:, :]`, a strided view; torch's linear cannot fold its batch dimension and
  multiplies row by row over a copy of the (vocab x hidden) weight expanded per row. The engine
  now gives the head a contiguous copy (a forward pre-hook it holds while it owns the model);
- the stacked LoRA's sum `base + (x A * sel) B`, done in float32 over the whole (rows x out)
  output: in bf16 an upcast, an add and a downcast, each a pass through memory. It is now done a
  block of `fastlora.CHUNK_ROWS` rows at a time on a CPU (the float32 copy of x and `x A` too), each block staying in cache and
  written over the base output (the same sums, bitwise).

This times, side by side, the engine's prefill (greedy, one new token: the prefill and its
first token) of --prompts prompts of a data file under --adapters adapters (random B, every
adapter weighted), with each fix on or off, in float32 and bfloat16, repetitions interleaved;
and checks that every way gives the same first tokens.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_prefill.py \\
        --data benchmarks/work/quality-bigbench-mix/data/validation.jsonl
    .venv/bin/python benchmarks/speed_prefill.py --quick        # tiny model, toy data (for tests)

Options: --data, --model (default smollm2-135m-instruct), --prompts 8, --adapters 5,
--max-length 384, --dtypes float32 bfloat16, --repeats 2, --threads, --seed 0, --quick, --out
(default benchmarks/results/speed_prefill.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (data_benchmark_main, parse_data_args, print_table, random_experts_model,  # noqa: E402
                     training_data)

import torch  # noqa: E402

WAYS = ("before", "contiguous_head", "chunked_lora", "now")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a JSONL file whose instructions are the prompts")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=5)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    return parse_data_args(ap, argv)


@contextlib.contextmanager
def way(eng, name: str):
    """The engine as it was before (neither fix), with one of them, or as it is now."""
    from elrea import engine as engine_module
    from elrea import fastlora

    chunk, strided = fastlora.CHUNK_ROWS, name in ("before", "chunked_lora")
    if strided:                                  # no contiguous copy for the head
        eng._head_hook.remove()
    if name in ("before", "contiguous_head"):    # the LoRA sum over all rows at once
        fastlora.CHUNK_ROWS = 1 << 62
    try:
        yield
    finally:
        fastlora.CHUNK_ROWS = chunk
        if strided:
            head = eng.model.get_output_embeddings()
            eng._head_hook = head.register_forward_pre_hook(engine_module._contiguous_input)


def run(args) -> dict:

    from elrea.data import PromptFormatter, load_records
    from elrea.engine import Ensemble

    data = training_data(args, "speed-prefill-")
    engines, prompts = {}, None
    for dt in args.dtypes:
        m, tok, names = random_experts_model(args.model, dt, args.adapters, args.seed)
        if prompts is None:
            fmt = PromptFormatter(tok, max_length=args.max_length)
            prompts = [fmt.encode_instruction(r.messages).input_ids for r in load_records(data)[:args.prompts]]
        engines[dt] = Ensemble(m, names, pad_id=tok.pad_token_id, compile="off")
    weights = torch.full((len(prompts), len(names)), 1.0 / len(names))
    tokens, times = {}, {f"{w}_{dt}": [] for dt in args.dtypes for w in WAYS}
    for dt, eng in engines.items():   # warm-up
        with way(eng, "now"):
            eng.generate(prompts, weights, max_new_tokens=1)
    for _ in range(args.repeats):
        for dt, eng in engines.items():
            for w in WAYS:
                with way(eng, w):
                    t0 = time.perf_counter()
                    tokens[f"{w}_{dt}"] = eng.generate(prompts, weights, max_new_tokens=1)
                    times[f"{w}_{dt}"].append(time.perf_counter() - t0)
    median = {k: statistics.median(v) for k, v in times.items()}
    lengths = [len(p) for p in prompts]
    return {"data": "toy (elrea.testing)" if args.quick else str(data), "model": "tiny" if args.quick else args.model,
            "threads": torch.get_num_threads(), "prompts": len(prompts), "adapters": len(names),
            "prompt_tokens": {"mean": round(sum(lengths) / len(lengths), 1), "max": max(lengths)},
            "rows": len(prompts) * len(names), "repeats": args.repeats, "all_seconds": times,
            "seconds": {dt: {w: round(median[f"{w}_{dt}"], 3) for w in WAYS} for dt in args.dtypes},
            "speedup_over_before": {dt: {w: round(median[f"before_{dt}"] / median[f"{w}_{dt}"], 3) for w in WAYS}
                                    for dt in args.dtypes},
            "same_first_tokens": {dt: all(tokens[f"{w}_{dt}"] == tokens[f"now_{dt}"] for w in WAYS)
                                  for dt in args.dtypes}}


def show(r: dict) -> None:
    label = {"before": "before (strided head, LoRA sum at once)", "contiguous_head": "contiguous head only",
             "chunked_lora": "LoRA sum in blocks only", "now": "now (both)"}
    dts = list(r["seconds"])
    rows = [[label[w], *[f"{r['seconds'][dt][w]:.2f} s ({r['speedup_over_before'][dt][w]:.2f}x)" for dt in dts]]
            for w in WAYS]
    print_table(f"One prefill (+ first token) of the engine: {r['prompts']} prompts x {r['adapters']} adapters "
                f"= {r['rows']} rows, {r['prompt_tokens']['mean']} prompt tokens on average; {r['model']}",
                ["way", *dts], rows,
                [f"the same first tokens every way: {r['same_first_tokens']}"])


def main(argv=None) -> dict:
    return data_benchmark_main(__file__, parse_args, run, show, argv)


if __name__ == "__main__":
    main()
