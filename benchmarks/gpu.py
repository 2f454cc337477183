"""python benchmarks/gpu.py  -- elrea on a GPU: gradient features, the decoding engine, routing, memory.

Runs wherever CUDA is available and refuses elsewhere (`--smoke` runs the same code on a tiny
model on the CPU, for tests; its timings mean nothing). No weights are downloaded: each
architecture is built from its config with random weights (speed and memory do not depend on
the weights), a bf16 backbone with float32 LoRA rank 8 on every linear layer, B random so
every adapter's gradients and logits differ. Inputs are random token sequences shaped like
instruction data. Side by side, in one run, per architecture:

features (`--parts features`; batch 16, instruction-only loss on the last 60% of each sequence):
- elrea: `Featurizer` (one backward per batch, exact per-example gradients, sparse JL to 8192);
- the LESS way: one backward per example (autograd), the flattened gradient, then a dense
  Rademacher projection to 8192 applied blockwise (chunks of P generated on the GPU);
- a plain training forward+backward on the same batches (the floor);
- agreement: elrea's per-example gradients through the same dense projection vs the LESS
  features (cosine, float64), and peak GPU memory of each.
profile (`--parts profile`; batch sizes `--profile-batches`, default 16 and 64): where the
features' time goes, phase by phase with CUDA events on the same batches (forward with hooks,
backward to the LoRA outputs, per-example outer products, Adam preconditioning, sparse
projection, normalise; apart: the projection as nnz scatters, bf16 -> float32 copies) next to
a training step's forward and backward: the table of `benchmarks/speed_features.py --profile`.
decoding (`--parts decoding`; base + 4 experts, 128 new tokens, EOS unset, greedy, batch 1, 8,
32, 64; the methods of benchmarks/speed_generate.py, `--methods` to choose):
- the anchor: transformers `generate` with adapter "base" merged into the backbone, static
  cache, the forward compiled by transformers (mode reduce-overhead: CUDA graphs);
- PEFT `generate` with one adapter; elrea before (benchmarks/_eager.py, the eager decoder);
- the engine (elrea.engine.Ensemble, compile="auto": CUDA graphs) with one adapter (one-hot
  weights) and with the 5 adapters; the naive ensemble (one forward per adapter per step);
- tokens/s, peak memory, the compile (first call) time, tokens agreement (bf16 rounds
  differently per kernel: the share of tokens before two methods differ); ratios engine /
  elrea before, engine / anchor;
- gradient routing cost per prompt against one decoded token at batch 1.
end to end (`--e2e-model DIR --e2e-data DIR`): `elrea fit` + `elrea eval` of a real model
(e.g. SmolLM2-135M-Instruct converted by elrea) on train.jsonl / test.jsonl on the GPU.

Each part has its own time cap (`--cap decoding=300 features=120`): a part that reaches it
stops there, keeps what it measured and lists what it did not run. The JSON is written after
every part, so a run killed from outside keeps the parts done. benchmarks/gpu_all.sh is the
one prepared script for a GPU session.

Targets on an H100-class GPU (a benchmark, not a test): features >= 20x the LESS way and <= 1.3x
a training forward+backward; the engine with 5 adapters at batch 1 >= 150 tokens/s and >= 0.8x
the compiled single-adapter anchor, at batch 32 >= 1000 tokens/s; ensemble of 5 >= 0.8x PEFT's
single adapter at batch 1; routing <= 5 decoded tokens. Writes
benchmarks/results/gpu-<device>.json (device, torch, CUDA versions).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))   # _common, when imported from elsewhere

import _common as C  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TARGETS = {"features_speedup_vs_less": 20.0, "features_over_fwd_bwd": 1.3, "ensemble_over_single_b1": 0.8,
           "routing_over_token": 5.0, "engine_b1_tokens_per_s": 150.0, "engine_over_anchor_b1": 0.8,
           "engine_b32_tokens_per_s": 1000.0}
PARTS = ("features", "profile", "decoding", "e2e")
# the decoding methods run on a GPU (names of speed_generate.LABELS); the rest are CPU-only rows
GPU_METHODS = ("anchor_merged_static", "single_adapter_peft", "naive_ensemble", "elrea_before", "engine_single",
               "engine")

# Public configs of the architectures (no weights): shapes are what speed and memory depend on.
ARCHS = {
    "llama-3.2-1b": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                                   max_position_embeddings=131072, rope_theta=500000.0, tie_word_embeddings=True)),
    "qwen2.5-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   max_position_embeddings=32768, rope_theta=1000000.0, tie_word_embeddings=True)),
    "tiny": ("llama", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                           tie_word_embeddings=True)),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", nargs="+", default=["llama-3.2-1b", "qwen2.5-1.5b"], choices=list(ARCHS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dim", type=int, default=8192)
    ap.add_argument("--feature-batch", type=int, default=16)
    ap.add_argument("--profile-batches", type=int, nargs="+", default=[16, 64],
                    help="batch sizes of the phase profile (--parts profile)")
    ap.add_argument("--examples", type=int, default=64, help="examples for elrea and plain fwd+bwd")
    ap.add_argument("--less-examples", type=int, default=16, help="examples for the LESS way and the agreement")
    ap.add_argument("--min-len", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=192)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--methods", nargs="+", default=list(GPU_METHODS), choices=GPU_METHODS,
                    help="decoding methods (see benchmarks/speed_generate.py)")
    ap.add_argument("--engine-compile", default="auto", help="the engine's compile setting (auto: CUDA graphs)")
    ap.add_argument("--anchor-compile", default="reduce-overhead",
                    help="torch.compile mode of the anchor's forward, or off")
    ap.add_argument("--parts", nargs="+", default=["features", "profile", "decoding", "e2e"], choices=PARTS,
                    help="what to run (e2e only with --e2e-model and --e2e-data)")
    ap.add_argument("--cap", nargs="*", default=[], metavar="PART=SECONDS",
                    help="time cap per part, e.g. decoding=300 features=120 (default: none)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--e2e-model", help="a model directory for the end-to-end fit + eval")
    ap.add_argument("--e2e-data", help="a directory with train.jsonl and test.jsonl for it")
    ap.add_argument("--e2e-overrides", nargs="*", default=[], help="config overrides for the e2e fit")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, few examples (for tests)")
    ap.add_argument("--out", help="JSON report (default benchmarks/results/gpu-<device>.json)")
    args = ap.parse_args(argv)
    args.caps = parse_caps(args.cap, ap)
    if args.smoke:
        args.archs, args.device, args.dim, args.examples, args.less_examples = ["tiny"], "cpu", 256, 8, 4
        args.feature_batch, args.new_tokens, args.repeats, args.profile_batches = 4, 4, 1, [4]
        args.min_len, args.max_len = 8, 24
        # the compiled paths traced by dynamo without code generation (seconds on a CPU)
        args.engine_compile, args.anchor_compile = "dynamo", "dynamo"
        if "--batch-sizes" not in (argv if argv is not None else sys.argv[1:]):
            args.batch_sizes = [1, 2]
    return args


def parse_caps(items: list[str], ap) -> dict[str, float]:
    """{part: seconds} from PART=SECONDS items."""
    caps = {}
    for item in items:
        part, _, sec = item.partition("=")
        if part not in PARTS or not sec.replace(".", "", 1).isdigit():
            ap.error(f"--cap {item!r}: expected PART=SECONDS with PART one of {', '.join(PARTS)}")
        caps[part] = float(sec)
    return caps


class TimeCap(BaseException):
    """A part reached its --cap. A BaseException, as KeyboardInterrupt is: code that handles
    errors (the engine's eager fallback after a failed compile) must not swallow it."""


@contextlib.contextmanager
def time_cap(seconds: float | None, part: str):
    """Raise TimeCap in the main thread when the block runs longer than `seconds` (SIGALRM; the
    block is interrupted at its next Python instruction). Yields a dict whose "fired" says
    whether the cap was reached: torch.compile re-raises what interrupts it as its own error."""
    state = {"fired": False}
    if not seconds:
        yield state
        return

    def fire(signum, frame):
        state["fired"] = True
        raise TimeCap(f"{part}: time cap of {seconds:g} s reached")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield state
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


# ----------------------------------------------------------------------------- set-up

def build_model(arch: str, args):
    """A PEFT model on the device: random-weight backbone of `arch` in args.dtype, adapters
    base + expert_1..expert_k (float32 LoRA, random B), "base" active, eval mode."""
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    from elrea.config import LoraConfig
    from elrea.models import peft_lora_config

    kind, shape = ARCHS[arch]
    cfg = AutoConfig.for_model(kind, **shape)
    torch.manual_seed(args.seed)
    with torch.device(args.device):   # initialise on the GPU: seconds, not minutes
        backbone = AutoModelForCausalLM.from_config(cfg, dtype=getattr(torch, args.dtype))
    backbone.eval().requires_grad_(False)
    n_backbone = sum(p.numel() for p in backbone.parameters())
    adapters = ["base"] + [f"expert_{c}" for c in range(1, args.experts + 1)]
    model = get_peft_model(backbone, peft_lora_config(LoraConfig(rank=args.rank)), adapter_name="base")
    for a in adapters[1:]:
        model.add_adapter(a, peft_lora_config(LoraConfig(rank=args.rank)))
    C.randomize_lora_b(model, 0.02, args.seed)
    model.set_adapter("base")
    return model.eval(), adapters, {"arch": arch, "config": shape, "backbone_params": n_backbone}


def examples(n: int, args, vocab: int, seed: int) -> list:
    """Random token sequences (lengths in [min_len, max_len]); loss on the last 60%, as an
    instruction-only loss covers the user turn and the generation prompt."""
    from elrea.data import Encoded

    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(args.min_len, args.max_len + 1, (1,), generator=gen))
        ids = torch.randint(10, vocab, (T,), generator=gen).tolist()
        ctx = int(0.4 * T)
        out.append(Encoded(ids, [-100] * ctx + ids[ctx:]))
    return out


class DenseGpuProjector:
    """The LESS/TRAK dense Rademacher projection, P_ji = +-1/sqrt(d), generated blockwise on the
    device from the seed (never whole). Not elrea's RademacherProjector, which generates on the
    CPU so that P is the same on every device: too slow for a GPU reference."""

    def __init__(self, num_params: int, dim: int, seed: int, device, rows: int = 8192):
        self.num_params, self.dim, self.seed, self.device, self.rows = num_params, dim, seed, device, rows

    def project(self, g: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(g.shape[0], self.dim, device=self.device)
        gen = torch.Generator(device=self.device)
        for k, s in enumerate(range(0, g.shape[1], self.rows)):
            gen.manual_seed(self.seed * 100003 + k)
            block = torch.randint(0, 2, (min(self.rows, g.shape[1] - s), self.dim), generator=gen,
                                  device=self.device, dtype=torch.int8)
            out.addmm_(g[:, s:s + self.rows].float(), (block.float() * 2 - 1) / self.dim ** 0.5)
        return out


# ----------------------------------------------------------------------------- measuring

def measure(fn, args, warmup=None):
    """(median seconds, peak GPU memory MiB during one run, result), GPU work synchronised."""
    dev = torch.device(args.device)

    def run():
        out = fn()
        C.sync(dev)
        return out

    sec, _, out = C.timed(run, args.repeats, warmup)
    peak = None
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        run()
        peak = (torch.cuda.max_memory_allocated(dev) - base) / 2 ** 20
    return sec, peak, out


def features_phase(model, args, vocab: int) -> dict:
    from elrea.data import collate
    from elrea.features import Featurizer, num_lora_params, per_example_gradients
    from elrea.projection import SparseProjector
    from speed_features import plain_fwd_bwd, reference_gradients

    ex = examples(args.examples, args, vocab, args.seed)
    less_ex = ex[:args.less_examples]
    p = num_lora_params(model, "base")
    feat = Featurizer(model, SparseProjector(p, args.dim, args.seed), adapter="base", pad_id=0,
                      batch_size=args.feature_batch)
    params = [q for n, q in model.named_parameters() if ".base." in n and ".lora_" in n]
    for q in params:
        q.requires_grad_(True)
    dense = DenseGpuProjector(p, args.dim, args.seed, args.device)
    batches = [collate(ex[s:s + args.feature_batch], 0) for s in range(0, len(ex), args.feature_batch)]
    R = {}
    C.log(f"features: elrea on {len(ex)} examples ...")
    R["elrea"] = measure(lambda: feat.features(ex), args, warmup=lambda: feat.features(ex[:args.feature_batch]))
    C.log("features: plain training forward+backward ...")
    R["plain_fwd_bwd"] = measure(lambda: plain_fwd_bwd(model, batches), args,
                                 warmup=lambda: plain_fwd_bwd(model, batches[:1]))
    C.log(f"features: the LESS way on {len(less_ex)} examples ...")

    def less():
        G = reference_gradients(model, params, less_ex)              # (n, p), one backward each
        return dense.project(G)

    R["less"] = measure(less, args, warmup=lambda: dense.project(reference_gradients(model, params, less_ex[:1])))
    # agreement: elrea's batched gradients through the same dense projection
    G = torch.cat([per_example_gradients(model, collate(less_ex[s:s + args.feature_batch], 0))
                   for s in range(0, len(less_ex), args.feature_batch)])
    cos = F.cosine_similarity(dense.project(G).double(), R["less"][2].double(), dim=1)
    model.zero_grad(set_to_none=True)
    n, n_less = len(ex), len(less_ex)
    rates = {"elrea": n / R["elrea"][0], "plain_fwd_bwd": n / R["plain_fwd_bwd"][0], "less": n_less / R["less"][0]}
    return {"examples": n, "less_examples": n_less, "batch": args.feature_batch, "lora_params": p,
            "examples_per_s": rates, "peak_mib": {k: v[1] for k, v in R.items()},
            "speedup_vs_less": rates["elrea"] / rates["less"],
            "over_plain_fwd_bwd": R["elrea"][0] / R["plain_fwd_bwd"][0],
            "agreement_cosine_min": float(cos.min()), "agreement_cosine_mean": float(cos.mean())}


def profile_phase(model, args, vocab: int, out: dict) -> None:
    """speed_features.phase_profile at each of args.profile_batches, into out[str(B)] as each
    finishes (a time cap keeps those): the same examples as the features part."""
    from elrea.data import collate
    from elrea.features import num_lora_params
    from elrea.projection import SparseProjector
    from speed_features import phase_profile

    ex = examples(args.examples, args, vocab, args.seed)
    for q in [q for n, q in model.named_parameters() if ".base." in n and ".lora_" in n]:
        q.requires_grad_(True)   # the training step's gradients reach the same LoRA weights
    projector = SparseProjector(num_lora_params(model, "base"), args.dim, args.seed)
    for B in args.profile_batches:
        C.log(f"profile: batch {B}, {len(ex)} examples ...")
        batches = [collate(ex[s:s + B], 0, side="right") for s in range(0, len(ex), B)]
        out[str(B)] = phase_profile(model, batches, projector, args.repeats, adapter="base", device=args.device)
        out[str(B)]["lora_params"] = projector.num_params
    model.zero_grad(set_to_none=True)


def decoding_phase(model, adapters, args, vocab: int, out: dict) -> None:
    """The decoding methods at each batch size, into out[str(B)] as each method finishes (a time
    cap keeps those); out["incomplete"] lists the batch sizes not fully measured."""
    from elrea.features import Featurizer, num_lora_params
    from elrea.projection import SparseProjector
    from speed_generate import checks, decode_each, prepare, ratios, routing_weights

    n_tok, dev = args.new_tokens, torch.device(args.device)
    models = prepare(model, adapters, 0, None if args.anchor_compile == "off" else args.anchor_compile,
                     with_anchor="anchor_merged_static" in args.methods)
    prompts_all = examples(max(args.batch_sizes), args, vocab, args.seed + 1)
    W = routing_weights(max(args.batch_sizes), len(adapters), args.seed)
    feat = Featurizer(model, SparseProjector(num_lora_params(model, "base"), args.dim, args.seed),
                      adapter="base", pad_id=0, batch_size=16)
    out["incomplete"] = [str(B) for B in args.batch_sizes]
    for B in args.batch_sizes:
        prompts, w = [e.input_ids for e in prompts_all[:B]], W[:B]

        def timed(fn, compiled):
            """Warm-up (n tokens when compiled: the compile happens there), then the timed runs;
            peak_mib: GPU memory allocated at the peak of both, above what was allocated before."""
            first = {}

            def warmup():
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                    first["base"] = torch.cuda.memory_allocated(dev)
                t = time.perf_counter()
                fn(n_tok if compiled else 2)
                C.sync(dev)
                first["s"] = time.perf_counter() - t

            def once():
                toks = fn(n_tok)
                C.sync(dev)
                return toks

            sec, _, toks = C.timed(once, args.repeats, warmup)
            peak = (torch.cuda.max_memory_allocated(dev) - first["base"]) / 2 ** 20 if dev.type == "cuda" else None
            return {"seconds": sec, "tokens_per_s": B * n_tok / sec, "warmup_s": round(first["s"], 2),
                    "peak_mib": peak}, toks

        res, toks = {}, {}
        out[str(B)] = res
        for name, result, tokens in decode_each(models, prompts, w, n_tok, args.methods, timed,
                                                engine_mode=args.engine_compile):
            res[name], toks[name] = result, tokens
            res["ratios"], res["checks"] = ratios(res), checks(toks, n_tok)   # so far, should a cap stop it
        for key, ratio in (("single_adapter_peft", "ratio_to_single"), ("anchor_merged_static", "ratio_to_anchor")):
            for m in [m for m in args.methods if m in res and key in res]:
                res[m][ratio] = res[m]["tokens_per_s"] / res[key]["tokens_per_s"]
        sec, _, _ = measure(lambda: feat.batch(prompts_all[:B]), args)
        res["routing_ms_per_prompt"] = 1000 * sec / B
        out["incomplete"].remove(str(B))
    b1 = out.get("1", {})
    # routing cost in decoded tokens at batch 1: PEFT's single-adapter token, and the engine's ensemble token
    for method, token, routing in (("single_adapter_peft", "decoded_token_ms_b1", "routing_over_token_b1"),
                                   ("engine", "engine_token_ms_b1", "routing_over_engine_token_b1")):
        if method in b1 and "routing_ms_per_prompt" in b1:
            out[token] = 1000 * b1[method]["seconds"] / n_tok
            out[routing] = b1["routing_ms_per_prompt"] / out[token]


def e2e_phase(args) -> dict:
    """`elrea fit` + `elrea eval` of a real model on the device, as a user would run them."""
    from elrea.rundir import Run
    from elrea import ELREA
    from elrea.config import load_config
    from elrea.data import load_records
    from elrea.evaluation import evaluate
    from elrea.pipeline import fit

    data, out = Path(args.e2e_data), Path("benchmarks/work/gpu-e2e")
    cfg = load_config(None, [f"model.name={args.e2e_model}", f"model.device={args.device}", *args.e2e_overrides])
    t0 = time.time()
    fit(data / "train.jsonl", out, cfg)
    t_fit = time.time() - t0
    m = ELREA.from_pretrained(out, device=args.device)
    t0 = time.time()
    result = evaluate(m, load_records(data / "test.jsonl"), progress=False)
    return {"fit_s": t_fit, "eval_s": time.time() - t0, "accuracy": result["accuracy"],
            "stage_seconds": {k: v.get("seconds") for k, v in
                              json.loads(Run(out).manifest.read_text())["stages"].items()}}


# ----------------------------------------------------------------------------- the run

def device_info(device: str) -> dict:
    dev = torch.device(device)
    info = {"device": str(dev), "torch": torch.__version__, "cuda": torch.version.cuda}
    if dev.type == "cuda":
        info.update(C.gpu_info(dev))
    else:
        info["name"] = "cpu (smoke run: timings mean nothing)"
    return info


def run_part(name: str, fn, args, record: dict) -> None:
    """Run part `name` under its time cap; the cap or an error is recorded in `record` and the
    run goes on to the next part (main exits non-zero after writing the report if one failed)."""
    t, cap = time.perf_counter(), {"fired": False}
    try:
        with time_cap(args.caps.get(name), name) as cap:
            result = fn()
        if result is not None:
            record[name] = result
    except (Exception, TimeCap) as e:  # noqa: BLE001 - one GPU session: a failing part must not lose the others
        if cap["fired"]:
            C.log(f"{name}: stopped by its time cap of {args.caps[name]:g} s")
            record.setdefault("stopped", {})[name] = f"time cap of {args.caps[name]:g} s reached"
        else:
            traceback.print_exc()
            record.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
    record.setdefault("part_seconds", {})[name] = round(time.perf_counter() - t, 1)


def run(args, report: dict, save) -> None:
    for arch in args.archs:
        C.log(f"{arch}: building from its config with random weights ...")
        model, adapters, info = build_model(arch, args)
        vocab = ARCHS[arch][1]["vocab_size"]
        r = report["archs"][arch] = dict(info)
        if "features" in args.parts:
            run_part("features", lambda: features_phase(model, args, vocab), args, r)
            save()
        if "profile" in args.parts:
            r["profile"] = {}
            run_part("profile", lambda: profile_phase(model, args, vocab, r["profile"]), args, r)
            save()
        if "decoding" in args.parts:
            r["decoding"] = {}
            run_part("decoding", lambda: decoding_phase(model, adapters, args, vocab, r["decoding"]), args, r)
            save()
        model = adapters = None  # free the GPU before the next architecture
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()
    if "e2e" in args.parts and args.e2e_model and args.e2e_data:
        run_part("e2e", lambda: e2e_phase(args), args, report)
        save()


def targets(r: dict, args) -> dict:
    """Each target met (True/False), or None where its part or batch size did not run."""
    f, d = r.get("features"), r.get("decoding", {})
    b1, b32 = d.get("1", {}), d.get("32", {})

    def at_least(x, target):
        return None if x is None else x >= target

    def get(res, *keys):
        for k in keys:
            if not isinstance(res, dict) or k not in res:
                return None
            res = res[k]
        return res

    agreed = [d[B]["checks"]["engine_equals_before"] for B in map(str, args.batch_sizes)
              if "engine_equals_before" in (get(d, B, "checks") or {})]
    return {"features_speedup_ge_20x_less": at_least(get(f, "speedup_vs_less"), TARGETS["features_speedup_vs_less"]),
            "features_le_1_3x_fwd_bwd": (None if f is None
                                         else f["over_plain_fwd_bwd"] <= TARGETS["features_over_fwd_bwd"]),
            "agreement_cosine_ge_0_999": at_least(get(f, "agreement_cosine_min"), 0.999),
            "ensemble_ge_0_8x_single_b1": at_least(get(b1, "ratios", "engine_over_peft"),
                                                   TARGETS["ensemble_over_single_b1"]),
            "engine_ge_150_tokens_per_s_b1": at_least(get(b1, "engine", "tokens_per_s"),
                                                      TARGETS["engine_b1_tokens_per_s"]),
            "engine_ge_0_8x_anchor_b1": at_least(get(b1, "ratios", "engine_over_anchor"),
                                                 TARGETS["engine_over_anchor_b1"]),
            "engine_ge_1000_tokens_per_s_b32": at_least(get(b32, "engine", "tokens_per_s"),
                                                        TARGETS["engine_b32_tokens_per_s"]),
            "routing_le_5_tokens": (None if "routing_over_token_b1" not in d
                                    else d["routing_over_token_b1"] <= TARGETS["routing_over_token"]),
            "engine_equals_before": all(agreed) if agreed else None}


def show(report: dict, args):
    from speed_features import PROFILE_COLUMNS, profile_rows
    from speed_generate import LABELS

    for arch, r in report["archs"].items():
        f, d = r.get("features"), r.get("decoding", {})
        for B, prof in r.get("profile", {}).items():
            C.print_table(
                f"{arch} ({report['device']['name']}, {args.dtype}): where the features' time goes, batch {B}, "
                f"{prof['lora_params']:,} LoRA params -> {args.dim}, median of {prof['repeats']} ({prof['timer']})",
                PROFILE_COLUMNS, profile_rows(prof),
                [f"features / training fwd+bwd: {prof['features_over_train_whole']:.2f} whole, "
                 f"{prof['features_over_train_profiled']:.2f} profiled"])
        if f:
            C.print_table(
                f"{arch} ({report['device']['name']}): gradient features, {f['lora_params']:,} LoRA params -> "
                f"{args.dim}", ["method", "examples/s", "x LESS", "peak MiB"],
                [["elrea (batched per-example, sparse JL)", f["examples_per_s"]["elrea"], f["speedup_vs_less"],
                  f["peak_mib"]["elrea"]],
                 ["LESS way (backward per example, dense)", f["examples_per_s"]["less"], 1.0, f["peak_mib"]["less"]],
                 ["plain training fwd+bwd", f["examples_per_s"]["plain_fwd_bwd"], None,
                  f["peak_mib"]["plain_fwd_bwd"]]],
                [f"elrea / plain fwd+bwd: {f['over_plain_fwd_bwd']:.2f} (target <= 1.3); agreement cosine min "
                 f"{f['agreement_cosine_min']:.6f}"])
        bs = [str(B) for B in args.batch_sizes if str(B) in d]
        if bs:
            rows = [[LABELS[m]] + [x for B in bs for x in (d[B].get(m, {}).get("tokens_per_s"),
                                                              d[B].get(m, {}).get("ratio_to_anchor"))]
                    for m in LABELS if any(m in d[B] for B in bs)]
            rows.append(["routing ms per prompt"] + [x for B in bs for x in (d[B].get("routing_ms_per_prompt"), None)])
            for key in ("engine_over_before", "engine_over_anchor", "engine_single_over_peft"):
                rows.append([key.replace("_", " ")] + [x for B in bs for x in (d[B].get("ratios", {}).get(key), None)])
            notes = [f"batch {B}: engine == elrea before tokens: {C.fmt(ch.get('engine_equals_before'))} (common "
                     f"prefix {ch.get('engine_common_prefix_before', 0):.3f}); engine one-hot == PEFT: "
                     f"{C.fmt(ch.get('engine_single_equals_peft'))} "
                     f"({ch.get('engine_single_common_prefix_peft', 0):.3f}); "
                     f"engine {fa.get('compile')} compiled {fa.get('compiled_buckets')} fallback {fa.get('fallback')}; "
                     f"first calls (s): { {m: d[B][m]['warmup_s'] for m in LABELS if m in d[B]} }"
                     for B in bs for ch, fa in [(d[B].get("checks", {}), d[B].get("engine", {}).get("engine", {}))]]
            if d.get("incomplete"):
                notes.append(f"not (fully) run (time cap or error): batch {', '.join(d['incomplete'])}")
            if "routing_over_token_b1" in d:
                notes.append(f"routing = {d['routing_over_token_b1']:.1f} PEFT decoded tokens at batch 1 (target <= 5)")
            notes.append(f"targets: {report['targets'][arch]}")
            C.print_table(f"{arch}: decoding {args.new_tokens} tokens, {args.experts + 1} adapters, tokens/s",
                          ["method"] + [h for B in bs for h in (f"tok/s b={B}", f"x anchor b={B}")], rows, notes)
        for key in ("stopped", "errors"):
            if r.get(key):
                print(f"{arch}: {key}: {r[key]}")
    print(f"command: {report['command']}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA GPU and this machine has none (torch "
              f"{torch.__version__}). Run it on a GPU machine, or `--smoke` to check the code on the CPU.",
              file=sys.stderr)
        raise SystemExit(2)
    C.setup(argparse.Namespace(threads=None, seed=args.seed))
    report = {"command": C.command_line(str(Path(__file__)), argv), "machine": C.machine(),
              "device": device_info(args.device), "archs": {}}
    slug = re.sub(r"[^a-z0-9]+", "-", report["device"]["name"].lower()).strip("-")
    out = Path(args.out) if args.out else C.RESULTS / (f"gpu-{slug}.json" if not args.smoke else "gpu_smoke.json")

    def save():
        report["targets"] = {arch: targets(r, args) for arch, r in report["archs"].items()}
        C.write_report(out, report)

    run(args, report, save)
    save()
    show(report, args)
    failed = [f"{arch}: {e}" for arch, r in report["archs"].items() for e in r.get("errors", {}).values()]
    failed += list(report.get("errors", {}).values())
    if failed:
        print("parts that failed: " + "; ".join(failed), file=sys.stderr)
        raise SystemExit(1)
    return report


if __name__ == "__main__":
    main()
