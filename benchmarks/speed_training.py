"""python benchmarks/speed_training.py --data TRAIN.jsonl  -- what LoRA dropout and unneeded logits cost a CPU training step.

PEFT's LoRA puts `nn.Dropout(p)` on the input of every adapted linear layer (p = 0.05 by
default, the paper's). On the CPU, torch draws that mask one mt19937 float per element, which
for an all-linear LoRA (seven adapted layers per block) costs about as much as the layers'
matmuls. `elrea fit` trains with `elrea.training.CpuDropout` instead (the same dropout: each
element kept with probability 1 - p, kept ones scaled by 1 / (1 - p); masks from numpy's PCG64).

The loss is over the response tokens only, yet a causal LM computes logits (a projection onto
the whole vocabulary, and its softmax) at every position. `elrea fit` has the model compute them
only where a label is (`elrea.training.labelled_logits`; the same loss).

This times one training micro-batch (forward, backward and AdamW on the LoRA parameters) on
micro-batches of real examples of a training file, four ways side by side, their repetitions
interleaved:

- torch: PEFT's own `nn.Dropout`, every logit (what Trainer on a PEFT model does without elrea);
- elrea_every_logit: `CpuDropout`, every logit (`elrea fit` before labelled logits);
- elrea: `CpuDropout`, logits only where a label is, as `elrea fit` trains on the CPU;
- none: lora.dropout = 0, labelled logits: the floor (no dropout at all: a different training).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_training.py \\
        --data benchmarks/work/quality-bigbench-mix/data/train.jsonl --max-length 384
    .venv/bin/python benchmarks/speed_training.py --quick        # tiny model, toy data (for tests)

Options: --data, --model (default smollm2-135m-instruct), --dtype (float32; bfloat16 trains
under bf16 autocast as `elrea fit` does), --max-length (default the config's data.max_length),
--micro-batch-size 8, --micro-batches 4 (per timed repetition), --repeats 2 (the median is
reported; about 6 minutes on 2 cores), --threads, --seed 0, --quick, --out (default
benchmarks/results/speed_training.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (data_benchmark_main, parse_data_args, print_table,  # noqa: E402
                     training_data)

import torch  # noqa: E402

VARIANTS = ("torch", "elrea_every_logit", "elrea", "none")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a training JSONL file (instruction, response)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--max-length", type=int, default=None, help="data.max_length (default: the config's)")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches per timed repetition")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    return parse_data_args(ap, argv)


def micro_batches(encoded, n: int, size: int, seed: int, pad_id: int) -> list[dict]:
    """`n` micro-batches of `size` examples drawn at random (the same for every variant)."""
    from elrea.data import collate

    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(encoded), generator=g).tolist()
    picks = [order[(i * size) % len(order):][:size] for i in range(n)]
    return [collate([encoded[j] for j in p], pad_id, side="right") for p in picks]


def run(args) -> dict:
    from peft import get_peft_model

    from elrea.config import DataConfig, LoraConfig, ModelConfig
    from elrea.data import PromptFormatter, encode_all, load_records
    from elrea.models import load_backbone, load_tokenizer, peft_lora_config
    from elrea.training import cpu_dropout, labelled_logits

    data = training_data(args, "speed-training-")
    max_length = args.max_length or DataConfig().max_length
    mcfg = ModelConfig(name=args.model, dtype=args.dtype)
    tok = load_tokenizer(mcfg)
    encoded = encode_all(PromptFormatter(tok, max_length=max_length), load_records(data), "train")
    batches = micro_batches(encoded, args.micro_batches, args.micro_batch_size, args.seed, tok.pad_token_id)
    lora = LoraConfig()
    torch.manual_seed(args.seed)
    model = get_peft_model(load_backbone(mcfg, "cpu", training=True), peft_lora_config(lora))
    model.train()
    start = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    layers = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]

    @contextlib.contextmanager
    def variant(name):
        with torch.no_grad():   # every variant times the same weights
            for k, v in model.named_parameters():
                if k in start:
                    v.copy_(start[k])
        if name == "none":
            for d in layers:
                d.p = 0.0
        try:
            with cpu_dropout(model) if name.startswith("elrea") else contextlib.nullcontext():
                yield
        finally:
            for d in layers:
                d.p = lora.dropout

    def timed_pass(name, batches=batches) -> float:
        with variant(name):
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
            t0 = time.perf_counter()
            for b in batches:
                if name in ("elrea", "none"):
                    b = labelled_logits(b)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bfloat16"):
                    loss = model(**b).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

    for name in VARIANTS:   # warm-up: allocator, kernels, first-call paths
        timed_pass(name, batches[:1])
    times = {name: [] for name in VARIANTS}
    for _ in range(args.repeats):   # interleaved: a slow spell of the machine hits every variant
        for name in VARIANTS:
            times[name].append(timed_pass(name))
    median = {k: statistics.median(v) for k, v in times.items()}
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    per_batch = {k: round(v / len(batches), 4) for k, v in median.items()}
    return {"data": "toy (elrea.testing)" if args.quick else str(data), "model": "tiny" if args.quick else args.model,
            "dtype": args.dtype, "threads": torch.get_num_threads(), "lora": {"rank": lora.rank,
            "dropout": lora.dropout, "target_modules": lora.target_modules, "dropout_layers": len(layers)},
            "micro_batch_size": args.micro_batch_size, "micro_batches": len(batches),
            "tokens": {"real": real, "padded": padded}, "repeats": args.repeats,
            "seconds_per_micro_batch": per_batch, "all_seconds": times,
            "labelled_tokens": sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches),
            "torch_over_elrea": round(median["torch"] / median["elrea"], 3),
            "dropout_speedup": round(median["torch"] / median["elrea_every_logit"], 3),
            "every_logit_over_labelled": round(median["elrea_every_logit"] / median["elrea"], 3),
            "dropout_share_elrea": round((median["elrea"] - median["none"]) / median["elrea"], 3)}


def show(r: dict) -> None:
    label = {"torch": "torch nn.Dropout (PEFT's), every logit", "elrea_every_logit": "elrea CpuDropout, every logit",
             "elrea": "elrea CpuDropout, labelled logits", "none": "no dropout, labelled logits (floor)"}
    rows = [[label[k], f"{v:.3f}", f"{r['seconds_per_micro_batch']['torch'] / v:.2f}x"]
            for k, v in r["seconds_per_micro_batch"].items()]
    print_table(f"One training micro-batch (forward, backward, AdamW): {r['model']} {r['dtype']}, LoRA r"
                f"{r['lora']['rank']} on {r['lora']['dropout_layers']} layers, dropout {r['lora']['dropout']}; "
                f"{r['micro_batches']} micro-batches of {r['micro_batch_size']} "
                f"({r['tokens']['padded']} padded tokens)",
                ["training step", "s per micro-batch", "speed vs torch"], rows,
                [f"torch / elrea: {r['torch_over_elrea']}x (dropout {r['dropout_speedup']}x, labelled logits "
                 f"{r['every_logit_over_labelled']}x; {r['labelled_tokens']} of {r['tokens']['padded']} "
                 f"positions labelled); dropout's share of elrea's step {r['dropout_share_elrea']:.0%}"])


def main(argv=None) -> dict:
    return data_benchmark_main(__file__, parse_args, run, show, argv)


if __name__ == "__main__":
    main()
