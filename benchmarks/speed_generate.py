"""python benchmarks/speed_generate.py  -- ensembled greedy decoding: the engine vs elrea before, PEFT, transformers.

Measures tokens/s of greedy decoding of exactly N new tokens (--max-new-tokens, default 128;
the backbone's EOS id is unset, so no method stops early) at each batch size of
--batch-sizes (default 1 8 32 64), on smollm2-135m-instruct with 5 LoRA adapters ("base" + 4
experts, rank 8, all linear layers, random B so every adapter gives different logits; nothing
is trained). Side by side, in one run:

- anchor: transformers' own `generate` on a copy of the backbone with adapter "base" merged
  into its weights (`merge_and_unload`), static KV cache, the forward compiled with
  `--compile-anchor` (default: on CUDA yes, mode reduce-overhead; on a CPU no, where compiling
  takes minutes: `--compile-anchor` alone compiles with mode default): what a user serving one
  adapter would compare with;
- PEFT `generate` with adapter "base" active (one adapter, not merged);
- elrea before (eager): benchmarks/_eager.py, the decoder before the engine (dynamic cache,
  grouped LoRA, a host sync per step), the 5 adapters with the routing weights;
- the engine (elrea.engine.Ensemble, compile="auto": CUDA graphs on a GPU, eager on a CPU)
  with one adapter (one-hot weights), and with the 5 adapters (the routing weights);
- `--engine-compile MODE`: the engine with 5 adapters and compile=MODE (e.g. default), its
  first call (the compile) timed apart;
- kept from before, run at batch sizes <= --extras-max-batch (default 8; they cost about one
  more ensemble each): the naive ensemble (one forward and KV cache per adapter per step,
  `set_adapter` before each); in-layer mixing (the engine with mix=True: one row per prompt
  whose LoRA is sum_c w_c B_c A_c); the bound for any exact ensemble, the engine's own loop on
  the same slots with every LoRA layer reduced to its base layer (the backbone alone on every
  (prompt, adapter) row);
- routing cost: `elrea.features.batch_features` on the base adapter, ms per prompt.

Routing weights are seeded Dirichlet(1) draws, all 5 adapters non-zero. Timings: the median
of --repeats runs after one untimed warm-up (2 tokens; N tokens for compiled methods, whose
compile happens there). Checks (float32): the engine's tokens == elrea before's, token for
token; the engine with one-hot weights == PEFT generate. Ratios: engine / elrea before at
each batch (target >= 1.0), engine with 5 adapters / the anchor, engine one adapter / PEFT.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_generate.py [--engine-compile default]
    .venv/bin/python benchmarks/speed_generate.py --quick      # tiny model, seconds (for tests)

Options: --max-new-tokens --batch-sizes --experts --rank --dim --repeats --threads --device
--extras-max-batch --compile-anchor [MODE|off] --engine-compile MODE --out (default
benchmarks/results/speed_generate.json; speed_generate_quick.json with --quick). Also the
source of the decoding methods that benchmarks/gpu.py runs on a GPU (`decode_each`).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common, when imported from elsewhere

import _common as C  # noqa: E402
import _eager  # noqa: E402
import torch  # noqa: E402

TARGET_ENGINE_OVER_BEFORE = 1.0

# every method, in the order they are shown (decode_each says in which order they run)
LABELS = {
    "anchor_merged_static": "anchor: transformers generate, 1 adapter merged, static cache",
    "single_adapter_peft": "PEFT generate, 1 adapter",
    "naive_ensemble": "naive ensemble (forward + cache per adapter)",
    "elrea_before": "elrea before (eager loop, grouped LoRA), 5 adapters",
    "engine_single": "engine, 1 adapter (one-hot weights)",
    "engine": "engine, 5 adapters",
    "engine_compiled": "engine, 5 adapters, compiled",
    "weight_mixing": "engine, in-layer mixing (mix=True)",
    "base_model_all_rows": "bound: engine loop, backbone alone, every row",
}
EXTRAS = ("naive_ensemble", "weight_mixing", "base_model_all_rows")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(ap, "speed_generate")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--experts", type=int, default=4, help="experts besides the base adapter")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank of every adapter")
    ap.add_argument("--b-std", type=float, default=0.02, help="std of the random LoRA B matrices")
    ap.add_argument("--dim", type=int, default=8192, help="projection dimension for the routing cost")
    ap.add_argument("--extras-max-batch", type=int, default=8,
                    help="largest batch for the naive ensemble, in-layer mixing and the bound")
    ap.add_argument("--compile-anchor", nargs="?", const="on", default=None,
                    help="torch.compile the anchor's forward: alone = mode reduce-overhead on CUDA, default "
                         "on a CPU; or a mode, 'dynamo' (traced only), 'off' (default: on on CUDA, off on a CPU)")
    ap.add_argument("--engine-compile", default=None, help="add a row: the engine with compile=MODE (default, "
                                                           "reduce-overhead, max-autotune, dynamo)")
    args = ap.parse_args(argv)
    if args.quick:
        given = set(a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]))
        for flag, attr, value in [("--max-new-tokens", "max_new_tokens", 8), ("--dim", "dim", 256),
                                  ("--repeats", "repeats", 1), ("--batch-sizes", "batch_sizes", [1, 8]),
                                  ("--extras-max-batch", "extras_max_batch", 8),
                                  ("--engine-compile", "engine_compile", "dynamo"),
                                  ("--compile-anchor", "compile_anchor", "dynamo")]:
            if flag not in given:
                setattr(args, attr, value)
    args.compile_anchor = anchor_compile_mode(args.compile_anchor, args.device)
    return args


def anchor_compile_mode(choice: str | None, device: str) -> str | None:
    """The anchor's torch.compile mode, or None for eager: compiled on CUDA unless told 'off'."""
    cuda = torch.device(device).type == "cuda"
    if choice is None:
        return "reduce-overhead" if cuda else None
    if choice == "off":
        return None
    if choice == "on":
        return "reduce-overhead" if cuda else "default"
    return choice


# ----------------------------------------------------------------------------- set-up

@dataclass
class Models:
    """What the methods decode with: the PEFT model holding every adapter ("base" active), and
    the anchor, a plain transformers copy of the backbone with "base" merged into it."""

    peft: object
    adapters: list[str]
    pad_id: int
    anchor: object
    anchor_compile: str | None = None      # torch.compile mode of the anchor's forward; None: eager


def prepare(model, adapters: list[str], pad_id: int, anchor_compile: str | None, with_anchor: bool = True) -> Models:
    """Unset the EOS id (every method decodes exactly N tokens), then copy and merge the anchor.
    Call before any engine patches the model's LoRA layers."""
    model.get_base_model().generation_config.eos_token_id = None
    model.set_adapter(adapters[0])
    anchor = copy.deepcopy(model).merge_and_unload(adapter_names=[adapters[0]]).eval() if with_anchor else None
    return Models(model, list(adapters), pad_id, anchor, anchor_compile)


def build(args):
    """(Models, tokenized prompts, info): smollm2 (or the tiny model) with adapters base, expert_1.."""
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
    model.eval()
    models = prepare(model, adapters, tok.pad_token_id, args.compile_anchor)
    n = max(args.batch_sizes)
    texts, origin = C.instructions(n, "test", args.seed, args.quick)
    fmt = PromptFormatter(tok)
    encoded = [fmt.encode_instruction([{"role": "user", "content": t}]) for t in texts]
    lengths = [len(e.input_ids) for e in encoded]
    info = {"model": name, "data": origin, "mean_prompt_tokens": round(sum(lengths) / n, 1),
            "max_prompt_tokens": max(lengths), "pad_id": tok.pad_token_id, "eos_id_ignored": tok.eos_token_id}
    return models, encoded, info


def routing_weights(n: int, k: int, seed: int) -> torch.Tensor:
    """Dirichlet(1) rows (normalised exponentials), seeded; strictly positive."""
    gen = torch.Generator().manual_seed(seed)
    e = -torch.log(torch.rand(n, k, generator=gen).clamp(min=1e-6))
    return e / e.sum(1, keepdim=True)


def one_hot(b: int, k: int, c: int = 0) -> torch.Tensor:
    w = torch.zeros(b, k)
    w[:, c] = 1.0
    return w


# ----------------------------------------------------------------------------- the methods

@torch.no_grad()
def hf_generate(model, prompts, pad_id: int, n: int, compile_mode: str | None = None,
                static: bool = False) -> list[list[int]]:
    """transformers' greedy `generate` (EOS unset by `prepare`: n tokens). static: a static KV
    cache; compile_mode: its forward compiled (transformers compiles by itself only on CUDA and
    the like, so it is told to on a CPU too); 'dynamo' traces without code generation."""
    from transformers import CompileConfig, GenerationConfig

    from elrea.models import model_device

    cc = None
    if compile_mode is not None:
        cc = CompileConfig(backend="eager", mode=None) if compile_mode == "dynamo" else CompileConfig(mode=compile_mode)
        cc._compile_all_devices = True
    gc = GenerationConfig(max_new_tokens=n, do_sample=False, pad_token_id=pad_id,
                          cache_implementation="static" if static else None,
                          disable_compile=compile_mode is None, compile_config=cc)
    ids, mask = C.left_pad(prompts, pad_id, model_device(model))
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gc)
    return out[:, ids.shape[1]:].tolist()


def peft_generate(model, prompts, adapter: str, pad_id: int, n: int) -> list[list[int]]:
    """PEFT's generate with one adapter active (dynamic cache, as PEFT users run it)."""
    model.set_adapter(adapter)
    return hf_generate(model, prompts, pad_id, n)


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
            caches[c] = _eager.cache_kwargs(out)
            # same order and precision as the engine's sum: 0 + w_0 l_0 + w_1 l_1 + ...
            part = out.logits[:, -1, :].float() * weights[:, c][:, None]
            logits = (torch.zeros_like(part) if logits is None else logits) + part
        nxt = logits.argmax(-1)
        tokens.append(nxt)
        step_ids = nxt[:, None]
        mask = torch.cat([mask, torch.ones((mask.shape[0], 1), dtype=mask.dtype, device=device)], dim=1)
        pos = pos[:, -1:] + 1
    model.set_adapter(adapters[0])
    return torch.stack(tokens, 1).tolist()


@contextlib.contextmanager
def backbone_only(model):
    """While active, every LoRA layer computes its base layer alone, whatever forward it has (the
    engine's stacked LoRA included): the engine's loop at the backbone's cost."""
    from peft.tuners.lora import LoraLayer

    mods = [m for m in model.modules() if isinstance(m, LoraLayer)]
    saved = [m.__dict__.get("forward") for m in mods]
    for m in mods:
        m.forward = m.base_layer.forward
    try:
        yield
    finally:
        for m, f in zip(mods, saved):
            if f is None:
                del m.forward
            else:
                m.forward = f


# ----------------------------------------------------------------------------- one batch, every method

def decode_each(models: Models, prompts, w: torch.Tensor, n: int, wanted, measure,
                engine_compile: str | None = None, engine_mode: str = "auto"):
    """Every method of `wanted` (names of LABELS) on one batch, yielding (method, measurement,
    tokens) as each finishes. measure(fn, compiled) -> (measurement dict, tokens), fn(m) decoding
    m tokens. The engine rows run with compile=engine_mode (their measurement gets the engine's
    pool and compiles under "engine"); engine_compiled (when engine_compile is given) with
    compile=engine_compile.

    The engines run first (what a GPU session must not miss if a time cap stops it), each built,
    used and removed (`_restack`) before the next method: _eager.generate deletes each LoRA
    layer's patched forward when it ends, which would also remove a live engine's.
    """
    from elrea.engine import Ensemble

    m, k, B, pad = models.peft, len(models.adapters), len(prompts), models.pad_id
    base = models.adapters[0]

    def run(name, fn, compiled=False, eng=None):
        C.log(f"batch {B}: {name} ...")
        result, tokens = measure(fn, compiled)
        if eng is not None:
            result["engine"] = _facts(eng)
        return name, result, tokens

    def bound(eng, t):
        with backbone_only(m):   # the engine-5's slots: every prompt once per adapter
            return eng.generate([p for p in prompts for _ in range(k)], one_hot(B * k, k), max_new_tokens=t)

    m.set_adapter(base)
    eng = Ensemble(m, models.adapters, pad_id=pad, compile=engine_mode)
    engine_rows = {"engine": lambda t: eng.generate(prompts, w, max_new_tokens=t),
                   "engine_single": lambda t: eng.generate(prompts, one_hot(B, k), max_new_tokens=t),
                   "weight_mixing": lambda t: eng.generate(prompts, w, max_new_tokens=t, mix=True),
                   "base_model_all_rows": lambda t: bound(eng, t)}
    try:
        for name, fn in engine_rows.items():
            if name in wanted:
                yield run(name, fn, eng.compile != "off", eng)
    finally:
        eng._restack()
    if engine_compile and "engine_compiled" in wanted:
        eng_c = Ensemble(m, models.adapters, pad_id=pad, compile=engine_compile)
        try:
            yield run("engine_compiled", lambda t: eng_c.generate(prompts, w, max_new_tokens=t), True, eng_c)
        finally:
            eng_c._restack()
    plain_rows = {
        "anchor_merged_static": lambda t: hf_generate(models.anchor, prompts, pad, t, models.anchor_compile, True),
        "elrea_before": lambda t: _eager.generate(m, prompts, w, models.adapters, pad_id=pad, max_new_tokens=t),
        "single_adapter_peft": lambda t: peft_generate(m, prompts, base, pad, t),
        "naive_ensemble": lambda t: naive_generate(m, prompts, w, models.adapters, pad, t)}
    for name, fn in plain_rows.items():
        if name in wanted:
            yield run(name, fn, name == "anchor_merged_static" and models.anchor_compile is not None)
    m.set_adapter(base)


def _facts(eng) -> dict:
    """The pool the engine decoded on (slots are rounded up to a power of two) and its compiles."""
    pool = eng._pool
    return {"compile": eng.compile, "stacked_lora": eng.stack is not None,
            "slots": pool.n if pool else None, "columns": pool.length if pool else None,
            "compiled_buckets": [list(b) for b in eng.stats.compiled], "fallback": eng.stats.fallback}


def checks(toks: dict, n: int) -> dict:
    """Tokens equal between pairs of methods (and the share of tokens before they first differ)."""
    pairs = {"engine_equals_before": ("engine", "elrea_before"),
             "engine_single_equals_peft": ("engine_single", "single_adapter_peft"),
             "engine_equals_naive": ("engine", "naive_ensemble"),
             "engine_compiled_equals_engine": ("engine_compiled", "engine"),
             # informational: merged weights round differently from W x + B A x
             "anchor_equals_peft": ("anchor_merged_static", "single_adapter_peft")}
    out = {}
    for key, (a, b) in pairs.items():
        if a in toks and b in toks:
            out[key] = toks[a] == toks[b]
            out[key.replace("_equals_", "_common_prefix_")] = common_prefix(toks[a], toks[b])
    if "engine" in toks and "elrea_before" in toks:
        out["first_mismatch_step"] = next((t for t, (a, b) in enumerate(zip(_flat_steps(toks["engine"]),
                                                                              _flat_steps(toks["elrea_before"])))
                                           if a != b), None)
    out["all_methods_decode_n_tokens"] = all(len(row) == n for t in toks.values() for row in t)
    return out


def common_prefix(a: list, b: list) -> float:
    """Mean share of each sequence's tokens before `a` and `b` first differ (1.0: identical)."""
    shares = []
    for x, y in zip(a, b):
        n = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        shares.append(n / max(len(x), len(y), 1))
    return sum(shares) / max(len(shares), 1)


def _flat_steps(rows: list[list[int]]):
    """Tokens step by step across the batch, so the mismatch index is a decoding step."""
    return [tuple(r[t] for r in rows) for t in range(min(len(r) for r in rows))]


def ratios(res: dict) -> dict:
    """The issue's ratios of tokens/s (those whose two methods ran)."""
    pairs = {"engine_over_before": ("engine", "elrea_before"),
             "engine_over_anchor": ("engine", "anchor_merged_static"),
             "engine_single_over_peft": ("engine_single", "single_adapter_peft"),
             "engine_single_over_anchor": ("engine_single", "anchor_merged_static"),
             "engine_over_peft": ("engine", "single_adapter_peft"),
             "engine_compiled_over_engine": ("engine_compiled", "engine"),
             "engine_compiled_over_before": ("engine_compiled", "elrea_before"),
             "engine_over_bound": ("engine", "base_model_all_rows")}
    return {key: res[a]["tokens_per_s"] / res[b]["tokens_per_s"] for key, (a, b) in pairs.items()
            if a in res and b in res}


# ----------------------------------------------------------------------------- the run

def run_batch(args, models: Models, encoded, info, W, B: int) -> dict:
    from elrea.data import collate
    from elrea.features import batch_features, num_lora_params
    from elrea.projection import SparseProjector

    prompts, w, n = [e.input_ids for e in encoded[:B]], W[:B], args.max_new_tokens
    wanted = [m for m in LABELS if (m not in EXTRAS or B <= args.extras_max_batch)
              and (m != "engine_compiled" or args.engine_compile)]

    def measure(fn, compiled):
        first, cpu = {}, []

        def warmup():   # compiled: the same shapes as the timed runs, so the compile happens here
            t = time.perf_counter()
            fn(n if compiled else 2)
            first["s"] = time.perf_counter() - t

        def once():     # also the process's CPU time, which other work on the machine inflates less
            c = time.process_time()
            out = fn(n)
            cpu.append(time.process_time() - c)
            return out

        load = os.getloadavg()[0]
        sec, times, toks = C.timed(once, args.repeats, warmup=warmup)
        return {"seconds": sec, "all_seconds": [round(t, 4) for t in times], "warmup_s": round(first["s"], 3),
                "cpu_seconds": statistics.median(cpu), "loadavg_1min": [load, os.getloadavg()[0]],
                "tokens": B * n, "tokens_per_s": B * n / sec}, toks

    res, toks = {}, {}
    for name, result, tokens in decode_each(models, prompts, w, n, wanted, measure, args.engine_compile):
        res[name], toks[name] = result, tokens
    for r in res.values():
        r["ratio_to_single"] = r["tokens_per_s"] / res["single_adapter_peft"]["tokens_per_s"]
        r["ratio_to_anchor"] = r["tokens_per_s"] / res["anchor_merged_static"]["tokens_per_s"]

    C.log(f"batch {B}: routing cost ...")
    model = models.peft
    model.set_adapter("base")   # routing differentiates the base adapter, which must be active
    projector = SparseProjector(num_lora_params(model, "base"), args.dim, args.seed)
    batch = collate(encoded[:B], info["pad_id"], side="right")
    route_s, _, _ = C.timed(lambda: batch_features(model, batch, projector, adapter="base"), args.repeats)
    res["routing"] = {"seconds": route_s, "ms_per_prompt": 1000 * route_s / B, "dim": args.dim}
    total = res["engine"]["seconds"] + route_s
    res["engine_plus_routing"] = {"seconds": total, "tokens_per_s": B * n / total,
                                  "ratio_to_single": B * n / total / res["single_adapter_peft"]["tokens_per_s"],
                                  "ratio_to_anchor": B * n / total / res["anchor_merged_static"]["tokens_per_s"]}
    res["skipped"] = {m: f"batch {B} > --extras-max-batch {args.extras_max_batch}" for m in EXTRAS if m not in wanted}
    res["ratios"] = ratios(res)
    if "engine" in res and "elrea_before" in res:   # the same ratio by CPU time, less sensitive to load
        res["ratios"]["engine_over_before_cpu_time"] = res["elrea_before"]["cpu_seconds"] / res["engine"]["cpu_seconds"]
    res["checks"] = checks(toks, n)
    return res


def run(args) -> dict:
    models, encoded, info = build(args)
    W = routing_weights(max(args.batch_sizes), len(models.adapters), args.seed)
    per_batch = {str(B): run_batch(args, models, encoded, info, W, B) for B in args.batch_sizes}
    model = models.peft
    t = time.perf_counter()
    for a in models.adapters * 4:   # what the naive loop pays 5 times per step
        model.set_adapter(a)
    set_adapter_ms = 1000 * (time.perf_counter() - t) / (4 * len(models.adapters))
    model.set_adapter("base")
    targets = {f"engine_ge_{TARGET_ENGINE_OVER_BEFORE:g}x_before_batch_{B}":
               r["ratios"]["engine_over_before"] >= TARGET_ENGINE_OVER_BEFORE for B, r in per_batch.items()}
    for key in ("engine_equals_before", "engine_single_equals_peft"):
        targets[key] = all(r["checks"][key] for r in per_batch.values())
    config = {"adapters": models.adapters, "lora_rank": args.rank, "lora_targets": "all-linear",
              "b_std": args.b_std, "max_new_tokens": args.max_new_tokens, "batch_sizes": args.batch_sizes,
              "greedy": True, "eos": "ignored (generation_config.eos_token_id unset)", "repeats": args.repeats,
              "seed": args.seed, "quick": args.quick, "extras_max_batch": args.extras_max_batch,
              "anchor_compile": args.compile_anchor, "engine_compile": args.engine_compile,
              "weights": [[round(float(x), 4) for x in row] for row in W], **info}
    return {"benchmark": "speed_generate", "config": config, "batches": per_batch, "targets": targets,
            "set_adapter_ms": set_adapter_ms}


def show(report: dict):
    c = report["config"]
    labels = dict(LABELS, engine_plus_routing="engine, 5 adapters + gradient routing")
    labels["anchor_merged_static"] += f", compiled ({c['anchor_compile']})" if c["anchor_compile"] else ", eager"
    if c["engine_compile"]:
        labels["engine_compiled"] += f" ({c['engine_compile']})"
    bs = list(report["batches"])
    batches = report["batches"]

    def cell(B, m, key):
        return batches[B][m][key] if m in batches[B] else None

    rows = [[label] + [x for B in bs for x in (cell(B, m, "tokens_per_s"), cell(B, m, "ratio_to_anchor"))]
            for m, label in labels.items() if any(m in batches[B] for B in bs)]
    rows.append(["routing cost, ms per prompt"] + [x for B in bs for x in (batches[B]["routing"]["ms_per_prompt"],
                                                                             None)])
    C.print_table(f"Greedy decoding, {c['max_new_tokens']} new tokens (EOS ignored), {c['model']}, "
                  f"{len(c['adapters'])} adapters, tokens/s", ["method"] + [h for B in bs for h in
                                                                  (f"tok/s b={B}", f"x anchor b={B}")], rows)
    names = {"engine_over_before": f"engine 5 / elrea before (target >= {TARGET_ENGINE_OVER_BEFORE:g})",
             "engine_over_before_cpu_time": "engine 5 / elrea before, by process CPU time",
             "engine_over_anchor": "engine 5 / anchor", "engine_single_over_peft": "engine 1 / PEFT",
             "engine_single_over_anchor": "engine 1 / anchor", "engine_over_peft": "engine 5 / PEFT",
             "engine_compiled_over_engine": "engine 5 compiled / engine 5",
             "engine_compiled_over_before": "engine 5 compiled / elrea before",
             "engine_over_bound": "engine 5 / bound (backbone alone)"}
    rows = [[label] + [batches[B]["ratios"].get(key) for B in bs] for key, label in names.items()
            if any(key in batches[B]["ratios"] for B in bs)]
    notes = []
    for B in bs:
        ch, pool = batches[B]["checks"], batches[B]["engine"]["engine"]
        notes.append(f"batch {B}: engine tokens == elrea before: {C.fmt(ch['engine_equals_before'])} (first mismatch "
                     f"at step {ch['first_mismatch_step']}); engine one-hot == PEFT generate: "
                     f"{C.fmt(ch['engine_single_equals_peft'])}; anchor == PEFT: {C.fmt(ch.get('anchor_equals_peft'))}"
                     + (f"; compiled == eager engine: {C.fmt(ch['engine_compiled_equals_engine'])}"
                        if "engine_compiled_equals_engine" in ch else "")
                     + f"; engine pool {pool['slots']} slots x {pool['columns']} columns")
        if "engine_compiled" in batches[B]:
            r = batches[B]["engine_compiled"]
            notes.append(f"batch {B}: compiled engine's first call (compile + {c['max_new_tokens']} tokens): "
                         f"{r['warmup_s']:.1f} s; fallback: {r['engine']['fallback']}")
        if batches[B]["skipped"]:
            why = next(iter(batches[B]["skipped"].values()))
            notes.append(f"batch {B}: not run: {', '.join(batches[B]['skipped'])} ({why})")
    notes.append(f"set_adapter: {report['set_adapter_ms']:.2f} ms per call (the naive loop calls it "
                 f"{len(c['adapters'])}x per step)")
    notes.append(C.machine_note(report))
    C.print_table("Ratios of tokens/s", ["ratio"] + [f"b={B}" for B in bs], rows, notes)


def main(argv=None) -> dict:
    return C.run_benchmark("speed_generate", parse_args, run, show, argv)


if __name__ == "__main__":
    main()
