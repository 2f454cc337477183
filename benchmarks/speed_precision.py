"""python benchmarks/speed_precision.py --data TRAIN.jsonl  -- float32 or bfloat16 on this CPU?

`model.dtype=bfloat16` loads the backbone in bf16 (LoRA weights stay float32) and trains under
bf16 autocast. Whether that pays on a CPU depends on the CPU: with AMX tiles (Intel Sapphire
Rapids and later) a bf16 matmul runs several times faster than a float32 one; without them, bf16
is emulated and gains nothing. This measures, side by side in one run, the two stages that
dominate a CPU run, each as elrea runs it, in both dtypes:

- train: one training micro-batch (forward, backward, AdamW on the LoRA parameters), with
  elrea's CPU dropout and labelled logits, as `elrea fit` trains the base adapter and experts;
- features: the projected per-example gradient features of one batch
  (`elrea.features.batch_features`, sparse projection), as the features stage computes them;
- decode: greedy decoding of a batch of prompts through the engine (`elrea.engine.Ensemble`)
  mixing 5 adapters (the trained one and 4 more, B random), as `elrea compare` and the server
  decode an ensemble (--decode-tokens 0 leaves it out);

and what bf16 changes: the training loss of the first micro-batch in each dtype, and the
cosine between each example's float32 and bfloat16 feature (the clustering and the router read
only these directions), and how often the two dtypes' greedy answers are the same.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_precision.py \\
        --data benchmarks/work/quality-bigbench-mix/data/train.jsonl --max-length 384
    .venv/bin/python benchmarks/speed_precision.py --quick        # tiny model, toy data (for tests)

Options: --data, --model (default smollm2-135m-instruct), --max-length (default the config's
data.max_length), --micro-batch-size 8, --micro-batches 2 (per timed repetition),
--feature-batch-size 16, --dim 8192, --decode-tokens 32, --decode-batch 8, --experts 4, --repeats 2 (the median is reported; interleaved), --threads,
--seed 0, --quick, --out (default benchmarks/results/speed_precision.json). The machine record
names the CPU's AMX and AVX-512 bf16 support.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (data_benchmark_main, parse_data_args, print_table,  # noqa: E402
                     randomize_lora_b, training_data)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from speed_training import micro_batches  # noqa: E402   (the same random micro-batches)

DTYPES = ("float32", "bfloat16")
STAGES = ("train", "features", "decode")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a training JSONL file (instruction, response)")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--max-length", type=int, default=None, help="data.max_length (default: the config's)")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=2, help="training micro-batches per timed repetition")
    ap.add_argument("--feature-batch-size", type=int, default=16, help="features.batch_size")
    ap.add_argument("--dim", type=int, default=8192, help="projection dimension")
    ap.add_argument("--decode-tokens", type=int, default=32,
                    help="greedy tokens each prompt decodes through the engine (0: no decode stage)")
    ap.add_argument("--decode-batch", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--experts", type=int, default=4, help="adapters besides the trained one in the ensemble decoded")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    return parse_data_args(ap, argv)


def run(args) -> dict:
    from peft import get_peft_model

    from elrea.config import DataConfig, LoraConfig, ModelConfig
    from elrea.data import PromptFormatter, encode_all, load_records
    from elrea.features import batch_features, num_lora_params
    from elrea.models import load_backbone, load_tokenizer, peft_lora_config
    from elrea.projection import SparseProjector
    from elrea.training import cpu_dropout, labelled_logits

    data = training_data(args, "speed-precision-")
    max_length = args.max_length or DataConfig().max_length
    lora = LoraConfig()
    models, tok = {}, None
    for dt in DTYPES:   # the same LoRA weights on each backbone, B randomised so features are not trivial
        mcfg = ModelConfig(name=args.model, dtype=dt)
        tok = tok or load_tokenizer(mcfg)
        torch.manual_seed(args.seed)
        m = get_peft_model(load_backbone(mcfg, "cpu", training=True), peft_lora_config(lora))
        randomize_lora_b(m, 0.02, args.seed)
        models[dt] = m
    encoded = encode_all(PromptFormatter(tok, max_length=max_length), load_records(data), "train")
    train_batches = micro_batches(encoded, args.micro_batches, args.micro_batch_size, args.seed, tok.pad_token_id)
    feature_batch = micro_batches(encoded, 1, args.feature_batch_size, args.seed, tok.pad_token_id)[0]
    projector = SparseProjector(num_lora_params(models["float32"]), args.dim, seed=args.seed)
    start = {dt: {k: v.detach().clone() for k, v in m.named_parameters() if v.requires_grad}
             for dt, m in models.items()}

    def restore(dt):
        with torch.no_grad():
            for k, v in models[dt].named_parameters():
                if k in start[dt]:
                    v.copy_(start[dt][k])

    def train(dt, batches=train_batches) -> tuple[float, float]:
        model = models[dt]
        restore(dt)
        model.train()
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        first = None
        t0 = time.perf_counter()
        with cpu_dropout(model):
            for b in batches:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dt == "bfloat16"):
                    loss = model(**labelled_logits(b)).loss
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                first = float(loss.detach()) if first is None else first
        return time.perf_counter() - t0, first

    def features(dt, batch=feature_batch) -> tuple[float, torch.Tensor]:
        model = models[dt]
        restore(dt)
        model.eval()
        t0 = time.perf_counter()
        out = batch_features(model, batch, projector)
        return time.perf_counter() - t0, out

    stages = {"train": train, "features": features}
    first_out = {}
    for dt in DTYPES:   # warm-up (allocator, kernels, the projector's cache); keeps the outputs to compare
        train(dt, train_batches[:1])
        first_out[dt] = features(dt)[1]
    losses = {dt: train(dt, train_batches[:1])[1] for dt in DTYPES}
    times = {f"{s}_{dt}": [] for s in stages for dt in DTYPES}
    for _ in range(args.repeats):   # interleaved: a slow spell of the machine hits both dtypes
        for s in stages:
            for dt in DTYPES:
                times[f"{s}_{dt}"].append(stages[s](dt)[0])
    decode_times, decode_tokens, prompts = {dt: [] for dt in DTYPES}, {}, None
    if args.decode_tokens:
        from elrea.engine import Ensemble

        fmt = PromptFormatter(tok, max_length=max_length)
        prompts = [fmt.encode_instruction(r.messages).input_ids for r in load_records(data)[:args.decode_batch]]
        gen = torch.Generator().manual_seed(args.seed)   # routing weights: normalised exponentials (Dirichlet(1))
        e = -torch.log(torch.rand(len(prompts), 1 + args.experts, generator=gen).clamp(min=1e-6))
        weights = e / e.sum(1, keepdim=True)
        engines = {}
        for dt, m in models.items():   # the training adapter plus --experts more, B random: an ensemble
            names = ["default"] + [f"expert_{c}" for c in range(1, args.experts + 1)]
            for a in names[1:]:
                m.add_adapter(a, peft_lora_config(lora))
            randomize_lora_b(m, 0.02, args.seed)
            m.eval()
            engines[dt] = Ensemble(m, names, pad_id=tok.pad_token_id, compile="off")
            decode_tokens[dt] = engines[dt].generate(prompts, weights, max_new_tokens=2)   # warm-up
        for _ in range(args.repeats):
            for dt in DTYPES:
                t0 = time.perf_counter()
                decode_tokens[dt] = engines[dt].generate(prompts, weights, max_new_tokens=args.decode_tokens)
                decode_times[dt].append(time.perf_counter() - t0)
        times.update({f"decode_{dt}": v for dt, v in decode_times.items()})
    median = {k: statistics.median(v) for k, v in times.items()}
    cos = F.cosine_similarity(first_out["float32"], first_out["bfloat16"], dim=1)
    real = sum(int(b["attention_mask"].sum()) for b in train_batches)
    padded = sum(b["attention_mask"].numel() for b in train_batches)
    return {"data": "toy (elrea.testing)" if args.quick else str(data), "model": "tiny" if args.quick else args.model,
            "threads": torch.get_num_threads(), "lora": {"rank": lora.rank, "dropout": lora.dropout,
                                                          "target_modules": lora.target_modules},
            "micro_batch_size": args.micro_batch_size, "micro_batches": len(train_batches),
            "tokens": {"real": real, "padded": padded}, "feature_batch_size": args.feature_batch_size,
            "dim": args.dim, "repeats": args.repeats,
            "seconds": {"train_per_micro_batch": {dt: round(median[f"train_{dt}"] / len(train_batches), 4)
                                                  for dt in DTYPES},
                        "features_per_example": {dt: round(median[f"features_{dt}"] / args.feature_batch_size, 4)
                                                 for dt in DTYPES}},
            "all_seconds": times,
            "speedup": {s: round(median[f"{s}_float32"] / median[f"{s}_bfloat16"], 3) for s in STAGES
                        if f"{s}_float32" in median},
            **({"decode": {"prompts": len(prompts), "adapters": 1 + args.experts, "new_tokens": args.decode_tokens,
                           "tokens_per_second": {dt: round(len(prompts) * args.decode_tokens / median[f"decode_{dt}"], 2)
                                                 for dt in DTYPES},
                           "same_tokens": _same_tokens(decode_tokens["float32"], decode_tokens["bfloat16"])}}
               if args.decode_tokens else {}),
            "first_loss": {dt: round(v, 5) for dt, v in losses.items()},
            "feature_cosine": {"min": round(float(cos.min()), 5), "mean": round(float(cos.mean()), 5)}}


def _same_tokens(a: list[list[int]], b: list[list[int]]) -> dict:
    """How far float32's and bfloat16's greedy tokens agree: whole answers equal, and the mean
    share of each answer before the first token that differs."""
    prefix = []
    for x, y in zip(a, b):
        n = next((i for i, (u, v) in enumerate(zip(x, y)) if u != v), min(len(x), len(y)))
        prefix.append(n / max(len(x), len(y), 1))
    return {"identical": round(sum(x == y for x, y in zip(a, b)) / len(a), 3),
            "common_prefix": round(sum(prefix) / len(prefix), 3)}


def show(r: dict) -> None:
    s = r["seconds"]
    rows = [["train: s per micro-batch (fwd, bwd, AdamW)", f"{s['train_per_micro_batch']['float32']:.3f}",
             f"{s['train_per_micro_batch']['bfloat16']:.3f}", f"{r['speedup']['train']:.2f}x"],
            ["features: s per example", f"{s['features_per_example']['float32']:.3f}",
             f"{s['features_per_example']['bfloat16']:.3f}", f"{r['speedup']['features']:.2f}x"]]
    if "decode" in r:
        d = r["decode"]
        rows.append([f"decode: tokens/s, {d['prompts']} prompts x {d['adapters']} adapters (more is faster)",
                     f"{d['tokens_per_second']['float32']:.1f}", f"{d['tokens_per_second']['bfloat16']:.1f}",
                     f"{r['speedup']['decode']:.2f}x"])
    m = r["machine"]
    print_table(f"float32 vs bfloat16 on {m['cpu']} (AMX {m.get('cpu_amx')}, AVX-512 bf16 "
                f"{m.get('cpu_avx512_bf16')}): {r['model']}, LoRA r{r['lora']['rank']}, "
                f"{r['micro_batches']} micro-batches of {r['micro_batch_size']} ({r['tokens']['padded']} padded tokens), "
                f"features in a batch of {r['feature_batch_size']}, d {r['dim']}",
                ["stage", "float32", "bfloat16", "bf16 speed-up"], rows,
                [f"first micro-batch loss: float32 {r['first_loss']['float32']}, bfloat16 {r['first_loss']['bfloat16']}; "
                 f"cosine of each example's float32 and bfloat16 feature: min {r['feature_cosine']['min']}, "
                 f"mean {r['feature_cosine']['mean']}"
                 + (f"; greedy answers identical {r['decode']['same_tokens']['identical']:.0%}, common prefix "
                    f"{r['decode']['same_tokens']['common_prefix']:.0%}" if "decode" in r else "")])


def main(argv=None) -> dict:
    return data_benchmark_main(__file__, parse_args, run, show, argv)


if __name__ == "__main__":
    main()
