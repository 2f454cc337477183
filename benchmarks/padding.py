"""python benchmarks/padding.py --data TRAIN.jsonl  -- what Trainer's length-grouped batches save.

Training's forward and backward run on every position of a padded micro-batch, so their cost
follows the padded tokens, not the real ones. This tokenizes a training file as `elrea fit`
does (the model's chat template, data.max_length) and, for one epoch in the order each of
Trainer's own samplers gives, counts the padded tokens per real token of the micro-batches
(micro_batch_size sequences each):

- random: Trainer's default (a RandomSampler, as the paper's training);
- batch_rebalance: `base.trainer_args={train_sampling_strategy: batch_rebalance}`
  (transformers' BatchRebalanceSampler): every optimizer step still takes batch_size random
  examples, as random does, but splits them into micro-batches of similar lengths (of any
  sizes), so the step's gradient is the same sum over the same kind of batch;
- group_by_length: `base.trainer_args={train_sampling_strategy: group_by_length}`
  (transformers' LengthGroupedSampler): the steps themselves hold examples of similar lengths.

The ratios to random are the training compute each saves on this data (the same examples,
epochs and optimizer steps). With `--eval FILE ...`, the same count for decoding: the prompts
of each file (as evaluation encodes them) in batches of --generation-batch-size, in input
order and longest first (`elrea.evaluation.by_length`, how `elrea eval` and `elrea compare`
batch them). Nothing is trained or decoded; it takes seconds.

    .venv/bin/python benchmarks/padding.py --data benchmarks/work/quality-bigbench-mix/data/train.jsonl --max-length 384 \
        --eval benchmarks/work/quality-bigbench-mix/data/{validation,test,bbh}.jsonl
    .venv/bin/python benchmarks/padding.py --quick      # tiny model, toy data (for tests)

Options: --data, --model (default smollm2-135m-instruct), --max-length (default the config's
data.max_length), --batch-size 16, --micro-batch-size 8, --eval FILE ..., --generation-batch-size
8 (the config's generation.batch_size), --seed 0, --quick, --out (default
benchmarks/results/padding.json).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (data_benchmark_main, parse_data_args, print_table,  # noqa: E402
                     tiny_model_dir)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a training JSONL file (instruction, response)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-length", type=int, default=None, help="data.max_length (default: the config's)")
    ap.add_argument("--batch-size", type=int, default=16, help="sequences per optimizer step")
    ap.add_argument("--micro-batch-size", type=int, default=8, help="sequences per forward/backward")
    ap.add_argument("--eval", nargs="*", default=[], help="evaluation JSONL files: their prompts' padding")
    ap.add_argument("--generation-batch-size", type=int, default=8, help="prompts decoded together")
    return parse_data_args(ap, argv)


def padded_groups(lengths: list[int], groups: list[list[int]]) -> dict:
    """Padded and real tokens of micro-batches given as lists of example indices (of any sizes)."""
    widths = [max(lengths[j] for j in g) for g in groups]
    padded = sum(w * len(g) for w, g in zip(widths, groups))
    real = sum(lengths[j] for g in groups for j in g)
    return {"padded_tokens": padded, "real_tokens": real, "padded_per_real": round(padded / real, 3),
            "micro_batches": len(groups), "median_width": statistics.median(widths)}


def padding(lengths: list[int], order: list[int], micro: int) -> dict:
    """`padded_groups` of the micro-batches of `micro` examples taken in `order`."""
    return padded_groups(lengths, [order[i:i + micro] for i in range(0, len(order), micro)])


def run(args) -> dict:
    import torch
    from transformers.trainer_pt_utils import BatchRebalanceSampler, LengthGroupedSampler

    from elrea.config import DataConfig, ModelConfig
    from elrea.data import PromptFormatter, encode_all, load_records
    from elrea.models import load_tokenizer
    from elrea.testing import make_toy_records, write_jsonl

    data = args.data
    if args.quick:
        data = write_jsonl(Path(tempfile.mkdtemp(prefix="padding-")) / "train.jsonl", make_toy_records(96, seed=0))
        args.model = tiny_model_dir()
    max_length = args.max_length or DataConfig().max_length
    tok = load_tokenizer(ModelConfig(name=args.model))
    encoded = encode_all(PromptFormatter(tok, max_length=max_length), load_records(data), "train")
    lengths = [len(e.input_ids) for e in encoded]
    gen = torch.Generator().manual_seed(args.seed)
    random_order = torch.randperm(len(lengths), generator=gen).tolist()   # RandomSampler's order
    grouped = list(LengthGroupedSampler(args.batch_size, lengths=lengths,
                                        generator=torch.Generator().manual_seed(args.seed)))
    assert sorted(grouped) == list(range(len(lengths)))   # one epoch: every example once
    accum = max(1, args.batch_size // args.micro_batch_size)
    rebalanced = list(BatchRebalanceSampler(lengths, effective_batch_size=args.batch_size, dp_size=1,
                                            grad_accum=accum, seed=args.seed, drop_last=False))   # as Trainer
    from elrea.evaluation import by_length

    b = args.generation_batch_size
    prompts = {}
    for f in args.eval:
        plen = [len(e.input_ids) for e in encode_all(PromptFormatter(tok, max_length=max_length), load_records(f),
                                                     "instruction")]
        orders = {"input": padding(plen, list(range(len(plen))), b), "by_length": padding(plen, by_length(plen), b)}
        prompts[Path(f).name] = {"prompts": len(plen), "orders": orders,
                                 "input_over_by_length": round(orders["input"]["padded_tokens"]
                                                               / orders["by_length"]["padded_tokens"], 2)}
    res = {"random": padding(lengths, random_order, args.micro_batch_size),
           "batch_rebalance": padded_groups(lengths, rebalanced),
           "group_by_length": padding(lengths, grouped, args.micro_batch_size)}
    return {"data": "toy (elrea.testing)" if args.quick else str(data),
            "model": "tiny" if args.quick else args.model, "examples": len(lengths), "max_length": max_length,
            "mean_tokens": round(statistics.mean(lengths), 1), "batch_size": args.batch_size,
            "micro_batch_size": args.micro_batch_size, "orders": res,
            "random_over_grouped": round(res["random"]["padded_tokens"] / res["group_by_length"]["padded_tokens"], 2),
            "random_over_rebalanced": round(res["random"]["padded_tokens"] / res["batch_rebalance"]["padded_tokens"],
                                            2),
            **({"generation_batch_size": b, "eval": prompts} if prompts else {})}


def show(r: dict) -> None:
    rows = [[name, o["micro_batches"], o["median_width"], o["padded_tokens"], o["real_tokens"], o["padded_per_real"]]
            for name, o in r["orders"].items()]
    print_table(f"Padding over one epoch: {r['data']}, {r['examples']} examples (mean {r['mean_tokens']} tokens), "
                f"micro-batches of {r['micro_batch_size']}",
                ["order", "micro-batches", "median width", "padded tokens", "real tokens", "padded / real"], rows,
                [f"random / batch_rebalance padded tokens: {r['random_over_rebalanced']}; random / "
                 f"group_by_length: {r['random_over_grouped']} (the forward and backward run on every padded "
                 "position)"])
    if r.get("eval"):
        rows = [[name, e["prompts"], e["orders"]["input"]["padded_per_real"], e["orders"]["by_length"]["padded_per_real"],
                 e["input_over_by_length"]] for name, e in r["eval"].items()]
        print_table(f"Prompt padding when decoding, batches of {r['generation_batch_size']}",
                    ["file", "prompts", "padded / real, input order", "padded / real, longest first",
                     "x fewer padded"], rows)


def main(argv=None) -> dict:
    return data_benchmark_main(__file__, parse_args, run, show, argv)


if __name__ == "__main__":
    main()
