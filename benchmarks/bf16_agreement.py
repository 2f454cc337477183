"""python benchmarks/bf16_agreement.py  -- does elrea decode what PEFT decodes, in bf16, on a real checkpoint?

On smollm2-135m-instruct (real weights; 5 LoRA adapters with random B, std --b-std), for
--prompts prompts and --max-new-tokens greedy tokens (EOS ignored), in each --dtypes:

- one-hot: the engine with one adapter at weight 1 (`Ensemble.generate`, batch --batch)
  against PEFT's own `generate` with that adapter active, one prompt at a time: the share of
  prompts decoded identically and the mean common prefix (share of tokens before the first
  difference);
- logits: PEFT's tokens teacher-forced through the engine's scoring path (`Ensemble.score`,
  stacked LoRA) and through PEFT's forward: the largest difference of a token's log-probability;
- ensemble: the engine with 5 adapters (Dirichlet weights) against the naive ensemble (one
  full forward per adapter per step, logits summed in float32) on the first
  --ensemble-prompts prompts: identical share, common prefix.

Where bf16 rounding alone differs (another batch shape, another GEMM kernel), greedy decoding
of near-tied logits can take another token; the prefix says how far decoding ran identically.

Options: --dtypes float32 bfloat16 --prompts 16 --max-new-tokens 32 --batch 8 --device cpu --quick.
Writes benchmarks/results/bf16_agreement.json (or --out).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import torch  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, "bf16_agreement")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=8, help="the engine's batch size")
    ap.add_argument("--ensemble-prompts", type=int, default=4,
                    help="prompts for the ensemble check (the naive ensemble recomputes everything each step)")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--b-std", type=float, default=0.02)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.max_new_tokens = min(args.prompts, 4), min(args.max_new_tokens, 8)
    return args


def _model(args, dtype: str):
    from peft import get_peft_model

    from elrea.config import LoraConfig, ModelConfig
    from elrea.models import load_backbone, load_tokenizer, peft_lora_config

    name = C.tiny_model_dir() if args.quick else args.model
    cfg = ModelConfig(name=name, device=args.device, dtype=dtype)
    torch.manual_seed(args.seed)
    names = ["base"] + [f"expert_{c}" for c in range(1, args.experts + 1)]
    model = get_peft_model(load_backbone(cfg), peft_lora_config(LoraConfig()), adapter_name="base")
    for a in names[1:]:
        model.add_adapter(a, peft_lora_config(LoraConfig()))
    C.randomize_lora_b(model, args.b_std, args.seed)
    model.set_adapter("base")
    return model.eval(), load_tokenizer(cfg), names


@torch.no_grad()
def _peft_greedy(model, prompt, adapter, n, pad_id):
    model.set_adapter(adapter)
    dev = next(model.parameters()).device
    ids = torch.tensor([prompt], device=dev)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=pad_id)
    model.set_adapter("base")
    return out[0, len(prompt):].tolist()


@torch.no_grad()
def _naive(model, prompt, names, w, n):
    ids, dev = list(prompt), next(model.parameters()).device
    for _ in range(n):
        logits = 0
        for name, wc in zip(names, w.tolist()):
            model.set_adapter(name)
            logits = logits + wc * model(input_ids=torch.tensor([ids], device=dev)).logits[0, -1].float()
        ids.append(int(logits.argmax()))
    model.set_adapter("base")
    return ids[len(prompt):]


@torch.no_grad()
def _peft_logprobs(model, prompt, cont, adapter):
    model.set_adapter(adapter)
    dev = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([prompt + cont], device=dev)).logits[0].float()
    model.set_adapter("base")
    logp = torch.log_softmax(logits, -1)[len(prompt) - 1:-1]
    return logp.gather(1, torch.tensor(cont, device=dev)[:, None]).squeeze(1)


def _prefix(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i / max(1, len(a))
    return 1.0


def measure(args, dtype: str) -> dict:
    from elrea.data import PromptFormatter
    from elrea.engine import Ensemble

    model, tok, names = _model(args, dtype)
    texts, origin = C.instructions(args.prompts, "test", args.seed, args.quick)
    fmt = PromptFormatter(tok)
    prompts = [fmt.encode_instruction([{"role": "user", "content": t}]).input_ids for t in texts]
    n, adapter = args.max_new_tokens, names[1]
    C.log(f"{dtype}: PEFT generate, {len(prompts)} prompts x {n} tokens ...")
    peft = [_peft_greedy(model, p, adapter, n, tok.pad_token_id) for p in prompts]
    gen = torch.Generator().manual_seed(args.seed)
    e = -torch.log(torch.rand(len(prompts), len(names), generator=gen).clamp(min=1e-6))
    w = e / e.sum(1, keepdim=True)
    C.log(f"{dtype}: naive ensemble ...")
    m = min(args.ensemble_prompts, len(prompts))
    naive = [_naive(model, p, names, w[i], n) for i, p in enumerate(prompts[:m])]
    ref_lp = [_peft_logprobs(model, p, c, adapter) for p, c in zip(prompts, peft)]
    engine = Ensemble(model, names, tok.pad_token_id)
    C.log(f"{dtype}: engine ...")
    one_hot, mixed, lp_diff = [], [], 0.0
    for s in range(0, len(prompts), args.batch):
        chunk = prompts[s:s + args.batch]
        one_hot += engine.generate(chunk, engine.one_hot(adapter, len(chunk)), max_new_tokens=n)
        mixed += engine.generate(chunk, w[s:s + len(chunk)], max_new_tokens=n)
    for p, c, ref in zip(prompts, peft, ref_lp):
        # per-token log-probs through the engine: score each prefix's next token (one forward per prompt)
        got = torch.tensor([engine.score(p + c[:t], [[c[t]]], engine.one_hot(adapter, 1)[0])[0] for t in range(len(c))])
        lp_diff = max(lp_diff, float((got - ref.cpu()).abs().max()))
    engine.close()
    return {"dtype": dtype, "data": origin, "prompts": len(prompts), "new_tokens": n,
            "one_hot_identical": sum(a == b for a, b in zip(one_hot, peft)) / len(prompts),
            "one_hot_common_prefix": sum(_prefix(a, b) for a, b in zip(one_hot, peft)) / len(prompts),
            "logprob_max_abs_diff": lp_diff,
            "ensemble_prompts": m,
            "ensemble_identical": sum(a == b for a, b in zip(mixed, naive)) / m,
            "ensemble_common_prefix": sum(_prefix(a, b) for a, b in zip(mixed, naive)) / m}


def run(args) -> dict:
    return {"model": "tiny" if args.quick else args.model, "device": args.device,
            "results": [measure(args, d) for d in args.dtypes]}


def show(report: dict) -> None:
    cols = ["dtype", "one-hot = PEFT", "prefix", "max |dlogp|", "ensemble = naive", "prefix"]
    rows = [[r["dtype"], r["one_hot_identical"], r["one_hot_common_prefix"], r["logprob_max_abs_diff"],
             r["ensemble_identical"], r["ensemble_common_prefix"]] for r in report["results"]]
    C.print_table(f"elrea vs PEFT and the naive ensemble ({report['model']}, {report['device']})", cols, rows,
                  [C.machine_note(report)])


if __name__ == "__main__":
    C.run_benchmark("bf16_agreement", parse_args, run, show)
