"""python benchmarks/feature_memory.py --data TRAIN.jsonl  -- how the gradient features size their batches to memory.

A featurizer measures its first batch (at most elrea.features.PROBE_TOKENS padded tokens): its
peak memory over its padded tokens. Later batches hold at most the tokens that fit in half of
the memory free before it, or features.max_tokens_per_batch if fewer (docs/method.md, "Feature
batches and memory"). This runs the features of the --examples longest training examples (the
batches a run starts with), one dtype after the other, each with a fresh featurizer as `elrea
fit` builds it, and records, per dtype:

- the measured bytes per padded token and the cap they give;
- what the default batch (features.batch_size x the longest example) would have needed at
  that rate, against the memory free;
- every later batch's own peak (measured the same way) against the prediction for its padded
  tokens: a ratio above 1 means the estimate is short by that factor, which the half share must
  absorb.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/feature_memory.py \\
        --data benchmarks/work/quality-bigbench-mix/data/train.jsonl --max-length 384
    .venv/bin/python benchmarks/feature_memory.py --quick         # tiny model, toy data (for tests)

Options: --data, --model (default smollm2-135m-instruct), --examples 48, --batch-size 16,
--max-length 384, --dtypes float32 bfloat16, --dim 8192, --memory-fraction (default 0.5),
--threads, --seed 0, --quick, --out
(default benchmarks/results/feature_memory.json).
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import data_benchmark_main, parse_data_args, print_table, training_data  # noqa: E402

import torch  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="a training JSONL file")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--examples", type=int, default=48, help="the longest examples of the file")
    ap.add_argument("--batch-size", type=int, default=16, help="features.batch_size")
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--memory-fraction", type=float, default=None,
                    help="the share of free memory a batch may take (default elrea.features.MEMORY_FRACTION)")
    ap.add_argument("--threads", type=int, default=None)
    return parse_data_args(ap, argv)


def one_dtype(args, dtype: str, data: str) -> dict:
    from peft import get_peft_model

    from elrea.config import FeatureConfig, LoraConfig, ModelConfig
    from elrea.data import PromptFormatter, encode_all, load_records
    from elrea.features import MEMORY_FRACTION, Featurizer, num_lora_params
    from elrea.models import PeakMemory, load_backbone, load_tokenizer, peft_lora_config
    from elrea.projection import SparseProjector

    mcfg = ModelConfig(name=args.model, dtype=dtype)
    tok = load_tokenizer(mcfg)
    torch.manual_seed(args.seed)
    model = get_peft_model(load_backbone(mcfg, "cpu", training=True), peft_lora_config(LoraConfig()))
    model.eval()
    encoded = encode_all(PromptFormatter(tok, max_length=args.max_length), load_records(data), "train")
    encoded = sorted(encoded, key=lambda e: -len(e.input_ids))[:args.examples]
    feat = Featurizer(model, SparseProjector(num_lora_params(model, "default"), args.dim, args.seed),
                      adapter="default", pad_id=tok.pad_token_id, batch_size=args.batch_size,
                      max_tokens=FeatureConfig().max_tokens_per_batch, window=10 ** 6,
                      memory_fraction=args.memory_fraction or MEMORY_FRACTION)
    batches = []
    real = feat._features

    def measured(examples):
        tokens = len(examples) * max(len(e.input_ids) for e in examples)
        if feat.token_cap is None:        # the featurizer's own probe measures this one
            batches.append({"rows": len(examples), "padded_tokens": tokens, "probe": True})
            return real(examples)
        with PeakMemory(feat.device) as peak:
            out = real(examples)
        batches.append({"rows": len(examples), "padded_tokens": tokens, "probe": False, "peak_bytes": peak.bytes})
        return out

    feat._features = measured
    t0 = time.perf_counter()
    feat.features(encoded)
    seconds = time.perf_counter() - t0
    per_token = feat.bytes_per_token
    later = [b for b in batches if not b["probe"] and b["peak_bytes"]]
    for b in later:
        b["measured_over_predicted"] = round(b["peak_bytes"] / (per_token * b["padded_tokens"]), 3)
    longest = len(encoded[0].input_ids)
    gib = lambda b: None if b is None else round(b / 2 ** 30, 2)    # noqa: E731
    largest = max((b["peak_bytes"] for b in later), default=None)
    predicted = per_token * args.batch_size * longest if per_token else None
    result = {
        "mib_per_token": round(per_token / 2 ** 20, 3) if per_token else None,
        "free_gib": gib(feat.free_bytes),
        "token_cap": feat.token_cap,
        "max_tokens_setting": feat.max_tokens,
        "longest": longest,
        "default_batch_tokens": args.batch_size * longest,
        "default_batch_predicted_gib": gib(predicted),
        "largest_later_peak_gib": gib(largest),
        "worst_measured_over_predicted": max((b["measured_over_predicted"] for b in later), default=None),
        "batches": batches,
        "seconds": round(seconds, 2),
    }
    return result


def run(args) -> dict:
    from elrea.features import MEMORY_FRACTION, PROBE_TOKENS

    data = training_data(args, "feature-memory-")
    per_dtype = {}
    for dt in args.dtypes:
        per_dtype[dt] = one_dtype(args, dt, data)
        gc.collect()                      # the model of this dtype goes before the next loads
    return {"model": args.model, "examples": args.examples, "batch_size": args.batch_size,
            "max_length": args.max_length, "memory_fraction": args.memory_fraction or MEMORY_FRACTION,
            "probe_tokens": PROBE_TOKENS, "dtypes": per_dtype}


def show(r: dict) -> None:
    rows = [[dt, d["mib_per_token"], d["token_cap"], f"{d['default_batch_tokens']} ({d['default_batch_predicted_gib']})",
             d["free_gib"], d["largest_later_peak_gib"], d["worst_measured_over_predicted"]]
            for dt, d in r["dtypes"].items()]
    print_table(f"Gradient-feature batches sized to memory: the {r['examples']} longest examples, batch size "
                f"{r['batch_size']}, max length {r['max_length']}; {r['model']}",
                ["dtype", "MiB / padded token", "token cap", "default batch tokens (GiB)", "free GiB",
                 "largest later batch peak GiB", "worst measured / predicted"], rows,
                [f"the cap keeps a batch within {r['memory_fraction']:g} of the free memory at the first batch's rate"])


def main(argv=None) -> dict:
    return data_benchmark_main(__file__, parse_args, run, show, argv)


if __name__ == "__main__":
    main()
