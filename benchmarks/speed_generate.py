"""python benchmarks/speed_generate.py  -- ensembled greedy decoding: elrea against the naive way.

Measures tokens/s of greedy decoding of exactly 64 new tokens, at batch 1 and batch 8, on
smollm2-135m-instruct with 5 LoRA adapters ("base" + 4 experts, rank 8, all linear layers,
random B so every adapter gives different logits; nothing is trained), for:

- single adapter (the floor): PEFT `model.generate` with one adapter active;
- single adapter through elrea's decoding loop (one-hot weights), to separate loop overhead
  from ensembling cost;
- naive ensemble: per step one forward per adapter, each with its own KV cache
  (`set_adapter` before each), logits summed with the routing weights;
- elrea: `elrea.ensemble.generate`, all (prompt, adapter) rows in one forward per step,
  each row its own adapter through `elrea.fastlora.grouped_lora` (two batched matmuls per
  LoRA layer); its tokens must equal the naive ensemble's, token for token;
- in-layer weight mixing: `elrea.ensemble.mix_in_layers` (one merged adapter per prompt),
  then elrea's loop with one-hot weights, mixing and clean-up included (as ELREA.generate
  does with mode="weights");
- the bound for any exact ensemble: the backbone alone (LoRA off) decoding every
  (prompt, adapter) row; on a compute-bound CPU no exact ensemble beats it;
- routing cost: `elrea.features.batch_features` on the base adapter, ms per prompt.

Routing weights are seeded Dirichlet(1) draws, all 5 adapters non-zero. Ratios are to the
single-adapter PEFT floor (targets: elrea >= 0.5x at batch 1 and 8; naive is ~1/5x).

Options: --max-new-tokens 64 --batch-sizes 1 8 --experts 4 --dim 8192 --threads N --quick
(tiny model, for tests) --out benchmarks/results/speed_generate.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common, when imported from elsewhere

import _common as C  # noqa: E402
import torch  # noqa: E402

from elrea.ensemble import cache_kwargs  # noqa: E402  (the KV-cache kwarg of this transformers)

TARGET_ELREA = 0.5


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, "speed_generate")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--experts", type=int, default=4, help="experts besides the base adapter")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter")
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the random LoRA B matrices")
    ap.add_argument("--dim", type=int, default=8192, help="projection dimension for the routing cost")
    args = ap.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, attr, value in [("--max-new-tokens", "max_new_tokens", 8), ("--dim", "dim", 256),
                                  ("--repeats", "repeats", 1)]:
            if flag not in given:
                setattr(args, attr, value)
    return args


# ----------------------------------------------------------------------------- set-up

def build(args):
    """(PEFT model with adapters base, expert_1.., tokenizer, adapter names, prompts, info)."""
    from peft import get_peft_model

    from elrea.config import LoraConfig
    from elrea.data import PromptFormatter
    from elrea.models import peft_lora_config

    backbone, tok, name = C.load_model(args)
    torch.manual_seed(args.seed)   # the A matrices are PEFT's random init: make them repeatable
    adapters = ["base"] + [f"expert_{c}" for c in range(1, args.experts + 1)]
    # a fresh PEFT config per adapter: PEFT rewrites target_modules in the config it is given
    model = get_peft_model(backbone, peft_lora_config(LoraConfig(rank=args.rank)), adapter_name="base")
    for a in adapters[1:]:
        model.add_adapter(a, peft_lora_config(LoraConfig(rank=args.rank)))
    C.randomize_lora_b(model, args.b_std, args.seed)
    model.set_adapter("base")
    model.eval()
    n = max(args.batch_sizes)
    texts, origin = C.instructions(n, "test", args.seed, args.quick)
    fmt = PromptFormatter(tok)
    encoded = [fmt.encode_instruction([{"role": "user", "content": t}]) for t in texts]
    lengths = [len(e.input_ids) for e in encoded]
    info = {"model": name, "data": origin, "mean_prompt_tokens": round(sum(lengths) / n, 1),
            "max_prompt_tokens": max(lengths), "pad_id": tok.pad_token_id, "eos_id": tok.eos_token_id}
    return model, adapters, encoded, info


def routing_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Dirichlet(1) rows (normalised exponentials), seeded; strictly positive."""
    gen = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(n, k, generator=gen).clamp(min=1e-6))
    return e / e.sum(1, keepdim=True)


# ----------------------------------------------------------------------------- the methods

@torch.no_grad()
def peft_generate(model, prompts, adapter: str, pad_id: int, eos_id: int, n: int) -> list[list[int]]:
    """Plain PEFT/transformers greedy generate with one adapter; min_new_tokens forces n tokens."""
    from transformers import GenerationConfig

    from elrea.models import model_device

    model.set_adapter(adapter)
    ids, mask = C.left_pad(prompts, pad_id, model_device(model))
    gc = GenerationConfig(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                          eos_token_id=eos_id)
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    return out[:, ids.shape[1]:].tolist()


@torch.no_grad()
def naive_generate(model, prompts, weights, adapters, pad_id: int, n: int) -> list[list[int]]:
    """The straightforward ensemble: each adapter its own forward and KV cache at every step."""
    from elrea.features import position_ids_from_mask
    from elrea.models import model_device

    device = model_device(model)
    ids, mask = C.left_pad(prompts, pad_id, device)
    weights = weights.to(device)
    pos = position_ids_from_mask(mask)
    used = [c for c in range(len(adapters)) if bool((weights[:, c] > 0).any())]
    caches = {c: None for c in used}
    step_ids, tokens = ids, []
    for _ in range(n):
        logits = None
        for c in used:
            model.set_adapter(adapters[c])
            out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, use_cache=True,
                        logits_to_keep=1, **(caches[c] or {}))
            caches[c] = cache_kwargs(out)
            # same order and precision as elrea's sum: 0 + w_0 l_0 + w_1 l_1 + ...
            part = out.logits[:, -1, :].float() * weights[:, c][:, None]
            logits = (torch.zeros_like(part) if logits is None else logits) + part
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        step_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
    model.set_adapter("base")
    return torch.stack(tokens, 1).tolist()


def elrea_generate(model, prompts, weights, adapters, pad_id: int, n: int) -> list[list[int]]:
    from elrea.ensemble import generate

    # eos_id=None: never stop early, so every method decodes exactly n tokens
    return generate(model, prompts, weights, adapters, eos_id=None, pad_id=pad_id, max_new_tokens=n)


def mix_then_generate(model, prompts, weights, adapters, pad_id: int, n: int) -> list[list[int]]:
    """ELREA.generate(mode="weights"): merge each prompt's adapters, decode, delete the merges."""
    from elrea.ensemble import mix_in_layers

    names = mix_in_layers(model, weights, adapters)
    try:
        return elrea_generate(model, prompts, torch.eye(len(names)), names, pad_id, n)
    finally:
        _drop(model, names)


def base_only_generate(model, prompts, k: int, pad_id: int, n: int) -> list[list[int]]:
    """The bound for any exact ensemble: the backbone alone (LoRA off) decoding every prompt k times."""
    with model.disable_adapter():
        return elrea_generate(model, [p for p in prompts for _ in range(k)], torch.ones(len(prompts) * k, 1),
                              ["base"], pad_id, n)


def mix_only(model, weights, adapters) -> None:
    from elrea.ensemble import mix_in_layers

    _drop(model, mix_in_layers(model, weights, adapters))


def _drop(model, names):
    for name in names:
        model.delete_adapter(name)
    model.set_adapter("base")


def one_hot(b: int, k: int, c: int = 0) -> torch.Tensor:
    w = torch.zeros(b, k)
    w[:, c] = 1.0
    return w


# ----------------------------------------------------------------------------- the run

def run_batch(args, model, adapters, encoded, info, W, B: int) -> dict:
    from elrea.data import collate
    from elrea.features import batch_features, num_lora_params
    from elrea.projection import SparseProjector

    prompts = [e.input_ids for e in encoded[:B]]
    w, k, n, pad, eos = W[:B], len(adapters), args.max_new_tokens, info["pad_id"], info["eos_id"]
    methods = {
        "single_adapter_peft": lambda m: peft_generate(model, prompts, "base", pad, eos, m),
        "single_adapter_elrea_loop": lambda m: elrea_generate(model, prompts, one_hot(B, k), adapters, pad, m),
        "naive_ensemble": lambda m: naive_generate(model, prompts, w, adapters, pad, m),
        "elrea": lambda m: elrea_generate(model, prompts, w, adapters, pad, m),
        "weight_mixing": lambda m: mix_then_generate(model, prompts, w, adapters, pad, m),
        "base_model_all_rows": lambda m: base_only_generate(model, prompts, k, pad, m),
    }
    res, toks = {}, {}
    for name, fn in methods.items():
        C.log(f"batch {B}: {name} ...")
        # warm-up on 2 tokens: kernels and caches ready, without paying a whole decode twice
        sec, times, toks[name] = C.timed(lambda: fn(n), args.repeats, warmup=lambda: fn(2))
        res[name] = {"seconds": sec, "all_seconds": [round(t, 4) for t in times], "tokens": B * n,
                     "tokens_per_s": B * n / sec}
    floor = res["single_adapter_peft"]["tokens_per_s"]
    for r in res.values():
        r["ratio_to_single"] = r["tokens_per_s"] / floor

    C.log(f"batch {B}: mixing cost, routing cost ...")
    res["weight_mixing"]["mixing_s"], _, _ = C.timed(lambda: mix_only(model, w, adapters), args.repeats)
    model.set_adapter("base")   # routing differentiates the base adapter, which must be active
    projector = SparseProjector(num_lora_params(model, "base"), args.dim, args.seed)
    batch = collate(encoded[:B], pad, side="right")
    route_s, _, _ = C.timed(lambda: batch_features(model, batch, projector, adapter="base"), args.repeats)
    res["routing"] = {"seconds": route_s, "ms_per_prompt": 1000 * route_s / B, "dim": args.dim}
    total = res["elrea"]["seconds"] + route_s
    res["elrea_plus_routing"] = {"seconds": total, "tokens_per_s": B * n / total,
                                 "ratio_to_single": B * n / total / floor}
    res["checks"] = checks(toks, n, eos)
    return res


def checks(toks: dict, n: int, eos: int) -> dict:
    first = next((t for t, (a, b) in enumerate(zip(_flat_steps(toks["elrea"]), _flat_steps(toks["naive_ensemble"])))
                  if a != b), None)
    return {
        "elrea_equals_naive": toks["elrea"] == toks["naive_ensemble"],
        "first_mismatch_step": first,
        # PEFT's min_new_tokens masks EOS to force n tokens, elrea's loop (eos_id=None) does not:
        # they agree up to and including elrea's first EOS
        "elrea_single_equals_peft": all(a[:_upto_eos(a, eos)] == b[:_upto_eos(a, eos)] for a, b in
                                        zip(toks["single_adapter_elrea_loop"], toks["single_adapter_peft"])),
        "all_methods_decode_n_tokens": all(len(row) == n for t in toks.values() for row in t),
    }


def _upto_eos(row: list[int], eos: int) -> int:
    return row.index(eos) if eos in row else len(row)


def _flat_steps(rows: list[list[int]]):
    """Tokens step by step across the batch, so the mismatch index is a decoding step."""
    return [tuple(r[t] for r in rows) for t in range(min(len(r) for r in rows))]


def run(args) -> dict:
    model, adapters, encoded, info = build(args)
    W = routing_weights(max(args.batch_sizes), len(adapters), args.seed)
    per_batch = {str(B): run_batch(args, model, adapters, encoded, info, W, B) for B in args.batch_sizes}
    model.set_adapter("base")
    t = time.perf_counter()
    for a in adapters * 4:   # what the naive loop pays 5 times per step
        model.set_adapter(a)
    set_adapter_ms = 1000 * (time.perf_counter() - t) / (4 * len(adapters))
    model.set_adapter("base")
    targets = {f"elrea_ge_{TARGET_ELREA:g}x_single_batch_{B}": r["elrea"]["ratio_to_single"] >= TARGET_ELREA
               for B, r in per_batch.items()}
    targets["elrea_equals_naive"] = all(r["checks"]["elrea_equals_naive"] for r in per_batch.values())
    config = {"adapters": adapters, "lora_rank": args.rank, "lora_targets": "all-linear", "b_std": args.b_std,
              "max_new_tokens": args.max_new_tokens, "batch_sizes": args.batch_sizes, "greedy": True,
              "repeats": args.repeats, "seed": args.seed, "quick": args.quick,
              "weights": [[round(float(x), 4) for x in row] for row in W], **info}
    return {"benchmark": "speed_generate", "config": config, "batches": per_batch, "targets": targets,
            "set_adapter_ms": set_adapter_ms}


def show(report: dict):
    labels = {"single_adapter_peft": "single adapter (PEFT generate)",
              "single_adapter_elrea_loop": "single adapter (elrea loop)",
              "naive_ensemble": "naive ensemble (forward per adapter)",
              "elrea": "elrea ensemble (one grouped-LoRA forward)",
              "weight_mixing": "in-layer weight mixing (incl. mixing)",
              "elrea_plus_routing": "elrea ensemble + gradient routing",
              "base_model_all_rows": "bound: backbone alone, every (prompt, adapter) row"}
    bs = list(report["batches"])
    rows = [[labels[m]] + [x for B in bs for x in (report["batches"][B][m]["tokens_per_s"],
                                                    report["batches"][B][m]["ratio_to_single"])]
            for m in labels]
    rows.append(["routing cost, ms per prompt"] + [x for B in bs for x in
                                                    (report["batches"][B]["routing"]["ms_per_prompt"], None)])
    c = report["config"]
    notes = [f"batch {B}: elrea tokens == naive tokens: {ch['elrea_equals_naive']} "
             f"(first mismatch at step {ch['first_mismatch_step']}); elrea one-hot == PEFT generate: "
             f"{ch['elrea_single_equals_peft']} (up to its first EOS); mixing alone {report['batches'][B]['weight_mixing']['mixing_s']:.2f} s"
             for B in bs for ch in [report["batches"][B]["checks"]]]
    notes.append(f"set_adapter: {report['set_adapter_ms']:.2f} ms per call (the naive loop calls it "
                 f"{len(c['adapters'])}x per step); target: elrea >= {TARGET_ELREA:g}x single adapter")
    notes.append(C.machine_note(report))
    C.print_table(f"Greedy decoding, {c['max_new_tokens']} new tokens, {c['model']}, {len(c['adapters'])} adapters",
                  ["method"] + [h for B in bs for h in (f"tok/s b={B}", f"x single b={B}")], rows, notes)


def main(argv=None) -> dict:
    return C.run_benchmark("speed_generate", parse_args, run, show, argv)


if __name__ == "__main__":
    main()
